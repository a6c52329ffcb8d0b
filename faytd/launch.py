"""Start and stop a real faytd process and wait until it serves (tests, bench)."""
import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence


def wait_for_socket(path, proc, timeout=15.0, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("faytd exited with %s:\n%s" % (proc.returncode, _read(log)))
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    raise RuntimeError("faytd did not listen on %s within %.0fs" % (path, timeout))


def _read(path):
    if not path:
        return ""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


STARTED = []        # pids of every faytd this process started
RUNS = {}           # faytd pid -> its state directory (where its keeper listens)
LAST = {}           # state directory -> the Popen of the last faytd started there
_running = []


@atexit.register
def _stop_leftovers():
    """A test run that dies leaves no faytd behind (SIGTERM: it cleans up)."""
    for d in list(_running):
        try:
            d.stop()
        except Exception:
            pass


class Faytd:
    """A faytd process: .socket, .proc, .log (its log file), .stop() -> the log.

    The log goes to a file, not a pipe: a pipe nobody reads fills up and
    would block faytd in write(2)."""

    def __init__(self, directory: str, config: "dict | None" = None,
                 ram: "str | int | None" = None, extra: "Sequence[str]" = ()) -> None:
        os.makedirs(directory, exist_ok=True)
        self.socket = os.path.join(directory, "faytd.sock")
        args = [sys.executable, "-m", "faytd", "--socket", self.socket, "-v"]
        if config is not None:
            cfg = os.path.join(directory, "faytd.json")
            with open(cfg, "w") as f:
                json.dump(config, f)
            args += ["--config", cfg]
        if ram:
            args += ["--ram", str(ram)]
        args += list(extra)
        self.log = os.path.join(directory, "faytd.log")
        with open(self.log, "w") as logf:
            self.proc = subprocess.Popen(args, stderr=logf, stdin=subprocess.DEVNULL)
        STARTED.append(self.proc.pid)
        RUNS[self.proc.pid] = self.dir = os.path.realpath(directory)
        LAST[self.dir] = self.proc
        _running.append(self)
        try:
            wait_for_socket(self.socket, self.proc, log=self.log)
        except BaseException:
            self.stop(check=False)
            raise

    def env(self) -> "dict[str, str]":
        """This process's environment with FAYT_SOCKET naming this faytd."""
        e = dict(os.environ)
        e["FAYT_SOCKET"] = self.socket
        return e

    def stop(self, check: bool = True) -> str:
        """SIGTERM, wait, return what faytd logged."""
        if self in _running:
            _running.remove(self)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            if check:
                raise RuntimeError("faytd did not stop on SIGTERM:\n" + _read(self.log))
        return _read(self.log)


@contextlib.contextmanager
def running_faytd(directory, **kw):
    d = Faytd(directory, **kw)
    try:
        yield d
    finally:
        d.stop()


def keepers(dirs=None):
    """{pid: socket path} of the live object keepers (frames.py), those of
    the state directories `dirs` only if given."""
    want = None if dirs is None else {os.path.join(os.path.realpath(d), "faytd.keeper")
                                      for d in dirs}
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % p, "rb") as f:
                stat = f.read()
            if b"(fayt-keeper)" not in stat or stat[stat.rindex(b")") + 2:][:1] == b"Z":
                continue
            with open("/proc/%s/cmdline" % p, "rb") as f:
                cmd = f.read().split(b"\0")[0].decode(errors="replace")
        except (OSError, ValueError):
            continue
        path = cmd[len("fayt-keeper "):] if cmd.startswith("fayt-keeper ") else ""
        if want is None or path in want:
            out[int(p)] = path
    return out


def leftover_keepers():
    """After a run of faytds (tests, bench): the keepers left by those
    started here.  A killed faytd's keeper waits for a restart that will not
    come now: it is ended.  Returns the others {pid: path}, left by a faytd
    that stopped cleanly or still runs: a leak."""
    left = keepers(set(LAST))
    killed = [d for d, proc in LAST.items() if proc.poll() not in (None, 0)]
    end_keepers(killed)
    return {pid: path for pid, path in left.items()
            if os.path.dirname(path) not in killed}


def end_keepers(dirs):
    """SIGKILL the keepers of these state directories and wait for them."""
    for pid in keepers(dirs):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while keepers(dirs) and time.monotonic() < deadline:
        time.sleep(0.01)


def sealed(path):
    """Whether the object at path (a /proc/<pid>/fd/<n>) carries F_SEAL_SEAL:
    faytd seals an object before its first descriptor leaves it, so an
    unsealed fayt memfd is one the pool made ahead of need.  None if it
    cannot be opened (gone meanwhile)."""
    import fcntl
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SEAL)
    finally:
        os.close(fd)


def lasting_fds(pid, kinds=None):
    """How many descriptors process `pid` (a faytd) holds that last: less
    the object pool's fresh objects (fayt memfds not sealed yet, a bounded
    number made ahead of need) and timerfds (made once, on first need, then
    kept).  kinds: a Counter that gets what each counted one is.  None if
    /proc/<pid>/fd cannot be read."""
    base = "/proc/%d/fd/" % pid
    try:
        names = os.listdir(base)
    except OSError:
        return None
    n = 0
    for name in names:
        try:
            link = os.readlink(base + name)
        except OSError:
            continue
        if link == "anon_inode:[timerfd]":
            continue
        if link.startswith("/memfd:fayt") and not sealed(base + name):
            continue
        n += 1
        if kinds is not None:
            kinds[link.split("[")[0].split(" (")[0]] += 1
    return n


def fayt_objects(pids=None, dirs=None, pooled=False):
    """The objects the keepers hold (those of faytd `pids`, or of the state
    directories `dirs`, if given), as <memfd name>.<fd number in the
    keeper>: fayt.37, fayt.ring.41.  Those the pool made ahead of need and
    has not handed out yet (not sealed yet) only if `pooled`."""
    if pids is not None:
        dirs = set(dirs or ()) | {RUNS[p] for p in pids if p in RUNS}
    names = []
    for kpid in keepers(dirs):
        base = "/proc/%d/fd/" % kpid
        try:
            fds = os.listdir(base)
        except OSError:
            continue
        for n in fds:
            try:
                link = os.readlink(base + n)
            except OSError:
                continue
            if not link.startswith("/memfd:fayt"):
                continue
            if not pooled and not sealed(base + n):
                continue
            names.append("%s.%s" % (link[len("/memfd:"):].split(" ")[0], n))
    return sorted(names)
