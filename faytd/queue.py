"""Queues: the user->kernel queues, one producer context each, faytd the consumer.

Linux facts it relies on:
- An eventfd is a counter a write bumps and a read clears; epoll reports it
  readable while it is not 0.  The producer writes it only when faytd said
  it sleeps (fayt/queue.h), so a busy queue costs no system call a record.
- The object is a sealed memfd from the keeper (frames.BackingObject): the
  producer can write every byte but cannot change its size.

faytd drains a queue when its eventfd is readable, up to FAYT_QUEUE_BUDGET
records a round (libportal/src/queue.c, in C).  If records are left, faytd
writes the eventfd itself: the queue is drained again on a later turn of
the loop, after the other ready descriptors, so a producer that never stops
cannot hold faytd.  The first bad record drops the queue (EPROTO to its
producer, logged with what was wrong); the others go on.  Decisions
(FAYT_QREC_SCHED_*) go to the Scheduling object (sched.py), whose answer
is written back as the record's result.  A queue goes with its producer's
connection (QUEUE_CLOSE, disconnect, death): what was published is drained
first, nothing more is read.  Nothing of a queue is journaled: after a
faytd restart a producer opens a new queue (docs/queue.md).
"""
import errno
import logging
import os

from libportal._abi import ffi, lib

from .context import uncount
from .frames import BackingObject, KernelError, PAGE

log = logging.getLogger("faytd")

_OUT = 256                      # decisions one drain call hands back


class Queue:
    __slots__ = ("id", "ctx", "size", "backing", "map", "buf", "c", "efd", "closed",
                 "decisions")

    def __init__(self, qid, ctx, size, tag):
        self.id = qid
        self.ctx = ctx
        self.size = size
        self.backing = BackingObject(0, tag + ".queue", lib.FAYT_QUEUE_DATA_OFFSET + size, [])
        self.map = self.backing.map()
        self.c = ffi.new("struct fayt_queue_consumer *")
        self.buf = ffi.from_buffer(self.map)
        self.c.q = self.buf
        self.c.size = size
        lib.fayt_queue_init(self.c.q, size, qid, ctx.id)
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.closed = False
        self.decisions = 0

    def close(self, state):
        if self.closed:
            return
        self.closed = True
        lib.fayt_queue_kill(self.c, state)
        os.close(self.efd)
        self.c.q = ffi.NULL
        self.c = None
        ffi.release(self.buf)
        self.buf = None
        self.map.close()
        self.backing.release()


class Queues:
    def __init__(self, kernel):
        self.k = kernel
        self.by_id = {}
        self.by_ctx = {}            # context id -> set of queue ids
        self.per_uid = {}
        self._next = 1
        self._out = ffi.new("struct fayt_queue_decision[]", _OUT)
        self._nout = ffi.new("uint32_t *")
        self.records = 0            # drained, every queue
        self.dropped = 0            # queues dropped for a bad record

    def open(self, ctx, size):
        k = self.k
        held = self.per_uid.get(ctx.uid, 0)
        limit = k.cfg["max_queues_per_uid"]
        if not ctx.is_core and held >= limit:
            raise KernelError(errno.ENOSPC, "uid %d holds %d queues, its limit (config "
                              "max_queues_per_uid)" % (ctx.uid, held))
        q = Queue(self._next, ctx, size, k.frames.tag)
        self._next += 1
        self.by_id[q.id] = q
        self.by_ctx.setdefault(ctx.id, set()).add(q.id)
        self.per_uid[ctx.uid] = held + 1
        k.server.watch_fd(q.efd, lambda fd, ev, q=q: self._on_ready(q))
        return q

    def get(self, ctx, qid):
        q = self.by_id.get(qid)
        if q is None or q.ctx is not ctx:
            raise KernelError(errno.ENOENT, "queue %d: this context has no such queue" % qid)
        return q

    def close(self, q, state=lib.FAYT_QUEUE_CLOSED, why=None):
        """Drain what is published (a CLOSED queue), then drop q."""
        if q.closed or self.by_id.get(q.id) is not q:
            return
        if state == lib.FAYT_QUEUE_CLOSED:
            self._drain(q, final=True)
            if q.closed:
                return                          # dropped by a bad record meanwhile
        del self.by_id[q.id]
        ids = self.by_ctx.get(q.ctx.id)
        if ids is not None:
            ids.discard(q.id)
            if not ids:
                del self.by_ctx[q.ctx.id]
        uncount(self.per_uid, q.ctx.uid)
        if self.k.server is not None:
            self.k.server.unwatch_fd(q.efd)
        q.close(state)
        if why:
            log.warning("queue %d of pid %d dropped: %s", q.id, q.ctx.pid, why)

    def _on_ready(self, q):
        try:
            os.eventfd_read(q.efd)
        except BlockingIOError:
            pass
        self._drain(q)

    def _drain(self, q, final=False):
        """One round: at most FAYT_QUEUE_BUDGET records; if records are left,
        ask for another round (the eventfd) unless final."""
        budget = lib.FAYT_QUEUE_BUDGET
        while not q.closed:
            before = q.c.records
            r = lib.fayt_queue_drain(q.c, budget, self._out, _OUT, self._nout)
            taken = q.c.records - before
            self.records += taken
            budget -= min(budget, taken)
            n = self._nout[0]
            if n:
                self._decide(q, n)
            if r == errno.EPROTO:
                self.dropped += 1
                self.close(q, lib.FAYT_QUEUE_DROPPED, "EPROTO at position %d: %s"
                           % (q.c.bad_at, ffi.string(q.c.why).decode("utf-8", "replace")))
                return
            if r == 0:
                if final or not lib.fayt_queue_sleep(q.c):
                    return
                continue                        # a record came as faytd went to sleep
            if budget == 0 or final:            # left for a later round
                if not final:
                    os.eventfd_write(q.efd, 1)
                return

    def _decide(self, q, n):
        out = self._out
        sched = self.k.scheduling
        for i in range(n):
            d = out[i]
            q.decisions += 1
            err = sched.apply(q.ctx, q, d.seq, d.type, d.d.context, d.d.value, d.d.cpus)
            if err is not None:
                self.result(q, d.seq, err)

    @staticmethod
    def result(q, seq, err):
        """Write decision seq's result into q (a later one: a park)."""
        if not q.closed:
            lib.fayt_queue_result(q.c, seq, err)

    def context_gone(self, ctx):
        for qid in list(self.by_ctx.get(ctx.id, ())):
            q = self.by_id.get(qid)
            if q is not None:
                self.close(q)

    def shutdown(self):
        for q in list(self.by_id.values()):
            self.close(q)

    def count(self):
        return len(self.by_id)


def check_size(size):
    """QUEUE_OPEN's size: 0 is the default; else a power of two in range."""
    if size == 0:
        return lib.FAYT_QUEUE_SIZE_DEFAULT
    if (size & (size - 1) or not lib.FAYT_QUEUE_SIZE_MIN <= size <= lib.FAYT_QUEUE_SIZE_MAX):
        raise KernelError(errno.EINVAL, "size: %d is not a power of two in %d..%d"
                          % (size, lib.FAYT_QUEUE_SIZE_MIN, lib.FAYT_QUEUE_SIZE_MAX))
    assert lib.FAYT_QUEUE_DATA_OFFSET == PAGE
    return size
