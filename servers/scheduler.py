"""A reference scheduler: one CPU for a favourite context, idle ones parked.

    python -m servers.scheduler --favourite-pid PID [--cpu N] [--idle S] [--pids P,..]
    python -m servers.scheduler work busy|idle     # a context to schedule

It subscribes to faytd's scheduling events (docs/scheduling.md, "Events")
and decides through its queue (lp.Scheduler):

- the favourite context (given by its pid) runs alone on CPU `--cpu` (the
  last CPU this process may use, unless told): run_on({cpu});
- every other context runs on the other CPUs, at nice `--nice` (10):
  run_on(others), set_nice(10); with one CPU only the nice value is set;
- a foreground/background rule for parking: while the favourite runs (it
  has not slept in a wait for `--idle` seconds), a context that has slept
  in a libportal wait for `--idle` seconds (0.5) is parked, so that it
  cannot take a CPU from the favourite when its wait ends; once the
  favourite has been idle as long itself, every parked context is woken
  (parks start again when the favourite wakes).  A parked context takes
  its notifications late: when the favourite is next idle, or when this
  scheduler stops.
- A decision faytd refuses (EPERM, ESRCH: the context died, EBUSY: it
  held a lock for a second) is reported and skipped.

It prints one line per decision, and stops on SIGTERM or SIGINT: it
closes its queue, and faytd undoes its decisions (parked contexts are
continued, affinity and nice values given back).

`work busy` burns CPU, with a libportal wait of 1 ms every 100 ms; `work
idle` sleeps in notification_wait.  Both print their context id first.
"""
import argparse
import os
import signal
import sys
import time

import libportal as lp
from libportal.sched import BLOCKED, CREATED, DIED, WOKE

NICE = 10


def say(fmt, *args):
    sys.stdout.write("[scheduler] %s\n" % (fmt % args if args else fmt))
    sys.stdout.flush()


class Ctx:
    __slots__ = ("id", "pid", "blocked_since", "parked", "placed")

    def __init__(self, cid, pid):
        self.id, self.pid = cid, pid
        self.blocked_since = None   # monotonic time it was seen blocked, or None
        self.parked = False
        self.placed = False         # affinity and nice decided


