"""Regions and requests: the SPECIAL portals of clients and their faults.

- Region: one SPECIAL portal: the client's userfaultfd, the range, the
  chain, the message.  A userfaultfd resolves faults in the address space
  of the process that created it, whoever holds the fd: the client maps the
  range, registers it and sends faytd the fd with PORTAL; faytd keeps a
  non-blocking dup, which names the region in the fault engine
  (faults.py).  Its page requests and counters are the engine's, in C: a
  request is a fault on one page (a second fault on a page being fetched
  waits for the same answer), handed from server to server along the chain
  (FORWARD) until one supplies the data or fails it; its state is explicit
  there (NEW, BACKLOG, POSTED, DONE).  A region that closes has its
  requests cancelled: their slots are marked FAYT_PAGE_CANCELLED and the
  answers, when they come, are dropped.
- SpecialShare: a SPECIAL|SHARE share-point: one shm object that several
  processes map, each with its own userfaultfd over its own mapping; each
  page is fetched once (the engine shares the requests of its regions).
- SpecialBacking: what a SPECIAL Mapping of a context references.

Answers by reference: UFFDIO_CONTINUE maps, into a shmem mapping registered
for minor faults, the page its object's page cache already holds at the same
offset.  So a region answered by reference must map a chain server's own
memory object, chosen when the portal is made: a SPECIAL portal of a message
some server backs (chains.py) gets a read-only fd of the backing, maps it
MAP_PRIVATE and registers MISSING|MINOR.  A region maps the backing of the
first server, in chain order, with a backing for its message, if that
backing is at least as long as the region, the chain has no write reports
and the client's userfaultfd can take minor faults: faytd learns that from
the fd's fdinfo ("API:" line: the features the kernel granted it), not from
the client's word.  Else it is answered by copy.  Requests of a region to
the server whose backing it maps carry FAYT_PAGE_BACKED and the backing's id
(after an unback too: the region still maps it); only they may be answered
MAPPED, anything else is a protocol error (EPROTO, SIGBUS for the access).
DATA answers work on a backed region too (UFFDIO_COPY there makes a private
anonymous page).  Minor faults are read faults here (a write to a page mapped so
copies it: MAP_PRIVATE).  Linux does not fault around in uffd-minor VMAs:
every page faults.

The client's userfaultfd is checked before it is used (EINVAL naming uffd):
it must have had its UFFDIO_API, which chooses its features once (faytd
calls UFFDIO_API again, with no features: EINVAL says it had; success says
it had not, and now it can ask for none), and must not ask for
non-cooperative events (fork, remap, remove, unmap: while one is unread,
UFFDIO_COPY answers EAGAIN and the thread that made it waits for faytd).
"""
import errno
import fcntl
import logging
import os
import struct

from libportal._abi import lib

from .context import Mapping
from .frames import BackingObject, KernelError
from .sharepoint import NamedShares

log = logging.getLogger("faytd")

_FEATURE_MINOR_SHMEM = 1 << 10   # UFFD_FEATURE_MINOR_SHMEM, as fdinfo shows the features
# UFFD_FEATURE_EVENT_FORK, _REMAP, _REMOVE, _UNMAP: non-cooperative events.
# While one is unread, UFFDIO_COPY/CONTINUE answer EAGAIN and the client's
# thread that caused it waits for faytd to read it: a client's fd that asks
# for them could stall the fault engine, and libportal never asks.
_FEATURES_NONCOOPERATIVE = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6)
# UFFDIO_API: _IOWR(0xAA, 0x3F, struct uffdio_api { u64 api, features, ioctls; }).
_UFFDIO_API = 0xc018aa3f
_UFFDIO_API_ARG = struct.Struct("QQQ")
_UFFD_API = 0xAA


class Region:
    """One SPECIAL portal of a client."""
    __slots__ = ("id", "ctx", "handle", "uffd", "addr", "length", "chain", "message", "wp",
                 "closed", "share", "backing")

    def __init__(self, rid, ctx, uffd, addr, length, chain, message, wp):
        self.id = rid
        self.ctx = ctx
        self.handle = 0
        self.uffd = uffd
        self.addr = addr
        self.length = length
        self.chain = chain
        self.message = message
        self.wp = wp
        self.share = None           # the SpecialShare it maps, if any
        self.closed = False
        self.backing = None         # the Backing it maps (answers by reference), if any


