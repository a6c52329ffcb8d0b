"""Dispatch: the target's side of notifications (notification_dispatch,
notification_ret, notification_wait, the doorbell and the handlers).

The facts this relies on, and what follows:
- The doorbell is one real-time signal, SIGRTMIN + 2.  Python runs signal
  handlers only on the main thread, between bytecodes; a C call that sleeps
  (futex, sigtimedwait) returns EINTR so that they run, then it is called
  again.  So:
  * the doorbell's handler runs notification_dispatch() on the main thread;
    a doorbell that comes while a handler runs starts a nested dispatch,
    on another notification stack (nesting is Python's own signal nesting);
  * a target asleep in notification_wait() takes its doorbell with
    sigtimedwait(2) and dispatches at once, without a signal handler;
  * a sender waiting for a return, or for space in a full ring, dispatches
    the notifications that come to it meanwhile, then waits again
    (channel.py).
- Dispatch points: the doorbell (for IMMEDIATE notifications only: faytd's
  doorbells for a new ring or a dead sender only make the runtime fetch
  rings), notification_poll(), notification_wait(),
  a sender's waits, every system call through a Connection (before the
  call; a doorbell that comes during one is dispatched after it, since
  fetching a new ring is itself a call), and the share-point fast path
  (lock, try_lock, read, write, add, `with`: at the entry, before the lock
  is taken; unlock and `with`'s exit: after it is released).  Without
  FAYT_NOTIFY_IMMEDIATE a notification waits for the target's next dispatch
  point (a target asleep in notification_wait() is rung anyway: its wait is
  a dispatch point).
- The share-point calls never go to faytd, so they learn of a post from the
  pending hint (fayt/notification.h): a word per target context that every
  post bumps.  Once this context has a handler (or a subscription) its
  runtime maps the word (FAYT_SYS_NOTIFY_HINT) and registers it with
  _fastpath (hint_register): each share-point call compares it with the last
  value seen (one load) and, changed, calls _hint_hook, which dispatches.
  _fastpath calls it only on the main thread, when no share-point lock is
  recorded in this context page (a handler using that share-point would
  deadlock; another thread's lock only puts the dispatch off) and no
  handler runs (notify.depth 0: a deferred notification never interrupts a
  handler; the running dispatch takes it next).  A process without handlers
  registers nothing: the check is one load of a count that is 0.  The word
  is a hint only: a sender that scribbles on it causes a dispatch that finds
  nothing, or delays one to the next other dispatch point; the rings alone
  say what was posted, so nothing is lost or forged through it.
- notification_dispatch(): for each ring with an entry, take a free
  notification stack (a real region from the stack-alloc system call), write
  the frame (struct fayt_notification_frame) and the payload at its base,
  record the saved state (context page saved[depth]: what was interrupted),
  run the handler, then notification_ret: write the result into the ring
  entry and wake the sender (FAYT_NOTIFY_RETURN), free the stack, restore.
  For speed the entries leave a ring in batches (struct fayt_dispatcher,
  fayt_dispatch_step: one C call ends a handler and starts the next, on the
  same stack when nothing nested; _fastpath calls it without cffi's cost);
  a nested dispatch starts from the same batch, so posting order holds.
  No free stack: the stack-provider action runs (it allocates one with
  notification_stack_alloc()); without one the notification stays in its
  ring until a stack frees (the outer dispatch takes it).  Nothing dropped.
- A handler is called as handler(payload, index, sender): the specification's
  (void *, int, int).  payload is a memoryview of the payload bytes on the
  notification stack (valid only during the call), index the slot, sender
  the sender's context id (0: faytd).  Its return value (an int, None is 0)
  is the result the sender gets; notification_ret(value) returns at once.
  The sender id is faytd's record of who owns the ring (the FETCH reply),
  never the entry's sender word.
  A handler that raises gives a waiting sender HandlerFailed; the target
  logs the traceback (logging, logger "libportal.notify", level ERROR: on
  stderr when the program configured no logging) and keeps running.  A slot with no handler gives a
  waiting sender NotFound; a deferred one is counted (notification_stats).
- Injected faults (docs/testing.md): a plan faytd wrote into the context
  page may arm a kill at a handler's entry (kill-handler) or once N
  handlers ran (kill-after).  dispatch() loads the armed kinds once; only
  when one is armed does it ask libportal/src/inject.c at each handler,
  which counts the event and decides (the rule's after, count and seed).
"""
import atexit
import errno
import os
import signal
import sys
import threading
import logging
import time
import weakref

