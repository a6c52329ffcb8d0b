"""The pager: chains of servers that supply the pages of SPECIAL portals.

Linux facts it relies on:
- A userfaultfd resolves faults in the address space of the process that
  created it, whoever holds the fd.  The client maps a SPECIAL region,
  registers it with a uffd and sends us the fd; a thread that touches a page
  not yet supplied sleeps in the Linux kernel until we resolve the fault with
  UFFDIO_COPY (the data), UFFDIO_POISON (the access gets SIGBUS) or, in
  write-protect mode, UFFDIO_WRITEPROTECT (the write goes on).
- The uffd is non-blocking and pollable: the event loop watches it (and each
  channel's eventfd, and one timerfd for the deadlines) like any other fd.
- Answers by reference: UFFDIO_CONTINUE maps, into a shmem mapping
  registered for minor faults, the page its object's page cache already
  holds at the same offset.  So a region answered by reference must map a
  chain server's own memory object, chosen when the portal is made: a
  server declares one of its ANON portals the backing for a message
  (CHAIN_BACK); a SPECIAL portal of that message then gets a read-only fd
  of it, maps it MAP_PRIVATE and registers MISSING|MINOR; the server
  answers MAPPED and we map its pages: no copy.  We learn whether the
  client's uffd can take minor faults from its fdinfo ("API:" line: the
  features the kernel granted it), not from the client's word.  Minor faults
  are read faults here (a write to a page mapped so copies it: MAP_PRIVATE).
  Linux does not fault around in uffd-minor VMAs: every page faults.

Objects:
- Chain: a name, and its servers in the order they joined.  Serving a chain
  is a right (policy category "chains", globs of chain names).  The first
  server to join sets the chain's flags (write reports) and timeout; the
  chain goes away with its last server.
- Member: one server's place in a chain, with its channel (pager.h): a shm
  object of slots, two rings of slot numbers, a futex doorbell towards the
  server and an eventfd towards us.  A request costs no system call to
  faytd; a server answers a run of pages in one slot (prefetch).
- Region: one SPECIAL portal: the client's uffd, the range, the chain, the
  message, the page requests in flight (one per page: a second fault on a
  page that is being fetched just waits for the same answer).
- Request: a fault on one page, handed from server to server along the
  chain (FORWARD) until one supplies the data or fails it.
- Backing: a server's ANON portal declared for a message.  It holds a
  reference to the portal's frames (and the portal's RAM charge) from
  CHAIN_BACK until CHAIN_UNBACK, the server's leaving or death, the server's
  own unmap notwithstanding; each region that maps it holds one more
  reference, so its frames live while some client maps them.  A portal
  backs one message at a time.  A region maps the backing of the first
  server, in chain order, with a backing for its message, if that backing
  is at least as long as the region, the chain has no write reports and
  the client's uffd can take minor faults; else it is answered by copy, as
  before.  Requests of a region to the server whose backing it maps carry
  FAYT_PAGE_BACKED and the backing's id (after an unback too: the region
  still maps it); only they may be answered MAPPED, anything else is a
  protocol error (EPROTO, SIGBUS for the access).  DATA answers work on a
  backed region too (UFFDIO_COPY there makes a private anonymous page).

Failure: a failed request, a chain that runs out of servers, a server that
dies or stays silent past the chain's timeout: the page is poisoned, so the
access gets SIGBUS, never zeros.  A failed write report cannot take a page
back; it is logged and the write goes on.  A client that dies (or unmaps)
has its requests cancelled: the slot is marked FAYT_PAGE_CANCELLED and the
answer, when it comes, is dropped.  A chain server may not map a SPECIAL
portal of a chain it serves, nor join a chain it maps a portal of (EDEADLK):
its own fault would wait for itself.
"""
import errno
import heapq
import logging
import os
import select
import time

from libportal._abi import ffi, lib, PAGE_REQUEST as PAGE_REQ

from .context import Mapping
from .frames import BackingObject, KernelError, PAGE
from .policy import class_names

log = logging.getLogger("faytd")


_FLAG_WRITE = 1      # UFFD_PAGEFAULT_FLAG_WRITE
_FLAG_WP = 2         # UFFD_PAGEFAULT_FLAG_WP
# (UFFD_PAGEFAULT_FLAG_MINOR, 4, is not looked at: a minor fault is a read fault here.)
_FEATURE_MINOR_SHMEM = 1 << 10   # UFFD_FEATURE_MINOR_SHMEM, as fdinfo shows the features
DEFAULT_TIMEOUT_MS = 10000
DEFAULT_SPIN_US = 50


