"""Notifications: the runtime that sends, dispatches and returns them.

The facts this relies on, and what follows:
- A ring (fayt/notification.h) is shared memory between one sender and one
  target, made by faytd once per pair (notify_open / FETCH).  Posting,
  waiting for a return and returning are C calls on it (src/ring.c): faytd
  is not involved once the ring exists.
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
    the notifications that come to it meanwhile, then waits again.
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
  prints the traceback and keeps running.  A slot with no handler gives a
  waiting sender NotFound; a deferred one is counted (notification_stats).
- Trust: a ring is written by both sides.  The sender's C checks every word
  it reads against the protocol (EPROTO: ProtocolError, the ring is
  forgotten) and bounds its waits by the deadline; the target keeps its
  read position here, checks each entry, and gives a ring with an entry
  out of range back to faytd (RELEASE: its sender gets EPROTO).
"""
import atexit
import errno
import os
import signal
import sys
import threading
import time
import traceback
import weakref

from . import errors
from ._abi import (ffi, lib, HANDLE_REQ, LIST_REQ, _fastpath, NOTIFY_INSTALL as INSTALL,
                   NOTIFY_OPEN as OPEN, RING_REPLY, STACK_REQ, STACK_REPLY,
                   NOTIFY_SUBSCRIBE as SUBSCRIBE)
from .syscall import connection as _default_connection

IMMEDIATE = lib.FAYT_NOTIFY_IMMEDIATE
RETURN = lib.FAYT_NOTIFY_RETURN
NOWAIT = lib.FAYT_NOTIFY_NOWAIT
SLOTS = lib.FAYT_NOTIFICATION_SLOTS
PAYLOAD_MAX = lib.FAYT_NOTIFY_PAYLOAD_MAX
KERNEL = lib.FAYT_SENDER_KERNEL
PEER_DIED = lib.FAYT_EVENT_PEER_DIED
SP_DESTROYED = lib.FAYT_EVENT_SP_DESTROYED
OVERFLOW = lib.FAYT_EVENT_OVERFLOW
DOORBELL = signal.SIGRTMIN + lib.FAYT_DOORBELL_SIGRTMIN_OFFSET
DEFAULT_STACKS = 4

_RW = lib.FAYT_PROT_READ | lib.FAYT_PROT_WRITE
_MAIN = threading.main_thread().ident
_NOT_RUNNING = lib.FAYT_NOTIFICATION_SLOTS   # saved.interrupted_index: no handler was

_post = _fastpath.notify_post
_POSTED_RING = lib.FAYT_RING_POSTED_RING
_NO_HANDLER = lib.FAYT_STATUS_NO_HANDLER
_runtimes = weakref.WeakSet()     # runtimes whose context handles the doorbell
_installed = False


class _Return(BaseException):
    """notification_ret(): leaves the handler (not an Exception: a handler's
    `except Exception` must not catch it)."""

    def __init__(self, value):
        self.value = value


def _map(fd, length):
    err = ffi.new("int *")
    try:
        addr = lib.fayt_map(fd, length, 0, _RW, err)
    finally:
        os.close(fd)
    if not addr:
        raise errors.error(err[0], "cannot map a notification object")
    return addr


def _ns(deadline):
    if deadline is None:
        return -1
    return max(0, int((deadline - time.monotonic()) * 1e9))


def _deadline(timeout):
    """The monotonic deadline of `timeout` (errors.check_timeout's rule), or
    None: wait for ever."""
    t = errors.check_timeout(timeout)
    return None if t is None else time.monotonic() + t


class _Ring:
    __slots__ = ("id", "sender", "target", "target_pid", "addr", "length", "ptr", "pidfd",
                 "gone", "hint", "hint_ptr", "tail")

    def __init__(self, reply, fd, hint_fd=-1):
        # faytd's reply: the ids here are its record, not the ring's words.
        self.id, self.sender, self.target, self.target_pid, self.length = reply
        self.hint, self.hint_ptr = 0, ffi.NULL
        self.tail = None        # a target's: its consumer position (never the header's)
        try:
            self.addr = _map(fd, self.length)
        except BaseException:
            if hint_fd >= 0:
                os.close(hint_fd)
            raise
        self.ptr = ffi.cast("void *", self.addr)
        self.pidfd = -1
        self.gone = False
        if hint_fd >= 0:        # a sender's: the target's pending hint
            try:
                self.hint = _map(hint_fd, lib.FAYT_HINT_BYTES)
            except BaseException:
                self.close()
                raise
            self.hint_ptr = ffi.cast("uint32_t *", self.hint)

    @property
    def header(self):
        return ffi.cast("struct fayt_ring_header *", self.addr)

    def close(self):
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self.addr:
            lib.fayt_unmap(self.addr, self.length)
            self.addr, self.ptr = 0, ffi.NULL
        if self.hint:
            lib.fayt_unmap(self.hint, lib.FAYT_HINT_BYTES)
            self.hint, self.hint_ptr = 0, ffi.NULL


