"""Emulated devices: a device model serves a window, a driver drives it
(docs/devices.md).

register_device(name) -> DeviceModel: the window's register page and data
area (mmaps), serve() to take the driver's register accesses, irq().
attach_device(name, index, handler) -> Device: read32/write32/read64/write64
through the driver's ring, map() the window with DIRECT, the interrupt as a
notification at slot `index` calling handler(count).

Both sides validate every word the other writes, at every read, and bound
every wait (timeout: ETIMEDOUT).
"""
import errno
import mmap
import os
import select
import struct
import threading
import time
from typing import Callable, Sequence

from . import errors
from ._abi import ffi, lib, DEV_REQ, DEV_REPLY
from .portal import Portal
from .syscall import Connection, connection as _default_connection
from ._types import Name

PAGE = 4096
N = lib.FAYT_DEV_RING_ENTRIES
ENTRY = struct.Struct("<IIQ")
W32, W64, R32, R64 = (lib.FAYT_DEV_OP_WRITE32, lib.FAYT_DEV_OP_WRITE64,
                      lib.FAYT_DEV_OP_READ32, lib.FAYT_DEV_OP_READ64)
SIZE = {W32: 4, R32: 4, W64: 8, R64: 8}
SERVED, DEAD = lib.FAYT_DEV_STATE_SERVED, lib.FAYT_DEV_STATE_DEAD
# Byte offsets of the words of the driver's ring, the model's page and
# faytd's state page, from their structs (fayt/device.h).
HEAD, IRQ_SEEN, ENTRIES = (ffi.offsetof("struct fayt_dev_ring", f)
                           for f in ("head", "irq_seen", "entries"))
TAIL, ANSWER_SEQ, ANSWER = (ffi.offsetof("struct fayt_dev_model_page", f)
                            for f in ("tail", "answer_seq", "answer"))
STATE, GENERATION, RAISED, MODEL, DRIVER = (
    ffi.offsetof("struct fayt_dev_state_page", f)
    for f in ("state", "generation", "irq_raised", "model", "driver"))
_FENCE = threading.Lock()       # acquire+release: a locked instruction, a full barrier


def _fence():
    _FENCE.acquire()
    _FENCE.release()


def _req(index=0, cookie=0, window=0, name=b""):
    return DEV_REQ.pack(0, index, cookie, window, 0) + name


def _name(name):
    b = name.encode() if isinstance(name, str) else bytes(name)
    if not 1 <= len(b) <= 31:
        raise errors.error(errno.EINVAL, "name: %r: 1 to 31 bytes" % (name,))
    return b


def _left_ns(deadline):
    """What a C wait takes: the nanoseconds left until the deadline (>= 0)."""
    return max(0, int((deadline - time.monotonic()) * 1e9))


