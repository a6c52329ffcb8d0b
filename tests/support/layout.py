"""What tests read of shared memory, at the offsets the ABI gives.

Every layout comes from the C headers through cffi (libportal._abi: ffi,
lib, and the struct.Struct of a header made from cffi's own offsets):
a test never writes an offset or a size by hand.  Only test_abi.py pins
the specification's packed offsets as numbers, against both gcc and cffi.
"""
import json

from libportal._abi import SHAREPOINT_META, ffi, lib

PADDR = ffi.sizeof("uint64_t")      # one morphology.paddr[] entry
HELD = ffi.sizeof("struct fayt_held_lock")
HELD_OFF = ffi.offsetof("struct fayt_context_page", "held")
HELD_STATE = ffi.offsetof("struct fayt_held_lock", "state")


def meta_size(nframes):
    """Bytes of a share-point's meta-structure with nframes paddr[] entries."""
    return ffi.offsetof("struct fayt_sharepoint_meta", "morphology", "paddr") + nframes * PADDR


def meta_bytes(sp, nframes=None):
    """The meta-structure as this process maps it, paddr[] included."""
    n = sp.map_length // lib.FAYT_PAGE_SIZE if nframes is None else nframes
    return bytes(ffi.buffer(ffi.cast("char *", sp.base), meta_size(n)))


def read_meta(raw):
    """(lock, prot, length, morphology.length), and the paddr[] that follow,
    read from raw bytes with the header's own layout."""
    head = SHAREPOINT_META.unpack_from(raw)
    n = (len(raw) - SHAREPOINT_META.size) // PADDR
    paddr = [int.from_bytes(raw[SHAREPOINT_META.size + i * PADDR:][:PADDR], "little")
             for i in range(n)]
    return head, paddr


def held_record(context_page, i):
    """The address of robust record i in a context page (sp_id, then state
    at HELD_STATE)."""
    return context_page + HELD_OFF + i * HELD


def records_of(conn, sp_id):
    """The robust records this context holds for sp_id: [state]."""
    page = ffi.cast("struct fayt_context_page *", conn.context_page)
    return [page.held[i].state for i in range(lib.FAYT_HELD_LOCKS_MAX)
            if page.held[i].sp_id == sp_id]


def lock_state(sp):
    return sp.lock_state & lib.FAYT_LOCK_STATE_MASK


def list_share(conn=None):
    """faytd's share-point table: identifier -> entry."""
    import libportal
    c = conn or libportal.connection()
    body, _ = c.call(lib.FAYT_SYS_LIST_SHARE)
    return {s["identifier"]: s for s in json.loads(body)}
