"""Test helpers for programs built on libportal: a private faytd, and server
processes started against it, every wait bounded.

The pytest plugin (faytd/pytest_plugin.py, docs/testing.md) is built on
these; they work without pytest too:

    d = faytd.testing.Faytd(directory)           # faytd.launch.Faytd
    srv = faytd.testing.start_server(d, module="myserver", args=["--name", "jobs"])
    ...                                          # talk to it through libportal
    srv.stop()                                   # SIGTERM, then SIGKILL
    d.stop()

Fault injection (docs/testing.md, "Breaking things on purpose"): inject()
and its named forms (fail_call, kill_at_lock, drop_doorbells, ...) add a
rule to faytd and return a Fault; injected() lists the rules and what they
injected.  They live here, not in libportal, so that what a server imports
to run has no way to break itself: a test, or `fayt inject`, adds rules.

A Process talks to the test one line at a time over its stdin and stdout
(send(), expect()); its stderr goes to an unnamed file, read when a failure
is reported.  No thread is started: stdout is read when the test waits.
"""
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence, Union

from .launch import Faytd  # noqa: F401  (the daemon the helpers start)

__all__ = ["Faytd", "Fault", "Process", "Server", "SessionDaemon", "daemon_env", "delay_call",
           "delay_doorbells", "drop_doorbells", "fail_call", "fail_pages", "inject",
           "injected", "kill_after", "kill_at_lock", "kill_in_handler", "remove_faults",
           "slow_chain", "start_server"]

WAIT = 30.0          # seconds any single wait may take before it fails


class Process:
    """A process started with argv and env (its whole environment): send(line),
    expect() -> its next stdout line, finish() -> the rest once it exited
    cleanly, stop() (SIGTERM, then SIGKILL), kill(); .pid, .proc.
    popen: a callable like subprocess.Popen (to run it as another user)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str],
                 popen: Callable[..., subprocess.Popen] = subprocess.Popen,
                 **popen_kw: Any) -> None:
        self._err = tempfile.TemporaryFile()
        self.proc = popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=self._err, **popen_kw)
        self.pid = self.proc.pid
        self._out = self.proc.stdout.fileno()
        os.set_blocking(self._out, False)
        self._buf = b""
        self._eof = False

    def stderr(self) -> str:
        """What it wrote to stderr so far."""
        try:
            self._err.seek(0)
            return self._err.read().decode(errors="replace")
        except ValueError:          # closed: killed
            return ""

    def _line(self, deadline):
        """Its next line, b"" at the end of its stdout, None at the deadline."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = self._buf[:nl], self._buf[nl + 1:]
                return line + b"\n"
            if self._eof:
                line, self._buf = self._buf, b""
                return line
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out], [], [], left)[0]:
                return None
            try:
                chunk = os.read(self._out, 65536)
            except BlockingIOError:
                continue
            if chunk:
                self._buf += chunk
            else:
                self._eof = True

    def expect(self, timeout: float = WAIT) -> str:
        """Its next stdout line (without the newline); AssertionError, with
        its stderr, if none comes within timeout or it exits first."""
        line = self._line(time.monotonic() + timeout)
        if line is None:
            raise AssertionError("process %d said nothing within %.0fs; stderr:\n%s"
                                 % (self.pid, timeout, self.stderr()))
        if not line:
            self.proc.wait(timeout=WAIT)
            raise AssertionError("process %d exited (%s) early; stderr:\n%s"
                                 % (self.pid, self.proc.returncode, self.stderr()))
        return line.decode().rstrip("\n")

    def expect_prefix(self, prefix: str, timeout: float = WAIT) -> str:
        """Skip stdout lines until one starts with prefix; that line."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.expect(max(0.0, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line

    def send(self, line: str = "") -> None:
        """Write line and a newline to its stdin."""
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def finish(self, timeout: float = WAIT) -> "list[str]":
        """Close its stdin and wait for a clean exit (status 0); the rest of
        its stdout, as lines."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("process %d did not exit within %.0fs" % (self.pid, timeout))
        rest, deadline = [], time.monotonic() + WAIT
        while True:
            line = self._line(deadline)
            if line is None:
                raise AssertionError("process %d exited but its stdout stayed open %.0fs"
                                     % (self.pid, WAIT))
            if not line:
                break
            rest.append(line.decode().rstrip("\n"))
        assert self.proc.returncode == 0, "process %d exited %s; stderr:\n%s" % (
            self.pid, self.proc.returncode, self.stderr())
        return rest

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM; SIGKILL if it has not exited within timeout.  Its exit
        status (negative: the signal that ended it)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.kill()

    def kill(self) -> int:
        """SIGKILL it (if it still runs) and reap it; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=WAIT)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        return self.proc.returncode


class Server(Process):
    """A server process of a test: .daemon, .context (its context id in
    faytd: the target of notify(); asked of faytd when first read, waiting
    until it registered), wait_registered()."""

    def __init__(self, daemon: Faytd, argv: Sequence[str], env: Mapping[str, str]) -> None:
        super().__init__(argv, env)
        self.daemon = daemon
        self._context = None

    @property
    def context(self) -> int:
        """Its context id in faytd (waits until it registered: wait_registered)."""
        if self._context is None:
            self.wait_registered()
        return self._context

    def wait_registered(self, timeout: float = WAIT) -> int:
        """Wait until the process has a context in faytd (it connected and
        said HELLO); its context id.  AssertionError, with its stderr, if it
        exits first or the timeout passes."""
        import libportal
        conn = libportal.Connection(self.daemon.socket)

        def registered():
            for c in conn.list_contexts()["contexts"]:
                if c["pid"] == self.pid and c["connected"]:
                    self._context = c["id"]
                    return True
            return False
        try:
            self.wait_until(registered, "register with faytd", timeout)
        finally:
            conn.close()
        return self._context

    def wait_until(self, ready: Callable[[], object], what: str,
                   timeout: float = WAIT) -> None:
        """Poll ready() until it is true; AssertionError, with its stderr, if
        the process exits first or the timeout passes (what: what it had to do)."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError("server %d exited (%s) before it would %s; stderr:\n%s"
                                     % (self.pid, self.proc.returncode, what, self.stderr()))
            if time.monotonic() > deadline:
                raise AssertionError("server %d did not %s within %.0fs; stderr:\n%s"
                                     % (self.pid, what, timeout, self.stderr()))
            time.sleep(0.01)


