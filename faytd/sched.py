"""Scheduling: the decisions a scheduler server sends through its queue,
enforced on the real processes (docs/scheduling.md).

Linux facts it relies on:
- sched_setaffinity(2) and setpriority(PRIO_PROCESS) act on one thread (a
  tid), not on a process: faytd applies a decision to every thread listed
  in /proc/<pid>/task.  A thread made after the decision inherits it from
  the thread that made it.
- Linux checks faytd's own privileges: another uid's process needs
  CAP_SYS_NICE (affinity, nice) or CAP_KILL (signals), and lowering a
  nice value (raising the priority) needs CAP_SYS_NICE or RLIMIT_NICE.
  Linux's EPERM is the decision's result: never a silent no-op.
- SIGSTOP stops every thread of a process and cannot be caught; SIGCONT
  continues it, and any process of the same uid may send it.  Nothing
  tells a non-parent that a process was continued, so faytd looks at the
  parked processes' state (/proc/<pid>/stat) every PARK_CHECK_S and stops
  again one that was continued behind its back (counted, logged).
- A process stopped while it holds a share-point lock would wedge every
  other locker.  Its robust records (the context page, context.h) say
  which locks it holds or is taking; faytd parks a context only when it
  records none: it stops it, reads the records again (a stopped process
  writes nothing), and continues it at once if it took a lock in between,
  trying again each PARK_CHECK_S: so the context is parked at its next
  point outside a critical section (its next libportal wait, or any
  point between locks).  A context that holds locks for PARK_WAIT_S is
  not parked: the decision's result is EBUSY.

A scheduler's decisions are undone when it goes (its connection closes
or it dies): faytd continues the contexts it parked and gives back the
affinity and nice value each target had before the scheduler's first
decision about it (what Linux refuses is logged).  A target that dies
takes its records with it.
"""
import errno
import logging
import os
import select
import signal

from libportal._abi import lib

from .frames import KernelError, start_time
from .native import lib as clib
from .policy import Policy
from .schedevents import SchedEvents

log = logging.getLogger("faytd")

PARK_CHECK_S = 0.005            # parked and waiting parks are looked at this often
PARK_WAIT_S = 1.0               # a context holding locks this long is not parked (EBUSY)


def _tids(pid):
    try:
        return [int(t) for t in os.listdir("/proc/%d/task" % pid)]
    except FileNotFoundError:
        raise KernelError(errno.ESRCH, "context: process %d is gone" % pid) from None


def _state(pid):
    """The process's state letter in /proc/<pid>/stat ('T' stopped), or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            s = f.read()
    except OSError:
        return None
    return chr(s[s.rindex(b")") + 2])


class Original:
    """What a target had before a scheduler's first decision about it."""
    __slots__ = ("cpus", "nice")

    def __init__(self, pid):
        self.cpus = os.sched_getaffinity(pid)
        self.nice = os.getpriority(os.PRIO_PROCESS, pid)


class Park:
    """A park decision: pending (stopping, or the context holds locks) or done."""
    __slots__ = ("scheduler", "target", "queue", "seq", "since", "done", "stopping", "proc")

    def __init__(self, scheduler, target, queue, seq, since, proc):
        self.scheduler, self.target, self.queue, self.seq = scheduler, target, queue, seq
        self.since = since
        self.proc = proc            # (pid, start): its journal record
        self.done = False
        self.stopping = True        # SIGSTOP sent, the process not seen stopped yet


