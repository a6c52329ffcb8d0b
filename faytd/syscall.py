"""The syscall layer: decode a request, check rights, perform, reply.

Each handler takes (kernel, context, tid, body, fds) and returns
(reply body, fds to grant); the server closes those fds once sent.  It
raises KernelError(errno, message) to fail.
portal_req is decoded by the core's one decoder (faytd/core/decode.c), the
C path's too: it copies nothing it has not bounds-checked, the way a
kernel's copy_from_user would.
Objects (frames, sharepoint, context) never see the wire format.
"""
import errno
import json
import os

from libportal._abi import (lib, HELLO_REPLY, HANDLE_REQ, LIST_REQ, PORTAL_REPLY, PORTAL_REQ,
                            PORTAL_REQ_SIZE, REP_HDR)

from .frames import KernelError
from .native import ffi as cffi, lib as clib
from .policy import Policy, class_names

SHARE, DIRECT, ANON = lib.FAYT_PORTAL_SHARE, lib.FAYT_PORTAL_DIRECT, lib.FAYT_PORTAL_ANON
COW, SPECIAL = lib.FAYT_PORTAL_COW, lib.FAYT_PORTAL_SPECIAL


def sys_hello(k, ctx, tid, body, fds):
    if ctx.registered:
        raise KernelError(errno.EALREADY, "hello: context already registered")
    if ctx.category is None:
        raise KernelError(errno.EPERM, "hello: no policy rule admits uid %d gid %d exe %s"
                          % (ctx.uid, ctx.gid, ctx.exe))
    ctx.make_page(k.frames.tag)
    k.registered(ctx)
    c = ctx.category
    if c.classes & (SHARE | ANON) == SHARE | ANON:
        ctx.fast.flags |= clib.FAYT_FAST_CONN_SHARE     # the C path may serve it
    if c.classes & ANON:
        ctx.fast.flags |= clib.FAYT_FAST_CONN_ANON
    return HELLO_REPLY.pack(ctx.id, c.id, c.classes, 0), [ctx.page.open_fd()]


# Buffers of one call (a catch-up may perform other calls in the middle of
# one: the decoded request is the call's own).
_MSG = cffi.new("char[]", 256)
_BODY = cffi.new("uint8_t[]", lib.FAYT_MSG_MAX)
_OUT = cffi.new("struct fayt_core_reply *")


def decode_portal(k, body):
    """The request's portal_req, decoded and checked by the core's one
    decoder (faytd/core/decode.c, which the C path uses too): KernelError
    with its errno and message if it refuses."""
    a = cffi.new("struct fayt_portal_args *")
    err = clib.fayt_portal_decode(k.fast, body, len(body), a, _MSG, 256)
    if err:
        raise KernelError(err, cffi.string(_MSG).decode())
    ident = body[a.ident_at:a.ident_at + a.ident_len] if a.ident_at >= 0 else None
    chain = body[a.chain_at:a.chain_at + a.chain_len] if a.chain_at >= 0 else None
    message = body[a.message_at:a.message_at + a.message_len] if a.message_at >= 0 else None
    t, create = a.type, a.create
    return (t, a.prot, a.length, a.addr, ident, create, bool(a.attach),
            (t, a.prot, a.length, a.ident_p, a.share_type, create, a.chain_p, a.message_p,
             a.addr), chain, message, a)


def sys_portal(k, ctx, tid, body, fds):
    (t, prot, length, addr, ident, create, attach, req_fields, chain,
     message, args) = decode_portal(k, body)
    Policy.check_classes(ctx.category, t)                      # EPERM: nothing created
    if t & SPECIAL:
        return _portal_special(k, ctx, tid, t, prot, length, addr, req_fields, fds, ident,
                               chain, message)
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
    if t & SHARE and ident in k.sharepoints.by_name:
        k.catch_up(ctx)             # a destroy already sent by another process comes first
    # The core performs it (faytd/core/table.c), as it does for the C path.
    err = clib.fayt_core_portal(k.fast, ctx.fast, tid, body, args, _BODY, _OUT, _MSG, 256)
    if err:
        raise KernelError(err, cffi.string(_MSG).decode())
    # The server closes what it sent: a descriptor the core holds, a copy.
    fds = [os.dup(fd) if _OUT.borrowed & (1 << i) else fd
           for i, fd in enumerate(_OUT.fds[0:_OUT.nfds])]
    return cffi.buffer(_BODY, _OUT.len)[:], fds


