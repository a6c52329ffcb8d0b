"""FAYT_SYS_INFO: the notification rings and the chains faytd holds, for
`fayt rings`, `fayt chains` and `fayt top` (docs/cli.md).

One call for the tools (issue 18 takes op numbers 56-59; this is 56), the
body choosing what it describes (struct fayt_info_req: FAYT_INFO_RINGS or
FAYT_INFO_CHAINS, and `after`, paged as LIST_* are).  The reply is JSON.

What faytd can say, and what it cannot:
- A ring's header lives in memory its sender and target write.  faytd reads
  it as it reads any client-written memory (notification.py): once, no
  loop, nothing trusted.  `depth` (entries posted, not yet taken: head -
  tail) is only given when it is within the ring's size, else `corrupt`;
  `posted` (the sender's running count, a u64 it writes itself) is shown
  as written: a sender can only lie about its own ring.
- `drops`: rings of this pair given back as corrupt (RELEASE of a ring its
  target found scribbled on, or faytd's notice ring a subscriber spoiled),
  counted by faytd; `lost`: faytd's own notices the target lost (its notice
  ring was full past the backlog, or was dropped); `backlog`: faytd's
  notices waiting for room.  A notification that named a slot with no
  handler is counted in the target process (notification_stats()'s
  `unhandled`), not here: faytd never sees it.
- Chains: each server (context, pid, slots, run_max, backings), the regions
  (SPECIAL portals) it serves now (SHOWN of each at most, with their
  totals: one entry must fit one reply), and the faults the fault engine answered
  for the chain: those of its live regions plus those of its closed ones
  (Chain.done), from the chain's first server on.
- Lock waits never pass through faytd: nothing here says who waits for a
  share-point's lock.

Rights: a core context sees everything.  Another context sees the rings
whose sender or target is of its uid, and the chains one of its uid's
contexts serves or maps; in those, other uids' servers and regions are
counted but not named (no pid, no context id).
"""
import errno

from libportal._abi import ffi, lib, INFO_REQ

from ..chains import DONE_COUNTS as _COUNTS
from ..frames import KernelError
from .wire import REPLY_BUDGET, json_page

INFO_PAGE = 64          # entries one INFO answers at most
SHOWN = 32              # servers, and regions, listed in one chain's entry

_STATES = {lib.FAYT_RING_LIVE: "live", lib.FAYT_RING_TARGET_DEAD: "target_dead",
           lib.FAYT_RING_SENDER_DEAD: "sender_dead", lib.FAYT_RING_DROPPED: "dropped"}


def _core(ctx):
    return ctx.category is not None and ctx.category.id == lib.FAYT_CATEGORY_CORE


def _who(c):
    """A context as the reply names it."""
    return None if c is None else {"id": c.id, "pid": c.pid, "uid": c.uid, "exe": c.exe}


def ring_entry(k, r):
    """One ring, read once (its header is client-written: checked, never trusted)."""
    n = k.notifications
    out = {"id": r.id, "sender": _who(r.sender) if r.sender is not None else "faytd",
           "target": _who(r.target), "kept": r.kept}
    h = ffi.cast("struct fayt_ring_header *", r.ptr) if r.ptr is not None else None
    if h is None:
        out.update(state="gone", depth=None, posted=None, corrupt=False)
    else:
        size, head, tail = h.size, h.head, h.tail
        depth = (head - tail) & 0xffffffff
        good = size == lib.FAYT_RING_ENTRIES and depth <= size
        out.update(state=_STATES.get(h.state, "unknown"), depth=depth if good else None,
                   size=lib.FAYT_RING_ENTRIES, posted=int(h.posted), corrupt=not good)
    key = (r.sender.id if r.sender is not None else 0, r.target.id)
    out["drops"] = n.drops.get(key, 0)
    if r.sender is None:
        out["backlog"] = len(r.backlog)
        out["lost"] = sum(n.lost.get(r.target.id, {}).values()) + \
            sum(c for c in r.lost().values())
    return out


