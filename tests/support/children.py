"""Child processes that run libportal code, and bounded waits.

A Child is `python -u -c PRELUDE+CODE`: it talks to the test one line at a
time over its stdin and stdout, and every wait for a line, a state or an
exit is bounded, so that a broken lock fails a test instead of hanging the
suite.  A Child is a new interpreter (subprocess: fork and exec in C), so it
inherits no thread, connection or portal of the test process.

The harness starts no thread of its own: a Child's stdout is read when the
test waits for a line (select), its stderr goes to an unnamed file read
when a failure is reported.  So the test process has a thread only when a
test makes one, or libportal does (docs/forking.md).
"""
import os
import signal
import sys
import textwrap
import time

from faytd.testing import WAIT, Process  # noqa: F401  (WAIT: the bound of every wait)

PRELUDE = ("import errno, json, os, select, struct, sys, threading, time\n"
           "import libportal as lp\n")


class Child(Process):
    """A helper process (faytd.testing.Process, the user plugin's): send(line),
    expect() -> its next stdout line, finish() -> the rest once it exited
    cleanly, kill(); .pid, .proc.

    code runs after PRELUDE (dedented); env is its whole environment.  With
    as_user (support.daemon.AsUser) it runs as uid/gid, argv[1:] = args."""

    def __init__(self, code, env, as_user=None, uid=None, gid=None, args=(),
                 prelude=PRELUDE):
        code = prelude + textwrap.dedent(code)
        if as_user is None:
            super().__init__([sys.executable, "-u", "-c", code] + [str(a) for a in args], env)
            return
        ids = {} if uid is None else {"uid": uid, "gid": uid if gid is None else gid}

        def popen(argv, **kw):
            return as_user.popen(code, args, text=False, **ids, **kw)
        super().__init__(None, dict(env, PYTHONUNBUFFERED="1"), popen=popen)


def share_owner(spawn, d, name, data):
    """A child of faytd `d` that creates the share-point `name`, writes
    data there, and stays until it is killed."""
    owner = spawn("""
        sp = lp.share_create(%r, 4096)
        sp.write(0, %r)
        print("made")
        time.sleep(120)
        """ % (name, data), d.env())
    assert owner.expect() == "made"
    return owner


def wait_until(pred, what, timeout=WAIT):
    """Poll pred() until it is true (its value), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError("timed out after %.0fs waiting for %s" % (timeout, what))


def wait_child_exit(pid, timeout=WAIT):
    """waitpid for a fork child, bounded; its exit status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("fork child %d did not exit within %.0fs" % (pid, timeout))


def sleeping_on_futex(pid):
    """Whether pid's main thread sleeps in the kernel's futex wait."""
    try:
        with open("/proc/%d/wchan" % pid) as f:
            return "futex" in f.read()
    except OSError:
        return False
