"""The kernel state: frames, the share-point table, contexts, notifications
and the policy.

No socket code here: the server (server.py) hands events in, the syscall
layer (syscall.py) calls the methods that perform a request.
"""
import array
import errno
import logging
import os
import time
import traceback

from libportal._abi import ffi, lib

from .context import Context, Mapping
from .frames import (PAGE, BackingObject, FrameAllocator, KernelError, keeper_objects,
                     release_objects, run_tag, start_keeper, start_time)
from .journal import Journal, alive
from .notification import Notifications
from .pager import Pager
from .policy import Policy
from .sharepoint import SharePointTable

log = logging.getLogger("faytd")
FAST_MAX_FRAMES = lib.FAYT_FAST_MAX_FRAMES    # larger portals go through Python


class Kernel:
    def __init__(self, cfg, owner_uid, tag=None):
        self.cfg = cfg
        self.policy = Policy(cfg["policy"], owner_uid)
        # The fast system calls' state (fayt/kernel.h): see settle().
        self.fast = ffi.new("struct fayt_fast_kernel *")
        self.fast.journal_fd = -1
        self.fast.disabled = 0 if cfg.get("fast_syscalls", True) else 1
        self.fast.recycle = 1 if cfg.get("recycle_objects", True) else 0
        state_dir = cfg.get("state_dir")
        self.journal = Journal(state_dir, self.fast) if state_dir else None
        sps, ctxs = self.journal.load() if self.journal else ([], [])
        tag = tag or run_tag()
        self._keeper_kept = False
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
            lib.fayt_keeper_detach()
        else:
            lib.fayt_keeper_quit()
        if self.journal is not None:
            self.journal.abandon()
            self.journal = None

    def _start(self, cfg, sps, ctxs, tag):
        self.frames = FrameAllocator(cfg["ram"], tag)
        f = self.fast
        f.frames = self.frames.c
        f.max_portal_length = cfg["max_portal_length"]
        limit = cfg.get("max_ram_per_context")
        f.max_ram_per_context = (1 << 64) - 1 if limit is None else limit
        f.max_sharepoints = cfg["max_sharepoints"]
        f.max_mappings = cfg["max_mappings_per_context"]
        self._resident = ffi.new("struct fayt_fast_resident *")
        self._resident_frames = ffi.new("uint32_t[]", FAST_MAX_FRAMES)
        self._journal_errors = 0
        self.sharepoints = SharePointTable(self.frames, cfg["max_sharepoints"], self.fast)
        self.notifications = Notifications(self)
        self.sharepoints.on_destroy.append(self.notifications.sharepoint_destroyed)
        self.sharepoints.on_destroy.append(self._uncharge_sharepoint)
        self.pager = Pager(self)
        self.contexts = {}
        self._next_cid = 1
        self.server = None          # the Server, once it runs (watch_fd, catch_up)
        if self.journal:
            next_sp, next_ctx = self.journal.next_ids
            self.sharepoints.skip_ids(next_sp)
            self._next_cid = max(self._next_cid, next_ctx)
            self._adopt(sps, ctxs)
            self._open_journal()
            self.sharepoints.journal = self.journal

    def _open_journal(self):
        """(Re)write the journal with what is live, and the next ids."""
        self.journal.open(list(self.sharepoints.by_id.values()),
                          [c for c in self.contexts.values() if c.page is not None],
                          (self.sharepoints.next_id, self._next_cid))

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
        this faytd (they keep their memory all the same)."""
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
                backing = self.frames.adopt(r.object, r.length, r.frames)
            except Exception as e:
                log.error("journal: share-point %r not restored: %s", r.identifier,
                          getattr(e, "message", e))
                if getattr(e, "errno", None) in (errno.EINVAL, errno.ENOENT):
                    _unlink(r.object)       # does not fit this faytd: never restorable
                continue
            try:
                self.sharepoints.adopt(r, backing)
            except Exception as e:
                log.error("journal: share-point %r not restored: %s", r.identifier,
                          getattr(e, "message", e))
                self.frames.put(backing)
        self.frames.adopted()
        dead = []
        for r in ctxs:
            ctx = Context(r.id, None, r.pid, r.uid, r.gid, None,
                          self.policy.classify(r.uid, r.gid, None))
            ctx.start, ctx.connected = r.start, False
            try:
                ctx.adopt_page(BackingObject.adopt(0, r.object, PAGE, []))
            except Exception as e:
                log.error("journal: context %d (pid %d) not restored: %s", r.id, r.pid,
                          getattr(e, "message", e))
                if getattr(e, "errno", None) in (errno.EINVAL, errno.ENOENT):
                    _unlink(r.object)
                continue
            self.contexts[ctx.id] = ctx
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
        for pid in {sp.owner_pid for sp in self.sharepoints.by_id.values()} - owners:
            self.sharepoints.owner_died(pid)
        for ctx in dead:
            self.forget(ctx)
        log.info("journal: restored %d share-points, %d contexts of running processes",
                 len(self.sharepoints.by_id), len(self.contexts))

    # -- work kept off the reply path (the server calls it when idle) -----
    def has_idle_work(self):
        j = self.journal
        return j is not None and j.wants_compaction()

    def idle_work(self):
        """One step: a compaction of the journal."""
        self.settle()
        if self.journal is not None and self.journal.wants_compaction():
            self._open_journal()

    # -- the fast system calls (fayt/kernel.h, src/sysfast.c) -------------
    def settle(self, idle=False):
        """Take over every share-point and ANON portal the fast path made and
        still holds ("resident"), with the objects Python keeps for any other.  The
        server calls it before Python handles any event, so Python code
        never runs while a share-point it does not know exists.  idle: the
        loop had nothing to do; only if the oldest resident one is
        FAYT_FAST_RESIDENT_AGE_NS old (a scratch share-point destroyed at
        once is never taken over)."""
        f = self.fast
        if idle and (not f.nresident or time.monotonic_ns() - lib.fayt_fast_oldest_resident(f)
                     < lib.FAYT_FAST_RESIDENT_AGE_NS):
            return
        if f.journal_errors != self._journal_errors:
            log.error("journal: %d writes failed; a restart will not see those changes",
                      f.journal_errors - self._journal_errors)
            self._journal_errors = f.journal_errors
        if not f.nresident:
            return
        rec, buf = self._resident, self._resident_frames
        while lib.fayt_fast_take_resident(f, rec, buf, FAST_MAX_FRAMES) == 1:
            frames = array.array("I")
            frames.frombytes(ffi.buffer(buf, 4 * rec.nframes))
            backing = BackingObject.named(rec.oid, ffi.string(rec.object).decode(), rec.length,
                                          frames)
            ident = ffi.unpack(rec.identifier, rec.ident_len) if rec.ident_len else None
            try:
                self._take_over(rec, backing, ident)
            except Exception:       # a bug: that share-point goes, faytd goes on
                what = ("share-point %d (%r)" % (rec.sp_id, ident) if ident is not None
                        else "ANON portal %d of context %d" % (rec.handle, rec.ctx_id))
                log.error("fast path: %s could not be taken over; it goes:\n%s", what,
                          traceback.format_exc())
                self._drop_resident(rec, backing, ident)

    def _take_over(self, rec, backing, ident):
        ctx = self.contexts.get(rec.ctx_id)
        if ctx is None:             # never: contexts go only in Python's events, after settle
            raise RuntimeError("its context %d is gone" % rec.ctx_id)
        self.frames.take_over(backing)
        if rec.type == lib.FAYT_PORTAL_ANON:
            m = Mapping(rec.handle, lib.FAYT_PORTAL_ANON, backing, None, rec.pid, rec.tid,
                        rec.prot)
            m.charged = rec.length      # conn.ram counts it already
            self.add_mapping(ctx, m)
            return
        sp = self.sharepoints.take_over(rec.sp_id, ident, backing, rec.prot, rec.pid, rec.uid,
                                        rec.start or None)
        sp.charged = (ctx, rec.length)
        sp.captured[(ctx.id, rec.handle)] = (rec.pid, rec.tid)
        self.add_mapping(ctx, Mapping(rec.handle, lib.FAYT_PORTAL_SHARE | lib.FAYT_PORTAL_ANON,
                                      backing, sp, rec.pid, rec.tid, rec.prot))

    def _drop_resident(self, rec, backing, ident):
        """Undo what a resident share-point or portal holds, as far as it goes."""
        ctx = self.contexts.get(rec.ctx_id)
        if ident is None:               # an ANON portal
            if ctx is not None and rec.handle in ctx.mappings:
                return self.unmap(ctx, ctx.mappings[rec.handle])
            if ctx is not None:
                ctx.ram -= rec.length
            self.frames.objects.pop(backing.id, None)
            self.frames.put(backing)
            return
        sp = self.sharepoints.by_id.get(rec.sp_id)
        if sp is not None and sp.identifier == ident:
            if ctx is not None and rec.handle in ctx.mappings:
                self.unmap(ctx, ctx.mappings[rec.handle])
            self.sharepoints.destroy(sp)
            return
        lib.fayt_fast_name_del(self.fast, ident, len(ident))
        if ctx is not None:
            ctx.ram -= rec.length
        self.frames.objects.pop(backing.id, None)
        self.frames.put_frames(backing.frames)  # the mapping's reference
        self.frames.put(backing)            # the table's; the object is released

    def registered(self, ctx):
        """ctx has its context page (HELLO)."""
        if self.journal is not None:
            self.journal.context_registered(ctx)

    # -- contexts -------------------------------------------------------
    def new_context(self, sock, pid, uid, gid, exe):
        cat = self.policy.classify(uid, gid, exe)
        cid = self._next_cid
        self._next_cid += 1
        ctx = Context(cid, sock, pid, uid, gid, exe, cat)
        ctx.start = start_time(pid)
        self.contexts[cid] = ctx
        return ctx

    def drop_mappings(self, ctx):
        """Unmap everything ctx maps; one mapping that fails does not keep
        the others (it is logged and forgotten)."""
        for m in list(ctx.mappings.values()):
            try:
                self.unmap(ctx, m)
            except Exception:
                ctx.mappings.pop(m.handle, None)
                ctx.count_mappings()
                log.error("context %d: dropping mapping %d failed", ctx.id, m.handle,
                          exc_info=True)

    def disconnected(self, ctx):
        """The connection closed, but the process may live on.  If its robust
        records say it holds or is taking a lock, keep the whole context (its
        mappings too: they keep a destroyed share-point's memory reachable
        for recovery) until it dies.  If it owns share-points, keep watching
        it so that they are reclaimed at its death.  Else forget it."""
        ctx.connected = False
        lib.fayt_fast_conn_gone(self.fast, ctx.fast)   # it creates nothing any more
        watch = ctx.alive and ctx.pidfd >= 0
        if watch and ctx.lock_records():
            return
        self.drop_mappings(ctx)
        if not (watch and self.sharepoints.owns(ctx.pid)):
            self.forget(ctx)

    def died(self, ctx):
        """The process is gone: recover its locks, then forget it."""
        ctx.alive = False
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
        lib.fayt_fast_conn_gone(self.fast, ctx.fast)
        self.notifications.context_gone(ctx)
        self.pager.context_gone(ctx)
        if self.journal is not None:
            self.journal.context_gone(ctx)
        ctx.close_page()

    def recover_locks(self, ctx):
        others = None
        mapped = {m.sp.id: m.sp for m in ctx.mappings.values() if m.sp is not None}
        for sp_id, state in ctx.lock_records():
            sp = mapped.get(sp_id) or self.sharepoints.by_id.get(sp_id)
            if sp is None:
                continue
            try:
                others = self._recover_one(ctx, sp, sp_id, state, others)
            except Exception as e:      # one share-point must not stop the others'
                log.warning("pid %d: the lock of share-point %r not recovered: %s", ctx.pid,
                            sp.identifier.decode("utf-8", "replace"), getattr(e, "message", e))

    def _recover_one(self, ctx, sp, sp_id, state, others):
        """Recover sp's lock from ctx's record if ctx held it; `others` (the
        share-points other live contexts hold or take) is computed once."""
        if state == lib.FAYT_HELD_PENDING:
            # Died between claiming the record and taking (or recording)
            # the lock: it is ours only if held and nobody alive holds it.
            if sp.lock_state() & lib.FAYT_LOCK_STATE_MASK == lib.FAYT_LOCK_FREE:
                return others
            if others is None:
                others = set()
                for c in self.contexts.values():
                    if c is not ctx and c.alive:
                        others.update(i for i, s in c.lock_records()
                                      if s in (lib.FAYT_HELD_HELD, lib.FAYT_HELD_PENDING))
            if sp_id in others:
                return others
        elif state != lib.FAYT_HELD_HELD:
            return others
        try:
            sp.recover_lock()
        finally:
            if sp.destroyed:
                sp.close_meta()
        log.info("pid %d died holding the lock of share-point %r: released, owner-died set",
                 ctx.pid, sp.identifier.decode("utf-8", "replace"))
        return others

    def catch_up(self, ctx):
        """Perform what other connections already sent (Server.catch_up):
        for answers that a not-yet-performed unmap or destroy would change."""
        if self.server is not None:
            self.server.catch_up(ctx)

    # -- mappings -------------------------------------------------------
    def add_mapping(self, ctx, m):
        ctx.mappings[m.handle] = m
        ctx.count_mappings()

    # -- the per-context RAM quota (config max_ram_per_context) ----------
    def charge(self, ctx, nbytes):
        """Count nbytes of new frames against ctx's quota: ENOMEM past it."""
        limit = self.cfg.get("max_ram_per_context")
        if limit is not None and ctx.ram + nbytes > limit:
            raise KernelError(errno.ENOMEM, "length: %d bytes more would take this context past "
                              "its RAM quota (%d of %d bytes in use)" % (nbytes, ctx.ram, limit))
        ctx.ram += nbytes

    def allocate_for(self, ctx, length):
        """A new backing object of `length` bytes charged to ctx's quota."""
        self.charge(ctx, length)
        try:
            return self.frames.allocate(length)
        except BaseException:
            ctx.ram -= length
            raise

    def _uncharge_sharepoint(self, sp):
        if sp.charged is not None:
            ctx, n = sp.charged
            sp.charged = None
            ctx.ram -= n

    def unmap(self, ctx, m):
        ctx.mappings.pop(m.handle, None)
        ctx.count_mappings()
        ctx.ram -= m.charged
        m.charged = 0
        if m.type & lib.FAYT_PORTAL_SPECIAL:
            self.pager.unmap(ctx, m)
        elif m.sp is not None:
            self.sharepoints.release(m.sp, (ctx.id, m.handle))
        else:
            self.frames.put(m.backing)

    def shutdown(self):
        """A clean stop: everything is destroyed, and the journal removed."""
        self.settle()
        log.info("fast path: %d share-points created, %d destroyed; %d ANON portals mapped, "
                 "%d unmapped", self.fast.creates, self.fast.destroys, self.fast.anon_maps,
                 self.fast.anon_unmaps)
        if self.journal is not None:
            self.journal.close(remove=True)
            self.sharepoints.journal = self.journal = None
        self.pager.shutdown()
        self.notifications.shutdown()
        for ctx in list(self.contexts.values()):
            self.drop_mappings(ctx)
            self.forget(ctx)
        self.sharepoints.destroy_all()
        lib.fayt_fast_shutdown(self.fast)
        self.frames.release_all()


def _unlink(name):
    """Close an object the journal named but that cannot be taken back: the
    parts of it this keeper holds (another keeper's number may be a live
    object here).  At adoption the keeper holds only what the journal names,
    each part named by one record, so an open number is this record's."""
    mine = "/proc/%d/fd/" % lib.fayt_keeper_pid()
    parts = [n for n in name.split("+") if n.startswith(mine) and os.path.exists(n)]
    try:
        release_objects(parts)
    except (ValueError, IndexError):
        pass
