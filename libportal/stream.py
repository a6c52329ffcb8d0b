"""Connected channels: a server listens on a name, clients connect, and each
pair talks through two single-writer rings (docs/channels.md).

    lst = lp.listen("kv", backlog=16)           # the server
    end = lst.accept(timeout=5)
    msg = end.recv()                             # one whole message, or b"" at the end
    end.send(b"reply")

    end = lp.connect("kv", timeout=5)            # a client
    end.send(b"get x"); end.recv(timeout=1)

(Named "stream" because libportal/channel.py is the notification sender's
fast path.)

The facts this relies on, and what follows:
- faytd makes both objects and hands each end its own read-write and the
  peer's read-only; after that faytd takes no part: send and recv are C
  calls on the mappings (src/stream.c), which check every word the peer
  wrote (EPROTO: this end resets the channel; never a hang or a crash).
- Sleeping is poll(2) on three descriptors: this end's eventfd (the peer
  writes it when it finds this end's asleep mark set), the peer's pidfd
  (readable when its process is gone: ECONNRESET / EPIPE even if faytd is
  not told), and this connection's faytd socket (it hangs up when faytd
  dies: the channel resets).  Every sleep is bounded by the caller's
  deadline.  The eventfd is also the end's readiness descriptor for
  selectors and asyncio: arm it with ready(), then wait on fileno().
- A wait spins first: send and recv look at the peer's words again for up
  to spin_ns (SPIN_NS, $FAYT_CHAN_SPIN_NS; 0 with one CPU), in C with the
  GIL released, giving the CPU away between looks, before they arm and
  sleep: a wake-up through an eventfd costs more than a round trip.  The
  spin never outlasts the caller's timeout, and timeout 0 never spins.
- Messages are 1 to ring_bytes - 8 bytes; b"" from recv is the end of the
  stream (the peer shut its writing or closed), so an empty message cannot
  be sent.
"""
import asyncio
import errno
import mmap
import os
import select
import time
from typing import Any, NamedTuple, Sequence

from . import errors
from ._abi import (ffi, lib, CHAN_PASS_REQ, CHAN_PASS_REPLY, CHAN_REPLY, CHAN_TAKE_REPLY,
                   CHAN_TAKE_REQ, CONNECT_REQ, HANDLE_REQ, LISTEN_REPLY, LISTEN_REQ, STREAM_REF)
from .discovery import _encode
from .portal import Portal
from .syscall import Connection, connection as _default_connection
from ._types import Buffer, Name, WritableBuffer


class Peer(NamedTuple):
    """The other end's credentials, as faytd recorded them at its HELLO: context
    id, pid, uid and policy category (lp.CATEGORY_*, 0: another)."""
    context: int
    pid: int
    uid: int
    category: int


WAKE = lib.FAYT_STREAM_WAKE
SHUT_RD, SHUT_WR, SHUT_RDWR = 0, 1, 2
_POLLIN = select.POLLIN
_HUP = select.POLLHUP | select.POLLERR | select.POLLNVAL
SPIN_NS = 50000


def _spin_default():
    default = SPIN_NS if (os.cpu_count() or 1) > 1 else 0
    try:
        return max(0, int(os.environ.get("FAYT_CHAN_SPIN_NS", default)))
    except ValueError:
        return default


def _deadline(timeout):
    t = errors.check_timeout(timeout)
    return None if t is None else time.monotonic() + t


def _ms_left(deadline):
    if deadline is None:
        return None
    return max(0, int((deadline - time.monotonic()) * 1000 + 0.999))


def _spin_left(spin, deadline):
    """A spin bounded by what is left to the deadline (None, False: none)."""
    if not spin or not deadline:
        return spin
    return max(0, min(spin, int((deadline - time.monotonic()) * 1e9)))


def _drain(efd):
    try:
        os.eventfd_read(efd)
    except BlockingIOError:
        pass


