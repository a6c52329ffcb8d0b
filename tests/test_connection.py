"""The client's system call (libportal/syscall.py, _fastpath.Transport): signal
handlers that run while a call waits.  faytd is stopped (SIGSTOP) so that
the call is still waiting when the signal comes; nothing here depends on
how long anything takes, only on what happens before faytd runs again."""
import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import libportal


class Stop(Exception):
    pass


@pytest.fixture
def stopped_faytd(fresh_faytd):
    """(faytd, stop(), resume()): faytd stopped and resumed on demand,
    resumed in any case at the end."""
    d = fresh_faytd()
    state = {"stopped": False}

    def stop():
        os.kill(d.proc.pid, signal.SIGSTOP)
        state["stopped"] = True

    def resume():
        if state["stopped"]:
            os.kill(d.proc.pid, signal.SIGCONT)
            state["stopped"] = False

    old = signal.getsignal(signal.SIGALRM)
    yield d, stop, resume
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)
    resume()


def _alarm(seconds, handler):
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def _my_mappings(conn):
    me = os.getpid()
    return sum(c["mappings"] for c in conn.list_contexts()["contexts"]
               if c["pid"] == me and c["connected"])


def test_connection_a_handler_that_raises_leaves_the_connection_in_step(stopped_faytd,
                                                                          conn_to):
    d, stop, resume = stopped_faytd
    c = conn_to(d)
    libportal.portal(libportal.ANON, libportal.PROT_RW, 4096, connection=c).unmap()

    def raise_stop(*a):
        raise Stop()

    stop()
    _alarm(0.2, raise_stop)
    with pytest.raises(Stop):
        libportal.portal(libportal.ANON, libportal.PROT_RW, 8192, connection=c)
    resume()
    # The next calls skip the abandoned reply; the portal it granted is given back.
    got = [libportal.portal(libportal.ANON, libportal.PROT_RW, 4096, connection=c)
           for _ in range(3)]
    assert all(p.mapped for p in got)
    assert _my_mappings(c) == 3
    for p in got:
        p.unmap()
    assert _my_mappings(c) == 0           # its own next call comes after its unmaps


def test_connection_close_from_a_handler_ends_the_call_it_interrupted(stopped_faytd, conn_to):
    d, stop, resume = stopped_faytd
    c = conn_to(d)
    c.list_contexts()
    closed = []

    def close(*a):
        c.close()
        closed.append(True)

    stop()
    _alarm(0.2, close)
    with pytest.raises(libportal.DaemonUnavailable) as e:
        c.list_contexts()              # faytd is stopped: only the close can end this
    resume()
    assert closed and c.closed
    assert "close() while this call waited" in str(e.value)
    with pytest.raises(libportal.DaemonUnavailable):
        c.list_contexts()


def test_connection_a_signal_during_the_spin_runs_its_handler_then(stopped_faytd, conn_to,
                                                                     monkeypatch):
    d, stop, resume = stopped_faytd
    monkeypatch.setenv("FAYT_CALL_SPIN_NS", str(30 * 10**9))   # a call spins for 30 s
    c = conn_to(d)
    c.list_contexts()

    def raise_stop(*a):
        raise Stop()

    stop()
    _alarm(0.2, raise_stop)
    with pytest.raises(Stop):
        c.list_contexts()              # still spinning when the alarm comes
    resume()
    assert c.list_contexts()["contexts"]     # and the connection goes on


def test_connection_a_refused_unanswered_call_warns_at_the_next_call(fresh_faytd, conn_to):
    """A FAYT_REQ_NOREPLY request faytd refuses is answered after all: the
    next call skips that reply, warns, and returns its own."""
    from libportal._abi import lib, HANDLE_REQ
    c = conn_to(fresh_faytd())
    body, fds = c.call(lib.FAYT_SYS_UNMAP, HANDLE_REQ.pack(0x7fff0001), lib.FAYT_REQ_NOREPLY)
    assert (body, fds) == (b"", ())
    assert c._transport.unanswered
    with pytest.warns(RuntimeWarning, match=r"unanswered call \d+\) failed in faytd"):
        listed = c.list_contexts()
    assert any(x["pid"] == os.getpid() for x in listed["contexts"])
    assert not c._transport.unanswered      # faytd answers in order: nothing left to skip


