"""The demo: faytd, three instances of the metadata server, a crash in the lock.

    python -m servers.demo        (in a checkout; or: make demo)
    python -m fayt_servers.demo   (installed)

It starts a private faytd (socket in a fresh temporary directory; FAYT_SOCKET
set for every child), runs three instances of servers/metadata.py that share
one share-point, shows `fayt ls` and `fayt ps`, then SIGKILLs one instance
while it holds the share-point lock in the middle of an update.  faytd sees
the process die (pidfd), releases the lock with the owner-died bit, and
another instance gets errno.EOWNERDEAD from sp.lock(), repairs the table and
calls mark_consistent().  A fourth instance joins, everyone stops on SIGTERM,
a notification server and client pair (servers/notify_pair.py) talk through
notifications (return flag, deferred, immediate, a failing handler, faytd's
peer-died notice), a key-value server (servers/kv.py) serves three clients
at once over connected channels, found by its name, a SPECIAL portal is read through a two-server chain, a
file of an emulated disk is read through a SPECIAL portal, the disk's chain
server, its block driver and device model (servers/blockdev.py), then
faytd stops on SIGTERM, and the demo checks that no child process, no
object keeper of its faytd and no object is left.
Exit status 0 only if every step happened; it finishes in about 10 s.
"""
import importlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil

from faytd.launch import fayt_objects, keepers

# The servers' package as this run names it (servers in a checkout,
# fayt_servers installed): the children run as its modules.
SERVERS = __package__ or "servers"
SHARE = "demo.jobs"
STEP_TIMEOUT = 20.0     # seconds any one expected event may take (a hang guard)


