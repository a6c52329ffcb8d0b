"""struct portal_req on the wire: the classes, the protection bits, and the
request body of the portal() system call.

The body is the packed struct portal_req from include/fayt/portal.h (built
with the layout cffi reads from it), followed by its paddr[] entries and a
trailer holding the strings its pointers name; each pointer is sent as 0
(NULL) or 1 + the string's offset in the trailer, the way a kernel would
copy_from_user them.  A field its C type cannot hold is InvalidArgument
(EINVAL) naming it, never a silent truncation.
"""
import array
import errno
import struct

from . import errors
from ._abi import lib, PORTAL_REQ

SHARE = lib.FAYT_PORTAL_SHARE
DIRECT = lib.FAYT_PORTAL_DIRECT
ANON = lib.FAYT_PORTAL_ANON
COW = lib.FAYT_PORTAL_COW
SPECIAL = lib.FAYT_PORTAL_SPECIAL
PROT_NONE = lib.FAYT_PROT_NONE
PROT_READ = lib.FAYT_PROT_READ
PROT_WRITE = lib.FAYT_PROT_WRITE
PROT_EXEC = lib.FAYT_PROT_EXEC
PROT_RW = PROT_READ | PROT_WRITE
PAGE_SIZE = lib.FAYT_PAGE_SIZE


def encode_portal_req(type, prot, length, *, identifier=None, share_type=0, create=0,
                      chain=None, message=None, addr=0, paddr=()):
    """The wire body of a portal() request (see include/fayt/syscall.h):
    type, prot, length, then the rest by name (share.identifier, .type,
    .create; sp_req_chain.name and .message; morphology.addr; paddr[]).
    InvalidArgument (EINVAL) names a field its C type cannot hold."""
    try:
        return _encode_portal_req(type, prot, length, identifier, share_type, create, chain,
                                  message, addr, paddr)
    except (struct.error, OverflowError):
        _check_fields(type=type, prot=prot, length=length, share_type=share_type,
                      create=create, addr=addr)
        raise


_INT = (-(1 << 31), (1 << 31) - 1)
_FIELDS = {"type": _INT, "prot": _INT, "length": _INT, "share_type": _INT, "create": _INT,
           "addr": (0, (1 << 64) - 1)}


def _check_fields(**fields):
    """Which field of struct portal_req cannot hold its value: EINVAL naming it."""
    for name, v in fields.items():
        lo, hi = _FIELDS[name]
        if not isinstance(v, int):
            raise errors.error(errno.EINVAL, "%s: %r is not an integer" % (name, v))
        if not lo <= v <= hi:
            what = "the specification's int" if hi == _INT[1] else "uintptr_t"
            raise errors.error(errno.EINVAL, "%s: %d does not fit %s (%d to %d)"
                               % (name, v, what, lo, hi))


def _cstring(s, name):
    """A string field of the request as the bytes C will read: str (UTF-8)
    or bytes, else TypeError; one holding a NUL byte is EINVAL naming it
    (C would read only what comes before it: "a\\0b" would be "a")."""
    if isinstance(s, str):
        s = s.encode("utf-8")
    elif not isinstance(s, bytes):
        if not isinstance(s, (bytearray, memoryview)):
            raise TypeError("%s: must be str or bytes, not %s" % (name, type(s).__name__))
        s = bytes(s)
    if b"\0" in s:
        raise errors.error(errno.EINVAL, "%s: %r holds a NUL byte (a C string ends there)"
                           % (name, s.decode("utf-8", "backslashreplace")))
    return s


def _encode_portal_req(type, prot, length, identifier, share_type, create, chain, message,
                       addr, paddr):
    if chain is None and message is None and not paddr:     # the common case, at once
        mlen = length if length > 0 else 0
        if identifier is None:
            return PORTAL_REQ.pack(type, prot, length, 0, share_type, create, 0, 0, addr, mlen)
        return (PORTAL_REQ.pack(type, prot, length, 1, share_type, create, 0, 0, addr, mlen)
                + _cstring(identifier, "identifier") + b"\0")
    trailer = bytearray()

    def put(s, name):
        if s is None:
            return 0
        s = _cstring(s, name)
        off = len(trailer) + 1
        trailer.extend(s)
        trailer.append(0)
        return off

    body = PORTAL_REQ.pack(type, prot, length, put(identifier, "identifier"), share_type,
                           create, put(chain, "chain"), put(message, "message"), addr,
                           length if length > 0 else 0)
    if paddr:
        body += array.array("Q", paddr).tobytes()
    return body + trailer