def test_connection_threads_share_one_connection(fresh_faytd, conn_to):
    """One call in flight per connection: eight threads calling at once all
    get their own replies, and the connection stays in step."""
    import threading
    c = conn_to(fresh_faytd())
    errors, done = [], []

    def work():
        try:
            for _ in range(50):
                p = libportal.portal(libportal.ANON, libportal.PROT_RW, 4096, connection=c)
                p.buf[0] = 7
                p.unmap()
                c.list_contexts()
            done.append(1)
        except BaseException as e:         # reported below
            errors.append(e)

    ts = [threading.Thread(target=work) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors and len(done) == 8
    assert _my_mappings(c) == 0
    assert c._transport.caller == 0 and c._main_calls == 0


def test_connection_lost_when_faytd_dies(fresh_faytd, conn_to):
    """faytd killed: the next call raises DaemonUnavailable (ECONNRESET), the
    socket is closed here, and every later call says the connection is lost."""
    d = fresh_faytd()
    c = conn_to(d)
    c.list_contexts()
    d.proc.kill()
    d.proc.wait()
    with pytest.raises(libportal.DaemonUnavailable) as e:
        c.list_contexts()
    assert e.value.errno == errno.ECONNRESET
    assert c.closed and c.sock.fileno() < 0
    with pytest.raises(libportal.DaemonUnavailable, match="lost"):
        c.list_contexts()


def _run(d, code):
    """Run code in a new python (FAYT_SOCKET: d's); its stdout, lines.  A
    child that hangs is killed by its own alarm (the bound, not a measure)."""
    p = subprocess.run([sys.executable, "-c", "import signal; signal.alarm(30)\n"
                        + textwrap.dedent(code)], env=d.env(), capture_output=True,
                       text=True, timeout=90)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    return p.stdout.split()


_FORK_CLOSE = """
    import os, signal, threading
    import libportal
    c = libportal.Connection()
    held, go = threading.Event(), threading.Event()
    def inside_a_call():            # holds the call lock as a call does
        with c._lock:
            held.set()
            go.wait()
    t = threading.Thread(target=inside_a_call)
    if HOLD:
        t.start()
        held.wait()
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)            # ends a child that hangs here (-14)
        c.close()
        os._exit(0 if c.closed else 3)
    _, status = os.waitpid(pid, 0)
    go.set()
    if HOLD:
        t.join()
    print(os.waitstatus_to_exitcode(status))
    print(len(c.list_contexts()["contexts"]) > 0)
"""


@pytest.mark.parametrize("hold", [False, True], ids=["idle", "a-thread-inside-a-call"])
def test_connection_close_in_a_fork_child_leaves_the_parents_connection(fresh_faytd, hold):
    """A fork() child that closes a connection it inherited closes its own
    descriptor only: the parent's connection still works (shutdown() would
    end it for both), and a parent thread inside a call at the fork (its
    lock held for ever in the child) does not hang the child's close()."""
    d = fresh_faytd()
    out = _run(d, _FORK_CLOSE.replace("HOLD", str(hold)))
    assert out == ["0", "True"]


_HANDLER_CALLS = """
    import errno, os, signal, sys, threading
    import libportal
    faytd = int(sys.argv[1])
    c = libportal.Connection()
    got = []
    def bound():                    # a hang: faytd resumed, and this child ends
        os.kill(faytd, signal.SIGCONT)
        os._exit(9)
    threading.Timer(20, bound).start()
    def handler(*a):
        try:
            c.list_contexts()
            got.append(0)
        except OSError as e:
            got.append(e.errno)
        os.kill(faytd, signal.SIGCONT)
    signal.signal(signal.SIGALRM, handler)
    os.kill(faytd, signal.SIGSTOP)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    c.list_contexts()               # waits for faytd: the handler runs inside
    print(got[0] == errno.EDEADLK, len(c.list_contexts()["contexts"]) > 0)
    os._exit(0)
"""


def test_connection_a_handler_calling_inside_its_threads_call_is_edeadlk(fresh_faytd):
    """A signal handler that calls the connection while its own thread is
    inside a call of it gets Deadlock (EDEADLK) at once instead of waiting
    for ever for the lock that thread holds; the interrupted call then ends
    normally and the connection stays in step."""
    d = fresh_faytd()
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(_HANDLER_CALLS),
                        str(d.proc.pid)], env=d.env(), capture_output=True, text=True,
                       timeout=90)
    os.kill(d.proc.pid, signal.SIGCONT)
    assert (p.returncode, p.stdout.split()) == (0, ["True", "True"]), p.stderr
