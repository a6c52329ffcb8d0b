"""The scheduling case (docs/scheduling.md): what a subscribed scheduler
costs others, how late its events come, how late its decisions land.

- Notification round trip (return flag) with a scheduler subscribed vs
  none: a scheduler process subscribes and unsubscribes between rounds,
  so the two sides take turns (interleaved); each side's figure is the
  median of its rounds.  Target <= 1.1x.
- Event latency: a blocker process stamps time.monotonic_ns() just before
  each notification_wait (a libportal wait), sleeping between waits; the
  scheduler stamps the arrival of each BLOCKED event in its handler.  The
  latency is the arrival minus the stamp of the wait it reports: the
  faytd reading delay (FAYT_SCHED_EVENT_MS) plus delivery.  Reported
  against the stated delay (the ratio says how much of it was used).
- Decision latency: Scheduler.set_nice(ctx, value), a put until faytd
  has applied it and answered (the result is written right after the
  setpriority), against os.setpriority of the same process done here.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import libportal as lp
from libportal.sched import BLOCKED, EVENT_DELAY_S

_SCHEDULER = r"""
import json, sys, time, libportal as lp
from libportal.sched import BLOCKED
s = lp.Scheduler()
blocked = []        # (context, arrival ns)
events = [0]
def on(ev):
    events[0] += 1
    if ev.event == BLOCKED:
        blocked.append((ev.context, time.monotonic_ns()))
print("ready", flush=True)
import select
while True:
    r, _, _ = select.select([sys.stdin], [], [], 0)
    if r:
        cmd = sys.stdin.readline().strip()
        if cmd == "sub":
            s.subscribe(on)
        elif cmd == "unsub":
            s.unsubscribe()
        elif cmd == "report":
            print(json.dumps({"events": events[0], "blocked": blocked}), flush=True)
            blocked.clear()
            continue
        elif cmd in ("quit", ""):
            break
        print("ok", flush=True)
    lp.notification_wait(0.05)
s.close()
"""

_BLOCKER = r"""
import json, sys, time, libportal as lp
n, gap = int(sys.argv[1]), float(sys.argv[2])
print(lp.connection().context_id, flush=True)
sys.stdin.readline()
stamps = []
for _ in range(n):
    end = time.monotonic() + gap
    while time.monotonic() < end:       # runs (no libportal wait) between waits
        pass
    stamps.append(time.monotonic_ns())
    lp.notification_wait(gap)
print(json.dumps(stamps), flush=True)
"""

_TARGET = r"""
import sys, time, libportal as lp
def h(p, i, s):
    return 1
lp.install_handler(1, h)
print(lp.connection().context_id, flush=True)
end = time.monotonic() + 600
while time.monotonic() < end:
    lp.notification_wait(1.0)
"""


def _child(d, code, *args):
    return subprocess.Popen([sys.executable, "-c", code] + [str(a) for a in args], env=d.env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _say(p, cmd):
    p.stdin.write(cmd + "\n")
    p.stdin.flush()
    line = p.stdout.readline()
    if not line:
        raise RuntimeError("sched bench: the scheduler process died")
    return line.strip()


def _stop(p):
    if p.poll() is None:
        p.kill()
    p.wait()


def case_sched(d, scale):
    rounds = 7 if scale >= 1 else 2
    n = max(300, int(20000 * scale))
    sched = _child(d, _SCHEDULER)
    target = _child(d, _TARGET)
    rows = []
    try:
        assert sched.stdout.readline().strip() == "ready"
        tid = int(target.stdout.readline())
        call = lp.notification_channel(tid).call
        for _ in range(200):
            call(1, b"x", timeout=30)
        without, with_ = [], []
        events = 0
        for _ in range(rounds):
            for side in ("unsub", "sub"):
                _say(sched, side)
                time.sleep(0.02)
                t = time.perf_counter()
                for _ in range(n):
                    call(1, b"x", timeout=30)
                (with_ if side == "sub" else without).append((time.perf_counter() - t) / n)
        events = json.loads(_say(sched, "report"))["events"]
        _say(sched, "unsub")
        a, b = statistics.median(with_), statistics.median(without)
        rows.append({"name": "notify round trip, a scheduler subscribed (%d events)" % events,
                     "ours": a * 1e6, "unit": "us", "peer": "no scheduler subscribed",
                     "peer_value": b * 1e6, "ratio": a / b,
                     "range": (min(with_) * 1e6, max(with_) * 1e6),
                     "peer_range": (min(without) * 1e6, max(without) * 1e6),
                     "target": ("<=", 1.1)})

        # Event latency: a wait's stamp to the scheduler's handler.
        k = max(20, int(200 * scale))
        gap = 0.013                  # not a multiple of the 5 ms reading: phases vary
        blocker = _child(d, _BLOCKER, k, gap)
        try:
            bid = int(blocker.stdout.readline())
            _say(sched, "sub")
            _say(sched, "report")    # drop what came before
            blocker.stdin.write("go\n")
            blocker.stdin.flush()
            stamps = json.loads(blocker.stdout.readline())
            time.sleep(3 * EVENT_DELAY_S)
            got = [t for c, t in json.loads(_say(sched, "report"))["blocked"] if c == bid]
            _say(sched, "unsub")
        finally:
            _stop(blocker)
        lat = []
        for t in got:               # the latest wait stamped before the arrival
            before = [s for s in stamps if s <= t]
            if before:
                lat.append((t - before[-1]) / 1e3)
        if lat:
            rows.append({"name": "sched event latency, block to handler (%d of %d waits)"
                         % (len(lat), k),
                         "ours": statistics.median(lat), "unit": "us",
                         "peer": "the stated delay (FAYT_SCHED_EVENT_MS)",
                         "peer_value": EVENT_DELAY_S * 1e6,
                         "ratio": statistics.median(lat) / (EVENT_DELAY_S * 1e6),
                         "range": (min(lat), max(lat)), "target": None})
        else:
            print("  sched: no BLOCKED event came for the blocker", file=sys.stderr)

        # Decision latency: a put until faytd applied it.
        s = lp.Scheduler()
        try:
            m = max(200, int(3000 * scale))
            nice = os.getpriority(os.PRIO_PROCESS, target.pid)
            ours, peer = [], []
            for _ in range(rounds):
                t = time.perf_counter()
                for _ in range(m):
                    s.set_nice(tid, nice, timeout=30)
                ours.append((time.perf_counter() - t) / m)
                t = time.perf_counter()
                for _ in range(m):
                    os.setpriority(os.PRIO_PROCESS, target.pid, nice)
                peer.append((time.perf_counter() - t) / m)
        finally:
            s.close()
        a, b = statistics.median(ours), statistics.median(peer)
        rows.append({"name": "sched decision latency, put until applied (set_nice)",
                     "ours": a * 1e6, "unit": "us", "peer": "os.setpriority, no faytd",
                     "peer_value": b * 1e6, "ratio": a / b,
                     "range": (min(ours) * 1e6, max(ours) * 1e6),
                     "peer_range": (min(peer) * 1e6, max(peer) * 1e6), "target": None})
        sched.stdin.write("quit\n")
        sched.stdin.flush()
        sched.wait(30)
    finally:
        _stop(sched)
        _stop(target)
    return rows
