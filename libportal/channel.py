"""Sending: the rings this context posts into (Sender), and Channel, the
fast path of notify() for one target.

The facts this relies on, and what follows:
- A sender posts into its own ring (rings.py) with one C call
  (fayt_ring_post, through the ring's _fastpath.SenderRing), bumps the
  target's pending hint, and rings the doorbell itself through a pidfd
  when the kernel lets it, else asks faytd to (another uid:
  FAYT_SYS_NOTIFY_RING).
- With the return flag it sleeps in C (fayt_ring_wait_return, the GIL
  released) until the handler's notification_ret; without it, notify()
  returns once posted.
- A wait (for the return, or for space in a full ring) is a dispatch point
  of this context: a signal breaks it (EINTR), Python runs the doorbell's
  handler, then the notifications that came meanwhile are dispatched
  (dispatch.py) and the wait goes on, bounded by the same deadline.
- A notification to this context itself never waits for space (nothing
  could make it): the sender dispatches to empty its ring, or gets EDEADLK;
  with the return flag the handler runs at once, here.
- Every error names what failed: ESRCH (the target is gone), EPROTO (the
  target broke the ring: it is forgotten, the next notify() opens another),
  EAGAIN (full, FAYT_NOTIFY_NOWAIT), ETIMEDOUT, EDEADLK, EINVAL.
"""
import errno
import os

from . import errors
from ._abi import lib, HANDLE_REQ
from .rings import IMMEDIATE, RETURN, NOWAIT, SLOTS, PAYLOAD_MAX, POSTED_RING, \
    NO_HANDLER, Ring, wait_ns as _ns, deadline_of as _deadline


class Sender:
    """The sending side of one context: its rings, one per target, opened on
    first use.  Its waits are dispatch points of `rt`, the context's
    Dispatcher."""

    def __init__(self, rt):
        self.rt = rt
        self.conn = rt.conn
        self.rings = {}             # target context id -> Ring

    def open(self, target):
        """The ring into context `target`, opened now if it is not (or no
        longer) mapped."""
        r = self.rings.get(target)
        if r is None or not r.addr:
            _check_target(target)
            r = self.rings[target] = Ring.open(self.conn, target)
        return r

    def notify(self, target, index, payload, flags, timeout):
        _check_args(index, payload)
        deadline = None if timeout is None else _deadline(timeout)
        r = self.rings.get(target)
        if r is None or not r.addr:
            r = self.open(target)
        me = self.conn.context_id
        while True:
            e, pos = r.port.post_waiting(index, payload, flags | (NOWAIT if target == me else 0),
                                         _ns(deadline))
            if e == 0:
                break
            if e == POSTED_RING:
                self.ring_via_faytd(target, r, pos, flags)
                break
            if e == errno.EINTR:
                self._interrupted()
                continue
            if e == errno.EAGAIN and target == me and not flags & NOWAIT:
                # To ourselves: waiting for space would wait for ever; make it.
                if self.rt.dispatch():
                    continue
                e = errno.EDEADLK
            self._fail(r, target, index, e)
        if not flags & RETURN:
            return None
        if target == me:
            self.rt.dispatch()      # the handler runs here, now
        return self.wait_return(r, target, index, pos, deadline)

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
                r.port.wait_return(pos, 0)      # abandoned: the target frees it
            raise errors.error(e.errno, "notify: the notification to context %d is posted "
                               "but its doorbell was not rung: %s" % (target, e.strerror)) \
                from None

    def wait_return(self, r, target, index, pos, deadline):
        while True:
            e, result, status = r.port.wait_return(pos, _ns(deadline))
            if e == 0:
                if status:
                    raise _handler_failed(index, target, status)
                return result
            if e == errno.EINTR:
                self._interrupted()
                continue
            self._fail(r, target, index, e)

    def _interrupted(self):
        """A signal broke a wait: Python ran its handlers when the C call
        returned (the doorbell's runs IMMEDIATE notifications only); a
        sender's wait is a dispatch point: run what waits."""
        rt = self.rt
        if rt.pending or rt.rings_in:
            rt.dispatch()

    def _fail(self, r, target, index, e):
        if e == errno.ESRCH:
            self.rings.pop(target, None)
            r.close()
            raise errors.error(errno.ESRCH, "notify: target context %d is gone (died or "
                                            "closed)" % target)
        if e == errno.EPROTO:
            # The target wrote what the protocol never does, or dropped the
            # ring: forget it; the next notify() asks faytd for a fresh one.
            self.rings.pop(target, None)
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
        for r in self.rings.values():
            r.close()
        self.rings.clear()


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
    if status == NO_HANDLER:
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

    def __init__(self, sender, target):
        self.sender, self.target = sender, target
        self.ring = sender.open(target)
        self._me = sender.conn.context_id

    def send(self, index, payload=b"", immediate=False, timeout=None):
        """A notification without the return flag (deferred unless immediate)."""
        r, flags = self.ring, IMMEDIATE if immediate else 0
        if timeout is not None:
            errors.check_timeout(timeout)
        if self.target != self._me:
            e = r.port.post(index, payload, flags)
            if not e:
                return None
            if e == POSTED_RING:
                return self.sender.ring_via_faytd(self.target)
        self.ring = self.sender.open(self.target) if not r.addr else r
        return self.sender.notify(self.target, index, payload, flags, timeout)

    def call(self, index, payload=b"", immediate=False, timeout=None):
        """A notification with the return flag: the handler's result."""
        r, flags = self.ring, RETURN | (IMMEDIATE if immediate else 0)
        deadline = None if timeout is None else _deadline(timeout)   # checked before posting
        e = -2
        if r.addr and self.target != self._me:
            try:
                e, pos = r.port.post_waiting(index, payload, flags | NOWAIT, 0)
            except (OverflowError, TypeError):   # index < 0, payload no bytes: notify() says so
                e = -2
            if e == POSTED_RING:
                self.sender.ring_via_faytd(self.target, r, pos, flags)
                e = 0
        if not e:
            e, result, status = r.port.wait_return(pos, _ns(deadline))
            if e == 0:
                if status:
                    raise _handler_failed(index, self.target, status)
                return result
            if e != errno.EINTR:
                self.sender._fail(r, self.target, index, e)
            self.sender._interrupted()
            return self.sender.wait_return(r, self.target, index, pos, deadline)
        self.ring = self.sender.open(self.target) if not r.addr else r
        return self.sender.notify(self.target, index, payload, flags, timeout)
