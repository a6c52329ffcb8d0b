"""SHARE_DESTROY, UNMAP_DESTROY and LIST_SHARE: share-points by handle or in a list.

The share-points are the core's (faytd/core/table.c); Policy decides, the
core destroys (portal.core_unmap), and the list reads the core's records
through views (faytd/sharepoint.py): all of them for a core server, else
those of the caller's namespace and the shared one (Policy.may_list).

LIST_SHARE is paged: one call answers at most LIST_PAGE share-points after
the id it names, in id order, found by the core in O(page) whatever the
table holds (its ids in order, in all and by namespace: a context that is
not core gets the first of its uid's and the shared namespace's, merged),
each with at most CAPTURED_MAX of who maps it ("ncaptured" counts them
all), so that an entry always fits a reply and a page is empty only at the
end of what the caller may see."""
import collections
import errno

from libportal._abi import lib

from ..frames import KernelError
from ..native import core, ffi as cffi, lib as clib
from ..policy import Policy
from ..sharepoint import namespace_label
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
    if after >= ID_MAX:         # ids are 32-bit: none lies above (the C takes a uint32)
        return b"[]", []
    if ctx.category.id == lib.FAYT_CATEGORY_CORE:
        ids = k.sharepoints.ids(after, LIST_PAGE)
    else:                       # the namespaces Policy.may_list shows it
        ids = sorted(set(_ids_in(ctx.uid, after)) | set(_ids_in(clib.FAYT_NS_SHARED, after)))
    entries = (_entry(k, i) for i in ids[:LIST_PAGE])
    items = (e for e in entries if e is not None and Policy.may_list(ctx, _Named(e[1])))
    return json_page((e[0] for e in items), REPLY_BUDGET).encode(), []


ID_MAX = 0xffffffff
_Named = collections.namedtuple("_Named", "namespace")     # what Policy.may_list reads
_IDS = cffi.new("uint32_t[]", LIST_PAGE)


def _ids_in(ns, after):
    """The first LIST_PAGE ids above `after` named in namespace ns."""
    return list(_IDS[0:clib.fayt_core_sp_ids_ns(core, ns, after, _IDS, LIST_PAGE)])


# One entry's reads of the core's record (no view: a page must cost what
# its entries say, not what building views of them would).
_INFO = cffi.new("struct fayt_sp_info *")
_FRAMES = cffi.new("uint32_t[]", 64)
_CTX_IDS = cffi.new("uint32_t[]", CAPTURED_MAX)
_HANDLES = cffi.new("uint64_t[]", CAPTURED_MAX)
_PIDS = cffi.new("int32_t[]", CAPTURED_MAX)
_TIDS = cffi.new("int32_t[]", CAPTURED_MAX)


def _entry(k, sp_id):
    """(the list's entry of share-point sp_id, its namespace), or None if it
    is gone.  "captured": the (pid, tid) pairs of its first CAPTURED_MAX
    mappings; "ncaptured": how many mappings it has."""
    info = _INFO
    if clib.fayt_core_sp_info(core, sp_id, info, _FRAMES, 64):
        return None
    n = clib.fayt_core_sp_mappers(core, sp_id, _CTX_IDS, _HANDLES, _PIDS, _TIDS, CAPTURED_MAX)
    shown = min(n, CAPTURED_MAX)
    paddr = k.frames.paddr
    return {"id": sp_id, "identifier": cffi.unpack(info.identifier, info.ident_len).decode(
                "utf-8", "replace"),
            "namespace": namespace_label(info.ns), "owner_uid": info.owner_uid,
            "size": info.length - info.data_offset, "mapped_bytes": info.length,
            "prot": info.prot, "owner": info.owner_pid, "owner_alive": bool(info.owner_alive),
            "captured": sorted({(_PIDS[i], _TIDS[i]) for i in range(shown)}), "ncaptured": n,
            "frames": [paddr(f) for f in _FRAMES[0:min(info.nframes, 64)]],
            "nframes": info.nframes}, info.ns