class _Stack:
    __slots__ = ("record", "handle", "size", "addr", "frame", "view")

    def __init__(self, record, handle, size, addr):
        self.record, self.handle, self.size, self.addr = record, handle, size, addr
        self.frame = ffi.cast("struct fayt_notification_frame *", addr)
        self.view = memoryview(ffi.buffer(ffi.cast("char *", addr), size))


class Runtime:
    """The notification state of one context (one Connection)."""

    def __init__(self, conn):
        self.conn = conn
        self.page = ffi.cast("struct fayt_context_page *", conn.context_page)
        self.handlers = {}          # index -> callable
        self.rings_in = {}          # ring id -> _Ring (we are the target)
        self.rings_out = {}         # target context id -> _Ring (we are the sender)
        self.stacks = {}            # record -> _Stack
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
        self._pid = os.getpid()
        self.hint = 0               # this context's pending-hint word, once mapped
        self._fetched = 0           # the highest ring id fetched (ids only grow)
        self.unhandled = 0          # notifications that named a slot with no handler
        self.dropped = 0            # rings given back because their sender corrupted them
        self._warned = set()        # slots already reported as unhandled on stderr
        self._doorbell_warned = False   # a doorbell failure was reported on stderr

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
        addr = _map(fds[0], lib.FAYT_HINT_BYTES)
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
                body, fds = self.conn.call(lib.FAYT_SYS_NOTIFY_FETCH, LIST_REQ.pack(self._fetched))
                n = len(body) // RING_REPLY.size
                for i in range(n):
                    r = _Ring(RING_REPLY.unpack_from(body, i * RING_REPLY.size), fds[i])
                    self._fetched = max(self._fetched, r.id)
                    if r.id in self.rings_in:   # never map a ring twice: its tail is ours
                        r.close()
                        continue
                    r.tail = ffi.new("uint32_t *")     # a fresh ring starts at 0
                    r.header.armed = 1
                    self.rings_in[r.id] = r
                for fd in fds[n:]:
                    os.close(fd)
                if n == 0:
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
        if self.conn._caller == _MAIN:
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
                try:
                    fn = handlers.get(index)
                    if fn is None:
                        status = _NO_HANDLER
                        self._unhandled(index, sender)
                    else:
                        r = fn(view, index, sender)
                        result, status = (int(r) if r else 0), 0
                except _Return as e:
                    result, status = int(e.value or 0), 0
                except Exception as e:
                    status = e.errno if isinstance(e, OSError) and e.errno else errno.EREMOTEIO
                    sys.stderr.write("notification handler for index %d (from context %d) "
                                     "raised:\n" % (index, sender))
                    traceback.print_exc()
                finally:
                    view.release()
        finally:
            if rec >= 0:     # left by an exception: notification_ret, then restore
                lib.fayt_dispatch_end(d, rec, result, status)
            if active:
                self.running -= 1

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
        sys.stderr.write("notifications: ring %d (from context %s) holds an entry out of "
                         "range; dropped\n" % (rid, r.sender if r else "?"))
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
            sys.stderr.write("notifications: no handler for index %d (from context %d): "
                             "dropped, counted in notification_stats()\n" % (index, sender))

    def _provide(self):
        """No free stack: run the stack-provider action once; whether it made one."""
        prov = self.page.notify.provider
        if prov == lib.FAYT_NO_PROVIDER or self.in_provider or prov not in self.handlers:
            return False
        before = len(self.stacks)
        self.in_provider = True
        try:
            self.handlers[prov](None, prov, KERNEL)
        except _Return:
            pass
        except Exception:
            traceback.print_exc()
        finally:
            self.in_provider = False
        return len(self.stacks) > before

    def wait(self, timeout=None):
        """Sleep until a notification comes (or timeout seconds), dispatch it.
        Returns how many handlers ran (0: timed out), counting those the
        doorbell's handler ran meanwhile (it may empty the rings while the
        C wait returns EINTR: then there is nothing left to wait for)."""
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

    # -- stacks ------------------------------------------------------------------
    def stack_alloc(self, size=0):
        if not isinstance(size, int):
            raise TypeError("size: must be an int (bytes), not %s" % type(size).__name__)
        if not 0 <= size <= 0xffffffff:
            raise errors.error(errno.EINVAL, "size: %d; a notification stack is a multiple of "
                               "%d bytes up to %d" % (size, lib.FAYT_PAGE_SIZE, 1 << 20))
        body, fds = self.conn.call(lib.FAYT_SYS_NOTIFY_STACK_ALLOC, STACK_REQ.pack(size, 0))
        handle, size, rec = STACK_REPLY.unpack(body)
        try:
            addr = _map(fds[0], size)
        except BaseException:
            self.conn.call(lib.FAYT_SYS_NOTIFY_STACK_FREE, HANDLE_REQ.pack(handle))
            raise
        self.page.stacks[rec].base = addr
        self.stacks[rec] = _Stack(rec, handle, size, addr)
        return handle

    def stack_free(self, handle):
        s = next((s for s in self.stacks.values() if s.handle == handle), None)
        if s is None:
            raise errors.error(errno.EBADF, "handle: %d names no notification stack" % handle)
        self.conn.call(lib.FAYT_SYS_NOTIFY_STACK_FREE, HANDLE_REQ.pack(handle))
        del self.stacks[s.record]
        s.view.release()
        lib.fayt_unmap(s.addr, s.size)

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

    # -- sending -----------------------------------------------------------------
    def channel(self, target):
        r = self.rings_out.get(target)
        if r is None or not r.addr:
            _check_target(target)
            body, fds = self.conn.call(lib.FAYT_SYS_NOTIFY_OPEN, OPEN.pack(target, 0))
            for fd in fds[2:]:
                os.close(fd)
            r = _Ring(RING_REPLY.unpack(body), fds[0], fds[1] if len(fds) > 1 else -1)
            # The doorbell goes through a pidfd of the pid faytd named (never
            # the ring's target_pid, which the target can write), and only if
            # the kernel lets us signal it (signal 0 asks): else, another
            # uid, faytd rings it for us (FAYT_SYS_NOTIFY_RING).
            try:
                r.pidfd = os.pidfd_open(r.target_pid)
                signal.pidfd_send_signal(r.pidfd, 0)
            except OSError:
                if r.pidfd >= 0:
                    os.close(r.pidfd)
                r.pidfd = -1
            self.rings_out[target] = r
        return r

    def notify(self, target, index, payload, flags, timeout):
        _check_args(index, payload)
        deadline = None if timeout is None else _deadline(timeout)
        r = self.rings_out.get(target)
        if r is None or not r.addr:
            r = self.channel(target)
        pos = ffi.new("uint32_t *")
        me = self.conn.context_id
        while True:
            try:
                e = lib.fayt_ring_post(r.ptr, index, flags | (NOWAIT if target == me else 0),
                                       me, payload, len(payload), _ns(deadline), r.pidfd,
                                       DOORBELL, pos, r.hint_ptr)
            except TypeError:
                raise _payload_type(payload) from None
            if e == 0:
                break
            if e == lib.FAYT_RING_POSTED_RING:
                self.ring_via_faytd(target, r, pos[0], flags)
                break
            if e == errno.EINTR:
                self._interrupted()
                continue
            if e == errno.EAGAIN and target == me and not flags & NOWAIT:
                # To ourselves: waiting for space would wait for ever; make it.
                if self.dispatch():
                    continue
                e = errno.EDEADLK
            self._fail(r, target, index, e)
        if not flags & RETURN:
            return None
        if target == me:
            self.dispatch()     # the handler runs here, now
        return self.wait_return(r, target, index, pos[0], deadline)

    def ring_via_faytd(self, target, r=None, pos=0, flags=0):
        """The entry is posted; this process may not signal the target
        (another uid): faytd rings its doorbell, by its own record of
        whether the target handles it.  Its refusal is raised: never a
        success that does not ring (a return-flag entry is abandoned: the
        target frees it)."""
        try:
            self.conn.call(lib.FAYT_SYS_NOTIFY_RING, HANDLE_REQ.pack(target))
        except errors.PortalError as e:
            if r is not None and r.addr:
                r.header.rung = 0       # not outstanding: the next post tries again
            if flags & RETURN and r is not None and r.addr:
                lib.fayt_ring_wait_return(r.ptr, pos, 0, ffi.new("int64_t *"),
                                          ffi.new("int32_t *"))
            raise errors.error(e.errno, "notify: the notification to context %d is posted "
                               "but its doorbell was not rung: %s" % (target, e.strerror)) \
                from None

    def wait_return(self, r, target, index, pos, deadline):
        res, st = ffi.new("int64_t *"), ffi.new("int32_t *")
        while True:
            e = lib.fayt_ring_wait_return(r.ptr, pos, _ns(deadline), res, st)
            if e == 0:
                if st[0]:
                    raise _handler_failed(index, target, st[0])
                return res[0]
            if e == errno.EINTR:
                self._interrupted()
                continue
            self._fail(r, target, index, e)

    def _interrupted(self):
        """A signal broke a wait: Python ran its handlers when the C call
        returned (the doorbell's runs IMMEDIATE notifications only); a
        sender's wait is a dispatch point: run what waits."""
        if self.pending or self.rings_in:
            self.dispatch()

    def _fail(self, r, target, index, e):
        if e == errno.ESRCH:
            self.rings_out.pop(target, None)
            r.close()
            raise errors.error(errno.ESRCH, "notify: target context %d is gone (died or "
                                            "closed)" % target)
        if e == errno.EPROTO:
            # The target wrote what the protocol never does, or dropped the
            # ring: forget it; the next notify() asks faytd for a fresh one.
            self.rings_out.pop(target, None)
            r.close()
            raise errors.error(errno.EPROTO, "notify: the ring into context %d is corrupt or "
                               "was dropped by the target; index %d not delivered"
                               % (target, index))
        if e == errno.EAGAIN:
            raise errors.error(errno.EAGAIN, "notify: the ring into context %d is full "
                                             "(FAYT_NOTIFY_NOWAIT)" % target)
        if e == errno.ETIMEDOUT:
            raise errors.error(errno.ETIMEDOUT, "notify: index %d of context %d: timed out"
                               % (index, target))
        if e == errno.EDEADLK:
            raise errors.error(errno.EDEADLK, "notify: the ring into this context itself is "
                               "full and no handler can run now to empty it")
        if e == errno.EINVAL:
            _check_args(index, b"")
            raise errors.error(errno.EINVAL, "notify: flags: only FAYT_NOTIFY_* bits")
        raise errors.error(e, "notify: %s" % os.strerror(e))

    def close(self):
        _runtimes.discard(self)
        if self.hint:
            _fastpath.hint_unregister(self.hint)
            lib.fayt_unmap(self.hint, lib.FAYT_HINT_BYTES)
            self.hint = 0
        self._disp.n = 0
        for r in list(self.rings_in.values()) + list(self.rings_out.values()):
            r.close()
        self.rings_in.clear()
        self.rings_out.clear()
        for s in self.stacks.values():
            s.view.release()
            lib.fayt_unmap(s.addr, s.size)
        self.stacks.clear()