class Chain:
    __slots__ = ("id", "name", "name_bytes", "members", "flags", "timeout_ms")

    def __init__(self, cid, name, flags, timeout_ms):
        self.id = cid
        self.name = name
        self.name_bytes = name.encode()
        self.members = []
        self.flags = flags
        self.timeout_ms = timeout_ms


class Member:
    """A server's place in a chain and its channel."""
    __slots__ = ("ctx", "chain", "backing", "map", "ch", "efd", "nslots", "run_max", "free",
                 "inflight", "backlog", "closed", "stride", "backings")

    def __init__(self, ctx, chain, nslots, run_max, tag):
        self.ctx = ctx
        self.chain = chain
        self.nslots = nslots
        self.run_max = run_max
        self.stride = lib.FAYT_PAGER_DESC_SIZE + run_max
        size = lib.fayt_pager_bytes(nslots, run_max)
        self.backing = BackingObject(0, tag + ".chain", size, [])
        self.map = self.backing.map(size)
        self.ch = ffi.from_buffer(self.map)
        lib.fayt_pager_init(self.ch, nslots, run_max, chain.id, len(chain.members))
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.free = list(range(nslots - 1, -1, -1))
        self.inflight = {}          # slot -> Request
        self.backlog = []           # requests waiting for a free slot
        self.closed = False
        self.backings = {}          # message -> Backing (answers by reference)

    # The channel is shared with the server, which may write anything into
    # it: faytd finds slots with its own stride, never the header's.
    def desc(self, slot):
        return ffi.cast("struct fayt_page_request *",
                        self.ch + lib.FAYT_PAGER_HEADER_SIZE + slot * self.stride)

    def data(self, slot):
        return self.ch + lib.FAYT_PAGER_HEADER_SIZE + slot * self.stride + lib.FAYT_PAGER_DESC_SIZE

    def close(self):
        if self.closed:
            return
        self.closed = True
        lib.fayt_pager_close(self.ch)
        os.close(self.efd)
        self.ch = None
        self.map.close()
        self.backing.release()


class Backing:
    """A chain server's ANON portal from which requests for `message` may be
    answered by reference (MAPPED).  `obj` is the portal's BackingObject;
    `live` until unbacked (then no new region maps it; regions that do keep
    it, and a reference to its frames each)."""
    __slots__ = ("id", "member", "message", "obj", "handle", "length", "charged", "live",
                 "regions")

    def __init__(self, bid, member, message, obj, handle):
        self.id = bid
        self.member = member
        self.message = message
        self.obj = obj
        self.handle = handle
        self.length = obj.length
        self.charged = 0            # the portal's RAM charge, held while the backing lives
        self.live = True
        self.regions = 0


class Region:
    """One SPECIAL portal of a client."""
    __slots__ = ("id", "ctx", "handle", "uffd", "addr", "length", "chain", "message",
                 "pending", "wp", "closed", "faults", "fetched", "failed", "write_reports",
                 "share", "in_one_call", "backing", "mapped")

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
        self.pending = {}           # page offset -> Request (a SPECIAL|SHARE's: shared)
        self.share = None           # the SpecialShare it maps, if any
        self.closed = False
        self.faults = self.fetched = self.failed = self.write_reports = 0
        self.in_one_call = 0        # faults answered by the fast path (Pager._fast)
        self.backing = None         # the Backing it maps (answers by reference), if any
        self.mapped = 0             # pages of `fetched` mapped by reference

    def backing_of(self, m):
        """The id of m's backing if this region maps it (requests to m carry
        it, and FAYT_PAGE_BACKED), else 0."""
        b = self.backing
        return b.id if b is not None and b.member is m else 0


class Request:
    __slots__ = ("id", "region", "offset", "access", "present", "hop", "member", "slot",
                 "deadline", "done", "waiters")

    def __init__(self, rid, region, offset, access, present):
        self.id = rid
        self.region = region
        self.offset = offset
        self.access = access
        self.present = present      # a write report on a page already there
        self.hop = 0
        self.member = None
        self.slot = -1
        self.deadline = 0.0
        self.done = False
        self.waiters = []           # SPECIAL|SHARE: other regions faulting on the same page


