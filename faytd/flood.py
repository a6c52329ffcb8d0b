"""Floods: a uid that is not core making calls as fast as faytd answers
while core contexts call too runs at a lower CPU priority until it stops
(docs/limits.md, "Floods").

faytd serves uids fairly (one request per uid a round: serve.c), but on a
machine with few CPUs the flooding processes also take the CPU the core
contexts need to make their calls: measured, that is most of what a flood
costs the owner.  A kernel's own work and its system servers come before
user processes; faytd can give them that much by making the flooders
nicer, as a scheduler would.

Every CHECK_S while a non-core context is connected, faytd reads each
connection's request count (struct fayt_fast_conn.requests, counted in
C whichever path served the request).  A uid that made more than
flood_calls_per_s calls a second in a window in which core contexts made
calls is flooding: every thread of its connected processes gets nice
flood_nice, unless it is nicer already (faytd never raises a priority),
and only those threads whose real and effective uid are the flooding
uid's (the pid a context names is the one SO_PEERCRED gave at connect:
that process may be gone and its pid reused by another uid's).
A uid that stopped flooding for QUIET_WINDOWS windows in a row gets its
threads' nice values back, each only if it is the same thread (its uid and
its start time: a tid is reused) and still at the value faytd set (a
scheduler or the process itself may have changed it since).  Lowering
another uid's priority needs CAP_SYS_NICE: a faytd without it logs once
and leaves floods alone.  Nothing is left behind when faytd stops: the
values are given back at close().
"""
import errno
import logging
import os

from .frames import KernelError, start_time
from .native import lib as clib
from .sched import _tids

log = logging.getLogger("faytd")

CHECK_S = 0.02          # a window
QUIET_WINDOWS = 50      # windows without a flood (1 s) before a uid's nice values come back


