"""Permissions: a policy maps a client's identity to a category, the category
to rights; a refused call is EPERM and creates nothing.

Identity is what the Linux kernel vouches for (SO_PEERCRED, /proc/<pid>/exe),
so these tests run their clients as processes that really have another uid:
the tests run as root and start the clients as uid/gid 65534 (nobody).  The
daemon's socket is made 0666 (config "socket_mode") inside a directory made
0755 under /tmp, so that such a client can reach it at all.

Running Python as nobody needs an interpreter nobody may execute: the venv's
python may live under a 0700 home (pyenv under /root).  The first interpreter
of the same version that nobody can run and that imports libportal (with
PYTHONPATH naming the repository and the venv's site-packages) is used; if
there is none, the client starts as root, imports libportal, and drops to
nobody with setgid/setuid before it connects (it is nobody when faytd sees
it either way).
"""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

import libportal
from faytd.config import DEFAULT
from faytd.launch import LAST, RUNS, STARTED
from libportal._abi import lib

NOBODY = 65534
OTHER_UID = 12345           # a uid with no passwd entry: the kernel does not care
ALL = lib.FAYT_PORTAL_CLASSES
ANON, SHARE, DIRECT = lib.FAYT_PORTAL_ANON, lib.FAYT_PORTAL_SHARE, lib.FAYT_PORTAL_DIRECT
COW, SPECIAL = lib.FAYT_PORTAL_COW, lib.FAYT_PORTAL_SPECIAL
PAGE = lib.FAYT_PAGE_SIZE
TIMEOUT = 60
REPO = os.path.dirname(os.path.dirname(os.path.abspath(libportal.__file__)))

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as "
                                                          "another uid")

ALL_CLASSES = ["SHARE", "DIRECT", "ANON", "COW", "SPECIAL"]


# -- running Python as another user ---------------------------------------

_DROP = r"""
import errno, json, os, sys, time, socket, threading, array, weakref
import libportal, libportal.portal, libportal._abi
import argparse, copy, fnmatch, gettext, locale, logging, mmap, re, runpy, secrets, select
import selectors, shutil, signal
import stat, struct, traceback, posix_ipc, ctypes, subprocess, uuid, tempfile, json.decoder
import faytd.main, faytd.server, faytd.kernel, faytd.syscalls
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
    the ones asked for.  .exe is the interpreter faytd will see."""

    def __init__(self):
        import _cffi_backend
        import posix_ipc
        paths = [REPO, os.path.dirname(_cffi_backend.__file__),
                 os.path.dirname(posix_ipc.__file__)]
        self.pythonpath = os.pathsep.join(dict.fromkeys(paths))
        minor = "python%d.%d" % sys.version_info[:2]
        candidates = [sys.executable, os.path.realpath(sys.executable),
                      shutil.which(minor), "/usr/bin/" + minor, "/usr/local/bin/" + minor]
        self.mode, self.interp, self.why = "drop", sys.executable, []
        if os.environ.get("FAYT_TEST_AS_USER") == "drop":      # to test the fallback
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
        e = {"PATH": "/usr/bin:/bin", "PYTHONPATH": self.pythonpath, "PYTHONDONTWRITEBYTECODE": "1"}
        e.update(extra)
        return e

    def popen(self, code, args, uid=NOBODY, gid=NOBODY, env=None, **kw):
        args = [str(a) for a in args]
        if self.mode == "exec":
            argv, ids = [self.interp, "-c", code] + args, self._ids(uid, gid)
        else:
            argv, ids = [sys.executable, "-c", _DROP, str(uid), str(gid), code] + args, {}
        return subprocess.Popen(argv, env=self.env(env or {}), cwd="/", text=True, **ids, **kw)


_as_user = None


@pytest.fixture(scope="module")
def as_user():
    global _as_user
    if _as_user is None:
        _as_user = AsUser()
    return _as_user


# -- a faytd others can reach ---------------------------------------------

