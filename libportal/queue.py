"""The user->kernel queue: records from this context to faytd, with no
system call a record (docs/queue.md).

    q = lp.queue_open()                  # QUEUE_OPEN: a 64 KiB ring
    q.put(b"sixteen bytes...")           # one record
    q.put_many([b"a" * 16] * 100)        # a batch, published once
    q.close()                            # faytd drains what is published

A queue has one producer: this process, one thread at a time (a put that
cannot wait is one C call made with the GIL held; one that may wait holds
the Queue's lock, and the C calls of other threads step aside meanwhile).
faytd is woken (the queue's eventfd) only when it said it sleeps.  put and put_many wait for space as their timeout
says: None (the default) for ever, 0 never (WouldBlock when full), else at
most that many seconds (TimedOut).  A queue faytd dropped for a bad record
raises ProtocolError (EPROTO); a closed one BrokenPipeError (EPIPE).  A
wait (for space, or for a decision's result) looks every LIVENESS_S whether
faytd is still there: a killed faytd marks nothing in the queue, so its
connection closing says it (DaemonUnavailable).
"""
import errno
import mmap
import os
import select
import threading
import time
from typing import Iterable

from . import errors
from ._abi import ffi, lib, QUEUE_OPEN, QUEUE_REPLY, HANDLE_REQ, _fastpath
from .syscall import Connection, connection as _default_connection
from ._types import Buffer

DATA = lib.FAYT_QREC_DATA
PAYLOAD_MAX = lib.FAYT_QUEUE_PAYLOAD_MAX
LIVENESS_S = 0.5        # a long wait looks this often whether faytd is still there


def _ns(deadline):
    """A C timeout from a deadline: -1 for ever, else ns left (>= 0)."""
    if deadline is None:
        return -1
    return max(0, int((deadline - time.monotonic()) * 1e9))


