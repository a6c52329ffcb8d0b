"""The scheduling interface: a scheduler server's decisions, sent to faytd
through its queue and enforced on the real processes (docs/scheduling.md).

    s = lp.Scheduler()                 # core by default (the scheduler right)
    s.run_on(ctx, {0})                 # every thread of ctx on CPU 0
    s.set_nice(ctx, 10)
    s.park(ctx)                        # stopped, outside its critical sections
    s.wake(ctx)
    s.subscribe(on_event)              # SchedEvent: created, died, blocked, woke

Each call puts one decision and waits for faytd's result; a decision faytd
refused raises its errno (PermissionDenied, NoSuchContext, ...), it is never
a silent no-op.  put() and result() split the two.
"""
import errno
import os
from typing import Callable, Iterable, NamedTuple

from . import errors
from ._abi import lib, SCHED_DECISION, SCHED_EVENT, SCHED_SUBSCRIBE
from .queue import queue_open
from .syscall import Connection

CPUS = lib.FAYT_QREC_SCHED_CPUS
NICE = lib.FAYT_QREC_SCHED_NICE
PARK = lib.FAYT_QREC_SCHED_PARK
WAKE = lib.FAYT_QREC_SCHED_WAKE
_NAMES = {CPUS: "run_on", NICE: "set_nice", PARK: "park", WAKE: "wake"}

# Scheduling events (docs/scheduling.md, "Events").
CREATED = lib.FAYT_EVENT_SCHED_CREATED
DIED = lib.FAYT_EVENT_SCHED_DIED
BLOCKED = lib.FAYT_EVENT_SCHED_BLOCKED
WOKE = lib.FAYT_EVENT_SCHED_WOKE
EVENTS_SLOT = 62                # the slot subscribe() takes unless told
EVENT_DELAY_S = lib.FAYT_SCHED_EVENT_MS / 1000   # faytd reads the wait records this often


class SchedEvent(NamedTuple):
    """One scheduling event (struct fayt_sched_event)."""
    event: int          # CREATED, DIED, BLOCKED or WOKE (OVERFLOW: `blocks` were lost)
    context: int
    pid: int
    uid: int
    blocks: int         # waits it began since the previous event about it
    wakes: int          # waits it ended since then
    waiting: int        # its threads asleep in a libportal wait now
    seen_ns: int        # CLOCK_MONOTONIC (time.monotonic_ns) when faytd read it


def decode_sched_event(payload: "bytes | memoryview") -> SchedEvent:
    """A notification payload as a SchedEvent."""
    b = bytes(payload[:SCHED_EVENT.size])
    if len(b) < SCHED_EVENT.size:
        b = b.ljust(SCHED_EVENT.size, b"\0")
    e, ctx, pid, uid, blocks, wakes, waiting, _, seen = SCHED_EVENT.unpack(b)
    return SchedEvent(e, ctx, pid, uid, blocks, wakes, waiting, seen)