def _wait(fd, deadline):
    """Sleep on an eventfd until written or the deadline: False if it passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        return False
    r, _, _ = select.select([fd], [], [], left)
    if r:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
    return True


class _Window:
    def __init__(self, conn: Connection, data: bytes) -> None:
        self.connection = conn
        self.base, self.size, self.id, self.generation = DEV_REPLY.unpack_from(data)

    def _map(self, fd, write):
        return mmap.mmap(fd, PAGE, mmap.MAP_SHARED,
                         mmap.PROT_READ | (mmap.PROT_WRITE if write else 0))

    def _views(self, *names):
        """64-bit word views of the shared pages: one aligned 8-byte load or
        store each (struct.pack_into writes a byte at a time: a peer could
        read a torn count)."""
        for n in names:
            setattr(self, "_w_" + n, memoryview(getattr(self, n)).cast("Q"))

    def _release(self, maps):
        for n in list(vars(self)):
            if n.startswith(("_w_", "_r32", "_r64")):
                getattr(self, n).release()
        for m in maps:
            m.close()

    def _state(self):
        return self._w_state[STATE // 8]


class DeviceModel(_Window):
    """The model's side of a window: .regs (the register page, read-write),
    .data (the data area), serve(), irq(); on_write(offset, size, value) and
    on_read(offset, size) -> value may be set (default: the register page)."""

    def __init__(self, conn: Connection, data: bytes, fds: "Sequence[int]") -> None:
        _Window.__init__(self, conn, data)
        try:
            self.regs = self._map(fds[0], True)
            dsize = os.fstat(fds[1]).st_size
            self.data = mmap.mmap(fds[1], dsize)
            self.ring = self._map(fds[2], False)
            self.mine = self._map(fds[3], True)
            self.state = self._map(fds[4], False)
            self.ev_model, self.ev_driver = fds[5], fds[6]
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in fds[:5]:
            os.close(fd)
        self._views("ring", "mine", "state")
        self._r32 = memoryview(self.regs).cast("I")
        self._r64 = memoryview(self.regs).cast("Q")
        self.on_write = None
        self.on_read = None
        self.bad_entries = 0        # entries refused (bad op or offset)
        self.broken = False         # the driver's head went out of range

    def set32(self, offset: int, value: int) -> None:
        """Store the 32-bit register at `offset` of the register page."""
        self._r32[offset // 4] = value & 0xffffffff

    def set64(self, offset: int, value: int) -> None:
        """Store the 64-bit register at `offset` of the register page."""
        self._r64[offset // 8] = value & (1 << 64) - 1

    @property
    def driver(self) -> int:
        """The context id of the window's driver (0: none), from faytd's
        state page: what the model mapped of a driver's RAM is that one's."""
        return self._w_state[DRIVER // 8]

    def get32(self, offset: int) -> int:
        """The 32-bit register at `offset` of the register page."""
        return self._r32[offset // 4]

    def get64(self, offset: int) -> int:
        """The 64-bit register at `offset` of the register page."""
        return self._r64[offset // 8]

    def serve(self, timeout: float = 0) -> int:
        """Take every entry the driver posted (waiting up to timeout seconds
        for the first): the writes in order, each read answered.  Returns
        how many were taken."""
        deadline = time.monotonic() + timeout
        while True:
            n = self._take()
            if n or not _wait(self.ev_model, deadline):
                return n

    def _take(self):
        tail = self._w_mine[TAIL // 8]
        head = self._w_ring[HEAD // 8]
        if head == tail:
            return 0
        if not tail < head <= tail + N:
            self.broken = True      # the driver scribbled on its head
            raise errors.error(errno.EPROTO, "device %d: the driver's ring head %d is out of "
                               "range (tail %d, %d entries)" % (self.id, head, tail, N))
        answered = False
        full = head - tail == N
        for pos in range(tail, head):
            op, off, value = ENTRY.unpack_from(self.ring, ENTRIES + (pos % N) * ENTRY.size)
            size = SIZE.get(op)
            if size is None or off % size or off + size > PAGE:
                self.bad_entries += 1
                if op in (R32, R64):
                    self._answer(pos, 0)
                    answered = True
                continue
            if op in (W32, W64):
                value &= (1 << 8 * size) - 1
                if self.on_write is not None:
                    self.on_write(off, size, value)
                else:
                    (self.set32 if size == 4 else self.set64)(off, value)
            else:
                v = self.on_read(off, size) if self.on_read is not None else \
                    (self.get32 if size == 4 else self.get64)(off)
                self._answer(pos, v)
                answered = True
            self._w_mine[TAIL // 8] = pos + 1
        self._w_mine[TAIL // 8] = head
        if answered or full:
            os.eventfd_write(self.ev_driver, 1)
        return head - tail

    def _answer(self, pos, value):
        self._w_mine[ANSWER // 8] = value       # the value, then the count naming it
        self._w_mine[ANSWER_SEQ // 8] = pos + 1

    def irq(self) -> None:
        """Raise the window's interrupt (faytd delivers or coalesces it)."""
        self.connection.call(lib.FAYT_SYS_DEV_IRQ, _req(window=self.id))

    def close(self) -> None:
        """Stop serving (DEV_DETACH) and unmap."""
        try:
            self.connection.call(lib.FAYT_SYS_DEV_DETACH, _req(window=self.id))
        except OSError:
            pass
        self._release((self.regs, self.data, self.ring, self.mine, self.state))
        for fd in (self.ev_model, self.ev_driver):
            os.close(fd)


