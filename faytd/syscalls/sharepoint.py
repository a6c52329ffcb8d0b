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
from ..native import lib as clib
from .portal import core_unmap, own_mapping
from .wire import REPLY_BUDGET, handle_of, json_page, list_after

LIST_PAGE = 64          # share-points one LIST_SHARE answers at most
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
    table = k.sharepoints
    items = (_entry(k, sp) for sp in (table.get(i, keep=False)
                                      for i in table.ids(after, LIST_PAGE)) if sp is not None)
    return json_page(items, REPLY_BUDGET).encode(), []


def _entry(k, sp):
    captured = sorted(set(sp.captured.values()))
    return {"id": sp.id, "identifier": sp.identifier.decode("utf-8", "replace"),
            "size": sp.length, "mapped_bytes": sp.length + sp.data_offset, "prot": sp.prot,
            "owner": sp.owner_pid, "owner_alive": sp.owner_alive,
            "captured": captured[:CAPTURED_MAX], "ncaptured": len(captured),
            "frames": [k.frames.paddr(f) for f in sp.frames[:64]], "nframes": len(sp.frames)}