def _uids(tid):
    """(real, effective) uid of thread tid, or None if it is gone."""
    try:
        with open("/proc/%d/status" % tid, "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    real, eff = line.split()[1:3]
                    return int(real), int(eff)
    except (OSError, ValueError):
        pass
    return None


class FloodGuard:
    def __init__(self, kernel, server):
        """server: the event loop (its watch_fd/unwatch_fd for the timerfd)."""
        self.k = kernel
        self.nice = kernel.cfg["flood_nice"]
        self.rate = kernel.cfg["flood_calls_per_s"]
        self.seen = {}          # context id -> its request count at the last window
        self.departed = {}      # uid -> calls of its contexts that left during this window
        self.departed_pids = {}     # uid -> the processes of those contexts
        self.core_seen = kernel.fast.fair_core_requests
        self.demoted = {}       # uid -> {tid: (the nice it had, its start time)}
        self.quiet = {}         # uid -> windows in a row without a flood
        self.demotions = 0      # uids demoted, in all
        self._denied = False    # a renice was refused (no CAP_SYS_NICE): said once
        self._fd = -1
        self._armed = False
        self.server = server

    # -- the timer -----------------------------------------------------------
    def connected(self, ctx):
        """A context connected: watch for floods while non-core ones are."""
        if self.nice is None or ctx.is_core or self._armed:
            return
        if self._fd < 0:
            fd = clib.fayt_timerfd_open()
            if fd < 0:
                log.warning("flood guard: timerfd_create: %s", os.strerror(-fd))
                self.nice = None
                return
            self._fd = fd
            self.server.watch_fd(fd, self._on_timer)
        self.core_seen = self.k.fast.fair_core_requests
        self.seen = {c.id: c.fast.requests for c in self._connected()}
        self.departed, self.departed_pids = {}, {}
        clib.fayt_timerfd_arm(self._fd, int(CHECK_S * 1e9))
        self._armed = True

    def disconnected(self, ctx):
        """ctx's connection closed: its calls of this window still count
        (a flood of connect/HELLO/close makes contexts that live less than
        a window)."""
        if self._armed and not ctx.is_core:
            n = (ctx.fast.requests - self.seen.pop(ctx.id, 0)) & 0xffffffff
            self.departed[ctx.uid] = self.departed.get(ctx.uid, 0) + n
            self.departed_pids.setdefault(ctx.uid, set()).add(ctx.pid)

    def _connected(self):
        return [c for c in self.k.contexts.values()
                if c.sock is not None and not c.is_core and c.alive]

    def _on_timer(self, fd, events):
        clib.fayt_timerfd_drain(fd)
        self._armed = False
        core = self.k.fast.fair_core_requests
        core_active = core != self.core_seen
        self.core_seen = core
        calls, pids, seen = self.departed, self.departed_pids, {}
        self.departed, self.departed_pids = {}, {}
        for c in self._connected():
            n = c.fast.requests
            seen[c.id] = n
            calls[c.uid] = calls.get(c.uid, 0) + ((n - self.seen.get(c.id, 0)) & 0xffffffff)
            pids.setdefault(c.uid, set()).add(c.pid)
        self.seen = seen
        limit = self.rate * CHECK_S
        for uid, n in calls.items():
            if core_active and n > limit and uid in pids:
                self.quiet[uid] = 0
                self._demote(uid, pids[uid], n)
        for uid in list(self.demoted):
            if core_active and calls.get(uid, 0) > limit:
                continue
            self.quiet[uid] = self.quiet.get(uid, 0) + 1
            if self.quiet[uid] >= QUIET_WINDOWS or uid not in calls:
                self._restore(uid)
        if seen or self.demoted:
            clib.fayt_timerfd_arm(fd, int(CHECK_S * 1e9))
            self._armed = True

    # -- demoting and restoring ------------------------------------------------
    def _demote(self, uid, pids, n):
        had = self.demoted.get(uid)
        first = had is None
        if first:
            had = self.demoted[uid] = {}
        for pid in pids:
            try:
                tids = _tids(pid)
            except KernelError:
                continue                    # gone
            for tid in tids:
                if tid in had:
                    continue
                try:
                    now = os.getpriority(os.PRIO_PROCESS, tid)
                    if now >= self.nice:
                        continue            # nicer already: left as it is
                    # A context's pid is the one SO_PEERCRED named at connect:
                    # its process may be gone and the pid reused by anyone's
                    # process (or the process exec'd a set-uid program).  Only
                    # the flooding uid's own threads are ever reniced.
                    if _uids(tid) != (uid, uid):
                        continue
                    start = start_time(tid)
                    if start is None:
                        continue            # gone
                    os.setpriority(os.PRIO_PROCESS, tid, self.nice)
                except OSError as e:
                    if e.errno in (errno.EPERM, errno.EACCES) and not self._denied:
                        self._denied = True
                        log.warning("flood guard: uid %d floods faytd, but faytd may not "
                                    "renice its processes (%s): left alone", uid, e.strerror)
                    continue
                had[tid] = (now, start)
        if first:
            if had:
                self.demotions += 1
                log.info("uid %d floods faytd (%d calls in %.1fs while core contexts called): "
                         "its %d thread(s) run at nice %d until it stops", uid, n, CHECK_S,
                         len(had), self.nice)
            else:
                del self.demoted[uid]

    def _restore(self, uid):
        had = self.demoted.pop(uid, {})
        self.quiet.pop(uid, None)
        for tid, (nice, start) in had.items():
            # The same thread (its start time: a tid is reused) of the same
            # uid, still at the value faytd set: never raise the priority of
            # another process.
            if _uids(tid) != (uid, uid):
                continue                    # gone, or its tid is another uid's now
            try:
                if start_time(tid) == start and \
                        os.getpriority(os.PRIO_PROCESS, tid) == self.nice:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
            except OSError:
                pass                        # gone: nothing to give back
        if had:
            log.info("uid %d stopped flooding faytd: its nice values are back", uid)

    def stats(self):
        return {"flood_nice": self.nice, "demoted_uids": sorted(self.demoted),
                "demotions": self.demotions}

    def close(self):
        for uid in list(self.demoted):
            self._restore(uid)
        if self._fd >= 0:
            self.server.unwatch_fd(self._fd)
            os.close(self._fd)
            self._fd = -1
