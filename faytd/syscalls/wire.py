"""What every handler shares: bounds-checked decoding of request bodies.

Decoding copies nothing it has not bounds-checked, the way a kernel's
copy_from_user would: a body is exactly its struct's size; portal_req, whose
pointer fields are 0 or 1 + an offset into the message's trailer with the
string there ending inside it, is decoded by the core's one decoder
(faytd/core/decode.c, through syscalls/portal.py).  The structs themselves are
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


def handle_of(body):
    """The handle a HANDLE_REQ body names."""
    if len(body) != HANDLE_REQ.size:
        raise KernelError(errno.EINVAL, "handle: expected %d bytes, got %d"
                          % (HANDLE_REQ.size, len(body)))
    return HANDLE_REQ.unpack(body)[0]


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
