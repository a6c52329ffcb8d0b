"""Chains: the servers that supply the pages of SPECIAL portals, in order.

- Chain: a name, and its servers in the order they joined.  Serving a chain
  is a right (policy category "chains", globs of chain names; checked by the
  syscall layer).  The first server to join sets the chain's flags (write
  reports) and timeout; the chain goes away with its last server.
- Member: one server's place in a chain, with its channel (pager.h): a shm
  object of slots, two rings of slot numbers, a futex doorbell towards the
  server and an eventfd towards faytd.  A request costs no system call to
  faytd; a server answers a run of pages in one slot (prefetch).  Python
  makes the channel and maps it; the fault engine (faults.py, in C) posts
  into it and reaps it, and trusts nothing the server writes there.
- Backing: a server's ANON portal declared for a message (CHAIN_BACK), from
  which requests for that message may be answered by reference (MAPPED).
  It holds a reference to the portal's frames (and the portal's RAM charge)
  from CHAIN_BACK until CHAIN_UNBACK, the server's leaving or death, the
  server's own unmap notwithstanding; each region that maps it holds one
  more reference (regions.py), so its frames live while some client maps
  them.  A portal backs one message at a time.  A chain with write reports
  has no backings: its regions are never answered by reference.

A server that leaves or dies fails the requests it holds (the fault
engine: the accesses get SIGBUS, or go to no one else).  A chain server may not map a
SPECIAL portal of a chain it serves, nor join a chain it maps a portal of
(EDEADLK): its own fault would wait for itself.
"""
import errno
import logging
import os

from libportal._abi import lib

from .frames import BackingObject, KernelError
from .native import ffi, lib as clib
from .policy import class_names

log = logging.getLogger("faytd")

DEFAULT_TIMEOUT_MS = 10000
# struct fayt_fault_counts' fields a chain sums over its regions (INFO)
DONE_COUNTS = ("faults", "fetched", "mapped", "failed", "write_reports", "in_one_call")


class Chain:
    __slots__ = ("id", "name", "name_bytes", "members", "flags", "timeout_ms", "done")

    def __init__(self, cid, name, flags, timeout_ms):
        self.id = cid
        self.name = name
        self.name_bytes = name.encode()
        self.members = []
        self.flags = flags
        self.timeout_ms = timeout_ms
        self.done = dict.fromkeys(DONE_COUNTS, 0)  # the fault counts of its closed regions


class Member:
    """A server's place in a chain and its channel: the fault engine posts
    into it and reaps it (it knows the member by its eventfd) until
    FaultEngine.del_member; then Python unmaps it."""
    __slots__ = ("ctx", "chain", "backing", "map", "ch", "efd", "nslots", "run_max", "closed",
                 "backings")

    def __init__(self, ctx, chain, nslots, run_max, tag):
        self.ctx = ctx
        self.chain = chain
        self.nslots = nslots
        self.run_max = run_max
        size = clib.fayt_pager_bytes(nslots, run_max)
        self.backing = BackingObject(0, tag + ".chain", size, [])
        self.map = self.backing.map(size)
        self.ch = ffi.from_buffer(self.map)
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.closed = False
        self.backings = {}          # message -> Backing (answers by reference)

    def close(self):
        if self.closed:
            return
        self.closed = True
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


def shown(message):
    return message.decode("utf-8", "replace")


