"""The exceptions libportal raises: one table from errno to class.

Every error is a PortalError, an OSError whose errno is the one a kernel would
return and whose message names the argument at fault.  Where Python has a
builtin OSError subclass for the errno, the class derives from it too, so
``except FileExistsError`` works as a Python user expects.
"""
import errno as _errno


class PortalError(OSError):
    """Base of every error from faytd or the share-point wrappers."""


class PermissionDenied(PortalError, PermissionError):
    """EPERM: the policy does not give this context the right (nothing was
    created).  EACCES: the right exists but the object grants less, e.g. a
    share-point attached with more prot than it was created with, or a write
    through a read-only share-point."""


class AlreadyExists(PortalError, FileExistsError):
    """EEXIST: a share-point with this identifier exists (create), or the
    fixed address asked for in morphology.addr is occupied."""


class NotFound(PortalError, FileNotFoundError):
    """ENOENT: no share-point has this identifier (attach), or no such handle."""


class InvalidArgument(PortalError):
    """EINVAL (bad value: class bits, length, alignment, offset out of bounds,
    an identifier that is empty or not UTF-8), ENAMETOOLONG (identifier
    longer than FAYT_NAME_MAX)."""


class OutOfMemory(PortalError):
    """ENOMEM: faytd's emulated RAM, or a per-context quota, is exhausted."""


class OwnerDied(PortalError):
    """EOWNERDEAD: the previous holder of a share-point lock died while holding
    it.  Raised by fused calls and ``with sp:``; the explicit ``lock()`` returns
    errno.EOWNERDEAD instead and keeps the lock so that the data can be repaired."""


class TimedOut(PortalError, TimeoutError):
    """ETIMEDOUT: a lock or a call was not done within its timeout."""


class Deadlock(PortalError):
    """EDEADLK: this object already holds the lock it asks for."""


class Unmapped(PortalError):
    """EBADF: the portal or share-point was unmapped (or crossed a fork())."""


class NotImplementedClass(PortalError):
    """ENOSYS: the call or portal class is not implemented by this faytd."""


class DaemonUnavailable(PortalError, ConnectionError):
    """faytd cannot be reached, or it closed the connection (ECONNREFUSED,
    ECONNRESET, EPIPE, ENOTCONN)."""


class NoSuchContext(PortalError):
    """ESRCH: the target context of a notification is gone (it died or closed
    its connection; a sender waiting for its return is released with this at
    once), or a tid is not a thread of the calling process."""


class WouldBlock(PortalError, BlockingIOError):
    """EAGAIN: the ring into the target is full and the sender asked not to
    wait (nowait=True / FAYT_NOTIFY_NOWAIT)."""


class HandlerFailed(PortalError):
    """EREMOTEIO: the target's handler raised (or no handler was installed at
    that index: .status is ENOENT).  .status holds the handler's errno (the
    OSError's, else EREMOTEIO).  The target keeps running."""
    status = 0


class ChannelReset(PortalError, ConnectionResetError):
    """ECONNRESET from a channel (docs/channels.md): its peer died or left
    without closing, its listener went away before accepting it, it broke
    the ring protocol earlier, or faytd itself went away.  Unlike
    DaemonUnavailable, faytd may be well: connect again."""


class ChannelClosed(PortalError, BrokenPipeError):
    """EPIPE from a channel's send: this end shut its writing, or the peer
    shut its reading, closed or is gone."""


class ProtocolError(PortalError):
    """EPROTO: faytd's reply did not follow the protocol, or a notification
    ring holds what no protocol step writes (its target scribbled on it, or
    dropped it because its sender did)."""


_TABLE = {
    _errno.EPERM: PermissionDenied,
    _errno.EACCES: PermissionDenied,
    _errno.EEXIST: AlreadyExists,
    _errno.ENOENT: NotFound,
    _errno.EINVAL: InvalidArgument,
    _errno.ENAMETOOLONG: InvalidArgument,
    _errno.EILSEQ: InvalidArgument,
    _errno.E2BIG: InvalidArgument,
    _errno.ENOMEM: OutOfMemory,
    _errno.EOWNERDEAD: OwnerDied,
    _errno.ETIMEDOUT: TimedOut,
    _errno.EDEADLK: Deadlock,
    _errno.EBADF: Unmapped,
    _errno.ENOSYS: NotImplementedClass,
    _errno.ECONNREFUSED: DaemonUnavailable,
    _errno.ECONNRESET: DaemonUnavailable,
    _errno.EPIPE: DaemonUnavailable,
    _errno.ENOTCONN: DaemonUnavailable,
    _errno.EPROTO: ProtocolError,
    _errno.ESRCH: NoSuchContext,
    _errno.EAGAIN: WouldBlock,
    _errno.EREMOTEIO: HandlerFailed,
}


def error(err, message):
    """The exception for errno `err` with `message` (not raised)."""
    return _TABLE.get(err, PortalError)(err, message)


# -- timeouts: one rule for every call that takes one -----------------------------
# None waits for ever; a number of seconds >= 0 bounds the wait (0: do not
# wait); one too large for the clock (>= FOREVER s, inf included) is for
# ever too.  A negative number or nan is EINVAL naming the argument; a value
# that is no number is TypeError naming it.
FOREVER = 9.2e9     # seconds: int64 nanoseconds end about here (292 years)


def check_timeout(timeout, name="timeout"):
    """`timeout` in seconds as the rule reads it: None (for ever) or a
    number >= 0 and < FOREVER."""
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)):
        raise TypeError("%s: must be None or a number of seconds, not %s"
                        % (name, type(timeout).__name__))
    if not timeout >= 0:        # negative, or nan
        raise error(_errno.EINVAL, "%s: %r is not a number of seconds >= 0 (None waits "
                    "for ever)" % (name, timeout))
    if timeout >= FOREVER:
        return None
    return timeout