_PADDR_FIT = (lib.FAYT_MSG_MAX - REP_HDR.size - PORTAL_REPLY.size - PORTAL_REQ_SIZE) // 8


def _portal_special(k, ctx, tid, t, prot, length, addr, req_fields, fds, ident, chain,
                    message):
    """SPECIAL: the client's own range and its userfaultfd (pager.py)."""
    if len(ctx.mappings) >= k.cfg["max_mappings_per_context"]:
        raise KernelError(errno.ENOMEM, "this context has %d mappings, the quota"
                          % len(ctx.mappings))
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


def _handle(body):
    if len(body) != HANDLE_REQ.size:
        raise KernelError(errno.EINVAL, "handle: expected %d bytes, got %d"
                          % (HANDLE_REQ.size, len(body)))
    return HANDLE_REQ.unpack(body)[0]


def _core_unmap(k, ctx, handle, how):
    """The core's mapping `handle`: True once performed (notices of a
    destroy sent), False if the core holds no such mapping."""
    sp_id = clib.fayt_core_map_sp(k.fast, ctx.fast, handle)
    if sp_id < 0:
        return False
    sp = k.sharepoints.get(sp_id) if sp_id and how != clib.FAYT_CORE_UNMAP else None
    captured = sp.captured if sp is not None and not sp.destroyed else None
    destroyed = cffi.new("uint32_t *")
    err = clib.fayt_core_unmap(k.fast, ctx.fast, handle, how, destroyed, _MSG, 256)
    if err:
        raise KernelError(err, cffi.string(_MSG).decode())
    if destroyed[0] and sp is not None:
        k.sharepoints.destroyed(sp, captured)
    return True


def _python_mapping(ctx, handle):
    m = ctx.mappings.own_get(handle)       # Python's own (SPECIAL portals, stacks)
    if m is None:
        raise KernelError(errno.EBADF, "handle: %d names no mapping of this context" % handle)
    return m


def sys_unmap(k, ctx, tid, body, fds):
    handle = _handle(body)
    if not _core_unmap(k, ctx, handle, clib.FAYT_CORE_UNMAP):
        k.unmap(ctx, _python_mapping(ctx, handle))
    return b"", []


def sys_share_destroy(k, ctx, tid, body, fds):
    handle = _handle(body)
    if not _core_unmap(k, ctx, handle, clib.FAYT_CORE_DESTROY):
        _python_mapping(ctx, handle)
        raise KernelError(errno.EINVAL, "handle: %d is not a share-point" % handle)
    return b"", []


def sys_unmap_destroy(k, ctx, tid, body, fds):
    """Destroy the share-point, then drop this mapping.  On EPERM nothing changes."""
    handle = _handle(body)
    if not _core_unmap(k, ctx, handle, clib.FAYT_CORE_UNMAP_DESTROY):
        k.unmap(ctx, _python_mapping(ctx, handle))
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
    table = k.sharepoints
    items = ({"id": sp.id, "identifier": sp.identifier.decode("utf-8", "replace"),
              "size": sp.length, "mapped_bytes": sp.length + sp.data_offset, "prot": sp.prot,
              "owner": sp.owner_pid, "owner_alive": sp.owner_alive,
              "captured": sorted(set(sp.captured.values())),
              "frames": [k.frames.paddr(f) for f in sp.frames[:64]],
              "nframes": len(sp.frames)}
             for sp in (table.get(i) for i in table.ids(after)) if sp is not None)
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
