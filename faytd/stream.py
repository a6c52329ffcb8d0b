"""Connected channels: listeners, their accept queues, and the channels
faytd made (docs/channels.md, libportal/include/fayt/stream.h).

The facts this relies on, and what follows:
- A channel's two objects are memfds faytd makes, sealed against growing
  and shrinking (a peer that could shrink one would make the other side's
  reads fault).  Each end gets its own object read-write and the peer's
  through a descriptor opened O_RDONLY (/proc/self/fd: a new open file
  description); the object is 0600 and faytd's, so a peer of another uid
  cannot reopen it read-write.  So each word of the protocol has one writer.
- faytd takes no part in the traffic.  It writes into an object only when
  its end is gone without closing (the connection closed, the process died,
  or its listener went away before accepting): the RESET bit, then the
  other end's eventfd, so the survivor learns it even when its peer's
  pidfd says nothing (a connection closed by a live process).
- Names are those of share-point names (the same resolve as PUBLISH): to
  listen a context needs the right to create the name, to connect the
  right to attach it.  A listening name is not a published one (lookup does
  not find it) but follows the same rule: one live listener per name.
- Messages by reference (CHAN_PASS, CHAN_TAKE): the sender names a
  share-point its context maps now, or with FAYT_PASS_PORTAL the handle
  of an ANON portal in its own table of mappings (the core's record of
  mappings says so, never the client); faytd opens the object at once
  and keeps the descriptor under a ticket for the other end (a keeper's
  name could be reused once the share-point or portal goes), marks the
  object exposed (never recycled: someone else may map it), and the
  sender puts the ticket in a REF frame.  The receiver's CHAN_TAKE gets the descriptor
  only if the ticket was passed to its end of that channel (EPERM
  otherwise: a frame is the peer's word, untrusted).  The fds are
  read-only unless the sender allowed writing; COPY hands a fresh memfd
  with a copy of the data, sealed against writes (F_SEAL_WRITE is
  permanent), so the hand-over is immutable.  faytd cannot remove the
  sender's own mapping, so without COPY the sender keeps writing access.
  At most FAYT_PASS_PENDING_MAX untaken passes per direction; what is
  left untaken goes with the channel.
- RAM: a channel's two objects are charged to the connecting context (it
  chose ring_bytes) through the same check as an ANON portal's frames, and
  given back when faytd frees the channel; a COPY's new object is charged
  to the sender while faytd holds it untaken.  Once taken, what a receiver
  maps is charged to nobody: faytd never sees its munmap.
- Nothing is journaled.  When faytd dies the ends find it (their faytd
  socket hangs up) and reset their channels; after a restart, servers
  listen again and clients connect again.
"""
import collections
import errno
import fcntl
import os

from libportal._abi import ffi, lib

from .context import CoreMapping, uncount
from .frames import KernelError, PAGE
from .native import core, lib as clib
from .policy import Policy
from .sharepoint import SharePoints

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
HEADER = lib.FAYT_STREAM_HEADER_SIZE
STATE_OFFSET = ffi.offsetof("struct fayt_stream_end", "state")


class Listener:
    __slots__ = ("id", "ctx", "name", "backlog", "queue", "efd")

    def __init__(self, lid, ctx, name, backlog):
        self.id, self.ctx, self.name, self.backlog = lid, ctx, name, backlog
        self.queue = collections.deque()
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


class End:
    """One end as faytd keeps it: its object and eventfd, and its context
    (None until accepted)."""
    __slots__ = ("ctx", "obj", "efd", "gone")

    def __init__(self, cid, side, ring_bytes):
        self.ctx = None
        self.gone = False
        self.obj = os.memfd_create("fayt-chan-%d-%d" % (cid, side),
                                   os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.obj, HEADER + ring_bytes)
            os.pwrite(self.obj, lib.FAYT_STREAM_MAGIC.to_bytes(4, "little") + bytes(4)
                      + ring_bytes.to_bytes(8, "little"), 0)
            os.fchmod(self.obj, 0o600)
            fcntl.fcntl(self.obj, fcntl.F_ADD_SEALS, SEALS)
            self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except BaseException:
            os.close(self.obj)
            raise

    def reset(self):
        """Its owner is gone without closing: set RESET in its state word
        (nobody else writes that word now)."""
        state = int.from_bytes(os.pread(self.obj, 4, STATE_OFFSET), "little")
        os.pwrite(self.obj, (state | lib.FAYT_STREAM_RESET).to_bytes(4, "little"), STATE_OFFSET)

    def wake(self):
        try:
            os.eventfd_write(self.efd, 1)
        except OSError:
            pass

    def close(self):
        os.close(self.obj)
        os.close(self.efd)