def chain_entry(k, chain, regions, ctx, everything):
    """One chain; `regions` its live regions.  Servers and regions are
    listed up to SHOWN each (an entry must fit one reply); counts and
    totals cover them all."""
    faults = k.pager.faults
    counts = dict(chain.done)
    shown, hidden = [], 0
    for r in regions:
        c = faults.region_counts(r)
        for f in _COUNTS:
            counts[f] += getattr(c, f)
        if not (everything or r.ctx.uid == ctx.uid):
            hidden += 1
        elif len(shown) < SHOWN:
            shown.append({"id": r.id, "context": r.ctx.id, "pid": r.ctx.pid,
                          "length": r.length, "faults": c.faults, "fetched": c.fetched,
                          "failed": c.failed, "backed": r.backing is not None,
                          "message": (r.message or b"").decode("utf-8", "replace")})
    servers = [{"position": pos, "context": m.ctx.id, "pid": m.ctx.pid, "uid": m.ctx.uid,
                "exe": m.ctx.exe, "slots": m.nslots, "run_max": m.run_max,
                "backings": len(m.backings)}
               for pos, m in enumerate(chain.members)
               if everything or m.ctx.uid == ctx.uid]
    return {"id": chain.id, "name": chain.name,
            "write_reports": bool(chain.flags & lib.FAYT_CHAIN_WRITE_REPORTS),
            "timeout_ms": chain.timeout_ms, "servers": servers[:SHOWN],
            "servers_total": len(chain.members),
            "other_uids_servers": len(chain.members) - len(servers), "regions": shown,
            "regions_total": len(regions), "other_uids_regions": hidden, "counts": counts}


def _rings(k, ctx, after):
    everything = _core(ctx)
    for rid in sorted(k.notifications.rings):
        if rid <= after:
            continue
        r = k.notifications.rings[rid]
        if everything or any(c is not None and c.uid == ctx.uid for c in (r.sender, r.target)):
            yield ring_entry(k, r)


def _chains(k, ctx, after):
    everything = _core(ctx)
    p = k.pager
    live = {}                   # chain -> its live regions: one walk of the regions per call
    for r in p.regions.by_id.values():
        if not r.closed:
            live.setdefault(r.chain, []).append(r)
    for chain in sorted(p.chains.by_name.values(), key=lambda c: c.id):
        if chain.id <= after:
            continue
        regions = live.get(chain, [])
        if everything or any(m.ctx.uid == ctx.uid for m in chain.members) or \
                any(r.ctx.uid == ctx.uid for r in regions):
            yield chain_entry(k, chain, regions, ctx, everything)


def _limited(items, n):
    for i, it in enumerate(items):
        if i >= n:
            return
        yield it


def sys_info(k, ctx, tid, body, fds):
    """FAYT_SYS_INFO: a page of rings or chains after `after` (module docstring)."""
    if len(body) != INFO_REQ.size:
        raise KernelError(errno.EINVAL, "info: body of %d bytes; fayt_info_req has %d"
                          % (len(body), INFO_REQ.size))
    what, reserved, after = INFO_REQ.unpack(body)
    if reserved:
        raise KernelError(errno.EINVAL, "info: reserved: must be 0")
    if what == lib.FAYT_INFO_RINGS:
        items, key = _rings(k, ctx, after), "rings"
    elif what == lib.FAYT_INFO_CHAINS:
        items, key = _chains(k, ctx, after), "chains"
    else:
        raise KernelError(errno.EINVAL, "info: what: %d is neither FAYT_INFO_RINGS nor "
                          "FAYT_INFO_CHAINS" % what)
    head = '{"scope": "%s", "%s": ' % ("all" if _core(ctx) else "uid", key)
    return (head + json_page(_limited(items, INFO_PAGE), REPLY_BUDGET - len(head))
            + "}").encode(), []

