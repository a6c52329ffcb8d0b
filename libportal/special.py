"""SPECIAL portals and chain servers: pages supplied by a chain of servers.

The client side of a SPECIAL portal (portal(SPECIAL, ..., chain=, message=)):
- maps a private anonymous range, opens a userfaultfd(2) (plain if we may,
  else UFFD_USER_MODE_ONLY), registers the range (MISSING, and WP where the
  kernel supports write-protect on unpopulated anonymous memory) and sends
  the fd to faytd with the portal() call (SCM_RIGHTS).  faytd reads the
  faults; a thread that touches a page not yet supplied sleeps in the Linux
  kernel until the chain answers.
- Python: a thread that faults holds the GIL while it sleeps, so the whole
  process waits for the page (other threads included).  SpecialPortal.read
  / write / readinto copy in C with the GIL released, so only the copying
  thread waits; touching .buf from Python holds the GIL.
- A failed page (the chain failed it, ran out of servers, a server died or
  stayed silent past the chain's timeout) makes the access raise SIGBUS,
  the way a kernel fails an I/O-backed page.  Never zeros.
- If faytd dies: the client keeps its own copy of the uffd (were it the last
  one closed, the range would silently become zero pages), and a small C
  thread (the guard) watching faytd's pidfd poisons every page not yet
  supplied: accesses blocked then, and later, get SIGBUS.
- With UFFD_USER_MODE_ONLY (an unprivileged process, vm.unprivileged_userfaultfd
  at 0) a fault the kernel takes itself (read(2) into the region) fails with
  EFAULT instead of waiting: fill regions from user space (readinto).
- Answered by reference (SpecialPortal.backed): when a server of the chain
  has declared a backing for the message (ChainServer.back), faytd's reply
  carries a read-only fd of it.  The client maps it MAP_PRIVATE over the
  range it reserved (PROT_NONE until registered, so no access can slip in
  unregistered), registers MISSING|MINOR (the uffd is opened with
  UFFD_FEATURE_MINOR_SHMEM where the kernel has it) and sets the prot.  A
  page the server's object holds then faults as a minor fault and faytd maps
  that very page (UFFDIO_CONTINUE); a hole faults as before.  As with a
  private file mapping: the page is the server's until this process writes
  it (then a private copy: the fd is read-only and MAP_PRIVATE, so the
  server's memory never changes); the server's later writes to a page are
  seen here until this process writes it; the whole backing is readable
  by this process (a server that needs per-page secrecy answers with DATA).
  faytd's death guard poisons what is not mapped yet in such a region too.
  A fork child's copy of the region is not registered (Linux drops uffd
  registrations at fork): it reads the backing directly, and a hole it
  touches becomes a zero page of the backing, as in any private mapping.

The chain-server side (chain_join): a server joins a named chain (a right:
the policy's category "chains") and gets a channel in shared memory with
faytd.  take() sleeps on a futex (GIL released) until a page request comes;
the server answers each with supply() (one page or a run of following pages:
prefetch), forward() (the next server of the chain) or fail(errno).  A chain
server may not map a SPECIAL portal of a chain it serves (EDEADLK).
back(message, portal) declares one of its ANON portals (made through the
same connection) the backing for a message; requests of regions that map it
come with req.backed (and req.backing, its id), and req.map(n) answers
"these n bytes from req.offset are in my backing at the same offsets":
faytd maps them, no copy.  unback(message): new portals of the message are
no longer backed; regions that map it keep it.
"""
import errno
import os
import socket
from typing import Callable

from . import errors
from ._abi import (ffi, lib, HANDLE_REQ, portal_reply, CHAIN_JOIN as JOIN_REQ,
                   CHAIN_JOIN_REPLY as JOIN_REPLY, CHAIN_LEAVE as LEAVE_REQ,
                   CHAIN_BACK as BACK_REQ, CHAIN_BACK_REPLY as BACK_REPLY,
                   PAGE_REQUEST as PAGE_REQ, PAGE_REQUEST_HEAD as PAGE_REQ_HEAD, _fastpath)
from .mapping import Mapping, check_views, drop_views
from .portal_req import PROT_READ, PROT_WRITE, PAGE_SIZE, encode_portal_req
from .syscall import _CRED, Connection, connection as _default_connection
from ._types import Buffer, Name, WritableBuffer

