"""The client side of a system call: one SOCK_SEQPACKET message each way.

faytd knows who we are from SO_PEERCRED, so a request carries no identity but
the calling thread's id (faytd checks that it belongs to the peer's pid).
HELLO carries the wire ABI version (FAYT_WIRE_ABI) both ways: a faytd of
another version is refused with EPROTO naming both.
Granted memory arrives as file descriptors (SCM_RIGHTS) and is mapped here.
recvmsg(2) interrupted by a signal is retried by Python (PEP 475) after the
signal's handlers ran.  Every call is a notification dispatch point: what
waits in this context's rings is dispatched before the call, and a doorbell
that rang during the call (dispatch cannot fetch a new ring while a call is
in flight) is dispatched after it (see dispatch.py).  One call is in
flight per connection; a lock serialises threads.

After fork() the child must not speak on its parent's connection: the default
connection is dropped in the child and a new one is made on first use.

The call is one C call (_fastpath.Transport.request, made once per
connection with its socket and spin; its reply a _fastpath.Reply, read by
field name): the seq and header, the lock, the send, the wait, the replies
of earlier calls to skip or give back and the error check (transport.c).
It spins a little for the reply before it sleeps, because faytd answers most
calls within microseconds while a sleeping caller costs a wake-up, which on
a virtual machine is worth several round trips.  $FAYT_CALL_SPIN_NS sets
how long (default CALL_SPIN_NS with 2 CPUs or more, 0 with one).
"""
import errno
import json
import os
import socket
import struct
import threading
import weakref
from typing import Any, Sequence

from . import errors
from ._abi import ffi, lib, HELLO_REQ, HELLO_REPLY, LIST_REQ, _fastpath

_MAX_FDS = 8
CALL_SPIN_NS = 200000
_Transport = _fastpath.Transport
_MAIN_ID = threading.main_thread().ident
_pid = os.getpid()      # this process's: set again in a fork() child (_after_fork_child)


def _spin_ns():
    default = CALL_SPIN_NS if (os.cpu_count() or 1) > 1 else 0
    try:
        return max(0, int(os.environ.get("FAYT_CALL_SPIN_NS", default)))
    except ValueError:
        return default


def default_socket_path() -> str:
    """$FAYT_SOCKET, else $XDG_RUNTIME_DIR/fayt/faytd.sock, else /tmp/fayt-<uid>/faytd.sock."""
    p = os.environ.get("FAYT_SOCKET")
    if p:
        return p
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run and os.path.isdir(run):
        return os.path.join(run, "fayt", "faytd.sock")
    return "/tmp/fayt-%d/faytd.sock" % os.getuid()


_CRED = struct.Struct("3i")        # struct ucred: pid, uid, gid (SO_PEERCRED)


def _faytd_uids(faytd_uid):
    """The uids this client takes faytd from: its own, root's, and the one
    it names (faytd_uid, else $FAYT_FAYTD_UID)."""
    uids = {os.geteuid(), 0}
    if faytd_uid is None:
        env = os.environ.get("FAYT_FAYTD_UID", "")
        if env:
            try:
                faytd_uid = int(env)
            except ValueError:
                raise errors.error(errno.EINVAL, "FAYT_FAYTD_UID: %r is not a uid" % env) \
                    from None
    if faytd_uid is not None:
        if not isinstance(faytd_uid, int) or isinstance(faytd_uid, bool) or faytd_uid < 0:
            raise errors.error(errno.EINVAL, "faytd_uid: %r is not a uid" % (faytd_uid,))
        uids.add(faytd_uid)
    return uids


