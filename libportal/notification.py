"""Notifications: the public calls (install_handler, notify,
notification_dispatch, notification_ret, ...) and the runtime of a
connection that they act on.

The runtime is in three parts, one module each:
- rings.py: rings and notification stacks, the shared memory a
  notification lives in (and what each side trusts of it);
- dispatch.py: the target's side: the doorbell, the dispatch points, the
  pending hint the share-point calls check, and notification_dispatch /
  notification_ret on notification stacks (Dispatcher);
- channel.py: the sender's side: posting, ringing, waiting for the return
  (Sender), and Channel, notify()'s fast path to one target.
Runtime (below) is one connection's: a Dispatcher with a Sender.

A handler is called as handler(payload, index, sender): the
specification's (void *, int, int); see dispatch.py.
"""
import errno
from typing import Any, NoReturn

from . import errors
from ._abi import ffi, lib
from .channel import Channel, Sender
from .dispatch import Dispatcher, DEFAULT_STACKS, HandlerReturn
from .rings import IMMEDIATE, RETURN, NOWAIT, SLOTS, PAYLOAD_MAX, KERNEL, DOORBELL  # noqa: F401
from .syscall import Connection, connection as _default_connection
from ._types import Buffer, Handler

PEER_DIED = lib.FAYT_EVENT_PEER_DIED
SP_DESTROYED = lib.FAYT_EVENT_SP_DESTROYED
OVERFLOW = lib.FAYT_EVENT_OVERFLOW


class Runtime(Dispatcher):
    """The notification state of one context (one Connection): what it
    receives and runs (Dispatcher) and the rings it sends on (.sender)."""

    def __init__(self, conn):
        Dispatcher.__init__(self, conn)
        self.sender = Sender(self)

    def close(self):
        Dispatcher.close(self)
        self.sender.close()


def runtime(connection=None):
    """The notification runtime of a connection (the default one if None)."""
    conn = connection or _default_connection()
    rt = conn._notify
    if rt is None:
        rt = conn._notify = Runtime(conn)
    return rt


# -- the public calls ------------------------------------------------------------

def install_handler(index: int, handler: "Handler", connection: "Connection | None" = None,
                    stacks: int = DEFAULT_STACKS) -> None:
    """Install handler(payload, index, sender) at slot index (core only: else
    PermissionDenied).  The first install also allocates `stacks` notification
    stacks, unless some exist."""
    runtime(connection).install(index, handler, stacks)


def remove_handler(index: int, connection: "Connection | None" = None) -> None:
    """Remove the handler at slot `index`: later notifications to it are
    dropped (counted as unhandled; a return-flag sender gets NotFound).
    Core only, as install_handler(); removing an empty slot does nothing."""
    runtime(connection).remove(index)


def notify(target: int, index: int, payload: "Buffer" = b"", *, immediate: bool = False,
           wait_return: bool = False, nowait: bool = False, timeout: "float | None" = None,
           connection: "Connection | None" = None) -> "int | None":
    """Send notification `index` with `payload` (at most 48 bytes) to the
    context whose id is `target`.  immediate: ring its doorbell now and yield.
    wait_return: sleep until its handler returns; the result is returned (an
    int); HandlerFailed if it raised, NoSuchContext (ESRCH) if the target
    died.  nowait: a full ring raises BlockingIOError (EAGAIN) instead of
    waiting.  timeout (seconds) bounds both waits (TimedOut): None or >= 0
    (inf: for ever), negative or nan InvalidArgument (errors.check_timeout)."""
    flags = (IMMEDIATE if immediate else 0) | (RETURN if wait_return else 0) | \
        (NOWAIT if nowait else 0)
    return runtime(connection).sender.notify(target, index, payload, flags, timeout)


def notification_channel(target: int, connection: "Connection | None" = None) -> Channel:
    """Open the ring into `target` now (policy check, EPERM/ESRCH; notify() does
    it on first use otherwise) and return its Channel (send(), call())."""
    return Channel(runtime(connection).sender, target)


def notification_ret(value: int = 0) -> NoReturn:
    """Return from the running handler with `value` (notification_ret)."""
    raise HandlerReturn(value)


def notification_dispatch(connection: "Connection | None" = None) -> int:
    """Run every notification waiting for this context; how many ran."""
    return runtime(connection).dispatch()


notification_poll = notification_dispatch


