"""portal(): the memory portal system call, and the mapped regions it returns.

The request is the packed struct portal_req from include/fayt/portal.h, built
with cffi, followed by its paddr[] entries and a trailer holding the strings
its pointers name; each pointer is sent as 0 (NULL) or 1 + the string's
offset in the trailer.  faytd answers with a backing object's fd; the library
maps it here with mmap(2), anywhere (morphology.addr 0) or exactly at
morphology.addr with MAP_FIXED_NOREPLACE.  If mapping fails the call is
rolled back in faytd, so nothing is left behind.

Lifetimes:
- An ANON portal lives as long as its mapping: unmap() frees its frames.
- A share-point lives in faytd's table from its creation until destroy(),
  or until its owner has died and no process maps it any more.  unmap()
  drops only this process's mapping (its captured-thread entry).  destroy()
  removes the identifier at once (new attaches fail with ENOENT); processes
  that still map it keep their memory until they unmap it.
- Everything a process mapped is released by faytd when it dies.
- Portals and share-points do not cross fork(): in the child they raise EBADF,
  and the child has no mapping of them at all (MADV_DONTFORK): faytd may give
  the object of a portal this process destroyed back to this same process
  for its next one, never to another.
"""
import array
import errno
import os
import struct
import weakref

from . import errors
from ._abi import lib, HANDLE_REQ, PORTAL_REQ, _fastpath
from .syscall import connection as _default_connection

SHARE = lib.FAYT_PORTAL_SHARE
DIRECT = lib.FAYT_PORTAL_DIRECT
ANON = lib.FAYT_PORTAL_ANON
COW = lib.FAYT_PORTAL_COW
SPECIAL = lib.FAYT_PORTAL_SPECIAL
PROT_NONE = lib.FAYT_PROT_NONE
PROT_READ = lib.FAYT_PROT_READ
PROT_WRITE = lib.FAYT_PROT_WRITE
PROT_EXEC = lib.FAYT_PROT_EXEC
PROT_RW = PROT_READ | PROT_WRITE
PAGE_SIZE = lib.FAYT_PAGE_SIZE

_live = weakref.WeakSet()   # mapped regions, invalidated in a fork child
_core_init = _fastpath.SharePointCore.__init__
_REPLY_CREATED = lib.FAYT_PORTAL_REPLY_CREATED
_pack_req = PORTAL_REQ.pack
_pack_handle = HANDLE_REQ.pack
_struct_error = struct.error


def encode_portal_req(type, prot, length, identifier=None, share_type=0, create=0,
                      chain=None, message=None, addr=0, paddr=()):
    """The wire body of a portal() request (see include/fayt/syscall.h).
    InvalidArgument (EINVAL) names a field its C type cannot hold."""
    try:
        return _encode_portal_req(type, prot, length, identifier, share_type, create, chain,
                                  message, addr, paddr)
    except (struct.error, OverflowError):
        _check_fields(type=type, prot=prot, length=length, share_type=share_type,
                      create=create, addr=addr)
        raise


_INT = (-(1 << 31), (1 << 31) - 1)
_FIELDS = {"type": _INT, "prot": _INT, "length": _INT, "share_type": _INT, "create": _INT,
           "addr": (0, (1 << 64) - 1)}


def _check_fields(**fields):
    """Which field of struct portal_req cannot hold its value: EINVAL naming it."""
    for name, v in fields.items():
        lo, hi = _FIELDS[name]
        if not isinstance(v, int):
            raise errors.error(errno.EINVAL, "%s: %r is not an integer" % (name, v))
        if not lo <= v <= hi:
            what = "the specification's int" if hi == _INT[1] else "uintptr_t"
            raise errors.error(errno.EINVAL, "%s: %d does not fit %s (%d to %d)"
                               % (name, v, what, lo, hi))


def _cstring(s, name):
    """A string field of the request as the bytes C will read: str (UTF-8)
    or bytes, else TypeError; one holding a NUL byte is EINVAL naming it
    (C would read only what comes before it: "a\\0b" would be "a")."""
    if isinstance(s, str):
        s = s.encode("utf-8")
    elif not isinstance(s, bytes):
        if not isinstance(s, (bytearray, memoryview)):
            raise TypeError("%s: must be str or bytes, not %s" % (name, type(s).__name__))
        s = bytes(s)
    if b"\0" in s:
        raise errors.error(errno.EINVAL, "%s: %r holds a NUL byte (a C string ends there)"
                           % (name, s.decode("utf-8", "backslashreplace")))
    return s