def daemon_env(daemon: Faytd, env: "Mapping[str, str] | None" = None) -> "dict[str, str]":
    """env (default: this process's environment) with FAYT_SOCKET naming daemon."""
    e = dict(os.environ if env is None else env)
    e["FAYT_SOCKET"] = daemon.socket
    return e


def start_server(daemon: Faytd, module: "str | None" = None, *,
                 argv: "Sequence[str] | None" = None, code: "str | None" = None,
                 args: Sequence[object] = (), env: "Mapping[str, str] | None" = None,
                 ready: Union[str, Callable[[], object], None] = "registered",
                 timeout: float = WAIT) -> Server:
    """Start a server against daemon (a Faytd) and wait until it is ready.

    What runs: module (`python -m module args...`), code (`python -c code
    args...`) or argv (any command), exactly one of them; with the daemon's
    FAYT_SOCKET in env (default: this process's environment).
    ready: "registered" (it has a context in faytd), a string (it printed a
    line starting with it), None (do not wait), or a callable polled until it
    returns true.  Returns a Server."""
    if sum(x is not None for x in (module, argv, code)) != 1:
        raise TypeError("start_server: give exactly one of module, argv and code")
    if module is not None:
        argv = [sys.executable, "-u", "-m", module]
    elif code is not None:
        argv = [sys.executable, "-u", "-c", code]
    srv = Server(daemon, list(argv) + [str(a) for a in args], daemon_env(daemon, env))
    try:
        if ready == "registered":
            srv.wait_registered(timeout)
        elif isinstance(ready, str):
            srv.expect_prefix(ready, timeout)
        elif callable(ready):
            srv.wait_until(ready, "be ready", timeout)
        elif ready is not None:
            raise TypeError("start_server: ready is %r: \"registered\", a string, a callable "
                            "or None" % (ready,))
    except BaseException:
        srv.kill()
        raise
    return srv


