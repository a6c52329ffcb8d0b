"""GRANT, and the DIRECT, SHARE|DIRECT and COW branches of PORTAL: maps
of RAM frames (faytd/direct.py holds the grants and performs the
mappings; faytd/cow.py the COW views)."""
import array
import errno
import os

from libportal._abi import lib, COW_PADDR_REQ, GRANT_REQ, DIRECT_RUN, PORTAL_REPLY, PORTAL_REQ, PORTAL_REQ_SIZE

from ..context import CoreMapping
from ..frames import KernelError, PAGE
from ..native import core, ffi as cffi, lib as clib
from ..policy import Policy
from .wire import unpack

KINDS = (lib.FAYT_GRANT_CONTEXT, lib.FAYT_GRANT_CATEGORY)


def paddrs_of(body, args):
    """The paddr[] entries a DIRECT or COW request sent (the decoder checked
    that morphology.length's worth of them are there)."""
    n = (args.mlen + 4095) // 4096
    return array.array("Q", body[PORTAL_REQ_SIZE:PORTAL_REQ_SIZE + 8 * n])


def _runs_reply(k, ctx, m, runs, parts, length, prot, flags, req_fields, readonly):
    """A reply whose runs the client maps (DIRECT, COW): one fd per part."""
    index = {id(p): i for i, p in enumerate(parts)}
    fds = []
    try:
        for p in parts:
            fds.append(p.open_fd(readonly=readonly))
    except BaseException:
        for fd in fds:
            os.close(fd)
        k.unmap(ctx, m)
        raise
    reply = (PORTAL_REPLY.pack(m.handle, length, 0, 0, 0, prot, flags)
             + PORTAL_REQ.pack(*req_fields, length)
             + b"".join(DIRECT_RUN.pack(index[id(p)], n, at, page * PAGE)
                        for p, page, n, at in runs))
    return reply, fds


def portal_direct(k, ctx, tid, prot, length, body, args, req_fields):
    """PORTAL of class DIRECT: the frames paddr[] names, mapped at the
    client's range; one fd per object, read-only without PROT_WRITE."""
    paddrs = paddrs_of(body, args)
    if k.devices.by_id and len(paddrs) and k.devices.window_at(paddrs[0]) is None:
        k.devices.check_no_window(paddrs)
    if k.devices.by_id and len(paddrs) and k.devices.window_at(paddrs[0]) is not None:
        m, runs, parts = k.devices.map(ctx, tid, prot, length, paddrs,
                                       lambda c, w: Policy.check_mmio(c, w, "morphology.paddr"))
    else:
        m, runs, parts = k.direct.map(ctx, tid, prot, length, paddrs)
    return _runs_reply(k, ctx, m, runs, parts, length, prot, lib.FAYT_PORTAL_REPLY_DIRECT,
                       req_fields, not prot & lib.FAYT_PROT_WRITE)