class Demo:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="fayt-demo-")
        self.socket = os.path.join(self.dir, "faytd.sock")
        self.env = dict(os.environ, FAYT_SOCKET=self.socket, PYTHONUNBUFFERED="1")
        self.print_lock = threading.Lock()
        self.events = queue.Queue()     # every line any child printed
        self.unclaimed = []             # lines taken from events that no wait_for matched yet
        self.faytd = None
        self.instances = {}             # name -> Popen
        self.readers = []
        self.t0 = time.monotonic()

    # -- output ---------------------------------------------------------------
    def out(self, line):
        with self.print_lock:
            sys.stdout.write("%5.1fs  %s\n" % (time.monotonic() - self.t0, line))
            sys.stdout.flush()

    def say(self, fmt, *args):
        self.out("[demo] " + (fmt % args if args else fmt))

    def _pump(self, stream, source):
        for line in stream:
            line = line.rstrip("\n")
            self.out(line)
            self.events.put((source, line))
        stream.close()

    def follow(self, proc, stream, source):
        t = threading.Thread(target=self._pump, args=(stream, source), daemon=True)
        t.start()
        self.readers.append(t)

    def wait_for(self, text, source=None, timeout=STEP_TIMEOUT):
        """Wait until a child prints a line containing `text`; the line.
        Lines of a named source that a wait_for passed over are kept for
        the next wait for that source: children print concurrently, so an
        awaited line may come before the one awaited first (a server's
        "died" before its client's "done").  A wait for any source looks
        only at lines still to come."""
        def match(src, line):
            return text in line and (source is None or src == source)

        if source is not None:
            for i, (src, line) in enumerate(self.unclaimed):
                if match(src, line):
                    del self.unclaimed[i]
                    return line
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("no line with %r from %s within %.0fs"
                                   % (text, source or "any process", timeout))
            try:
                src, line = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if match(src, line):
                return line
            self.unclaimed.append((src, line))

    # -- processes ----------------------------------------------------------
    def start_faytd(self):
        cfg = os.path.join(self.dir, "faytd.json")
        with open(cfg, "w") as f:
            json.dump({"devices": [{"name": "blk0", "base": "0x40000000", "size": "72KiB"}]}, f)
        self.say("starting faytd: %s -m faytd --socket %s --ram 64MiB --config %s (a device "
                 "window blk0)", "python", self.socket, cfg)
        self.faytd = subprocess.Popen(
            [sys.executable, "-m", "faytd", "--socket", self.socket, "--ram", "64MiB",
             "--config", cfg],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.follow(self.faytd, self.faytd.stderr, "faytd")
        # faytd logs "listening on" once it listens.  (Probing the socket with a
        # connect would leave a context of this process in faytd's table.)
        try:
            self.wait_for("listening on", "faytd", timeout=15)
        except RuntimeError:
            self.faytd.poll()
            raise RuntimeError("faytd did not start listening on %s (status %s)"
                               % (self.socket, self.faytd.returncode)) from None
        self.say("faytd is up (pid %d); FAYT_SOCKET=%s for every child",
                 self.faytd.pid, self.socket)

    def start_instance(self, name):
        p = subprocess.Popen(
            [sys.executable, "-m", SERVERS + ".metadata", "--name", name, "--share", SHARE,
             "--interval", "0.05", "--report", "1.0"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.instances[name] = p
        self.follow(p, p.stdout, name)
        self.wait_for("registered in slot", name)
        return p

    def fayt(self, *args):
        self.say("$ fayt %s", " ".join(args))
        r = subprocess.run([sys.executable, "-m", "faytd.cli"] + list(args), env=self.env,
                           capture_output=True, text=True, timeout=30)
        for line in (r.stdout + r.stderr).splitlines():
            self.out("    " + line)
        if r.returncode != 0:
            raise RuntimeError("fayt %s exited with %d" % (" ".join(args), r.returncode))
        return r.stdout

    def notify_pair(self):
        """servers/notify_pair.py: a server and a client talking through notifications."""
        self.say("notifications: starting the notify_pair server (servers/notify_pair.py)")
        srv = subprocess.Popen([sys.executable, "-m", SERVERS + ".notify_pair", "serve"],
                               env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
        self.instances["notify-server"] = srv
        self.follow(srv, srv.stdout, "notify-server")
        line = self.wait_for("serving notifications", "notify-server")
        cid = line.split("context ")[1].split()[0]
        self.say("its client notifies context %s: ADD with the return flag, LOG deferred "
                 "and immediate, FAIL (the handler raises)", cid)
        cli = subprocess.Popen([sys.executable, "-m", SERVERS + ".notify_pair", "client", cid,
                                "-n", "500"], env=self.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        self.follow(cli, cli.stdout, "notify-client")
        self.wait_for("done: ok", "notify-client")
        cli.wait(timeout=STEP_TIMEOUT)
        if cli.returncode != 0:
            raise RuntimeError("the notify_pair client exited with %d" % cli.returncode)
        self.wait_for("died", "notify-server")      # faytd's PEER_DIED notice
        srv.send_signal(signal.SIGTERM)
        srv.wait(timeout=STEP_TIMEOUT)
        self.wait_for("stopping:", "notify-server")
        if srv.returncode != 0:
            raise RuntimeError("the notify_pair server exited with %d" % srv.returncode)

    def kv_channels(self):
        """servers/kv.py: a key-value server over connected channels, found by
        its name, with three clients at once."""
        self.say("channels: a key-value server listens on 'demo.kv' (servers/kv.py); "
                 "three clients connect by that name at once")
        srv = subprocess.Popen([sys.executable, "-m", SERVERS + ".kv", "serve", "--name",
                                "demo.kv"], env=self.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        self.instances["kv-server"] = srv
        self.follow(srv, srv.stdout, "kv-server")
        self.wait_for("listening on", "kv-server")
        clients = []
        for i in range(3):
            cli = subprocess.Popen([sys.executable, "-m", SERVERS + ".kv", "client", "--name",
                                    "demo.kv", "-n", "200"], env=self.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            self.follow(cli, cli.stdout, "kv-client-%d" % i)
            clients.append(cli)
        for i, cli in enumerate(clients):
            self.wait_for("done: ok", "kv-client-%d" % i)
            cli.wait(timeout=STEP_TIMEOUT)
            if cli.returncode != 0:
                raise RuntimeError("a kv client exited with %d" % cli.returncode)
        srv.send_signal(signal.SIGTERM)
        srv.wait(timeout=STEP_TIMEOUT)
        self.wait_for("clients served", "kv-server")
        if srv.returncode != 0:
            raise RuntimeError("the kv server exited with %d" % srv.returncode)

    def special_chain(self):
        """servers/cachechain.py: a SPECIAL portal's pages from a two-server chain."""
        path = os.path.join(self.dir, "special-demo.bin")
        with open(path, "wb") as f:
            f.write(os.urandom(10 * 4096 + 123))
        self.say("SPECIAL: a cache (2 pages primed) in front of a file pager, chain "
                 "'demo.files' (servers/cachechain.py)")
        chain = subprocess.Popen([sys.executable, "-m", SERVERS + ".cachechain", "--chain",
                                  "demo.files", "--warm", path + ":2"], env=self.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.instances["cache-chain"] = chain
        self.follow(chain, chain.stdout, "cache-chain")
        self.wait_for("serving", "cache-chain")
        self.say("a client maps the file as a SPECIAL portal of 'demo.files' and reads it")
        cli = subprocess.Popen([sys.executable, "-m", SERVERS + ".filepager", "--chain",
                                "demo.files", "--read", path], env=self.env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.follow(cli, cli.stdout, "special-client")
        self.wait_for("identical", "special-client")
        cli.wait(timeout=STEP_TIMEOUT)
        if cli.returncode != 0:
            raise RuntimeError("the SPECIAL client exited with %d" % cli.returncode)
        chain.send_signal(signal.SIGTERM)
        chain.wait(timeout=STEP_TIMEOUT)
        self.wait_for("forwarded", "cache-chain")
        if chain.returncode != 0:
            raise RuntimeError("the cache chain exited with %d" % chain.returncode)

    def block_device(self):
        """servers/blockdev.py: a file on an emulated disk, read through a
        SPECIAL portal, a chain server, the block driver and its model."""
        image = os.path.join(self.dir, "disk.img")
        blockdev = importlib.import_module(SERVERS + ".blockdev")
        blockdev.make_image(image, {"notes.txt": b"written on an emulated disk\n" * 200})
        self.say("a device model serves window blk0 from a disk image (servers/blockdev.py)")
        model = subprocess.Popen([sys.executable, "-m", SERVERS + ".blockdev", "model", "--name",
                                  "blk0", "--image", image], env=self.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.instances["blk-model"] = model
        self.follow(model, model.stdout, "blk-model")
        self.wait_for("serving blk0", "blk-model")
        self.say("its driver maps the window with DIRECT and serves the disk's files on "
                 "chain 'demo.disk'")
        disk = subprocess.Popen([sys.executable, "-m", SERVERS + ".blockdev", "disk", "--name",
                                 "blk0", "--chain", "demo.disk"], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.instances["blk-disk"] = disk
        self.follow(disk, disk.stdout, "blk-disk")
        self.wait_for("serving chain", "blk-disk")
        cli = subprocess.Popen([sys.executable, "-m", SERVERS + ".blockdev", "cat", "--chain",
                                "demo.disk", "--file", "notes.txt", "--image", image],
                               env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
        self.follow(cli, cli.stdout, "disk-client")
        self.wait_for("identical to the image", "disk-client")
        cli.wait(timeout=STEP_TIMEOUT)
        if cli.returncode != 0:
            raise RuntimeError("the disk client exited with %d" % cli.returncode)
        for p in (disk, model):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=STEP_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def objects(self):
        return fayt_objects(dirs=[os.path.dirname(self.socket)])

    def keeper(self):
        return sorted(keepers([os.path.dirname(self.socket)]))

    # -- the story ----------------------------------------------------------
    def run(self):
        self.start_faytd()

        self.say("starting three instances of the job-counter server (servers/metadata.py)")
        self.start_instance("A")
        self.start_instance("B")
        self.start_instance("C")
        time.sleep(2.0)

        self.fayt("ls")
        self.fayt("ps")
        self.say("faytd's memory lives in sealed memfds, held by its object keeper "
                 "(pid %s): %d of them now", ", ".join(map(str, self.keeper())),
                 len(self.objects()))

        b = self.instances["B"]
        self.say("SIGUSR1 to B (pid %d): stop inside the next commit, holding the lock", b.pid)
        b.send_signal(signal.SIGUSR1)
        self.wait_for("holding the lock", "B")
        time.sleep(0.5)             # A and C now sleep on the lock's futex
        self.say("SIGKILL B (pid %d) while it holds the share-point lock", b.pid)
        b.send_signal(signal.SIGKILL)
        b.wait()
        self.say("B is dead (status %d); A and C were blocked on the lock", b.returncode)
        self.wait_for("EOWNERDEAD")
        self.wait_for("mark_consistent()")
        time.sleep(1.2)
        self.wait_for("| consistent")

        self.say("a new instance D joins and takes a free slot")
        self.start_instance("D")
        time.sleep(1.2)
        self.fayt("ls")

        for name in ("A", "C", "D"):
            p = self.instances[name]
            self.say("SIGTERM %s (pid %d)", name, p.pid)
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=STEP_TIMEOUT)
            if p.returncode != 0:
                raise RuntimeError("%s exited with status %d" % (name, p.returncode))
        self.wait_for("no job lost or counted twice")
        self.wait_for("destroyed share-point")
        self.fayt("ls")
        self.notify_pair()
        self.kv_channels()
        self.special_chain()
        self.block_device()

        self.say("SIGTERM faytd (pid %d)", self.faytd.pid)
        self.faytd.send_signal(signal.SIGTERM)
        self.faytd.wait(timeout=15)
        self.say("faytd exited with status %d", self.faytd.returncode)
        return self.check_clean()

    def check_clean(self):
        for t in self.readers:
            t.join(timeout=5)
        ok = True
        left, kept = self.objects(), self.keeper()
        if left or kept:
            self.say("LEFT: object keeper %s holding %s", kept, " ".join(left))
            ok = False
        else:
            self.say("nothing left (no object keeper, no objects)")
        kids = psutil.Process().children(recursive=True)
        if kids:
            self.say("LEFT child processes: %s",
                     ", ".join("%d (%s)" % (k.pid, k.status()) for k in kids))
            ok = False
        else:
            self.say("no child processes left (no zombies)")
        return ok

    def cleanup(self):
        """Whatever happened: no process of ours keeps running."""
        procs = list(self.instances.values()) + ([self.faytd] if self.faytd else [])
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def main():
    demo = Demo()
    ok = False
    try:
        ok = demo.run()
    except Exception as e:      # noqa: BLE001 -- reported, then everything is stopped
        demo.say("FAILED: %s", e)
    finally:
        demo.cleanup()
    demo.say("demo finished in %.1f s: %s", time.monotonic() - demo.t0, "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
