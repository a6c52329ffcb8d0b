"""portal(): the memory portal system call, and the mapped regions it returns.

The request is the packed struct portal_req (portal_req.py).  faytd answers
with a backing object's fd; the library maps it here with mmap(2), anywhere
(morphology.addr 0) or exactly at morphology.addr with MAP_FIXED_NOREPLACE.
If mapping fails the call is rolled back in faytd, so nothing is left
behind.  What every mapped region has is in mapping.py; SPECIAL portals are
special.py's.

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
import errno
import os
import struct
import weakref
from typing import Any, Sequence

from . import errors
from ._abi import lib, HANDLE_REQ, PORTAL_REQ, _fastpath
from .mapping import Mapping, view, check_views, drop_views
from .portal_req import (encode_portal_req, SHARE, DIRECT, ANON, COW,  # noqa: F401
                         SPECIAL, PROT_NONE, PROT_READ, PROT_WRITE, PROT_EXEC, PROT_RW,
                         PAGE_SIZE)
from .direct import direct_portal
from .special import special_portal, SpecialPortal
from .syscall import Connection, connection as _default_connection
from ._types import Name

_core_init = _fastpath.SharePointCore.__init__
_REPLY_CREATED = lib.FAYT_PORTAL_REPLY_CREATED
_pack_req = PORTAL_REQ.pack
_struct_error = struct.error
_ref = weakref.ref


class Portal(Mapping):
    """A mapped ANON portal: .addr, .length, .paddr (one physical address per
    frame), .buf (a memoryview of the region), unmap()."""

    def __init__(self, conn: Connection, reply: Any, *, addr: int, paddr: Sequence[int],
                 type: int, prot: int) -> None:
        """reply: the fayt_portal_reply (a _fastpath.PortalReply); its
        object is mapped at addr; paddr: its frames' physical addresses."""
        self._setup(conn, reply, addr, paddr, type)
        self.prot = prot
        self.length = self.map_length
        self.mapped = True
        self._buf = None
        self._region = None

    @property
    def buf(self) -> memoryview:
        """A memoryview of the region.  While it, or any memoryview made
        from it, exists, unmap() raises BufferError."""
        self._check()
        if self._buf is None:
            self._buf = view(self, self.prot)
        return self._buf

    def _check_unmap(self):
        check_views(self)

    def _invalidate(self):
        drop_views(self)
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

    def __init__(self, conn: Connection, reply: Any, type: int, identifier: bytes) -> None:
        """reply: the PORTAL call's _fastpath.Reply (its object mapped)."""
        # Mapping._setup, inline: this runs on every create and attach.
        _core_init(self, reply, conn.context_page)
        p = reply.portal
        self.handle = p.handle
        self.map_length = p.map_length
        self.connection = conn
        self.type = type
        self.addr = reply.addr
        self.paddr = reply.paddr
        self.created = bool(p.flags & _REPLY_CREATED)
        self.identifier = identifier
        conn._mappings[id(self)] = _ref(self)

    def destroy(self) -> None:
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


def portal(type: int, prot: int = PROT_RW, length: int = 0, *, identifier: "Name | None" = None,
           create: bool = False, share_type: int = 0, chain: "Name | None" = None,
           message: "Name | None" = None, addr: int = 0, paddr: Sequence[int] = (),
           connection: "Connection | None" = None) -> "Portal | SharePoint | SpecialPortal":
    """The portal system call.  Returns a Portal, or a SharePoint for SHARE.

    type      class bits: ANON, SHARE|ANON, SPECIAL, DIRECT, COW, SHARE|DIRECT
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
    paddr     morphology.paddr[]: DIRECT and COW name one physical frame per 4 KiB
              (COW: the source; share_type its mode, COW_ON_WRITE or COW_SNAPSHOT)
              COW's source may be a share-point instead: identifier=NAME and
              no paddr; the view is its mapping from offset 0, `length` bytes
    """
    conn = connection or _default_connection()
    if isinstance(identifier, str):
        identifier = identifier.encode("utf-8")
    if type & SPECIAL:      # its userfaultfd goes with the call
        return special_portal(conn, type, prot=prot, length=length, chain=chain,
                              message=message, addr=addr, identifier=identifier, create=create)
    if type == DIRECT or type == COW:      # one fd per object its frames are in
        return direct_portal(conn, type, prot, length, addr, paddr, Portal, share_type,
                             identifier if type == COW else None)
    is_share = bool(type & SHARE)
    create = 1 if create else 0
    if (identifier.__class__ is bytes and chain is None and message is None and not paddr
            and b"\0" not in identifier):
        # share_create/share_attach: encode_portal_req's common case, inline
        try:
            req = _pack_req(type, prot, length, 1, share_type, create, 0, 0, addr,
                            length if length > 0 else 0) + identifier + b"\0"
        except (_struct_error, OverflowError):
            req = encode_portal_req(type, prot, length, identifier=identifier,
                                    share_type=share_type, create=create, addr=addr)
            # (that raises, naming the field)
    else:
        req = encode_portal_req(type, prot, length, identifier=identifier, share_type=share_type,
                                create=create, chain=chain, message=message, addr=addr,
                                paddr=paddr)
    # The reply is read, its object mapped (MADV_DONTFORK) and its fd closed
    # in one C call, the GIL held: no fork() of another thread inherits the fd.
    reply = conn.call_portal(req, addr, prot, is_share)
    if not reply.addr:
        p = reply.portal
        created = p.flags & lib.FAYT_PORTAL_REPLY_CREATED
        conn.call(lib.FAYT_SYS_UNMAP_DESTROY if created else lib.FAYT_SYS_UNMAP,
                  HANDLE_REQ.pack(p.handle))
        e = reply.map_err
        what = {errno.EEXIST: "morphology.addr %#x is already mapped" % addr,
                errno.EINVAL: "morphology.addr %#x is not page-aligned" % addr}
        raise errors.error(e, "portal: " + what.get(e, "mmap failed: " + os.strerror(e)))
    if is_share:
        return SharePoint(conn, reply, type, identifier)
    return Portal(conn, reply.portal, addr=reply.addr, paddr=reply.paddr, type=type, prot=prot)


def _mapped_inode(addr):
    """The inode of what is mapped at addr here (its /proc/self/maps line)."""
    with open("/proc/self/maps") as f:
        for line in f:
            if int(line[:line.index("-")], 16) == addr:
                return int(line.split()[4])
    raise errors.error(errno.EFAULT, "nothing is mapped at %#x" % addr)


def share_create(identifier: "Name", length: int, prot: int = PROT_RW, *, addr: int = 0,
                 connection: "Connection | None" = None) -> SharePoint:
    """Create the share-point `identifier` (SHARE|ANON); EEXIST if it exists."""
    return portal(SHARE | ANON, prot, length, identifier=identifier, create=True,
                  addr=addr, connection=connection)


def share_attach(identifier: "Name", prot: int = PROT_RW, *, addr: int = 0,
                 connection: "Connection | None" = None) -> SharePoint:
    """Attach the existing share-point `identifier`; ENOENT if there is none,
    EACCES if it grants less than `prot`."""
    return portal(SHARE | ANON, prot, 0, identifier=identifier, create=False,
                  addr=addr, connection=connection)
