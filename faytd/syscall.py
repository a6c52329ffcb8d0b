"""The syscall layer: decode a request, check rights, perform, reply.

Each handler takes (kernel, context, tid, body, fds) and returns
(reply body, fds to grant); the server closes those fds once sent.  It
raises KernelError(errno, message) to fail.
Decoding copies nothing it has not bounds-checked, the way a kernel's
copy_from_user would: a pointer field of portal_req is 0 or 1 + an offset into
the message's trailer, and the string there must end inside it.
Objects (frames, sharepoint, context) never see the wire format.
"""
import errno
import json
import logging
import os

from libportal._abi import (lib, HELLO_REQ, HELLO_REPLY, HANDLE_REQ, LIST_REQ, PORTAL_REPLY, PORTAL_REQ,
                            PORTAL_REQ_SIZE, REP_HDR)

from . import stats as _stats
from .context import Mapping
from .frames import KernelError, PAGE, pages
from .policy import Policy, class_names

log = logging.getLogger("faytd")

SHARE, DIRECT, ANON = lib.FAYT_PORTAL_SHARE, lib.FAYT_PORTAL_DIRECT, lib.FAYT_PORTAL_ANON
COW, SPECIAL = lib.FAYT_PORTAL_COW, lib.FAYT_PORTAL_SPECIAL
VALID_TYPES = {ANON, SHARE | ANON, SHARE | DIRECT, DIRECT, COW, SPECIAL, SPECIAL | SHARE}


def _string(body, trailer_at, ptr, field, limit):
    """The NUL-terminated string a pointer field names, or None for NULL."""
    if ptr == 0:
        return None
    start = trailer_at + ptr - 1
    if ptr < 0 or start >= len(body):
        raise KernelError(errno.EFAULT, "%s: points outside the request" % field)
    end = body.find(b"\0", start, start + limit + 1)
    if end < 0:
        if len(body) - start > limit:
            raise KernelError(errno.ENAMETOOLONG, "%s: longer than %d bytes" % (field, limit))
        raise KernelError(errno.EFAULT, "%s: not terminated inside the request" % field)
    s = body[start:end]
    try:
        s.decode("utf-8")
    except UnicodeDecodeError:
        raise KernelError(errno.EINVAL, "%s: not valid UTF-8" % field) from None
    return s


def sys_hello(k, ctx, tid, body, fds):
    _check_wire_abi(ctx, body)
    if ctx.registered:
        raise KernelError(errno.EALREADY, "hello: context already registered")
    if ctx.category is None:
        raise KernelError(errno.EPERM, "hello: no policy rule admits uid %d gid %d exe %s"
                          % (ctx.uid, ctx.gid, ctx.exe))
    ctx.make_page(k.frames.tag)
    k.registered(ctx)
    c = ctx.category
    if c.classes & (SHARE | ANON) == SHARE | ANON:
        ctx.fast.flags |= lib.FAYT_FAST_CONN_SHARE     # the fast path may create for it
    if c.classes & ANON:
        ctx.fast.flags |= lib.FAYT_FAST_CONN_ANON
    return HELLO_REPLY.pack(ctx.id, c.id, c.classes, lib.FAYT_WIRE_ABI), [ctx.page.open_fd()]