class SessionDaemon:
    """A faytd that this process's libportal and the processes it starts use:
    start() sets FAYT_SOCKET and drops libportal's default connection;
    stop() puts both back and stops faytd."""

    def __init__(self, directory: str, **kw: Any) -> None:
        self.daemon = Faytd(directory, **kw)
        self._old = os.environ.get("FAYT_SOCKET")
        os.environ["FAYT_SOCKET"] = self.daemon.socket
        import libportal
        libportal.set_default(None)

    def stop(self) -> str:
        """FAYT_SOCKET as it was, libportal's default connection dropped, faytd
        stopped; what faytd logged."""
        import libportal
        libportal.set_default(None)
        if self._old is None:
            os.environ.pop("FAYT_SOCKET", None)
        else:
            os.environ["FAYT_SOCKET"] = self._old
        return self.daemon.stop()


# -- fault injection (faytd/injection.py, docs/testing.md) --------------------------
Target = Union[int, str, "Server", None]


class Fault:
    """A rule faytd holds (INJECT_ADD): .id, .spec (what was asked);
    info() -> its record now (events seen, faults injected: "events",
    "fired", "active"); remove().  As a context manager it is removed at
    the end of the block."""

    def __init__(self, rule_id: int, spec: Mapping[str, Any], connection: Any) -> None:
        self.id = rule_id
        self.spec = dict(spec)
        self._conn = connection

    def info(self) -> "dict[str, Any]":
        """Its record in faytd (INJECT_LIST): the spec as faytd took it, and
        "events", "fired", "active" (and "ended": why, once it ended)."""
        for r in injected(connection=self._conn)["rules"]:
            if r["id"] == self.id:
                return r
        raise LookupError("rule %d: faytd has no such rule (removed)" % self.id)

    @property
    def fired(self) -> int:
        """Faults it injected so far."""
        return self.info()["fired"]

    def remove(self) -> None:
        """Remove it (INJECT_REMOVE); ENOENT if it is gone already."""
        from libportal._abi import HANDLE_REQ, lib
        self._conn.call(lib.FAYT_SYS_INJECT_REMOVE, HANDLE_REQ.pack(self.id))

    def __enter__(self) -> "Fault":
        return self

    def __exit__(self, *exc: object) -> None:
        import libportal
        try:
            self.remove()
        except libportal.NotFound:
            pass

    def __repr__(self) -> str:
        return "<Fault %d %s>" % (self.id, self.spec)


def _connection(connection: Any, daemon: "Faytd | None") -> Any:
    import libportal
    if connection is not None:
        return connection
    if daemon is not None:
        return libportal.Connection(daemon.socket)
    return libportal.connection()


def _target(target: Target, pid: "int | None") -> "dict[str, Any]":
    if pid is not None:
        if target is not None:
            raise TypeError("inject: give a target or pid=, not both")
        return {"pid": pid}
    if isinstance(target, Server):
        return {"context": target.context}
    if isinstance(target, bool) or target is None:
        raise TypeError("inject: the target: a context id, a published name, a Server or "
                        "pid=, not %r" % (target,))
    if isinstance(target, int):
        return {"context": target}
    if isinstance(target, str):
        return {"name": target}
    raise TypeError("inject: the target: a context id, a published name, a Server or pid=, "
                    "not %r" % (target,))