def _check_socket_dir(path, uids):
    """Refuse a socket in a directory of another uid: whoever owns it may
    have put its own socket there (docs/security.md)."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        owner = os.stat(d).st_uid
    except OSError:
        return                      # connect() says what is wrong
    if owner not in uids:
        raise errors.error(errno.EACCES, "socket: %s is in %s, owned by uid %d, neither this "
                           "process's uid %d nor root: that uid could serve there in faytd's "
                           "place; name it (Connection(faytd_uid=%d) or FAYT_FAYTD_UID=%d) if "
                           "it runs your faytd" % (path, d, owner, os.geteuid(), owner, owner))


class Connection:
    """A registered context: the socket to faytd and the mapped context page.

    faytd must run as this process's uid, as root, or as `faytd_uid`
    (default: $FAYT_FAYTD_UID): the socket's directory and the peer's
    credentials (SO_PEERCRED) are checked before anything is sent."""

    def __init__(self, path: "str | None" = None, *, faytd_uid: "int | None" = None) -> None:
        self.path = path or default_socket_path()
        uids = _faytd_uids(faytd_uid)
        _check_socket_dir(self.path, uids)
        self._pid = _pid
        self._notify = None         # notification.Runtime, made on first use
        # mapping.Mapping: what close() unmaps, as {id(m): weakref to m}
        # (a plain dict: an add and a discard cost no Python frame, on every
        # create, attach and unmap).  An entry whose mapping was collected
        # while mapped stays until its id is reused or the connection closes.
        self._mappings = {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._spin = _spin_ns()
        # the call, its lock and its bookkeeping (transport.c, "request()")
        self._transport = _Transport(self.sock.fileno(), spin_ns=self._spin, max_fds=_MAX_FDS,
                                     sock=self.sock)
        try:
            self.sock.connect(self.path)
        except OSError as e:
            self.sock.close()
            raise errors.DaemonUnavailable(
                e.errno or errno.ECONNREFUSED,
                "cannot reach faytd at %s: %s (is faytd running? set FAYT_SOCKET)"
                % (self.path, e.strerror)) from None
        peer_uid = _CRED.unpack(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                     _CRED.size))[1]
        if peer_uid not in uids:
            self.sock.close()
            raise errors.error(errno.EACCES, "socket: the process serving %s runs as uid %d, "
                               "neither this process's uid %d nor root; nothing was sent. Name "
                               "it (Connection(faytd_uid=%d) or FAYT_FAYTD_UID=%d) if it is "
                               "your faytd" % (self.path, peer_uid, os.geteuid(), peer_uid,
                                               peer_uid))
        self.context_page = 0
        try:
            body, fds = self.call(lib.FAYT_SYS_HELLO, HELLO_REQ.pack(lib.FAYT_WIRE_ABI, 0))
            if len(body) < HELLO_REPLY.size:
                _close_fds(fds)
                raise errors.error(errno.EPROTO, "hello: reply of %d bytes from faytd; "
                                   "fayt_hello_reply has %d" % (len(body), HELLO_REPLY.size))
            (self.context_id, self.category, self.rights, wire_abi) = \
                HELLO_REPLY.unpack_from(body)
            if wire_abi != lib.FAYT_WIRE_ABI:
                _close_fds(fds)
                raise errors.error(errno.EPROTO, "hello: wire ABI mismatch: faytd at %s speaks "
                                   "version %d, this client speaks version %d (install the "
                                   "same fayt-portals on both sides)"
                                   % (self.path, wire_abi, lib.FAYT_WIRE_ABI))
            if len(fds) != 1:
                _close_fds(fds)
                raise errors.error(errno.EPROTO, "hello: faytd sent no context page")
            err = ffi.new("int *")
            addr = lib.fayt_map(fds[0], lib.FAYT_CONTEXT_BYTES, 0,
                                1 | 2, err)
            os.close(fds[0])
            if not addr:
                raise errors.error(err[0], "hello: cannot map the context page")
            self.context_page = addr
        except BaseException:
            self.sock.close()
            raise
        self._finalizer = weakref.finalize(self, _close, self.sock, self._transport,
                                           self.context_page)
        _connections.add(self)

    def call(self, op: int, body: bytes = b"", flags: int = 0,
             send_fds: "Sequence[int]" = ()) -> "tuple[bytes, list[int]]":
        """Send one request (with send_fds as SCM_RIGHTS, for the calls in
        faytd's TAKES_FDS); return (reply body, [fds]) or raise its errno."""
        reply = self._dispatching_call(op, body, flags, send_fds, None)
        return reply.body, reply.fds

    def call_portal(self, body: bytes, addr: int, prot: int, share: bool) -> Any:
        """A PORTAL call whose granted object is mapped (at addr, or anywhere)
        and its fd closed in the same C call that reads the reply, the GIL
        held throughout, so that no fork() can inherit the fd (faytd may give
        this context the object again: see docs/design.md, "How faytd answers fast").
        Returns the _fastpath.Reply: .portal (the fayt_portal_reply, by
        name), .addr (0 if mmap failed: .map_err says why), .paddr."""
        reply = self._dispatching_call(lib.FAYT_SYS_PORTAL, body, 0, (), (addr, prot, share))
        if reply.portal is None:            # the reply did not carry one object
            _close_fds(reply.fds)
            raise errors.error(errno.EPROTO, "portal: malformed reply from faytd")
        return reply

    def _dispatching_call(self, op, body, flags, send_fds, portal):
        if self._pid != _pid:           # made before a fork(): see _after_fork_child
            raise errors.error(errno.EBADF, "this connection belongs to the parent process "
                                            "(fork): use a new Connection")
        rt = self._notify
        if rt is not None and rt.rings_in and not rt.busy:
            rt.dispatch()
        try:
            return self._transport.request(op, body, flags, send_fds or None, portal)
        finally:
            if self._close_pending:     # close() came from a signal handler inside the call
                self._close_pending = False
                self.close()
            elif rt is not None and rt.pending and not rt.busy:
                rt.dispatch()

    # The call itself is one C call, _fastpath.Transport.request (the seq,
    # the header, the lock, the main thread's count, the replies of earlier
    # calls to skip or give back, the error check: transport.c says how).
    # What it keeps is read here under the names this class always had.

    @property
    def _lock(self):
        """The call lock (one call in flight): `with conn._lock:`."""
        return self._transport

    @property
    def _caller(self):
        """The thread ident inside a call, or None."""
        return self._transport.caller or None

    @property
    def _main_calls(self):
        """Nonzero while the main thread is inside a call (lock taken or
        about to be): a signal handler then leaves the connection alone."""
        return self._transport.main_calls

    @property
    def _broken(self):
        """faytd went away: a call found the socket dead and closed it; the
        context page stays mapped, since share-points mapped through this
        connection keep their lock records in it and still work (a
        restarted faytd re-adopts share-points from its journal)."""
        return self._transport.broken

    @property
    def _close_pending(self):
        """close() came from a signal handler inside a call."""
        return self._transport.close_pending

    @_close_pending.setter
    def _close_pending(self, v):
        self._transport.close_pending = v

    def list_sharepoints(self) -> "list[dict[str, Any]]":
        """Every share-point in faytd's table, as dicts (paged LIST_SHARE)."""
        return self._list(lib.FAYT_SYS_LIST_SHARE, None)

    def list_contexts(self) -> "dict[str, Any]":
        """{"contexts": [...], "ram_frames": n, "free_frames": n} (paged LIST_CONTEXTS)."""
        return self._list(lib.FAYT_SYS_LIST_CONTEXTS, "contexts")

    def stats(self) -> "dict[str, Any]":
        """faytd's counters, decoded (FAYT_SYS_STATS; docs/cli.md, "fayt stats")."""
        return json.loads(self.call(lib.FAYT_SYS_STATS)[0])

    def _list(self, op, key):
        out, after, head = [], 0, {}
        while True:
            page = json.loads(self.call(op, LIST_REQ.pack(after))[0])
            if key:
                head, page = page, page.pop(key)
            if not page:
                break
            out.extend(page)
            after = page[-1]["id"]
        if key:
            head[key] = out
            return head
        return out

    def close(self) -> None:
        """Close the connection; every portal mapped through it is unmapped
        here first (faytd drops them when the connection closes).  From a
        signal handler that interrupted a call of this thread, the close
        happens when that call ends.  In a fork() child, on a connection
        made before the fork, only the child's descriptor and its copy of
        the context page go: the socket is the parent's too."""
        if self._pid != _pid:
            # No shutdown (it would end the parent's connection), no lock (a
            # parent thread inside a call holds it for ever here), nothing
            # unmapped (_after_fork_child forgot the mappings; the
            # notification runtime is the parent's): no call is possible.
            self._finalizer()
            return
        if self._caller == threading.get_ident() or \
                (self._main_calls and threading.get_ident() == _MAIN_ID):
            self._close_pending = True
            try:                        # the call's wait ends now (its poll sees HUP)
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if self._notify is not None:
            self._notify.close()
        for m in [r() for r in list(self._mappings.values())]:
            if m is not None and m.mapped:
                m._invalidate()
                if not m._orphan(m.addr, m.map_length):   # live memoryviews: the last unmaps
                    lib.fayt_unmap(m.addr, m.map_length)
        self._mappings.clear()
        try:                            # wakes another thread's call (its poll sees HUP)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._lock:                # then waits for it: the fd number stays ours till then
            self._finalizer()

    @property
    def closed(self) -> bool:
        """Closed by close(), or lost because faytd went away (either
        closes the socket; so does a fork() child, for the default one)."""
        return self._broken or self.sock.fileno() < 0


def _close_fds(fds):
    for fd in fds:
        os.close(fd)


def _close(sock, transport, page):
    transport.detach()              # under the call lock, or with no call possible
    sock.close()
    if page:
        lib.fayt_unmap(page, lib.FAYT_CONTEXT_BYTES)   # the page and its trace area


_default = None
_default_lock = threading.Lock()
_connections = weakref.WeakSet()    # every Connection: a fork() child forgets their mappings


def connection() -> Connection:
    """The process's default connection, made on first use."""
    global _default
    c = _default
    if c is not None and c.sock.fileno() >= 0 and not c._broken:  # not c.closed, inline
        return c
    with _default_lock:
        if _default is None or _default.closed:
            _default = Connection()
        return _default


def set_default(conn: "Connection | None") -> None:
    """Make `conn` the default connection (None: make a new one on next use)."""
    global _default
    _default = conn


def _after_fork_child():
    global _default, _default_lock, _pid
    _pid = os.getpid()      # connections made before the fork now raise EBADF
    for conn in list(_connections):     # not mapped here (MADV_DONTFORK): forget, not unmap
        for m in [r() for r in list(conn._mappings.values())]:
            if m is not None:
                getattr(m, "_forget", m._invalidate)()
        conn._mappings.clear()
    _default_lock = threading.Lock()
    old, _default = _default, None
    if old is not None:
        old._finalizer.detach()   # the parent still uses the socket and page
        old._transport.detach()
        old.sock.close()


os.register_at_fork(after_in_child=_after_fork_child)
