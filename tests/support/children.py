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
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

WAIT = 30.0          # seconds any single step may take before the test fails

PRELUDE = ("import errno, json, os, select, struct, sys, threading, time\n"
           "import libportal as lp\n")


class Child:
    """A helper process: send(line), expect() -> its next stdout line,
    finish() -> the rest once it exited cleanly, kill(); .pid, .proc.

    code runs after PRELUDE (dedented); env is its whole environment.  With
    as_user (support.daemon.AsUser) it runs as uid/gid, argv[1:] = args."""

    def __init__(self, code, env, as_user=None, uid=None, gid=None, args=(),
                 prelude=PRELUDE):
        code = prelude + textwrap.dedent(code)
        self._err = tempfile.TemporaryFile()
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": self._err}
        if as_user is None:
            proc = subprocess.Popen([sys.executable, "-u", "-c", code] + [str(a) for a in args],
                                    env=env, **pipes)
        else:
            ids = {} if uid is None else {"uid": uid, "gid": uid if gid is None else gid}
            proc = as_user.popen(code, args, env=dict(env, PYTHONUNBUFFERED="1"), text=False,
                                 **ids, **pipes)
        self.proc = proc
        self.pid = proc.pid
        self._out = proc.stdout.fileno()
        os.set_blocking(self._out, False)
        self._buf = b""
        self._eof = False

    def stderr(self):
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

    def expect(self, timeout=WAIT):
        """Its next stdout line (without the newline)."""
        line = self._line(time.monotonic() + timeout)
        if line is None:
            raise AssertionError("child %d said nothing within %.0fs; stderr:\n%s"
                                 % (self.pid, timeout, self.stderr()))
        if not line:
            self.proc.wait(timeout=WAIT)
            raise AssertionError("child %d exited (%s) early; stderr:\n%s"
                                 % (self.pid, self.proc.returncode, self.stderr()))
        return line.decode().rstrip("\n")

    def send(self, line=""):
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def finish(self, timeout=WAIT):
        """Wait for a clean exit; the rest of its stdout, as lines."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("child %d did not exit within %.0fs" % (self.pid, timeout))
        rest, deadline = [], time.monotonic() + WAIT
        while True:
            line = self._line(deadline)
            if line is None:
                raise AssertionError("child %d exited but its stdout stayed open %.0fs"
                                     % (self.pid, WAIT))
            if not line:
                break
            rest.append(line.decode().rstrip("\n"))
        assert self.proc.returncode == 0, "child %d exited %s; stderr:\n%s" % (
            self.pid, self.proc.returncode, self.stderr())
        return rest

    def kill(self):
        """SIGKILL it (if it still runs) and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=WAIT)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


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
