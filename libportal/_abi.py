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
from ._versions import CFFI_ABI

FASTPATH_ABI = 10        # libportal/src/fastpath.h's FASTPATH_ABI

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


def _flatten(t, base, out):
    """(offset, code) of every scalar in struct type t, nested structs flattened,
    pointers as unsigned integers; a trailing flexible array is left out."""
    for name, field in t.fields:
        ft, off = field.type, base + field.offset
        if ft.kind == "struct":
            _flatten(ft, off, out)
        elif ft.kind == "pointer":
            out.append((off, _CODES[("primitive", ffi.sizeof(ft), False)], ffi.sizeof(ft)))
        elif ft.kind == "array" and ft.length is None:
            continue
        elif ft.kind == "array" and ft.item.kind == "primitive" and ft.item.cname == "char":
            out.append((off, "%ds" % ft.length, ft.length))
        elif ft.kind == "primitive":
            if ft.cname == "char":
                code = "B"
            else:
                code = _CODES[("primitive", ffi.sizeof(ft), bool(ffi.cast(ft, -1) < 0))]
            out.append((off, code, ffi.sizeof(ft)))
        else:
            raise TypeError("struct_of: %s of kind %s" % (name, ft.kind))


def struct_of(ctype, upto=None):
    """A little-endian struct.Struct with one item per scalar member of
    `ctype` (nested structs flattened in order, pointers as unsigned
    integers, a char array as bytes, a flexible array left out), at cffi's
    offsets.  upto: stop before that top-level field (a head of the struct)."""
    t = ffi.typeof(ctype)
    items = []
    _flatten(t, 0, items)
    end = ffi.sizeof(t) if upto is None else ffi.offsetof(t, upto)
    fmt, pos = "<", 0
    for off, code, size in items:
        if off >= end:
            break
        if off > pos:
            fmt += "%dx" % (off - pos)
        fmt += code
        pos = off + size
    if end > pos:
        fmt += "%dx" % (end - pos)
    s = _struct.Struct(fmt)
    assert s.size == end, ctype
    return s


REQ_HDR = struct_of("struct fayt_req_hdr")
REP_HDR = struct_of("struct fayt_rep_hdr")
HELLO_REQ = struct_of("struct fayt_hello_req")
HELLO_REPLY = struct_of("struct fayt_hello_reply")
HANDLE_REQ = struct_of("struct fayt_handle_req")
LIST_REQ = struct_of("struct fayt_list_req")
INFO_REQ = struct_of("struct fayt_info_req")          # what, reserved, after
PORTAL_REPLY = struct_of("struct fayt_portal_reply")
DIRECT_RUN = struct_of("struct fayt_direct_run")      # fd, pages, at, offset
GRANT_REQ = struct_of("struct fayt_grant_req")        # handle, kind, to, prot, flags
PUBLISH_REQ = struct_of("struct fayt_publish_req")    # flags, reserved; then the name
QUEUE_OPEN = struct_of("struct fayt_queue_open")      # size, flags
QUEUE_REPLY = struct_of("struct fayt_queue_reply")    # queue_id, size, map_length
SCHED_DECISION = struct_of("struct fayt_sched_decision")  # context, value, cpus
SCHED_SUBSCRIBE = struct_of("struct fayt_sched_subscribe")  # index, flags
# event, context_id, pid, uid, blocks, wakes, waiting, reserved, seen_ns
SCHED_EVENT = struct_of("struct fayt_sched_event")
LISTEN_REQ = struct_of("struct fayt_listen_req")      # flags, backlog; then the name
LISTEN_REPLY = struct_of("struct fayt_listen_reply")
CONNECT_REQ = struct_of("struct fayt_connect_req")    # ring_bytes, reserved; then the name
CHAN_REPLY = struct_of("struct fayt_chan_reply")
CHAN_PASS_REQ = struct_of("struct fayt_chan_pass_req")      # channel, share, flags, reserved
CHAN_PASS_REPLY = struct_of("struct fayt_chan_pass_reply")  # ticket, length
CHAN_TAKE_REQ = struct_of("struct fayt_chan_take_req")      # channel, ticket
CHAN_TAKE_REPLY = struct_of("struct fayt_chan_take_reply")  # length, offset, map_length, flags
STREAM_REF = struct_of("struct fayt_stream_ref")            # ticket, length, flags, reserved
COW_PADDR_REQ = struct_of("struct fayt_cow_paddr_req")  # handle, base, npages, reserved
DEV_REQ = struct_of("struct fayt_dev_req")            # flags, index, cookie, window, reserved
DEV_REPLY = struct_of("struct fayt_dev_reply")        # base, size, window, generation
# A fayt_portal_reply by name (made in C by _fastpath.Transport; by
# portal_reply() where Python reads one from a reply's body).
PortalReply = _fastpath.PortalReply
Reply = _fastpath.Reply
assert PortalReply.n_fields == len(PORTAL_REPLY.unpack(bytes(PORTAL_REPLY.size)))


def portal_reply(body):
    """The fayt_portal_reply at the start of a PORTAL reply's body."""
    return PortalReply(PORTAL_REPLY.unpack_from(body))


PORTAL_REQ_SIZE = ffi.sizeof("struct portal_req")
# type, prot, length, share.identifier, share.type, share.create,
# sp_req_chain.name, sp_req_chain.message, morphology.addr, morphology.length
PORTAL_REQ = struct_of("struct portal_req")
# lock, prot, length, morphology.length (paddr[] follows)
SHAREPOINT_META = struct_of("struct fayt_sharepoint_meta")

# Notification calls (fayt/syscall.h, notification.h), for both sides.
NOTIFY_INSTALL = struct_of("struct fayt_notify_install")
NOTIFY_OPEN = struct_of("struct fayt_notify_open")
RING_REPLY = struct_of("struct fayt_ring_reply")
STACK_REQ = struct_of("struct fayt_stack_req")
STACK_REPLY = struct_of("struct fayt_stack_reply")
NOTIFY_SUBSCRIBE = struct_of("struct fayt_notify_subscribe")

# Chain calls and page requests (fayt/pager.h), for both sides.
CHAIN_JOIN = struct_of("struct fayt_chain_join")
CHAIN_JOIN_REPLY = struct_of("struct fayt_chain_join_reply")
CHAIN_LEAVE = struct_of("struct fayt_chain_leave")
CHAIN_BACK = struct_of("struct fayt_chain_back")
CHAIN_BACK_REPLY = struct_of("struct fayt_chain_back_reply")
PAGE_REQUEST = struct_of("struct fayt_page_request")
PAGE_REQUEST_HEAD = struct_of("struct fayt_page_request", upto="chain")   # without the strings