class Passed:
    """An untaken pass: its descriptors (faytd's, closed when taken or
    dropped), for which side, the take reply's fields, and the RAM charge
    of a copy (`charged` bytes of the sender's context `payer`) while
    faytd holds it."""
    __slots__ = ("to", "fds", "length", "data_offset", "map_length", "flags", "payer",
                 "charged", "uid", "counts")

    def __init__(self, to, fds, length, data_offset, map_length, flags):
        self.to, self.fds, self.length = to, fds, length
        self.data_offset, self.map_length, self.flags = data_offset, map_length, flags
        self.payer, self.charged = None, 0
        self.uid, self.counts = None, None      # the sender's uid, Channels.passes_per_uid

    def uncount(self):
        """It no longer holds faytd's descriptors for its sender's uid."""
        if self.counts is not None:
            uncount(self.counts, self.uid)
            self.counts = None

    def uncharge(self):
        if self.charged:
            self.payer.ram -= self.charged
            self.payer, self.charged = None, 0

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.uncharge()
        self.uncount()


class Channel:
    __slots__ = ("id", "ring_bytes", "ends", "uid", "passed", "next_ticket", "payer",
                 "charged")

    def __init__(self, cid, ring_bytes, uid):
        self.id, self.ring_bytes, self.uid = cid, ring_bytes, uid
        self.passed = {}            # ticket -> Passed
        self.next_ticket = 1
        self.payer, self.charged = None, 0     # the connector's context, its RAM charge
        self.ends = []
        try:
            self.ends.append(End(cid, 0, ring_bytes))
            self.ends.append(End(cid, 1, ring_bytes))
        except BaseException:
            for e in self.ends:
                e.close()
            raise

    def side_of(self, ctx):
        for i, e in enumerate(self.ends):
            if e.ctx is ctx and not e.gone:
                return i
        return None