from . import errors
from ._abi import ffi, lib, HANDLE_REQ, _fastpath, NOTIFY_INSTALL as INSTALL, \
    NOTIFY_SUBSCRIBE as SUBSCRIBE
from .rings import DOORBELL, KERNEL, NO_HANDLER as _NO_HANDLER, Ring, Stack, map_object, \
    wait_ns as _ns, deadline_of as _deadline

log = logging.getLogger("libportal.notify")

DEFAULT_STACKS = 4

_MAIN = threading.main_thread().ident
_KILLS = lib.FAYT_INJECT_HANDLER_KILL | lib.FAYT_INJECT_NOTIFY_KILL
_runtimes = weakref.WeakSet()     # dispatchers whose context handles the doorbell
_installed = False


class HandlerReturn(BaseException):
    """notification_ret(): leaves the handler (not an Exception: a handler's
    `except Exception` must not catch it)."""

    def __init__(self, value):
        self.value = value


class Dispatcher:
    """The receiving side of one context (one Connection): the rings into
    it, its handlers and notification stacks, and the dispatch that runs
    them.  notification.Runtime adds the sending side."""

    def __init__(self, conn):
        self.conn = conn
        self.page = ffi.cast("struct fayt_context_page *", conn.context_page)
        self.handlers = {}          # index -> callable
        self.rings_in = {}          # ring id -> Ring (we are the target)
        self.stacks = {}            # record -> Stack
        self.generation = None      # rings_generation last fetched
        self.pending = False        # a dispatch was put off (a call was in progress)
        self.in_provider = False
        self.running = 0            # handlers running (taken: depth is set a little later)
        self.busy = False           # fetching rings: no dispatch point inside
        self._ring_table = None
        self._gone = []
        self._disp = ffi.new("struct fayt_dispatcher *")
        self._disp.page = self.page
        self._disp.batch = lib.FAYT_DISPATCH_BATCH
        self._daddr = int(ffi.cast("uintptr_t", self._disp))
        self._gen_ptr = ffi.cast("uint32_t *", ffi.addressof(self.page.notify, "rings_generation"))
        self._inject_kinds = ffi.cast("uint32_t *", ffi.addressof(self.page.inject, "kinds"))
        self._pid = os.getpid()
        self.hint = 0               # this context's pending-hint word, once mapped
        self._fetched = 0           # the highest ring id fetched (ids only grow)
        self.unhandled = 0          # notifications that named a slot with no handler
        self.dropped = 0            # rings given back because their sender corrupted them
        self._warned = set()        # slots already reported as unhandled on stderr
        self._doorbell_warned = False   # a doorbell failure was reported on stderr
        self._ready_r = self._ready_w = None    # the readiness pipe (fileno()), once made
        self._wakeup_set = False    # signal.set_wakeup_fd is this runtime's pipe

    # -- arming: the doorbell's handler -----------------------------------------
    def arm(self):
        """Handle the doorbell in this process (main thread only), before any
        sender may ring it."""
        global _installed
        if not _installed:
            if threading.current_thread() is not threading.main_thread():
                raise errors.error(errno.EINVAL, "notifications: the first handler must be "
                                   "installed from the main thread (Python runs signal "
                                   "handlers there)")
            signal.signal(DOORBELL, _on_doorbell)
            atexit.register(_quiet_doorbell)
            _installed = True
        _runtimes.add(self)

    def arm_hint(self):
        """Make the share-point calls dispatch points for this context: map
        its pending-hint word and register it with _fastpath."""
        if self.hint:
            return
        body, fds = self.conn.call(lib.FAYT_SYS_NOTIFY_HINT)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise errors.error(errno.EPROTO, "notify_hint: faytd sent no hint object")
        addr = map_object(fds[0], lib.FAYT_HINT_BYTES)
        try:
            _fastpath.hint_register(addr, self.conn.context_page, self._hint_hook)
        except BaseException:
            lib.fayt_unmap(addr, lib.FAYT_HINT_BYTES)
            raise
        self.hint = addr

    def doorbell_failed(self, e):
        """The doorbell's handler could not serve this context (e: what
        fetching or dispatching raised).  Not raised there (see _on_doorbell):
        said once on stderr; the next dispatch point tries again."""
        self.pending = True
        if not self._doorbell_warned:
            self._doorbell_warned = True
            sys.stderr.write("notifications: the doorbell could not be served (%s: %s); "
                             "the next libportal call reports it\n" % (type(e).__name__, e))

    def _hint_hook(self):
        """_fastpath's dispatch point (main thread, no share-point lock held by
        it, no handler running).  False: cannot dispatch now, look again."""
        if self.running or self.in_provider or self.busy or self.conn.closed:
            return False
        self.dispatch()
        return True

    # -- receiving rings ---------------------------------------------------------
    def fetch(self):
        """Map the rings faytd made into this context; drop the ones it reclaimed."""
        self.arm()
        self.busy = True
        try:
            gen = self.page.notify.rings_generation
            while True:
                rings = Ring.fetch(self.conn, self._fetched)
                for r in rings:
                    self._fetched = max(self._fetched, r.id)
                    if r.id in self.rings_in:   # never map a ring twice: its tail is ours
                        r.close()
                        continue
                    r.header.armed = 1
                    self.rings_in[r.id] = r
                if not rings:
                    break
            live = {self.page.rings[i].ring_id for i in range(lib.FAYT_RINGS_MAX)}
            for r in self.rings_in.values():
                # Gone: faytd reclaimed it, or its sender died with entries
                # posted (faytd keeps it for us to drain and give back).  A
                # live sender that writes SENDER_DEAD only loses its ring.
                if not r.gone and (r.id not in live or
                                   r.header.state == lib.FAYT_RING_SENDER_DEAD):
                    r.gone = True
                    self._gone.append(r)
            self.generation = gen
            self._ring_table = None
            self._table()       # now: the dispatcher must never see a stale table
        finally:
            self.busy = False
        if self._ready_r is not None:
            self._rearm()       # the new rings ring the doorbell too

    # -- dispatch ----------------------------------------------------------------
    def dispatch(self, doorbell=False):
        """notification_dispatch: run every notification waiting in a ring.
        Returns how many handlers ran.  From the doorbell, only if an
        IMMEDIATE one waits (new rings are fetched first): a deferred
        notification never interrupts plain code or a handler (the next
        dispatch point, or the dispatch that runs the handler, takes it).
        The C step (fayt_dispatch_step) ends one handler and starts the next
        from a batch it took out of the rings in one go; this loop only
        decodes the frame and calls the handler."""
        if self.busy or os.getpid() != self._pid:
            return 0
        if threading.get_ident() != _MAIN:
            return 0
        if self.conn._main_calls:
            self.pending = True     # inside a call: the call dispatches when done
            return 0
        d = self._disp
        if doorbell:
            # The doorbell is for IMMEDIATE notifications only: a deferred
            # one waits for a dispatch point, even if the doorbell came
            # because a ring was made or its sender died.
            if self.generation is None or \
                    self.page.notify.rings_generation != self.generation:
                self.fetch()
            elif self._ring_table is None:
                self._table()
            if not lib.fayt_dispatch_immediate_ready(d):
                return 0
        self.pending = False
        if self._ring_table is None:
            self._table()
        kills = self._inject_kinds[0] & _KILLS      # injected faults (docs/testing.md)
        ran = 0
        step, daddr, handlers = _fastpath.dispatch_step, self._daddr, self.handlers
        rec, result, status, active = -1, 0, 0, False
        try:
            while True:
                # notification_ret of the last one, then the next: its stack
                # record, its payload on that stack, its index and sender.
                rec, view, index, sender = step(daddr, rec, result, status)
                if rec < 0:
                    if active:
                        active = False
                        self.running -= 1
                    code, rec = rec, -1
                    if code == -3:                      # a ring was added or reclaimed
                        self.fetch()
                        continue
                    if code == -4:                      # a sender corrupted its ring
                        self._drop_corrupt()
                        continue
                    if code == -2 and self._provide():
                        continue
                    if self._gone and not self.running:
                        self._reap()
                    return ran
                if not active:
                    active = True
                    self.running += 1
                ran += 1
                result, status = 0, errno.ECANCELED
                if kills:
                    self._inject_kill(kills, index)
                try:
                    fn = handlers.get(index)
                    if fn is None:
                        status = _NO_HANDLER
                        self._unhandled(index, sender)
                    else:
                        r = fn(view, index, sender)
                        result, status = (int(r) if r else 0), 0
                except HandlerReturn as e:
                    result, status = int(e.value or 0), 0
                except Exception as e:
                    status = e.errno if isinstance(e, OSError) and e.errno else errno.EREMOTEIO
                    log.error("notification handler for index %d (from context %d) raised",
                              index, sender, exc_info=True)
                finally:
                    view.release()
        finally:
            if rec >= 0:     # left by an exception: notification_ret, then restore
                lib.fayt_dispatch_end(d, rec, result, status)
            if active:
                self.running -= 1

    def _inject_kill(self, kills, index):
        """A fault plan faytd wrote into the context page arms a kill here
        (fayt/context.h; libportal/src/inject.c counts and decides): die of
        SIGKILL at the entry of the handler of slot `index`, or once the
        handlers the rule lets pass have run."""
        page = self.conn.context_page
        if (kills & lib.FAYT_INJECT_HANDLER_KILL and
                _fastpath.inject_fires(page, lib.FAYT_INJECT_HANDLER_KILL, index, True)) or \
                (kills & lib.FAYT_INJECT_NOTIFY_KILL and
                 _fastpath.inject_fires(page, lib.FAYT_INJECT_NOTIFY_KILL, 0, False)):
            _fastpath.inject_die()

    def _table(self):
        t = self._ring_table
        if t is None:
            rings = [r for r in self.rings_in.values() if r.addr]
            t = self._ring_table = (ffi.new("void *[]", [r.ptr for r in rings] or [ffi.NULL]),
                                    ffi.new("uint32_t[]", [r.id for r in rings] or [0]),
                                    len(rings), rings,
                                    ffi.new("uint32_t[]", [r.sender for r in rings] or [0]),
                                    ffi.new("uint32_t *[]", [r.tail for r in rings] or [ffi.NULL]))
            d = self._disp
            d.rings, d.ring_ids, d.n = t[0], t[1], t[2]
            d.senders, d.tails = t[4], t[5]
            if d.cursor >= t[2]:
                d.cursor = 0
            gen = self.generation
            d.generation = (self.page.notify.rings_generation + 1 if gen is None
                            else gen) & 0xffffffff
        return t

    def _reap(self):
        """Unmap the rings whose sender died (faytd reclaimed them, or kept
        them for us) once drained; give the kept ones back to faytd."""
        drained = [r for r in self._gone if not r.addr or not lib.fayt_ring_ready(r.ptr, r.tail[0])]
        if not drained:
            return
        for r in drained:
            self.rings_in.pop(r.id, None)
        self._gone = [r for r in self._gone if r not in drained]
        self._ring_table = None
        self._table()           # before unmapping: the dispatcher never names a gone ring
        live = {self.page.rings[i].ring_id for i in range(lib.FAYT_RINGS_MAX)}
        for r in drained:
            r.close()
            if r.id in live:
                self._release(r.id)

    def _release(self, ring_id):
        """Give ring_id back to faytd (a system call from inside dispatch:
        no dispatch point in it)."""
        busy, self.busy = self.busy, True
        try:
            self.conn.call(lib.FAYT_SYS_NOTIFY_RELEASE, HANDLE_REQ.pack(ring_id))
        except errors.PortalError:
            pass                # already reclaimed, or the connection is closing
        finally:
            self.busy = busy

    def _drop_corrupt(self):
        """The dispatcher found an entry out of range in a ring (its sender
        wrote it): stop reading that ring and give it back; faytd marks it
        DROPPED and its sender gets EPROTO on its next call.  Nothing else
        is affected."""
        d = self._disp
        rid, d.dropped = d.dropped, 0
        r = self.rings_in.pop(rid, None)
        self.dropped += 1
        log.warning("ring %d (from context %s) holds an entry out of range; dropped",
                    rid, r.sender if r else "?")
        self._ring_table = None
        self._table()
        if r is not None:
            if r in self._gone:
                self._gone.remove(r)
            r.close()
        self._release(rid)

    def _unhandled(self, index, sender):
        """A notification named a slot with no handler: counted
        (notification_stats()['unhandled']), reported once per slot; a
        sender waiting for the return gets ENOENT."""
        self.unhandled += 1
        if index not in self._warned:
            self._warned.add(index)
            log.warning("no handler for index %d (from context %d): dropped, counted in "
                        "notification_stats()", index, sender)

    def _provide(self):
        """No free stack: run the stack-provider action once; whether it made one."""
        prov = self.page.notify.provider
        if prov == lib.FAYT_NO_PROVIDER or self.in_provider or prov not in self.handlers:
            return False
        before = len(self.stacks)
        self.in_provider = True
        try:
            self.handlers[prov](None, prov, KERNEL)
        except HandlerReturn:
            pass
        except Exception:
            log.error("the stack provider (index %d) raised", prov, exc_info=True)
        finally:
            self.in_provider = False
        return len(self.stacks) > before

    def wait(self, timeout=None):
        """Sleep until a notification comes (or timeout seconds), dispatch it.
        Returns how many handlers ran (0: timed out), counting those the
        doorbell's handler ran meanwhile (it may empty the rings while the
        C wait returns EINTR: then there is nothing left to wait for)."""
        try:
            return self._wait(timeout)
        finally:
            if self._ready_r is not None:
                self._rearm()   # the C wait cleared target_waiting

    def _wait(self, timeout):
        deadline = None if timeout is None else _deadline(timeout)
        notify = self.page.notify
        start = notify.delivered
        if self.pending:
            self.dispatch()
        while True:     # fayt_notify_wait returns at once if an entry waits
            ran = notify.delivered - start
            if ran:
                return ran
            if self.generation is None:
                self.fetch()
            self._table()
            r = lib.fayt_notify_wait(self._disp, self._gen_ptr, self.generation, DOORBELL,
                                     _ns(deadline))
            self.dispatch()
            if notify.delivered != start:
                continue
            if r == errno.ETIMEDOUT or (deadline is not None and time.monotonic() >= deadline):
                return 0

    # -- readiness: a descriptor for selectors and event loops ---------------------
    def fileno(self):
        """A descriptor that is readable when a notification (or a new ring)
        may wait for this context: for selectors and event loops.  When it
        is readable, call ready().  Made once, from the main thread.

        It is the read end of a pipe.  While it is in use every post into
        this context's rings rings the doorbell (target_waiting 2: see
        fayt/notification.h), not only IMMEDIATE ones, and the doorbell's
        handler writes a byte into the pipe; ready() runs what waits and
        arms the rings again.  The pipe is also signal.set_wakeup_fd's
        unless the program set one already, so that a doorbell that lands
        on another thread still wakes a main thread asleep in its event
        loop (with the program's own wakeup descriptor, that one does)."""
        if self._ready_r is None:
            if threading.get_ident() != _MAIN:
                raise errors.error(errno.EINVAL, "notification_fd: from the main thread only "
                                   "(Python runs signal handlers there)")
            self.arm()
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            if old != -1:
                signal.set_wakeup_fd(old)   # the program's: it wakes the main thread already
            self._wakeup_set = old == -1
            self._ready_r, self._ready_w = r, w
            if self.generation is None:
                self.fetch()                # arms the rings (fetch ends with _rearm)
            else:
                self._rearm()
        return self._ready_r

    def _arm(self):
        """Every post rings the doorbell again; whether something already
        waits (then no wake-up will come for it)."""
        self._table()
        return lib.fayt_notify_arm_doorbell(self._disp, self._gen_ptr, self.generation)

    def _rearm(self):
        """_arm, and if something already waits the descriptor is made
        readable now (no wake-up is lost between the last dispatch and the
        arming)."""
        if self._arm():
            self._signal_ready()

    def _signal_ready(self):
        try:
            os.write(self._ready_w, b"\0")
        except BlockingIOError:
            pass                            # full: it is readable anyway

    def ready(self):
        """The descriptor was readable: empty it, run every notification
        that waits (fetching new rings first), and arm the rings again.
        Returns how many handlers ran (0: a spurious wake-up)."""
        if self._ready_r is None:
            return self.dispatch()
        try:
            while os.read(self._ready_r, 4096):
                pass
        except BlockingIOError:
            pass
        ran = 0
        while True:
            if self.generation is None or \
                    self.page.notify.rings_generation != self.generation:
                self.fetch()
            n = self.dispatch()
            ran += n
            if not self._arm():
                return ran
            if not n:
                # Something waits that this dispatch could not run (no free
                # stack, a call in progress): its own dispatch point takes it.
                return ran

    # -- stacks ------------------------------------------------------------------
    def stack_alloc(self, size=0):
        stack = Stack.alloc(self.conn, size)
        self.page.stacks[stack.record].base = stack.addr
        self.stacks[stack.record] = stack
        return stack.handle

    def stack_free(self, handle):
        s = next((s for s in self.stacks.values() if s.handle == handle), None)
        if s is None:
            raise errors.error(errno.EBADF, "handle: %d names no notification stack" % handle)
        s.free(self.conn)
        del self.stacks[s.record]

    # -- handlers ----------------------------------------------------------------
    def install(self, index, fn, stacks=DEFAULT_STACKS):
        if not callable(fn):
            raise errors.error(errno.EINVAL, "handler: %r is not callable" % (fn,))
        self.arm()
        if not self.stacks:
            for _ in range(stacks):
                self.stack_alloc()
        self.handlers[index] = fn
        try:
            self.conn.call(lib.FAYT_SYS_NOTIFY_INSTALL, INSTALL.pack(index, 0, id(fn) | 1))
        except BaseException:
            self.handlers.pop(index, None)
            raise
        if self.generation is None:
            self.fetch()
        self.arm_hint()

    def remove(self, index):
        self.conn.call(lib.FAYT_SYS_NOTIFY_REMOVE, INSTALL.pack(index, 0, 0))
        self.handlers.pop(index, None)

    def set_provider(self, index):
        self.conn.call(lib.FAYT_SYS_NOTIFY_PROVIDER,
                       INSTALL.pack(lib.FAYT_NO_PROVIDER if index is None else index, 0, 0))

    def subscribe(self, event, index, arg=0):
        self.arm()
        self.conn.call(lib.FAYT_SYS_NOTIFY_SUBSCRIBE, SUBSCRIBE.pack(event, index, arg, 0))
        self.fetch()
        self.arm_hint()

    def close(self):
        _runtimes.discard(self)
        if self._ready_r is not None:
            keep = False
            if self._wakeup_set:
                if threading.get_ident() == _MAIN:
                    cur = signal.set_wakeup_fd(-1)
                    if cur not in (-1, self._ready_w):
                        signal.set_wakeup_fd(cur)   # another's since: left as it is
                else:
                    # Only the main thread may reset the wakeup descriptor:
                    # the pipe stays open (a closed one's number could be
                    # another file's by the next signal).
                    keep = True
            if not keep:
                os.close(self._ready_r)
                os.close(self._ready_w)
            self._ready_r = self._ready_w = None
        if self.hint:
            _fastpath.hint_unregister(self.hint)
            lib.fayt_unmap(self.hint, lib.FAYT_HINT_BYTES)
            self.hint = 0
        self._disp.n = 0
        for r in self.rings_in.values():
            r.close()
        self.rings_in.clear()
        for s in self.stacks.values():
            s.close()
        self.stacks.clear()


