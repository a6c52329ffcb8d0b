"""HELLO and LIST_CONTEXTS: a context registers, and the contexts listed."""
import errno
import logging

from libportal._abi import lib, HELLO_REQ, HELLO_REPLY

from ..frames import KernelError
from ..policy import Policy
from .wire import REPLY_BUDGET, json_page, list_after

LIST_PAGE = 32          # contexts one LIST_CONTEXTS answers at most

log = logging.getLogger("faytd")


def sys_hello(k, ctx, tid, body, fds):
    _check_wire_abi(ctx, body)
    if ctx.registered:
        raise KernelError(errno.EALREADY, "hello: context already registered")
    Policy.check_admitted(ctx)
    k.quotas.register(ctx)                      # EAGAIN past its uid's or process's contexts
    ctx.make_page(k.frames.tag)
    k.registered(ctx)
    c = ctx.category
    Policy.grant(ctx.fast, c)       # what the fast path may create for it, its shared names
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


def sys_list_contexts(k, ctx, tid, body, fds):
    """A page: at most LIST_PAGE contexts after the id the body names, in
    order (O(page): k.contexts keeps its ids in order, context.ContextTable)."""
    after = list_after(body)
    items = ({"id": c.id, "pid": c.pid, "uid": c.uid, "exe": c.exe,
              "category": c.category.name if c.category else None,
              "mappings": len(c.mappings), "mapped_bytes": c.mapped_bytes(),
              "connected": c.connected, "rings": k.notifications.count_into(c)}
             for c in k.contexts.after(after, LIST_PAGE))
    head = '{"ram_frames": %d, "free_frames": %d, "contexts": ' % (
        k.frames.nframes, k.frames.free_frames)
    return (head + json_page(items, REPLY_BUDGET - len(head)) + "}").encode(), []
