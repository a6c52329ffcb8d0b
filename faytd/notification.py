"""Notifications in faytd: rings, notification stacks, and faytd's own notices.

faytd is only the control plane of notifications (DESIGN section 6):
- OPEN checks the policy once and makes the ring of a (sender, target) pair:
  one sealed memfd (fayt/notification.h), its fd to the sender in the
  reply; the target is told through its context page (a ring record and
  rings_generation bumped, plus one doorbell signal if its runtime is armed)
  and fetches the fd with FETCH.  After that the two processes deliver,
  wait and return through the ring alone (futexes and one real-time signal).
- faytd maps every ring it made, so that when a side dies it can mark the
  ring (fayt_ring_kill): a dead target fails every sender waiting for a
  return at once (ESRCH).  A dead sender's ring that holds no posted entry
  is unlinked and its record removed at once; one that does is kept (state
  SENDER_DEAD, still recorded, still fetchable), so that what the sender
  posted before it died is delivered: the target drains it and gives it back
  (RELEASE).  A target that finds a ring corrupt gives it back the same way
  while its sender lives: the ring is DROPPED, its sender gets EPROTO.
- faytd never waits or loops on memory a client can write: it reads a ring
  only to post its own notices (fayt_ring_post with NOWAIT, which validates
  the words and is bounded) and, once, to see whether a dead sender's ring
  holds entries.  A doorbell faytd rings (its own notices, and IMMEDIATE
  notifications from senders that may not signal their target: RING) goes
  only to a target its own record says is armed (notify_armed: it installed
  a handler, subscribed or fetched rings), never by the ring's `armed`.
- Notification stacks are ANON memory from the frame allocator, recorded as
  mappings of the context (so a death frees them like any portal) and in
  the context page's stacks[] records.
- faytd is itself a sender: a context that subscribes gets a ring from faytd
  (sender FAYT_SENDER_KERNEL) carrying struct fayt_event_payload: a watched
  peer died, a share-point it maps was destroyed.  faytd never blocks on a
  full ring: the event waits in a backlog, posted again from faytd's loop
  every RETRY_NS (a timerfd armed only while a backlog exists), at the
  target's next fetch, or at faytd's next event for it.  The backlog is
  bounded (BACKLOG_MAX): beyond it notices are counted, not kept, and an
  OVERFLOW notice (sp_id: how many) takes their place at their slot, as
  inotify's IN_Q_OVERFLOW does.  A subscriber that corrupts its notice ring
  loses that ring (dropped) and what was in its backlog (counted the same
  way, reported first in the fresh ring its next notice makes).
- The pending hint (fayt/notification.h): one small shm object per target,
  made with the first ring into it or at its HINT call, its fd given to
  every sender with its ring (OPEN's second fd).  Every post bumps it, so
  the target's share-point fast path notices a post with one load.  A sender
  can only make the target look at its rings for nothing, or put off such a
  look: the rings, which it cannot touch, say what was posted.  faytd bumps
  it for its own posts; it unlinks the object when the target is forgotten.

- Limits (docs/limits.md): a uid's contexts that are not core may send on
  at most max_rings_per_uid rings and hold max_stacks_per_uid stacks (their
  RAM is charged as any portal's); a ring's or a hint's mapping in faytd
  holds no descriptor (context.ObjectMap).  Every walk is of one context's
  rings (by_ctx), never of all of them: a call costs what its context has.

Objects only: the calls are decoded, and their rights checked, in
syscalls/notify.py, which then calls one method here.  Who may do what:
installing handlers needs the category's notify_handlers right (core);
opening a ring needs the category's notify right to name the target
(policy.py; by default core anyone, others their own uid), checked once when
the pair's ring is made.
"""
import errno
import logging
import os
import signal

from libportal._abi import ffi, lib, _fastpath

from .context import Mapping, ObjectMap, uncount
from .frames import BackingObject, KernelError, PAGE, pages
from .native import lib as clib

log = logging.getLogger("faytd")