def _check_args(index, payload):
    """notify()'s arguments, each refused with its own message (EINVAL)."""
    if not isinstance(index, int) or not 0 <= index < SLOTS:
        raise errors.error(errno.EINVAL, "notify: index: %r is not a notification slot "
                           "(0..%d)" % (index, SLOTS - 1))
    try:
        n = len(payload)
    except TypeError:
        raise _payload_type(payload) from None
    if n > PAYLOAD_MAX:
        raise errors.error(errno.EINVAL, "notify: payload: %d bytes, more than "
                           "FAYT_NOTIFY_PAYLOAD_MAX (%d)" % (n, PAYLOAD_MAX))


def _payload_type(payload):
    return TypeError("notify: payload: a bytes-like object is required, not %s"
                     % type(payload).__name__)


def _check_target(target):
    """A context id is a uint32 (0 is faytd): EINVAL naming `target`."""
    if not isinstance(target, int):
        raise TypeError("target: must be a context id (an int), not %s" % type(target).__name__)
    if not 0 <= target <= 0xffffffff:
        raise errors.error(errno.EINVAL, "target: %d is not a context id" % target)


def _handler_failed(index, target, status):
    if status == _NO_HANDLER:
        e = errors.error(errno.ENOENT, "notify: context %d has no handler for index %d"
                         % (target, index))
        e.status = status
        return e
    e = errors.error(errno.EREMOTEIO, "notify: the handler for index %d of context %d "
                     "failed (%s)" % (index, target, errno.errorcode.get(status, status)))
    e.status = status
    return e