def _check_wire_abi(ctx, body):
    """EPROTO unless the client speaks faytd's wire ABI (fayt/syscall.h).
    The version is read first whatever the body's length: a HELLO of
    another layout is refused by its version.  No body: version 0."""
    if 0 < len(body) < 4:
        raise KernelError(errno.EINVAL, "hello: body of %d bytes; fayt_hello_req has %d"
                          % (len(body), HELLO_REQ.size))
    theirs = int.from_bytes(body[:4], "little")      # fayt_hello_req.wire_abi; 0 if no body
    if theirs != lib.FAYT_WIRE_ABI:
        why = ("hello: wire ABI mismatch: the client speaks version %d%s, this faytd speaks "
               "version %d (install the same fayt-portals on both sides)"
               % (theirs, " (a HELLO without a version)" if not body else "",
                  lib.FAYT_WIRE_ABI))
        log.warning("context %d (pid %d, uid %d, exe %s): %s", ctx.id, ctx.pid, ctx.uid,
                    ctx.exe, why)
        raise KernelError(errno.EPROTO, why)
    if len(body) != HELLO_REQ.size:
        raise KernelError(errno.EINVAL, "hello: body of %d bytes; fayt_hello_req has %d"
                          % (len(body), HELLO_REQ.size))
    if HELLO_REQ.unpack(body)[1]:
        raise KernelError(errno.EINVAL, "hello: reserved: must be 0")


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
    ident = _string(body, trailer_at, ident_p, "share.identifier", lib.FAYT_NAME_MAX)
    chain = _string(body, trailer_at, chain_p, "sp_req_chain.name", lib.FAYT_NAME_MAX)
    message = _string(body, trailer_at, message_p, "sp_req_chain.message", lib.FAYT_MESSAGE_MAX)
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
    return t, prot, length, addr, ident, create, attach, (t, prot, length, ident_p, share_type,
                                                         create, chain_p, message_p, addr)


def sys_portal(k, ctx, tid, body, fds):
    t, prot, length, addr, ident, create, attach, req_fields = decode_portal(k, body)
    Policy.check_classes(ctx.category, t)                      # EPERM: nothing created
    if t & SPECIAL:
        return _portal_special(k, ctx, tid, body, t, prot, length, addr, req_fields, fds)
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
            if prot & ~sp.prot:
                raise KernelError(errno.EACCES, "prot: %#x asked, share-point %r grants %#x"
                                  % (prot, ident.decode(), sp.prot))
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


def _portal_special(k, ctx, tid, body, t, prot, length, addr, req_fields, fds):
    """SPECIAL: the client's own range and its userfaultfd (pager.py)."""
    if len(ctx.mappings) >= k.cfg["max_mappings_per_context"]:
        raise KernelError(errno.ENOMEM, "this context has %d mappings, the quota"
                          % len(ctx.mappings))
    trailer_at = PORTAL_REQ_SIZE
    chain = _string(body, trailer_at, req_fields[6], "sp_req_chain.name", lib.FAYT_NAME_MAX)
    message = _string(body, trailer_at, req_fields[7], "sp_req_chain.message",
                      lib.FAYT_MESSAGE_MAX)
    ident = _string(body, trailer_at, req_fields[3], "share.identifier", lib.FAYT_NAME_MAX)
    create = req_fields[5]
    handle, mapped, r, grant = _pager.portal_special(k, ctx, tid, t, prot, length, addr, chain,
                                                     message, fds, ident, create)
    sh = r.share
    flags = lib.FAYT_PORTAL_REPLY_CREATED if sh is not None and create else 0
    if r.backing is not None:           # answered by reference: grant is its read-only fd
        flags |= lib.FAYT_PORTAL_REPLY_BACKED
    reply = (PORTAL_REPLY.pack(handle, mapped, 0, sh.id if sh else r.id, 0, prot, flags)
             + PORTAL_REQ.pack(*req_fields, mapped))
    return reply, [sh.backing.open_fd()] if sh is not None else grant


def _mapping(ctx, body):
    if len(body) != HANDLE_REQ.size:
        raise KernelError(errno.EINVAL, "handle: expected %d bytes, got %d"
                          % (HANDLE_REQ.size, len(body)))
    (handle,) = HANDLE_REQ.unpack(body)
    m = ctx.mappings.get(handle)
    if m is None:
        raise KernelError(errno.EBADF, "handle: %d names no mapping of this context" % handle)
    return m


def sys_unmap(k, ctx, tid, body, fds):
    k.unmap(ctx, _mapping(ctx, body))
    return b"", []


def _destroy(k, ctx, m):
    sp = m.sp
    if sp is None:
        raise KernelError(errno.EINVAL, "handle: %d is not a share-point" % m.handle)
    if ctx.pid != sp.owner_pid and ctx.category.id != lib.FAYT_CATEGORY_CORE:
        raise KernelError(errno.EPERM, "share-point %r: only its owner (pid %d) or a core "
                          "server may destroy it" % (sp.identifier.decode(), sp.owner_pid))
    k.sharepoints.destroy(sp)