def _encode_portal_req(type, prot, length, identifier, share_type, create, chain, message,
                       addr, paddr):
    if chain is None and message is None and not paddr:     # the common case, at once
        mlen = length if length > 0 else 0
        if identifier is None:
            return PORTAL_REQ.pack(type, prot, length, 0, share_type, create, 0, 0, addr, mlen)
        return (PORTAL_REQ.pack(type, prot, length, 1, share_type, create, 0, 0, addr, mlen)
                + _cstring(identifier, "identifier") + b"\0")
    trailer = bytearray()

    def put(s, name):
        if s is None:
            return 0
        s = _cstring(s, name)
        off = len(trailer) + 1
        trailer.extend(s)
        trailer.append(0)
        return off

    body = PORTAL_REQ.pack(type, prot, length, put(identifier, "identifier"), share_type,
                           create, put(chain, "chain"), put(message, "message"), addr,
                           length if length > 0 else 0)
    if paddr:
        body += array.array("Q", paddr).tobytes()
    return body + trailer


class Mapping:
    """What every mapped portal has: faytd's handle, the mapping, its frames."""

    def _setup(self, conn, reply, req, paddr, addr, type):
        self.handle, self.map_length, flags = reply[0], reply[1], reply[6]
        self.connection = conn
        self.type = type
        self.addr = addr
        self.paddr = tuple(paddr)
        self.created = bool(flags & lib.FAYT_PORTAL_REPLY_CREATED)
        _live.add(self)

    def _check(self):
        if not self.mapped:
            raise errors.error(errno.EBADF, "portal is unmapped")

    def _release(self, op, flags=0):
        """Tell faytd (op: UNMAP or UNMAP_DESTROY), then unmap here.  A refused
        call (EPERM for a destroy by another process) leaves the mapping as is.
        An unmap through a connection faytd has lost (it was restarted: the new
        faytd does not know this mapping) only unmaps here."""
        conn = self.connection
        if not (op == lib.FAYT_SYS_UNMAP and conn.closed):
            try:
                conn._dispatching_call(op, _pack_handle(self.handle), flags, (), None)
            except OSError as e:
                if not (op == lib.FAYT_SYS_UNMAP and e.errno == errno.ECONNRESET and conn.closed):
                    raise
        # (faytd may hand the object out again from here: a view of it that
        # another thread of this process still uses writes into this
        # context's next portal; after the munmap such a use is a SIGSEGV.)
        self._invalidate()
        lib.fayt_unmap(self.addr, self.map_length)
        _live.discard(self)

    def unmap(self):
        """Unmap this portal and drop its captured-thread entry in faytd.

        Like munmap(2) it does not wait: the request is sent with
        FAYT_REQ_NOREPLY and faytd performs it before any later call of this
        connection.  It cannot fail for a mapping this object holds; if faytd
        ever refuses it, the next call of the connection warns (RuntimeWarning).
        BufferError while memoryviews of its memory (.buf, view()) exist,
        as mmap.mmap.close() does: release them first."""
        self._check()
        self._check_unmap()
        self._release(lib.FAYT_SYS_UNMAP, lib.FAYT_REQ_NOREPLY)

    def _orphan(self, addr, length):
        """Connection.close(): True if memoryviews keep the memory mapped
        (the last one to go unmaps it)."""
        r = getattr(self, "_region", None)
        return r is not None and r.orphan(addr, length)

    def __repr__(self):
        return "<%s handle=%d addr=%#x length=%d%s>" % (
            type(self).__name__, self.handle, self.addr, self.map_length,
            "" if self.mapped else " unmapped")


class Portal(Mapping):
    """A mapped ANON portal: .addr, .length, .paddr (one physical address per
    frame), .buf (a memoryview of the region), unmap()."""

    def __init__(self, conn, reply, req, paddr, addr, type, prot):
        self._setup(conn, reply, req, paddr, addr, type)
        self.prot = prot
        self.length = self.map_length
        self.mapped = True
        self._buf = None
        self._region = None

    @property
    def buf(self):
        """A memoryview of the region.  While it, or any memoryview made
        from it, exists, unmap() raises BufferError."""
        self._check()
        if self._buf is None:
            self._buf = _view(self, self.prot)
        return self._buf

    def _check_unmap(self):
        _check_views(self)

    def _invalidate(self):
        _drop_views(self)
        self.mapped = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.mapped:
            self.unmap()