class Scheduling:
    def __init__(self, kernel):
        self.k = kernel
        self.parks = {}             # target context id -> Park
        self.originals = {}         # scheduler context id -> {target id: Original}
        self.applied = 0            # decisions applied
        self.refused = 0            # decisions answered with an error
        self.resumed_behind = 0     # parked contexts continued behind faytd's back
        self.continued_at_restart = 0   # parked by a killed faytd, continued at the restart
        self._timer = -1
        self.events = SchedEvents(kernel)   # the subscribed schedulers' events

    # -- a decision ---------------------------------------------------------
    def apply(self, sched, queue, seq, type_, target_id, value, cpus):
        """Apply one decision of `sched` (its context) to context target_id.
        Returns the errno of its result (0: applied), or None when the result
        comes later (a park waiting for the target to leave its locks)."""
        try:
            r = self._apply(sched, queue, seq, type_, target_id, value, cpus)
        except KernelError as e:
            log.debug("decision %d of pid %d: %s", seq, sched.pid, e)
            r = e.errno
        except OSError as e:
            # setpriority(2) says EACCES for a nice value it may not lower: a privilege
            r = errno.EPERM if e.errno == errno.EACCES else (e.errno or errno.EIO)
        if r is not None:
            if r:
                self.refused += 1
            else:
                self.applied += 1
        return r

    def _apply(self, sched, queue, seq, type_, target_id, value, cpus):
        Policy.check_schedule(sched)
        t = self.k.contexts.get(target_id)
        if t is None or not t.alive:
            raise KernelError(errno.ESRCH, "context: %d is not a live context" % target_id)
        Policy.check_schedule_target(sched, t)
        if type_ == lib.FAYT_QREC_SCHED_CPUS:
            mask = {i for i in range(64) if cpus >> i & 1}
            if not mask:
                raise KernelError(errno.EINVAL, "cpus: an empty set")
            self._remember(sched, t)
            for tid in _tids(t.pid):
                os.sched_setaffinity(tid, mask)
            return 0
        if type_ == lib.FAYT_QREC_SCHED_NICE:
            if not -20 <= value <= 19:
                raise KernelError(errno.EINVAL, "value: nice %d is not in -20..19" % value)
            self._remember(sched, t)
            for tid in _tids(t.pid):
                os.setpriority(os.PRIO_PROCESS, tid, value)
            return 0
        if value or cpus:
            raise KernelError(errno.EINVAL, "a park or wake decision has value 0 and cpus 0")
        if type_ == lib.FAYT_QREC_SCHED_PARK:
            return self._park(sched, t, queue, seq)
        return self._wake(sched, t)

    def _remember(self, sched, t):
        mine = self.originals.setdefault(sched.id, {})
        if t.id not in mine:
            try:
                mine[t.id] = Original(t.pid)
            except ProcessLookupError:
                raise KernelError(errno.ESRCH, "context: process %d is gone" % t.pid) from None

    def _signal(self, t, signo):
        if t.pidfd >= 0:
            signal.pidfd_send_signal(t.pidfd, signo)
        else:
            os.kill(t.pid, signo)

    def _park(self, sched, t, queue, seq):
        p = self.parks.get(t.id)
        if p is not None:
            if p.scheduler != sched.id:
                raise KernelError(errno.EBUSY, "context: %d is parked by scheduler context %d"
                                  % (t.id, p.scheduler))
            if p.done:
                return 0
            raise KernelError(errno.EALREADY, "context: a park of %d waits already" % t.id)
        proc = (t.pid, t.start or 0)
        j = self.k.journal
        if j is not None:
            j.parked(*proc)                 # first: a faytd killed after the stop continues it
        try:
            self._signal(t, signal.SIGSTOP)     # EPERM here: nothing recorded
        except OSError:
            if j is not None:
                j.unparked(*proc)
            raise
        p = Park(sched.id, t.id, queue, seq, self._now(), proc)
        self.parks[t.id] = p
        self._arm()                         # pending, or watched for a SIGCONT behind its back
        return 0 if self._try_park(t, p) else None

    def _try_park(self, t, p):
        """A step of a pending park: once t is seen stopped, it is parked if
        it records no lock, else continued (and stopped again next step)."""
        if not p.stopping:
            self._signal(t, signal.SIGSTOP)
            p.stopping = True
        if _state(t.pid) not in ("T", "t"):
            return False            # the stop is on its way: look again next step
        held = [s for _, s in t.mapped_lock_records(self.k.sharepoints)[0]
                if s in (lib.FAYT_HELD_HELD, lib.FAYT_HELD_PENDING)]
        if not held:
            p.done = True
            return True
        self._signal(t, signal.SIGCONT)
        p.stopping = False
        return False

    def _wake(self, sched, t):
        p = self.parks.get(t.id)
        if p is None:
            raise KernelError(errno.EINVAL, "context: %d is not parked" % t.id)
        if p.scheduler != sched.id:
            raise KernelError(errno.EPERM, "context: %d was parked by scheduler context %d"
                              % (t.id, p.scheduler))
        del self.parks[t.id]
        self._unjournal(p)
        if not p.done:
            self._result(p, errno.ECANCELED)
        self._signal(t, signal.SIGCONT)
        return 0

    def _unjournal(self, p):
        if self.k.journal is not None:
            self.k.journal.unparked(*p.proc)

    def _result(self, p, err):
        if err:
            self.refused += 1
        else:
            self.applied += 1
        self.k.queues.result(p.queue, p.seq, err)

    # -- the check every PARK_CHECK_S -------------------------------------------
    @staticmethod
    def _now():
        return os.times().elapsed

    def _arm(self):
        if self._timer >= 0 or self.k.server is None:
            return
        fd = clib.fayt_timerfd_open()       # the core's (os.timerfd_* is Python 3.13's)
        if fd < 0:
            raise KernelError(-fd, "park: timerfd_create: %s" % os.strerror(-fd))
        self._timer = fd
        self.k.server.watch_fd(fd, self._on_timer, select.EPOLLIN)
        clib.fayt_timerfd_arm(fd, int(PARK_CHECK_S * 1e9))

    def _disarm(self):
        if self._timer >= 0:
            if self.k.server is not None:
                self.k.server.unwatch_fd(self._timer)
            os.close(self._timer)
            self._timer = -1

    def _on_timer(self, fd, events):
        try:
            os.read(fd, 8)
        except BlockingIOError:
            pass
        now = self._now()
        for tid, p in list(self.parks.items()):
            t = self.k.contexts.get(tid)
            if t is None or not t.alive:
                self._drop_park(p, errno.ESRCH)
                continue
            if p.done:
                if _state(t.pid) not in ("T", "t", None):
                    self.resumed_behind += 1
                    log.warning("context %d (pid %d) was continued behind its scheduler's back:"
                                " parked again", t.id, t.pid)
                    try:
                        self._signal(t, signal.SIGSTOP)
                    except OSError:
                        pass
                continue
            try:
                if self._try_park(t, p):
                    self._result(p, 0)
                    continue
            except OSError as e:
                self._drop_park(p, e.errno)
                continue
            if now - p.since >= PARK_WAIT_S:
                if p.stopping:
                    try:
                        self._signal(t, signal.SIGCONT)
                    except OSError:
                        pass
                self._drop_park(p, errno.EBUSY)
        if not self.parks:
            self._disarm()
        else:
            clib.fayt_timerfd_arm(fd, int(PARK_CHECK_S * 1e9))

    def _drop_park(self, p, err):
        if self.parks.get(p.target) is p:
            del self.parks[p.target]
            self._unjournal(p)
        if not p.done:
            self._result(p, err)

    # -- contexts that go ------------------------------------------------
    def context_gone(self, ctx):
        """ctx's connection closed or it died: as a scheduler, its decisions
        are undone; as a target, its records go."""
        if ctx.id in self.k.contexts:
            self.events.unsubscribe(ctx)    # its connection closed: no more events
        else:
            self.events.gone(ctx)           # forgotten: DIED to the schedulers
        p = self.parks.get(ctx.id)
        if p is not None:           # leaves faytd's care: it is not left stopped
            self._drop_park(p, errno.ESRCH)
            if ctx.alive:
                try:
                    self._signal(ctx, signal.SIGCONT)
                except OSError:
                    pass
        for tid, p in list(self.parks.items()):
            if p.scheduler != ctx.id:
                continue
            del self.parks[tid]
            self._unjournal(p)
            t = self.k.contexts.get(tid)
            if not p.done:
                self._result(p, errno.ECANCELED)
            if t is not None and t.alive:
                try:
                    self._signal(t, signal.SIGCONT)
                except OSError as e:
                    log.warning("undo: cannot continue pid %d: %s", t.pid, e)
        for sched_id, mine in list(self.originals.items()):
            mine.pop(ctx.id, None)
        mine = self.originals.pop(ctx.id, {})
        for tid, o in mine.items():
            t = self.k.contexts.get(tid)
            if t is None or not t.alive:
                continue
            try:
                for x in _tids(t.pid):
                    os.sched_setaffinity(x, o.cpus)
                    os.setpriority(os.PRIO_PROCESS, x, o.nice)
            except (OSError, KernelError) as e:
                log.warning("undo: scheduler context %d's decisions about pid %d: %s",
                            ctx.id, t.pid, e)
        if not self.parks:
            self._disarm()

    def shutdown(self):
        """A clean stop: every parked context is continued."""
        self.events.shutdown()
        for p in list(self.parks.values()):
            t = self.k.contexts.get(p.target)
            self._unjournal(p)
            if t is not None and t.alive:
                try:
                    self._signal(t, signal.SIGCONT)
                except OSError:
                    pass
        self.parks.clear()
        self._disarm()

    def journaled(self):
        """(pid, start) of every park, for a rewrite of the journal."""
        return [p.proc for p in self.parks.values()]

    def continue_parked(self, procs):
        """A restart: the processes the killed faytd had parked (its journal)
        are continued, if they still run (the same start time) and are
        stopped.  No scheduler decides about them any more: the one that
        parked them lost its connection with that faytd."""
        for pid, start in procs:
            if not start or start_time(pid) != start:
                continue                # gone, or its pid is another process's now
            if _state(pid) not in ("T", "t"):
                continue
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError as e:
                log.warning("restart: cannot continue pid %d, which the killed faytd had "
                            "parked: %s", pid, e)
                continue
            self.continued_at_restart += 1
            log.info("restart: continued pid %d, which the killed faytd had parked", pid)

    def counters(self):
        return {"applied": self.applied, "refused": self.refused,
                "parked": sum(p.done for p in self.parks.values()),
                "resumed_behind": self.resumed_behind,
                "continued_at_restart": self.continued_at_restart, **self.events.counters()}