class Daemon:
    """python -m faytd with a config, its socket in a world-reachable
    directory, its log in a file; optionally run as another user."""

    def __init__(self, directory, config, runner=None, uid=None, ram="64MiB"):
        self.dir = directory
        self.socket = os.path.join(directory, "faytd.sock")
        self.log = os.path.join(directory, "faytd.log")
        cfg = os.path.join(directory, "faytd.json")
        with open(cfg, "w") as f:
            json.dump(config, f)
        os.chmod(cfg, 0o644)
        args = ["-m", "faytd", "--socket", self.socket, "--config", cfg, "--ram", ram, "-v"]
        with open(self.log, "w") as logf:
            if uid is None:
                self.proc = subprocess.Popen([sys.executable] + args, stderr=logf)
            else:
                code = "import sys, runpy; sys.argv = ['faytd'] + sys.argv[1:]; " \
                       "runpy.run_module('faytd', run_name='__main__')"
                self.proc = runner.popen(code, args[2:], uid=uid, gid=uid, stderr=logf)
        STARTED.append(self.proc.pid)       # judged by conftest's leak check (its keeper)
        RUNS[self.proc.pid] = os.path.realpath(os.path.dirname(self.socket))
        LAST[RUNS[self.proc.pid]] = self.proc
        deadline = time.monotonic() + 20
        while not self._accepts():
            if self.proc.poll() is not None:
                raise RuntimeError("faytd exited with %s:\n%s" % (self.proc.returncode,
                                                                  self.read_log()))
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("faytd did not listen:\n" + self.read_log())
            time.sleep(0.02)

    def _accepts(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(self.socket)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def read_log(self):
        with open(self.log) as f:
            return f.read()

    def state(self):
        c = libportal.Connection(self.socket)
        try:
            shares = c.list_sharepoints()
            ctxs = c.list_contexts()
        finally:
            c.close()
        return {"shares": sorted(s["identifier"] for s in shares),
                "free_frames": ctxs["free_frames"],
                "mappings": sum(x["mappings"] for x in ctxs["contexts"])}

    def wait_state(self, want, timeout=15):
        deadline = time.monotonic() + timeout
        while True:
            now = self.state()
            if now == want or time.monotonic() > deadline:
                return now
            time.sleep(0.02)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.read_log()


@pytest.fixture
def world_dir():
    """A directory under /tmp that every user may traverse (tmp_path's
    parents may be 0700)."""
    d = tempfile.mkdtemp(prefix="fayt-policy-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start(world_dir):
    """start(policy=..., **config) -> a running Daemon whose socket is 0666."""
    started = []

    def go(policy=None, runner=None, uid=None, **config):
        cfg = {"socket_mode": "0666"}
        cfg.update(config)
        if policy is not None:
            cfg["policy"] = policy
        sub = os.path.join(world_dir, "d%d" % len(started))
        os.makedirs(sub)
        os.chmod(sub, 0o755)
        if uid is not None:             # faytd as a user: its directory is its own (dirs.py)
            os.chown(sub, uid, uid)
        d = Daemon(sub, cfg, runner, uid)
        started.append(d)
        return d

    yield go
    for d in started:
        log = d.stop()
        assert "Traceback" not in log, log[-3000:]


# -- the client ------------------------------------------------------------

CLIENT = r"""
import errno, json, os, sys
import libportal as lp
from libportal._abi import lib, HANDLE_REQ

sock, actions = sys.argv[1], json.loads(sys.argv[2])
out = {"uid": os.getuid(), "gid": os.getgid(), "euid": os.geteuid(), "pid": os.getpid(),
       "groups": os.getgroups(), "steps": []}
held = {}


def do(a, c):
    kind = a[0]
    if kind == "anon":
        p = lp.portal(lp.ANON, lp.PROT_RW, a[1], connection=c)
        p.buf[0:5] = b"hello"
        ok = bytes(p.buf[0:5]) == b"hello"
        p.unmap()
        return ok
    if kind == "portal":          # ["portal", type, prot, length, {kwargs}]
        p = lp.portal(a[1], a[2], a[3], connection=c, **a[4])
        if isinstance(p, lp.SharePoint) and p.created:
            p.destroy()
        else:
            p.unmap()
        return True
    if kind == "create":          # ["create", name, length, data]
        sp = held[a[1]] = lp.share_create(a[1], a[2], connection=c)
        sp.write(0, a[3].encode())
        return sp.created
    if kind == "attach":          # ["attach", name, nbytes]
        sp = held[a[1]] = lp.share_attach(a[1], lp.PROT_RW, connection=c)
        return sp.read(0, a[2]).decode()
    if kind == "destroy":
        held[a[1]].destroy()
        del held[a[1]]
        return True
    if kind == "share_destroy":   # the bare SHARE_DESTROY op on our handle
        c.call(lib.FAYT_SYS_SHARE_DESTROY, HANDLE_REQ.pack(held[a[1]].handle))
        return True
    if kind == "unmap":
        held.pop(a[1]).unmap()
        return True
    if kind == "stats":
        return c.stats()["sharepoints"]
    if kind == "me":
        me = [x for x in c.list_contexts()["contexts"] if x["id"] == c.context_id]
        return me[0] if me else None
    if kind == "pause":           # report so far, wait for a line on stdin
        print(json.dumps(out), flush=True)
        sys.stdin.readline()
        return True
    raise ValueError(kind)


try:
    c = lp.Connection(sock)
except lp.PortalError as e:
    out["hello"] = [e.errno, e.strerror]
else:
    out["hello"] = [0, {"category": c.category, "rights": c.rights, "context_id": c.context_id}]
    for a in actions:
        try:
            out["steps"].append([a[0], 0, do(a, c)])
        except lp.PortalError as e:
            out["steps"].append([a[0], e.errno, e.strerror])
print(json.dumps(out), flush=True)
"""


def run_client(as_user, d, actions=(), uid=NOBODY, gid=None):
    """Run CLIENT as uid; return its report (JSON)."""
    p = as_user.popen(CLIENT, [d.socket, json.dumps(list(actions))], uid=uid,
                      gid=uid if gid is None else gid,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    rep = json.loads(out.strip().splitlines()[-1])
    want_gid = uid if gid is None else gid
    assert (rep["uid"], rep["euid"], rep["gid"], rep["groups"]) == (uid, uid, want_gid, [])
    return rep


def steps(rep):
    return [(name, errno.errorcode.get(err, err) if err else 0) for name, err, _ in rep["steps"]]


def _name(tag):
    return "policy-%s-%s" % (tag, uuid.uuid4().hex[:10])


def _core_only_policy(extra_rules=(), default=None, categories=None):
    cats = categories or {"core": {"classes": ALL_CLASSES, "notify_handlers": True}}
    p = {"categories": cats, "rules": [{"uid": 0, "category": "core"}] + list(extra_rules)}
    if default:
        p["default"] = default
    return p


# -- the tests -------------------------------------------------------------

def test_policy_runner_really_changes_uid(as_user, start):
    """The client is another user as the kernel sees it (SO_PEERCRED)."""
    d = start()
    rep = run_client(as_user, d, [["me"]])
    assert rep["hello"][0] == 0, rep
    me = rep["steps"][0][2]
    assert (me["uid"], me["pid"], me["category"]) == (NOBODY, rep["pid"], "server")
    assert me["exe"] == as_user.exe


def test_policy_a_uid_above_2_to_the_31_is_served(as_user, start):
    """uid_t is unsigned: a uid the kernel gives as 3000000000 is that uid
    (SO_PEERCRED read as signed made it negative, and faytd refused it)."""
    d = start()
    big = 3000000000
    rep = run_client(as_user, d, [["me"], ["anon", PAGE]], uid=big, gid=big)
    assert rep["hello"][0] == 0, rep
    me = rep["steps"][0][2]
    assert (me["uid"], me["category"]) == (big, "server")
    assert steps(rep)[1] == ("anon", 0)


def test_policy_server_category_anon_only(as_user, start):
    d = start(_core_only_policy(
        [{"uid": NOBODY, "category": "server"}],
        categories={"core": {"classes": ALL_CLASSES}, "server": {"classes": ["ANON"]}}))
    owned = libportal.Connection(d.socket)
    existing = _name("existing")
    sp = libportal.share_create(existing, 2 * PAGE, connection=owned)
    try:
        before = d.state()
        name = _name("refused")
        rep = run_client(as_user, d, [
            ["anon", 3 * PAGE],
            ["portal", SHARE | ANON, 3, 2 * PAGE, {"identifier": name, "create": True}],
            ["attach", existing, 4],
            ["portal", DIRECT, 3, PAGE, {"paddr": [0x100000]}],
            ["me"],
        ])
        assert rep["hello"] == [0, {"category": lib.FAYT_CATEGORY_SERVER, "rights": ANON,
                                    "context_id": rep["hello"][1]["context_id"]}]
        assert steps(rep) == [("anon", 0), ("portal", "EPERM"), ("attach", "EPERM"),
                              ("portal", "EPERM"), ("me", 0)]
        assert rep["steps"][0][2] is True
        assert "category server may not use SHARE" in rep["steps"][1][2]
        assert "category server may not use DIRECT" in rep["steps"][3][2]
        assert rep["steps"][4][2]["category"] == "server"
        assert rep["steps"][4][2]["uid"] == NOBODY
        assert d.wait_state(before) == before       # nothing created, nothing left
        assert name not in d.state()["shares"]
    finally:
        sp.destroy()
        owned.close()


def test_policy_no_rule_matches_hello_refused(as_user, start):
    d = start(_core_only_policy([{"uid": 4242, "category": "core"}]))
    before = d.state()
    rep = run_client(as_user, d, [["anon", PAGE]])
    assert rep["hello"][0] == errno.EPERM, rep
    assert "no policy rule admits uid %d gid %d" % (NOBODY, NOBODY) in rep["hello"][1]
    assert rep["steps"] == []
    assert d.wait_state(before) == before
    # root still matches its rule and is core
    c = libportal.Connection(d.socket)
    assert c.category == lib.FAYT_CATEGORY_CORE
    c.close()


def test_policy_rule_by_gid(as_user, start):
    d = start(_core_only_policy(
        [{"gid": 4321, "category": "server"}],
        categories={"core": {"classes": ALL_CLASSES}, "server": {"classes": ["ANON"]}}))
    rep = run_client(as_user, d, [["anon", PAGE]], gid=4321)
    assert rep["hello"][0] == 0 and rep["hello"][1]["category"] == lib.FAYT_CATEGORY_SERVER
    rep = run_client(as_user, d, [["anon", PAGE]], gid=NOBODY)
    assert rep["hello"][0] == errno.EPERM


def test_policy_rule_by_exe_glob(as_user, start):
    base = os.path.basename(as_user.exe)           # e.g. python3.11
    glob = "*/" + base[:len("python")] + "*"
    cats = {"core": {"classes": ALL_CLASSES},
            "driver": {"classes": ["SHARE", "DIRECT", "ANON"]},
            "server": {"classes": ["ANON"]}}
    rules = [{"exe": "/nonexistent/*", "category": "core"},       # never matches
             {"uid": NOBODY, "exe": glob, "category": "driver"},  # first match wins
             {"uid": NOBODY, "category": "server"}]
    d = start(_core_only_policy(rules, categories=cats))
    rep = run_client(as_user, d, [["me"]])
    assert rep["hello"][0] == 0, rep
    assert rep["hello"][1]["category"] == lib.FAYT_CATEGORY_DRIVER
    assert rep["hello"][1]["rights"] == SHARE | DIRECT | ANON
    assert rep["steps"][0][2]["exe"] == as_user.exe
    # The exact path matches too; a glob that misses falls through to the uid rule.
    rules[1]["exe"] = as_user.exe
    d2 = start(_core_only_policy(rules, categories=cats))
    assert run_client(as_user, d2)["hello"][1]["category"] == lib.FAYT_CATEGORY_DRIVER
    rules[1]["exe"] = as_user.exe + "-not"
    d3 = start(_core_only_policy(rules, categories=cats))
    assert run_client(as_user, d3)["hello"][1]["category"] == lib.FAYT_CATEGORY_SERVER
    # exe alone, no uid rule behind it: a miss is refused.
    d4 = start(_core_only_policy([{"exe": "/opt/fayt/servers/*", "category": "driver"}],
                                 categories=cats))
    assert run_client(as_user, d4)["hello"][0] == errno.EPERM


def _faytd_fails(world_dir, config, expect_in_stderr):
    """faytd refuses to start: non-zero exit, a message on stderr, no socket."""
    sub = tempfile.mkdtemp(dir=world_dir)
    cfg = os.path.join(sub, "faytd.json")
    with open(cfg, "w") as f:
        f.write(config if isinstance(config, str) else json.dumps(config))
    sock = os.path.join(sub, "faytd.sock")
    p = subprocess.Popen([sys.executable, "-m", "faytd", "--socket", sock, "--config", cfg],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while p.poll() is None and not os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.02)
    if p.poll() is None:
        serving = os.path.exists(sock)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=15)
        raise AssertionError("faytd accepted this configuration%s:\n%s"
                             % (" and served it" if serving else "", err[-2000:]))
    out, err = p.communicate(timeout=15)
    assert p.returncode != 0, err
    assert expect_in_stderr in err, err
    assert "Traceback" not in err, err
    assert not os.path.exists(sock)
    return err


@pytest.mark.parametrize("policy, message", [
    ({"categories": {"core": {"classes": ["ANON", "SHAER"]}},
      "rules": [{"uid": 0, "category": "core"}]},
     "policy: category core: unknown portal class 'SHAER'"),
    ({"categories": {"core": {"classes": ALL_CLASSES}},
      "rules": [{"uid": 0, "category": "kernel"}]},
     "policy: rule {'uid': 0, 'category': 'kernel'} names no known category"),
    ({"categories": {"core": {"classes": ALL_CLASSES}}, "default": "server"},
     "policy: default category 'server' is not defined"),
    ({"categories": {}, "rules": []}, "policy: no categories"),
    ({"categories": {"core": {"classes": ALL_CLASSES, "notify": ["core", "drivers"]}},
      "rules": [{"uid": 0, "category": "core"}]},
     "policy: category core: notify names no known category: drivers"),
    ({"categories": {"core": {"classes": ALL_CLASSES}},
      "rules": [{"uid": 0, "categroy": "core"}]},
     "unknown keys ['categroy']"),
])
def test_policy_invalid_policy_file_faytd_exits(world_dir, policy, message):
    _faytd_fails(world_dir, {"policy": policy}, message)


@pytest.mark.parametrize("config, message", [
    ({"max_sharepoints": 5000000000},
     "config: max_sharepoints: 5000000000 is not a whole number from 1 to 4294967295"),
    ({"max_sharepoints": 100000.0},
     "config: max_sharepoints: 100000.0 is not a whole number from 1 to 4294967295"),
    ({"max_mappings_per_context": -1},
     "config: max_mappings_per_context: -1 is not a whole number from 1 to 4294967295"),
    ({"max_mappings_per_context": True},
     "config: max_mappings_per_context: True is not a whole number from 1 to 4294967295"),
    ({"fast_syscalls": "yes"}, "config: fast_syscalls must be true or false"),
    ({"max_ram_per_context": "20000000000GiB"},
     "config: max_ram_per_context: '20000000000GiB' is more than 2^64 bytes"),
    ({"max_portal_length": "20000000000GiB"},
     "config: max_portal_length: '20000000000GiB' is more than 2^64 bytes"),
    ({"ram": "20000GiB"}, "config: ram: 21474836480000 bytes is 2^32 frames or more"),
])
def test_policy_out_of_range_limits_faytd_exits(world_dir, config, message):
    """A limit faytd's C keeps in 32 or 64 bits is refused with a message, not a traceback."""
    _faytd_fails(world_dir, config, message)


def test_policy_bad_json_faytd_exits(world_dir):
    err = _faytd_fails(world_dir, '{"policy": {"categories": {"core": }}', "config: ")
    assert "faytd.json: Expecting value: line 1 column 36" in err
    _faytd_fails(world_dir, '{"polcy": {}}', "unknown keys ['polcy']")


@pytest.mark.parametrize("policy, what", [
    ({"categories": {"core": {"classes": ALL_CLASSES}},
      "rules": [{"uid": "0", "category": "core"}]}, "uid"),                 # a string
    ({"categories": {"core": {"classes": ALL_CLASSES}},
      "rules": [{"uid": 0, "gid": [0], "category": "core"}]}, "gid"),
    ({"categories": {"core": {"clases": ALL_CLASSES}},                        # typo
      "rules": [{"uid": 0, "category": "core"}]}, "clases"),
    ({"categories": {"core": {"classes": "ANON"}},                            # not a list
      "rules": [{"uid": 0, "category": "core"}]}, "category core"),
])
def test_policy_ill_typed_policy_file_faytd_exits(world_dir, policy, what):
    """Values of the wrong type or misspelt keys would silently grant nothing
    (a rule that never matches, a category with no class): refuse them at start."""
    _faytd_fails(world_dir, {"policy": policy}, what)


def test_policy_default_policy_owner_is_core(as_user, start):
    d = start()                      # embedded default policy, socket 0666
    c = libportal.Connection(d.socket)
    try:
        assert c.category == lib.FAYT_CATEGORY_CORE
        assert c.rights == ALL
    finally:
        c.close()
    rep = run_client(as_user, d, [["anon", PAGE], ["me"]])
    assert rep["hello"][1]["category"] == lib.FAYT_CATEGORY_SERVER
    assert rep["hello"][1]["rights"] == SHARE | ANON
    assert steps(rep) == [("anon", 0), ("me", 0)]


def test_policy_default_policy_owner_uid_is_core_when_faytd_runs_as_a_user(as_user, start):
    """"$owner" is the uid faytd runs as: run faytd as nobody, then nobody is
    core, root is core (uid 0), and any other uid gets the default, server."""
    start()     # a root faytd first: it sweeps stale objects nobody could not (see below)
    d = start(runner=as_user, uid=NOBODY)
    assert os.stat(d.socket).st_uid == NOBODY
    rep = run_client(as_user, d, [["me"]], uid=NOBODY)
    assert rep["hello"][1]["category"] == lib.FAYT_CATEGORY_CORE
    rep = run_client(as_user, d, [["anon", PAGE], ["me"]], uid=OTHER_UID)
    assert rep["hello"][1]["category"] == lib.FAYT_CATEGORY_SERVER
    assert steps(rep) == [("anon", 0), ("me", 0)]
    c = libportal.Connection(d.socket)
    assert c.category == lib.FAYT_CATEGORY_CORE
    c.close()


def test_policy_unprivileged_faytd_keeper_takes_its_whole_file_limit(as_user, start):
    """A faytd run by a user: its object keeper (one open file per live
    object) raises its RLIMIT_NOFILE to the hard limit, runs as that user,
    and its objects are that user's, mode 0600."""
    from faytd.launch import keepers
    d = start(runner=as_user, uid=NOBODY)
    rep = run_client(as_user, d, [["anon", PAGE]], uid=NOBODY)
    assert steps(rep) == [("anon", 0)]
    (kpid,) = keepers([os.path.dirname(d.socket)])
    assert os.stat("/proc/%d" % kpid).st_uid == NOBODY
    with open("/proc/%d/limits" % kpid) as f:
        soft, hard = next(ln for ln in f if ln.startswith("Max open files")).split()[3:5]
    assert soft == hard
    objs = [os.path.join("/proc/%d/fd" % kpid, n) for n in os.listdir("/proc/%d/fd" % kpid)
            if os.readlink("/proc/%d/fd/%s" % (kpid, n)).startswith("/memfd:fayt")]
    assert objs and all(os.stat(o).st_mode & 0o777 == 0o600 and os.stat(o).st_uid == NOBODY
                        for o in objs)


def test_policy_socket_mode_keeps_other_users_out(as_user, start):
    """The default socket mode (0600): another user cannot even connect."""
    d = start(socket_mode="0600")
    assert os.stat(d.socket).st_mode & 0o777 == 0o600
    rep = run_client(as_user, d, [])
    assert rep["hello"][0] == errno.EACCES, rep
    d2 = start()
    assert os.stat(d2.socket).st_mode & 0o777 == 0o666


@pytest.mark.parametrize("type_, kw", [
    (DIRECT, {"paddr": [0x100000]}),
    (SHARE | DIRECT, {"paddr": [0x100000], "identifier": "policy-direct", "create": True}),
    (COW, {"paddr": [0x100000]}),
    (SPECIAL, {"chain": "pager", "message": "page please"}),
    (SPECIAL | SHARE, {"chain": "pager", "identifier": "policy-special", "create": True}),
])
def test_policy_unbuilt_classes_core_enosys_server_eperm(as_user, start, type_, kw):
    """The policy is checked before the class is looked at: a core client is
    told the class is not built (ENOSYS), a server client that it may not use
    it (EPERM); neither creates anything."""
    d = start()
    before = d.state()
    c = libportal.Connection(d.socket)
    try:
        with pytest.raises(libportal.PortalError) as ei:
            libportal.portal(type_, libportal.PROT_RW, PAGE, connection=c, **kw)
        # SPECIAL is built: with no server on the chain, core is told ENOENT.
        want = ((errno.ENOENT, "no server serves chain 'pager'") if type_ & SPECIAL
                else (errno.ENOSYS, "portals are not built yet"))
        assert ei.value.errno == want[0] and want[1] in str(ei.value)
    finally:
        c.close()
    rep = run_client(as_user, d, [["portal", type_, 3, PAGE, kw]])
    assert rep["hello"][1]["category"] == lib.FAYT_CATEGORY_SERVER
    assert steps(rep) == [("portal", "EPERM")], rep
    assert "category server may not use" in rep["steps"][0][2]
    assert d.wait_state(before) == before


def test_policy_destroy_by_non_owner_non_core(as_user, start):
    shared = json.loads(json.dumps(DEFAULT["policy"]))     # root's name, shared (names.md)
    shared["categories"]["server"]["shared_names"] = {"attach": ["policy-victim-*"]}
    d = start(policy=shared)
    owner = libportal.Connection(d.socket)
    name = _name("victim")
    sp = libportal.share_create(name, 2 * PAGE, connection=owner)
    try:
        sp.write(0, b"survives")
        rep = run_client(as_user, d, [["attach", name, 8], ["destroy", name],
                                      ["share_destroy", name], ["unmap", name]])
        assert rep["hello"][1]["category"] == lib.FAYT_CATEGORY_SERVER
        assert steps(rep) == [("attach", 0), ("destroy", "EPERM"), ("share_destroy", "EPERM"),
                              ("unmap", 0)]
        assert rep["steps"][0][2] == "survives"
        assert "only its owner (pid %d) or a core server may destroy it" % os.getpid() \
            in rep["steps"][1][2]
        assert name in d.state()["shares"]
        assert sp.read(0, 8) == b"survives"
        again = libportal.share_attach(name, connection=owner)     # still attachable
        again.unmap()
    finally:
        sp.destroy()
    assert name not in d.state()["shares"]
    owner.close()


def test_policy_destroy_of_a_users_share_point(as_user, start):
    """A share-point that nobody's server owns: another server process (same
    uid, another pid) may not destroy it, a core process may, and the owner may."""
    d = start()
    before = d.state()
    name = _name("owned")
    owner = as_user.popen(CLIENT, [d.socket, json.dumps([["create", name, 2 * PAGE, "mine"],
                                                          ["pause"], ["destroy", name]])],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = json.loads(owner.stdout.readline())
        assert steps(first) == [("create", 0)], first
        rep = run_client(as_user, d, [["attach", name, 4], ["destroy", name], ["unmap", name]])
        assert steps(rep) == [("attach", 0), ("destroy", "EPERM"), ("unmap", 0)]
        assert rep["steps"][0][2] == "mine"
        assert name in d.state()["shares"]
        owner.stdin.write("go\n")
        owner.stdin.flush()
        last = json.loads(owner.stdout.readline())
        assert steps(last) == [("create", 0), ("pause", 0), ("destroy", 0)], last
        assert owner.wait(timeout=TIMEOUT) == 0
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    assert d.wait_state(before) == before
    # And a core process may destroy a server's share-point.
    owner = as_user.popen(CLIENT, [d.socket, json.dumps([["create", name, 2 * PAGE, "mine"],
                                                          ["pause"]])],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert steps(json.loads(owner.stdout.readline())) == [("create", 0)]
        core = libportal.Connection(d.socket)
        libportal.share_attach("uid:%d/%s" % (NOBODY, name), connection=core).destroy()
        assert name not in d.state()["shares"]
        core.close()
        owner.stdin.write("go\n")
        owner.stdin.flush()
        assert owner.wait(timeout=TIMEOUT) == 0
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    assert d.wait_state(before) == before


def test_policy_stats_count_only_the_callers_uid_share_points_unless_core(as_user, start):
    """FAYT_SYS_STATS is open to every context; its share-point count is
    the caller's uid's unless the caller is core (docs/cli.md, "fayt stats")."""
    d = start()
    owner = libportal.Connection(d.socket)
    mine = [libportal.share_create(_name("stats-root"), PAGE, connection=owner)
            for _ in range(2)]
    theirs = _name("stats-nobody")
    other = as_user.popen(CLIENT, [d.socket, json.dumps([["stats"], ["create", theirs, PAGE, "x"],
                                                         ["stats"], ["pause"]])],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        rep = json.loads(other.stdout.readline())
        assert rep["hello"][1]["category"] == lib.FAYT_CATEGORY_SERVER
        assert steps(rep) == [("stats", 0), ("create", 0), ("stats", 0)], rep
        assert rep["steps"][0][2] == {"scope": "uid", "count": 0}
        assert rep["steps"][2][2] == {"scope": "uid", "count": 1}
        assert owner.stats()["sharepoints"] == {"scope": "all", "count": 3}
        other.stdin.write("go\n")
        other.stdin.flush()
        assert other.wait(timeout=TIMEOUT) == 0
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
        for f in (other.stdin, other.stdout, other.stderr):
            f.close()
        for sp in mine:
            sp.destroy()
        owner.close()