class Channel:
    """A sender's ring into one target context.  send() and call() are the
    fast path of notify() (one C call to post, one to wait for the return);
    anything unusual (a full ring, a signal, a dead target) takes notify()'s
    path, which waits, dispatches and raises as notify() does."""

    def __init__(self, rt, target):
        self.rt, self.target = rt, target
        self.ring = rt.channel(target)
        self._me = rt.conn.context_id
        self._pos = ffi.new("uint32_t *")
        self._res = ffi.new("int64_t *")
        self._st = ffi.new("int32_t *")

    def send(self, index, payload=b"", immediate=False, timeout=None):
        """A notification without the return flag (deferred unless immediate)."""
        r, flags = self.ring, IMMEDIATE if immediate else 0
        if timeout is not None:
            errors.check_timeout(timeout)
        if self.target != self._me:
            e = _post(r.addr, index, flags, self._me, payload, r.pidfd, DOORBELL, r.hint)
            if not e:
                return None
            if e == _POSTED_RING:
                return self.rt.ring_via_faytd(self.target)
        self.ring = self.rt.channel(self.target) if not r.addr else r
        return self.rt.notify(self.target, index, payload, flags, timeout)

    def call(self, index, payload=b"", immediate=False, timeout=None):
        """A notification with the return flag: the handler's result."""
        r, flags = self.ring, RETURN | (IMMEDIATE if immediate else 0)
        deadline = None if timeout is None else _deadline(timeout)   # checked before posting
        e = -2
        if r.addr and self.target != self._me:
            try:
                e = lib.fayt_ring_post(r.ptr, index, flags | NOWAIT, self._me, payload,
                                       len(payload), 0, r.pidfd, DOORBELL, self._pos,
                                       r.hint_ptr)
            except (OverflowError, TypeError):   # index < 0, payload no bytes: notify() says so
                e = -2
            if e == _POSTED_RING:
                self.rt.ring_via_faytd(self.target, r, self._pos[0], flags)
                e = 0
        if not e:
            e = lib.fayt_ring_wait_return(r.ptr, self._pos[0], _ns(deadline), self._res,
                                          self._st)
            if e == 0:
                if self._st[0]:
                    raise _handler_failed(index, self.target, self._st[0])
                return self._res[0]
            if e != errno.EINTR:
                self.rt._fail(r, self.target, index, e)
            self.rt._interrupted()
            return self.rt.wait_return(r, self.target, index, self._pos[0], deadline)
        self.ring = self.rt.channel(self.target) if not r.addr else r
        return self.rt.notify(self.target, index, payload, flags, timeout)


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