RING_BYTES = lib.fayt_ring_bytes()
STACK_MAX_BYTES = 1 << 20
DOORBELL = signal.SIGRTMIN + lib.FAYT_DOORBELL_SIGRTMIN_OFFSET
RETRY_NS = 5 * 1000 * 1000      # a backlog of faytd's notices is retried this often
BACKLOG_MAX = 4 * lib.FAYT_RING_ENTRIES   # notices one subscriber's backlog keeps
RINGS_PER_OTHER_UID = lib.FAYT_RINGS_MAX // 4   # rings into one target from one other uid


class Lost:
    """An overflow mark in a backlog: `count` notices for slot `index` lost."""
    __slots__ = ("index", "count")

    def __init__(self, index, count=0):
        self.index, self.count = index, count

    def payload(self):
        e = ffi.new("struct fayt_event_payload *")
        e.event, e.sp_id = lib.FAYT_EVENT_OVERFLOW, min(self.count, 0xffffffff)
        return bytes(ffi.buffer(e))


def doorbell(ctx):
    """Ring ctx's doorbell (pidfd_send_signal: no pid reuse race)."""
    if ctx.pidfd < 0 or not ctx.alive:
        return
    try:
        signal.pidfd_send_signal(ctx.pidfd, DOORBELL)
    except OSError:
        pass


class Hint:
    """The pending-hint object of one target context."""
    __slots__ = ("backing", "map", "buf", "word")

    def __init__(self, tag):
        self.backing = BackingObject(0, tag + ".hint", lib.FAYT_HINT_BYTES, [])
        self.map = ObjectMap(self.backing, lib.FAYT_HINT_BYTES)
        self.buf = self.map.ptr
        self.word = ffi.cast("uint32_t *", ffi.addressof(
            ffi.cast("struct fayt_notify_hint *", self.buf), "posted"))

    def open_fd(self):
        if self.backing.name is None:
            raise KernelError(errno.ESRCH, "hint: its context is gone")
        return self.backing.open_fd()

    def close(self):
        self.backing.release()
        self.word = ffi.NULL
        self.buf = None
        self.map.close()


class Ring:
    """One (sender, target) ring.  sender is None for faytd's own ring."""
    __slots__ = ("id", "sender", "target", "backing", "map", "ptr", "backlog", "hint",
                 "marks", "kept")

    def __init__(self, rid, sender, target, tag, hint):
        self.id = rid
        self.hint = hint            # the target's Hint
        self.sender = sender
        self.target = target
        self.backlog = []           # (index, payload) or Lost, in order
        self.marks = {}             # index -> its Lost still in the backlog
        self.kept = False           # the sender died with entries posted: the target drains it
        self.backing = BackingObject(0, tag + ".ring", RING_BYTES, [])
        self.map = ObjectMap(self.backing, RING_BYTES)
        self.ptr = self.map.ptr
        lib.fayt_ring_init(self.ptr, sender.id if sender else lib.FAYT_SENDER_KERNEL,
                           target.id, target.pid)
        if target.notify_armed:     # our record: its runtime handles the doorbell
            ffi.cast("struct fayt_ring_header *", self.ptr).armed = 1

    def open_fd(self):
        if self.backing.name is None:
            raise KernelError(errno.ESRCH, "ring %d: its target is gone" % self.id)
        return self.backing.open_fd()

    def kill(self, state):
        self.hint = None
        lib.fayt_ring_kill(self.ptr, state)
        self.backing.release()
        self.ptr = None
        self.map.close()

    def post(self, index, payload):
        """faytd's own post: never waits; a full ring keeps it in the backlog
        (at most BACKLOG_MAX; beyond, an overflow mark counts it).  Returns
        whether a backlog is left; raises KernelError(EPROTO) if the target
        corrupted the ring."""
        if len(self.backlog) < BACKLOG_MAX:
            self.backlog.append((index, payload))
        else:
            self.lose(index, 1)
        return self.retry()

    def lose(self, index, n):
        m = self.marks.get(index)
        if m is None:
            m = self.marks[index] = Lost(index)
            self.backlog.append(m)      # at most one per slot beyond BACKLOG_MAX
        m.count += n

    def retry(self):
        """Post what waits in the backlog, in order, while the ring has room.
        Never waits: fayt_ring_post with NOWAIT validates the ring's words
        and gives up at once.  EPROTO: the target scribbled on it."""
        if self.ptr is None or self.hint is None:
            self.backlog.clear()
            self.marks.clear()
            return False
        # libportal's binding of fayt_ring_post (it never waits: NOWAIT);
        # made here, for this retry, since the hint may go before the ring.
        port = _fastpath.SenderRing(self.map.addr, sender=lib.FAYT_SENDER_KERNEL, pidfd=-1,
                                    signo=DOORBELL,
                                    hint=int(ffi.cast("uintptr_t", self.hint.word)))
        while self.backlog:
            item = self.backlog[0]
            if isinstance(item, Lost):
                i, p = item.index, item.payload()
            else:
                i, p = item
            r = port.post(i, p, lib.FAYT_NOTIFY_IMMEDIATE)
            if r == lib.FAYT_RING_POSTED_RING:
                if self.target.notify_armed:    # our record, not the ring's `armed`
                    doorbell(self.target)
            elif r == errno.EPROTO:
                raise KernelError(errno.EPROTO, "ring %d: context %d corrupted its notice ring"
                                  % (self.id, self.target.id))
            elif r:
                break
            self.backlog.pop(0)
            if isinstance(item, Lost):
                self.marks.pop(item.index, None)
        return bool(self.backlog)

    def lost(self):
        """What the backlog holds, as counts per slot (the ring is being dropped)."""
        n = {}
        for item in self.backlog:
            i, c = (item.index, item.count) if isinstance(item, Lost) else (item[0], 1)
            n[i] = n.get(i, 0) + c
        return n


