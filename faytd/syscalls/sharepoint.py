"""SHARE_DESTROY, UNMAP_DESTROY and LIST_SHARE: share-points by handle or in a list."""
import errno

from ..frames import KernelError
from ..policy import Policy
from .wire import REPLY_BUDGET, json_page, list_after, mapping


def _destroy(k, ctx, m):
    sp = m.sp
    if sp is None:
        raise KernelError(errno.EINVAL, "handle: %d is not a share-point" % m.handle)
    Policy.check_destroy(ctx, sp)
    k.sharepoints.destroy(sp)


def sys_share_destroy(k, ctx, tid, body, fds):
    _destroy(k, ctx, mapping(ctx, body))
    return b"", []


def sys_unmap_destroy(k, ctx, tid, body, fds):
    """Destroy the share-point, then drop this mapping.  On EPERM nothing changes."""
    m = mapping(ctx, body)
    if m.sp is not None and not m.sp.destroyed:
        _destroy(k, ctx, m)
    k.unmap(ctx, m)
    return b"", []


def sys_list_share(k, ctx, tid, body, fds):
    after = list_after(body)
    k.catch_up(ctx)
    items = ({"id": sp.id, "identifier": sp.identifier.decode("utf-8", "replace"),
              "size": sp.length, "mapped_bytes": sp.backing.length, "prot": sp.prot,
              "owner": sp.owner_pid, "owner_alive": sp.owner_alive,
              "captured": sorted(set(sp.captured.values())),
              "frames": [k.frames.paddr(f) for f in sp.backing.frames[:64]],
              "nframes": len(sp.backing.frames)}
             for i, sp in sorted(k.sharepoints.by_id.items()) if i > after)
    return json_page(items, REPLY_BUDGET).encode(), []
