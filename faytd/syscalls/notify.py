"""The notification calls: handlers, rings, doorbells, stacks, faytd's notices.

Each decodes its body, checks the rights it needs (policy.py), and calls one
method of Notifications (notification.py), which holds the rings.
"""
import errno

from libportal._abi import (lib, HANDLE_REQ, LIST_REQ, NOTIFY_INSTALL as INSTALL,
                            NOTIFY_OPEN as OPEN, RING_REPLY, STACK_REQ, STACK_REPLY,
                            NOTIFY_SUBSCRIBE as SUBSCRIBE)

from ..frames import KernelError, PAGE
from ..notification import RING_BYTES, STACK_MAX_BYTES
from ..policy import Policy
from .wire import unpack

_FETCH_MAX = 8      # fds per reply (libportal receives at most 8)


def _slot(index, what="index"):
    if not 0 <= index < lib.FAYT_NOTIFICATION_SLOTS:
        raise KernelError(errno.EINVAL, "%s: %d is not a notification slot (0..%d)"
                          % (what, index, lib.FAYT_NOTIFICATION_SLOTS - 1))


def _ring_reply(r):
    return RING_REPLY.pack(r.id, r.sender.id if r.sender else 0, r.target.id, r.target.pid,
                           RING_BYTES)


def _target(k, target_id):
    t = k.contexts.get(target_id)
    if t is None or not t.alive or not t.connected or not t.registered:
        raise KernelError(errno.ESRCH, "target: no live context %d" % target_id)
    return t


def sys_notify_install(k, ctx, tid, body, fds):
    index, _, cookie = unpack(INSTALL, body, "notify_install")
    Policy.check_handlers(ctx, "notify_install")
    _slot(index)
    if cookie == 0:
        raise KernelError(errno.EINVAL, "cookie: 0 means no handler (use notify_remove)")
    k.notifications.install(ctx, index, cookie)
    return b"", []


def sys_notify_remove(k, ctx, tid, body, fds):
    index, _, _ = unpack(INSTALL, body, "notify_remove")
    Policy.check_handlers(ctx, "notify_remove")
    _slot(index)
    k.notifications.remove(ctx, index)
    return b"", []


def sys_notify_provider(k, ctx, tid, body, fds):
    index, _, _ = unpack(INSTALL, body, "notify_provider")
    Policy.check_handlers(ctx, "notify_provider")
    if index != lib.FAYT_NO_PROVIDER:
        _slot(index)
    k.notifications.set_provider(ctx, index)
    return b"", []


def sys_notify_open(k, ctx, tid, body, fds):
    target_id, _ = unpack(OPEN, body, "notify_open")
    t = _target(k, target_id)
    n = k.notifications
    if not n.has_ring(ctx, t):
        Policy.check_notify(ctx, t)     # once: when the pair's ring is made
    r, out_fds = n.open(ctx, t)
    return _ring_reply(r), out_fds


def sys_notify_hint(k, ctx, tid, body, fds):
    if body:
        raise KernelError(errno.EINVAL, "notify_hint: takes no body (%d bytes sent)" % len(body))
    return b"", [k.notifications.hint_fd(ctx)]


def sys_notify_close(k, ctx, tid, body, fds):
    target_id, _ = unpack(OPEN, body, "notify_close")
    k.notifications.close(ctx, target_id)
    return b"", []


def sys_notify_ring(k, ctx, tid, body, fds):
    """Ring the doorbell of a target this context may not signal itself."""
    (target_id,) = unpack(HANDLE_REQ, body, "notify_ring")
    k.notifications.ring_doorbell(ctx, target_id)
    return b"", []


def sys_notify_release(k, ctx, tid, body, fds):
    (ring_id,) = unpack(HANDLE_REQ, body, "notify_release")
    k.notifications.release(ctx, ring_id)
    return b"", []


def sys_notify_fetch(k, ctx, tid, body, fds):
    (after,) = unpack(LIST_REQ, body, "notify_fetch") if body else (0,)
    got = k.notifications.fetch(ctx, after, _FETCH_MAX)
    return b"".join(_ring_reply(r) for r, _ in got), [fd for _, fd in got]


def sys_notify_stack_alloc(k, ctx, tid, body, fds):
    size, _ = unpack(STACK_REQ, body, "stack_alloc")
    size = size or PAGE
    if size % PAGE or size > STACK_MAX_BYTES:
        raise KernelError(errno.EINVAL, "size: %d; a notification stack is a multiple of %d "
                          "bytes up to %d" % (size, PAGE, STACK_MAX_BYTES))
    rec, handle, fd = k.notifications.alloc_stack(ctx, tid, size)
    return STACK_REPLY.pack(handle, size, rec), [fd]


def sys_notify_stack_free(k, ctx, tid, body, fds):
    (handle,) = unpack(HANDLE_REQ, body, "stack_free")
    k.notifications.free_stack(ctx, handle)
    return b"", []


def sys_notify_subscribe(k, ctx, tid, body, fds):
    event, index, arg, _ = unpack(SUBSCRIBE, body, "notify_subscribe")
    if event not in (lib.FAYT_EVENT_PEER_DIED, lib.FAYT_EVENT_SP_DESTROYED):
        raise KernelError(errno.EINVAL, "event: unknown event %d" % event)
    if index < 0:
        k.notifications.unsubscribe(ctx, event)
        return b"", []
    Policy.check_handlers(ctx, "notify_subscribe")
    _slot(index)
    k.notifications.subscribe(ctx, event, index, arg)
    return b"", []