class SpecialShare:
    """A SPECIAL|SHARE share-point: one shm object that several processes map,
    each with its own uffd over its own mapping.  A page copied in through any
    of them is in the object's page cache, so the others never fault on it:
    each page is fetched once.  Faults on a page being fetched wait for the
    same request (pending is shared by every region of the share).  It lives
    while some process maps it."""
    __slots__ = ("id", "identifier", "backing", "length", "prot", "chain", "message",
                 "regions", "pending", "owner_pid")

    def __init__(self, sid, identifier, backing, length, prot, chain, message, owner_pid):
        self.id = sid
        self.identifier = identifier
        self.backing = backing
        self.length = length
        self.prot = prot
        self.chain = chain
        self.message = message
        self.regions = set()
        self.pending = {}
        self.owner_pid = owner_pid


class Pager:
    def __init__(self, kernel):
        self.k = kernel
        self.chains = {}            # name -> Chain
        self.members = {}           # (ctx id, chain id) -> Member
        self.regions = {}           # region id -> Region
        self.by_uffd = {}           # fd -> Region
        self.by_efd = {}            # eventfd -> Member
        self.shares = {}            # identifier -> SpecialShare
        self._next_share = 1
        self._next_chain = 1
        self._next_region = 1
        self._next_backing = 1
        self._next_req = 1
        self._deadlines = []        # heap of (deadline, request id, Request)
        self._timerfd = -1
        self._armed_for = None
        self._faults = ffi.new("struct fayt_uffd_fault[32]")
        self._copied = ffi.new("uint64_t *")
        self._posted = set()        # members given a request since the last spin
        self._fast_res = ffi.new("struct fayt_fast_fault *")
        spin = kernel.cfg.get("pager_spin_us")
        if spin is None:            # spinning only pays where the server runs meanwhile
            spin = DEFAULT_SPIN_US if (os.cpu_count() or 1) > 1 else 0
        self.spin_ns = int(spin) * 1000
        self.default_timeout_ms = int(float(kernel.cfg.get("pager_timeout", DEFAULT_TIMEOUT_MS
                                                            / 1000.0)) * 1000)

    # -- chains ---------------------------------------------------------
    def join(self, ctx, name, nslots, run_max, flags, timeout_ms):
        chain = self.chains.get(name)
        if chain is not None and (ctx.id, chain.id) in self.members:
            raise KernelError(errno.EEXIST, "chain %r: this context serves it already" % name)
        for r in self.regions.values():
            if r.ctx is ctx and r.chain.name == name and not r.closed:
                raise KernelError(errno.EDEADLK, "chain %r: this context maps a SPECIAL portal "
                                  "of it; a fault there would wait on itself" % name)
        if chain is None:
            chain = Chain(self._next_chain, name, flags, timeout_ms or self.default_timeout_ms)
            self._next_chain += 1
            self.chains[name] = chain
        try:
            m = Member(ctx, chain, nslots, run_max, self.k.frames.tag)
        except BaseException:
            if not chain.members:
                del self.chains[name]
            raise
        chain.members.append(m)
        self.members[(ctx.id, chain.id)] = m
        self.by_efd[m.efd] = m
        # Edge-triggered: every eventfd write is an edge, so the counter need
        # not be read back (one system call less per answer).
        self.k.server.watch_fd(m.efd, self._on_answers, select.EPOLLIN | select.EPOLLET)
        log.debug("pid %d joined chain %r at %d", ctx.pid, name, len(chain.members) - 1)
        return m

    def leave(self, ctx, chain_id):
        for (cid, chid), m in list(self.members.items()):
            if cid == ctx.id and chid == chain_id:
                self._drop_member(m, errno.EPIPE, "left the chain")
                return
        raise KernelError(errno.ENOENT, "chain id %d: this context does not serve it" % chain_id)

    def _drop_member(self, m, err, why):
        chain = m.chain
        self.members.pop((m.ctx.id, chain.id), None)
        self.by_efd.pop(m.efd, None)
        self.k.server.unwatch_fd(m.efd)
        if m in chain.members:
            chain.members.remove(m)
        for req in list(m.inflight.values()) + m.backlog:
            if not req.done:
                log.info("chain %r: server pid %d %s with a request in flight: failed",
                         chain.name, m.ctx.pid, why)
                self._fail(req, err)
        m.inflight.clear()
        m.backlog = []
        for b in list(m.backings.values()):
            self._drop_backing(b)
        m.close()
        if not chain.members:
            self.chains.pop(chain.name, None)

    # -- backings (answers by reference) --------------------------------
    def _member(self, ctx, chain_id):
        m = self.members.get((ctx.id, chain_id))
        if m is None:
            raise KernelError(errno.EPERM, "chain id %d: this context does not serve it" % chain_id)
        return m

    def back(self, ctx, chain_id, handle, message):
        """Declare ctx's ANON portal `handle` the backing of its place in
        chain `chain_id` for `message`."""
        m = self._member(ctx, chain_id)
        mapping = ctx.mappings.get(handle)
        if mapping is None:
            raise KernelError(errno.EBADF, "handle: %d names no mapping of this context" % handle)
        if mapping.type != lib.FAYT_PORTAL_ANON:
            raise KernelError(errno.EINVAL, "handle: %d is a %s portal; a backing is an ANON "
                              "portal" % (handle, class_names(mapping.type)))
        if m.chain.flags & lib.FAYT_CHAIN_WRITE_REPORTS:
            raise KernelError(errno.EINVAL, "chain %r asks for write reports: its regions are "
                              "never answered by reference" % m.chain.name)
        if message in m.backings:
            raise KernelError(errno.EEXIST, "message %r: this server backs it already in chain "
                              "%r (unback it first)" % (_shown(message), m.chain.name))
        for other in self.members.values():
            for b in other.backings.values():
                if other.ctx is ctx and b.obj is mapping.backing:
                    raise KernelError(errno.EBUSY, "handle: %d backs message %r already (a "
                                      "portal backs one message)" % (handle, _shown(b.message)))
        b = Backing(self._next_backing, m, message, mapping.backing, handle)
        self._next_backing += 1
        self.k.frames.get(b.obj)
        b.charged, mapping.charged = mapping.charged, 0     # the backing holds the charge now
        m.backings[message] = b
        log.debug("chain %r: pid %d backs message %r with %d bytes (backing %d)",
                  m.chain.name, ctx.pid, _shown(message), b.length, b.id)
        return b

    def unback(self, ctx, chain_id, message):
        m = self._member(ctx, chain_id)
        b = m.backings.get(message)
        if b is None:
            raise KernelError(errno.ENOENT, "message %r: this server has no backing for it in "
                              "chain %r" % (_shown(message), m.chain.name))
        self._drop_backing(b)

    def _drop_backing(self, b):
        """No new region maps b; its charge goes back to the portal if the
        server still maps it, else off the context's quota."""
        if not b.live:
            return
        b.live = False
        m = b.member
        m.backings.pop(b.message, None)
        mapping = m.ctx.mappings.get(b.handle)
        if mapping is not None and mapping.backing is b.obj:
            mapping.charged += b.charged
        else:
            m.ctx.ram -= b.charged
        b.charged = 0
        self.k.frames.put(b.obj)
        log.debug("chain %r: pid %d unbacks message %r (backing %d); %d regions still map it",
                  m.chain.name, m.ctx.pid, _shown(b.message), b.id, b.regions)

    def backing_for(self, chain, message, length):
        """The backing a new region of (chain, message, length) maps, or None:
        the first server's in chain order with one for the message, if it is
        long enough and the chain has no write reports."""
        if chain.flags & lib.FAYT_CHAIN_WRITE_REPORTS:
            return None
        key = message or b""
        for m in chain.members:
            b = m.backings.get(key)
            if b is not None:
                return b if b.length >= length else None
        return None

    # -- regions --------------------------------------------------------
    def chain_for_region(self, ctx, chain_name):
        chain = self.chains.get(chain_name)
        if chain is None:
            raise KernelError(errno.ENOENT, "sp_req_chain.name: no server serves chain %r"
                              % chain_name)
        if (ctx.id, chain.id) in self.members:
            raise KernelError(errno.EDEADLK, "sp_req_chain.name: this context serves chain %r; "
                              "a fault in its own portal would wait on itself" % chain_name)
        return chain

    def special_share(self, ctx, ident, create, length):
        """The SPECIAL|SHARE share-point `ident` a portal attaches to (None
        when it creates one, which must not exist yet)."""
        if ident in self.shares or ident in self.k.sharepoints.by_name:
            self.k.catch_up(ctx)    # a destroy already sent by another process comes first
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
        k = self.k
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
            b = None
            if not share and _uffd_features(uffd) & _FEATURE_MINOR_SHMEM:
                b = self.backing_for(self.chain_for_region(ctx, chain.decode()), message, length)
                if b is not None:
                    grant.append(_open_read_only(b.obj))
            r = self.create_region(ctx, uffd, addr, length, chain.decode(), message, sh, b)
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

    def create_region(self, ctx, uffd, addr, length, chain_name, message, share=None,
                      backing=None):
        chain = self.chain_for_region(ctx, chain_name)
        r = Region(self._next_region, ctx, uffd, addr, length, chain, message,
                   bool(chain.flags & lib.FAYT_CHAIN_WRITE_REPORTS) and share is None)
        if share is not None:
            r.share = share
            r.pending = share.pending
            share.regions.add(r)
        if backing is not None:
            r.backing = backing
            backing.regions += 1
            self.k.frames.get(backing.obj)      # its frames live while this region maps them
        self._next_region += 1
        self.regions[r.id] = r
        self.by_uffd[uffd] = r
        self.k.server.watch_fd(uffd, self._on_faults)
        return r

    def close_region(self, r):
        if r.closed:
            return
        r.closed = True
        self.k.stats.region_closed(r)
        log.debug("region %d (chain %r) closed: %d faults, %d pages fetched (%d faults answered "
                  "in one call), %d mapped by reference, %d failed, %d write reports", r.id,
                  r.chain.name, r.faults, r.fetched, r.in_one_call, r.mapped, r.failed,
                  r.write_reports)
        for req in list(r.pending.values()):
            if r in req.waiters:
                req.waiters.remove(r)
            if req.region is not r:
                continue
            if req.waiters:                 # another process waits for it: keep it
                req.region = req.waiters.pop(0)
                continue
            req.done = True
            r.pending.pop(req.offset, None)
            self._cancel_slot(req)
        self.regions.pop(r.id, None)
        if r.share is not None:
            sh = r.share
            sh.regions.discard(r)
            if not sh.regions:
                self.shares.pop(sh.identifier, None)
                sh.backing.release()
        if r.backing is not None:
            r.backing.regions -= 1
            self.k.frames.put(r.backing.obj)
        self.by_uffd.pop(r.uffd, None)
        self.k.server.unwatch_fd(r.uffd)
        os.close(r.uffd)

    def unmap(self, ctx, m):
        r = self.regions.get(m.backing.region_id)
        if r is not None:
            self.close_region(r)

    def context_gone(self, ctx):
        for r in [r for r in self.regions.values() if r.ctx is ctx]:
            self.close_region(r)
        for m in [m for m in self.members.values() if m.ctx is ctx]:
            self._drop_member(m, errno.EPIPE, "died")

    def shutdown(self):
        for r in list(self.regions.values()):
            # Leave the pages as they are: the client's guard poisons what is
            # missing when it sees faytd gone.
            self.close_region(r)
        for m in list(self.members.values()):
            self._drop_member(m, errno.EPIPE, "shut down")
        for sh in list(self.shares.values()):
            sh.backing.release()
        self.shares.clear()
        if self._timerfd >= 0:
            self.k.server.unwatch_fd(self._timerfd)
            os.close(self._timerfd)
            self._timerfd = -1

    # -- faults ---------------------------------------------------------
    def _on_faults(self, fd, events):
        r = self.by_uffd.get(fd)
        if r is None:
            return
        buf = self._faults
        while True:
            n = lib.fayt_uffd_read(fd, buf, 32)
            if n < 0:
                log.warning("region %d: reading its userfaultfd: %s", r.id, os.strerror(-n))
                return self.close_region(r)
            for i in range(n):
                f = buf[i]
                off = (f.address - r.addr) & ~(PAGE - 1)
                if off < 0 or off >= r.length:
                    continue
                r.faults += 1
                same = r.pending.get(off)
                if same is not None:        # the same page is on its way
                    if same.region is not r and r not in same.waiters:
                        same.waiters.append(r)
                    continue
                if self.spin_ns and not r.wp and r.share is None and self._fast(r, off):
                    continue
                wp_fault = bool(f.flags & _FLAG_WP)
                write = wp_fault or (r.wp and f.flags & _FLAG_WRITE)
                req = Request(self._next_req, r, off,
                              lib.FAYT_ACCESS_WRITE if write else lib.FAYT_ACCESS_READ, wp_fault)
                self._next_req += 1
                r.pending[off] = req
                self._dispatch(req)
            if n < 32:
                return self._spin()

    def _fast(self, r, off):
        """A read fault while the chain's first server has nothing in flight:
        post, spin for the answer and copy it in one C call (no Python
        between the fault and the copy).  False if the normal path must take
        it; else the request is done, or handed to the normal path in the
        state the C call left it."""
        members = r.chain.members
        if not members:
            return False
        m = members[0]
        if m.inflight or m.backlog or not m.free or m.closed:
            return False
        slot = m.free[-1]
        rid = self._next_req
        self._next_req += 1
        res = self._fast_res
        msg = r.message or b""
        lib.fayt_pager_fault(m.ch, m.stride, slot, rid, off, m.run_max, r.chain.id, r.id,
                             r.ctx.pid, r.length, r.chain.name_bytes, msg, len(msg),
                             r.backing_of(m), r.uffd, r.addr, self.spin_ns, res)
        state = res.state
        if state == lib.FAYT_FAST_DONE:
            r.in_one_call += 1
            self._supplied(r, off, res.copied, res.copied, res.err, res.verdict,
                           wake_others=False)
            return True
        # The normal path from here: a Request in the slot, as _post leaves it.
        req = Request(rid, r, off, lib.FAYT_ACCESS_READ, False)
        req.member = m
        req.slot = m.free.pop()
        req.deadline = time.monotonic() + r.chain.timeout_ms / 1000.0
        r.pending[off] = req
        if state == lib.FAYT_FAST_POSTED:
            self._add_deadline(req)
            m.inflight[slot] = req
            self._reap(m)                   # an answer of another slot may be waiting
        elif state == lib.FAYT_FAST_FAILED:
            m.free.append(slot)
            log.warning("region %d: %s at %#x: %s", r.id, _IOCTL[res.verdict], off,
                        os.strerror(res.err))
            self._fail(req, res.err)
        else:                               # reaped, not DATA to copy
            self._add_deadline(req)
            self._answered(m, req, m.desc(slot), slot)
            m.free.append(slot)
        return True

    def _dispatch(self, req):
        chain = req.region.chain
        members = chain.members
        if req.hop >= len(members):
            return self._fail(req, errno.ENODATA if req.hop else errno.ENXIO)
        m = members[req.hop]
        req.member = m
        req.slot = -1
        req.deadline = time.monotonic() + chain.timeout_ms / 1000.0
        self._add_deadline(req)
        if not m.free:
            m.backlog.append(req)
            return
        self._post(m, req)

    def _post(self, m, req):
        slot = m.free.pop()
        r = req.region
        # One pack_into writes the whole descriptor (struct.pack pads the strings).
        backing = r.backing_of(m)
        PAGE_REQ.pack_into(
            m.map, lib.FAYT_PAGER_HEADER_SIZE + slot * m.stride,
            req.id, req.offset, PAGE,
            min(m.run_max, r.length - req.offset) if not req.present else 0,
            req.access, (lib.FAYT_PAGE_PRESENT if req.present else 0)
            | (lib.FAYT_PAGE_BACKED if backing else 0), req.hop, r.chain.id, r.id,
            r.ctx.pid, r.length, lib.FAYT_PAGE_PENDING, 0, 0, len(r.message or b""), backing,
            r.chain.name_bytes, r.message or b"")
        req.slot = slot
        m.inflight[slot] = req
        lib.fayt_pager_post(m.ch, slot)
        self._posted.add(m)

    # -- answers --------------------------------------------------------
    def _on_answers(self, fd, events):
        m = self.by_efd.get(fd)
        if m is None:
            return
        lib.fayt_pager_clear_rung(m.ch)
        self._reap(m)
        self._spin()

    def _spin(self):
        """Wait a few microseconds for the answers of requests just posted:
        a server that answers at once costs no trip through the loop."""
        while self._posted:
            m = self._posted.pop()
            if not m.closed and lib.fayt_pager_await(m.ch, self.spin_ns):
                self._reap(m)

    def _reap(self, m):
        while not m.closed:
            slot = lib.fayt_pager_reap(m.ch)
            if slot == -1:
                break
            if slot < 0 or slot not in m.inflight:
                log.warning("chain %r: server pid %d answered a slot it does not hold; "
                            "it leaves the chain", m.chain.name, m.ctx.pid)
                self._drop_member(m, errno.EPROTO, "broke the channel protocol")
                return
            req = m.inflight.pop(slot)
            d = m.desc(slot)
            if not req.done:
                self._answered(m, req, d, slot)
            m.free.append(slot)
        while m.backlog and m.free and not m.closed:
            self._post(m, m.backlog.pop(0))

    def _answered(self, m, req, d, slot):
        verdict = d.verdict
        if verdict == lib.FAYT_PAGE_DATA:
            self._supply(req, m, slot, d.answer_length)
        elif verdict == lib.FAYT_PAGE_MAPPED:
            self._map(req, m, d.answer_length)
        elif verdict == lib.FAYT_PAGE_FORWARD:
            req.hop += 1
            self._dispatch(req)
        else:
            err = d.error if verdict == lib.FAYT_PAGE_FAIL and d.error > 0 else errno.EIO
            self._fail(req, err)

    def _supply(self, req, m, slot, n):
        r = req.region
        if req.present:
            # A write report acknowledged: let the write go on.
            r.write_reports += 1
            self._finish(req)
            lib.fayt_uffd_writeprotect(r.uffd, r.addr + req.offset, PAGE, 0)
            return
        n = _run(n, m, r, req.offset)
        if n < PAGE:
            return self._fail(req, errno.ENODATA)
        wp = r.wp and req.access == lib.FAYT_ACCESS_READ
        err = lib.fayt_uffd_copy(r.uffd, r.addr + req.offset, m.data(slot), n,
                                 1 if wp else 0, self._copied)
        if err and self._copied[0] == 0 and err != errno.ENOENT:
            # Not even the faulting page went in: fail it (SIGBUS), never leave
            # the faulting thread asleep.
            log.warning("region %d: UFFDIO_COPY at %#x: %s", r.id, req.offset, os.strerror(err))
            return self._fail(req, err)
        self._finish(req)
        self._supplied(r, req.offset, n, self._copied[0], err, lib.FAYT_PAGE_DATA)
        if r.wp and req.access == lib.FAYT_ACCESS_WRITE:
            r.write_reports += 1

    def _map(self, req, m, n):
        """A MAPPED answer: the pages are in m's backing, which the region
        maps at the same offsets: UFFDIO_CONTINUE, no copy."""
        r = req.region
        if not r.backing_of(m):          # (a backed region has no write reports)
            log.warning("chain %r: server pid %d answered MAPPED for region %d, which does not "
                        "map its backing: a protocol error, request failed", r.chain.name,
                        m.ctx.pid, r.id)
            return self._fail(req, errno.EPROTO)
        n = _run(n, m, r, req.offset)
        if n < PAGE:
            return self._fail(req, errno.ENODATA)
        err = lib.fayt_uffd_continue(r.uffd, r.addr + req.offset, n, self._copied)
        if err and self._copied[0] == 0:
            # The backing lacks even the faulting page: SIGBUS, never zeros.
            log.warning("region %d: UFFDIO_CONTINUE at %#x: %s", r.id, req.offset,
                        os.strerror(err))
            return self._fail(req, err)
        self._finish(req)
        self._supplied(r, req.offset, n, self._copied[0], err, lib.FAYT_PAGE_MAPPED)

    def _supplied(self, r, off, n, count, err, verdict, wake_others=True):
        """A run of n bytes from off was answered and `count` bytes of it went
        in (copied or mapped): count them; the requests other faults made
        for the run's pages are done too (a page that did not go in faults
        again)."""
        r.fetched += count // PAGE
        if verdict == lib.FAYT_PAGE_MAPPED:
            r.mapped += count // PAGE
        if err:
            log.warning("region %d: %s at %#x stopped after %d bytes: %s", r.id,
                        _IOCTL[verdict], off, count, os.strerror(err))
        if not r.pending:
            return
        for o in range(off + PAGE, off + n, PAGE):
            other = r.pending.get(o)
            if other is not None and not other.present:
                self._finish(other, wake=wake_others and other.region is not r)
                self._cancel_slot(other)

    def _finish(self, req, wake=False):
        req.done = True
        req.region.pending.pop(req.offset, None)
        if wake:
            lib.fayt_uffd_wake(req.region.uffd, req.region.addr + req.offset, PAGE)
        for w in req.waiters:               # SPECIAL|SHARE: the page is in the object now
            if not w.closed:
                lib.fayt_uffd_wake(w.uffd, w.addr + req.offset, PAGE)

    def _cancel_slot(self, req):
        m = req.member
        if m is None or m.closed:
            return
        if req in m.backlog:
            m.backlog.remove(req)
        elif req.slot >= 0 and req.slot in m.inflight:
            m.desc(req.slot).flags |= lib.FAYT_PAGE_CANCELLED

    def _fail(self, req, err):
        if req.done:
            return
        r = req.region
        req.done = True
        r.pending.pop(req.offset, None)
        self._cancel_slot(req)
        if r.closed:
            return
        r.failed += 1
        if req.present:
            log.warning("region %d: a write report at %#x failed (%s); a present page cannot "
                        "be taken back, the write goes on", r.id, req.offset, os.strerror(err))
            lib.fayt_uffd_writeprotect(r.uffd, r.addr + req.offset, PAGE, 0)
            return
        log.info("region %d (chain %r): page at %#x failed: %s; the access gets SIGBUS",
                 r.id, r.chain.name, req.offset, os.strerror(err))
        for x in [r] + req.waiters:
            if x.closed:
                continue
            e = lib.fayt_uffd_poison(x.uffd, x.addr + req.offset, PAGE)
            if e:
                log.warning("region %d: UFFDIO_POISON: %s", x.id, os.strerror(e))

    # -- deadlines ------------------------------------------------------
    def _add_deadline(self, req):
        heapq.heappush(self._deadlines, (req.deadline, req.id, req))
        if self._armed_for is None or req.deadline < self._armed_for:
            self._arm(req.deadline)

    def _arm(self, when):
        if self._timerfd < 0:
            fd = lib.fayt_timerfd_open()
            if fd < 0:
                raise KernelError(-fd, "pager: timerfd_create: %s" % os.strerror(-fd))
            self._timerfd = fd
            self.k.server.watch_fd(fd, self._on_timer)
        self._armed_for = when
        lib.fayt_timerfd_arm(self._timerfd, max(1, int((when - time.monotonic()) * 1e9)))

    def _on_timer(self, fd, events):
        lib.fayt_timerfd_drain(fd)
        self._armed_for = None
        now = time.monotonic()
        h = self._deadlines
        while h and (h[0][2].done or h[0][0] <= now):
            deadline, _, req = heapq.heappop(h)
            if req.done:
                continue
            if req.deadline != deadline:
                continue        # forwarded since: a later deadline holds
            m = req.member
            log.info("chain %r: server pid %s silent for %d ms: request failed",
                     req.region.chain.name, m.ctx.pid if m else "?", req.region.chain.timeout_ms)
            self._fail(req, errno.ETIMEDOUT)
        if h:
            self._arm(h[0][0])

    # -- listing --------------------------------------------------------
    def describe(self):
        return [{"chain": c.name, "id": c.id, "servers": [m.ctx.pid for m in c.members],
                 "flags": c.flags, "timeout_ms": c.timeout_ms} for c in self.chains.values()]


def _run(n, m, r, off):
    """answer_length comes from the server: bound it by the slot and the
    region, whole pages only."""
    n = min(n, m.run_max, r.length - off)
    return n - n % PAGE


_IOCTL = {lib.FAYT_PAGE_DATA: "UFFDIO_COPY", lib.FAYT_PAGE_MAPPED: "UFFDIO_CONTINUE"}


def _shown(message):
    return message.decode("utf-8", "replace")


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


def _open_read_only(obj):
    """A read-only descriptor of a backing's object, for a client to map
    MAP_PRIVATE: nothing it does through it can change the server's memory."""
    try:
        return obj.open_fd(readonly=True)
    except KernelError as e:
        raise KernelError(e.errno, "faytd cannot open the chain server's backing: %s"
                          % e.message) from None