class PriorityScheduler:
    def __init__(self, favourite_pid, cpu, idle, nice=NICE, pids=None):
        self.s = lp.Scheduler()
        self.fav_pid = favourite_pid
        self.pids = pids            # None: every context its right names
        cpus = sorted(os.sched_getaffinity(0))
        self.cpu = cpus[-1] if cpu is None else cpu
        self.others = set(cpus) - {self.cpu}
        self.idle = idle
        self.nice = nice
        self.ctxs = {}
        self.fav_busy = True
        self.inbox = []
        self.decisions = {"run_on": 0, "set_nice": 0, "park": 0, "wake": 0, "refused": 0}

    def decide(self, what, ctx, fn, *args):
        try:
            fn(ctx.id, *args, timeout=5)
        except OSError as e:
            self.decisions["refused"] += 1
            say("%s of context %d (pid %d) refused: %s", what, ctx.id, ctx.pid, e)
            return False
        self.decisions[what] += 1
        return True

    def on_event(self, ev):
        """The handler: events are kept, and acted on from the loop (a
        decision waits for faytd's answer: not inside a handler)."""
        self.inbox.append(ev)

    def handle(self, ev):
        now = time.monotonic()
        c = self.ctxs.get(ev.context)
        if self.pids is not None and ev.pid not in self.pids and ev.pid != self.fav_pid:
            return
        if ev.event == CREATED:
            if c is None:
                c = self.ctxs[ev.context] = Ctx(ev.context, ev.pid)
            self.place(c)
        elif ev.event == DIED:
            if c is not None:
                del self.ctxs[ev.context]
                if c.pid == self.fav_pid:
                    say("the favourite (context %d) is gone", c.id)
                    self.favourite_idle()
        elif c is not None and ev.event in (BLOCKED, WOKE):
            c.blocked_since = (c.blocked_since or now) if ev.event == BLOCKED else None
            if c.pid == self.fav_pid and ev.event == WOKE:
                self.fav_busy = True

    def place(self, c):
        if c.placed:
            return
        c.placed = True
        if c.pid == self.fav_pid:
            if self.decide("run_on", c, self.s.run_on, {self.cpu}):
                say("favourite context %d (pid %d): CPU %d to itself", c.id, c.pid, self.cpu)
            return
        if self.others and self.decide("run_on", c, self.s.run_on, self.others):
            say("context %d (pid %d): CPUs %s", c.id, c.pid, sorted(self.others))
        if self.decide("set_nice", c, self.s.set_nice, self.nice):
            say("context %d (pid %d): nice %d", c.id, c.pid, self.nice)

    def favourite_idle(self):
        self.fav_busy = False
        for c in list(self.ctxs.values()):
            if c.parked:
                c.parked = False
                if self.decide("wake", c, self.s.wake):
                    say("woke context %d (pid %d): the favourite is idle", c.id, c.pid)

    def park_idle(self):
        now = time.monotonic()
        fav = next((c for c in self.ctxs.values() if c.pid == self.fav_pid), None)
        if (self.fav_busy and fav is not None and fav.blocked_since is not None
                and now - fav.blocked_since >= self.idle):
            self.favourite_idle()       # idle itself as long: the others may run
        if not self.fav_busy:
            return
        for c in list(self.ctxs.values()):
            if (c.pid != self.fav_pid and not c.parked and c.blocked_since is not None
                    and now - c.blocked_since >= self.idle):
                c.parked = self.decide("park", c, self.s.park)
                if c.parked:
                    say("parked context %d (pid %d): idle %.1f s while the favourite runs",
                        c.id, c.pid, now - c.blocked_since)

    def run(self, stop):
        self.s.subscribe(self.on_event)
        say("scheduling: favourite pid %d on CPU %d, others on %s at nice %d, idle after "
            "%.1f s parked", self.fav_pid, self.cpu, sorted(self.others) or "-", self.nice,
            self.idle)
        while not stop:
            lp.notification_wait(0.05)
            inbox, self.inbox = self.inbox, []
            for ev in inbox:
                self.handle(ev)
            self.park_idle()
        say("stopping: %s; faytd undoes the decisions",
            ", ".join("%s %d" % kv for kv in self.decisions.items()))
        self.s.close()


def work(kind):
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    print("[work %s] context %d pid %d" % (kind, lp.connection().context_id, os.getpid()),
          flush=True)
    x = 0
    while not stop:
        if kind == "idle":
            lp.notification_wait(0.2)
            continue
        end = time.monotonic() + 0.1
        while time.monotonic() < end:
            x += 1
        lp.notification_wait(0.001)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m servers.scheduler", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", nargs="*", help="work busy|idle: run a context to schedule")
    ap.add_argument("--favourite-pid", type=int, help="the favourite context's pid")
    ap.add_argument("--cpu", type=int, help="its CPU (default: the last one we may use)")
    ap.add_argument("--idle", type=float, default=0.5,
                    help="seconds asleep in a wait before a context is parked (0.5)")
    ap.add_argument("--nice", type=int, default=NICE, help="the others' nice value (10)")
    ap.add_argument("--pids", help="schedule only these pids (comma-separated) and the "
                    "favourite; default: every context the scheduler right names")
    args = ap.parse_args(argv)
    if args.work:
        if args.work[0] != "work" or len(args.work) != 2 or args.work[1] not in ("busy", "idle"):
            ap.error("expected: work busy|idle")
        work(args.work[1])
        return 0
    if args.favourite_pid is None:
        ap.error("--favourite-pid is required")
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    try:
        pids = None if args.pids is None else {int(x) for x in args.pids.split(",")}
    except ValueError:
        ap.error("--pids: %r is not a comma-separated list of pids" % args.pids)
    PriorityScheduler(args.favourite_pid, args.cpu, args.idle, args.nice, pids).run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