def notification_wait(timeout: "float | None" = None,
                      connection: "Connection | None" = None) -> int:
    """Sleep until notifications come, run them; how many ran (0: timed out)."""
    return runtime(connection).wait(timeout)


def notification_fd(connection: "Connection | None" = None) -> int:
    """A descriptor readable when notifications may wait for this context,
    for selectors and event loops (main thread only): when it is readable,
    call notification_ready().  See docs/notifications.md, "Event loops"."""
    return runtime(connection).fileno()


def notification_ready(connection: "Connection | None" = None) -> int:
    """After notification_fd() was readable: run every notification that
    waits and arm the descriptor again; how many handlers ran."""
    return runtime(connection).ready()


async def notification_wait_async(timeout: "float | None" = None,
                                  connection: "Connection | None" = None) -> int:
    """notification_wait for asyncio: wait (without blocking the event loop)
    until notifications come, run them; how many ran (0: timed out)."""
    import asyncio
    rt = runtime(connection)
    fd = rt.fileno()
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + errors.check_timeout(timeout)
    while True:
        ran = rt.ready()
        if ran:
            return ran
        left = None if deadline is None else deadline - loop.time()
        if left is not None and left <= 0:
            return 0
        readable = loop.create_future()
        loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
        try:
            await asyncio.wait_for(readable, left)
        except asyncio.TimeoutError:
            return 0
        finally:
            loop.remove_reader(fd)


def notification_stack_alloc(size: int = 0, connection: "Connection | None" = None) -> int:
    """Allocate a notification stack (size: bytes, a page multiple; 0: one page);
    its handle."""
    return runtime(connection).stack_alloc(size)


def notification_stack_free(handle: int, connection: "Connection | None" = None) -> None:
    """Give back a notification stack that notification_stack_alloc() made
    (`handle`: its return value).  EBUSY while a handler runs on it;
    EBADF if no stack of this context has that handle."""
    runtime(connection).stack_free(handle)


def set_stack_provider(index: "int | None", connection: "Connection | None" = None) -> None:
    """Make slot `index` the stack-provider action (None: no provider).  It is
    called as handler(None, index, 0) when a notification finds no free stack,
    and should call notification_stack_alloc()."""
    runtime(connection).set_provider(index)


def subscribe(event: int, index: int, arg: int = 0,
              connection: "Connection | None" = None) -> None:
    """Ask faytd for its own notifications at slot `index`: PEER_DIED (arg: the
    context id watched, 0 any) or SP_DESTROYED (a share-point this context
    maps).  The payload is a struct fayt_event_payload (decode_event)."""
    runtime(connection).subscribe(event, index, arg)


def decode_event(payload: "Buffer") -> "dict[str, Any]":
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


def notification_stats(connection: "Connection | None" = None) -> "dict[str, int]":
    """This context's notification counters: delivered (handlers run, from
    the context page), starved (a notification waited for a stack),
    unhandled (notifications that named a slot with no handler: dropped; a
    return-flag sender got NotFound), dropped (rings given back because
    their sender wrote an entry out of range)."""
    rt = runtime(connection)
    n = rt.page.notify
    return {"delivered": n.delivered, "starved": n.starved, "unhandled": rt.unhandled,
            "dropped": rt.dropped}


def notification_depth(connection: "Connection | None" = None) -> int:
    """How many handlers run now, nested (0: none)."""
    return runtime(connection).page.notify.depth


def current_notification(connection: "Connection | None" = None) -> "dict[str, int] | None":
    """The saved-state record of the innermost running handler, as a dict
    (index, sender, stack, ring_id, pos, interrupted_index, depth), or None."""
    page = runtime(connection).page
    d = page.notify.depth
    if d == 0 or d > lib.FAYT_NEST_MAX:
        return None
    s = page.saved[d - 1]
    return {"index": s.index, "sender": s.sender, "stack": s.stack, "ring_id": s.ring_id,
            "pos": s.pos, "interrupted_index": s.interrupted_index, "depth": d}


def context_of(pid: int, connection: "Connection | None" = None) -> int:
    """The context id of the process `pid` (NotFound if it has none)."""
    conn = connection or _default_connection()
    for c in conn.list_contexts()["contexts"]:
        if c["pid"] == pid and c.get("connected", True):
            return c["id"]
    raise errors.error(errno.ENOENT, "pid: %d has no context in faytd" % pid)