class Chains:
    """The chains by name, their members by (context id, chain id) and by
    eventfd, and the members' backings."""

    def __init__(self, pager):
        self.p = pager
        self.by_name = {}           # name -> Chain
        self.members = {}           # (ctx id, chain id) -> Member
        self.by_efd = {}            # eventfd -> Member
        self._next_chain = 1
        self._next_backing = 1
        self.default_timeout_ms = int(float(pager.k.cfg.get(
            "pager_timeout", DEFAULT_TIMEOUT_MS / 1000.0)) * 1000)

    def join(self, ctx, name, nslots, run_max, flags, timeout_ms):
        k = self.p.k
        chain = self.by_name.get(name)
        if chain is not None and (ctx.id, chain.id) in self.members:
            raise KernelError(errno.EEXIST, "chain %r: this context serves it already" % name)
        if self.p.regions.maps_chain(ctx, name):
            raise KernelError(errno.EDEADLK, "chain %r: this context maps a SPECIAL portal "
                              "of it; a fault there would wait on itself" % name)
        faults = self.p.faults
        if chain is None:
            chain = Chain(self._next_chain, name, flags, timeout_ms or self.default_timeout_ms)
            faults.add_chain(chain)
            self._next_chain += 1
            self.by_name[name] = chain
        m = None
        try:
            m = Member(ctx, chain, nslots, run_max, k.frames.tag)
            faults.add_member(m)
        except BaseException:
            if m is not None:
                m.close()
            if not chain.members:
                del self.by_name[name]
                faults.del_chain(chain)
            raise
        chain.members.append(m)
        self.members[(ctx.id, chain.id)] = m
        self.by_efd[m.efd] = m
        log.debug("pid %d joined chain %r at %d", ctx.pid, name, len(chain.members) - 1)
        return m

    def leave(self, ctx, chain_id):
        for (cid, chid), m in list(self.members.items()):
            if cid == ctx.id and chid == chain_id:
                self.drop_member(m, errno.EPIPE, "left the chain")
                return
        raise KernelError(errno.ENOENT, "chain id %d: this context does not serve it" % chain_id)

    def drop_member(self, m, err, why):
        """m leaves its chain: the fault engine fails the requests it holds
        with err (logging each with `why`) and closes its channel."""
        chain = m.chain
        if self.members.get((m.ctx.id, chain.id)) is m:
            del self.members[(m.ctx.id, chain.id)]
        if self.by_efd.pop(m.efd, None) is None:
            return                  # dropped already
        if m in chain.members:
            chain.members.remove(m)
        self.p.faults.del_member(m, err, why)
        for b in list(m.backings.values()):
            self.drop_backing(b)
        m.close()
        if not chain.members and self.by_name.get(chain.name) is chain:
            del self.by_name[chain.name]
            self.p.faults.del_chain(chain)

    def context_gone(self, ctx):
        for m in [m for m in self.members.values() if m.ctx is ctx]:
            self.drop_member(m, errno.EPIPE, "died")

    def shutdown(self):
        for m in list(self.members.values()):
            self.drop_member(m, errno.EPIPE, "shut down")

    def for_region(self, ctx, chain_name):
        """The chain a new SPECIAL portal of ctx is served by."""
        chain = self.by_name.get(chain_name)
        if chain is None:
            raise KernelError(errno.ENOENT, "sp_req_chain.name: no server serves chain %r"
                              % chain_name)
        if (ctx.id, chain.id) in self.members:
            raise KernelError(errno.EDEADLK, "sp_req_chain.name: this context serves chain %r; "
                              "a fault in its own portal would wait on itself" % chain_name)
        return chain

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
                              "%r (unback it first)" % (shown(message), m.chain.name))
        for other in self.members.values():
            for b in other.backings.values():
                if other.ctx is ctx and b.obj is mapping.backing:
                    raise KernelError(errno.EBUSY, "handle: %d backs message %r already (a "
                                      "portal backs one message)" % (handle, shown(b.message)))
        b = Backing(self._next_backing, m, message, mapping.backing, handle)
        self._next_backing += 1
        self.p.k.frames.get(b.obj)
        b.charged, mapping.charged = mapping.charged, 0     # the backing holds the charge now
        m.backings[message] = b
        log.debug("chain %r: pid %d backs message %r with %d bytes (backing %d)",
                  m.chain.name, ctx.pid, shown(message), b.length, b.id)
        return b

    def unback(self, ctx, chain_id, message):
        m = self._member(ctx, chain_id)
        b = m.backings.get(message)
        if b is None:
            raise KernelError(errno.ENOENT, "message %r: this server has no backing for it in "
                              "chain %r" % (shown(message), m.chain.name))
        self.drop_backing(b)

    def drop_backing(self, b):
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
        self.p.k.frames.put(b.obj)
        log.debug("chain %r: pid %d unbacks message %r (backing %d); %d regions still map it",
                  m.chain.name, m.ctx.pid, shown(b.message), b.id, b.regions)

    @staticmethod
    def backing_for(chain, message, length):
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