def listen(name: "Name", *, backlog: int = 0,
           connection: "Connection | None" = None) -> "Listener":
    """Listen on `name` (the namespaces of docs/names.md: the right to create
    the name) with an accept queue of `backlog` connections (0: 16, at most
    4096).  EADDRINUSE if a live context listens on it already."""
    if not isinstance(backlog, int) or backlog < 0:
        raise errors.error(errno.EINVAL, "backlog: %r is not a count >= 0" % (backlog,))
    conn = connection or _default_connection()
    body, fds = conn.call(lib.FAYT_SYS_LISTEN, LISTEN_REQ.pack(0, backlog) + _encode(name))
    if len(body) != LISTEN_REPLY.size or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise errors.error(errno.EPROTO, "listen: malformed reply from faytd")
    return Listener(conn, LISTEN_REPLY.unpack(body)[0], fds[0], name)


def connect(name: "Name", *, timeout: "float | None" = 0, ring_bytes: int = 0,
            connection: "Connection | None" = None) -> "End":
    """Connect to the listener on `name` (the right to attach the name); the
    End.  timeout: 0 (the default) tries once; a number of seconds, or None
    for ever, waits for a listener and for room in its accept queue, asking
    again every few ms (at most 50 ms apart).  NotFound (ENOENT) if nothing
    listens, WouldBlock (EAGAIN) if its queue stays full.  ring_bytes: each
    direction's ring, a power of two from 4096 to 16 MiB (0: 64 KiB)."""
    deadline = _deadline(timeout)
    conn = connection or _default_connection()
    req = CONNECT_REQ.pack(ring_bytes, 0) + _encode(name)
    pause = 0.002
    while True:
        try:
            body, fds = conn.call(lib.FAYT_SYS_CONNECT, req)
            break
        except (errors.NotFound, errors.WouldBlock):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise
            time.sleep(pause if left is None else min(pause, left))
            pause = min(pause * 2, 0.05)
    return End(conn, body, fds)


class Shared:
    """A share-point's or ANON portal's data a peer sent by reference
    (End.send_share), as recv() returns it: mapped here until close().
    buffer: a memoryview of the `length` bytes (read-only unless the sender
    allowed writing); copy: an immutable copy (sealed; nobody can change
    it), else the sender's own memory, which it may still be writing
    (docs/channels.md); portal: it was an ANON portal (faytd says so)."""

    def __init__(self, body: bytes, fds: "Sequence[int]") -> None:
        try:
            if len(body) != CHAN_TAKE_REPLY.size:
                raise errors.error(errno.EPROTO, "chan_take: malformed reply from faytd")
            length, off, map_length, flags, _ = CHAN_TAKE_REPLY.unpack(body)
            split = bool(flags & lib.FAYT_TAKE_SPLIT)
            if (len(fds) != (2 if split else 1) or off + length != map_length or
                    (split and map_length <= mmap.PAGESIZE)):
                raise errors.error(errno.EPROTO, "chan_take: malformed reply from faytd")
            self.writable = bool(flags & lib.FAYT_PASS_WRITE)
            self.copy = bool(flags & lib.FAYT_PASS_COPY)
            self.portal = bool(flags & lib.FAYT_PASS_PORTAL)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
            err = ffi.new("int *")
            span = max(map_length, 1)
            addr = lib.fayt_map(fds[0], span, 0, prot, err)
            if not addr:
                raise errors.error(err[0], "chan_take: cannot map the object")
            if split:       # the rest's object over page 1 on
                rest = span - mmap.PAGESIZE
                lib.fayt_unmap(addr + mmap.PAGESIZE, rest)
                if not lib.fayt_map(fds[1], rest, addr + mmap.PAGESIZE, prot, err):
                    lib.fayt_unmap(addr, mmap.PAGESIZE)
                    raise errors.error(err[0], "chan_take: cannot map the object")
        finally:
            for fd in fds:
                os.close(fd)
        self._map = _Map(addr, span, addr + off, length)
        self.length = length
        self._view()

    def _view(self):
        self._map.users += 1
        mv = memoryview(ffi.buffer(ffi.cast("char *", self._map.data), self.length))
        self.buffer = mv if self.writable else mv.toreadonly()
        self.closed = False

    def _again(self) -> "Shared":
        """Another Shared on the same mapping (a share-point sent again)."""
        s = Shared.__new__(Shared)
        s._map, s.length, s.writable, s.copy = self._map, self.length, self.writable, self.copy
        s.portal = self.portal
        s._view()
        return s

    def __len__(self) -> int:
        return self.length

    def __bytes__(self) -> bytes:
        return bytes(self.buffer)

    def close(self) -> None:
        """Unmap it (BufferError while other memoryviews of buffer exist)."""
        if self.closed:
            return
        self.buffer.release()
        self.closed = True
        self._map.drop()

    def __enter__(self) -> "Shared":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            try:
                self.close()
            except Exception:
                pass


