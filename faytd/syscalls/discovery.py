"""PUBLISH and LOOKUP: discovery by name (faytd/discovery.py, docs/discovery.md)."""
import errno
import json

from libportal._abi import lib, PUBLISH_REQ

from ..discovery import namespace_of
from ..frames import KernelError
from .wire import utf8


def _name(body, field="name"):
    """The name a body carries: 1 to FAYT_NAME_MAX bytes of UTF-8, no NUL."""
    if not body:
        raise KernelError(errno.EINVAL, "%s: empty" % field)
    if len(body) > lib.FAYT_NAME_MAX:
        raise KernelError(errno.ENAMETOOLONG, "%s: %d bytes; at most %d"
                          % (field, len(body), lib.FAYT_NAME_MAX))
    if b"\0" in body:
        raise KernelError(errno.EINVAL, "%s: holds a NUL byte" % field)
    return utf8(bytes(body), field)


def sys_publish(k, ctx, tid, body, fds):
    if len(body) < PUBLISH_REQ.size:
        raise KernelError(errno.EINVAL, "publish: expected %d bytes and the name, got %d"
                          % (PUBLISH_REQ.size, len(body)))
    flags, reserved = PUBLISH_REQ.unpack_from(body)
    if flags & ~lib.FAYT_PUBLISH_WITHDRAW:
        raise KernelError(errno.EINVAL, "flags: unknown bits %#x"
                          % (flags & ~lib.FAYT_PUBLISH_WITHDRAW))
    if reserved:
        raise KernelError(errno.EINVAL, "reserved: %d, not 0" % reserved)
    name = _name(body[PUBLISH_REQ.size:])
    if flags & lib.FAYT_PUBLISH_WITHDRAW:
        k.published.withdraw(ctx, name)
    else:
        k.published.publish(ctx, name)
    return b"", []


def sys_lookup(k, ctx, tid, body, fds):
    c, n = k.published.lookup(ctx, _name(body))
    return json.dumps({"context": c.id, "pid": c.pid, "uid": c.uid,
                       "category": c.category.name if c.category else None,
                       "name": n.decode("utf-8"), "namespace": namespace_of(n)}).encode(), []
