"""Scheduling events: faytd tells a subscribed scheduler when a context is
created, dies, blocks in a libportal wait or wakes (docs/scheduling.md,
"Events").

- Blocks and wakes cost the waiting thread two atomic adds and nothing
  else: the context page's wait record (fayt/context.h) counts the waits a
  context began and ended, bumped by libportal's C around the sleep
  (notification_wait, a sender's wait for a return, the contended path of
  a share-point lock).  No
  system call, no wake-up of faytd.
- faytd reads every record every FAYT_SCHED_EVENT_MS (a timerfd, armed only
  while a scheduler is subscribed) and posts, per context whose counts
  moved, one notice (struct fayt_sched_event) to each subscriber whose
  scheduler right names that context: BLOCKED if a thread of it sleeps in
  a wait now, else WOKE; `blocks`/`wakes` say how many since the last one.
  So events come in batches, at most one per context per tick, and a
  context blocking a million times a second costs faytd the same as one
  blocking once a tick.
- The record is the context's own memory: faytd keeps its last reading in
  its own memory, reads each word once, and believes only what it can
  check: a record whose waits in progress (blocks - wakes) exceed
  FAYT_WAITS_MAX, or whose counts went backwards, is counted (`bad`) and
  read afresh, reporting nothing.  A context can lie only about itself.
- CREATED (at HELLO) and DIED (when faytd forgets the context) come from
  faytd's own records, and go out with the next tick, before that tick's
  blocks and wakes.  A subscriber gets CREATED for every context it may
  see when it subscribes, and never events about itself (its own waits,
  handling events, would make events of their own for ever).
- Delivery is faytd's own notices (notification.Notifications.notice):
  never waits; a full ring keeps a bounded backlog, then counts what it
  loses (FAYT_EVENT_OVERFLOW).
"""
import errno
import logging
import os
import time

from libportal._abi import lib, SCHED_EVENT

from .frames import KernelError
from .native import lib as clib
from .policy import Policy

log = logging.getLogger("faytd")

TICK_NS = lib.FAYT_SCHED_EVENT_MS * 1000 * 1000
_HALF = 1 << 31