def sys_share_destroy(k, ctx, tid, body, fds):
    _destroy(k, ctx, _mapping(ctx, body))
    return b"", []


def sys_unmap_destroy(k, ctx, tid, body, fds):
    """Destroy the share-point, then drop this mapping.  On EPERM nothing changes."""
    m = _mapping(ctx, body)
    if m.sp is not None and not m.sp.destroyed:
        _destroy(k, ctx, m)
    k.unmap(ctx, m)
    return b"", []


def _list_after(body):
    if not body:
        return 0
    if len(body) != LIST_REQ.size:
        raise KernelError(errno.EINVAL, "list: expected %d bytes, got %d" % (LIST_REQ.size, len(body)))
    return LIST_REQ.unpack(body)[0]


def _page(items, budget):
    """JSON of as many items as fit in budget bytes (at least none)."""
    out, size = [], 2
    for it in items:
        j = json.dumps(it)
        if size + len(j) + 2 > budget:
            break
        out.append(j)
        size += len(j) + 2
    return "[" + ", ".join(out) + "]"


_REPLY_BUDGET = lib.FAYT_MSG_MAX - 1024


def sys_list_share(k, ctx, tid, body, fds):
    after = _list_after(body)
    k.catch_up(ctx)
    items = ({"id": sp.id, "identifier": sp.identifier.decode("utf-8", "replace"),
              "size": sp.length, "mapped_bytes": sp.backing.length, "prot": sp.prot,
              "owner": sp.owner_pid, "owner_alive": sp.owner_alive,
              "captured": sorted(set(sp.captured.values())),
              "frames": [k.frames.paddr(f) for f in sp.backing.frames[:64]],
              "nframes": len(sp.backing.frames)}
             for i, sp in sorted(k.sharepoints.by_id.items()) if i > after)
    return _page(items, _REPLY_BUDGET).encode(), []


def sys_list_contexts(k, ctx, tid, body, fds):
    after = _list_after(body)
    items = ({"id": c.id, "pid": c.pid, "uid": c.uid, "exe": c.exe,
              "category": c.category.name if c.category else None,
              "mappings": len(c.mappings), "mapped_bytes": c.mapped_bytes(),
              "connected": c.connected, "rings": k.notifications.count_into(c)}
             for i, c in sorted(k.contexts.items()) if i > after)
    head = '{"ram_frames": %d, "free_frames": %d, "contexts": ' % (
        k.frames.nframes, k.frames.free_frames)
    return (head + _page(items, _REPLY_BUDGET - len(head)) + "}").encode(), []


HANDLERS = {
    lib.FAYT_SYS_HELLO: sys_hello,
    lib.FAYT_SYS_PORTAL: sys_portal,
    lib.FAYT_SYS_UNMAP: sys_unmap,
    lib.FAYT_SYS_SHARE_DESTROY: sys_share_destroy,
    lib.FAYT_SYS_LIST_SHARE: sys_list_share,
    lib.FAYT_SYS_LIST_CONTEXTS: sys_list_contexts,
    lib.FAYT_SYS_UNMAP_DESTROY: sys_unmap_destroy,
    lib.FAYT_SYS_STATS: _stats.sys_stats,
}
NEED_NO_HELLO = {lib.FAYT_SYS_HELLO}     # listing needs a context the policy admitted
# Ops whose request may carry file descriptors (SCM_RIGHTS); the handler gets
# them in `fds` and must dup what it keeps: the server closes them after.
TAKES_FDS = set()

# Notifications: the handlers live with their objects in notification.py.
from . import notification as _notification  # noqa: E402
HANDLERS.update(_notification.HANDLERS)

# Chains and SPECIAL portals: the handlers live with their objects in pager.py.
from . import pager as _pager  # noqa: E402
HANDLERS.update(_pager.HANDLERS)
TAKES_FDS.add(lib.FAYT_SYS_PORTAL)     # SPECIAL: the client's userfaultfd
