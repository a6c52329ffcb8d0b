"""LISTEN, CONNECT, ACCEPT, CHAN_CLOSE: connected channels (faytd/stream.py,
docs/channels.md)."""
import errno
import os

from libportal._abi import (lib, CHAN_PASS_REQ, CHAN_PASS_REPLY, CHAN_REPLY, CHAN_TAKE_REPLY,
                           CHAN_TAKE_REQ, CONNECT_REQ, HANDLE_REQ, LISTEN_REPLY, LISTEN_REQ)

from ..frames import KernelError
from .discovery import _name
from .wire import unpack


def _head(S, body, what):
    if len(body) < S.size:
        raise KernelError(errno.EINVAL, "%s: expected %d bytes and the name, got %d"
                          % (what, S.size, len(body)))
    return S.unpack_from(body), body[S.size:]


def sys_listen(k, ctx, tid, body, fds):
    (flags, backlog), name = _head(LISTEN_REQ, body, "listen")
    if flags & ~lib.FAYT_LISTEN_CLOSE:
        raise KernelError(errno.EINVAL, "flags: unknown bits %#x" % (flags & ~lib.FAYT_LISTEN_CLOSE))
    if flags & lib.FAYT_LISTEN_CLOSE:
        if len(name) != 8:
            raise KernelError(errno.EINVAL, "listen: closing takes the listener's id (8 bytes), "
                              "got %d" % len(name))
        k.channels.unlisten(ctx, int.from_bytes(name, "little"))
        return b"", []
    backlog = backlog or lib.FAYT_BACKLOG_DEFAULT
    if backlog > lib.FAYT_BACKLOG_MAX:
        raise KernelError(errno.EINVAL, "backlog: %d; at most %d" % (backlog, lib.FAYT_BACKLOG_MAX))
    lst = k.channels.listen(ctx, _name(name), backlog)
    return LISTEN_REPLY.pack(lst.id), [os.dup(lst.efd)]


def sys_connect(k, ctx, tid, body, fds):
    (ring_bytes, reserved), name = _head(CONNECT_REQ, body, "connect")
    if reserved:
        raise KernelError(errno.EINVAL, "reserved: %d, not 0" % reserved)
    ring_bytes = ring_bytes or lib.FAYT_STREAM_RING_DEFAULT
    if (ring_bytes & (ring_bytes - 1) or not
            lib.FAYT_STREAM_RING_MIN <= ring_bytes <= lib.FAYT_STREAM_RING_MAX):
        raise KernelError(errno.EINVAL, "ring_bytes: %d; a power of two from %d to %d"
                          % (ring_bytes, lib.FAYT_STREAM_RING_MIN, lib.FAYT_STREAM_RING_MAX))
    ch, peer = k.channels.connect(ctx, _name(name), ring_bytes)
    return _reply(k, ch, 0, peer)


def sys_accept(k, ctx, tid, body, fds):
    (lid,) = unpack(HANDLE_REQ, body, "accept")
    ch, peer = k.channels.accept(ctx, lid)
    return _reply(k, ch, 1, peer)


def sys_chan_close(k, ctx, tid, body, fds):
    (cid,) = unpack(HANDLE_REQ, body, "chan_close")
    k.channels.close(ctx, cid)
    return b"", []


_PASS_FLAGS = (lib.FAYT_PASS_COPY | lib.FAYT_PASS_WRITE | lib.FAYT_PASS_CANCEL
               | lib.FAYT_PASS_ACCEPTOR | lib.FAYT_PASS_PORTAL)


def sys_chan_pass(k, ctx, tid, body, fds):
    cid, share, flags, reserved = unpack(CHAN_PASS_REQ, body, "chan_pass")
    if flags & ~_PASS_FLAGS:
        raise KernelError(errno.EINVAL, "flags: unknown bits %#x" % (flags & ~_PASS_FLAGS))
    if flags & lib.FAYT_PASS_COPY and flags & lib.FAYT_PASS_WRITE:
        raise KernelError(errno.EINVAL, "flags: COPY hands over an immutable copy: not WRITE")
    if flags & lib.FAYT_PASS_CANCEL and flags & lib.FAYT_PASS_PORTAL:
        raise KernelError(errno.EINVAL, "flags: CANCEL names a ticket: not PORTAL")
    if reserved:
        raise KernelError(errno.EINVAL, "reserved: %d, not 0" % reserved)
    ticket, length = k.channels.pass_share(ctx, cid, share, flags)
    return CHAN_PASS_REPLY.pack(ticket, length), []


def sys_chan_take(k, ctx, tid, body, fds):
    cid, ticket = unpack(CHAN_TAKE_REQ, body, "chan_take")
    p = k.channels.take(ctx, cid, ticket)
    out, p.fds = p.fds, []
    return CHAN_TAKE_REPLY.pack(p.length, p.data_offset, p.map_length, p.flags, 0), out


def _reply(k, ch, side, peer):
    out = k.channels.fds(ch, side, peer)
    cat = peer.category.id if peer.category is not None else 0
    flags = lib.FAYT_CHAN_PIDFD if len(out) == 5 else 0
    return CHAN_REPLY.pack(ch.id, ch.ring_bytes, lib.FAYT_STREAM_HEADER_SIZE + ch.ring_bytes,
                           peer.id, peer.pid, peer.uid, cat, flags, 0), out