class SchedEvents:
    def __init__(self, kernel):
        self.k = kernel
        self.subs = {}              # scheduler context id -> its slot
        self.seen = {}              # context id -> (blocks, wakes) last read
        self.pending = []           # (kind, ctx) CREATED/DIED, for the next tick
        self.allowed = {}           # (scheduler id, target id) -> may it see target
        self.sent = 0               # notices posted
        self.bad = 0                # wait records not believed
        self._timer = -1

    # -- subscribing ----------------------------------------------------------
    def subscribe(self, ctx, index):
        Policy.check_schedule(ctx)
        Policy.check_handlers(ctx, "sched_subscribe")
        if not 0 <= index < lib.FAYT_NOTIFICATION_SLOTS:
            raise KernelError(errno.EINVAL, "index: %d is not a notification slot (0..%d)"
                              % (index, lib.FAYT_NOTIFICATION_SLOTS - 1))
        first = ctx.id not in self.subs
        self.subs[ctx.id] = index
        ctx.notify_armed = True
        self.k.notifications.ring(None, ctx)
        if first:
            for t in list(self.k.contexts.values()):
                if t is not ctx and t.alive and t.page_struct is not None:
                    self._read(t)       # the baseline: history is not an event
                    if self._may(ctx, t):
                        self._post(ctx, index, self._payload(lib.FAYT_EVENT_SCHED_CREATED, t))
        self._arm()

    def unsubscribe(self, ctx):
        if self.subs.pop(ctx.id, None) is None:
            return
        for key in [key for key in self.allowed if key[0] == ctx.id]:
            del self.allowed[key]
        if not self.subs:
            self.seen.clear()
            self.pending.clear()
            self._disarm()

    # -- what faytd's records say ------------------------------------------
    def created(self, ctx):
        """ctx has its context page (HELLO)."""
        if self.subs and ctx.page_struct is not None:
            self._read(ctx)
            self.pending.append((lib.FAYT_EVENT_SCHED_CREATED, ctx))

    def gone(self, ctx):
        """ctx is forgotten; as a scheduler, its subscription goes."""
        self.unsubscribe(ctx)
        self.seen.pop(ctx.id, None)
        if self.subs:
            self.pending.append((lib.FAYT_EVENT_SCHED_DIED, ctx))
        for key in [key for key in self.allowed if key[1] == ctx.id]:
            del self.allowed[key]

    # -- the tick -------------------------------------------------------------
    def _read(self, t):
        p = t.page_struct
        w = (p.waits.blocks, p.waits.wakes)
        self.seen[t.id] = w
        return w

    def _may(self, sched, t):
        key = (sched.id, t.id)
        ok = self.allowed.get(key)
        if ok is None:
            try:
                Policy.check_schedule_target(sched, t)
                ok = True
            except KernelError:
                ok = False
            self.allowed[key] = ok
        return ok

    @staticmethod
    def _payload(kind, t, blocks=0, wakes=0, waiting=0, now=0):
        return SCHED_EVENT.pack(kind, t.id, t.pid, t.uid, blocks, wakes, waiting, 0,
                                now or time.monotonic_ns())

    def _post(self, sched, index, payload):
        self.sent += 1
        self.k.notifications.notice(sched, index, payload)

    def _fan_out(self, t, payload):
        for sid, index in list(self.subs.items()):
            s = self.k.contexts.get(sid)
            if s is None or s is t or not s.alive or s.page_struct is None:
                continue
            if self._may(s, t):
                self._post(s, index, payload)

    def tick(self):
        now = time.monotonic_ns()
        pending, self.pending = self.pending, []
        for kind, t in pending:
            self._fan_out(t, self._payload(kind, t, now=now))
        seen = self.seen
        for t in list(self.k.contexts.values()):
            p = t.page_struct
            if p is None or not t.alive:
                continue
            b, w = p.waits.blocks, p.waits.wakes     # each word read once
            last = seen.get(t.id)
            seen[t.id] = (b, w)
            if last is None or last == (b, w):
                continue
            db = (b - last[0]) & 0xffffffff
            dw = (w - last[1]) & 0xffffffff
            waiting = (b - w) & 0xffffffff
            if waiting > lib.FAYT_WAITS_MAX or db >= _HALF or dw >= _HALF:
                self.bad += 1
                continue
            kind = lib.FAYT_EVENT_SCHED_BLOCKED if waiting else lib.FAYT_EVENT_SCHED_WOKE
            self._fan_out(t, self._payload(kind, t, db, dw, waiting, now))

    def _arm(self):
        server = getattr(self.k, "server", None)
        if self._timer >= 0 or server is None:
            return
        fd = clib.fayt_timerfd_open()
        if fd < 0:
            raise KernelError(-fd, "sched_subscribe: timerfd_create: %s" % os.strerror(-fd))
        self._timer = fd
        server.watch_fd(fd, self._on_timer)
        clib.fayt_timerfd_arm(fd, TICK_NS)

    def _disarm(self):
        if self._timer >= 0:
            server = getattr(self.k, "server", None)
            if server is not None:
                server.unwatch_fd(self._timer)
            os.close(self._timer)
            self._timer = -1

    def _on_timer(self, fd, events):
        clib.fayt_timerfd_drain(fd)
        try:
            self.tick()
        except Exception:
            log.error("scheduling events: a tick failed", exc_info=True)
        if self._timer == fd:
            clib.fayt_timerfd_arm(fd, TICK_NS)

    def shutdown(self):
        self.subs.clear()
        self.pending.clear()
        self._disarm()

    def counters(self):
        return {"subscribers": len(self.subs), "events": self.sent, "bad_wait_records": self.bad}
