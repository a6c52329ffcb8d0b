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
server, its block driver and device model (servers/blockdev.py), a
reference scheduler (servers/scheduler.py) gives a favourite context a CPU
of its own and parks an idle one, measured from /proc, then faytd stops on
SIGTERM, and the demo checks that no child process, no
object keeper of its faytd and no object is left.
Exit status 0 only if every step happened; it finishes in about 12 s.

    python -m servers.demo --trace FILE

also writes faytd's timeline trace of the whole run to FILE (faytd
--trace; docs/tracing.md): open it in the Perfetto UI.
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


def _proc_stat(pid):
    """(state letter, utime+stime in clock ticks, the CPU it last ran on)."""
    with open("/proc/%d/stat" % pid, "rb") as f:
        s = f.read()
    rest = s[s.rindex(b")") + 2:].split()
    return chr(rest[0][0]), int(rest[11]) + int(rest[12]), int(rest[36])


class Demo:
    def __init__(self, trace=None):
        self.trace = os.path.abspath(trace) if trace else None
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
        traced = ["--trace", self.trace] if self.trace else []
        if traced:
            self.say("faytd writes its timeline trace to %s (--trace)", self.trace)
        self.faytd = subprocess.Popen(
            [sys.executable, "-m", "faytd", "--socket", self.socket, "--ram", "64MiB",
             "--config", cfg] + traced,
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

    def scheduling(self):
        """servers/scheduler.py: a favourite context gets a CPU to itself, the
        others the rest at nice 10, an idle one is parked; measured from
        /proc (CPU time, the CPU each ran on, the process state)."""
        cpus = sorted(os.sched_getaffinity(0))
        self.say("scheduling: three busy contexts and an idle one (servers/scheduler.py work)")
        workers = {}
        for name, kind in (("fav", "busy"), ("bg1", "busy"), ("bg2", "busy"), ("idle", "idle")):
            p = subprocess.Popen([sys.executable, "-m", SERVERS + ".scheduler", "work", kind],
                                 env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
            self.instances["work-" + name] = p
            workers[name] = p
            self.follow(p, p.stdout, "work-" + name)
            self.wait_for("context", "work-" + name)
        fav = workers["fav"]
        self.say("the reference scheduler: favourite pid %d; it subscribes to faytd's "
                 "scheduling events and decides through its queue", fav.pid)
        sched = subprocess.Popen([sys.executable, "-m", SERVERS + ".scheduler",
                                  "--favourite-pid", str(fav.pid), "--idle", "0.3"],
                                 env=self.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        self.instances["scheduler"] = sched
        self.follow(sched, sched.stdout, "scheduler")
        self.wait_for("CPU %d to itself" % cpus[-1], "scheduler")
        for name in ("bg1", "bg2", "idle"):
            self.wait_for("(pid %d): nice 10" % workers[name].pid, "scheduler")
        self.wait_for("parked context", "scheduler")
        time.sleep(0.2)
        # Measure: CPU time and the CPUs each ran on, over 2 s, from /proc.
        before = {n: _proc_stat(p.pid) for n, p in workers.items()}
        ran = {n: set() for n in workers}
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            for n, p in workers.items():
                ran[n].add(_proc_stat(p.pid)[2])
            time.sleep(0.01)
        after = {n: _proc_stat(p.pid) for n, p in workers.items()}
        tick = os.sysconf("SC_CLK_TCK")
        used = {n: (after[n][1] - before[n][1]) / tick for n in workers}
        self.say("measured over 2.0 s (/proc/<pid>/stat: utime+stime, the CPU last run on, "
                 "sampled every 10 ms):")
        for n, p in workers.items():
            self.out("    %-5s pid %-7d CPU time %.2f s  ran on CPUs %s  state %s  nice %d"
                     % (n, p.pid, used[n], sorted(ran[n]), after[n][0],
                        os.getpriority(os.PRIO_PROCESS, p.pid)))
        problems = []
        if after["idle"][0] != "T":
            problems.append("the idle context is not parked (state %s)" % after["idle"][0])
        if used["idle"] > 0.05:
            problems.append("the idle context used CPU time")
        if len(cpus) > 1:
            if ran["fav"] != {cpus[-1]}:
                problems.append("the favourite ran on %s" % sorted(ran["fav"]))
            for n in ("bg1", "bg2"):
                if cpus[-1] in ran[n]:
                    problems.append("%s ran on the favourite's CPU" % n)
            if used["fav"] <= max(used["bg1"], used["bg2"]):
                problems.append("the favourite got no more CPU time than the others")
        else:
            self.say("one CPU only: the CPU placement is not shown, the nice values are")
        if problems:
            raise RuntimeError("the scheduler's decisions did not take effect: "
                               + "; ".join(problems))
        self.say("its decisions took effect: the favourite alone on CPU %d with %.2f s of "
                 "CPU, the others %.2f s and %.2f s on %s, the idle one parked",
                 cpus[-1], used["fav"], used["bg1"], used["bg2"], cpus[:-1] or cpus)
        self.say("SIGTERM the scheduler: faytd undoes its decisions")
        sched.send_signal(signal.SIGTERM)
        sched.wait(timeout=STEP_TIMEOUT)
        self.wait_for("faytd undoes", "scheduler")
        deadline = time.monotonic() + STEP_TIMEOUT
        while _proc_stat(workers["idle"].pid)[0] == "T":
            if time.monotonic() > deadline:
                raise RuntimeError("the idle context stayed parked after the scheduler went")
            time.sleep(0.01)
        self.say("the idle context runs again (state %s), nice values back to %d",
                 _proc_stat(workers["idle"].pid)[0],
                 os.getpriority(os.PRIO_PROCESS, workers["bg1"].pid))
        for p in workers.values():
            p.send_signal(signal.SIGTERM)
        for p in workers.values():
            p.wait(timeout=STEP_TIMEOUT)

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
        self.scheduling()

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


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="python -m servers.demo", description="The FAYT demo.")
    ap.add_argument("--trace", metavar="FILE", help="faytd's timeline trace of the run "
                    "(Chrome trace-event JSON, for the Perfetto UI)")
    demo = Demo(ap.parse_args(argv).trace)
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
