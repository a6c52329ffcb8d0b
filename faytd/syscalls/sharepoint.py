"""SHARE_DESTROY, UNMAP_DESTROY and LIST_SHARE: share-points by handle or in a list.

The share-points are the core's (faytd/core/table.c); Policy decides, the
core destroys (portal.core_unmap), and the list reads the core's records
through views (faytd/sharepoint.py).

LIST_SHARE is paged: one call answers at most LIST_PAGE share-points after
the id it names (the core finds them in order in O(page), whatever the
table holds), each with at most CAPTURED_MAX of who maps it ("ncaptured"
counts them all), so that an entry always fits a reply and a page is empty
only at the end of the table."""
import errno

from ..frames import KernelError
from ..native import core, ffi as cffi, lib as clib
from .portal import core_unmap, own_mapping
from .wire import REPLY_BUDGET, handle_of, json_page, list_after

LIST_PAGE = 32          # share-points one LIST_SHARE answers at most
CAPTURED_MAX = 256      # (pid, tid) pairs an entry shows at most


def sys_share_destroy(k, ctx, tid, body, fds):
    handle = handle_of(body)
    if not core_unmap(k, ctx, handle, clib.FAYT_CORE_DESTROY):
        own_mapping(ctx, handle)        # EBADF if it names nothing
        raise KernelError(errno.EINVAL, "handle: %d is not a share-point" % handle)
    return b"", []


def sys_unmap_destroy(k, ctx, tid, body, fds):
    """Destroy the share-point, then drop this mapping.  On EPERM nothing changes."""
    handle = handle_of(body)
    if not core_unmap(k, ctx, handle, clib.FAYT_CORE_UNMAP_DESTROY):
        k.unmap(ctx, own_mapping(ctx, handle))      # not a share-point's: an unmap
    return b"", []


def sys_list_share(k, ctx, tid, body, fds):
    after = list_after(body)
    k.catch_up(ctx)
    items = (e for e in (_entry(k, i) for i in k.sharepoints.ids(after, LIST_PAGE)) if e)
    return json_page(items, REPLY_BUDGET).encode(), []


# One entry's reads of the core's record (no view: a page must cost what
# its entries say, not what building views of them would).
_INFO = cffi.new("struct fayt_sp_info *")
_FRAMES = cffi.new("uint32_t[]", 64)
_CTX_IDS = cffi.new("uint32_t[]", CAPTURED_MAX)
_HANDLES = cffi.new("uint64_t[]", CAPTURED_MAX)
_PIDS = cffi.new("int32_t[]", CAPTURED_MAX)
_TIDS = cffi.new("int32_t[]", CAPTURED_MAX)


def _entry(k, sp_id):
    """The list's entry of share-point sp_id, or None if it is gone.
    "captured": the (pid, tid) pairs of its first CAPTURED_MAX mappings;
    "ncaptured": how many mappings it has."""
    info = _INFO
    if clib.fayt_core_sp_info(core, sp_id, info, _FRAMES, 64):
        return None
    n = clib.fayt_core_sp_mappers(core, sp_id, _CTX_IDS, _HANDLES, _PIDS, _TIDS, CAPTURED_MAX)
    shown = min(n, CAPTURED_MAX)
    paddr = k.frames.paddr
    return {"id": sp_id, "identifier": cffi.unpack(info.identifier, info.ident_len).decode(
                "utf-8", "replace"),
            "size": info.length - info.data_offset, "mapped_bytes": info.length,
            "prot": info.prot, "owner": info.owner_pid, "owner_alive": bool(info.owner_alive),
            "captured": sorted({(_PIDS[i], _TIDS[i]) for i in range(shown)}), "ncaptured": n,
            "frames": [paddr(f) for f in _FRAMES[0:min(info.nframes, 64)]],
            "nframes": info.nframes}
