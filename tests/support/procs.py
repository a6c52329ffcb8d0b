"""Python functions run in child processes, started the way a libportal
user should start them once threads may exist: multiprocessing's
forkserver (docs/forking.md).

The test process may have threads that libportal started (the SPECIAL
portals' guard thread lives as long as the faytd it watches) or that a test
made, so it never fork()s: a child comes from the fork server, a process
with one thread that imported libportal and pytest once and forks a fresh
child for each Process.  Targets and their arguments are pickled: they are
functions at module level (functools.partial of them for bound arguments).

CTX is the context: CTX.Process, CTX.Queue, CTX.Event...  Its Process
carries the test process's FAYT_SOCKET at start() to the child (the fork
server's own environment is the one it started with).  call_in_child(fn,
*args) runs fn in such a child and returns what it returned, or fails with
the child's traceback.
"""
import multiprocessing
import multiprocessing.context
import os
import traceback

WAIT = 30.0

PRELOAD = ["libportal", "pytest", "support.procs"]


class Process(multiprocessing.context.ForkServerProcess):
    """A forkserver Process that sees the FAYT_SOCKET of the test process
    as it was at start()."""

    _fayt_socket = None

    def start(self):
        self._fayt_socket = os.environ.get("FAYT_SOCKET")
        super().start()

    def run(self):
        if self._fayt_socket is None:
            os.environ.pop("FAYT_SOCKET", None)
        else:
            os.environ["FAYT_SOCKET"] = self._fayt_socket
        super().run()


class _Context(multiprocessing.context.ForkServerContext):
    Process = Process


CTX = _Context()
CTX.set_forkserver_preload(PRELOAD)


def _call(w, fn, args):
    try:
        out = (True, fn(*args))
    except BaseException:       # noqa: BLE001 - reported to the test
        out = (False, traceback.format_exc())
    w.send(out)
    w.close()


def call_in_child(fn, *args, timeout=WAIT):
    """fn(*args) in a new single-threaded child; what it returned (pickled
    back).  What it raised fails the test with its traceback; a child that
    hangs is killed after `timeout` seconds."""
    r, w = CTX.Pipe(duplex=False)
    p = CTX.Process(target=_call, args=(w, fn, args))
    p.start()
    w.close()
    try:
        if not r.poll(timeout):
            raise AssertionError("%s did not return within %.0fs in child %d"
                                 % (getattr(fn, "__name__", fn), timeout, p.pid))
        ok, value = r.recv()
    except EOFError:
        p.join(timeout)
        raise AssertionError("child %d running %s died (exit code %s)"
                             % (p.pid, getattr(fn, "__name__", fn), p.exitcode)) from None
    finally:
        r.close()
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join(timeout)
    if not ok:
        raise AssertionError("in child %d:\n%s" % (p.pid, value))
    assert p.exitcode == 0, "child %d exited %s" % (p.pid, p.exitcode)
    return value


def exit_code_of(target, *args, timeout=WAIT):
    """Run target(*args) in a child from the fork server; its exit code (a
    negative signal number if a signal ended it).  A child still running
    after `timeout` seconds is killed, and that fails the test."""
    p = CTX.Process(target=target, args=args)
    p.start()
    p.join(timeout)
    alive = p.is_alive()
    if alive:
        p.kill()
        p.join(WAIT)
    assert not alive, "%s hung" % target.__name__
    return p.exitcode


def stop_child(stop, proc, timeout=WAIT):
    """Tell a child to stop (stop: a CTX.Event it watches); kill it if it
    has not ended within `timeout` seconds."""
    stop.set()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout)


def threads():
    """How many threads this process has (the kernel's count: C threads too)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise RuntimeError("no Threads: line in /proc/self/status")


def fork():
    """os.fork() for a test about fork() itself, in a process that has one
    thread (a child of CTX: call_in_child).  Anywhere else, fail: a thread
    may hold a lock the child then waits for for ever (docs/forking.md)."""
    n = threads()
    assert n == 1, ("fork() in a process with %d threads: run the test's body in "
                    "support.procs.call_in_child" % n)
    return os.fork()


def in_fork_child(check, timeout=WAIT):
    """Run check() in a fork() child (support.procs.fork); its result,
    JSON-able, or the error it raised, as an AssertionError."""
    import json
    import select
    import time
    from .children import wait_child_exit
    r, w = os.pipe()
    pid = fork()
    if pid == 0:
        try:
            os.close(r)
            try:
                out = {"ok": check()}
            except BaseException as e:     # noqa: BLE001 - reported to the parent
                out = {"error": repr(e)}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], 0.1)
            if ready:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(r)
    assert wait_child_exit(pid) == 0
    out = json.loads(data)
    assert "error" not in out, out["error"]
    return out["ok"]