_CHAIN_AT = ffi.offsetof("struct fayt_page_request", "chain")
_CHAIN_END = _CHAIN_AT + lib.FAYT_NAME_MAX + 1
_MESSAGE_AT = ffi.offsetof("struct fayt_page_request", "message")
_MESSAGE_MAX = lib.FAYT_MESSAGE_MAX
_PRESENT, _BACKED = lib.FAYT_PAGE_PRESENT, lib.FAYT_PAGE_BACKED
_DATA = lib.FAYT_PAGE_DATA
_MESSAGES_KEPT = 64         # messages a chain server keeps by region (they never change)

READ = lib.FAYT_ACCESS_READ
WRITE = lib.FAYT_ACCESS_WRITE
WRITE_REPORTS = lib.FAYT_CHAIN_WRITE_REPORTS


def _call_fds(conn, op, body, fds):
    """conn.call() with file descriptors sent along (SCM_RIGHTS)."""
    return conn.call(op, body, send_fds=fds)


def open_userfaultfd() -> "tuple[int, int]":
    """(fd, caps): a userfaultfd for a SPECIAL range, or a clear EPERM/ENOSYS."""
    caps = ffi.new("uint32_t *")
    fd = lib.fayt_uffd_open(caps)
    if fd == -errno.ENOSYS:
        raise errors.error(errno.ENOSYS, "SPECIAL: userfaultfd(2) is not available: ENOSYS "
                           "(a kernel built without CONFIG_USERFAULTFD, or a seccomp filter "
                           "that hides it)")
    if fd in (-errno.EPERM, -errno.EACCES):
        raise errors.error(errno.EPERM, "SPECIAL: userfaultfd(2) refused, even with "
                           "UFFD_USER_MODE_ONLY (seccomp, or a kernel older than 5.11 with "
                           "vm.unprivileged_userfaultfd = 0 and no CAP_SYS_PTRACE)")
    if fd == -errno.EINVAL:
        raise errors.error(errno.ENOSYS, "SPECIAL: the kernel refused UFFDIO_API "
                           "(userfaultfd too old)")
    if fd < 0:
        raise errors.error(-fd, "SPECIAL: userfaultfd(2): " + os.strerror(-fd))
    return fd, caps[0]


def _faytd_pidfd(conn):
    pid = _CRED.unpack(conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                            _CRED.size))[0]
    return os.pidfd_open(pid)


