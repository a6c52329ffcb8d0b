"""CHAIN_JOIN, CHAIN_LEAVE, CHAIN_BACK, CHAIN_UNBACK, and the SPECIAL branch
of PORTAL: a chain's servers and the portals they serve (the pager)."""
import errno
import os

from libportal._abi import (lib, CHAIN_JOIN as JOIN_REQ, CHAIN_JOIN_REPLY as JOIN_REPLY,
                            CHAIN_LEAVE as LEAVE_REQ, CHAIN_BACK as BACK_REQ,
                            CHAIN_BACK_REPLY as BACK_REPLY, PORTAL_REPLY, PORTAL_REQ)

from ..frames import KernelError, PAGE
from ..policy import Policy
from .wire import unpack, utf8


def _is_userfaultfd(fd):
    try:
        return os.readlink("/proc/self/fd/%d" % fd) == "anon_inode:[userfaultfd]"
    except OSError:
        return False


def portal_special(k, ctx, tid, t, prot, length, addr, ident, create, chain, message,
                   req_fields, fds):
    """The SPECIAL branch of portal(): the region is the client's, registered
    with the userfaultfd it sent.  For a region that maps a chain server's
    backing the reply grants a read-only fd of it and says
    FAYT_PORTAL_REPLY_BACKED; a SPECIAL|SHARE's reply grants the share's object."""
    if len(ctx.mappings) >= k.cfg["max_mappings_per_context"]:
        raise KernelError(errno.ENOMEM, "this context has %d mappings, the quota"
                          % len(ctx.mappings))
    share = t & lib.FAYT_PORTAL_SHARE
    if (chain is None or chain == b"") and not (share and not create):
        raise KernelError(errno.EINVAL, "sp_req_chain.name: a SPECIAL portal needs a chain")
    if len(fds) != 1 or not _is_userfaultfd(fds[0]):
        raise KernelError(errno.EINVAL, "a SPECIAL portal comes with exactly one fd, the "
                          "userfaultfd registered over its range")
    if addr == 0:
        raise KernelError(errno.EINVAL, "morphology.addr: a SPECIAL portal names the range "
                          "its userfaultfd registered")
    if not ctx.check_tid(tid):
        raise KernelError(errno.ESRCH, "tid %d is not a thread of pid %d" % (tid, ctx.pid))
    length = (length + PAGE - 1) // PAGE * PAGE
    sh = None
    if share:
        sh = k.pager.regions.special_share(ctx, ident, create, length)
        if sh is not None:
            Policy.check_prot(prot, sh.prot, "special share-point %r" % ident.decode())
    r, grant = k.pager.regions.map_special(ctx, tid, t, prot, length, addr, chain, message, fds[0],
                                   ident, sh)
    sh = r.share
    flags = lib.FAYT_PORTAL_REPLY_CREATED if sh is not None and create else 0
    if r.backing is not None:           # answered by reference: grant is its read-only fd
        flags |= lib.FAYT_PORTAL_REPLY_BACKED
    reply = (PORTAL_REPLY.pack(r.handle, length, 0, sh.id if sh else r.id, 0, prot, flags)
             + PORTAL_REQ.pack(*req_fields, length))
    return reply, [sh.backing.open_fd()] if sh is not None else grant


def sys_chain_join(k, ctx, tid, body, fds):
    slots, run_max, flags, timeout_ms, raw = unpack(JOIN_REQ, body, "chain_join")
    end = raw.find(b"\0")
    if end < 0:
        raise KernelError(errno.ENAMETOOLONG, "name: not terminated in %d bytes" % len(raw))
    if end == 0:
        raise KernelError(errno.EINVAL, "name: a chain needs a name")
    name = utf8(raw[:end], "name").decode()
    slots = slots or 8
    run_max = run_max or 65536
    if not 1 <= slots <= lib.FAYT_PAGER_SLOTS_MAX:
        raise KernelError(errno.EINVAL, "slots: %d is not in 1..%d" % (slots, lib.FAYT_PAGER_SLOTS_MAX))
    if run_max % PAGE or not PAGE <= run_max <= lib.FAYT_PAGER_RUN_MAX:
        raise KernelError(errno.EINVAL, "run_max: %d is not a multiple of 4096 in 4096..%d"
                          % (run_max, lib.FAYT_PAGER_RUN_MAX))
    if flags & ~lib.FAYT_CHAIN_FLAGS:
        raise KernelError(errno.EINVAL, "flags: unknown bits %#x" % (flags & ~lib.FAYT_CHAIN_FLAGS))
    Policy.check_serve_chain(ctx, name)
    m = k.pager.chains.join(ctx, name, slots, run_max, flags, timeout_ms)
    c = m.chain
    reply = JOIN_REPLY.pack(c.id, len(c.members) - 1, m.nslots, m.run_max, len(m.map),
                            c.flags, c.timeout_ms)
    return reply, [m.backing.open_fd(), os.dup(m.efd)]


def sys_chain_leave(k, ctx, tid, body, fds):
    chain_id = unpack(LEAVE_REQ, body, "chain_leave")[0]
    k.pager.chains.leave(ctx, chain_id)
    return b"", []


def _decode_back(op, body):
    """(chain id, handle, message) of a CHAIN_BACK or CHAIN_UNBACK body."""
    chain_id, mlen, handle, raw = unpack(BACK_REQ, body, op)
    if mlen > lib.FAYT_MESSAGE_MAX:
        raise KernelError(errno.ENAMETOOLONG, "message: %d bytes, longer than %d"
                          % (mlen, lib.FAYT_MESSAGE_MAX))
    message = raw[:mlen]
    if b"\0" in message:
        raise KernelError(errno.EINVAL, "message: holds a NUL byte (no portal's message can)")
    return chain_id, handle, utf8(message, "message")


def sys_chain_back(k, ctx, tid, body, fds):
    chain_id, handle, message = _decode_back("chain_back", body)
    b = k.pager.chains.back(ctx, chain_id, handle, message)
    return BACK_REPLY.pack(b.id, 0), []


def sys_chain_unback(k, ctx, tid, body, fds):
    chain_id, handle, message = _decode_back("chain_unback", body)
    if handle:
        raise KernelError(errno.EINVAL, "handle: %d; unback names the message only (0)" % handle)
    k.pager.chains.unback(ctx, chain_id, message)
    return b"", []
