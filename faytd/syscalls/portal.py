"""PORTAL and UNMAP: decode a portal_req, check the classes, map, reply.

DIRECT, SHARE|DIRECT and COW go to direct.py (faytd/direct.py, faytd/cow.py).

portal_req is decoded by the core's one decoder (faytd/core/decode.c), the
C path's too.  A SPECIAL portal is then handed to chain.py (its range and
userfaultfd are the client's; the pager serves it).  An ANON or SHARE
portal, and the UNMAP of a mapping the core holds, are one call of the core
(faytd/core/table.c: fayt_core_portal, fayt_core_unmap), the one the C path
makes for the calls it serves; this handler asks Policy first, and the
core's refusals come back with their errno and message.
"""
import errno
import os

from libportal._abi import ffi as _abi_ffi, lib

from ..frames import KernelError
from ..native import ffi as cffi, lib as clib
from ..policy import Policy
from . import chain as _chain, direct as _direct
from .wire import handle_of

SHARE, DIRECT, ANON = lib.FAYT_PORTAL_SHARE, lib.FAYT_PORTAL_DIRECT, lib.FAYT_PORTAL_ANON
COW, SPECIAL = lib.FAYT_PORTAL_COW, lib.FAYT_PORTAL_SPECIAL

# Buffers of one call (a catch-up may perform other calls in the middle of
# one: the decoded request is each call's own).
_MSG = cffi.new("char[]", 256)
_BODY = cffi.new("uint8_t[]", lib.FAYT_MSG_MAX)
_OUT = cffi.new("struct fayt_core_reply *")
_SP_ID = _abi_ffi.offsetof("struct fayt_portal_reply", "sp_id")    # the trace's


def _refused(err):
    return KernelError(err, cffi.string(_MSG).decode())


def decode_portal(k, body):
    """The request's portal_req, decoded and checked by the core's one
    decoder: (type, prot, length, addr, identifier, create, attach, chain,
    message, the request's fields, the decoded struct); KernelError with its
    errno and message if it refuses."""
    a = cffi.new("struct fayt_portal_args *")
    err = clib.fayt_portal_decode(k.fast, body, len(body), a, _MSG, 256)
    if err:
        raise _refused(err)
    ident = body[a.ident_at:a.ident_at + a.ident_len] if a.ident_at >= 0 else None
    chain = body[a.chain_at:a.chain_at + a.chain_len] if a.chain_at >= 0 else None
    message = body[a.message_at:a.message_at + a.message_len] if a.message_at >= 0 else None
    t, create = a.type, a.create
    return (t, a.prot, a.length, a.addr, ident, create, bool(a.attach), chain, message,
            (t, a.prot, a.length, a.ident_p, a.share_type, create, a.chain_p, a.message_p,
             a.addr), a)


def sys_portal(k, ctx, tid, body, fds):
    t, prot, length, addr, ident, create, attach, chain, message, req_fields, args = \
        decode_portal(k, body)
    Policy.check_classes(ctx.category, t)                      # EPERM: nothing created
    if t & SHARE:       # the identifier in its namespace; EPERM for another's (names.c)
        ident = k.sharepoints.resolve(ctx, ident, not attach)
    if t & SPECIAL:
        return _chain.portal_special(k, ctx, tid, t, prot, length, addr, ident, create, chain,
                                     message, req_fields, fds)
    if fds:
        raise KernelError(errno.EINVAL, "this call takes no file descriptors")
    if t == DIRECT:
        return _direct.portal_direct(k, ctx, tid, prot, length, body, args, req_fields)
    if t == COW:
        return _direct.portal_cow(k, ctx, tid, prot, length, body, args, req_fields, ident)
    if len(ctx.mappings) >= k.cfg["max_mappings_per_context"]:
        raise KernelError(errno.ENOMEM, "this context has %d mappings, the quota"
                          % len(ctx.mappings))
    if not ctx.check_tid(tid):
        raise KernelError(errno.ESRCH, "tid %d is not a thread of pid %d" % (tid, ctx.pid))
    if t & SHARE and ident in k.sharepoints.by_name:
        k.catch_up(ctx)             # a destroy already sent by another process comes first
        if attach:
            sp = k.sharepoints.get(k.sharepoints.lookup(ident), keep=False)
            if sp is not None:
                Policy.check_prot(prot, sp.prot, "share-point %r" % ident.decode())
    if t == SHARE | DIRECT:
        if not attach:
            return _direct.sharepoint_direct(k, ctx, tid, prot, length, body, args)
        args.type = SHARE | ANON        # attached as any share-point is
    err = clib.fayt_core_portal(k.fast, ctx.fast, tid, body, args, _BODY, _OUT, _MSG, 256)
    if err:
        raise _refused(err)
    if t & SHARE and k.tracing.on:
        k.tracing.share(ctx, "attach" if attach else "create",
                        int.from_bytes(cffi.buffer(_BODY, _OUT.len)[_SP_ID:_SP_ID + 4],
                                       "little"), ident)
    # The server closes what it sent: of a descriptor the core holds, a copy.
    sent = [os.dup(fd) if _OUT.borrowed & (1 << i) else fd
            for i, fd in enumerate(_OUT.fds[0:_OUT.nfds])]
    return cffi.buffer(_BODY, _OUT.len)[:], sent


def core_unmap(k, ctx, handle, how):
    """The core's mapping `handle` (how: FAYT_CORE_UNMAP, _UNMAP_DESTROY,
    _DESTROY): True once performed (a destroy's notices sent), False if the
    core holds no such mapping."""
    sp_id = clib.fayt_core_map_sp(k.fast, ctx.fast, handle)
    if sp_id < 0:
        return False
    sp = k.sharepoints.get(sp_id, keep=False) if sp_id and how != clib.FAYT_CORE_UNMAP else None
    captured = None
    if sp is not None and (how == clib.FAYT_CORE_DESTROY or not sp.destroyed):
        Policy.check_destroy(ctx, sp)
        captured = sp.captured      # who is told of the destroy: who maps it now
    destroyed = cffi.new("uint32_t *")
    err = clib.fayt_core_unmap(k.fast, ctx.fast, handle, how, destroyed, _MSG, 256)
    if err:
        raise _refused(err)
    if destroyed[0] and sp is not None:
        k.sharepoints.destroyed(sp, captured)
    return True


def own_mapping(ctx, handle):
    """One of Python's own mappings of ctx (SPECIAL portals, notification
    stacks): EBADF if there is none."""
    m = ctx.mappings.own_get(handle)
    if m is None:
        raise KernelError(errno.EBADF, "handle: %d names no mapping of this context" % handle)
    return m


def sys_unmap(k, ctx, tid, body, fds):
    handle = handle_of(body)
    if not core_unmap(k, ctx, handle, clib.FAYT_CORE_UNMAP):
        k.unmap(ctx, own_mapping(ctx, handle))
    return b"", []
