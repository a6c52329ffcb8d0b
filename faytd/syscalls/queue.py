"""QUEUE_OPEN and QUEUE_CLOSE: the user->kernel queues (faytd/queue.py,
docs/queue.md).  Records themselves make no call."""
import errno
import os

from libportal._abi import lib, QUEUE_OPEN, QUEUE_REPLY

from ..frames import KernelError
from ..queue import check_size
from .wire import handle_of, unpack


def sys_queue_open(k, ctx, tid, body, fds):
    size, flags = unpack(QUEUE_OPEN, body, "queue_open")
    if flags:
        raise KernelError(errno.EINVAL, "flags: unknown bits %#x" % flags)
    q = k.queues.open(ctx, check_size(size))
    return (QUEUE_REPLY.pack(q.id, q.size, lib.FAYT_QUEUE_DATA_OFFSET + q.size),
            [q.backing.open_fd(), os.dup(q.efd)])


def sys_queue_close(k, ctx, tid, body, fds):
    qid = handle_of(body)
    if qid >= 1 << 32:
        raise KernelError(errno.ENOENT, "queue %d: this context has no such queue" % qid)
    k.queues.close(k.queues.get(ctx, qid))
    return b"", []