class SpecialShare:
    """A SPECIAL|SHARE share-point: one shm object that several processes map,
    each with its own uffd over its own mapping.  A page copied in through any
    of them is in the object's page cache, so the others never fault on it:
    each page is fetched once.  Faults on a page being fetched wait for the
    same request (the fault engine shares the requests of the regions of one
    share, by its id).  It lives while some process maps it."""
    __slots__ = ("id", "identifier", "backing", "length", "prot", "chain", "message",
                 "regions", "owner_pid")

    def __init__(self, sid, identifier, backing, length, prot, chain, message, owner_pid):
        self.id = sid
        self.identifier = identifier
        self.backing = backing
        self.length = length
        self.prot = prot
        self.chain = chain
        self.message = message
        self.regions = set()
        self.owner_pid = owner_pid


class SpecialBacking:
    """What a SPECIAL Mapping references: its region, no frames."""
    __slots__ = ("region_id", "length", "frames")

    def __init__(self, region_id, length):
        self.region_id = region_id
        self.length = length
        self.frames = []


def _uffd_features(fd):
    """The features the kernel granted the userfaultfd fd (its fdinfo's
    line "API:", then <api>:<features>:<ioctls> in hex), 0 if it does not say."""
    try:
        with open("/proc/self/fdinfo/%d" % fd) as f:
            for line in f:
                if line.startswith("API:"):
                    return int(line.split(":")[2], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _uffd_api_done(fd):
    """Whether the userfaultfd fd has had its UFFDIO_API.  The features are
    chosen there, once per fd: a second UFFDIO_API fails (EINVAL) and
    changes nothing.  So faytd calls it, with no features: on an fd the
    client has not initialised yet it succeeds, and the client can no
    longer ask for any.  (The fdinfo's features of such an fd are 0, as
    for one that will never ask; the bit recent kernels add there once
    UFFDIO_API is done is theirs, not the ABI.)"""
    try:
        fcntl.ioctl(fd, _UFFDIO_API, bytearray(_UFFDIO_API_ARG.pack(_UFFD_API, 0, 0)))
    except OSError as e:
        if e.errno == errno.EINVAL:
            return True
        raise KernelError(e.errno, "uffd: UFFDIO_API: %s" % os.strerror(e.errno)) from None
    return False


def _open_read_only(obj):
    """A read-only descriptor of a backing's object, for a client to map
    MAP_PRIVATE: nothing it does through it can change the server's memory."""
    try:
        return obj.open_fd(readonly=True)
    except KernelError as e:
        raise KernelError(e.errno, "faytd cannot open the chain server's backing: %s"
                          % e.message) from None


class Regions:
    """The SPECIAL portals by id and by userfaultfd, and the SPECIAL|SHARE
    share-points by identifier."""

    def __init__(self, pager):
        self.p = pager
        self.by_id = {}             # region id -> Region
        self.by_uffd = {}           # fd -> Region
        self.shares = NamedShares()  # identifier -> SpecialShare, names in the core's index
        self._next_share = 1
        self._next_region = 1

    def maps_chain(self, ctx, name):
        """Whether ctx maps a SPECIAL portal of chain `name`."""
        return any(r.ctx is ctx and r.chain.name == name and not r.closed
                   for r in self.by_id.values())

    def special_share(self, ctx, ident, create, length):
        """The SPECIAL|SHARE share-point `ident` a portal attaches to (None
        when it creates one, which must not exist yet)."""
        k = self.p.k
        if ident in self.shares or ident in k.sharepoints.by_name:
            k.catch_up(ctx)         # a destroy already sent by another process comes first
        sh = self.shares.get(ident)
        if create:
            if sh is not None:
                raise KernelError(errno.EEXIST, "share.identifier: special share-point %r exists"
                                  % ident.decode())
            return None
        if sh is None:
            raise KernelError(errno.ENOENT, "share.identifier: no special share-point %r"
                              % ident.decode())
        if length != sh.length:
            raise KernelError(errno.EINVAL, "length: %d; special share-point %r maps %d bytes"
                              % (length, ident.decode(), sh.length))
        return sh

    def map_special(self, ctx, tid, t, prot, length, addr, chain, message, uffd_fd,
                    ident=None, sh=None):
        """A SPECIAL portal of ctx over its range [addr, addr + length),
        registered with uffd_fd (dup'ed; the caller keeps its own); of a
        SPECIAL|SHARE, the share `sh` it attaches to (special_share), or a
        new one named `ident`.  Returns (region, fds to grant): for a region
        that maps a chain server's backing, a read-only fd of it; else none."""
        k = self.p.k
        share = t & lib.FAYT_PORTAL_SHARE
        made = False
        if sh is not None:
            chain, message = sh.chain.encode(), sh.message
        elif share:
            if ident in k.sharepoints.by_name:
                raise KernelError(errno.EEXIST, "share.identifier: %r names a share-point"
                                  % ident.decode())
            backing = BackingObject(0, k.frames.tag + ".special", length, [])
            sh = SpecialShare(self._next_share, ident, backing, length, prot, chain.decode(),
                              message, ctx.pid)
            self._next_share += 1
            made = True
        uffd = os.dup(uffd_fd)
        grant = []
        try:
            os.set_blocking(uffd, False)    # a client may send a blocking one: never wait on it
            if not _uffd_api_done(uffd):
                raise KernelError(errno.EINVAL, "uffd: the userfaultfd has not had UFFDIO_API, "
                                  "so it registers no range; faytd made it take no features")
            features = _uffd_features(uffd)
            if features & _FEATURES_NONCOOPERATIVE:
                raise KernelError(errno.EINVAL, "uffd: the userfaultfd asks for non-cooperative "
                                  "events (features %#x: fork, remap, remove or unmap), which "
                                  "faytd does not serve" % features)
            b = None
            if not share and features & _FEATURE_MINOR_SHMEM:
                chains = self.p.chains
                b = chains.backing_for(chains.for_region(ctx, chain.decode()), message, length)
                if b is not None:
                    grant.append(_open_read_only(b.obj))
            r = self._create(ctx, uffd, addr, length, chain.decode(), message, sh, b)
        except BaseException:
            os.close(uffd)
            for fd in grant:
                os.close(fd)
            if made:
                sh.backing.release()
            raise
        if made:
            self.shares[ident] = sh
        r.handle = handle = ctx.new_handle()
        k.add_mapping(ctx, Mapping(handle, t, SpecialBacking(r.id, length), None, ctx.pid, tid,
                                   prot))
        return r, grant

    def _create(self, ctx, uffd, addr, length, chain_name, message, share=None, backing=None):
        k = self.p.k
        chain = self.p.chains.for_region(ctx, chain_name)
        r = Region(self._next_region, ctx, uffd, addr, length, chain, message,
                   bool(chain.flags & lib.FAYT_CHAIN_WRITE_REPORTS) and share is None)
        self.p.faults.add_region(r, share.id if share is not None else 0, backing)
        if share is not None:
            r.share = share
            share.regions.add(r)
        if backing is not None:
            r.backing = backing
            backing.regions += 1
            k.frames.get(backing.obj)           # its frames live while this region maps them
        self._next_region += 1
        self.by_id[r.id] = r
        self.by_uffd[uffd] = r
        return r

    def close(self, r):
        if r.closed:
            return
        k = self.p.k
        n = self.p.faults.region_counts(r)
        log.debug("region %d (chain %r) closed: %d faults, %d pages fetched (%d faults answered "
                  "in one call), %d mapped by reference, %d failed, %d write reports", r.id,
                  r.chain.name, n.faults, n.fetched, n.in_one_call, n.mapped, n.failed,
                  n.write_reports)
        for f in r.chain.done:              # the chain's totals (INFO) keep them
            r.chain.done[f] += getattr(n, f)
        r.closed = True
        self.p.faults.del_region(r)         # its requests cancelled
        self.by_id.pop(r.id, None)
        if r.share is not None:
            sh = r.share
            sh.regions.discard(r)
            if not sh.regions:
                self.shares.pop(sh.identifier, None)
                sh.backing.release()
        if r.backing is not None:
            r.backing.regions -= 1
            k.frames.put(r.backing.obj)
        self.by_uffd.pop(r.uffd, None)
        os.close(r.uffd)

    def unmap(self, ctx, m):
        r = self.by_id.get(m.backing.region_id)
        if r is not None:
            self.close(r)

    def context_gone(self, ctx):
        for r in [r for r in self.by_id.values() if r.ctx is ctx]:
            self.close(r)

    def shutdown(self):
        for r in list(self.by_id.values()):
            # Leave the pages as they are: the client's guard poisons what is
            # missing when it sees faytd gone.
            self.close(r)
        for sh in list(self.shares.values()):
            sh.backing.release()
        self.shares.clear()
