"""The compiled bindings, checked at import, and layouts derived from them.

ffi/lib come from the cffi module built out of include/fayt/*.h; _fastpath is
the CPython extension for the share-point hot path.  struct_of() turns a
header struct into a struct.Struct from cffi's own offsets, so that packing a
header in Python never writes an offset by hand.
"""
import struct as _struct

from . import errors
from ._fayt_cffi import ffi, lib
from . import _fastpath

CFFI_ABI = 1
FASTPATH_ABI = 1

if lib.fayt_cffi_abi() != CFFI_ABI or _fastpath.ABI_VERSION != FASTPATH_ABI:
    raise ImportError("libportal's compiled modules do not match its Python code: "
                      "reinstall fayt-portals (pip install -e .)")

_fastpath.set_error_factory(errors.error)

_CODES = {
    ("primitive", 1, True): "b", ("primitive", 1, False): "B",
    ("primitive", 2, True): "h", ("primitive", 2, False): "H",
    ("primitive", 4, True): "i", ("primitive", 4, False): "I",
    ("primitive", 8, True): "q", ("primitive", 8, False): "Q",
}


def struct_of(ctype):
    """A little-endian struct.Struct with one field per member of `ctype`
    (a struct of fixed-width integers), at cffi's offsets."""
    t = ffi.typeof(ctype)
    fmt, pos = "<", 0
    for name, field in t.fields:
        ft = field.type
        if ft.kind != "primitive":
            raise TypeError("struct_of: %s.%s is not an integer" % (ctype, name))
        if field.offset > pos:
            fmt += "%dx" % (field.offset - pos)
        signed = ffi.cast(ft, -1) < 0
        fmt += _CODES[("primitive", ffi.sizeof(ft), signed)]
        pos = field.offset + ffi.sizeof(ft)
    if ffi.sizeof(t) > pos:
        fmt += "%dx" % (ffi.sizeof(t) - pos)
    s = _struct.Struct(fmt)
    assert s.size == ffi.sizeof(t), ctype
    return s


REQ_HDR = struct_of("struct fayt_req_hdr")
REP_HDR = struct_of("struct fayt_rep_hdr")
HELLO_REPLY = struct_of("struct fayt_hello_reply")
HANDLE_REQ = struct_of("struct fayt_handle_req")
LIST_REQ = struct_of("struct fayt_list_req")
PORTAL_REPLY = struct_of("struct fayt_portal_reply")
PORTAL_REQ_SIZE = ffi.sizeof("struct portal_req")
