"""The fault engine: faytd's C (faytd/core/fault.c, declared in
faytd/core/fault.h), configured from here.

A SPECIAL fault that a chain server answers runs no Python in faytd: the
engine's fds (each region's userfaultfd, each member's answer eventfd, one
timerfd for the deadlines) are watched by faytd's loop like any other fd,
and fayt_fast_poll, faytd's wait in C, hands their events to the engine
there.  It reads the faults, posts a request per page into the chain's
first server's channel (a second fault on a page being fetched waits for
the same request; the regions of a SPECIAL|SHARE share their requests),
spins a few microseconds for the answer (pager_spin_us) so that a server
that answers at once costs no trip through the loop, reaps the answers,
reads each field the server wrote once and checks it, and resolves the
fault:
- DATA: UFFDIO_COPY of the run (bounded by the slot and the region, whole
  pages; copied write-protected in a region with write reports);
- MAPPED, from the server whose backing the region maps: UFFDIO_CONTINUE
  (no copy); from any other, a protocol error (EPROTO, SIGBUS);
- FORWARD: the next server of the chain;
- FAIL (its errno), or anything else (EIO): UFFDIO_POISON, the access gets
  SIGBUS, never zeros; so does a chain that runs out of servers (ENXIO at
  the first, ENODATA after), a server that dies or stays silent past the
  chain's timeout (ETIMEDOUT).  A failed write report cannot take a page
  back: it is logged and the write goes on.
A server that answers a slot it does not hold broke the channel protocol:
the engine fails what it holds (EPROTO) and has Python drop it.  Requests
have an explicit state in C (enum req_state: NEW, BACKLOG, POSTED, DONE).

Python makes and ends the objects (chains.py, regions.py call this), and
acts on what the engine queues for it, told by the engine's eventfd: log
lines (so faytd's log reads as before), a member to drop, a region to
close.  An engine fd that reaches Python's loop anyway (a catch-up took its
event from epoll) is handed to the engine (counted: py_events).  The
engine's counters: totals here (counts()), per region (Region.counts()).
"""
import logging
import os
import select

from .frames import KernelError
from .native import core, ffi, lib

log = logging.getLogger("faytd")

DEFAULT_SPIN_US = 50


