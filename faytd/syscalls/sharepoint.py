"""SHARE_DESTROY, UNMAP_DESTROY and LIST_SHARE: share-points by handle or in a list.

The share-points are the core's (faytd/core/table.c); Policy decides, the
core destroys (portal.core_unmap), and the list reads the core's records
through views (faytd/sharepoint.py): all of them for a core server, else
those of the caller's namespace and the shared one (Policy.may_list)."""
import errno

from ..frames import KernelError
from ..native import lib as clib
from ..policy import Policy
from ..sharepoint import namespace_label
from .portal import core_unmap, own_mapping
from .wire import REPLY_BUDGET, handle_of, json_page, list_after


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
    items = ({"id": sp.id, "identifier": sp.identifier.decode("utf-8", "replace"),
              "namespace": namespace_label(sp.namespace), "owner_uid": sp.owner_uid,
              "size": sp.length, "mapped_bytes": sp.length + sp.data_offset, "prot": sp.prot,
              "owner": sp.owner_pid, "owner_alive": sp.owner_alive,
              "captured": sorted(set(sp.captured.values())),
              "frames": [k.frames.paddr(f) for f in sp.frames[:64]],
              "nframes": len(sp.frames)}
             for sp in (table.get(i, keep=False) for i in table.ids(after))
             if sp is not None and Policy.may_list(ctx, sp))
    return json_page(items, REPLY_BUDGET).encode(), []
