"""What every handler shares: bounds-checked decoding of request bodies.

Decoding copies nothing it has not bounds-checked, the way a kernel's
copy_from_user would: a body is exactly its struct's size, a pointer field
of portal_req is 0 or 1 + an offset into the message's trailer, and the
string there must end inside it.  The structs themselves are
libportal._abi's (written down once, in libportal/include/fayt/*.h).
"""
import errno
import json

from libportal._abi import lib, HANDLE_REQ, LIST_REQ

from ..frames import KernelError


def unpack(S, body, what):
    """body as struct S, which it must fill exactly."""
    if len(body) != S.size:
        raise KernelError(errno.EINVAL, "%s: expected %d bytes, got %d" % (what, S.size, len(body)))
    return S.unpack(body)


def utf8(s, field):
    """s (bytes) unchanged if it is valid UTF-8."""
    try:
        s.decode("utf-8")
    except UnicodeDecodeError:
        raise KernelError(errno.EINVAL, "%s: not valid UTF-8" % field) from None
    return s


def string(body, trailer_at, ptr, field, limit):
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
    return utf8(body[start:end], field)


def mapping(ctx, body):
    """The mapping of ctx a HANDLE_REQ body names."""
    if len(body) != HANDLE_REQ.size:
        raise KernelError(errno.EINVAL, "handle: expected %d bytes, got %d"
                          % (HANDLE_REQ.size, len(body)))
    (handle,) = HANDLE_REQ.unpack(body)
    m = ctx.mappings.get(handle)
    if m is None:
        raise KernelError(errno.EBADF, "handle: %d names no mapping of this context" % handle)
    return m


def list_after(body):
    """The id a list call starts after (an empty body: from the first)."""
    if not body:
        return 0
    if len(body) != LIST_REQ.size:
        raise KernelError(errno.EINVAL, "list: expected %d bytes, got %d" % (LIST_REQ.size, len(body)))
    return LIST_REQ.unpack(body)[0]


REPLY_BUDGET = lib.FAYT_MSG_MAX - 1024     # what a list reply's JSON may take


def json_page(items, budget):
    """JSON of as many items as fit in budget bytes (at least none)."""
    out, size = [], 2
    for it in items:
        j = json.dumps(it)
        if size + len(j) + 2 > budget:
            break
        out.append(j)
        size += len(j) + 2
    return "[" + ", ".join(out) + "]"
