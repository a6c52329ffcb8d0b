"""Discovery by name: a server publishes its context under a name, and a
client finds it there, without a pid (docs/discovery.md).

    lp.publish("kv")                       # in the server
    srv = lp.lookup("kv", timeout=5)       # in a client: waits until published
    lp.notify(srv.context, 1, b"get x", wait_return=True)

Names live in the namespaces of share-point names (docs/names.md): a bare
name is the caller's uid's own, unless the policy shares it.
"""
import errno
import json
import time
from typing import NamedTuple

from . import errors
from ._abi import lib, PUBLISH_REQ
from .syscall import Connection, connection as _default_connection
from ._types import Name

class Published(NamedTuple):
    """A published context: its id (the target of notify()), pid, uid, policy
    category, the name and its namespace ("uid:<uid>" or "shared")."""
    context: int
    pid: int
    uid: int
    category: "str | None"
    name: str
    namespace: str


def _encode(name):
    if isinstance(name, str):
        name = name.encode("utf-8")
    if not isinstance(name, bytes):
        raise TypeError("name: must be str or bytes, not %s" % type(name).__name__)
    return name


def publish(name: "Name", *, connection: "Connection | None" = None) -> None:
    """Publish this connection's context under `name`.  EEXIST if another
    live context holds it; it is free again when this context withdraws it,
    disconnects or dies."""
    conn = connection or _default_connection()
    conn.call(lib.FAYT_SYS_PUBLISH, PUBLISH_REQ.pack(0, 0) + _encode(name))


def unpublish(name: "Name", *, connection: "Connection | None" = None) -> None:
    """Withdraw `name` (ENOENT unless this context published it)."""
    conn = connection or _default_connection()
    conn.call(lib.FAYT_SYS_PUBLISH, PUBLISH_REQ.pack(lib.FAYT_PUBLISH_WITHDRAW, 0)
              + _encode(name))


def lookup(name: "Name", *, timeout: "float | None" = 0,
           connection: "Connection | None" = None) -> Published:
    """The context published under `name`, as a Published.

    timeout: 0 (the default) asks once; a number of seconds, or None for
    ever, waits until a server publishes the name (asking again every few
    milliseconds, up to 50 ms apart).  NotFound (ENOENT) if it is not
    published by then."""
    timeout = errors.check_timeout(timeout)
    conn = connection or _default_connection()
    body = _encode(name)
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.002
    while True:
        try:
            reply = conn.call(lib.FAYT_SYS_LOOKUP, body)[0]
            break
        except errors.NotFound:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise
            time.sleep(pause if left is None else min(pause, left))
            pause = min(pause * 2, 0.05)
    try:
        d = json.loads(reply)
        return Published(d["context"], d["pid"], d["uid"], d["category"], d["name"],
                         d["namespace"])
    except (ValueError, KeyError, TypeError):
        raise errors.error(errno.EPROTO, "lookup: malformed reply from faytd") from None
