"""HELLO and LIST_CONTEXTS: a context registers, and the contexts listed."""
import errno

from libportal._abi import HELLO_REPLY

from ..frames import KernelError
from ..policy import Policy
from .wire import REPLY_BUDGET, json_page, list_after


def sys_hello(k, ctx, tid, body, fds):
    if ctx.registered:
        raise KernelError(errno.EALREADY, "hello: context already registered")
    Policy.check_admitted(ctx)
    ctx.make_page(k.frames.tag)
    k.registered(ctx)
    c = ctx.category
    ctx.fast.flags |= Policy.fast_flags(c)      # what the fast path may create for it
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
