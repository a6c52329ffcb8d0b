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

    def __init__(self, directory, config=None, ram=None, extra=()):
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
        _running.append(self)
        try:
            wait_for_socket(self.socket, self.proc, log=self.log)
        except BaseException:
            self.stop(check=False)
            raise

    def env(self):
        e = dict(os.environ)
        e["FAYT_SOCKET"] = self.socket
        return e

    def stop(self, check=True):
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


def fayt_shm_objects(pids=None):
    """Names in /dev/shm that a faytd made (only those of faytd `pids` if given)."""
    names = sorted(n for n in os.listdir("/dev/shm") if n.startswith("fayt."))
    if pids is None:
        return names
    want = {"fayt.%d." % p for p in pids}
    return [n for n in names if n[:n.index(".", 5) + 1] in want]