def _on_doorbell(signum, frame):
    """The doorbell's signal handler: it runs between any two bytecodes of
    the main thread (inside subprocess.wait(), time.sleep(), anything), so
    an error of the runtime's own (fetching rings on a connection faytd
    closed: DaemonUnavailable) is not raised into that code: it is reported
    once on stderr, and the next libportal call meets it (the lost
    connection, or the fetch again at the next dispatch point).  What a
    handler raises is dealt with inside dispatch(); a BaseException it lets
    through (KeyboardInterrupt...) is the program's and propagates."""
    for rt in list(_runtimes):
        if rt.conn.closed:
            continue
        try:
            rt.dispatch(doorbell=True)
        except OSError as e:
            rt.doorbell_failed(e)
        if rt._ready_w is not None:
            rt._signal_ready()      # the event loop's descriptor: ready() takes the rest


def _quiet_doorbell():
    """At exit: a doorbell must not kill us (Python resets its handlers to
    SIG_DFL when it finalizes, and a sender may ring at any moment); the
    share-point calls stop dispatching (connections are closed after this)."""
    _fastpath.hint_reset()
    try:
        signal.signal(DOORBELL, signal.SIG_IGN)
    except (ValueError, OSError):
        pass


def _after_fork_child():
    global _installed
    _fastpath.hint_reset()      # the parent's runtimes; this thread is the child's main
    _runtimes.clear()
    if _installed:
        signal.signal(DOORBELL, signal.SIG_IGN)
        _installed = False


os.register_at_fork(after_in_child=_after_fork_child)