def runtime(connection=None):
    """The notification runtime of a connection (the default one if None)."""
    conn = connection or _default_connection()
    rt = conn._notify
    if rt is None:
        rt = conn._notify = Runtime(conn)
    return rt


# -- the public calls ------------------------------------------------------------

def install_handler(index, handler, connection=None, stacks=DEFAULT_STACKS):
    """Install handler(payload, index, sender) at slot index (core only: else
    PermissionDenied).  The first install also allocates `stacks` notification
    stacks, unless some exist."""
    runtime(connection).install(index, handler, stacks)


def remove_handler(index, connection=None):
    runtime(connection).remove(index)


def notify(target, index, payload=b"", *, immediate=False, wait_return=False, nowait=False,
           timeout=None, connection=None):
    """Send notification `index` with `payload` (at most 48 bytes) to the
    context whose id is `target`.  immediate: ring its doorbell now and yield.
    wait_return: sleep until its handler returns; the result is returned (an
    int); HandlerFailed if it raised, NoSuchContext (ESRCH) if the target
    died.  nowait: a full ring raises BlockingIOError (EAGAIN) instead of
    waiting.  timeout (seconds) bounds both waits (TimedOut): None or >= 0
    (inf: for ever), negative or nan InvalidArgument (errors.check_timeout)."""
    flags = (IMMEDIATE if immediate else 0) | (RETURN if wait_return else 0) | \
        (NOWAIT if nowait else 0)
    return runtime(connection).notify(target, index, payload, flags, timeout)


