"""PORTAL and UNMAP: decode a portal_req, check the classes, map, reply.

A SPECIAL portal is decoded here like any other, then handed to chain.py
(its range and userfaultfd are the client's; the pager serves it).
"""
import errno
import os

from libportal._abi import lib, PORTAL_REPLY, PORTAL_REQ, PORTAL_REQ_SIZE, REP_HDR

from ..context import Mapping
from ..frames import KernelError, PAGE, pages
from ..policy import Policy, class_names
from . import chain as _chain
from .wire import mapping, string

SHARE, DIRECT, ANON = lib.FAYT_PORTAL_SHARE, lib.FAYT_PORTAL_DIRECT, lib.FAYT_PORTAL_ANON
COW, SPECIAL = lib.FAYT_PORTAL_COW, lib.FAYT_PORTAL_SPECIAL
VALID_TYPES = {ANON, SHARE | ANON, SHARE | DIRECT, DIRECT, COW, SPECIAL, SPECIAL | SHARE}


def decode_portal(k, body):
    if len(body) < PORTAL_REQ_SIZE:
        raise KernelError(errno.EFAULT, "portal_req: %d bytes sent, the struct has %d"
                          % (len(body), PORTAL_REQ_SIZE))
    (t, prot, length, ident_p, share_type, create, chain_p, message_p, addr,
     mlen) = PORTAL_REQ.unpack_from(body)
    if t & ~lib.FAYT_PORTAL_CLASSES:
        raise KernelError(errno.EINVAL, "type: unknown class bits %#x" % (t & ~lib.FAYT_PORTAL_CLASSES))
    if t not in VALID_TYPES:
        raise KernelError(errno.EINVAL, "type: %s is not a valid combination of classes"
                          % class_names(t))
    if prot & ~lib.FAYT_PROT_ALL:
        raise KernelError(errno.EINVAL, "prot: unknown bits %#x" % (prot & ~lib.FAYT_PROT_ALL))
    if addr % PAGE:
        raise KernelError(errno.EINVAL, "morphology.addr: %#x is not 4 KiB aligned" % addr)
    npaddr = pages(mlen) if t & (DIRECT | COW) else 0
    trailer_at = PORTAL_REQ_SIZE + 8 * npaddr
    if len(body) < trailer_at:
        raise KernelError(errno.EFAULT, "morphology.paddr: %d entries named, fewer sent" % npaddr)
    ident = string(body, trailer_at, ident_p, "share.identifier", lib.FAYT_NAME_MAX)
    chain = string(body, trailer_at, chain_p, "sp_req_chain.name", lib.FAYT_NAME_MAX)
    message = string(body, trailer_at, message_p, "sp_req_chain.message", lib.FAYT_MESSAGE_MAX)
    attach = bool(t & SHARE) and create == lib.FAYT_SHARE_ATTACH
    if length < 0 or (length == 0 and not attach):
        raise KernelError(errno.EINVAL, "length: %d; a portal needs at least 1 byte" % length)
    if length > k.cfg["max_portal_length"]:
        raise KernelError(errno.EINVAL, "length: %d is more than one portal may map (%d)"
                          % (length, k.cfg["max_portal_length"]))
    if mlen not in (0, length):
        raise KernelError(errno.EINVAL, "morphology.length: %d differs from length %d"
                          % (mlen, length))
    if t & SHARE:
        if ident is None or ident == b"":
            raise KernelError(errno.EINVAL, "share.identifier: a share-point needs a name")
        if create not in (lib.FAYT_SHARE_ATTACH, lib.FAYT_SHARE_CREATE):
            raise KernelError(errno.EINVAL, "share.create: %d is neither 0 nor 1" % create)
        if share_type == lib.FAYT_SHARE_ADVANCED:
            raise KernelError(errno.ENOSYS, "share.type: the advanced share-point is not built yet")
        if share_type != lib.FAYT_SHARE_TRIVIAL:
            raise KernelError(errno.EINVAL, "share.type: unknown type %d" % share_type)
    elif ident is not None:
        raise KernelError(errno.EINVAL, "share.identifier: given without the SHARE class")
    if (chain is not None or message is not None) and not t & SPECIAL:
        raise KernelError(errno.EINVAL, "sp_req_chain: given without the SPECIAL class")
    return (t, prot, length, addr, ident, create, attach, chain, message,
            (t, prot, length, ident_p, share_type, create, chain_p, message_p, addr))