class SharePoint(_fastpath.SharePointCore, Mapping):
    """A mapped share-point.

    The wrappers check bounds and prot on every access:
      sp.read(off, n) / sp.write(off, data) / sp.add(off, delta)
                    fused: lock, check, copy, unlock in one C call
      with sp: ...  take and release the lock; sp.view() inside it
      sp.lock(timeout=None) -> 0 or errno.EOWNERDEAD; sp.unlock()
      sp.mark_consistent() after repairing data whose holder died
    Fused calls and ``with sp`` refuse an owner-died lock with OwnerDied;
    only an explicit lock() takes it, so nobody uses inconsistent data unaware.
    """

    def __init__(self, conn, reply, req, paddr, addr, type, identifier):
        # Mapping._setup, inline: this runs on every create and attach.
        handle, map_length, data_offset, sp_id, _, prot, flags = reply
        _core_init(self, addr, data_offset, map_length - data_offset, prot, sp_id,
                   conn.context_page)
        self.handle = handle
        self.map_length = map_length
        self.connection = conn
        self.type = type
        self.addr = addr
        self.paddr = paddr if paddr.__class__ is tuple else tuple(paddr)
        self.created = bool(flags & _REPLY_CREATED)
        self.identifier = identifier
        _live.add(self)

    def destroy(self):
        """Destroy the share-point (owner or core only) and unmap it here.

        When faytd cannot refuse it (this mapping created the share-point, so
        this process owns it, or the context is core) the call is sent with
        FAYT_REQ_NOREPLY, like unmap(): it costs no round trip, and faytd
        still performs it before anything that could observe it: this
        connection's later calls, and any other process's create, attach or
        list of a name that still exists (faytd first performs what every
        connection has already sent).  Otherwise it waits for faytd's answer,
        so that EPERM is raised here and the mapping is kept.
        BufferError while memoryviews of view() exist (nothing is done)."""
        self._check()
        self._check_unmap()
        conn = self.connection
        if not conn._broken:
            try:
                if self.created or conn.category == lib.FAYT_CATEGORY_CORE:
                    return self._release(lib.FAYT_SYS_UNMAP_DESTROY, lib.FAYT_REQ_NOREPLY)
                return self._release(lib.FAYT_SYS_UNMAP_DESTROY)
            except OSError as e:
                if not (e.errno == errno.ECONNRESET and conn._broken and self.mapped):
                    raise
        self._destroy_after_restart()

    def _destroy_after_restart(self):
        """faytd was restarted since this was mapped (the connection is lost;
        the new faytd took the share-point back from its journal but does
        not know this mapping): destroy it by identifier through a new
        connection, if it is still this share-point (same id), then unmap here."""
        from .syscall import Connection
        fresh = Connection(self.connection.path)
        try:
            try:
                again = portal(SHARE | ANON, PROT_NONE, 0, identifier=self.identifier,
                               connection=fresh)
            except errors.NotFound:
                self._release(lib.FAYT_SYS_UNMAP)   # a lost connection: unmaps here only
                raise
            if again._ino != self._ino:         # the same object, not just the same name
                again.unmap()
                self._release(lib.FAYT_SYS_UNMAP)
                raise errors.error(errno.ENOENT, "share-point %r: gone after faytd's restart "
                                   "(the name is another share-point's now)"
                                   % self.identifier.decode("utf-8", "replace"))
            try:
                again.destroy()
            except BaseException:
                if again.mapped:
                    again.unmap()
                raise                           # refused: this mapping is kept
            self._release(lib.FAYT_SYS_UNMAP)
        finally:
            fresh.close()

    @property
    def _ino(self):
        """The inode of the object this maps (a restarted faytd may give its
        name to another): read from /proc/self/maps when first asked."""
        try:
            return self._ino_seen
        except AttributeError:
            self._check()
            self._ino_seen = _mapped_inode(self.base)
            return self._ino_seen

    def __getstate__(self):
        raise TypeError("a SharePoint cannot be pickled: attach it by identifier")


