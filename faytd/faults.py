"""The fault engine: faults read from the clients' userfaultfds, requests
posted to chain servers, their answers put in, deadlines.

Linux facts it relies on:
- A thread that touches a page of a SPECIAL region not yet supplied sleeps
  in the Linux kernel until faytd resolves the fault with UFFDIO_COPY (the
  data), UFFDIO_CONTINUE (a page of the chain server's backing, mapped: an
  answer by reference), UFFDIO_POISON (the access gets SIGBUS) or, in
  write-protect mode, UFFDIO_WRITEPROTECT (the write goes on).
- The userfaultfd is non-blocking and pollable: faytd's loop watches it (and
  each member's eventfd, and one timerfd for the deadlines) like any other
  fd.  A server rings the eventfd when it answers; a request just posted is
  awaited a few microseconds first (spin_ns), so that a server that answers
  at once costs no trip through the loop, and a read fault while the
  chain's first server has nothing in flight is posted, awaited and copied
  in one C call (_fast).

A request goes to the chain's servers in order (FORWARD moves it on) in a
free slot of the member's channel, or waits in its backlog.  Failure: a
failed request, a chain that runs out of servers, a server that dies or
stays silent past the chain's timeout: the page is poisoned, so the access
gets SIGBUS, never zeros.  A failed write report cannot take a page back;
it is logged and the write goes on.  A client that dies (or unmaps) has its
requests cancelled (regions.py).  A server that answers a slot it does not
hold breaks the protocol and leaves the chain; a MAPPED answer for a region
that does not map its backing fails the request (EPROTO).
"""
import errno
import heapq
import logging
import os
import time

from libportal._abi import ffi, lib, PAGE_REQUEST as PAGE_REQ

from .frames import KernelError, PAGE
from .regions import ANSWERED, FAILED, POSTED, QUEUED, Request

log = logging.getLogger("faytd")

_FLAG_WRITE = 1      # UFFD_PAGEFAULT_FLAG_WRITE
_FLAG_WP = 2         # UFFD_PAGEFAULT_FLAG_WP
# (UFFD_PAGEFAULT_FLAG_MINOR, 4, is not looked at: a minor fault is a read fault here.)
DEFAULT_SPIN_US = 50


