"""faytd for tests: the one way a test starts one, and what it looks at.

A test's faytd is faytd.launch's (the library's own way to run a real
faytd and wait until it serves: the log in a file, SIGTERM to stop, the
object keepers it leaves judged at the end of the run), with what tests
need on top:

- as_user=AsUser, uid=N: faytd itself runs as another user;
- read_log(), state() and wait_state() (faytd's share-points, free frames
  and mappings, through a libportal connection of its own);
- stop_clean(): stopped, and it must not have died by itself nor logged a
  Traceback (unless the test reported the crash itself: crash_reported).

faytd's configuration is parsed in process by parse_config() (the checks
faytd makes before it serves, the same functions); faytd_refuses() runs a
faytd that must exit at start, for the tests of how faytd reports that.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from faytd import launch
from faytd.launch import fayt_objects, keepers, wait_for_socket  # noqa: F401 (re-exported)

NOBODY = 65534
TIMEOUT = 60            # seconds: a bound against a hang, never a measure

# A configuration under which the test's own uid ($owner) is core and a
# process with gid SERVER_GID (a child of the test that setgid()s: tests
# run as root) is a plain server.
SERVER_GID = 4242
SERVER_GID_CONFIG = {"policy": {
    "categories": {"core": {"classes": ["SHARE", "DIRECT", "ANON", "COW", "SPECIAL"],
                            "notify_handlers": True},
                   "server": {"classes": ["SHARE", "ANON"]}},
    "rules": [{"gid": SERVER_GID, "category": "server"},
              {"uid": "$owner", "category": "core"}],
    "default": "server"}}


class Faytd(launch.Faytd):
    """A running faytd: .socket, .dir, .proc, .log; env(); stop() -> the log.

    directory holds its log and config (and is its state directory);
    config: a dict written as its JSON configuration; ram: e.g. "64MiB";
    extra: more command-line arguments; as_user, uid: run it as that user;
    socket: its socket (and state directory) elsewhere than in directory,
    made by faytd itself if missing."""

    def __init__(self, directory, config=None, ram=None, extra=(), as_user=None, uid=None,
                 socket=None):
        self.crash_reported = False     # the test reported a crash itself: stop_clean passes
        self.uid = uid                  # faytd's, when it runs as another user (else None)
        if as_user is None and socket is None:
            super().__init__(directory, config, ram, extra)
            return
        # The same command line, run by as_user, or with the socket elsewhere.
        os.makedirs(directory, exist_ok=True)
        self.socket = socket or os.path.join(directory, "faytd.sock")
        args = ["--socket", self.socket, "-v"]
        if config is not None:
            cfg = os.path.join(directory, "faytd.json")
            with open(cfg, "w") as f:
                json.dump(config, f)
            os.chmod(cfg, 0o644)
            args += ["--config", cfg]
        if ram:
            args += ["--ram", str(ram)]
        args += list(extra)
        self.log = os.path.join(directory, "faytd.log")
        code = ("import sys, runpy; sys.argv = ['faytd'] + sys.argv[1:]; "
                "runpy.run_module('faytd', run_name='__main__')")
        with open(self.log, "w") as logf:
            if as_user is None:
                self.proc = subprocess.Popen([sys.executable, "-m", "faytd"] + args,
                                             stderr=logf, stdin=subprocess.DEVNULL)
            else:
                self.proc = as_user.popen(code, args, uid=uid, gid=uid, stderr=logf,
                                          stdin=subprocess.DEVNULL)
        # Known to faytd.launch like its own: stopped at exit, its keeper judged.
        launch.STARTED.append(self.proc.pid)
        launch.RUNS[self.proc.pid] = self.dir = os.path.realpath(os.path.dirname(self.socket))
        launch.LAST[self.dir] = self.proc
        launch._running.append(self)
        try:
            wait_for_socket(self.socket, self.proc, log=self.log)
        except BaseException:
            self.stop(check=False)
            raise

    def read_log(self):
        with open(self.log) as f:
            return f.read()

    def state(self):
        """What faytd holds: share-point identifiers, free frames, mappings."""
        return state(self)

    def wait_state(self, want, timeout=15):
        """Poll state() until it equals `want` (a death is handled
        asynchronously); the last state seen."""
        return wait_state(self, want, timeout)

    def stop_clean(self):
        """Stop it; it must not have exited by itself before, nor logged a
        Traceback (an internal error), unless the test reported that itself."""
        died = self.proc.poll()
        log = self.stop()
        if self.crash_reported:
            return log
        assert died is None, "faytd exited by itself with %s:\n%s" % (died, log[-4000:])
        assert "Traceback" not in log, log[log.index("Traceback") - 200:][:4000]
        return log


def world_dir():
    """A new directory under /tmp that every user may traverse (a test's
    tmp_path may sit under 0700 parents); remove it with shutil.rmtree."""
    d = tempfile.mkdtemp(prefix="fayt-test-")
    os.chmod(d, 0o755)
    return d


def remove_world_dir(d):
    shutil.rmtree(d, ignore_errors=True)


# -- configuration ------------------------------------------------------------

def parse_config(path):
    """What faytd checks of its configuration file before it serves (main:
    config.load, then the policy as Kernel builds it); ValueError with the
    message faytd would print."""
    from faytd import config
    from faytd.policy import Policy
    cfg = config.load(path)
    Policy(cfg["policy"], os.getuid())
    return cfg


def faytd_refuses(args, timeout=20):
    """Run `python -m faytd ARGS` that must refuse to start: it exits non-zero
    with a message and no Traceback, and leaves no socket, and no lock file
    in its state directory that was not there before.  Its stderr."""
    sock = args[args.index("--socket") + 1]
    state = args[args.index("--state-dir") + 1] if "--state-dir" in args else \
        os.path.dirname(sock)
    lock = os.path.join(state, "faytd.journal.lock")
    locked_before = os.path.exists(lock)
    p = subprocess.Popen([sys.executable, "-m", "faytd"] + list(args),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while p.poll() is None and not os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.02)
    if p.poll() is None:
        serving = os.path.exists(sock)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=15)
        raise AssertionError("faytd started%s:\n%s"
                             % (" and served" if serving else "", err[-2000:]))
    out, err = p.communicate(timeout=15)
    assert p.returncode != 0, err
    assert "Traceback" not in err, err
    assert not os.path.exists(sock)
    assert os.path.exists(lock) == locked_before, "faytd left %s behind" % lock
    return err


# -- running Python as another user -------------------------------------------

_DROP = r"""
import errno, json, os, sys, time, socket, threading, array, weakref
import libportal, libportal.portal, libportal._abi
import argparse, copy, fnmatch, gettext, locale, logging, mmap, re, runpy, secrets, select
import selectors, shutil, signal, datetime, psutil
import stat, struct, traceback, posix_ipc, ctypes, subprocess, uuid, tempfile, json.decoder
import faytd.main, faytd.server, faytd.kernel, faytd.syscalls, faytd.cli, faytd.tools
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
code = sys.argv[3]
sys.argv = [sys.argv[0]] + sys.argv[4:]
exec(compile(code, "<as-user>", "exec"), {"__name__": "__main__"})
"""


class AsUser:
    """Runs Python code in a process whose real and effective uid and gid are
    the ones asked for.  .exe is the interpreter faytd will see.

    Running Python as nobody needs an interpreter nobody may execute: the
    venv's python may live under a 0700 home (pyenv under /root).  The first
    interpreter of the same version that nobody can run and that imports
    libportal (with PYTHONPATH naming the repository and the venv's
    site-packages) is used (mode "exec"); if there is none, the client starts
    as root, imports what it needs, and drops to the user with setgid/setuid
    before it runs the code (mode "drop": it is that user when faytd sees it
    either way).  FAYT_TEST_AS_USER=drop forces the fallback."""

    def __init__(self):
        import _cffi_backend
        import posix_ipc
        import libportal
        # Where libportal (and faytd beside it) is imported from: the checkout,
        # or site-packages.
        repo = os.path.dirname(os.path.dirname(os.path.abspath(libportal.__file__)))
        paths = [repo, os.path.dirname(_cffi_backend.__file__),
                 os.path.dirname(posix_ipc.__file__)]
        self.pythonpath = os.pathsep.join(dict.fromkeys(paths))
        minor = "python%d.%d" % sys.version_info[:2]
        candidates = [sys.executable, os.path.realpath(sys.executable),
                      shutil.which(minor), "/usr/bin/" + minor, "/usr/local/bin/" + minor]
        self.mode, self.interp, self.why = "drop", sys.executable, []
        if os.environ.get("FAYT_TEST_AS_USER") == "drop":
            candidates = []
        for c in dict.fromkeys(x for x in candidates if x):
            try:
                r = subprocess.run([c, "-c", "import libportal, faytd, posix_ipc"],
                                   env=self.env({}), cwd="/", capture_output=True, text=True,
                                   timeout=TIMEOUT, **self._ids(NOBODY, NOBODY))
            except OSError as e:
                self.why.append("%s: %s" % (c, e.strerror))
                continue
            if r.returncode == 0:
                self.mode, self.interp = "exec", c
                break
            self.why.append("%s: %s" % (c, r.stderr.strip().splitlines()[-1:]))
        self.exe = os.path.realpath(self.interp)

    @staticmethod
    def _ids(uid, gid):
        return {"user": uid, "group": gid, "extra_groups": []}

    def env(self, extra):
        e = {"PATH": "/usr/bin:/bin", "PYTHONPATH": self.pythonpath,
             "PYTHONDONTWRITEBYTECODE": "1"}
        e.update(extra)
        return e

    def popen(self, code, args, uid=NOBODY, gid=NOBODY, env=None, **kw):
        """subprocess.Popen of `python -c code args...` as uid/gid."""
        args = [str(a) for a in args]
        if self.mode == "exec":
            argv, ids = [self.interp, "-c", code] + args, self._ids(uid, gid)
        else:
            argv, ids = [sys.executable, "-c", _DROP, str(uid), str(gid), code] + args, {}
        kw.setdefault("text", True)
        return subprocess.Popen(argv, env=self.env(env or {}), cwd="/", **ids, **kw)


def state(d):
    """What faytd `d` (any daemon with .socket; .uid if it runs as another
    user) holds: share-point identifiers, free frames, mappings."""
    import libportal
    c = libportal.Connection(d.socket, faytd_uid=getattr(d, "uid", None))
    try:
        shares = c.list_sharepoints()
        ctxs = c.list_contexts()
    finally:
        c.close()
    return {"shares": sorted(s["identifier"] for s in shares),
            "free_frames": ctxs["free_frames"],
            "mappings": sum(x["mappings"] for x in ctxs["contexts"])}


def wait_state(d, want, timeout=15):
    """Poll state(d) until it equals `want` (a death is handled
    asynchronously); the last state seen."""
    return poll_equal(lambda: state(d), want, timeout)


def poll_equal(get, want, timeout):
    """get() until it returns `want`, or timeout seconds: the last value."""
    deadline = time.monotonic() + timeout
    while True:
        now = get()
        if now == want or time.monotonic() > deadline:
            return now
        time.sleep(0.02)