class Device(_Window):
    """The driver's side of a window: register accessors, map(), and the
    interrupt (handler(count) at notification slot index)."""

    def __init__(self, conn: Connection, data: bytes, fds: "Sequence[int]",
                 timeout: float) -> None:
        _Window.__init__(self, conn, data)
        try:
            self.ring = self._map(fds[0], True)
            self.theirs = self._map(fds[1], False)
            self.state = self._map(fds[2], False)
            self.ev_model, self.ev_driver = fds[3], fds[4]
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in fds[:3]:
            os.close(fd)
        self._views("ring", "theirs", "state")
        self.timeout = timeout
        # The accessors are fayt/device.h's, in C: their state is a struct
        # fayt_dev_driver over this process's mappings.
        self._bufs = [ffi.from_buffer(m) for m in (self.ring, self.theirs, self.state)]
        self._d = d = ffi.new("struct fayt_dev_driver *")
        d.ring = ffi.cast("struct fayt_dev_ring *", self._bufs[0])
        d.model = ffi.cast("struct fayt_dev_model_page *", self._bufs[1])
        d.state = ffi.cast("struct fayt_dev_state_page *", self._bufs[2])
        d.ev_model, d.ev_driver = self.ev_model, self.ev_driver
        d.head = self._w_ring[HEAD // 8]
        d.tail = self._w_theirs[TAIL // 8]
        self._out = ffi.new("uint64_t *")
        self.seen = self._w_ring[IRQ_SEEN // 8]
        self.handler = None
        self.irqs = 0               # interrupts taken in all
        self._lock = threading.Lock()

    # -- DIRECT -------------------------------------------------------------
    def map(self, prot: int, offset: int = 0, length: "int | None" = None) -> Portal:
        """A DIRECT portal over the window (or `length` bytes of it from
        `offset`): the register page read-only whatever prot."""
        from .portal import portal, DIRECT
        length = self.size - offset if length is None else length
        paddr = [self.base + offset + i * PAGE for i in range(length // PAGE)]
        return portal(DIRECT, prot, length, paddr=paddr, connection=self.connection)

    # -- registers ----------------------------------------------------------
    @property
    def head(self) -> int:
        """Entries this driver posted (its ring's head)."""
        return self._d.head if self._d is not None else 0

    @head.setter
    def head(self, value: int) -> None:
        self._d.head = value

    @property
    def model(self) -> int:
        """The context id of the model serving the window (0: none), from
        faytd's state page: the context to grant DMA-able RAM to."""
        return self._w_state[MODEL // 8] if self._d is not None else 0

    @property
    def tail(self) -> int:
        """The model's tail when this driver last read it."""
        return self._d.tail if self._d is not None else 0

    def _fail(self, r, offset, reading):
        if r == errno.ENODEV:
            return errors.error(r, "device %d: its device model is gone" % self.id)
        if r == errno.EPROTO:
            return errors.error(r, "device %d: the model's tail %d is out of range (%d..%d)"
                                % (self.id, self._w_theirs[TAIL // 8], self._d.tail,
                                   self._d.head))
        if r == errno.ETIMEDOUT:
            return errors.error(r, "device %d: no answer to a read of offset %#x within %gs"
                                % (self.id, offset, self.timeout) if reading else
                                "device %d: the ring stayed full" % self.id)
        return errors.error(r, "device %d: %s" % (self.id, os.strerror(r)))

    def _access(self, op, offset, value):
        """One register access through fayt_dev_post (and fayt_dev_answer for
        a read), the GIL released while it waits; a signal ends a wait with
        EINTR, its handlers run here, and the wait goes on to the deadline."""
        size = SIZE[op]
        if not (isinstance(offset, int) and 0 <= offset <= PAGE - size and offset % size == 0):
            raise errors.error(errno.EINVAL, "offset: %r is not a %d-byte aligned offset in "
                               "the register page" % (offset, size))
        with self._lock:
            d, out = self._d, self._out
            if d is None:
                raise errors.error(errno.EBADF, "device %d: closed" % self.id)
            deadline = time.monotonic() + self.timeout
            while True:
                r = lib.fayt_dev_post(d, op, offset, value, _left_ns(deadline), out)
                if r != errno.EINTR:
                    break
            if r:
                raise self._fail(r, offset, False)
            if op in (W32, W64):
                return 0
            pos = out[0]
            while True:
                r = lib.fayt_dev_answer(d, pos, _left_ns(deadline), out)
                if r != errno.EINTR:
                    break
            if r:
                raise self._fail(r, offset, True)
            return out[0] & (1 << 8 * size) - 1

    def write32(self, offset: int, value: int) -> None:
        """Write the 32-bit register at `offset` through the ring (the model
        takes the writes in order)."""
        self._access(W32, offset, int(value) & 0xffffffff)

    def write64(self, offset: int, value: int) -> None:
        """Write the 64-bit register at `offset` through the ring (the model
        takes the writes in order)."""
        self._access(W64, offset, int(value) & (1 << 64) - 1)

    def read32(self, offset: int) -> int:
        """Read the 32-bit register at `offset`: waits for the model's answer
        (ETIMEDOUT after the device's timeout)."""
        return self._access(R32, offset, 0)

    def read64(self, offset: int) -> int:
        """Read the 64-bit register at `offset`: waits for the model's answer
        (ETIMEDOUT after the device's timeout)."""
        return self._access(R64, offset, 0)

    # -- the interrupt --------------------------------------------------------
    def _irq(self, payload, index, sender):
        """The notification's handler: take every interrupt raised so far."""
        count = 0
        while True:
            raised = self._w_state[RAISED // 8]
            if raised <= self.seen:
                break
            count += raised - self.seen
            self.seen = raised
            self._w_ring[IRQ_SEEN // 8] = raised
            _fence()                # irq_seen is seen before irq_raised is read again
        if count:
            self.irqs += count
            if self.handler is not None:
                self.handler(count)
        return 0

    def close(self) -> None:
        """Stop driving (DEV_DETACH) and unmap; a second close does nothing."""
        with self._lock:
            if self._d is None:
                return
            self._d = None
            try:
                self.connection.call(lib.FAYT_SYS_DEV_DETACH, _req(window=self.id))
            except OSError:
                pass
            for b in self._bufs:
                ffi.release(b)
            self._bufs = []
        self._release((self.ring, self.theirs, self.state))
        for fd in (self.ev_model, self.ev_driver):
            os.close(fd)


def register_device(name: "Name", *, connection: "Connection | None" = None) -> DeviceModel:
    """Serve device window `name` (driver or core; its mmio globs name it)."""
    conn = connection or _default_connection()
    data, fds = conn.call(lib.FAYT_SYS_DEV_REGISTER, _req(name=_name(name)))
    return DeviceModel(conn, data, fds)


def attach_device(name: "Name", index: int, handler: "Callable[[int], object] | None" = None, *,
                  timeout: float = 10, connection: "Connection | None" = None) -> Device:
    """Drive device window `name`: its interrupt comes to notification slot
    `index` and calls handler(count); register accesses wait at most
    timeout seconds."""
    from .notification import runtime
    conn = connection or _default_connection()
    rt = runtime(conn)
    rt.arm()
    if not rt.stacks:
        rt.stack_alloc()
    holder = {}

    def on_irq(payload, index, sender):
        return holder["dev"]._irq(payload, index, sender)

    rt.handlers[index] = on_irq
    try:
        data, fds = conn.call(lib.FAYT_SYS_DEV_ATTACH, _req(index=index, cookie=id(on_irq) | 1,
                                                            name=_name(name)))
    except BaseException:
        rt.handlers.pop(index, None)
        raise
    dev = holder["dev"] = Device(conn, data, fds, timeout)
    dev.handler = handler
    if rt.generation is None:
        rt.fetch()
    rt.arm_hint()
    return dev