class FaultEngine:
    def __init__(self, pager):
        self.p = pager
        self._next_req = 1
        self._deadlines = []        # heap of (deadline, request id, Request)
        self._timerfd = -1
        self._armed_for = None
        self._faults = ffi.new("struct fayt_uffd_fault[32]")
        self._copied = ffi.new("uint64_t *")
        self._posted = set()        # members given a request since the last spin
        self._fast_res = ffi.new("struct fayt_fast_fault *")
        spin = pager.k.cfg.get("pager_spin_us")
        if spin is None:            # spinning only pays where the server runs meanwhile
            spin = DEFAULT_SPIN_US if (os.cpu_count() or 1) > 1 else 0
        self.spin_ns = int(spin) * 1000

    # -- faults ---------------------------------------------------------
    def on_faults(self, fd, events):
        r = self.p.regions.by_uffd.get(fd)
        if r is None:
            return
        buf = self._faults
        while True:
            n = lib.fayt_uffd_read(fd, buf, 32)
            if n < 0:
                log.warning("region %d: reading its userfaultfd: %s", r.id, os.strerror(-n))
                return self.p.regions.close(r)
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
        m.free.pop()
        req.deadline = time.monotonic() + r.chain.timeout_ms / 1000.0
        r.pending[off] = req
        if state == lib.FAYT_FAST_POSTED:
            req.state, req.slot = POSTED, slot
            self._add_deadline(req)
            m.inflight[slot] = req
            self._reap(m)                   # an answer of another slot may be waiting
        elif state == lib.FAYT_FAST_FAILED:
            m.free.append(slot)
            log.warning("region %d: %s at %#x: %s", r.id, _IOCTL[res.verdict], off,
                        os.strerror(res.err))
            self.fail(req, res.err)
        else:                               # reaped, not DATA to copy
            req.state, req.slot = POSTED, slot
            self._add_deadline(req)
            self._answered(m, req, m.desc(slot), slot)
            m.free.append(slot)
        return True

    def _dispatch(self, req):
        chain = req.region.chain
        members = chain.members
        if req.hop >= len(members):
            return self.fail(req, errno.ENODATA if req.hop else errno.ENXIO)
        m = members[req.hop]
        req.member = m
        req.deadline = time.monotonic() + chain.timeout_ms / 1000.0
        self._add_deadline(req)
        if not m.free:
            req.state = QUEUED
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
        req.state, req.slot = POSTED, slot
        m.inflight[slot] = req
        lib.fayt_pager_post(m.ch, slot)
        self._posted.add(m)

    # -- answers --------------------------------------------------------
    def on_answers(self, fd, events):
        m = self.p.chains.by_efd.get(fd)
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
                self.p.chains.drop_member(m, errno.EPROTO, "broke the channel protocol")
                return
            req = m.inflight.pop(slot)
            d = m.desc(slot)
            if not req.over:
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
            self.fail(req, err)

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
            return self.fail(req, errno.ENODATA)
        wp = r.wp and req.access == lib.FAYT_ACCESS_READ
        err = lib.fayt_uffd_copy(r.uffd, r.addr + req.offset, m.data(slot), n,
                                 1 if wp else 0, self._copied)
        if err and self._copied[0] == 0 and err != errno.ENOENT:
            # Not even the faulting page went in: fail it (SIGBUS), never leave
            # the faulting thread asleep.
            log.warning("region %d: UFFDIO_COPY at %#x: %s", r.id, req.offset, os.strerror(err))
            return self.fail(req, err)
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
            return self.fail(req, errno.EPROTO)
        n = _run(n, m, r, req.offset)
        if n < PAGE:
            return self.fail(req, errno.ENODATA)
        err = lib.fayt_uffd_continue(r.uffd, r.addr + req.offset, n, self._copied)
        if err and self._copied[0] == 0:
            # The backing lacks even the faulting page: SIGBUS, never zeros.
            log.warning("region %d: UFFDIO_CONTINUE at %#x: %s", r.id, req.offset,
                        os.strerror(err))
            return self.fail(req, err)
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
                self.cancel_slot(other)
                self._finish(other, wake=wake_others and other.region is not r)

    def _finish(self, req, wake=False):
        req.state = ANSWERED
        req.region.pending.pop(req.offset, None)
        if wake:
            lib.fayt_uffd_wake(req.region.uffd, req.region.addr + req.offset, PAGE)
        for w in req.waiters:               # SPECIAL|SHARE: the page is in the object now
            if not w.closed:
                lib.fayt_uffd_wake(w.uffd, w.addr + req.offset, PAGE)

    @staticmethod
    def cancel_slot(req):
        """Take req off its member: out of the backlog, or its slot marked
        cancelled (the server's answer, when it comes, is dropped)."""
        m = req.member
        if m is None or m.closed:
            return
        if req.state is QUEUED:
            m.backlog.remove(req)
        elif req.state is POSTED and m.inflight.get(req.slot) is req:
            m.desc(req.slot).flags |= lib.FAYT_PAGE_CANCELLED

    def fail(self, req, err):
        if req.over:
            return
        r = req.region
        self.cancel_slot(req)
        req.state = FAILED
        r.pending.pop(req.offset, None)
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
            self.p.k.server.watch_fd(fd, self._on_timer)
        self._armed_for = when
        lib.fayt_timerfd_arm(self._timerfd, max(1, int((when - time.monotonic()) * 1e9)))

    def _on_timer(self, fd, events):
        lib.fayt_timerfd_drain(fd)
        self._armed_for = None
        now = time.monotonic()
        h = self._deadlines
        while h and (h[0][2].over or h[0][0] <= now):
            deadline, _, req = heapq.heappop(h)
            if req.over:
                continue
            if req.deadline != deadline:
                continue        # forwarded since: a later deadline holds
            m = req.member
            log.info("chain %r: server pid %s silent for %d ms: request failed",
                     req.region.chain.name, m.ctx.pid if m else "?", req.region.chain.timeout_ms)
            self.fail(req, errno.ETIMEDOUT)
        if h:
            self._arm(h[0][0])

    def shutdown(self):
        if self._timerfd >= 0:
            self.p.k.server.unwatch_fd(self._timerfd)
            os.close(self._timerfd)
            self._timerfd = -1


def _run(n, m, r, off):
    """answer_length comes from the server: bound it by the slot and the
    region, whole pages only."""
    n = min(n, m.run_max, r.length - off)
    return n - n % PAGE


_IOCTL = {lib.FAYT_PAGE_DATA: "UFFDIO_COPY", lib.FAYT_PAGE_MAPPED: "UFFDIO_CONTINUE"}
