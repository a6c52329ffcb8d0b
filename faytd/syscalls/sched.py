"""SCHED_SUBSCRIBE: a scheduler's events (faytd/schedevents.py,
docs/scheduling.md "Events").  Decisions themselves go through a queue
(syscalls/queue.py)."""
import errno

from libportal._abi import SCHED_SUBSCRIBE

from ..frames import KernelError
from .wire import unpack


def sys_sched_subscribe(k, ctx, tid, body, fds):
    index, flags = unpack(SCHED_SUBSCRIBE, body, "sched_subscribe")
    if flags:
        raise KernelError(errno.EINVAL, "flags: unknown bits %#x" % flags)
    if index < 0:
        k.scheduling.events.unsubscribe(ctx)
    else:
        k.scheduling.events.subscribe(ctx, index)
    return b"", []
