"""The scheduling interface: a scheduler server's decisions, sent to faytd
through its queue and enforced on the real processes (docs/scheduling.md).

    s = lp.Scheduler()                 # core by default (the scheduler right)
    s.run_on(ctx, {0})                 # every thread of ctx on CPU 0
    s.set_nice(ctx, 10)
    s.park(ctx)                        # stopped, outside its critical sections
    s.wake(ctx)

Each call puts one decision and waits for faytd's result; a decision faytd
refused raises its errno (PermissionDenied, NoSuchContext, ...), it is never
a silent no-op.  put() and result() split the two.
"""
import errno
import os
from typing import Iterable

from . import errors
from ._abi import lib, SCHED_DECISION
from .queue import queue_open
from .syscall import Connection

CPUS = lib.FAYT_QREC_SCHED_CPUS
NICE = lib.FAYT_QREC_SCHED_NICE
PARK = lib.FAYT_QREC_SCHED_PARK
WAKE = lib.FAYT_QREC_SCHED_WAKE
_NAMES = {CPUS: "run_on", NICE: "set_nice", PARK: "park", WAKE: "wake"}


class Scheduler:
    """A scheduler's queue to faytd, and its decisions."""

    def __init__(self, size: int = 0, *, connection: "Connection | None" = None) -> None:
        self.queue = queue_open(size, connection=connection)
        self._what = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """The queue goes, and with the connection's end faytd undoes this
        scheduler's decisions (docs/scheduling.md, Failure)."""
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