def notification_channel(target, connection=None):
    """Open the ring into `target` now (policy check, EPERM/ESRCH; notify() does
    it on first use otherwise) and return its Channel (send(), call())."""
    return Channel(runtime(connection), target)


def notification_ret(value=0):
    """Return from the running handler with `value` (notification_ret)."""
    raise _Return(value)


def notification_dispatch(connection=None):
    """Run every notification waiting for this context; how many ran."""
    return runtime(connection).dispatch()


notification_poll = notification_dispatch


def notification_wait(timeout=None, connection=None):
    """Sleep until notifications come, run them; how many ran (0: timed out)."""
    return runtime(connection).wait(timeout)


def notification_stack_alloc(size=0, connection=None):
    """Allocate a notification stack (size: bytes, a page multiple; 0: one page);
    its handle."""
    return runtime(connection).stack_alloc(size)


def notification_stack_free(handle, connection=None):
    runtime(connection).stack_free(handle)


def set_stack_provider(index, connection=None):
    """Make slot `index` the stack-provider action (None: no provider).  It is
    called as handler(None, index, 0) when a notification finds no free stack,
    and should call notification_stack_alloc()."""
    runtime(connection).set_provider(index)


def subscribe(event, index, arg=0, connection=None):
    """Ask faytd for its own notifications at slot `index`: PEER_DIED (arg: the
    context id watched, 0 any) or SP_DESTROYED (a share-point this context
    maps).  The payload is a struct fayt_event_payload (decode_event)."""
    runtime(connection).subscribe(event, index, arg)


def decode_event(payload):
    """{event, context_id, pid, sp_id, identifier} of a faytd notification;
    an OVERFLOW (notices for this slot were lost) has `lost`: how many."""
    e = ffi.new("struct fayt_event_payload *")
    b = bytes(payload)[:ffi.sizeof(e[0])]
    ffi.memmove(e, b, len(b))
    d = {"event": e.event, "context_id": e.context_id, "pid": e.pid, "sp_id": e.sp_id,
         "identifier": ffi.string(e.identifier).decode("utf-8", "replace")}
    if e.event == OVERFLOW:
        d["lost"] = e.sp_id
    return d


def notification_stats(connection=None):
    """This context's notification counters: delivered (handlers run, from
    the context page), starved (a notification waited for a stack),
    unhandled (notifications that named a slot with no handler: dropped; a
    return-flag sender got NotFound), dropped (rings given back because
    their sender wrote an entry out of range)."""
    rt = runtime(connection)
    n = rt.page.notify
    return {"delivered": n.delivered, "starved": n.starved, "unhandled": rt.unhandled,
            "dropped": rt.dropped}


def notification_depth(connection=None):
    """How many handlers run now, nested (0: none)."""
    return runtime(connection).page.notify.depth


def current_notification(connection=None):
    """The saved-state record of the innermost running handler, as a dict
    (index, sender, stack, ring_id, pos, interrupted_index, depth), or None."""
    page = runtime(connection).page
    d = page.notify.depth
    if d == 0 or d > lib.FAYT_NEST_MAX:
        return None
    s = page.saved[d - 1]
    return {"index": s.index, "sender": s.sender, "stack": s.stack, "ring_id": s.ring_id,
            "pos": s.pos, "interrupted_index": s.interrupted_index, "depth": d}


def context_of(pid, connection=None):
    """The context id of the process `pid` (NotFound if it has none)."""
    conn = connection or _default_connection()
    for c in conn.list_contexts()["contexts"]:
        if c["pid"] == pid and c.get("connected", True):
            return c["id"]
    raise errors.error(errno.ENOENT, "pid: %d has no context in faytd" % pid)