def portal(type, prot=PROT_RW, length=0, *, identifier=None, create=False,
           share_type=0, chain=None, message=None, addr=0, paddr=(), connection=None):
    """The portal system call.  Returns a Portal, or a SharePoint for SHARE.

    type      class bits: ANON, SHARE|ANON, SPECIAL, ... (DIRECT, COW: ENOSYS for now)
    prot      PROT_READ|PROT_WRITE|PROT_EXEC asked for
    length    bytes of the mapping (a multiple of 4096 after rounding up);
              for a share-point it holds the meta-structure and the data.
              0 on attach: the share-point's own length.
    identifier, create, share_type
              share.identifier, share.create, share.type
    chain, message
              sp_req_chain.name and .message (SPECIAL: the chain that supplies
              the pages; returns a special.SpecialPortal)
    addr      morphology.addr: 0 lets the library choose, else exactly there
    """
    conn = connection or _default_connection()
    if isinstance(identifier, str):
        identifier = identifier.encode("utf-8")
    if type & SPECIAL:
        from .special import special_portal     # its userfaultfd goes with the call
        return special_portal(conn, type, prot, length, chain, message, addr, identifier, create)
    is_share = bool(type & SHARE)
    create = 1 if create else 0
    if (identifier.__class__ is bytes and chain is None and message is None and not paddr
            and b"\0" not in identifier):
        # share_create/share_attach: encode_portal_req's common case, inline
        try:
            req = _pack_req(type, prot, length, 1, share_type, create, 0, 0, addr,
                            length if length > 0 else 0) + identifier + b"\0"
        except (_struct_error, OverflowError):
            req = encode_portal_req(type, prot, length, identifier, share_type, create,
                                    chain, message, addr, paddr)    # raises, naming the field
    else:
        req = encode_portal_req(type, prot, length, identifier, share_type, create,
                                chain, message, addr, paddr)
    # The reply is read, its object mapped (MADV_DONTFORK) and its fd closed
    # in one C call, the GIL held: no fork() of another thread inherits the fd.
    body, (mapped, err, reply, paddr_out) = conn.call_portal(req, addr, prot, is_share)
    if not mapped:
        created = reply[6] & lib.FAYT_PORTAL_REPLY_CREATED
        conn.call(lib.FAYT_SYS_UNMAP_DESTROY if created else lib.FAYT_SYS_UNMAP,
                  HANDLE_REQ.pack(reply[0]))
        e = err
        what = {errno.EEXIST: "morphology.addr %#x is already mapped" % addr,
                errno.EINVAL: "morphology.addr %#x is not page-aligned" % addr}
        raise errors.error(e, "portal: " + what.get(e, "mmap failed: " + os.strerror(e)))
    if is_share:
        return SharePoint(conn, reply, None, paddr_out, mapped, type, identifier)
    return Portal(conn, reply, None, paddr_out, mapped, type, prot)


def _view(m, prot):
    """A memoryview of m's memory (m.addr, m.length), its exports counted
    (_fastpath.Region): read-only without PROT_WRITE."""
    if not prot & PROT_READ:
        raise errors.error(errno.EACCES, "portal is not readable (prot)")
    if m._region is None:
        m._region = _fastpath.Region(m.addr, m.length, not prot & PROT_WRITE)
    return memoryview(m._region)


def _check_views(m):
    """BufferError if memoryviews of m's memory exist.  m's own .buf is
    released first (a later .buf makes another): a slice of it shares its
    export, so only then do the exports say whether anyone else holds one."""
    if m._buf is not None:
        m._buf, buf = None, m._buf
        buf.release()                   # BufferError if something holds a buffer of it
    if m._region is not None and m._region.exports:
        m._region.close()               # raises BufferError


def _drop_views(m):
    if m._buf is not None:
        m._buf.release()
        m._buf = None
    if m._region is not None:
        if not m._region.exports:
            m._region.close()
            m._region = None


def _mapped_inode(addr):
    """The inode of what is mapped at addr here (its /proc/self/maps line)."""
    with open("/proc/self/maps") as f:
        for line in f:
            if int(line[:line.index("-")], 16) == addr:
                return int(line.split()[4])
    raise errors.error(errno.EFAULT, "nothing is mapped at %#x" % addr)


def share_create(identifier, length, prot=PROT_RW, *, addr=0, connection=None):
    """Create the share-point `identifier` (SHARE|ANON); EEXIST if it exists."""
    return portal(SHARE | ANON, prot, length, identifier=identifier, create=True,
                  addr=addr, connection=connection)


def share_attach(identifier, prot=PROT_RW, *, addr=0, connection=None):
    """Attach the existing share-point `identifier`; ENOENT if there is none,
    EACCES if it grants less than `prot`."""
    return portal(SHARE | ANON, prot, 0, identifier=identifier, create=False,
                  addr=addr, connection=connection)


def _after_fork_child():
    for m in list(_live):
        getattr(m, "_forget", m._invalidate)()
    _live.clear()


os.register_at_fork(after_in_child=_after_fork_child)
