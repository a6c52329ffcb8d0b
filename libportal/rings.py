"""Rings and notification stacks: the shared memory a notification lives in.

The facts this relies on, and what follows:
- A ring (fayt/notification.h) is shared memory between one sender and one
  target, made by faytd once per pair: the sender gets it from
  FAYT_SYS_NOTIFY_OPEN (Ring.open), the target from FAYT_SYS_NOTIFY_FETCH
  (Ring.fetch).  Posting, waiting for a return and returning are C calls
  on it (src/ring.c; a sender's through its _fastpath.SenderRing,
  Ring.port): faytd is not involved once the ring exists.
- A ring is written by both sides, so neither trusts the other's words.
  The ids kept here (sender, target, target_pid) are faytd's record from
  its reply, never the ring's header.  The sender's C checks every word it
  reads against the protocol (EPROTO: the ring is forgotten) and bounds its
  waits by the deadline; the target keeps its read position here (Ring.tail,
  never the header's), checks each entry, and gives a ring with an entry
  out of range back to faytd (RELEASE: its sender gets EPROTO).
- A sender also maps the target's pending hint (Ring.hint: a word that
  every post bumps, see dispatch.py) and signals the doorbell through a
  pidfd of the pid faytd named, when the kernel lets it.
- A notification stack is a real region from the stack-alloc system call
  (Stack.alloc): the dispatcher writes the frame (struct
  fayt_notification_frame) and the payload at its base.
"""
import errno
import os
import signal
import time

from . import errors
from ._abi import (ffi, lib, HANDLE_REQ, LIST_REQ, NOTIFY_OPEN, RING_REPLY, STACK_REQ,
                   STACK_REPLY, _fastpath)

IMMEDIATE = lib.FAYT_NOTIFY_IMMEDIATE
RETURN = lib.FAYT_NOTIFY_RETURN
NOWAIT = lib.FAYT_NOTIFY_NOWAIT
SLOTS = lib.FAYT_NOTIFICATION_SLOTS
PAYLOAD_MAX = lib.FAYT_NOTIFY_PAYLOAD_MAX
KERNEL = lib.FAYT_SENDER_KERNEL
DOORBELL = signal.SIGRTMIN + lib.FAYT_DOORBELL_SIGRTMIN_OFFSET
POSTED_RING = lib.FAYT_RING_POSTED_RING     # fayt_ring_post: posted, the doorbell not rung
NO_HANDLER = lib.FAYT_STATUS_NO_HANDLER     # an entry's status: the slot has no handler

_RW = lib.FAYT_PROT_READ | lib.FAYT_PROT_WRITE


def map_object(fd, length):
    """Map a notification object faytd sent (fd: closed here); its address."""
    err = ffi.new("int *")
    try:
        addr = lib.fayt_map(fd, length, 0, _RW, err)
    finally:
        os.close(fd)
    if not addr:
        raise errors.error(err[0], "cannot map a notification object")
    return addr


def wait_ns(deadline):
    """What the C waits take: nanoseconds left until `deadline`, -1 for none."""
    if deadline is None:
        return -1
    return max(0, int((deadline - time.monotonic()) * 1e9))


def deadline_of(timeout):
    """The monotonic deadline of `timeout` (errors.check_timeout's rule), or
    None: wait for ever."""
    t = errors.check_timeout(timeout)
    return None if t is None else time.monotonic() + t


