"""Start and stop a real faytd process and wait until it serves (tests, bench)."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time


def wait_for_socket(path, proc, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("faytd exited with %s:\n%s" % (proc.returncode, proc.stderr.read()))
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


STARTED = []        # pids of every faytd this process started


class Faytd:
    """A faytd process: .socket, .proc, .stop() -> its stderr."""

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
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        STARTED.append(self.proc.pid)
        wait_for_socket(self.socket, self.proc)

    def env(self):
        e = dict(os.environ)
        e["FAYT_SOCKET"] = self.socket
        return e

    def stop(self):
        """SIGTERM, wait, return what faytd logged."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise RuntimeError("faytd did not stop on SIGTERM:\n" + err)
        return err


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