class FaultEngine:
    def __init__(self, pager):
        self.p = pager
        spin = pager.k.cfg.get("pager_spin_us")
        if spin is None:            # spinning only pays where the server runs meanwhile
            spin = DEFAULT_SPIN_US if (os.cpu_count() or 1) > 1 else 0
        self.spin_ns = int(spin) * 1000
        if core.faults:             # one engine per process
            lib.fayt_faults_fini(core)
        err = lib.fayt_faults_init(core, self.spin_ns)
        if err:
            raise KernelError(err, "pager: the fault engine: %s" % os.strerror(err))
        self.e = core.faults
        self._watching = False
        self._events = ffi.new("struct fayt_fault_event[64]")

    def _watch(self):
        """The engine's eventfd (events for Python) and timerfd, watched
        once faytd's loop exists (the first chain or region)."""
        if not self._watching:
            self._watching = True
            server = self.p.k.server
            server.watch_fd(self.e.notify_fd, self._on_notify)
            server.watch_fd(self.e.timer_fd, self.on_engine_fd)

    # -- configuration --------------------------------------------------
    def add_chain(self, chain):
        err = lib.fayt_fault_chain_add(core, chain.id, chain.name_bytes, chain.flags,
                                       chain.timeout_ms)
        if err:
            raise KernelError(err, "chain %r: the fault engine: %s" % (chain.name,
                                                                        os.strerror(err)))

    def del_chain(self, chain):
        lib.fayt_fault_chain_del(core, chain.id)

    def add_member(self, m):
        """m's channel (initialised here) and eventfd join its chain, last."""
        self._watch()
        err = lib.fayt_fault_member_add(core, m.chain.id, m.ch, m.nslots, m.run_max, m.efd,
                                        m.ctx.pid)
        if err:
            raise KernelError(err, "chain %r: the fault engine: %s" % (m.chain.name,
                                                                        os.strerror(err)))
        # Edge-triggered: every eventfd write is an edge, so the counter need
        # not be read back (one system call less per answer).
        self.p.k.server.watch_fd(m.efd, self.on_engine_fd, select.EPOLLIN | select.EPOLLET)

    def del_member(self, m, err, why):
        """m leaves: what it holds fails with err (each logged with `why`),
        its channel is closed; the caller then unmaps it."""
        self.p.k.server.unwatch_fd(m.efd)
        lib.fayt_fault_member_del(core, m.efd, err, why.encode())
        self.drain()

    def add_region(self, r, share_id, backing):
        self._watch()
        msg = r.message or b""
        err = lib.fayt_fault_region_add(core, r.uffd, r.id, r.addr, r.length, r.chain.id, msg,
                                        len(msg), 1 if r.wp else 0, share_id, r.ctx.pid,
                                        backing.member.efd if backing is not None else 0,
                                        backing.id if backing is not None else 0)
        if err:
            raise KernelError(err, "region: the fault engine: %s" % os.strerror(err))
        self.p.k.server.watch_fd(r.uffd, self.on_engine_fd)

    def del_region(self, r):
        """r's requests are cancelled (one another region of its share waits
        for is handed to that region); the caller closes its uffd."""
        self.p.k.server.unwatch_fd(r.uffd)
        lib.fayt_fault_region_del(core, r.uffd)
        self.drain()

    def region_counts(self, r):
        out = ffi.new("struct fayt_fault_counts *")
        lib.fayt_fault_region_counts(core, r.uffd, out)
        return out

    def counts(self):
        """The engine's totals (closed regions included), and where its
        events were served."""
        names = ("faults", "fetched", "mapped", "failed", "write_reports", "in_one_call",
                 "requests", "events_in_c", "events_in_python")
        e = self.e
        if e is None:               # after shutdown
            return dict.fromkeys(names, 0)
        t = e.total
        return dict(zip(names, (t.faults, t.fetched, t.mapped, t.failed, t.write_reports,
                                t.in_one_call, e.requests, e.c_events, e.py_events)))

    # -- the engine's fds, when Python has them --------------------------
    def on_engine_fd(self, fd, events):
        self.e.py_events += 1
        lib.fayt_faults_event(core, fd, events)
        self.drain()

    def _on_notify(self, fd, events):
        self.drain()

    def drain(self):
        """Act on what the engine queued: log lines, members to drop (a
        protocol error), regions to close (their uffd failed)."""
        buf = self._events
        while self.e is not None and self.e.nevents:
            n = lib.fayt_faults_drain(core, buf, 64)
            for i in range(n):
                ev = buf[i]
                text = ffi.string(ev.text).decode("utf-8", "replace")
                if ev.kind == lib.FAYT_FAULT_EV_LOG:
                    log.log(ev.level, "%s", text)
                elif ev.kind == lib.FAYT_FAULT_EV_DROP:
                    m = self.p.chains.by_efd.get(ev.fd)
                    if m is not None:
                        self.p.chains.drop_member(m, ev.err, text)
                elif ev.kind == lib.FAYT_FAULT_EV_TRACE:
                    self.p.k.tracing.fault_line(text)
                elif ev.kind == lib.FAYT_FAULT_EV_CLOSE:
                    r = self.p.regions.by_uffd.get(ev.fd)
                    if r is not None:
                        self.p.regions.close(r)
            if n == 0:
                break
        if self.e is not None and self.e.lost_events:
            log.warning("pager: %d of the fault engine's log lines were lost (its queue was "
                        "full)", self.e.lost_events)
            self.e.lost_events = 0

    def set_trace(self, on):
        """Queue the timeline trace's lines (faytd/trace.py) or not."""
        if self.e is not None:
            self.e.trace = 1 if on else 0

    def shutdown(self):
        c = self.counts()
        log.info("pager: %d faults, %d pages fetched (%d faults answered in one call), %d "
                 "mapped by reference, %d failed, %d write reports; engine events: %d in C, "
                 "%d through Python", c["faults"], c["fetched"], c["in_one_call"], c["mapped"],
                 c["failed"], c["write_reports"], c["events_in_c"], c["events_in_python"])
        if self._watching:
            self.p.k.server.unwatch_fd(self.e.notify_fd)
            self.p.k.server.unwatch_fd(self.e.timer_fd)
            self._watching = False
        self.drain()
        lib.fayt_faults_fini(core)
        self.e = None