class Channels:
    def __init__(self, kernel):
        self.k = kernel
        self.listeners = {}         # id -> Listener
        self.by_name = {}           # Name -> Listener
        self.channels = {}          # id -> Channel
        self.per_uid = {}           # uid -> channels and listeners its contexts hold
        self.passes_per_uid = {}    # uid -> untaken passes its contexts made (faytd's fds)
        self._next = 1

    def _id(self):
        n, self._next = self._next, self._next + 1
        return n

    def _charge(self, ctx):
        held = self.per_uid.get(ctx.uid, 0)
        limit = self.k.cfg["max_channels_per_uid"]
        if not ctx.is_core and held >= limit:
            raise KernelError(errno.ENOSPC, "uid %d holds %d channels and listeners, its limit "
                              "(config max_channels_per_uid)" % (ctx.uid, held))
        self.per_uid[ctx.uid] = held + 1

    def _uncharge(self, uid):
        uncount(self.per_uid, uid)

    # -- listeners -------------------------------------------------------

    def listen(self, ctx, name, backlog):
        n = SharePoints.resolve(ctx, name, True, field=b"name")
        other = self.by_name.get(n)
        if other is not None:
            raise KernelError(errno.EADDRINUSE, "name: %s already has a listener (context %d, "
                              "pid %s)" % (_show(name), other.ctx.id, other.ctx.pid))
        self._charge(ctx)
        try:
            lst = Listener(self._id(), ctx, n, backlog)
        except BaseException:
            self._uncharge(ctx.uid)
            raise
        self.listeners[lst.id] = lst
        self.by_name[n] = lst
        return lst

    def _own_listener(self, ctx, lid):
        lst = self.listeners.get(lid)
        if lst is None or lst.ctx is not ctx:
            raise KernelError(errno.ENOENT, "listener: %d is not a listener of this context"
                              % lid)
        return lst

    def unlisten(self, ctx, lid):
        self._drop_listener(self._own_listener(ctx, lid))

    def _drop_listener(self, lst):
        """Its queued connections are reset: the connectors see ECONNRESET."""
        del self.listeners[lst.id]
        if self.by_name.get(lst.name) is lst:
            del self.by_name[lst.name]
        while lst.queue:
            ch = lst.queue.popleft()
            end = ch.ends[1]
            end.gone = True
            end.reset()
            ch.ends[0].wake()
            self._maybe_free(ch)
        os.close(lst.efd)
        self._uncharge(lst.ctx.uid)

    # -- channels --------------------------------------------------------

    def connect(self, ctx, name, ring_bytes):
        n = SharePoints.resolve(ctx, name, False, field=b"name")
        lst = self.by_name.get(n)
        if lst is None:
            raise KernelError(errno.ENOENT, "name: nothing listens on %s" % _show(name))
        if len(lst.queue) >= lst.backlog:
            raise KernelError(errno.EAGAIN, "name: the accept queue of %s is full (backlog %d)"
                              % (_show(name), lst.backlog))
        self._charge(ctx)
        nbytes = channel_bytes(ring_bytes)
        try:
            self.k.charge(ctx, nbytes)
        except KernelError as e:
            self._uncharge(ctx.uid)
            why = e.message[8:] if e.message.startswith("length: ") else e.message
            raise KernelError(e.errno, "ring_bytes: %d: a channel's two objects (%d bytes, "
                              "each a header page and a ring) are charged to the connecting "
                              "context, and %s" % (ring_bytes, nbytes, why)) from None
        try:
            ch = Channel(self._id(), ring_bytes, ctx.uid)
        except OSError as e:
            ctx.ram -= nbytes
            self._uncharge(ctx.uid)
            raise KernelError(errno.ENOMEM, "faytd cannot make a channel: %s" % e.strerror) \
                from None
        except BaseException:
            ctx.ram -= nbytes
            self._uncharge(ctx.uid)
            raise
        ch.payer, ch.charged = ctx, nbytes
        ch.ends[0].ctx = ctx
        self.channels[ch.id] = ch
        lst.queue.append(ch)
        try:
            os.eventfd_write(lst.efd, 1)
        except OSError:
            pass
        return ch, lst.ctx

    def accept(self, ctx, lid):
        lst = self._own_listener(ctx, lid)
        if not lst.queue:
            raise KernelError(errno.EAGAIN, "listener: no connection is queued on %d" % lid)
        ch = lst.queue.popleft()
        ch.ends[1].ctx = ctx
        return ch, ch.ends[0].ctx

    def close(self, ctx, cid):
        ch = self.channels.get(cid)
        side = ch.side_of(ctx) if ch is not None else None
        if side is None:
            raise KernelError(errno.ENOENT, "channel: %d is not an open channel of this context"
                              % cid)
        ch.ends[side].gone = True
        self._maybe_free(ch)

    def _maybe_free(self, ch):
        if all(e.gone for e in ch.ends) and self.channels.pop(ch.id, None) is not None:
            for p in ch.passed.values():
                p.close()
            ch.passed.clear()
            for e in ch.ends:
                e.close()
            if ch.charged:
                ch.payer.ram -= ch.charged
                ch.payer, ch.charged = None, 0
            self._uncharge(ch.uid)

    # -- messages by reference ---------------------------------------------

    def _open_side(self, ctx, cid, side):
        """The channel and ctx's end `side` of it (one context may hold both)."""
        ch = self.channels.get(cid)
        if ch is None or ch.ends[side].ctx is not ctx or ch.ends[side].gone:
            raise KernelError(errno.ENOENT, "channel: %d is not an open channel of this context"
                              % cid)
        return ch, side

    def pass_share(self, ctx, cid, ref, flags):
        """CHAN_PASS: the ticket and the data's length.  ref: a share-point
        id, an ANON portal's handle (FAYT_PASS_PORTAL) or, to cancel, a
        ticket."""
        ch, side = self._open_side(ctx, cid, 1 if flags & lib.FAYT_PASS_ACCEPTOR else 0)
        if flags & lib.FAYT_PASS_CANCEL:
            p = ch.passed.get(ref)
            if p is None or p.to == side:
                raise KernelError(errno.ENOENT, "share: %d is not an untaken pass of this end"
                                  % ref)
            del ch.passed[ref]
            p.close()
            return 0, 0
        if sum(1 for p in ch.passed.values() if p.to != side) >= lib.FAYT_PASS_PENDING_MAX:
            raise KernelError(errno.ENOSPC, "channel: %d passes the peer has not taken, the "
                              "most (FAYT_PASS_PENDING_MAX)" % lib.FAYT_PASS_PENDING_MAX)
        if ch.ends[1 - side].gone:
            raise KernelError(errno.EPIPE, "channel: the peer is gone")
        # Each untaken pass holds faytd's descriptors: bounded per uid too,
        # or one uid's channels could take every descriptor faytd has.
        held = self.passes_per_uid.get(ctx.uid, 0)
        if not ctx.is_core and held >= self.k.cfg["max_passes_per_uid"]:
            raise KernelError(errno.ENOSPC, "uid %d has %d passes its peers have not taken, "
                              "its limit (config max_passes_per_uid)" % (ctx.uid, held))
        writable = bool(flags & lib.FAYT_PASS_WRITE)
        if flags & lib.FAYT_PASS_PORTAL:
            obj, length, offset, what = self._portal_source(ctx, ref, writable)
        else:
            obj, length, offset, what = self._share_source(ctx, ref)
        fds = []
        try:
            fds.append(obj.open_fd(readonly=not writable))
            if obj.tail is not None:
                fds.append(obj.tail.open_fd(readonly=not writable))
            map_length = length + offset
            out_flags = flags & (lib.FAYT_PASS_COPY | lib.FAYT_PASS_WRITE | lib.FAYT_PASS_PORTAL)
            if flags & lib.FAYT_PASS_COPY:
                charged = -(-length // PAGE) * PAGE      # the copy's pages, while faytd holds it
                self.k.charge(ctx, charged)
                src, fds = fds, []          # _sealed_copy closes them, whatever happens
                try:
                    fds = [_sealed_copy(src, offset, length, ch.id)]
                except BaseException:
                    ctx.ram -= charged
                    raise
                offset, map_length = 0, length
            elif obj.tail is not None:
                out_flags |= lib.FAYT_TAKE_SPLIT
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise KernelError(errno.ENOMEM, "faytd cannot hand over %s: %s"
                              % (what, e.strerror)) from None
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        ticket, ch.next_ticket = ch.next_ticket, ch.next_ticket + 1
        p = ch.passed[ticket] = Passed(1 - side, fds, length, offset, map_length, out_flags)
        p.uid, p.counts = ctx.uid, self.passes_per_uid
        self.passes_per_uid[ctx.uid] = held + 1
        if flags & lib.FAYT_PASS_COPY:
            p.payer, p.charged = ctx, charged
        return ticket, length

    def _share_source(self, ctx, sp_id):
        """A share-point ctx maps now (the core's record, never the
        request): its object, length, data offset, and how to name it."""
        sp = self.k.sharepoints.get(sp_id, keep=False) if 0 < sp_id < 2 ** 32 else None
        if sp is None or not any(c == ctx.id for c, _ in sp.captured):
            raise KernelError(errno.EPERM, "share: %d is not a share-point this context maps"
                              % sp_id)
        clib.fayt_core_sp_expose(core, sp.id)          # never recycled: others may map it
        return sp.backing, sp.length, sp.data_offset, "share-point %d" % sp_id

    def _portal_source(self, ctx, handle, writable):
        """An ANON portal ctx maps now, by its handle in ctx's own table of
        mappings (a handle is a context's: another's names nothing here).
        Looking it up marks its object as Python's, so the core never
        recycles it into another portal: the peer may map it.  A peek: one
        pass must not leave a lookup behind for the context's life."""
        m = ctx.mappings.peek(handle) if 0 < handle < 2 ** 63 else None
        if m is None:
            raise KernelError(errno.EBADF, "share: handle %d names no mapping of this context"
                              % handle)
        if not isinstance(m, CoreMapping) or m.sp_id or m.type != lib.FAYT_PORTAL_ANON:
            raise KernelError(errno.EINVAL, "share: handle %d is not an ANON portal (a "
                              "share-point goes by its id; other portals do not go)" % handle)
        Policy.check_prot(lib.FAYT_PROT_READ | (lib.FAYT_PROT_WRITE if writable else 0),
                          m.prot, "the ANON portal's mapping (handle %d)" % handle)
        return m.backing, m.length, 0, "ANON portal %d" % handle

    def take(self, ctx, cid, ticket):
        """CHAN_TAKE: the Passed (its fds now the caller's to send and close)."""
        ch = self.channels.get(cid)
        p = ch.passed.get(ticket) if ch is not None else None
        if p is None or ch.ends[p.to].ctx is not ctx or ch.ends[p.to].gone:
            raise KernelError(errno.EPERM, "ticket: %d is not a share-point passed to this end "
                              "of channel %d" % (ticket, cid))
        del ch.passed[ticket]
        p.uncharge()            # the receiver's mapping now: faytd cannot see it unmapped
        p.uncount()             # its descriptors are the caller's to send and close
        return p

    def fds(self, ch, side, peer_ctx):
        """The descriptors an end gets (the caller closes them once sent):
        its object read-write, the peer's read-only, its eventfd, the
        peer's, and a pidfd of the peer if one can be had."""
        mine, peer = ch.ends[side], ch.ends[1 - side]
        out = []
        try:
            out.append(os.dup(mine.obj))
            out.append(os.open("/proc/self/fd/%d" % peer.obj, os.O_RDONLY | os.O_CLOEXEC))
            out.append(os.dup(mine.efd))
            out.append(os.dup(peer.efd))
            try:
                out.append(os.pidfd_open(peer_ctx.pid))
            except OSError:
                pass
        except OSError as e:
            for fd in out:
                os.close(fd)
            raise KernelError(errno.ENFILE, "faytd cannot open a channel's objects: %s"
                              % e.strerror) from None
        return out

    def context_gone(self, ctx):
        """Its connection closed or it died: its listeners go (their queues
        reset) and each channel end it held without closing is reset."""
        for lst in [x for x in self.listeners.values() if x.ctx is ctx]:
            self._drop_listener(lst)
        for ch in list(self.channels.values()):
            for i, e in enumerate(ch.ends):
                if e.ctx is ctx and not e.gone:
                    e.gone = True
                    e.reset()
                    ch.ends[1 - i].wake()
            self._maybe_free(ch)

    def count(self):
        return len(self.channels), len(self.listeners)


def channel_bytes(ring_bytes):
    """What a channel's two objects hold: each a header page and its ring."""
    return 2 * (HEADER + ring_bytes)


def _sealed_copy(fds, offset, length, cid):
    """A new memfd holding `length` bytes of the object(s) from `offset`
    (page 0's object then the rest's, when two), sealed against every
    change; the source fds are closed."""
    out = os.memfd_create("fayt-chan-%d-copy" % cid, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(out, length)
        at, pos = 0, offset
        for i, fd in enumerate(fds):
            if i == 0 and len(fds) == 2:
                n = min(length, PAGE - offset)       # page 0's share of the data
            else:
                n = length - at
            src = pos if i == 0 else 0
            while n > 0:
                chunk = os.pread(fd, min(n, 1 << 20), src)
                if not chunk:
                    break
                os.pwrite(out, chunk, at)
                at, src, n = at + len(chunk), src + len(chunk), n - len(chunk)
        os.fchmod(out, 0o600)
        fcntl.fcntl(out, fcntl.F_ADD_SEALS, SEALS | fcntl.F_SEAL_WRITE)
        ro = os.open("/proc/self/fd/%d" % out, os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(out)
        for fd in fds:
            os.close(fd)
    return ro


def _show(name):
    return repr(name.decode("utf-8", "replace"))