class Ring:
    """One ring, mapped: a sender's (with its target's hint and pidfd) or a
    target's (with its read position, tail)."""

    __slots__ = ("id", "sender", "target", "target_pid", "addr", "length", "ptr", "pidfd",
                 "gone", "hint", "port", "tail")

    def __init__(self, reply, fd, hint_fd=-1):
        # faytd's reply: the ids here are its record, not the ring's words.
        self.id, self.sender, self.target, self.target_pid, self.length = reply
        self.hint = 0
        self.port = None        # a sender's: _fastpath.SenderRing, once open() set it up
        self.tail = None        # a target's: its consumer position (never the header's)
        try:
            self.addr = map_object(fd, self.length)
        except BaseException:
            if hint_fd >= 0:
                os.close(hint_fd)
            raise
        self.ptr = ffi.cast("void *", self.addr)
        self.pidfd = -1
        self.gone = False
        if hint_fd >= 0:        # a sender's: the target's pending hint
            try:
                self.hint = map_object(hint_fd, lib.FAYT_HINT_BYTES)
            except BaseException:
                self.close()
                raise

    @classmethod
    def open(cls, conn, target):
        """The sender's ring into context `target` (FAYT_SYS_NOTIFY_OPEN:
        faytd checks the policy, EPERM/ESRCH)."""
        body, fds = conn.call(lib.FAYT_SYS_NOTIFY_OPEN, NOTIFY_OPEN.pack(target, 0))
        for fd in fds[2:]:
            os.close(fd)
        r = cls(RING_REPLY.unpack(body), fds[0], fds[1] if len(fds) > 1 else -1)
        # The doorbell goes through a pidfd of the pid faytd named (never
        # the ring's target_pid, which the target can write), and only if
        # the kernel lets us signal it (signal 0 asks): else, another
        # uid, faytd rings it for us (FAYT_SYS_NOTIFY_RING).
        try:
            r.pidfd = os.pidfd_open(r.target_pid)
            signal.pidfd_send_signal(r.pidfd, 0)
        except OSError:
            if r.pidfd >= 0:
                os.close(r.pidfd)
            r.pidfd = -1
        # The sender's end (post, wait for the return): what every post
        # into this ring passes, given once.
        r.port = _fastpath.SenderRing(r.addr, sender=conn.context_id, pidfd=r.pidfd,
                                      signo=DOORBELL, hint=r.hint)
        r.port.page = conn.context_page     # its sleeps count in our wait record
        return r

    @classmethod
    def fetch(cls, conn, after):
        """One page of the rings faytd made into this context with ids above
        `after` (FAYT_SYS_NOTIFY_FETCH), mapped, each with its own read
        position (tail); [] when there are no more."""
        body, fds = conn.call(lib.FAYT_SYS_NOTIFY_FETCH, LIST_REQ.pack(after))
        n = len(body) // RING_REPLY.size
        rings = []
        try:
            for i in range(n):
                r = cls(RING_REPLY.unpack_from(body, i * RING_REPLY.size), fds[i])
                r.tail = ffi.new("uint32_t *")     # a fresh ring starts at 0
                rings.append(r)
        except BaseException:       # none kept: the next fetch asks for them again
            for r in rings:
                r.close()
            for fd in fds[len(rings) + 1:]:
                os.close(fd)
            raise
        for fd in fds[n:]:
            os.close(fd)
        return rings

    @property
    def header(self):
        return ffi.cast("struct fayt_ring_header *", self.addr)

    def close(self):
        if self.port is not None:
            self.port.close()       # before the unmap: its calls answer EBADF from here
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self.addr:
            lib.fayt_unmap(self.addr, self.length)
            self.addr, self.ptr = 0, ffi.NULL
        if self.hint:
            lib.fayt_unmap(self.hint, lib.FAYT_HINT_BYTES)
            self.hint = 0


class Stack:
    """A notification stack, mapped: its context-page record, faytd's handle."""

    __slots__ = ("record", "handle", "size", "addr", "frame", "view")

    def __init__(self, record, handle, size, addr):
        self.record, self.handle, self.size, self.addr = record, handle, size, addr
        self.frame = ffi.cast("struct fayt_notification_frame *", addr)
        self.view = memoryview(ffi.buffer(ffi.cast("char *", addr), size))

    @classmethod
    def alloc(cls, conn, size=0):
        """FAYT_SYS_NOTIFY_STACK_ALLOC of `size` bytes (a page multiple; 0: one
        page), mapped; given back to faytd if it cannot be mapped."""
        if not isinstance(size, int):
            raise TypeError("size: must be an int (bytes), not %s" % type(size).__name__)
        if not 0 <= size <= 0xffffffff:
            raise errors.error(errno.EINVAL, "size: %d; a notification stack is a multiple of "
                               "%d bytes up to %d" % (size, lib.FAYT_PAGE_SIZE, 1 << 20))
        body, fds = conn.call(lib.FAYT_SYS_NOTIFY_STACK_ALLOC, STACK_REQ.pack(size, 0))
        handle, size, rec = STACK_REPLY.unpack(body)
        try:
            addr = map_object(fds[0], size)
        except BaseException:
            conn.call(lib.FAYT_SYS_NOTIFY_STACK_FREE, HANDLE_REQ.pack(handle))
            raise
        return cls(rec, handle, size, addr)

    def free(self, conn):
        """FAYT_SYS_NOTIFY_STACK_FREE, then unmap (a refusal leaves it mapped)."""
        conn.call(lib.FAYT_SYS_NOTIFY_STACK_FREE, HANDLE_REQ.pack(self.handle))
        self.close()

    def close(self):
        self.view.release()
        lib.fayt_unmap(self.addr, self.size)