class Queue:
    """One queue from this context to faytd (queue_open makes it)."""

    def __init__(self, conn: Connection, qid: int, size: int, fd: int, efd: int,
                 length: int) -> None:
        self.id = qid
        self.size = size
        self._conn = conn
        self._efd = efd
        try:
            self._map = mmap.mmap(fd, length)
        finally:
            os.close(fd)
        self._q = ffi.from_buffer(self._map)
        # the one binding of fayt_queue_put; it keeps the last record's seq
        self._producer = _fastpath.QueueProducer(int(ffi.cast("uintptr_t", self._q)), efd=efd)
        self._fast_put = self._producer.put
        self._err = ffi.new("int32_t *")
        self._lock = threading.Lock()

    def __repr__(self):
        return "<Queue %d, %d bytes%s>" % (self.id, self.size, "" if self._q else ", closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check(self):
        if self._q is None:
            raise errors.error(errno.EBADF, "queue %d: closed" % self.id)

    def _raise(self, r, what):
        msgs = {
            errno.EAGAIN: "%s: queue %d is full" % (what, self.id),
            errno.ETIMEDOUT: "%s: queue %d stayed full until the timeout" % (what, self.id),
            errno.EPROTO: "%s: faytd dropped queue %d (a bad record), or its header is "
                          "corrupt" % (what, self.id),
            errno.EPIPE: "%s: queue %d is closed" % (what, self.id),
            errno.ECONNRESET: "%s: faytd connection lost (queue %d went with it)"
                              % (what, self.id),
        }
        if r == errno.EPIPE:
            return BrokenPipeError(r, msgs[r])
        if r == errno.ECONNRESET:
            return errors.DaemonUnavailable(r, msgs[r])
        return errors.error(r, msgs.get(r, "%s: %s" % (what, os.strerror(r))))

    def _put_raw(self, type_, buf, length, n, timeout, what):
        """Put n records of `length` bytes from buf; returns the first seq."""
        timeout = errors.check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._check()
            view = memoryview(buf).cast("B")
            first = None
            done = 0
            while True:
                now = time.monotonic()
                step = (now + LIVENESS_S if deadline is None
                        else min(deadline, now + LIVENESS_S))
                r, put, at = self._producer.put_raw(type_, view[done * length:], length,
                                                    n - done, 0 if timeout == 0 else
                                                    _ns(step))
                if first is None:
                    first = at
                done += put
                if r == errno.EINTR:
                    continue                    # the handlers ran: the rest
                if r == errno.ETIMEDOUT and (deadline is None or step < deadline):
                    if not self._faytd_gone():
                        continue                # still full: wait on
                    r = errno.ECONNRESET
                if r:
                    e = self._raise(r, what)
                    e.put = done
                    raise e
                return first

    def put(self, payload: "Buffer", *, timeout: "float | None" = None) -> None:
        """Put one record (bytes-like, 0..PAYLOAD_MAX bytes)."""
        if timeout is None:
            try:
                if not self._fast_put(payload):
                    return              # the common case: one C call that never waits
            except BufferError:
                pass                    # not contiguous: _nbytes says so
        n = _nbytes(payload, "payload")
        if n > PAYLOAD_MAX:
            raise errors.error(errno.EINVAL, "payload: %d bytes; at most %d" % (n, PAYLOAD_MAX))
        self._put_raw(DATA, payload, n, 1, timeout, "put")

    def put_many(self, payloads: "Iterable[Buffer]", *,
                 timeout: "float | None" = None) -> None:
        """Put records of one length, in order, in one call: each is published
        as soon as it is written, so faytd drains a long batch as it goes.
        payloads: a sequence of bytes-like of one length.  On an error the
        exception's `put` says how many were put."""
        payloads = list(payloads)
        if not payloads:
            return
        n = _nbytes(payloads[0], "payloads[0]")
        if n > PAYLOAD_MAX:
            raise errors.error(errno.EINVAL, "payloads: %d bytes; at most %d" % (n, PAYLOAD_MAX))
        for i, p in enumerate(payloads):
            m = _nbytes(p, "payloads[%d]" % i)
            if m != n:
                raise errors.error(errno.EINVAL, "payloads[%d]: %d bytes, not %d like "
                                   "payloads[0]" % (i, m, n))
        self._put_raw(DATA, b"".join(payloads), n, len(payloads), timeout, "put_many")

    def put_decision(self, type_: int, payload: "Buffer", *,
                     timeout: "float | None" = None) -> int:
        """A decision record (libportal.sched builds them); returns its seq."""
        return self._put_raw(type_, payload, _nbytes(payload, "payload"), 1, timeout,
                             "decision")

    def _faytd_gone(self):
        """Whether faytd closed this queue's connection (it was killed: a
        killed faytd marks nothing in the queue).  One poll(2), no wait."""
        if self._conn.closed:
            return True
        try:
            p = select.poll()
            p.register(self._conn.sock, select.POLLRDHUP)
            return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
                       for _, ev in p.poll(0))
        except (OSError, ValueError):
            return True

    def result(self, seq: int, *, timeout: "float | None" = None) -> int:
        """The errno faytd answered decision seq with (0: applied).  A faytd
        that dies meanwhile is DaemonUnavailable (looked at every
        LIVENESS_S of the wait)."""
        timeout = errors.check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        self._check()
        while True:
            now = time.monotonic()
            step = now + LIVENESS_S if deadline is None else min(deadline, now + LIVENESS_S)
            r = lib.fayt_queue_wait_result(self._q, seq, _ns(step), self._err)
            if r == errno.ETIMEDOUT and (deadline is None or step < deadline):
                if self._faytd_gone():
                    raise errors.DaemonUnavailable(
                        errno.ECONNRESET, "decision %d: faytd connection lost (queue %d "
                        "went with it)" % (seq, self.id))
                continue
            if r == errno.EINTR:
                continue
            if r == errno.ENOENT:
                raise errors.error(r, "decision %d: its result was overwritten (more than %d "
                                   "decisions outstanding)" % (seq, lib.FAYT_QUEUE_RESULTS))
            if r == errno.ETIMEDOUT:
                raise errors.error(r, "decision %d: no result before the timeout" % seq)
            if r:
                raise self._raise(r, "decision %d" % seq)
            return self._err[0]

    def stats(self) -> "dict[str, int]":
        """What the header says: {"records": drained, "head", "tail", "state"}."""
        self._check()
        h = ffi.cast("struct fayt_queue_header *", self._q)
        return {"records": h.records, "head": h.head, "tail": h.tail, "state": h.state}

    def close(self) -> None:
        """QUEUE_CLOSE: faytd drains what is published, then drops the queue."""
        with self._lock:
            if self._q is None:
                return
            h = ffi.cast("struct fayt_queue_header *", self._q)
            gone = h.state != lib.FAYT_QUEUE_OPEN       # faytd dropped or closed it already
            self._producer.close()                      # before the unmap
            buf, self._q, h = self._q, None, None
            ffi.release(buf)                            # views made of it die with it
            try:
                if not gone and not self._conn.closed:
                    self._conn.call(lib.FAYT_SYS_QUEUE_CLOSE, HANDLE_REQ.pack(self.id))
            finally:
                os.close(self._efd)
                self._map.close()


def _nbytes(payload, what):
    """The bytes of a bytes-like payload (not its len(): an array of uint32
    has four a item); EINVAL if they are not contiguous."""
    try:
        m = memoryview(payload)
    except TypeError:
        raise TypeError("%s: a bytes-like object is required, not %s"
                        % (what, type(payload).__name__)) from None
    with m:
        if not m.contiguous:
            raise errors.error(errno.EINVAL, "%s: a buffer that is not contiguous (copy it: "
                               "bytes(...))" % what)
        return m.nbytes


def queue_open(size: int = 0, *, connection: "Connection | None" = None) -> Queue:
    """QUEUE_OPEN: a queue from this connection's context to faytd of `size`
    ring bytes (0: 64 KiB; else a power of two from 4 KiB to 16 MiB)."""
    conn = connection or _default_connection()
    body, fds = conn.call(lib.FAYT_SYS_QUEUE_OPEN, QUEUE_OPEN.pack(size, 0))
    if len(fds) != 2 or len(body) != QUEUE_REPLY.size:
        for fd in fds:
            os.close(fd)
        raise errors.error(errno.EPROTO, "queue_open: malformed reply from faytd")
    qid, size, length = QUEUE_REPLY.unpack(body)
    return Queue(conn, qid, size, fds[0], fds[1], length)