def sys_portal(k, ctx, tid, body, fds):
    t, prot, length, addr, ident, create, attach, chain, message, req_fields = \
        decode_portal(k, body)
    Policy.check_classes(ctx.category, t)                      # EPERM: nothing created
    if t & SPECIAL:
        return _chain.portal_special(k, ctx, tid, t, prot, length, addr, ident, create, chain,
                                     message, req_fields, fds)
    if fds:
        raise KernelError(errno.EINVAL, "this call takes no file descriptors")
    if t & (DIRECT | COW):
        raise KernelError(errno.ENOSYS, "type: %s portals are not built yet"
                          % class_names(t & (DIRECT | COW)))
    if len(ctx.mappings) >= k.cfg["max_mappings_per_context"]:
        raise KernelError(errno.ENOMEM, "this context has %d mappings, the quota"
                          % len(ctx.mappings))
    if not ctx.check_tid(tid):
        raise KernelError(errno.ESRCH, "tid %d is not a thread of pid %d" % (tid, ctx.pid))
    handle = ctx.new_handle()
    flags = 0
    if t & SHARE:
        table = k.sharepoints
        if ident in table.by_name:
            k.catch_up(ctx)         # a destroy already sent by another process comes first
        if attach:
            sp = table.lookup(ident)
            Policy.check_prot(prot, sp.prot, "share-point %r" % ident.decode())
            if length not in (0, sp.backing.length):
                raise KernelError(errno.EINVAL, "length: %d; share-point %r maps %d bytes"
                                  % (length, ident.decode(), sp.backing.length))
        else:
            k.charge(ctx, pages(length) * PAGE)
            try:
                sp = table.create(ident, length, prot, ctx.pid, ctx.uid, ctx.start)
            except BaseException:
                ctx.ram -= pages(length) * PAGE
                raise
            sp.charged = (ctx, pages(length) * PAGE)
            flags |= lib.FAYT_PORTAL_REPLY_CREATED
        table.capture(sp, (ctx.id, handle), ctx.pid, tid)
        backing, data_offset, sp_id, granted = sp.backing, sp.data_offset, sp.id, prot
    else:
        if length > k.frames.nframes * PAGE:
            raise KernelError(errno.ENOMEM, "length: %d bytes is more than faytd's RAM" % length)
        backing = k.allocate_for(ctx, pages(length) * PAGE)
        sp, data_offset, sp_id, granted = None, 0, 0, prot
    m = Mapping(handle, t, backing, sp, ctx.pid, tid, granted)
    if sp is None:
        m.charged = backing.length
    k.add_mapping(ctx, m)
    # The reply must fit FAYT_MSG_MAX: a portal of more frames than fit
    # lists its first ones (nframes says how many), not a reply cut short.
    paddrs = k.frames.paddrs(backing)[:_PADDR_FIT]
    if backing.tail is not None:
        flags |= lib.FAYT_PORTAL_REPLY_SPLIT
    reply = (PORTAL_REPLY.pack(handle, backing.length, data_offset, sp_id, len(paddrs),
                               granted, flags)
             + PORTAL_REQ.pack(*req_fields, backing.length)      # morphology filled
             + paddrs.tobytes())
    if backing.tail is None:
        return reply, [backing.open_fd()]
    # A split share-point: page 0 read-write (the lock), the rest read-only
    # unless PROT_WRITE was granted (the object is 0600: another uid cannot
    # reopen that descriptor read-write).
    fd = backing.open_fd()
    try:
        return reply, [fd, backing.tail.open_fd(readonly=not granted & lib.FAYT_PROT_WRITE)]
    except BaseException:
        os.close(fd)
        raise


_PADDR_FIT = (lib.FAYT_MSG_MAX - REP_HDR.size - PORTAL_REPLY.size - PORTAL_REQ_SIZE) // 8


def sys_unmap(k, ctx, tid, body, fds):
    k.unmap(ctx, mapping(ctx, body))
    return b"", []
