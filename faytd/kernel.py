"""The kernel state: frames, contexts, notifications, chains and the policy;
the share-point table and the share-point and ANON mappings are the C
core's (faytd/core/table.c), which this module calls.

No socket code here: the server (server.py) hands events in, the syscall
layer (syscalls/) calls the methods that perform a request.
"""
import errno
import logging
import os

from libportal._abi import lib

from .native import core, lib as clib

from .context import CONTEXT_BYTES, Context, ContextTable, Quotas
from .cow import Cow
from .discovery import Published
from .devices import Devices
from .direct import Direct, DirectBacking
from .frames import (BackingObject, FrameAllocator, KernelError, keeper_objects,
                     release_objects, run_tag, start_keeper)
from .injection import Injection
from .journal import Journal, alive
from .notification import Notifications
from .pager import Pager
from .policy import Policy
from .queue import Queues
from .sched import Scheduling
from .sharepoint import SharePoints
from .stats import Stats
from .stream import Channels
from .trace import Tracing

log = logging.getLogger("faytd")
_RECHECK_FIRST_S = 0.001    # a dead locker's PENDING record met a live one: look again after
_RECHECK_MAX_S = 1.0        # ... doubling up to this


class Kernel:
    def __init__(self, cfg, owner_uid, tag=None):
        self.cfg = cfg
        self.stats = Stats()        # which path served calls: stats.py, FAYT_SYS_STATS
        self.policy = Policy(cfg["policy"], owner_uid)
        # The C core (faytd/core/core.h): the owner of share-points, ANON
        # portals, their mappings and the contexts' accounting.
        self.fast = core
        self.policy.install_names(core)     # before the journal's names are taken back
        self.fast.journal_fd = -1
        self.fast.disabled = 0 if cfg.get("fast_syscalls", True) else 1
        self.fast.recycle = 1 if cfg.get("recycle_objects", True) else 0
        state_dir = cfg.get("state_dir")
        self.journal = Journal(state_dir, self.fast) if state_dir else None
        self._keeper_kept = False
        try:
            sps, ctxs = self.journal.load() if self.journal else ([], [])
        except BaseException:
            if self.journal is not None:
                self.journal.abandon()
            raise
        tag = tag or run_tag()
        try:
            named = {o for r in sps + ctxs for o in r.object.split("+")}
            swept = self._keeper(state_dir, named)
        except BaseException:
            self.abandon()
            raise
        if swept:
            log.info("closed %d objects a killed faytd left (not in its journal)", swept)
        try:
            self._start(cfg, sps, ctxs, tag)
        except BaseException:
            self.abandon()                  # the journal stays
            raise

    def abandon(self):
        """faytd does not serve after all (its socket is taken): the journal
        stays, and the keeper too if it holds what the journal names."""
        if self._keeper_kept:
            clib.fayt_keeper_detach(core)
        else:
            clib.fayt_keeper_quit(core)
        if self.journal is not None:
            self.journal.abandon()
            self.journal = None

    def _start(self, cfg, sps, ctxs, tag):
        self.frames = FrameAllocator(cfg["ram"], tag)
        f = self.fast
        f.max_portal_length = cfg["max_portal_length"]
        limit = cfg.get("max_ram_per_context")
        f.max_ram_per_context = (1 << 64) - 1 if limit is None else limit
        f.max_sharepoints = cfg["max_sharepoints"]
        f.max_mappings = cfg["max_mappings_per_context"]
        f.max_sharepoints_per_uid = cfg["max_sharepoints_per_uid"]
        f.reserved_sharepoints = cfg["reserved_sharepoints"]
        f.max_ram_per_uid = cfg["max_ram_per_uid"]
        f.reserved_ram = cfg["reserved_ram"]
        self.quotas = Quotas(cfg)   # connections and contexts per uid and process
        self._journal_errors = 0
        self.sharepoints = SharePoints(cfg["max_sharepoints"])
        self.notifications = Notifications(self)
        self.sharepoints.on_destroy.append(self.notifications.sharepoint_destroyed)
        self.pager = Pager(self)
        self.direct = Direct(self)
        self.devices = Devices(self)
        self.published = Published(self)
        self.queues = Queues(self)
        self.scheduling = Scheduling(self)
        self.channels = Channels(self)
        self.cow = Cow(self)
        self.injection = Injection(self)    # faults injected on purpose (docs/testing.md)
        self.tracing = Tracing(self)        # the timeline trace (docs/tracing.md)
        self.contexts = ContextTable()
        self._rechecks = {}         # sp id -> [sp, dead pid, delay]: see _recover_one
        self._recheck_fd = -1
        self._next_cid = 1
        self.server = None          # the Server, once it runs (watch_fd, catch_up)
        if self.journal:
            next_sp, next_ctx = self.journal.next_ids
            self.sharepoints.skip_ids(next_sp)
            self._next_cid = max(self._next_cid, next_ctx)
            self._adopt(sps, ctxs)
            self.scheduling.continue_parked(self.journal.parks)
            self._open_journal()

    def _open_journal(self):
        """(Re)write the journal with what is live, and the next ids."""
        self.journal.open([self.sharepoints.get(i, keep=False) for i in self.sharepoints.ids()],
                          [c for c in self.contexts.values() if c.page is not None],
                          (self.sharepoints.next_id, self._next_cid),
                          self.scheduling.journaled())

    # -- a restart: what the journal names ------------------------------
    def _keeper(self, state_dir, named):
        """Take over the keeper a killed faytd left in our state directory
        (it holds the objects the journal names), or start one.  The
        objects it holds that the journal does not name (ANON portals,
        rings, stacks, the dead faytd's pool) are closed now: how many."""
        pid, taken = start_keeper(state_dir)
        if not taken:
            return 0
        log.info("took over the object keeper (pid %d) of a killed faytd", pid)
        stale = [n for n in keeper_objects() if n not in named]
        release_objects(stale)
        self._keeper_kept = bool(named)
        return len(stale)

    def _adopt(self, sps, ctxs):
        """Take back the share-points and context pages a killed faytd left.

        Share-points come back with their data and lock as they were.  A
        context whose process still runs becomes a context without a
        connection, watched (pidfd) until it dies: then its locks are
        recovered and the share-points it owns follow the usual rule, as if
        faytd had never stopped.  A context whose process died meanwhile has
        its locks recovered now.  Share-points whose owner is gone are
        reclaimed: the mappings made before the restart are not known to
        this faytd (they keep their memory all the same).

        What a context had mapped, for its lock records (recover_locks):
        the share-points its process created (the share-point record names
        the owner's pid and start time) and those the journal says it
        attached (A records)."""
        # An object is named by one live record; if a destroy's record was
        # lost (a write that failed) and its object's number reused, the
        # newer share-point holds it.
        owner = {}
        for r in sps:
            for o in r.object.split("+"):
                owner[o] = max(owner.get(o, 0), r.id)
        for r in sps:
            newer = [owner[o] for o in r.object.split("+") if owner[o] != r.id]
            if newer:
                log.error("journal: share-point %r not restored: its object %s is share-point "
                          "%d's", r.identifier, r.object, newer[0])
                continue
            try:
                BackingObject.adopt(0, r.object, r.length, [])     # held, sealed, its size
                self.sharepoints.adopt(r)
            except Exception as e:
                log.error("journal: share-point %r not restored: %s", r.identifier,
                          getattr(e, "message", e))
                if getattr(e, "errno", None) in (errno.EINVAL, errno.ENOENT):
                    _unlink(r.object)       # does not fit this faytd: never restorable
                continue
        self.frames.adopted()
        created = {}                # (owner pid, start) -> ids of its share-points
        for sp_id in self.sharepoints.ids():
            sp = self.sharepoints.get(sp_id, keep=False)
            created.setdefault((sp.owner_pid, sp.owner_start or 0), []).append(sp_id)
        dead = []
        for r in ctxs:
            ctx = Context(r.id, None, r.pid, r.uid, r.gid, None,
                          self.policy.classify(r.uid, r.gid, None))
            ctx.start, ctx.connected = r.start, False
            try:
                ctx.adopt_page(BackingObject.adopt(0, r.object, CONTEXT_BYTES, []))
            except Exception as e:
                log.error("journal: context %d (pid %d) not restored: %s", r.id, r.pid,
                          getattr(e, "message", e))
                if getattr(e, "errno", None) in (errno.EINVAL, errno.ENOENT):
                    _unlink(r.object)
                continue
            self.contexts[ctx.id] = ctx
            ctx.fast.flags |= clib.FAYT_FAST_CONN_JOURNAL
            for sp_id in created.get((r.pid, r.start or 0), ()):
                clib.fayt_core_conn_mark(core, ctx.fast, sp_id, 0)
            for i in r.mapped:
                if self.sharepoints.get(i, keep=False) is not None:
                    clib.fayt_core_conn_mark(core, ctx.fast, i, 1)
            if alive(r.pid, r.start):
                try:
                    ctx.pidfd = os.pidfd_open(r.pid)
                except OSError:
                    ctx.pidfd = -1
            if ctx.pidfd < 0 or not alive(r.pid, r.start):
                dead.append(ctx)
        # The dead first give back their locks (a share-point whose owner is
        # among them is still in the table then), as died() does in order.
        for ctx in dead:
            ctx.alive = False
            ctx.close_pidfd()
        for ctx in dead:
            log.info("journal: pid %d died while faytd was down: its locks are recovered",
                     ctx.pid)
            self.recover_locks(ctx)
        owners = {c.pid for c in self.contexts.values() if c.alive}
        for pid in {self.sharepoints.get(i, keep=False).owner_pid
                    for i in self.sharepoints.ids()} - owners:
            self.sharepoints.owner_died(pid)
        for ctx in dead:
            self.forget(ctx)
        log.info("journal: restored %d share-points, %d contexts of running processes",
                 len(self.sharepoints), len(self.contexts))

    # -- work kept off the reply path (the server calls it when idle) -----
    def has_idle_work(self):
        j = self.journal
        return j is not None and j.wants_compaction()

    def idle_work(self):
        """One step: a compaction of the journal."""
        self.log_journal_errors()
        if self.journal is not None and self.journal.wants_compaction():
            self._open_journal()

    def log_journal_errors(self):
        """Journal writes of the core that failed since the last look."""
        f = self.fast
        if f.journal_errors != self._journal_errors:
            log.error("journal: %d writes failed; a restart will not see those changes",
                      f.journal_errors - self._journal_errors)
            self._journal_errors = f.journal_errors

    def registered(self, ctx):
        """ctx has its context page (HELLO)."""
        self.scheduling.events.created(ctx)
        self.tracing.context_seen(ctx)
        if self.journal is not None:
            self.journal.context_registered(ctx)
            ctx.fast.flags |= clib.FAYT_FAST_CONN_JOURNAL   # the core journals its attaches

    # -- contexts -------------------------------------------------------
    def new_context(self, sock, pid, uid, gid, exe, cat, start):
        """A context for a new connection: cat its category (policy.classify)
        and start its process's start time, both read once by the caller."""
        cid = self._next_cid
        self._next_cid += 1
        ctx = Context(cid, sock, pid, uid, gid, exe, cat)
        ctx.start = start
        self.contexts[cid] = ctx
        return ctx

    def drop_mappings(self, ctx):
        """Unmap everything ctx maps (the core's mappings, then Python's);
        one mapping that fails does not keep the others (it is logged and
        forgotten)."""
        clib.fayt_core_conn_drop(core, ctx.fast)
        for m in ctx.mappings.own():
            try:
                self.unmap(ctx, m)
            except Exception:
                ctx.mappings.pop(m.handle, None)
                ctx.count_mappings()
                log.error("context %d: dropping mapping %d failed", ctx.id, m.handle,
                          exc_info=True)

    def disconnected(self, ctx):
        """The connection closed, but the process may live on.  If its robust
        records say it holds or is taking the lock of a share-point it mapped
        (records naming others keep nothing), keep the whole context (its
        mappings too: they keep a destroyed share-point's memory reachable
        for recovery) until it dies.  If it owns share-points, keep watching
        it so that they are reclaimed at its death, unless another context
        of its process does.  Else forget it."""
        ctx.connected = False
        clib.fayt_fast_conn_gone(self.fast, ctx.fast)   # it creates nothing any more
        self.published.context_gone(ctx)                # nobody finds it any more
        self.queues.context_gone(ctx)                   # drained, then dropped
        self.scheduling.context_gone(ctx)               # its decisions undone
        self.channels.context_gone(ctx)                 # its listeners go, its channels reset
        self.devices.context_gone(ctx)                  # a model or driver stops with it
        watch = ctx.alive and ctx.pidfd >= 0
        records, ignored = ctx.mapped_lock_records(self.sharepoints)
        if watch and records:
            return                      # records naming what it never mapped keep nothing
        if ignored:                     # the line died() would write, had it come first
            log.warning("pid %d: %d of its lock records name share-points it never mapped: "
                        "ignored", ctx.pid, ignored)
        self.drop_mappings(ctx)
        if not (watch and self.sharepoints.owns(ctx.pid)) or self.quotas.watched_elsewhere(ctx):
            self.forget(ctx)
        self._idle_check()

    def _idle_check(self):
        """No connection left: nobody can take the snapshot spare, so its
        memory goes (docs/limits.md, "The snapshot spare")."""
        if self.quotas.connections <= 0:
            self.cow.drop_spare()

    def died(self, ctx):
        """The process is gone: recover its locks, then forget it."""
        ctx.alive = False
        self.injection.context_gone(ctx)    # first: a fault it injected killed it
        self.tracing.context_gone(ctx)      # what it recorded, before its recovery
        try:
            self.recover_locks(ctx)
        finally:
            try:
                self.drop_mappings(ctx)
            finally:
                try:
                    self.sharepoints.owner_died(ctx.pid)
                finally:
                    self.forget(ctx)

    def forget(self, ctx):
        if self.contexts.pop(ctx.id, None) is None:
            return
        self.quotas.forget(ctx)
        self.injection.context_gone(ctx)
        self.tracing.context_gone(ctx)
        clib.fayt_fast_conn_gone(self.fast, ctx.fast)
        self.notifications.context_gone(ctx)
        self.pager.context_gone(ctx)
        self.direct.context_gone(ctx)
        self.devices.context_gone(ctx)
        self.published.context_gone(ctx)
        self.queues.context_gone(ctx)
        self.scheduling.context_gone(ctx)
        self.channels.context_gone(ctx)
        if self.journal is not None:
            self.journal.context_gone(ctx)
        ctx.close_page()
        self._idle_check()

    def recover_locks(self, ctx):
        """ctx died: release the locks its robust records say it held.

        The records are bytes the dead process could write, so faytd acts
        only where that process could have acted itself: on share-points
        it was granted a mapping of (the core's record of what it mapped);
        a record naming any other share-point is ignored.  HELD: the lock
        is released with the owner-died bit.  PENDING (it died taking or
        releasing the lock): the same, if the lock is held and no live
        context that mapped the share-point records it HELD or PENDING (a
        possible holder); if only PENDING ones (inside their own try,
        a few instructions) it looks again shortly (_on_recheck) instead
        of giving up.  WAITING (asleep in the contended path) never held
        it.  So a live context's records block a recovery only for
        share-points it mapped, where it could hold the lock anyway."""
        holders = None
        records, ignored = ctx.mapped_lock_records(self.sharepoints)
        if ignored:                     # one line a context, whatever it wrote
            log.warning("pid %d: %d of its lock records name share-points it never mapped: "
                        "ignored", ctx.pid, ignored)
        try:
            for sp, state in records:
                try:
                    holders = self._recover_one(ctx, sp, state, holders)
                except Exception as e:      # one share-point must not stop the others'
                    log.warning("pid %d: the lock of share-point %r not recovered: %s",
                                ctx.pid, sp.identifier.decode("utf-8", "replace"),
                                getattr(e, "message", e))
        finally:
            # faytd's mapping of a meta page holds a descriptor (Python's
            # mmap keeps one): none outlives the recovery that needed it,
            # whoever destroys the share-point later (the C path, the owner's
            # death) and whether or not Python hears of it.
            for sp, _ in records:
                if sp.id not in self._rechecks:
                    sp.close_meta()

    def _possible_holders(self, dead=None):
        """{share-point id: HELD or PENDING} for the locks some live context
        other than `dead` may hold: it mapped the share-point and records
        it so (HELD wins over PENDING)."""
        out = {}
        for c in self.contexts.values():
            if c is not dead and c.alive:
                for sp, s in c.mapped_lock_records(self.sharepoints)[0]:
                    if s == lib.FAYT_HELD_HELD:
                        out[sp.id] = s
                    elif s == lib.FAYT_HELD_PENDING:
                        out.setdefault(sp.id, s)
        return out

    def _recover_one(self, ctx, sp, state, holders):
        """Recover sp's lock from ctx's record if ctx held it; `holders`
        (_possible_holders) is computed once, when first needed."""
        if state == lib.FAYT_HELD_PENDING:
            # Died between claiming the record and taking (or recording)
            # the lock, or inside unlock: ours only if held and no live
            # context that maps it may hold it.
            if not _held(sp):
                return holders
            if holders is None:
                holders = self._possible_holders(ctx)
            if holders.get(sp.id) == lib.FAYT_HELD_PENDING:
                # A live context is inside its own try (or release): it may
                # be the holder, or about to find the lock held and sleep.
                # A PENDING record lasts a few instructions: look again soon.
                self._recheck_later(sp, ctx.pid)
                return holders
            if sp.id in holders:
                return holders
        elif state != lib.FAYT_HELD_HELD:
            return holders              # WAITING never holds; anything else is not a record
        self._release_dead_lock(ctx.pid, sp)
        return holders

    def _release_dead_lock(self, pid, sp):
        try:
            sp.recover_lock()
        finally:
            if sp.destroyed:
                sp.close_meta()
        self.tracing.recovered(pid, sp)
        log.info("pid %d died holding the lock of share-point %r: released, owner-died set",
                 pid, sp.identifier.decode("utf-8", "replace"))

    # -- PENDING records seen at a death, looked at again -------------------
    def _recheck_later(self, sp, pid):
        if sp.id not in self._rechecks:
            self._rechecks[sp.id] = [sp, pid, _RECHECK_FIRST_S]
            log.info("pid %d died taking the lock of share-point %r while another context "
                     "tried it: looking again", pid, sp.identifier.decode("utf-8", "replace"))
        self._arm_recheck()

    def _arm_recheck(self):
        if not self._rechecks or self.server is None:
            return                  # serving() arms it (a restart's adoption)
        if self._recheck_fd < 0:
            fd = clib.fayt_timerfd_open()
            if fd < 0:
                log.error("lock re-checks: timerfd_create: %s", os.strerror(-fd))
                return
            self._recheck_fd = fd
            self.server.watch_fd(fd, self._on_recheck)
        delay = min(r[2] for r in self._rechecks.values())
        clib.fayt_timerfd_arm(self._recheck_fd, int(delay * 1e9))

    def serving(self):
        """The server runs (Server.__init__): timers may be armed now."""
        self._arm_recheck()
        self.tracing.serving()

    def _on_recheck(self, fd, events):
        """Each share-point whose dead locker's PENDING record met a live
        PENDING one: free now, or a live HELD record, ends it; still a live
        PENDING one, look again later (backing off to once a second); no
        live possible holder, and the lock held: the dead one held it."""
        clib.fayt_timerfd_drain(fd)
        holders = self._possible_holders()
        for sp_id, r in list(self._rechecks.items()):
            sp, pid, delay = r
            try:
                if (sp.destroyed and not sp.captured) or not _held(sp):
                    del self._rechecks[sp_id]
                elif holders.get(sp_id) == lib.FAYT_HELD_PENDING:
                    r[2] = min(2 * delay, _RECHECK_MAX_S)
                elif sp_id in holders:
                    del self._rechecks[sp_id]
                else:
                    del self._rechecks[sp_id]
                    self._release_dead_lock(pid, sp)
            except Exception as e:
                self._rechecks.pop(sp_id, None)
                log.warning("the lock of share-point %r not recovered: %s",
                            sp.identifier.decode("utf-8", "replace"), getattr(e, "message", e))
            if sp_id not in self._rechecks:
                sp.close_meta()         # as recover_locks: no descriptor outlives the need
        self._arm_recheck()

    def catch_up(self, ctx):
        """Perform what other connections already sent (Server.catch_up):
        for answers that a not-yet-performed unmap or destroy would change."""
        if self.server is not None:
            self.server.catch_up(ctx)

    # -- mappings -------------------------------------------------------
    def add_mapping(self, ctx, m):
        """One of Python's own mappings (a SPECIAL portal, a notification
        stack); the core records its own."""
        ctx.mappings[m.handle] = m
        ctx.count_mappings()

    # -- the RAM quotas (config max_ram_per_context, max_ram_per_uid) ------
    def charge(self, ctx, nbytes):
        """Count nbytes of new frames against ctx's quota: ENOMEM past it."""
        ctx.charge(nbytes)      # the core's checks: the context's, its uid's, the reserve

    def allocate_for(self, ctx, length, obj=None):
        """A new backing object of `length` bytes charged to ctx's quota
        (obj: one made ahead, frames.allocate)."""
        self.charge(ctx, length)
        try:
            return self.frames.allocate(length, obj)
        except BaseException:
            ctx.ram -= length
            raise

    def unmap(self, ctx, m):
        """Drop one of Python's own mappings (the core's: syscalls/portal.py)."""
        ctx.mappings.pop(m.handle, None)
        ctx.count_mappings()
        ctx.ram -= m.charged
        m.charged = 0
        if m.type & lib.FAYT_PORTAL_SPECIAL:
            self.pager.unmap(ctx, m)
        elif isinstance(m.backing, DirectBacking):    # DIRECT, COW at least on write
            self.direct.unmap(m)
        else:
            self.frames.put(m.backing)

    def shutdown(self):
        """A clean stop: everything is destroyed, and the journal removed."""
        self.log_journal_errors()
        self.tracing.shutdown()             # the trace file completed first
        f = self.fast
        log.info("fast path: %d share-points created, %d destroyed; %d ANON portals mapped, "
                 "%d unmapped; %d attaches, %d share-point unmaps", f.creates, f.destroys,
                 f.anon_maps, f.anon_unmaps, f.attaches, f.unmaps)
        if self.journal is not None:
            self.journal.close(remove=True)
            self.journal = None
            self.fast.journal_fd = -1
        self._rechecks.clear()
        if self._recheck_fd >= 0:
            if self.server is not None:
                self.server.unwatch_fd(self._recheck_fd)
            os.close(self._recheck_fd)
            self._recheck_fd = -1
        self.scheduling.shutdown()
        self.cow.drop_spare()
        self.queues.shutdown()
        self.pager.shutdown()
        self.notifications.shutdown()
        for ctx in list(self.contexts.values()):
            self.drop_mappings(ctx)
            self.forget(ctx)
        self.sharepoints.destroy_all()
        self.frames.release_all()
        self.devices.shutdown()


def _held(sp):
    """Whether sp's lock is held (faytd's own mapping of a destroyed
    share-point's meta page is not kept)."""
    try:
        return sp.lock_state() & lib.FAYT_LOCK_STATE_MASK != lib.FAYT_LOCK_FREE
    finally:
        if sp.destroyed:
            sp.close_meta()


def _unlink(name):
    """Close an object the journal named but that cannot be taken back: the
    parts of it this keeper holds (another keeper's number may be a live
    object here).  At adoption the keeper holds only what the journal names,
    each part named by one record, so an open number is this record's."""
    mine = "/proc/%d/fd/" % clib.fayt_keeper_pid(core)
    parts = [n for n in name.split("+") if n.startswith(mine) and os.path.exists(n)]
    try:
        release_objects(parts)
    except (ValueError, IndexError):
        pass
