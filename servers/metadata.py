"""A job-counter server whose instances share their metadata in a share-point.

This is the specification's second trivial share-point: "shared meta-data
between multiple instances of the same server, requiring only locking".
Run several instances of it; together they hand out job numbers:

    python -m servers.metadata --name A &
    python -m servers.metadata --name B &

The first instance creates the share-point (share_create); the others get
EEXIST (AlreadyExists) and attach.  Only instances of this server may have
made it: the name lives in this uid's namespace (docs/names.md), where no
other uid can create it, unless the policy shares it or a core server put it
there; so an instance adopts the share-point it attached only if faytd says
this uid made it and it is large enough, and stops otherwise.  Its data
holds a header and a table of instance slots (layout below).  Each instance
- registers: claims a free slot (pid, name, status) under the lock;
- works: under an explicit sp.lock(), takes a job ticket, then commits the
  job: its slot's count, then the total;
- reports: reads the whole table under `with sp:` and sp.view();
- deregisters on SIGTERM/SIGINT: folds its count into `retired`, frees its
  slot; the last one out destroys the share-point.

The invariant, true whenever the lock is free and not marked owner-died:
    tickets == jobs_done == retired + sum(slot.done for every used slot)
A commit breaks it for a moment (ticket first, then the slot, the total
last).  The ticket is taken inside the commit's lock: taken outside it (with
the fused sp.add(), as this server first did), an instance killed between
the two left a ticket issued that no job records; fault injection found it
(tests/test_inject.py).  If an instance
dies inside that moment, faytd releases the lock with the owner-died bit set;
the next sp.lock() returns errno.EOWNERDEAD (fused calls and `with sp:` raise
OwnerDied instead, and this server then takes the explicit path).  The
instance that got EOWNERDEAD repairs: it retires the slots of dead instances,
recounts jobs_done, takes back the ticket of a commit the dead holder left
half done (tickets = jobs_done), and calls mark_consistent().  No job is lost or counted
twice: at the end, tickets issued == jobs done.

SIGUSR1 asks an instance to stop inside its next commit, holding the lock
with the table half-updated, so that a demo can SIGKILL it there
(servers/demo.py).  Uses only the public API of libportal.
"""
import argparse
import contextlib
import errno
import os
import signal
import struct
import sys
import time

import psutil

import libportal as lp

MAGIC = b"FAYTJOBS"
# Header at data offset 0 ("=": native byte order, as sp.add() adds a native int64).
HEADER = struct.Struct("=8sIi4q")   # magic, nslots, holder pid, next_ticket, jobs_done,
#                                     retired, recoveries
HOLDER_OFF = 12                     # pid of the instance in a critical section, 0 if none
SLOT = struct.Struct("=iI8sqqd")    # pid, status, name, done, last_job, last_seen (time.time)
SLOTS_OFF = HEADER.size
FREE, RUNNING = 0, 1
DEFAULT_SLOTS = 16


def layout_length(nslots):
    return SLOTS_OFF + nslots * SLOT.size


class Table:
    """The share-point's data seen through a memoryview; use it under the lock."""

    def __init__(self, view):
        self.v = view

    @property
    def initialized(self):
        return bytes(self.v[0:8]) == MAGIC

    def init(self, nslots):
        self.v[0:layout_length(nslots)] = bytes(layout_length(nslots))
        HEADER.pack_into(self.v, 0, MAGIC, nslots, 0, 0, 0, 0, 0)

    def header(self):
        magic, nslots, holder, tickets, done, retired, recoveries = HEADER.unpack_from(self.v, 0)
        return dict(nslots=nslots, holder=holder, tickets=tickets, jobs_done=done,
                    retired=retired, recoveries=recoveries)

    def set(self, **fields):
        h = self.header()
        h.update(fields)
        HEADER.pack_into(self.v, 0, MAGIC, h["nslots"], h["holder"], h["tickets"],
                         h["jobs_done"], h["retired"], h["recoveries"])

    def slot(self, i):
        pid, status, name, done, last, seen = SLOT.unpack_from(self.v, SLOTS_OFF + i * SLOT.size)
        return dict(pid=pid, status=status, name=name.rstrip(b"\0").decode(), done=done,
                    last_job=last, last_seen=seen)

    def put_slot(self, i, pid=0, status=FREE, name="", done=0, last_job=0, last_seen=0.0):
        SLOT.pack_into(self.v, SLOTS_OFF + i * SLOT.size, pid, status,
                       name.encode()[:8], done, last_job, last_seen)

    def used(self):
        return [(i, s) for i in range(self.header()["nslots"])
                for s in [self.slot(i)] if s["status"] != FREE]

    def consistent(self):
        h = self.header()
        return h["jobs_done"] == h["retired"] + sum(s["done"] for _, s in self.used())