class Notifications:
    """faytd's notification state: rings by id and by pair, subscriptions."""

    def __init__(self, kernel):
        self.k = kernel
        self.rings = {}             # id -> Ring
        self.pairs = {}             # (sender id or 0, target id) -> Ring
        self.by_ctx = {}            # context id -> {ring id: Ring} it sends on or is the target of
        self.uid_rings = {}         # uid -> rings its contexts send on (not faytd's)
        self.stacks = {}            # context id -> handles of its notification stacks
        self.uid_stacks = {}        # uid -> notification stacks its contexts hold
        self.subs = {}              # context id -> {event: (index, arg)}
        self.hints = {}             # context id -> Hint (made with its first ring or HINT)
        self._next = 1
        self.stopping = False
        self.backlogged = set()     # faytd's rings with notices waiting for room
        self.lost = {}              # context id -> {index: notices lost with a dropped ring}
        self.drops = {}             # (sender id or 0, target id) -> rings dropped as corrupt
        self._timerfd = -1          # armed while any does: retried every RETRY_NS

    # -- the context page ---------------------------------------------------
    @staticmethod
    def _bump(ctx):
        p = ctx.page_struct
        if p is not None:
            p.notify.rings_generation = (p.notify.rings_generation + 1) & 0xffffffff
            lib.fayt_futex_wake(ffi.cast("uint32_t *",
                                         ffi.addressof(p.notify, "rings_generation")), 1 << 30)

    def _record(self, ring):
        p = ring.target.page_struct
        for i in range(lib.FAYT_RINGS_MAX):
            if p.rings[i].ring_id == 0:
                p.rings[i].sender = ring.sender.id if ring.sender else 0
                p.rings[i].ring_id = ring.id
                return
        raise KernelError(errno.ENOSPC, "target: context %d has %d rings, the most it may have"
                          % (ring.target.id, lib.FAYT_RINGS_MAX))

    @staticmethod
    def _unrecord(ring):
        p = ring.target.page_struct
        if p is None:
            return
        for i in range(lib.FAYT_RINGS_MAX):
            if p.rings[i].ring_id == ring.id:
                p.rings[i].ring_id = 0
                p.rings[i].sender = 0

    # -- rings --------------------------------------------------------------
    def hint(self, ctx):
        """ctx's pending-hint object, made on first use."""
        h = self.hints.get(ctx.id)
        if h is None:
            h = self.hints[ctx.id] = Hint(self.k.frames.tag)
        return h

    def ring(self, sender, target):
        """The ring of this pair, made on first use."""
        key = (sender.id if sender else 0, target.id)
        r = self.pairs.get(key)
        if r is not None:
            return r
        if sender is not None and sender.uid != target.uid:
            # Another uid's senders share a quarter of the target's ring
            # records, so that no one uid's connections take them all and
            # leave honest senders (and faytd's notices) ENOSPC.
            held = sum(1 for x in self.by_ctx.get(target.id, {}).values()
                       if x.target is target and x.sender is not None and x.sender.uid == sender.uid)
            if held >= RINGS_PER_OTHER_UID:
                raise KernelError(errno.ENOSPC, "target: context %d already has %d rings from "
                                  "uid %d, the most one other uid may hold"
                                  % (target.id, held, sender.uid))
        if sender is not None and not sender.is_core:
            n = self.uid_rings.get(sender.uid, 0)
            if n >= self.k.cfg["max_rings_per_uid"]:
                raise KernelError(errno.ENOSPC, "target: uid %d sends on %d rings, its limit "
                                  "(config max_rings_per_uid)" % (sender.uid, n))
        r = Ring(self._next, sender, target, self.k.frames.tag, self.hint(target))
        try:
            self._record(r)
        except KernelError:
            r.kill(lib.FAYT_RING_TARGET_DEAD)
            raise
        self._next += 1
        self.rings[r.id] = r
        self.pairs[key] = r
        self.by_ctx.setdefault(target.id, {})[r.id] = r
        if sender is not None:
            self.by_ctx.setdefault(sender.id, {})[r.id] = r
            self.uid_rings[sender.uid] = self.uid_rings.get(sender.uid, 0) + 1
        self._bump(target)
        if target.notify_armed:
            doorbell(target)
        return r

    def drop(self, r, state):
        if state == lib.FAYT_RING_DROPPED:      # for INFO (syscalls/info.py)
            key = (r.sender.id if r.sender else 0, r.target.id)
            self.drops[key] = self.drops.get(key, 0) + 1
        if self.rings.pop(r.id, None) is not None:
            for c in (r.target, r.sender):
                if c is not None:
                    mine = self.by_ctx.get(c.id)
                    if mine is not None:
                        mine.pop(r.id, None)
                        if not mine:
                            del self.by_ctx[c.id]
            if r.sender is not None:
                uncount(self.uid_rings, r.sender.uid)
        self.backlogged.discard(r)
        if self.pairs.get((r.sender.id if r.sender else 0, r.target.id)) is r:
            del self.pairs[(r.sender.id if r.sender else 0, r.target.id)]
        if state != lib.FAYT_RING_TARGET_DEAD:
            self._unrecord(r)
            self._bump(r.target)
            if r.target.notify_armed:
                doorbell(r.target)
        r.kill(state)

    def sender_gone(self, r):
        """r's sender is forgotten.  Entries it posted are still the
        target's: keep the ring (recorded, fetchable) until the target has
        drained it and gives it back (RELEASE), or dies.  One look at the
        sequence words (no wait, no loop beyond the ring) decides; a target
        that makes an unread entry look taken only loses it itself."""
        if lib.fayt_ring_posted(r.ptr):
            self.pairs.pop((r.sender.id, r.target.id), None)
            r.kept = True
            ffi.cast("struct fayt_ring_header *", r.ptr).state = lib.FAYT_RING_SENDER_DEAD
            self._bump(r.target)
            if r.target.notify_armed:
                doorbell(r.target)
            return
        self.drop(r, lib.FAYT_RING_SENDER_DEAD)

    def corrupt(self, r):
        """The target scribbled on faytd's own ring into it: drop the ring;
        its backlog is lost, reported in the next ring (OVERFLOW)."""
        log.warning("context %d: its notice ring %d is corrupt; dropped", r.target.id, r.id)
        for i, c in r.lost().items():
            self._count_lost(r.target, i, c)
        self.drop(r, lib.FAYT_RING_DROPPED)

    def count_into(self, ctx):
        """Rings into ctx faytd holds (a dead sender's kept ones included)."""
        return sum(1 for r in self.by_ctx.get(ctx.id, {}).values() if r.target is ctx)

    def rings_into(self, ctx, after):
        return [r for rid, r in sorted(self.by_ctx.get(ctx.id, {}).items())
                if r.target is ctx and rid > after]

    def flush(self, ctx):
        r = self.pairs.get((0, ctx.id))
        if r is not None and r.backlog:
            self._retry(r)

    def _retry(self, r):
        """Retry r's backlog; whether one is left."""
        try:
            left = r.retry()
        except KernelError:
            self.corrupt(r)
            return False
        if not left:
            self.backlogged.discard(r)
        return left

    def _backlogged(self, r):
        """r keeps notices back (its ring is full): retry them from faytd's
        loop every RETRY_NS until the target has made room."""
        self.backlogged.add(r)
        server = getattr(self.k, "server", None)
        if server is None:
            return          # no loop (a Kernel alone): the next event or fetch retries
        if self._timerfd < 0:
            fd = clib.fayt_timerfd_open()
            if fd < 0:
                log.warning("notices: no timerfd (%s): a full ring waits for the next "
                            "event or fetch", os.strerror(-fd))
                return
            self._timerfd = fd
            server.watch_fd(fd, self._on_timer)
        clib.fayt_timerfd_arm(self._timerfd, RETRY_NS)

    def _on_timer(self, fd, events):
        clib.fayt_timerfd_drain(fd)
        for r in list(self.backlogged):
            if r.id not in self.rings or not self._retry(r):
                self.backlogged.discard(r)
        if self.backlogged:
            clib.fayt_timerfd_arm(fd, RETRY_NS)

    # -- faytd's own notifications ---------------------------------------------
    def event(self, target, kind, context_id=0, pid=0, sp_id=0, identifier=b""):
        sub = self.subs.get(target.id, {}).get(kind)
        if sub is None or not target.alive or target.page_struct is None:
            return
        e = ffi.new("struct fayt_event_payload *")
        e.event, e.context_id, e.pid, e.sp_id = kind, context_id, pid, sp_id
        ffi.memmove(e.identifier, identifier[:31], len(identifier[:31]))
        self.notice(target, sub[0], bytes(ffi.buffer(e)))

    def notice(self, target, index, payload):
        """Post one of faytd's notices (payload bytes) at target's slot
        `index`: never waits (a full ring: the backlog)."""
        try:
            r = self.ring(None, target)
        except KernelError as e:
            log.warning("context %d: cannot notify it: %s", target.id, e.message)
            self._count_lost(target, index)
            return
        for i, c in sorted(self.lost.pop(target.id, {}).items()):
            r.lose(i, c)        # a dropped ring's notices: reported first
        try:
            if r.post(index, payload):
                self._backlogged(r)
        except KernelError:
            self.corrupt(r)

    def _count_lost(self, target, index, n=1):
        lost = self.lost.setdefault(target.id, {})
        lost[index] = lost.get(index, 0) + n

    def context_gone(self, ctx):
        """ctx is forgotten (died, or closed and not kept): fail its senders,
        reclaim the rings it sent on, tell who watches it."""
        for r in list(self.by_ctx.get(ctx.id, {}).values()):
            if r.target is ctx:
                self.drop(r, lib.FAYT_RING_TARGET_DEAD)
            elif r.sender is ctx and not r.kept:
                self.sender_gone(r)
        for _ in self.stacks.pop(ctx.id, ()):
            uncount(self.uid_stacks, ctx.uid)
        self.subs.pop(ctx.id, None)
        self.lost.pop(ctx.id, None)
        for key in [key for key in self.drops if ctx.id in key]:   # (rare: corrupt rings only)
            del self.drops[key]
        h = self.hints.pop(ctx.id, None)
        if h is not None:
            h.close()
        if self.stopping:
            return
        for cid, sub in list(self.subs.items()):
            w = sub.get(lib.FAYT_EVENT_PEER_DIED)
            target = self.k.contexts.get(cid)
            if w is not None and target is not None and w[1] in (0, ctx.id):
                self.event(target, lib.FAYT_EVENT_PEER_DIED, ctx.id, ctx.pid)

    def sharepoint_destroyed(self, sp):
        if self.stopping:
            return
        for cid in {key[0] for key in sp.captured}:
            target = self.k.contexts.get(cid)
            if target is not None:
                self.event(target, lib.FAYT_EVENT_SP_DESTROYED, sp_id=sp.id,
                           identifier=sp.identifier)

    def shutdown(self):
        self.stopping = True
        for r in list(self.rings.values()):
            self.drop(r, lib.FAYT_RING_TARGET_DEAD)
        for h in self.hints.values():
            h.close()
        self.hints.clear()
        if self._timerfd >= 0:
            server = getattr(self.k, "server", None)
            if server is not None:
                server.unwatch_fd(self._timerfd)
            os.close(self._timerfd)
            self._timerfd = -1

    # -- what the notification calls perform (syscalls/notify.py) -------------
    @staticmethod
    def install(ctx, index, cookie):
        """ctx's handler of slot `index` is `cookie` (its runtime's)."""
        ctx.page_struct.actions[index].handler = ffi.cast("void (*)(void *, int, int)", cookie)
        ctx.notify_armed = True

    @staticmethod
    def remove(ctx, index):
        ctx.page_struct.actions[index].handler = ffi.NULL
        if ctx.page_struct.notify.provider == index:
            ctx.page_struct.notify.provider = lib.FAYT_NO_PROVIDER

    @staticmethod
    def set_provider(ctx, index):
        ctx.page_struct.notify.provider = index

    def has_ring(self, sender, target):
        return (sender.id, target.id) in self.pairs

    def open(self, sender, target):
        """The ring of (sender, target), made on first use, and the fds the
        sender gets: the ring's and the target's pending hint's."""
        r = self.ring(sender, target)
        fd = r.open_fd()
        try:
            return r, [fd, self.hint(target).open_fd()]
        except BaseException:
            os.close(fd)
            raise

    def hint_fd(self, ctx):
        return self.hint(ctx).open_fd()

    def close(self, sender, target_id):
        r = self.pairs.get((sender.id, target_id))
        if r is None:
            raise KernelError(errno.ENOENT, "target: this context has no ring into %d" % target_id)
        self.drop(r, lib.FAYT_RING_SENDER_DEAD)

    def ring_doorbell(self, sender, target_id):
        """Ring the doorbell of a target the sender may not signal itself (it
        runs as another uid): the sender has posted an IMMEDIATE notification
        into its ring.  faytd rings only a target its own record says handles
        the doorbell; the ring's `armed` word is the target's to write."""
        r = self.pairs.get((sender.id, target_id))
        if r is None:
            raise KernelError(errno.ENOENT, "target: this context has no ring into %d" % target_id)
        t = r.target
        if not t.alive or t.pidfd < 0:
            raise KernelError(errno.ESRCH, "target: context %d is gone" % target_id)
        if not t.notify_armed:
            raise KernelError(errno.EPERM, "target: context %d handles no doorbell (no handler "
                              "armed); the notification waits for its next dispatch point"
                              % target_id)
        if _doorbell_pending(t.pid):
            return                  # the outstanding doorbell takes this entry too
        try:
            signal.pidfd_send_signal(t.pidfd, DOORBELL)
        except ProcessLookupError:
            raise KernelError(errno.ESRCH, "target: context %d is gone" % target_id) from None
        except OSError as e:
            raise KernelError(e.errno or errno.EPERM, "target: faytd cannot ring context %d's "
                              "doorbell (%s); the notification waits for its next dispatch point"
                              % (target_id, os.strerror(e.errno or errno.EPERM))) from None

    def release(self, ctx, ring_id):
        """The target gives a ring back: drained after its sender died, or
        found corrupt (its sender, alive, gets EPROTO on its next call)."""
        r = self.rings.get(ring_id)
        if r is None or r.target is not ctx:
            raise KernelError(errno.ENOENT, "ring: %d is no ring into this context" % ring_id)
        if r.sender is None:
            self.corrupt(r)
        elif r.kept or not r.sender.alive:
            self.drop(r, lib.FAYT_RING_SENDER_DEAD)
        else:
            log.warning("context %d dropped ring %d from context %d (corrupt)", ctx.id, r.id,
                        r.sender.id)
            self.drop(r, lib.FAYT_RING_DROPPED)

    def fetch(self, ctx, after, most):
        """The first `most` rings into ctx after id `after`, each with an fd."""
        ctx.notify_armed = True
        self.flush(ctx)
        out = []
        try:
            for r in self.rings_into(ctx, after)[:most]:
                out.append((r, r.open_fd()))
        except BaseException:
            for _, fd in out:
                os.close(fd)
            raise
        return out

    def alloc_stack(self, ctx, tid, size):
        """A notification stack of size bytes: (its record, its handle, an fd)."""
        k = self.k
        p = ctx.page_struct
        rec = next((i for i in range(lib.FAYT_STACKS_MAX)
                    if p.stacks[i].state == lib.FAYT_STACK_UNUSED), None)
        if rec is None:
            raise KernelError(errno.ENOMEM, "this context has %d notification stacks, the most "
                              "it may have" % lib.FAYT_STACKS_MAX)
        held = self.uid_stacks.get(ctx.uid, 0)
        if not ctx.is_core and held >= k.cfg["max_stacks_per_uid"]:
            raise KernelError(errno.ENOMEM, "uid %d holds %d notification stacks, its limit "
                              "(config max_stacks_per_uid)" % (ctx.uid, held))
        if len(ctx.mappings) >= k.cfg["max_mappings_per_context"]:
            raise KernelError(errno.ENOMEM, "this context has %d mappings, the quota"
                              % len(ctx.mappings))
        backing = k.allocate_for(ctx, pages(size) * PAGE)
        handle = ctx.new_handle()
        m = Mapping(handle, lib.FAYT_PORTAL_ANON, backing, None, ctx.pid, tid,
                    lib.FAYT_PROT_READ | lib.FAYT_PROT_WRITE)
        m.charged = backing.length
        k.add_mapping(ctx, m)
        s = p.stacks[rec]
        s.base, s.size, s.handle, s.state = 0, size, handle, lib.FAYT_STACK_FREE
        self.stacks.setdefault(ctx.id, set()).add(handle)
        # nstacks is in the client's page (it may have written anything
        # there): faytd writes its own count, never the word plus one.
        p.notify.nstacks = len(self.stacks[ctx.id])
        self.uid_stacks[ctx.uid] = held + 1
        return rec, handle, backing.open_fd()

    def free_stack(self, ctx, handle):
        p = ctx.page_struct
        rec = next((i for i in range(lib.FAYT_STACKS_MAX)
                    if p.stacks[i].state != lib.FAYT_STACK_UNUSED and p.stacks[i].handle == handle),
                   None)
        m = ctx.mappings.get(handle)
        if rec is None or m is None:
            raise KernelError(errno.EBADF, "handle: %d names no notification stack" % handle)
        if p.stacks[rec].state == lib.FAYT_STACK_IN_USE:
            raise KernelError(errno.EBUSY, "handle: stack %d is in use by a handler" % handle)
        p.stacks[rec].state = lib.FAYT_STACK_UNUSED
        p.stacks[rec].handle = 0
        p.stacks[rec].base = 0
        mine = self.stacks.get(ctx.id, set())
        if handle in mine:
            mine.discard(handle)
            uncount(self.uid_stacks, ctx.uid)
        p.notify.nstacks = len(mine)    # as in alloc_stack: faytd's count
        self.k.unmap(ctx, m)

    def subscribe(self, ctx, event, index, arg):
        """faytd's notices of `event` go to ctx's slot `index`."""
        self.subs.setdefault(ctx.id, {})[event] = (index, arg)
        ctx.fast.flags |= clib.FAYT_FAST_CONN_NOTICES     # its destroys need Python (SP_DESTROYED)
        ctx.notify_armed = True
        self.ring(None, ctx)

    def unsubscribe(self, ctx, event):
        subs = self.subs.setdefault(ctx.id, {})
        subs.pop(event, None)
        if not subs:
            ctx.fast.flags &= ~clib.FAYT_FAST_CONN_NOTICES


def _doorbell_pending(pid):
    """Whether pid's doorbell is sent and not yet taken (its bit in the
    process's shared pending set, /proc/<pid>/status ShdPnd).  faytd rings
    for another uid's senders at most once while one is outstanding: a
    real-time signal queues every instance, so a sender calling NOTIFY_RING
    in a loop would otherwise queue thousands into the target; the one
    pending runs dispatch, which takes every IMMEDIATE entry posted before
    it is delivered."""
    try:
        with open("/proc/%d/status" % pid, "rb") as f:
            for line in f:
                if line.startswith(b"ShdPnd:"):
                    return bool(int(line.split()[1], 16) >> (DOORBELL - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False