def inject(kind: str, target: Target = None, *, pid: "int | None" = None,
           connection: Any = None, daemon: "Faytd | None" = None, after: int = 0,
           count: "int | None" = None, probability: float = 1.0, seed: int = 0,
           **params: Any) -> Fault:
    """Add a fault-injection rule to faytd; its Fault.

    kind: "fail", "delay" (a system call: params op=, errno= / delay_ms=),
    "kill-lock" (share=), "kill-handler" (slot=), "kill-after"
    (notifications=), "drop-doorbell", "delay-doorbell" (delay_ms=) of the
    target context; "fail-page" (errno=), "slow-chain" (delay_ms=) of a
    chain (chain=, no target).  target: a context id, a published name or
    a Server; or pid=.  When: the rule counts its events from 0 and fires
    at event n if n >= after, fewer than count fired (None: kills 1, the
    rest no bound) and splitmix64(seed + n) % 10**6 < probability * 10**6.
    Through connection (default: libportal's own), or a new one to daemon.
    Errors are faytd's: EPERM (another uid's context, not core), ESRCH (no
    such context), ENOENT, EINVAL (naming the field), EBUSY."""
    import json
    from libportal._abi import lib
    spec: "dict[str, Any]" = {"kind": kind, "after": after, "probability": probability,
                              "seed": seed}
    if count is not None:
        spec["count"] = count
    if kind not in ("fail-page", "slow-chain"):
        spec.update(_target(target, pid))
    elif target is not None or pid is not None:
        raise TypeError("inject: %s names a chain (chain=), not a context" % kind)
    spec.update(params)
    conn = _connection(connection, daemon)
    body = conn.call(lib.FAYT_SYS_INJECT_ADD, json.dumps(spec).encode())[0]
    return Fault(json.loads(body)["rule"], spec, conn)


def fail_call(target: Target, op: "str | int", errno: "str | int" = "EIO",
              **when: Any) -> Fault:
    """The target's calls of op (a name as `fayt stats` shows it, or a
    number) fail with errno, without being performed."""
    return inject("fail", target, op=op, errno=errno, **when)


def delay_call(target: Target, op: "str | int", delay_ms: int, **when: Any) -> Fault:
    """The target's calls of op are performed delay_ms late (its caller waits)."""
    return inject("delay", target, op=op, delay_ms=delay_ms, **when)


def kill_at_lock(target: Target, share: str, **when: Any) -> Fault:
    """The target dies (SIGKILL) holding share's lock, once it took it."""
    return inject("kill-lock", target, share=share, **when)


def kill_in_handler(target: Target, slot: int, **when: Any) -> Fault:
    """The target dies (SIGKILL) at the entry of its handler of slot."""
    return inject("kill-handler", target, slot=slot, **when)


def kill_after(target: Target, notifications: int, **when: Any) -> Fault:
    """The target dies (SIGKILL) once it handled `notifications` more
    notifications, as it starts the next one."""
    return inject("kill-after", target, notifications=notifications, **when)


def drop_doorbells(target: Target, **when: Any) -> Fault:
    """The target's posts ring no doorbell (neither signal nor wake)."""
    return inject("drop-doorbell", target, **when)


def delay_doorbells(target: Target, delay_ms: int, **when: Any) -> Fault:
    """The target's posts ring their doorbell delay_ms late."""
    return inject("delay-doorbell", target, delay_ms=delay_ms, **when)


def fail_pages(chain: str, errno: "str | int" = "EIO", **when: Any) -> Fault:
    """The chain's page requests fail with errno (the client gets SIGBUS)."""
    return inject("fail-page", chain=chain, errno=errno, **when)


def slow_chain(chain: str, delay_ms: int, **when: Any) -> Fault:
    """The chain's page requests reach its server delay_ms late."""
    return inject("slow-chain", chain=chain, delay_ms=delay_ms, **when)


def injected(connection: Any = None, daemon: "Faytd | None" = None) -> "dict[str, Any]":
    """faytd's rules the caller may see and what they injected:
    {"rules": [...], "log": [the last faults], "counts": {...}}."""
    import json
    from libportal._abi import lib
    return json.loads(_connection(connection, daemon).call(lib.FAYT_SYS_INJECT_LIST)[0])


def remove_faults(connection: Any = None, daemon: "Faytd | None" = None) -> int:
    """Remove every rule the caller may remove; how many."""
    import json
    from libportal._abi import HANDLE_REQ, lib
    body = _connection(connection, daemon).call(lib.FAYT_SYS_INJECT_REMOVE,
                                                HANDLE_REQ.pack(0))[0]
    return json.loads(body)["removed"]