def process_alive(pid):
    """True if pid runs; a zombie (dead, not yet reaped by its parent) is dead."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


class Instance:
    def __init__(self, name, identifier, nslots, out=sys.stdout):
        self.name = name
        self.identifier = identifier
        self.nslots = nslots
        self.pid = os.getpid()
        self.out = out
        self.slot = None
        self.done = 0
        self.last_job = 0
        self.stop = False
        self.die_in_lock = False
        self.sp = None

    def say(self, fmt, *args):
        self.out.write("[%s pid %d] %s\n" % (self.name, self.pid, fmt % args))
        self.out.flush()

    # -- the share-point --------------------------------------------------
    def open(self):
        """Create the share-point, or attach it if another instance did."""
        need = layout_length(self.nslots)
        # The mapping holds the meta-structure (with one paddr per frame) before
        # the data; faytd rounds the length up to whole frames.
        length = need + 64 + 8 * (need // lp.PAGE_SIZE + 1)
        for _ in range(20):
            try:
                self.sp = lp.share_create(self.identifier, length)
                assert self.sp.length >= need, (self.sp.length, need)
                n = len(self.sp.paddr)
                self.say("created share-point %r (%d bytes of data; %d frame%s at %s)",
                         self.identifier, self.sp.length, n, "" if n == 1 else "s",
                         ", ".join("%#x" % p for p in self.sp.paddr[:4]) + (
                             ", ..." if n > 4 else ""))
                return
            except lp.AlreadyExists:
                pass
            try:
                self.sp = lp.share_attach(self.identifier)
            except lp.NotFound:      # destroyed between the two calls: try again
                time.sleep(0.01)
                continue
            self.adopt(need)
            self.say("share-point %r exists (EEXIST): attached it", self.identifier)
            return
        raise SystemExit("%s: cannot create or attach %r" % (self.name, self.identifier))

    def adopt(self, need):
        """The share-point attached is another instance's only if this uid
        made it (faytd's record of its owner, by its id) and it holds the
        table; else it is left as it is and this instance stops."""
        mine = os.getuid()
        owner = next((s["owner_uid"] for s in lp.connection().list_sharepoints()
                      if s["id"] == self.sp.sp_id), None)
        why = None
        if owner != mine:
            why = "%s, not an instance of this server (uid %d)" % (
                "uid %d made it" % owner if owner is not None else "faytd does not list it",
                mine)
        elif self.sp.length < need:
            why = "holds %d bytes of data, fewer than %d slots take" % (self.sp.length,
                                                                        self.nslots)
        if why:
            self.sp.unmap()
            self.sp = None
            raise SystemExit("%s: share-point %r exists but %s: not adopted"
                             % (self.name, self.identifier, why))

    @contextlib.contextmanager
    def locked(self):
        """The explicit lock path: sp.lock() -> 0 or errno.EOWNERDEAD.
        Yields the Table; records this pid as the holder while it is held."""
        r = self.sp.lock()
        try:
            view = self.sp.view()
            try:
                t = Table(view)
                if r == errno.EOWNERDEAD:
                    self.repair(t)
                    self.sp.mark_consistent()
                    self.say("mark_consistent(): the lock is clean again; carrying on")
                elif not t.initialized:
                    t.init(self.nslots)
                t.set(holder=self.pid)
                try:
                    yield t
                finally:
                    t.set(holder=0)
            finally:
                view.release()
        finally:
            self.sp.unlock()

    def recover(self):
        """A fused call or `with sp:` raised OwnerDied: take the explicit path,
        which repairs (unless another instance already did)."""
        with self.locked():
            pass

    def repair(self, t):
        h = t.header()
        self.say("sp.lock() returned EOWNERDEAD: the last holder (pid %d) died inside the "
                 "lock; repairing", h["holder"])
        retired = h["retired"]
        for i, s in t.used():
            if s["pid"] != self.pid and not process_alive(s["pid"]):
                self.say("  slot %d: instance %s (pid %d) is dead: retiring its %d jobs, "
                         "slot cleared", i, s["name"], s["pid"], s["done"])
                retired += s["done"]
                t.put_slot(i)
        recount = retired + sum(s["done"] for _, s in t.used())
        self.say("  jobs_done: %d in the header, %d by recount%s", h["jobs_done"], recount,
                 " (the dead holder's half-done commit)" if recount != h["jobs_done"] else "")
        if h["tickets"] != recount:
            self.say("  tickets: %d issued, %d by recount (the dead holder's ticket taken back)",
                     h["tickets"], recount)
        t.set(retired=retired, jobs_done=recount, tickets=recount,
              recoveries=h["recoveries"] + 1, holder=0)

    # -- what an instance does ----------------------------------------------
    def register(self):
        with self.locked() as t:
            free = None
            for i in range(t.header()["nslots"]):
                s = t.slot(i)
                if s["status"] == FREE and free is None:
                    free = i
                elif s["status"] != FREE and s["pid"] == self.pid:
                    free = i
                    break
            if free is None:
                raise SystemExit("%s: all %d slots are taken" % (self.name, self.nslots))
            t.put_slot(free, self.pid, RUNNING, self.name, 0, 0, time.time())
            self.slot = free
            n = len(t.used())
        self.say("registered in slot %d (%d instance%s now)", free, n, "" if n == 1 else "s")

    def commit(self):
        """Take a ticket and do its job, under the lock; the job's number."""
        with self.locked() as t:
            s = t.slot(self.slot)
            if s["pid"] != self.pid:          # a repairer took us for dead
                raise SystemExit("%s: slot %d was taken from us" % (self.name, self.slot))
            job = t.header()["tickets"] + 1
            t.set(tickets=job)
            self.done = s["done"] + 1
            t.put_slot(self.slot, self.pid, RUNNING, self.name, self.done, job, time.time())
            if self.die_in_lock:
                self.say("holding the lock in the middle of a commit: slot says %d jobs, "
                         "jobs_done not updated yet (kill me now)", self.done)
                time.sleep(60)
            h = t.header()
            t.set(jobs_done=h["jobs_done"] + 1)
        return job

    def snapshot(self):
        """Read the table under `with sp:` (the short form of the lock)."""
        while True:
            try:
                with self.sp:
                    view = self.sp.view()
                    try:
                        t = Table(view)
                        return t.header(), t.used(), t.consistent()
                    finally:
                        view.release()
            except lp.OwnerDied:
                self.say("`with sp:` raised OwnerDied: taking the explicit lock path")
                self.recover()

    def report(self):
        h, used, ok = self.snapshot()
        table = " ".join("%s=%d" % (s["name"], s["done"]) for _, s in used)
        self.say("%d jobs done (last #%d) | table: %s | total %d%s | %s",
                 self.done, self.last_job, table, h["jobs_done"],
                 " (+%d retired)" % h["retired"] if h["retired"] else "",
                 "consistent" if ok else "INCONSISTENT")

    def deregister(self):
        with self.locked() as t:
            h = t.header()
            s = t.slot(self.slot)
            t.put_slot(self.slot)
            t.set(retired=h["retired"] + s["done"])
            left = len(t.used())
            h = t.header()
            ok = t.consistent()
        self.say("deregistered from slot %d after %d jobs (%d instance%s left)",
                 self.slot, self.done, left, "" if left == 1 else "s")
        if left == 0:
            self.say("last one out: tickets issued %d, jobs done %d, recoveries %d: %s",
                     h["tickets"], h["jobs_done"], h["recoveries"],
                     "no job lost or counted twice" if ok and h["tickets"] == h["jobs_done"]
                     else "MISMATCH")
            try:
                self.sp.destroy()
                self.say("destroyed share-point %r", self.identifier)
                return
            except lp.PermissionDenied:
                self.say("not allowed to destroy %r: faytd reclaims it when its owner is "
                         "gone and nobody maps it", self.identifier)
        self.sp.unmap()

    def run(self, interval, report_every, duration):
        self.open()
        self.register()
        end = time.monotonic() + duration if duration else None
        next_report = time.monotonic() + report_every
        while not self.stop and (end is None or time.monotonic() < end):
            self.last_job = self.commit()
            now = time.monotonic()
            if now >= next_report:
                self.report()
                next_report = now + report_every
            time.sleep(interval)
        self.deregister()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m %s.metadata" % (__package__ or "servers"),
                                 description="A job counter whose instances share metadata.")
    ap.add_argument("--name", default=None, help="instance name, up to 8 bytes (default: pid)")
    ap.add_argument("--share", default="metadata.jobs", help="share-point identifier")
    ap.add_argument("--slots", type=int, default=DEFAULT_SLOTS, help="instance slots")
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between jobs")
    ap.add_argument("--report", type=float, default=1.0, help="seconds between reports")
    ap.add_argument("--duration", type=float, default=None,
                    help="stop after this many seconds (default: at SIGTERM/SIGINT)")
    args = ap.parse_args(argv)
    inst = Instance(args.name or str(os.getpid()), args.share, args.slots)

    def on_stop(signum, frame):
        inst.stop = True

    def on_usr1(signum, frame):
        inst.die_in_lock = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_usr1)
    try:
        inst.run(args.interval, args.report, args.duration)
    except lp.DaemonUnavailable as e:
        sys.stderr.write("%s: %s\n" % (inst.name, e.strerror or e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
