"""What every mapped portal has (Portal, SharePoint, SpecialPortal): faytd's
handle, the mapping, its frames, and the memoryviews lent out of it.

Each mapping is recorded in the connection it was made through
(Connection._mappings, by weak reference): closing the connection unmaps them,
and a fork() child forgets them (they are not mapped there: MADV_DONTFORK,
or a userfaultfd registration Linux drops at fork).  The registry is the
connection's, so that the connection needs nothing from the modules that
make mappings.

Views: a memoryview of a region exports a _fastpath.Region, which counts
its exports; unmap() refuses (BufferError, as mmap.mmap.close() does) while
one lives, and Connection.close() leaves the memory mapped until the last
one goes.
"""
import errno
import weakref

from . import errors
from ._abi import lib, HANDLE_REQ, _fastpath
from .portal_req import PROT_READ, PROT_WRITE

_pack_handle = HANDLE_REQ.pack
_ref = weakref.ref
_UNMAP = lib.FAYT_SYS_UNMAP
_NOREPLY = lib.FAYT_REQ_NOREPLY


class Mapping:
    """What every mapped portal has: faytd's handle, the mapping, its frames."""

    def _setup(self, conn, reply, addr, paddr, type):
        """reply: the fayt_portal_reply (a _fastpath.PortalReply); the
        object is mapped at addr; paddr: its frames' physical addresses."""
        self.handle, self.map_length = reply.handle, reply.map_length
        self.connection = conn
        self.type = type
        self.addr = addr
        self.paddr = tuple(paddr)
        self.created = bool(reply.flags & lib.FAYT_PORTAL_REPLY_CREATED)
        conn._mappings[id(self)] = _ref(self)

    def _check(self):
        if not self.mapped:
            raise errors.error(errno.EBADF, "portal is unmapped")

    def _release(self, op, flags=0):
        """Tell faytd (op: UNMAP or UNMAP_DESTROY), then unmap here.  A refused
        call (EPERM for a destroy by another process) leaves the mapping as is.
        An unmap through a connection faytd has lost (it was restarted: the new
        faytd does not know this mapping) only unmaps here."""
        conn = self.connection
        if op != _UNMAP or (conn.sock.fileno() >= 0 and not conn._broken):  # conn.closed
            try:
                conn._dispatching_call(op, _pack_handle(self.handle), flags, (), None)
            except OSError as e:
                if not (op == _UNMAP and e.errno == errno.ECONNRESET and conn.closed):
                    raise
        # (faytd may hand the object out again from here: a view of it that
        # another thread of this process still uses writes into this
        # context's next portal; after the munmap such a use is a SIGSEGV.)
        self._invalidate()
        lib.fayt_unmap(self.addr, self.map_length)
        conn._mappings.pop(id(self), None)

    def unmap(self) -> None:
        """Unmap this portal and drop its captured-thread entry in faytd.

        Like munmap(2) it does not wait: the request is sent with
        FAYT_REQ_NOREPLY and faytd performs it before any later call of this
        connection.  It cannot fail for a mapping this object holds; if faytd
        ever refuses it, the next call of the connection warns (RuntimeWarning).
        BufferError while memoryviews of its memory (.buf, view()) exist,
        as mmap.mmap.close() does: release them first."""
        if not self.mapped:             # self._check(), inline: on every unmap
            raise errors.error(errno.EBADF, "portal is unmapped")
        self._check_unmap()
        self._release(_UNMAP, _NOREPLY)

    def _orphan(self, addr, length):
        """Connection.close(): True if memoryviews keep the memory mapped
        (the last one to go unmaps it)."""
        r = getattr(self, "_region", None)
        return r is not None and r.orphan(addr, length)

    def __repr__(self):
        return "<%s handle=%d addr=%#x length=%d%s>" % (
            type(self).__name__, self.handle, self.addr, self.map_length,
            "" if self.mapped else " unmapped")


def view(m, prot):
    """A memoryview of m's memory (m.addr, m.length), its exports counted
    (_fastpath.Region): read-only without PROT_WRITE; EACCES without
    PROT_READ."""
    if not prot & PROT_READ:
        raise errors.error(errno.EACCES, "portal is not readable (prot)")
    if m._region is None:
        m._region = _fastpath.Region(m.addr, m.length, not prot & PROT_WRITE)
    return memoryview(m._region)


def check_views(m):
    """BufferError if memoryviews of m's memory exist.  m's own .buf is
    released first (a later .buf makes another): a slice of it shares its
    export, so only then do the exports say whether anyone else holds one."""
    if m._buf is not None:
        m._buf, buf = None, m._buf
        buf.release()                   # BufferError if something holds a buffer of it
    if m._region is not None and m._region.exports:
        m._region.close()               # raises BufferError


def drop_views(m):
    """The mapping goes: release m's own .buf, and its Region unless views
    of it live (then the last one to go ends it)."""
    if m._buf is not None:
        m._buf.release()
        m._buf = None
    if m._region is not None:
        if not m._region.exports:
            m._region.close()
            m._region = None