class SpecialPortal(Mapping):
    """A mapped SPECIAL portal.  .addr, .length, .buf (a memoryview: touching
    it faults pages in with the GIL held), read(off, n) / readinto(off, buf)
    / write(off, data) (C copies, GIL released), unmap()."""

    def __init__(self, conn: Connection, reply: object, addr: int, type: int, *, prot: int,
                 uffd: int, caps: int, chain: "str | None", message: "bytes | None") -> None:
        """reply: the fayt_portal_reply (a _fastpath.PortalReply); the range
        is mapped at addr and registered with the userfaultfd uffd (caps:
        what it supports)."""
        self._setup(conn, reply, addr, (), type)
        self.prot = prot
        self.length = self.map_length
        self.region_id = reply.sp_id
        self.chain = chain
        self.message = message
        self.user_mode_only = bool(caps & lib.FAYT_UFFD_USER_MODE)
        self.backed = bool(reply.flags & lib.FAYT_PORTAL_REPLY_BACKED)
        self.write_protect = bool(caps & lib.FAYT_UFFD_WP) and not self.backed
        self._uffd = uffd
        self.mapped = True
        self._buf = None
        self._region = None

    def _check_range(self, offset, n):
        self._check()
        if offset < 0 or n < 0 or offset + n > self.length:
            raise errors.error(errno.EINVAL, "offset %d + %d bytes is outside the portal (%d)"
                               % (offset, n, self.length))

    @property
    def buf(self) -> memoryview:
        """While it, or any memoryview made from it, exists, unmap() raises
        BufferError."""
        self._check()
        if self._buf is None:
            if self._region is None:
                self._region = _fastpath.Region(self.addr, self.length,
                                                not self.prot & PROT_WRITE)
            self._buf = memoryview(self._region)
        return self._buf

    def _check_unmap(self):
        check_views(self)

    def read(self, offset: int, n: int) -> bytes:
        """`n` bytes from `offset`, copied in C with the GIL released (only
        this thread waits for pages not supplied yet).  EINVAL outside the
        portal, EACCES without PROT_READ, EBADF once unmapped."""
        self._check_range(offset, n)
        if not self.prot & PROT_READ:
            raise errors.error(errno.EACCES, "portal is not readable (prot)")
        out = bytearray(n)
        if n:
            lib.fayt_copy(ffi.cast("uintptr_t", ffi.from_buffer(out)), self.addr + offset, n)
        return bytes(out)

    def readinto(self, offset: int, buffer: "WritableBuffer") -> int:
        """Fill the writable bytes-like `buffer` from `offset` (a C copy, GIL
        released); how many bytes were copied (len(buffer)).  The way to
        read a region under UFFD_USER_MODE_ONLY.  EINVAL outside the portal,
        EBADF once unmapped."""
        mv = memoryview(buffer).cast("B")
        self._check_range(offset, len(mv))
        if len(mv):
            lib.fayt_copy(ffi.cast("uintptr_t", ffi.from_buffer(mv, require_writable=True)),
                          self.addr + offset, len(mv))
        return len(mv)

    def write(self, offset: int, data: "Buffer") -> None:
        """Copy the bytes-like `data` to `offset` (a C copy, GIL released).
        EINVAL outside the portal, EACCES without PROT_WRITE, EBADF once
        unmapped."""
        mv = memoryview(data).cast("B")
        self._check_range(offset, len(mv))
        if not self.prot & PROT_WRITE:
            raise errors.error(errno.EACCES, "portal is not writable (prot)")
        if len(mv):
            lib.fayt_copy(self.addr + offset, ffi.cast("uintptr_t", ffi.from_buffer(mv)), len(mv))

    def _invalidate(self):
        drop_views(self)
        self.mapped = False
        if self._uffd >= 0:
            lib.fayt_special_unguard(self._uffd)
            os.close(self._uffd)
            self._uffd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.mapped:
            self.unmap()


