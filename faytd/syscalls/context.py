"""HELLO and LIST_CONTEXTS: a context registers, and the contexts listed."""
import errno

from libportal._abi import lib, HELLO_REPLY

from ..frames import KernelError
from .wire import REPLY_BUDGET, json_page, list_after

SHARE, ANON = lib.FAYT_PORTAL_SHARE, lib.FAYT_PORTAL_ANON


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
        ctx.fast.flags |= lib.FAYT_FAST_CONN_SHARE     # the fast path may create for it
    if c.classes & ANON:
        ctx.fast.flags |= lib.FAYT_FAST_CONN_ANON
    return HELLO_REPLY.pack(ctx.id, c.id, c.classes, 0), [ctx.page.open_fd()]


def sys_list_contexts(k, ctx, tid, body, fds):
    after = list_after(body)
    items = ({"id": c.id, "pid": c.pid, "uid": c.uid, "exe": c.exe,
              "category": c.category.name if c.category else None,
              "mappings": len(c.mappings), "mapped_bytes": c.mapped_bytes(),
              "connected": c.connected, "rings": k.notifications.count_into(c)}
             for i, c in sorted(k.contexts.items()) if i > after)
    head = '{"ram_frames": %d, "free_frames": %d, "contexts": ' % (
        k.frames.nframes, k.frames.free_frames)
    return (head + json_page(items, REPLY_BUDGET - len(head)) + "}").encode(), []