class _Map:
    """A mapping Shared objects (and an End's cache of share-points sent
    again) use: unmapped when the last user drops it."""
    __slots__ = ("addr", "span", "data", "users")

    def __init__(self, addr, span, data, length):
        self.addr, self.span, self.data, self.users = addr, span, data, 0

    def drop(self):
        self.users -= 1
        if self.users == 0:
            lib.fayt_unmap(self.addr, self.span)


# Share-points sent again on a channel skip faytd: both ends keep the last
# _AGAIN_MAX share-points passed without COPY, least recently sent first
# out, in step (the same frames, in order, update both), so the sender
# names an earlier ticket (FAYT_REF_AGAIN) and the receiver reuses its
# mapping.  A ticket the receiver does not hold is a protocol break.
_AGAIN_MAX = 8
_REF_AGAIN = 0x100


class _Closing:
    """with-statement and garbage collection close it (close() is idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if not getattr(self, "closed", True):
            try:
                self.close()
            except Exception:
                pass


class Listener(_Closing):
    """A name a server listens on.  accept() takes the next connection;
    fileno() is readable when one may be queued (for selectors/asyncio)."""

    def __init__(self, conn: Connection, lid: int, efd: int, name: "Name") -> None:
        self._conn, self.id, self._efd, self.name = conn, lid, efd, name
        self.closed = False

    def fileno(self) -> int:
        """The listener's eventfd: readable when a connection may be queued
        (selectors, asyncio's add_reader); accept() drains it."""
        return self._efd

    def accept(self, timeout: "float | None" = None) -> "End":
        """The next connection as an End; waits up to `timeout` seconds (None:
        for ever, 0: WouldBlock if none is queued).  The eventfd is drained
        first, then ACCEPT asked, so a connection queued in between is
        never missed."""
        self._check()
        deadline = _deadline(timeout)
        while True:
            _drain(self._efd)
            try:
                body, fds = self._conn.call(lib.FAYT_SYS_ACCEPT, HANDLE_REQ.pack(self.id))
                return End(self._conn, body, fds, acceptor=True)
            except errors.WouldBlock:
                if timeout == 0:
                    raise
                ms = _ms_left(deadline)
                if ms == 0:
                    raise errors.TimedOut(errno.ETIMEDOUT, "accept: no connection within the "
                                          "timeout") from None
            p = select.poll()
            p.register(self._efd, _POLLIN)
            p.register(self._conn.sock.fileno(), 0)
            for fd, ev in p.poll(ms):
                if fd != self._efd and ev & _HUP:
                    raise errors.ChannelReset(errno.ECONNRESET, "accept: faytd went away")

    async def accept_async(self) -> "End":
        """accept() for asyncio: waits on fileno() in the running loop."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return self.accept(timeout=0)
            except errors.WouldBlock:
                pass
            fut = loop.create_future()
            loop.add_reader(self._efd, lambda: fut.done() or fut.set_result(None))
            try:
                await fut
            finally:
                loop.remove_reader(self._efd)

    def _check(self):
        if self.closed:
            raise errors.error(errno.EBADF, "listener: closed")

    def close(self) -> None:
        """Stop listening; connections still queued are reset (ECONNRESET)."""
        if self.closed:
            return
        self.closed = True
        try:
            if not self._conn.closed:
                self._conn.call(lib.FAYT_SYS_LISTEN, LISTEN_REQ.pack(lib.FAYT_LISTEN_CLOSE, 0)
                                + self.id.to_bytes(8, "little"))
        except (errors.DaemonUnavailable, errors.NotFound):
            pass                        # faytd went away, or it dropped the listener already
        finally:
            os.close(self._efd)


class End(_Closing):
    """One end of a channel.  send/recv move whole messages; timeout None
    waits for ever, 0 does not wait (WouldBlock), else seconds (TimedOut).
    peer: the other end's credentials (Peer)."""

    def __init__(self, conn: Connection, body: bytes, fds: "Sequence[int]",
                 acceptor: bool = False) -> None:
        self._side = lib.FAYT_PASS_ACCEPTOR if acceptor else 0
        try:
            if len(body) != CHAN_REPLY.size:
                raise errors.error(errno.EPROTO, "channel: malformed reply from faytd")
            (self.id, size, map_length, pctx, ppid, puid, pcat, flags,
             _) = CHAN_REPLY.unpack(body)
            if len(fds) != (5 if flags & lib.FAYT_CHAN_PIDFD else 4) or size & (size - 1) or \
                    map_length != lib.FAYT_STREAM_HEADER_SIZE + size:
                raise errors.error(errno.EPROTO, "channel: malformed reply from faytd")
            self._mine_map = mmap.mmap(fds[0], map_length, mmap.MAP_SHARED,
                                       mmap.PROT_READ | mmap.PROT_WRITE)
            self._peer_map = mmap.mmap(fds[1], map_length, mmap.MAP_SHARED, mmap.PROT_READ)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        os.close(fds[0])
        os.close(fds[1])
        self._efd, self._peer_efd = fds[2], fds[3]
        self._pidfd = fds[4] if len(fds) == 5 else -1
        self._conn = conn
        self.ring_bytes = size
        self.max_message = size - lib.FAYT_STREAM_FRAME_HEADER
        self.peer = Peer(pctx, ppid, puid, pcat)
        self._mine = ffi.from_buffer(self._mine_map)
        self._peer = ffi.from_buffer(self._peer_map)
        self._buf = bytearray(self.max_message)
        self._cbuf = ffi.from_buffer(self._buf)
        self._len = ffi.new("uint32_t *")
        self._kind = ffi.new("uint32_t *")
        self._sent = {}     # (kind, sp_id or handle, writable) -> (ticket, length): may go again
        self._held = {}     # ticket -> Shared: mapped here, may come again
        self.timeout = None
        self.spin_ns = _spin_default()
        self._spin = self.spin_ns   # what a call with the end's timeout spins
        self.closed = False
        self._reset = None          # why the channel ended (an exception to raise), or None
        self._broken = False        # the peer broke the protocol: _reset at once, every call
        self._rd_shut = False
        self._poll = select.poll()
        self._poll.register(self._efd, _POLLIN)
        if self._pidfd >= 0:
            self._poll.register(self._pidfd, _POLLIN)
        self._poll.register(conn.sock.fileno(), 0)      # only its hang-up

    # -- the readiness descriptor ----------------------------------------

    def fileno(self) -> int:
        """This end's eventfd: readable after ready() returned False, once
        there may be something to do (selectors, asyncio's add_reader)."""
        return self._efd

    def ready(self, write: bool = False) -> bool:
        """Whether recv (write: a send of a small message) would not block
        now; if not, the asleep mark is set, so fileno() turns readable when
        the peer sends (consumes) or goes.  Call it before each wait."""
        self._check()
        _drain(self._efd)
        return bool(lib.fayt_stream_arm(self._mine, self._peer, self.ring_bytes,
                                        1 if write else 0, 1))

    def setblocking(self, flag: bool) -> None:
        """True: the end's timeout is None (wait for ever); False: 0 (WouldBlock)."""
        self.settimeout(None if flag else 0)

    def settimeout(self, timeout: "float | None") -> None:
        """The end's timeout, which send and recv take by default: seconds,
        None for ever, 0 not at all."""
        t = errors.check_timeout(timeout)
        self.timeout = timeout
        self._spin = self._spin_for(t)

    def set_spin(self, ns: int) -> None:
        """How long a send or recv that would wait looks again before it
        sleeps, in ns (0: never; default SPIN_NS, $FAYT_CHAN_SPIN_NS)."""
        if not isinstance(ns, int) or ns < 0:
            raise errors.error(errno.EINVAL, "ns: %r is not a count of ns >= 0" % (ns,))
        self.spin_ns = ns
        self._spin = self._spin_for(errors.check_timeout(self.timeout))

    def _spin_for(self, t):
        """The spin of a call whose timeout is t (checked: None or >= 0)."""
        if t is None:
            return self.spin_ns
        return min(self.spin_ns, int(t * 1e9))

    def _call_spin(self, timeout):
        if timeout == -1:
            return self._spin
        return self._spin_for(errors.check_timeout(timeout))
    # -- send and recv ---------------------------------------------------

    def send(self, data: "Buffer", timeout: "float | None" = -1) -> None:
        """Send one message (bytes-like, 1 to max_message bytes), whole or
        not at all.  timeout: -1 takes the end's (settimeout/setblocking)."""
        # The common case in one C call: bytes, room in the ring, nothing
        # wrong.  Anything else (and no room) goes the whole way round.
        if type(data) is bytes and not (self.closed or self._broken or self._reset):
            n = len(data)
            if 0 < n <= self.max_message:
                r = lib.fayt_stream_send(self._mine, self._peer, self.ring_bytes, data, n, 0, 0)
                if r == 0:
                    return
                if r == WAKE:
                    os.eventfd_write(self._peer_efd, 1)
                    return
        self._send(data, 0, timeout)

    def _send(self, data, kind, timeout):
        self._check()
        n = len(data)
        if not 0 < n <= self.max_message:
            raise errors.error(errno.EMSGSIZE if n else errno.EINVAL,
                               "data: %d bytes; a message holds 1 to %d" % (n, self.max_message))
        if self._reset is not None:
            raise errors.ChannelClosed(errno.EPIPE, "send: the channel is reset (%s)"
                                       % self._reset.strerror)
        if not isinstance(data, bytes):
            data = ffi.from_buffer(data)
        deadline = None
        spin = self._call_spin(timeout)
        if spin:
            t = self.timeout if timeout == -1 else timeout
            if t is not None:
                deadline = time.monotonic() + t     # the spin counts against it
        while True:
            r = lib.fayt_stream_send(self._mine, self._peer, self.ring_bytes, data, n, kind,
                                     spin)
            if r <= 0:
                if r == WAKE:
                    os.eventfd_write(self._peer_efd, 1)
                return
            if r == errno.EAGAIN:
                deadline = self._wait(1, n, deadline, timeout, "send")
                spin = _spin_left(spin, deadline)
                continue
            if r == errno.EPIPE:
                raise errors.ChannelClosed(errno.EPIPE, "send: the channel is closed for "
                                           "sending (shut down, or the peer closed)")
            self._fail(r, "send")

    def recv(self, timeout: "float | None" = -1) -> "bytes | Shared":
        """The next message (bytes); b"" once the peer shut its writing or
        closed and every message it sent was taken.  ChannelReset when the
        peer is gone (after its last whole message).  A message the peer
        sent by reference (send_share) comes as a Shared, mapped here."""
        if not (self.closed or self._broken or self._rd_shut):
            # The common case in one C call: a message of bytes is there, or
            # comes within the spin (only when no deadline bounds the call).
            r = lib.fayt_stream_recv(self._mine, self._peer, self.ring_bytes, self._cbuf,
                                     len(self._buf), self._len, self._kind, 1,
                                     self._spin if timeout == -1 and self.timeout is None
                                     else 0)
            if r <= 0 and not self._kind[0]:
                if r == WAKE:
                    os.eventfd_write(self._peer_efd, 1)
                return ffi.unpack(self._cbuf, self._len[0])
            if r <= 0:
                if r == WAKE:
                    os.eventfd_write(self._peer_efd, 1)
                return self._take(bytes(memoryview(self._buf)[:self._len[0]]))
        n = self._recv(self._cbuf, len(self._buf), timeout, 1)
        if self._kind[0]:
            return self._take(bytes(memoryview(self._buf)[:n]))
        return bytes(memoryview(self._buf)[:n]) if n else b""

    def send_share(self, sp: Any, *, copy: bool = False, writable: bool = False,
                   timeout: "float | None" = -1) -> int:
        """Send memory this process maps by reference: a share-point
        (lp.share_create or share_attach) or an ANON portal (lp.portal(ANON,
        ...), mapped through this end's connection).  faytd hands its object
        to the peer, whose recv() returns a Shared; the bytes are not copied
        through the ring.  The peer maps it read-only unless writable (an
        ANON portal: only if its own mapping is writable, else EACCES).
        This process keeps its own mapping, and with it the right to write
        (faytd cannot take a mapping away): copy=True hands an immutable
        copy instead (faytd copies the data into a new object sealed against
        writes).  The data's length.  EPERM if this context does not map the
        share-point, EBADF if it does not map the portal."""
        self._check()
        if self._reset is not None:
            raise errors.ChannelClosed(errno.EPIPE, "send: the channel is reset (%s)"
                                       % self._reset.strerror)
        if isinstance(sp, Portal):
            if not sp.mapped:
                raise errors.error(errno.EBADF, "sp: the ANON portal is unmapped")
            if sp.connection is not self._conn:     # a handle names a mapping of one context
                raise errors.error(errno.EINVAL, "sp: the ANON portal was mapped through "
                                   "another connection than this channel's")
            ref, kind = sp.handle, lib.FAYT_PASS_PORTAL
        else:
            ref, kind = getattr(sp, "sp_id", None), 0
            if not isinstance(ref, int) or isinstance(ref, bool):
                raise errors.error(errno.EINVAL, "sp: %r is not a mapped share-point or ANON "
                                   "portal" % (sp,))
        flags = ((lib.FAYT_PASS_COPY if copy else 0) | (lib.FAYT_PASS_WRITE if writable else 0)
                 | self._side | kind)
        key = (kind, ref, writable)
        again = None if copy or not getattr(sp, "mapped", False) else self._sent.get(key)
        if again is not None:
            ticket, length = again
            self._send(STREAM_REF.pack(ticket, length, flags | _REF_AGAIN, 0),
                       lib.FAYT_STREAM_FRAME_REF, timeout)
            self._sent[key] = self._sent.pop(key)           # the most recent now
            return length
        body, _ = self._conn.call(lib.FAYT_SYS_CHAN_PASS,
                                  CHAN_PASS_REQ.pack(self.id, ref, flags, 0))
        if len(body) != CHAN_PASS_REPLY.size:
            raise errors.error(errno.EPROTO, "chan_pass: malformed reply from faytd")
        ticket, length = CHAN_PASS_REPLY.unpack(body)
        try:
            self._send(STREAM_REF.pack(ticket, length, flags, 0), lib.FAYT_STREAM_FRAME_REF,
                       timeout)
        except BaseException:
            try:        # the frame did not go: withdraw the pass
                self._conn.call(lib.FAYT_SYS_CHAN_PASS, CHAN_PASS_REQ.pack(
                    self.id, ticket, lib.FAYT_PASS_CANCEL | self._side, 0))
            except OSError:
                pass
            raise
        if not copy:
            self._sent.pop(key, None)
            self._sent[key] = (ticket, length)
            if len(self._sent) > _AGAIN_MAX:
                del self._sent[next(iter(self._sent))]
        return length

    def _take(self, frame):
        """The object a REF frame names, from faytd.  The frame is the peer's
        word: a ticket faytd did not give it for this end is EPERM there,
        a protocol break here (EPROTO, the channel is reset)."""
        ticket, _, flags, _ = STREAM_REF.unpack(frame)
        if flags & _REF_AGAIN:
            s = self._held.pop(ticket, None)
            if s is None:
                self._fail(errno.EPROTO, "recv")
            self._held[ticket] = s
            return s._again()
        try:
            body, fds = self._conn.call(lib.FAYT_SYS_CHAN_TAKE,
                                        CHAN_TAKE_REQ.pack(self.id, ticket))
        except errors.PermissionDenied:
            self._fail(errno.EPROTO, "recv")
        s = Shared(body, fds)
        if not s.copy:
            self._held[ticket] = s._again()
            if len(self._held) > _AGAIN_MAX:
                self._held.pop(next(iter(self._held))).close()
        return s

    def recv_into(self, buffer: "WritableBuffer", timeout: "float | None" = -1) -> int:
        """recv into a writable buffer; the message's length (0: the end).
        EMSGSIZE (nothing taken) if it does not fit."""
        return self._recv(ffi.from_buffer(buffer, require_writable=True), len(buffer), timeout, 0)

    def _recv(self, cbuf, cap, timeout, refs):
        self._check()
        if self._rd_shut:
            return 0
        deadline = None
        spin = self._call_spin(timeout)
        if spin:
            t = self.timeout if timeout == -1 else timeout
            if t is not None:
                deadline = time.monotonic() + t     # the spin counts against it
        while True:
            r = lib.fayt_stream_recv(self._mine, self._peer, self.ring_bytes, cbuf, cap,
                                     self._len, self._kind, refs, spin)
            if r <= 0:
                if r == WAKE:
                    os.eventfd_write(self._peer_efd, 1)
                return self._len[0]
            if r == errno.EAGAIN:
                deadline = self._wait(0, 1, deadline, timeout, "recv")
                spin = _spin_left(spin, deadline)
                continue
            if r == errno.ESHUTDOWN:
                return 0
            if r == errno.ECONNRESET:
                self._pending_reset()
                raise errors.ChannelReset(errno.ECONNRESET, "recv: the peer is gone (it died, "
                                          "left without closing, or was never accepted)")
            if r == errno.EMSGSIZE:
                raise errors.error(errno.EMSGSIZE, "buffer: %d bytes; the message has %d"
                                   % (cap, self._len[0]))
            if r == errno.ENOMSG:
                raise errors.error(errno.ENOMSG, "recv_into: the next message is a share-point "
                                   "sent by reference (send_share): take it with recv()")
            self._fail(r, "recv")

    def _wait(self, write, n, deadline, timeout, what):
        """Sleep until the peer may have acted, the peer or faytd is gone,
        or the deadline; returns the deadline (set on the first wait)."""
        if self._reset is not None:
            raise self._reset
        if deadline is None:
            t = self.timeout if timeout == -1 else timeout
            if t == 0:
                raise errors.WouldBlock(errno.EAGAIN, "%s: %s" % (what, (
                    "the ring is full" if write else "no message yet")))
            deadline = _deadline(t) if t is not None else False
        if lib.fayt_stream_arm(self._mine, self._peer, self.ring_bytes, write, n):
            return deadline
        try:
            ms = _ms_left(deadline) if deadline is not False else None
            if ms == 0:
                raise errors.TimedOut(errno.ETIMEDOUT, "%s: not done within the timeout" % what)
            for fd, ev in self._poll.poll(ms):
                if fd == self._efd:
                    _drain(fd)
                elif fd == self._pidfd:
                    self._gone(errno.ECONNRESET if not write else errno.EPIPE,
                               "%s: the peer's process (pid %d) is gone" % (what, self.peer.pid))
                elif ev & _HUP:
                    self._gone(errno.ECONNRESET, "%s: faytd went away" % what, now=True)
        finally:
            lib.fayt_stream_disarm(self._mine)
        return deadline

    def _gone(self, err, message, now=False):
        """The peer (or, now, faytd) is gone.  For the peer: the caller looks
        again, so messages it published before dying are still taken; the
        next wait raises."""
        cls = errors.ChannelReset if err == errno.ECONNRESET else errors.ChannelClosed
        self._reset = cls(err, message)
        self._reset_mine()
        if now:
            raise self._reset

    def _pending_reset(self):
        if self._reset is not None:
            raise self._reset

    def _fail(self, err, what):
        if err == errno.EPROTO:
            self._reset = errors.ChannelReset(errno.ECONNRESET, "%s: the channel was reset: "
                                              "its peer broke the ring protocol" % what)
            self._broken = True
            self._reset_mine()
            raise errors.error(errno.EPROTO, "%s: the peer broke the ring protocol (its "
                               "object holds what no send writes): the channel is reset" % what)
        raise errors.error(err, "%s: failed" % what)

    def _reset_mine(self):
        if lib.fayt_stream_set_state(self._mine, self._peer, lib.FAYT_STREAM_RESET):
            os.eventfd_write(self._peer_efd, 1)

    # -- asyncio ---------------------------------------------------------

    async def recv_async(self) -> bytes:
        """recv() for asyncio: sleeps on fileno() in the running loop."""
        while True:
            try:
                return self.recv(timeout=0)
            except errors.WouldBlock:
                pass
            await self._readable(False)

    async def send_async(self, data: "Buffer") -> None:
        """send() for asyncio: sleeps on fileno() in the running loop while
        the ring is full."""
        while True:
            try:
                return self.send(data, timeout=0)
            except errors.WouldBlock:
                pass
            await self._readable(True)

    async def _readable(self, write):
        if self.ready(write):
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def wake():
            if not fut.done():
                fut.set_result(None)
        fds = [self._efd] + ([self._pidfd] if self._pidfd >= 0 else [])
        for fd in fds:
            loop.add_reader(fd, wake)
        try:
            await fut
        finally:
            for fd in fds:
                loop.remove_reader(fd)
            lib.fayt_stream_disarm(self._mine)
        if self._pidfd >= 0 and select.select([self._pidfd], [], [], 0)[0]:
            self._gone(errno.EPIPE if write else errno.ECONNRESET,
                       "the peer's process (pid %d) is gone" % self.peer.pid)

    # -- shutdown and close ----------------------------------------------

    def shutdown(self, how: int = SHUT_RDWR) -> None:
        """SHUT_WR: the peer's recv gives b"" after this end's messages;
        SHUT_RD: this end's recv gives b"", the peer's send EPIPE."""
        self._check()
        if how not in (SHUT_RD, SHUT_WR, SHUT_RDWR):
            raise errors.error(errno.EINVAL, "how: %r is not SHUT_RD, SHUT_WR or SHUT_RDWR"
                               % (how,))
        bits = ((lib.FAYT_STREAM_RD_SHUT if how != SHUT_WR else 0)
                | (lib.FAYT_STREAM_WR_SHUT if how != SHUT_RD else 0))
        self._rd_shut = self._rd_shut or how != SHUT_WR
        if lib.fayt_stream_set_state(self._mine, self._peer, bits):
            os.eventfd_write(self._peer_efd, 1)

    def close(self) -> None:
        """Shut both ways (the peer reads what was sent, then b""), tell
        faytd, and unmap.  Idempotent."""
        if self.closed:
            return
        try:
            if lib.fayt_stream_set_state(self._mine, self._peer,
                                         lib.FAYT_STREAM_WR_SHUT | lib.FAYT_STREAM_RD_SHUT):
                os.eventfd_write(self._peer_efd, 1)
        except OSError:
            pass
        self.closed = True
        try:
            if not self._conn.closed:
                self._conn.call(lib.FAYT_SYS_CHAN_CLOSE, HANDLE_REQ.pack(self.id))
        except (errors.DaemonUnavailable, errors.NotFound):
            pass                        # faytd went away or reset it already
        finally:
            for s in self._held.values():
                s.close()
            self._held.clear()
            for c in (self._mine, self._peer, self._cbuf):
                ffi.release(c)
            self._mine_map.close()
            self._peer_map.close()
            for fd in (self._efd, self._peer_efd, self._pidfd):
                if fd >= 0:
                    os.close(fd)

    def _check(self):
        if self.closed:
            raise errors.error(errno.EBADF, "channel: closed")
        if self._broken:
            raise self._reset