def special_portal(conn, type, *, prot, length, chain, message, addr, identifier=None,
                   create=False):
    """portal() for SPECIAL and SPECIAL|SHARE: see the module's docstring.

    SPECIAL|SHARE: the range is reserved first (PROT_NONE), faytd answers
    with the share's shm object, mapped MAP_SHARED over the reservation,
    then the uffd is registered over it (MISSING; faults come only from
    user accesses made after this returns).
    SPECIAL: the range is mapped and registered before the call; if faytd
    answers with a backing (FAYT_PORTAL_REPLY_BACKED), its read-only fd is
    mapped MAP_PRIVATE over the range, PROT_NONE, registered MISSING|MINOR,
    then given its prot."""
    share = bool(type & lib.FAYT_PORTAL_SHARE)
    if length <= 0:
        raise errors.error(errno.EINVAL, "length: %d; a %s needs its length" % (
            length, "special share-point (attach too)" if share else "portal"))
    size = (length + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
    uffd, caps = open_userfaultfd()
    if share:
        caps &= ~lib.FAYT_UFFD_WP
    err = ffi.new("int *")
    base = 0
    handle = None
    try:
        base = lib.fayt_map_special(size, addr, 0 if share else prot, err)
        if not base:
            raise errors.error(err[0], "portal: mmap of the SPECIAL range: " + os.strerror(err[0]))
        if not share:
            e = lib.fayt_uffd_register(uffd, base, size, lib.FAYT_UFFD_REGISTER_WP
                                       if caps & lib.FAYT_UFFD_WP else 0)
            if e:
                raise errors.error(e, "SPECIAL: UFFDIO_REGISTER: " + os.strerror(e))
        body, fds = _call_fds(conn, lib.FAYT_SYS_PORTAL, encode_portal_req(
            type, prot, length, identifier=identifier, create=1 if create else 0, chain=chain,
            message=message, addr=base), [uffd])
        reply = portal_reply(body)
        handle = reply.handle
        try:
            if share:
                if len(fds) != 1:
                    raise errors.error(errno.EPROTO, "portal: faytd sent no share object")
                if not lib.fayt_map_over(fds[0], size, base, prot, err):
                    raise errors.error(err[0], "portal: mmap of the special share-point: "
                                       + os.strerror(err[0]))
                e = lib.fayt_uffd_register(uffd, base, size, 0)
                if e:
                    raise errors.error(e, "SPECIAL: UFFDIO_REGISTER: " + os.strerror(e))
            elif reply.flags & lib.FAYT_PORTAL_REPLY_BACKED:
                _map_backing(fds, uffd, base, size, prot)
            elif fds:
                raise errors.error(errno.EPROTO, "portal: faytd sent an fd for a SPECIAL "
                                   "portal it did not back")
        finally:
            for fd in fds:
                os.close(fd)
        try:
            pidfd = _faytd_pidfd(conn)
        except OSError:
            pidfd = -1
        if pidfd >= 0:
            try:
                lib.fayt_special_guard(pidfd, uffd, base, size)
            finally:
                os.close(pidfd)
    except BaseException:
        if handle is not None:
            try:
                conn.call(lib.FAYT_SYS_UNMAP, HANDLE_REQ.pack(handle))
            except OSError:
                pass
        if base:
            lib.fayt_unmap(base, size)
        os.close(uffd)
        raise
    if isinstance(chain, bytes):
        chain = chain.decode()
    sp = SpecialPortal(conn, reply, base, type, prot=prot, uffd=uffd, caps=caps, chain=chain,
                       message=message)
    sp.identifier = identifier
    return sp


def _map_backing(fds, uffd, base, size, prot):
    """A backed region: the backing over the range, MAP_PRIVATE, registered
    MISSING|MINOR before any access can reach it (PROT_NONE until then)."""
    err = ffi.new("int *")
    if len(fds) != 1:
        raise errors.error(errno.EPROTO, "portal: faytd backed the portal but sent %d fds"
                           % len(fds))
    if not lib.fayt_map_private_over(fds[0], size, base, err):
        raise errors.error(err[0], "portal: mmap of the chain's backing: " + os.strerror(err[0]))
    e = lib.fayt_uffd_register(uffd, base, size, lib.FAYT_UFFD_REGISTER_MINOR)
    if e:
        raise errors.error(e, "SPECIAL: UFFDIO_REGISTER (MISSING|MINOR): " + os.strerror(e))
    e = lib.fayt_protect(base, size, prot)
    if e:
        raise errors.error(e, "portal: mprotect of the SPECIAL range: " + os.strerror(e))


# -- chain servers ----------------------------------------------------------

class PageRequest:
    """One page request taken from a chain server's channel.

    offset, length  the page that faulted (bytes into the region)
    run_max         bytes an answer may hold from offset (prefetch up to here)
    access          READ, or WRITE (the first write to the page)
    present         a write report on a page already supplied: no data wanted
    backed          the region maps this server's backing `backing` (its id,
                    as back() returned it): map() may answer
    chain, message  sp_req_chain.name and .message of the portal
    hop             0 at the chain's first server
    data            a writable memoryview of run_max bytes: write the pages here
    Answer exactly once: supply(), map(), forward() or fail()."""

    __slots__ = ("server", "slot", "id", "offset", "length", "run_max", "access", "present",
                 "hop", "client_pid", "region_id", "region_length", "_mlen", "_data",
                 "_answered", "_chain", "_message", "backed", "backing")

    def __init__(self, server: "ChainServer", slot: int) -> None:
        self.server = server
        self.slot = slot
        (self.id, self.offset, self.length, self.run_max, self.access, flags, self.hop, _,
         self.region_id, self.client_pid, self.region_length, _, _, _,
         self._mlen, self.backing) = PAGE_REQ_HEAD.unpack_from(server._desc[slot])
        self.present = bool(flags & _PRESENT)
        self.backed = bool(flags & _BACKED)
        self._data = None
        self._answered = False
        self._chain = self._message = None

    # The strings and the data view are made on first use: a server that
    # answers from the offset alone pays for neither.  The message is read
    # before the answer at the latest (the slot then carries the next
    # request).  Both are read once per server (the chain: every request of
    # a channel names its chain) or per region (its message never changes).
    @property
    def chain(self) -> str:
        """The name of the chain that supplies the region (sp_req_chain.name)."""
        if self._chain is None:
            c = self.server._chain_name
            if c is None:
                raw = bytes(self.server._desc[self.slot][_CHAIN_AT:_CHAIN_END])
                c = self.server._chain_name = raw[:raw.find(b"\0")].decode("utf-8", "replace")
            self._chain = c
        return self._chain

    @property
    def message(self) -> bytes:
        """The portal's sp_req_chain.message, as its client passed it (bytes,
        at most FAYT_MESSAGE_MAX): what the region is of."""
        if self._message is None:
            kept = self.server._messages
            m = kept.get(self.region_id)
            if m is None:
                n = min(self._mlen, _MESSAGE_MAX)
                m = bytes(self.server._desc[self.slot][_MESSAGE_AT:_MESSAGE_AT + n])
                if len(kept) >= _MESSAGES_KEPT:
                    kept.clear()
                kept[self.region_id] = m
            self._message = m
        return self._message

    @property
    def data(self) -> memoryview:
        """A writable memoryview of run_max bytes in the channel: write the
        pages of the answer here, then supply(length=n)."""
        if self._data is None:
            self._data = self.server._data[self.slot][:self.run_max]
        return self._data

    @property
    def cancelled(self) -> bool:
        """The client went away (faytd will drop the answer)."""
        return bool(lib.fayt_pager_slot(self.server._ch, self.slot).flags
                    & lib.FAYT_PAGE_CANCELLED)

    def _answer(self, verdict, error, n):
        if self._answered:
            raise errors.error(errno.EALREADY, "page request %d: already answered" % self.id)
        if self._message is None:
            self.message            # read it now: after this the slot is faytd's again
        e = lib.fayt_pager_answer(self.server._ch, self.slot, verdict, error, n, self.server._efd)
        if e:
            raise errors.error(e, "page request %d: answer refused: %s" % (self.id, os.strerror(e)))
        self._answered = True

    def supply(self, data: "Buffer | None" = None, length: "int | None" = None) -> None:
        """Answer with pages.  data (bytes-like) is copied into .data first;
        else length bytes were written there already.  A partial last page
        is zero-filled.  0 bytes acknowledges a write report."""
        if data is not None:
            mv = data if type(data) is bytes else memoryview(data).cast("B")
            length = len(mv)
            if length > self.run_max:
                raise errors.error(errno.EINVAL, "supply: %d bytes, the request takes %d"
                                   % (length, self.run_max))
            self.server._data[self.slot][:length] = mv
        length = length or 0
        if self.present:
            length = 0
        elif length <= 0:
            raise errors.error(errno.EINVAL, "supply: no data for a page request")
        n = (length + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        if n > length:
            self.data[length:n] = bytes(n - length)
        self._answer(_DATA, 0, n)

    def map(self, length: int) -> None:
        """Answer by reference: `length` bytes from offset on (rounded up to
        whole pages, at most run_max) are in this server's backing at the same
        offsets; faytd maps those very pages into the client (no copy).  A
        page the backing does not hold ends the run there; if it is the
        faulting page, the access gets SIGBUS.  Only for a request whose
        region maps this server's backing (backed)."""
        if not self.backed:
            raise errors.error(errno.EINVAL, "map: the region of page request %d does not map "
                               "this server's backing (answer with supply)" % self.id)
        if not 0 < length <= self.run_max:
            raise errors.error(errno.EINVAL, "map: %d bytes, the request takes 1..%d"
                               % (length, self.run_max))
        self._answer(lib.FAYT_PAGE_MAPPED, 0, (length + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE)

    def forward(self) -> None:
        """Pass the request on to the next server of the chain."""
        self._answer(lib.FAYT_PAGE_FORWARD, 0, 0)

    def fail(self, err: int = errno.EIO) -> None:
        """Fail the access: the client's thread gets SIGBUS."""
        self._answer(lib.FAYT_PAGE_FAIL, int(err), 0)

    def __repr__(self):
        return "<PageRequest %d %s offset=%#x chain=%r hop=%d>" % (
            self.id, "write" if self.access == WRITE else "read", self.offset, self.chain, self.hop)


DEFAULT_SPIN_NS = 50000


class ChainServer:
    """A chain server's membership: take() page requests and answer them."""

    def __init__(self, conn: Connection, name: str, reply: "tuple[int, ...]",
                 fds: "list[int]") -> None:
        (self.chain_id, self.position, self.slots, self.run_max, map_length, self.flags,
         self.timeout_ms) = reply
        self.connection = conn
        self.name = name
        err = ffi.new("int *")
        addr = lib.fayt_map(fds[0], map_length, 0, PROT_READ | PROT_WRITE, err)
        os.close(fds[0])
        if not addr:
            os.close(fds[1])
            raise errors.error(err[0], "chain_join: cannot map the channel")
        self._addr, self._map_length = addr, map_length
        self._ch = ffi.cast("void *", addr)
        self._efd = fds[1]
        self._data = [memoryview(ffi.buffer(lib.fayt_pager_data(self._ch, i), self.run_max))
                      for i in range(self.slots)]
        self._desc = [memoryview(ffi.buffer(lib.fayt_pager_slot(self._ch, i), PAGE_REQ.size))
                      for i in range(self.slots)]
        self.joined = True
        self._chain_name = None     # as the requests name it (PageRequest.chain)
        self._messages = {}         # region id -> its message (PageRequest.message)
        # After each request, spin this long for the next before sleeping on
        # the futex: a fault costs one wake-up less when requests come in a
        # row.  Only where faytd and the client can run meanwhile (2 CPUs or
        # more); $FAYT_PAGER_SPIN_NS sets it (0: never spin).
        default = DEFAULT_SPIN_NS if (os.cpu_count() or 1) > 1 else 0
        self.spin_ns = int(os.environ.get("FAYT_PAGER_SPIN_NS", default))

    def take(self, timeout: "float | None" = None) -> "PageRequest | None":
        """The next PageRequest, or None after timeout seconds (None: wait).
        Raises BrokenPipeError-like EPIPE once the chain membership ended."""
        if not self.joined:
            raise errors.error(errno.EPIPE, "chain %r: left" % self.name)
        t = errors.check_timeout(timeout)
        ns = -1 if t is None else int(t * 1e9)
        while True:
            s = lib.fayt_pager_take(self._ch, ns, self.spin_ns if ns != 0 else 0)
            if s >= 0:
                return PageRequest(self, self._slot(s))
            if s == -errno.ETIMEDOUT:
                return None
            if s == -errno.EINTR:
                continue
            if s == -errno.EPROTO:
                self._slot(-1)
            raise errors.error(-s, "chain %r: the channel was closed by faytd" % self.name)

    def serve(self, handler: Callable[[PageRequest], object],
              stop: "Callable[[], bool] | None" = None, poll: "float | None" = 0.1) -> None:
        """Take requests and call handler(request) until stop() is true (or
        the channel closes).  A handler that raises OSError fails the request
        with its errno; one that returns without answering fails it with EIO."""
        t = errors.check_timeout(poll)
        ns = -1 if t is None else int(t * 1e9)
        spin = self.spin_ns if ns != 0 else 0
        take, ch = lib.fayt_pager_take, self._ch
        while stop is None or not stop():
            if not self.joined:
                return
            s = take(ch, ns, spin)
            if s < 0:
                if s in (-errno.ETIMEDOUT, -errno.EINTR):
                    continue
                if s == -errno.EPROTO:
                    self._slot(-1)
                return              # EPIPE: the channel was closed by faytd
            req = PageRequest(self, self._slot(s))
            try:
                handler(req)
            except OSError as e:
                if not req._answered:
                    req.fail(e.errno or errno.EIO)
            except BaseException:
                if not req._answered:
                    req.fail(errno.EIO)
                raise
            if not req._answered:
                req.fail(errno.EIO)

    def _slot(self, s):
        """s if it names one of this channel's slots (faytd's reply says how
        many), else EPROTO: the request ring in shared memory was scribbled on."""
        if not 0 <= s < self.slots:
            raise errors.error(errno.EPROTO, "chain %r: the channel's request ring names "
                               "slot %d of %d: corrupt" % (self.name, s, self.slots))
        return s

    def _back_call(self, op, message, handle):
        raw = message.encode("utf-8") if isinstance(message, str) else bytes(message or b"")
        if len(raw) > lib.FAYT_MESSAGE_MAX:
            raise errors.error(errno.ENAMETOOLONG, "message: %d bytes, longer than %d"
                               % (len(raw), lib.FAYT_MESSAGE_MAX))
        if not self.joined:
            raise errors.error(errno.EPIPE, "chain %r: left" % self.name)
        return self.connection.call(op, BACK_REQ.pack(self.chain_id, len(raw), handle, raw))[0]

    def back(self, message: "Name", portal: Mapping) -> int:
        """Declare the ANON portal `portal` (mapped through this server's
        connection) the backing for `message`: SPECIAL portals of the chain
        with that message, no longer than it, made from now on map it, and
        their requests to this server may be answered with req.map().  A
        portal backs one message; faytd keeps its pages while a region maps
        them, even after this server unmaps the portal.  Returns the
        backing's id (req.backing of those requests)."""
        if getattr(portal, "connection", None) is not self.connection:
            raise errors.error(errno.EINVAL, "portal: not mapped through this chain server's "
                               "connection (a handle names a mapping of one context)")
        if not portal.mapped:
            raise errors.error(errno.EBADF, "portal: unmapped")
        return BACK_REPLY.unpack(self._back_call(lib.FAYT_SYS_CHAIN_BACK, message,
                                                 portal.handle))[0]

    def unback(self, message: "Name") -> None:
        """New portals of `message` are no longer backed by this server;
        regions that map its backing keep it.  ENOENT if there is none."""
        self._back_call(lib.FAYT_SYS_CHAIN_UNBACK, message, 0)

    def leave(self) -> None:
        """Leave the chain (faytd drops this member as it drops a server
        that dies: what it had taken and not answered is ended by faytd) and
        unmap the channel.  take() then raises EPIPE.  Leaving twice does
        nothing; so does the end of a `with` block after it."""
        if not self.joined:
            return
        self.joined = False
        try:
            self.connection.call(lib.FAYT_SYS_CHAIN_LEAVE, LEAVE_REQ.pack(self.chain_id, 0))
        finally:
            self._close()

    def _close(self):
        for mv in self._data + self._desc:
            mv.release()
        self._data = self._desc = []
        os.close(self._efd)
        lib.fayt_unmap(self._addr, self._map_length)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.leave()


def chain_join(name: "Name", *, slots: int = 8, run_max: int = 65536, write_reports: bool = False,
               timeout: "float | None" = None,
               connection: "Connection | None" = None) -> ChainServer:
    """Join the chain `name` as its next server.  slots: requests in flight
    at once; run_max: bytes one answer may hold (prefetch); write_reports and
    timeout (seconds a server may take before faytd fails the request) are
    the chain's, set by its first server.  EPERM if the policy does not let
    this server serve `name`; EDEADLK if it maps a SPECIAL portal of it."""
    conn = connection or _default_connection()
    raw = name.encode("utf-8") if isinstance(name, str) else bytes(name)
    if len(raw) > lib.FAYT_NAME_MAX:
        raise errors.error(errno.ENAMETOOLONG, "name: longer than %d bytes" % lib.FAYT_NAME_MAX)
    if b"\0" in raw:
        raise errors.error(errno.EINVAL, "name: %r holds a NUL byte (a C string ends there)"
                           % raw.decode("utf-8", "backslashreplace"))
    # The chain's timeout is a uint32 of ms: "for ever" (errors.check_timeout)
    # and anything longer is its largest, 49.7 days.
    t = errors.check_timeout(timeout)
    ms = 0 if timeout is None else 0xffffffff if t is None else min(0xffffffff,
                                                                     max(1, int(t * 1000)))
    body = JOIN_REQ.pack(slots, run_max, WRITE_REPORTS if write_reports else 0, ms, raw)
    data, fds = conn.call(lib.FAYT_SYS_CHAIN_JOIN, body)
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        raise errors.error(errno.EPROTO, "chain_join: faytd sent %d fds, not 2" % len(fds))
    return ChainServer(conn, raw.decode("utf-8", "replace"), JOIN_REPLY.unpack(data), fds)


__all__ = ["SpecialPortal", "ChainServer", "PageRequest", "chain_join", "open_userfaultfd",
           "READ", "WRITE", "WRITE_REPORTS"]