def portal_cow(k, ctx, tid, prot, length, body, args, req_fields, ident=None):
    """PORTAL of class COW: share.type is the mode; the source is paddr[],
    or the share-point `ident` names (share.identifier; the decoder checked
    that paddr[] is then empty).  At least on write: the source's runs,
    read-only fds, mapped MAP_PRIVATE by the client.  Strict snapshot:
    deferred until the copy is made; one run of the new object, whose
    frames the reply lists."""
    paddrs = paddrs_of(body, args)
    k.cow.check_mode(args.share_type)
    src = None if ident is None else k.cow.sharepoint_source(ctx, ident, length)
    if args.share_type == lib.FAYT_COW_ON_WRITE:
        m, runs, parts = k.cow.on_write(ctx, tid, prot, length, paddrs, src)
        return _runs_reply(k, ctx, m, runs, parts, length, prot, lib.FAYT_PORTAL_REPLY_DIRECT
                           | lib.FAYT_PORTAL_REPLY_PRIVATE, req_fields, True)

    def reply(m, fd):
        n = length // PAGE
        fit = min(n, (lib.FAYT_MSG_MAX - 200 - DIRECT_RUN.size) // 8)
        return (PORTAL_REPLY.pack(m.handle, length, 0, 0, fit, prot,
                                  lib.FAYT_PORTAL_REPLY_DIRECT)
                + PORTAL_REQ.pack(*req_fields, length)
                + array.array("Q", [k.frames.paddr(f) for f in m.backing.frames[:fit]]).tobytes()
                + DIRECT_RUN.pack(0, n, 0, 0)), [fd]
    return k.cow.snapshot(ctx, tid, prot, length, paddrs, reply, src), []


_MSG = cffi.new("char[]", 256)
_BODY = cffi.new("uint8_t[]", lib.FAYT_MSG_MAX)
_OUT = cffi.new("struct fayt_core_reply *")


def sharepoint_direct(k, ctx, tid, prot, length, body, args):
    """PORTAL of class SHARE|DIRECT, create: a share-point over the frames
    of one granted ANON portal, all of them in order (its one object, so
    that attaching maps it from offset 0).  Every mapper writes the lock,
    so the grant must allow PROT_READ|PROT_WRITE."""
    paddrs = paddrs_of(body, args)
    for i, pa in enumerate(paddrs):
        w = k.devices.window_at(pa)
        if w is not None:
            raise KernelError(errno.EINVAL, "morphology.paddr[%d]: %#x is in device window %s: "
                              "a share-point's meta-structure would overwrite its registers "
                              "(SHARE|DIRECT is over granted RAM only)" % (i, pa, w.name))
    k.direct.check_range(length, paddrs)
    frames, runs, objects = k.direct.resolve(ctx, prot | lib.FAYT_PROT_READ
                                             | lib.FAYT_PROT_WRITE, paddrs)
    obj = objects[0]
    info = cffi.new("struct fayt_map_info *")
    if (len(runs) != 1 or runs[0][0] is not obj or runs[0][1] != 0 or obj.tail is not None
            or runs[0][2] != len(obj.frames)
            or clib.fayt_core_oid_info(core, obj.id, info, cffi.NULL, 0) or info.sp_id):
        raise KernelError(errno.EINVAL, "morphology.paddr: a SHARE|DIRECT share-point is one "
                          "whole object: name every frame of one granted ANON portal, in order "
                          "(%d frames named)" % len(paddrs))
    err = clib.fayt_core_sp_over(core, ctx.fast, tid, body, args, obj.name.encode(),
                                 cffi.from_buffer("uint32_t[]", frames), len(frames), _BODY, _OUT,
                                 _MSG, 256)
    if err:
        raise KernelError(err, cffi.string(_MSG).decode())
    return cffi.buffer(_BODY, _OUT.len)[:], [_OUT.fds[0]]


def sys_grant(k, ctx, tid, body, fds):
    handle, kind, to, prot, flags = unpack(GRANT_REQ, body, "grant")
    if flags & ~lib.FAYT_GRANT_REVOKE:
        raise KernelError(errno.EINVAL, "flags: unknown bits %#x"
                          % (flags & ~lib.FAYT_GRANT_REVOKE))
    if kind not in KINDS:
        raise KernelError(errno.EINVAL, "kind: %d is neither FAYT_GRANT_CONTEXT (1) nor "
                          "FAYT_GRANT_CATEGORY (2)" % kind)
    if prot & ~lib.FAYT_PROT_ALL:
        raise KernelError(errno.EINVAL, "prot: unknown bits %#x" % (prot & ~lib.FAYT_PROT_ALL))
    m = ctx.mappings.get(handle)
    if m is None:
        raise KernelError(errno.EBADF, "handle: %d names no mapping of this context" % handle)
    if not isinstance(m, CoreMapping) or m.type in (lib.FAYT_PORTAL_DIRECT, lib.FAYT_PORTAL_COW):
        raise KernelError(errno.EINVAL, "handle: %d is not an ANON portal or a share-point "
                          "(only those are granted)" % handle)
    sp = k.sharepoints.get(m.sp_id, keep=False) if m.sp_id else None
    Policy.check_grant(ctx, m, sp, prot)
    k.direct.grant(ctx, handle, m.backing, kind, to, prot, bool(flags & lib.FAYT_GRANT_REVOKE))
    return b"", []


def sys_cow_paddr(k, ctx, tid, body, fds):
    """COW_PADDR: frames for the pages a view has written."""
    if len(body) < COW_PADDR_REQ.size:
        raise KernelError(errno.EINVAL, "cow_paddr: expected at least %d bytes, got %d"
                          % (COW_PADDR_REQ.size, len(body)))
    handle, base, n, reserved = COW_PADDR_REQ.unpack_from(body)
    if reserved:
        raise KernelError(errno.EINVAL, "reserved: %d, not 0" % reserved)
    if len(body) != COW_PADDR_REQ.size + 4 * n:
        raise KernelError(errno.EINVAL, "npages: %d pages named, %d bytes of them sent"
                          % (n, len(body) - COW_PADDR_REQ.size))
    if base % PAGE:
        raise KernelError(errno.EINVAL, "base: %#x is not 4 KiB aligned" % base)
    pages = array.array("I", body[COW_PADDR_REQ.size:])
    return array.array("Q", k.cow.assign(ctx, handle, base, pages)).tobytes(), []