class Scheduler:
    """A scheduler's queue to faytd, and its decisions."""

    def __init__(self, size: int = 0, *, connection: "Connection | None" = None) -> None:
        self.queue = queue_open(size, connection=connection)
        self._what = {}
        self._events = None         # the slot of subscribe(), or None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """The queue goes (and the events, if subscribed), and with the
        connection's end faytd undoes this scheduler's decisions
        (docs/scheduling.md, Failure)."""
        if self._events is not None and not self.queue._conn.closed:
            try:
                self.unsubscribe()
            except OSError:
                pass                    # faytd gone: nothing to stop
        self._events = None
        self.queue.close()

    def put(self, kind: int, context: int, value: int = 0, cpus: int = 0, *,
            timeout: "float | None" = None) -> int:
        """Put one decision (CPUS, NICE, PARK, WAKE) without waiting for its
        result; returns its seq for result()."""
        if kind not in _NAMES:
            raise errors.error(errno.EINVAL, "kind: %r is not CPUS, NICE, PARK or WAKE" % kind)
        if not 0 <= context < 1 << 32:
            raise errors.error(errno.EINVAL, "context: %r is not a context id" % context)
        seq = self.queue.put_decision(kind, SCHED_DECISION.pack(context, value, cpus),
                                      timeout=timeout)
        self._what[seq % lib.FAYT_QUEUE_RESULTS] = (seq, kind, context)
        return seq

    def result(self, seq: int, *, timeout: "float | None" = None) -> None:
        """Wait for decision seq's result: None if applied, else its error."""
        err = self.queue.result(seq, timeout=timeout)
        if err:
            got = self._what.get(seq % lib.FAYT_QUEUE_RESULTS)
            what = ("%s of context %d" % (_NAMES[got[1]], got[2]) if got and got[0] == seq
                    else "decision %d" % seq)
            raise errors.error(err, "%s: faytd answered %s (%s)"
                               % (what, errno.errorcode.get(err, err), os.strerror(err)))

    def _decide(self, kind, context, value=0, cpus=0, timeout=None):
        self.result(self.put(kind, context, value, cpus, timeout=timeout), timeout=timeout)

    def run_on(self, context: int, cpus: "Iterable[int]", *,
               timeout: "float | None" = None) -> None:
        """Every thread of the context on the CPUs of `cpus` (ids 0..63)."""
        mask = 0
        for c in cpus:
            if not isinstance(c, int) or not 0 <= c < 64:
                raise errors.error(errno.EINVAL, "cpus: %r is not a CPU id 0..63" % (c,))
            mask |= 1 << c
        if not mask:
            raise errors.error(errno.EINVAL, "cpus: an empty set")
        self._decide(CPUS, context, 0, mask, timeout)

    def set_nice(self, context: int, nice: int, *, timeout: "float | None" = None) -> None:
        """The context's nice value (-20..19; lower is a higher priority)."""
        if not isinstance(nice, int) or not -20 <= nice <= 19:
            raise errors.error(errno.EINVAL, "nice: %r is not in -20..19" % (nice,))
        self._decide(NICE, context, nice, 0, timeout)

    def park(self, context: int, *, timeout: "float | None" = None) -> None:
        """Stop the context outside its critical sections (it may wait up to
        a second for it to leave a share-point lock: EBUSY then)."""
        self._decide(PARK, context, 0, 0, timeout)

    def wake(self, context: int, *, timeout: "float | None" = None) -> None:
        """Continue a context this scheduler parked."""
        self._decide(WAKE, context, 0, 0, timeout)

    def subscribe(self, handler: "Callable[[SchedEvent], object]", index: int = EVENTS_SLOT
                  ) -> None:
        """SCHED_SUBSCRIBE: faytd's scheduling events about every context
        this scheduler's right names (not itself) arrive at notification
        slot `index` as handler(SchedEvent), run at this context's dispatch
        points (notification_wait ...).  On subscribing, a CREATED for each
        context there is; then CREATED, DIED, and BLOCKED/WOKE batched every
        EVENT_DELAY_S.  Needs the scheduler and notify_handlers rights
        (PermissionDenied)."""
        from .notification import runtime, OVERFLOW, DEFAULT_STACKS
        rt = runtime(self.queue._conn)

        def on_event(payload, slot, sender):
            ev = decode_sched_event(payload)
            if ev.event == OVERFLOW:
                ev = SchedEvent(OVERFLOW, 0, 0, 0, int.from_bytes(bytes(payload[12:16]),
                                                                   "little"), 0, 0, 0)
            handler(ev)
            return 0
        rt.install(index, on_event, DEFAULT_STACKS)
        rt.arm()
        self.queue._conn.call(lib.FAYT_SYS_SCHED_SUBSCRIBE, SCHED_SUBSCRIBE.pack(index, 0))
        rt.fetch()
        rt.arm_hint()
        self._events = index

    def unsubscribe(self) -> None:
        """No more events (the handler stays installed)."""
        if self._events is not None:
            self._events = None
            self.queue._conn.call(lib.FAYT_SYS_SCHED_SUBSCRIBE, SCHED_SUBSCRIBE.pack(-1, 0))
