"""faytd's counters: which path served each call, and how faults were answered.

FAYT_SYS_STATS answers with stats_json(); `fayt stats` prints it (docs/cli.md,
"fayt stats").  The counts come from where the work is done, so that none is
kept twice: the C fast path counts what it performs (struct
fayt_core: calls by op, and creates, destroys, attaches, unmaps, anon_maps,
anon_unmaps), the server
counts every request it hands to Python (python_call), and the fault
engine (faytd/core/fault.c) counts the SPECIAL faults it serves, in C
(FaultEngine.counts).

Any registered context may ask: the counts say how busy faytd is and how,
not what anyone holds, with one exception.  Share-points have names and
owners, so a context that is not core sees the count of its own uid's only
(`sharepoints.scope` says which it got).  `limits` is what the asking
context's uid holds of what the limits per uid bound (docs/limits.md).

`fairness`: how faytd served core contexts ("the owner") while others
made calls.  owner_requests counts core requests read; owner_waited_behind
the requests of contexts that are not core read while such a request
waited (from faytd's last look at epoll before it saw it: an upper bound),
in all and _max for one; deferred the requests the one-per-uid budget of
a round left to the next one (faytd/core/serve.c).  Every answer costs
O(1): nothing here walks a table.
"""
import errno
import json

from libportal._abi import lib

from .frames import KernelError
from .native import core as _core, ffi as _cffi, lib as _clib

STATS_VERSION = 1       # the JSON's "version": fields are only ever added under one

# op number -> the name in "calls": FAYT_SYS_<NAME>, lower case.
OP_NAMES = {getattr(lib, n): n[len("FAYT_SYS_"):].lower()
            for n in dir(lib) if n.startswith("FAYT_SYS_")}

# Ops the C fast path performs, and the struct fayt_core counters that count them.
_FAST = {
    lib.FAYT_SYS_PORTAL: ("calls_portal",),
    lib.FAYT_SYS_UNMAP_DESTROY: ("calls_unmap_destroy",),
    lib.FAYT_SYS_UNMAP: ("calls_unmap",),
}


class Stats:
    """The counts Python keeps (the fast path's are in its struct)."""

    def __init__(self):
        self.python = {}            # op -> requests Python performed or refused

    def python_call(self, op):
        self.python[op] = self.python.get(op, 0) + 1


def stats_json(k, ctx):
    """FAYT_SYS_STATS's reply for context ctx (see docs/cli.md, "fayt stats")."""
    s, f = k.stats, k.fast
    calls = {}
    for op in sorted(set(OP_NAMES) | set(s.python)):
        fast = sum(getattr(f, c) for c in _FAST.get(op, ()))
        calls[OP_NAMES.get(op, "op_%d" % op)] = {"fast": fast, "python": s.python.get(op, 0)}
    fc = k.pager.faults.counts()
    core = ctx.category is not None and ctx.category.id == lib.FAYT_CATEGORY_CORE
    usage = _cffi.new("struct fayt_uid_usage *")
    _clib.fayt_core_uid_usage(_core, ctx.uid, usage)
    q, n = k.quotas, k.notifications
    j = k.journal
    out = {
        "version": STATS_VERSION,
        "calls": calls,
        "fast_path": {"enabled": not f.disabled, "sharepoints_created": f.creates,
                      "sharepoints_destroyed": f.destroys, "anon_mapped": f.anon_maps,
                      "anon_unmapped": f.anon_unmaps, "sharepoints_attached": f.attaches,
                      "sharepoints_unmapped": f.unmaps},
        "faults": {"total": fc["faults"], "in_one_call": fc["in_one_call"],
                   "by_loop": fc["faults"] - fc["in_one_call"], "fetched": fc["fetched"],
                   "mapped": fc["mapped"], "failed": fc["failed"],
                   "write_reports": fc["write_reports"], "events_in_c": fc["events_in_c"],
                   "events_in_python": fc["events_in_python"]},
        "contexts": {"total": len(k.contexts), "connected": q.connections},
        "sharepoints": {"scope": "all" if core else "uid",
                        "count": len(k.sharepoints) if core else usage.sharepoints},
        "limits": dict(q.usage(ctx.uid), uid=ctx.uid, sharepoints=usage.sharepoints,
                       ram=usage.ram, rings=n.uid_rings.get(ctx.uid, 0),
                       stacks=n.uid_stacks.get(ctx.uid, 0), bound=not core),
        "fairness": {"owner_requests": f.fair_core_requests,
                     "owner_waited_behind": f.fair_core_waited,
                     "owner_waited_behind_max": f.fair_core_waited_max,
                     "others_requests": f.fair_others, "deferred": f.fair_deferred,
                     **(k.flood.stats() if getattr(k, "flood", None) else {})},
        "frames": {"total": k.frames.nframes, "free": k.frames.free_frames},
        "notifications": {"rings": len(n.rings), "drops": sum(n.drops.values())},
        "chains": {"count": len(k.pager.chains.by_name),
                   "servers": len(k.pager.chains.members),
                   "regions": len(k.pager.regions.by_id)},
        "journal": {"enabled": j is not None,
                    "errors": f.journal_errors + (j.errors if j is not None else 0)},
        "cow": {"snapshot_spare_bytes": k.cow.spare.length if k.cow.spare is not None else 0},
        "queues": {"open": k.queues.count(), "records": k.queues.records,
                   "dropped": k.queues.dropped},
        "decisions": k.scheduling.counters(),
        "injected": _injected(k),
    }
    return json.dumps(out).encode()


def _injected(k):
    """Faults injected on purpose (faytd/injection.py): in all, by kind,
    and the rules in force."""
    k.injection.sync()
    return k.injection.counts()


def sys_stats(k, ctx, tid, body, fds):
    """FAYT_SYS_STATS: no body; the counters as JSON."""
    if body:
        raise KernelError(errno.EINVAL, "stats: takes no body (%d bytes sent)" % len(body))
    return stats_json(k, ctx), []
