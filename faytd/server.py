"""The event loop: the syscall socket, the contexts' connections and pidfds.

One thread, one epoll (selectors).  Facts it relies on:
- SOCK_SEQPACKET keeps message boundaries, so one recvmsg is one request;
  MSG_TRUNC tells us a request was longer than FAYT_MSG_MAX.
- SO_PEERCRED gives the peer's pid, uid and gid as the kernel saw them at
  connect(2); nothing the client writes is trusted for identity.
- Replies are sent non-blocking: a client that pipelines requests without
  reading its replies breaks the protocol (one call at a time) and is
  disconnected rather than allowed to block the daemon.
- pidfd_open(2) tells us when a context's process has died, even if a fork
  child still holds its socket open.
- A context kept after its connection closed holds no descriptor: its
  pidfd is closed and Liveness (context.py) looks its process up by pid and
  start time, a bounded batch every CHECK_S.
A client that breaks the protocol (short or foreign header, oversized
message) is disconnected; the others go on.  An unexpected exception in a
handler is logged and answered with EIO: faytd itself does not go down.

Limits and fairness (docs/limits.md): a connection past a limit of its uid
or process (Quotas, context.py) is accepted, its first request answered
with EAGAIN and why, and closed; at most _REFUSED_MAX such wait for their
request.  Requests are served in rounds, core contexts first and one
request per other uid (fayt_fast_poll, faytd/core/serve.c); the listener
accepts at most _ACCEPT_BATCH connections a turn.  faytd cannot preempt a
request once it performs it, and a process that only burns CPU is the
Linux scheduler's business, not faytd's; a uid that floods faytd with
calls while core contexts call runs nicer meanwhile (flood.py).
"""
import array
import collections
import errno
import logging
import os
import resource
import select
import signal
import socket
import stat
import struct
import time
import traceback

from libportal._abi import lib, REQ_HDR, REP_HDR

from . import syscalls as syscall
from .context import CHECK_S, Liveness
from .deferred import Deferred
from .flood import FloodGuard
from .frames import KernelError, start_time
from .native import ffi, lib as clib

log = logging.getLogger("faytd")
_CRED = struct.Struct("iII")     # struct ucred: pid_t pid; uid_t uid; gid_t gid
_MAX_IN_FDS = clib.FAYT_FAST_MAX_FDS    # descriptors a request may carry
_MSG_MAX = lib.FAYT_MSG_MAX
_NOREPLY = lib.FAYT_REQ_NOREPLY
DEFAULT_LOOP_SPIN_US = 100
_CATCH_UP_DEPTH = 32            # connections at most in nested catch-ups
_CATCH_UP_READS = 256           # requests at most read from one connection by a catch-up
_MAX_EVENTS = clib.FAYT_FAST_POLL_EVENTS   # events one fayt_fast_poll looks at and returns
_ACCEPT_BATCH = 16              # connections accepted a turn (the listener stays readable)
_REFUSED_MAX = 32               # refused connections waiting for their first request
_FD_HEADROOM = 256 + _REFUSED_MAX   # descriptors kept beside 2 a connection (socket, pidfd)
_REFUSAL_LOG_S = 10.0           # refusals are logged at most this often (with their count)
_IDLE_EVERY = 16                # turns of Python's events after which deferred work gets a step
_IDLE_RETRY_S = 1.0             # deferred work that failed is tried again after this
_NOREPLY_OPS = (lib.FAYT_SYS_UNMAP, lib.FAYT_SYS_UNMAP_DESTROY)
_TRUNC = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
_SOL_SOCKET, _SCM_RIGHTS = int(socket.SOL_SOCKET), int(socket.SCM_RIGHTS)


class Server:
    def __init__(self, kernel, path, mode):
        self.k = kernel
        kernel.server = self            # kernel objects may watch fds (watch_fd)
        self.path = path
        self.ep = select.epoll()
        self.watch = {}                 # fd -> (kind, object)
        self.stopping = False
        spin = kernel.cfg.get("loop_spin_us")
        if spin is None:            # only where the client can run meanwhile
            spin = DEFAULT_LOOP_SPIN_US if (os.cpu_count() or 1) > 1 else 0
        self.spin_s = spin / 1e6
        self._sigbus_seen = clib.fayt_sigbus_count()     # guard installed by main()
        self._serving = set()          # connections inside catch_up (see there)
        self._later = {}                # fd -> event catch_up took from epoll for the loop
        self._read_one = False          # _on_client read a request ...
        self._read_noreply = False      # ... sent with FAYT_REQ_NOREPLY
        # fayt_fast_serve's buffers (one request at a time: the loop is one thread)
        self._buf = ffi.new("uint8_t[]", _MSG_MAX)
        self._bufview = ffi.buffer(self._buf)
        self._io = ffi.new("struct fayt_fast_io *")
        self._msg = ffi.addressof(self._io, "msg")
        self._evs = ffi.new("struct fayt_fast_event[]", _MAX_EVENTS)
        self._noreply = ffi.new("int *")
        self._err = ffi.new("int *")
        self._refused = collections.OrderedDict()  # fd -> (socket, KernelError), oldest first
        self._refusals, self._refusal_logged = 0, 0.0
        # Out of descriptors (EMFILE, ENFILE), the listener stays readable:
        # the spare is given up to accept and close the newcomer (its client
        # sees the connection reset, not a HELLO that never comes), then
        # taken again.  Such closes are logged at most every _REFUSAL_LOG_S.
        self._spare = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self._starved, self._starved_logged = 0, 0.0
        self.liveness = Liveness()      # contexts kept without a connection
        kernel.flood = FloodGuard(kernel, self)     # floods of other uids (flood.py)
        self._live_fd, self._live_armed = -1, False
        kernel.quotas.limit_connections(max(1, (_open_files() - _FD_HEADROOM) // 2))
        self.listener = self._listen(path, mode)
        self._watch(self.listener.fileno(), "accept", None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._watch(self._wake_r.fileno(), "signal", None)
        for ctx in list(kernel.contexts.values()):     # a restart: contexts the journal named
            kernel.quotas.register(ctx, check=False)
            self._keep(ctx)
        kernel.serving()

    def _watch(self, fd, kind, obj):
        self.watch[fd] = (kind, obj)
        self.ep.register(fd, select.EPOLLIN)

    def watch_fd(self, fd, callback, events=select.EPOLLIN):
        """For kernel objects (the pager's userfaultfds, rings): call
        callback(fd, events) when fd is ready, in the loop, until unwatch_fd."""
        self.watch[fd] = ("callback", callback)
        self.ep.register(fd, events)

    def unwatch_fd(self, fd):
        self._unwatch_fd(fd)

    def _unwatch_fd(self, fd):
        if self.watch.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def _listen(self, path, mode):
        d = os.path.dirname(path) or "."
        if not os.path.isdir(d):
            os.makedirs(d, mode=0o700, exist_ok=True)       # (main.py checks it: dirs.py)
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise SystemExit("faytd: %s exists and is not a socket" % path)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(path)
                raise SystemExit("faytd: another faytd is serving %s" % path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        s.listen(128)
        s.setblocking(False)
        return s

    # -- loop -----------------------------------------------------------
    def serve_forever(self):
        prev = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            prev[sig] = signal.signal(sig, self._on_signal)
        old_fd = signal.set_wakeup_fd(self._wake_w.fileno())
        log.info("faytd listening on %s (ram %d MiB)", self.path, self.k.frames.nframes * 4 // 1024)
        try:
            self.k.frames.start_pool()
            watch = self.watch
            k, epfd, io = self.k, self.ep.fileno(), self._io
            fast, evs, buf = k.fast, self._evs, self._buf
            spin_ns = int(self.spin_s * 1e9)
            poll, clock = clib.fayt_fast_poll, time.monotonic
            busy = 0                # turns in a row that had events for Python
            retry_at = 0.0          # deferred work failed: not again before this
            while not self.stopping:
                # Wait in C: the fast system calls of every connection are
                # served there; the rest comes back here.  With deferred work
                # (the journal's compaction) it does not sleep, and it
                # returns after a batch of served requests, so the work gets
                # a step now and then under steady load too (and every
                # _IDLE_EVERY turns of Python's events).  Requests come in
                # bursts (a destroy, then a create; a fault, then the next
                # page's): it looks a little longer before sleeping, giving
                # the CPU away at each look (loop_spin_us), so that the next
                # one costs no wake-up.  Deferred work that failed (a full
                # disk) waits _IDLE_RETRY_S before it is tried again.
                idle = k.has_idle_work()
                if idle and clock() < retry_at:
                    n = poll(fast, epfd, spin_ns, int(_IDLE_RETRY_S * 1000), evs, _MAX_EVENTS,
                             buf, io)
                    idle = False
                else:
                    n = poll(fast, epfd, 0 if idle else spin_ns, 0 if idle else -1, evs,
                             _MAX_EVENTS, buf, io)
                if n < 0:
                    raise OSError(-n, "faytd: epoll_wait: %s" % os.strerror(-n))
                passed = io.passed_fd if n else -1
                if passed >= 0:         # a request poll read: its bytes, before anything reads again
                    read = self._read(io.passed, io.noreply, io.err)
                    passed_ctx = io.passed_ctx
                if n == 0 or (idle and busy >= _IDLE_EVERY):
                    busy = 0
                    if idle:
                        if not self._idle_step(k):
                            retry_at = clock() + _IDLE_RETRY_S
                    if n == 0:
                        continue
                busy += 1
                events = [(evs[i].fd, evs[i].events) for i in range(n)]
                for fd, ev in events:
                    kind, obj = watch.get(fd, (None, None))
                    self._later.pop(fd, None)   # handled here: not again below
                    if fd == passed:
                        self._passed_event(fd, kind, obj, passed_ctx, read)
                        continue
                    self._event(fd, ev, kind, obj)
                    if kind == "signal":
                        try:
                            self._wake_r.recv(4096)
                        except BlockingIOError:
                            pass
                while self._later:              # taken by a catch-up (see there)
                    fd = next(iter(self._later))
                    ev = self._later.pop(fd)
                    kind, obj = watch.get(fd, (None, None))
                    if kind == "callback":
                        self._event(fd, ev, kind, obj)
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, h in prev.items():
                signal.signal(sig, h)
            self.close()

    @staticmethod
    def _idle_step(k):
        """One step of the kernel's deferred work; False if it failed."""
        try:
            k.idle_work()
            return True
        except Exception as e:      # e.g. out of files: the pool waits
            log.warning("idle work: %s", e)
            return False

    def _event(self, fd, ev, kind, obj):
        try:
            self._handle(fd, ev, kind, obj)
        finally:
            self._check_sigbus(kind, fd)

    def _check_sigbus(self, kind, fd):
        n = clib.fayt_sigbus_count()
        if n != self._sigbus_seen:
            log.warning("%d page(s) of shared objects were cut off under faytd (a client "
                        "truncated an object it was given); faytd reads zeros there now "
                        "(event %s on fd %d)", n - self._sigbus_seen, kind, fd)
            self._sigbus_seen = n

    def _handle(self, fd, ev, kind, obj, read=None):
        try:
            if kind == "client":
                self._on_client(obj, read)
            elif kind == "pidfd":
                # An event of the same batch may have closed a dead context's
                # pidfd and an accept reused its number for a live process:
                # only a readable pidfd says its process exited.
                if obj.pidfd == fd and select_readable(fd):
                    self._on_death(obj)
            elif kind == "accept":
                self._accept()
            elif kind == "refused":
                self._on_refused(fd)
            elif kind == "callback":
                obj(fd, ev)
        except Exception:
            # A bug must cost one client, never faytd.
            log.error("event %s on fd %d raised:\n%s", kind, fd, traceback.format_exc())
            if kind == "callback":
                self._unwatch_fd(fd)
            elif obj is not None:
                self._drop_conn(obj)
                self._unwatch_pidfd(obj)
                try:
                    self.k.drop_mappings(obj)
                finally:
                    self.k.forget(obj)

    def catch_up(self, current):
        """Perform every request other connections have already sent, before
        the request of `current` that is being performed now is answered.

        Calls sent with FAYT_REQ_NOREPLY (unmap, destroy) return before faytd
        has performed them.  A process that destroyed a share-point and then
        told another process so (a pipe, shared memory, a notification) must
        not have that process see the share-point still there: its message
        was queued on its connection before the other process could even
        send its request, so performing what is queued before answering keeps
        the order a kernel would give.  The share-point calls whose answer
        depends on such calls (an identifier that exists, the list) call this.

        Requests of one connection are still performed in order.  A
        connection is read up to its first call that waits for an answer
        (a look at its header, MSG_PEEK): that call, and what the
        connection sent after it, cannot have caused anything `current`
        sent (its process waits for the answer), so it stays for the
        loop's round, where the fairness between uids holds.  At most _CATCH_UP_READS requests are read from
        one connection (a client streaming NOREPLY calls must not stall
        faytd): a process that sends more than that many unanswered calls
        before telling another of the last one may see that one overtaken.

        A request performed here may catch up in turn (its own answer may
        depend on a third connection's queue); connections being served are
        skipped, and the nesting is bounded.  Events of other kinds that
        this poll takes are left for the loop (_later)."""
        serving = self._serving
        if len(serving) >= _CATCH_UP_DEPTH:
            return
        serving.add(current)
        fast = self.k.fast
        disabled, fast.disabled = fast.disabled, 1     # Python is in a call: it performs all
        try:
            for fd, ev in self.ep.poll(0):
                kind, obj = self.watch.get(fd, (None, None))
                if kind != "client":
                    if kind == "callback":
                        # Some are edge-triggered (a chain's answer eventfd):
                        # this poll took the edge, so the loop must see it
                        # (once, however many catch-ups saw it).
                        self._later[fd] = ev
                    continue
                if obj in serving:
                    continue
                serving.add(obj)
                try:
                    for _ in range(_CATCH_UP_READS):
                        if obj.sock is None or obj.sock.fileno() != fd:
                            break
                        if not _noreply_queued(obj.sock):
                            break       # a call that waits: its round serves it
                        if not self._guarded_client(fd, ev, obj) or not self._read_noreply:
                            break
                finally:
                    serving.discard(obj)
        finally:
            fast.disabled = 1 if self.k.tracing.on else disabled   # a trace began meanwhile
            serving.discard(current)

    def _guarded_client(self, fd, ev, ctx):
        """One request of ctx, with _event's protection; False when none was queued."""
        self._read_one = self._read_noreply = False
        self._event(fd, ev, "client", ctx)
        return self._read_one

    def _on_signal(self, signum, frame):
        log.info("%s, shutting down", signal.Signals(signum).name)
        self.stopping = True

    def close(self):
        self.k.flood.close()            # the nice values it changed go back
        for ctx in list(self.k.contexts.values()):
            self._drop_conn(ctx)
            self._unwatch_pidfd(ctx)
        while self._refused:
            fd, (sock, _) = self._refused.popitem()
            self._unwatch_fd(fd)
            sock.close()
        if self._live_fd >= 0:
            self._unwatch_fd(self._live_fd)
            os.close(self._live_fd)
            self._live_fd = -1
        self.k.shutdown()
        self._unwatch_fd(self.listener.fileno())
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._wake_r.close()
        self._wake_w.close()
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1
        self.ep.close()

    # -- connections ----------------------------------------------------
    def _accept(self):
        k = self.k
        for _ in range(_ACCEPT_BATCH):  # the rest next turn: the listener stays readable
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE) and self._spare >= 0:
                    if self._starve_one(e):
                        continue
                    return              # nothing was waiting (accept asks for a fd first)
                log.warning("accept: %s", e)
                return
            sock.setblocking(False)
            pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         _CRED.size))
            try:
                exe = os.readlink("/proc/%d/exe" % pid)
            except OSError:
                exe = None
            cat = k.policy.classify(uid, gid, exe)
            start = start_time(pid)
            try:
                k.quotas.check_connect(uid, pid, start,
                                       cat is not None and cat.id == lib.FAYT_CATEGORY_CORE)
            except KernelError as e:
                self._refuse(sock, e)
                continue
            ctx = k.new_context(sock, pid, uid, gid, exe, cat, start)
            k.quotas.connected(ctx)
            try:
                ctx.pidfd = os.pidfd_open(pid)
                self._watch(ctx.pidfd, "pidfd", ctx)
            except OSError:
                ctx.pidfd = -1          # already gone: EOF will follow
            self._watch(sock.fileno(), "client", ctx)
            clib.fayt_fast_watch(self.k.fast, ctx.fast)
            k.flood.connected(ctx)
            log.debug("context %d: pid %d uid %d exe %s category %s", ctx.id, pid, uid, exe,
                      ctx.category.name if ctx.category else None)

    def _starve_one(self, e):
        """faytd is out of descriptors: accept the next connection on the
        spare's and close it unanswered.  Whether one was waiting."""
        os.close(self._spare)
        self._spare = -1
        try:
            sock, _ = self.listener.accept()
            sock.close()
            closed = True
        except (BlockingIOError, InterruptedError):
            closed = False
        except OSError as again:
            log.warning("accept: %s", again)
            closed = False
        try:
            self._spare = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass                        # taken meanwhile: the next EMFILE is logged as such
        self._starved += closed
        now = time.monotonic()
        if closed and now - self._starved_logged >= _REFUSAL_LOG_S:
            log.warning("accept: %s: closed %d new connection(s) unanswered since the last "
                        "such line", e.strerror, self._starved)
            self._starved, self._starved_logged = 0, now
        return closed

    def _refuse(self, sock, err):
        """A connection past a limit: its first request is answered with
        err (a client learns why at its HELLO), then it is closed.  At most
        _REFUSED_MAX wait for that request; past them the oldest is closed
        unanswered (its client sees the connection reset)."""
        now = time.monotonic()
        self._refusals += 1
        if now - self._refusal_logged >= _REFUSAL_LOG_S:
            log.warning("refused %d connection(s) since the last such line: %s",
                        self._refusals, err.message)
            self._refusals, self._refusal_logged = 0, now
        if len(self._refused) >= _REFUSED_MAX:
            fd, (old, _) = self._refused.popitem(last=False)
            self._unwatch_fd(fd)
            old.close()
        self._refused[sock.fileno()] = (sock, err)
        self._watch(sock.fileno(), "refused", None)

    def _on_refused(self, fd):
        sock, err = self._refused.get(fd, (None, None))
        if sock is None:
            return
        try:
            data = sock.recv(_MSG_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        del self._refused[fd]
        self._unwatch_fd(fd)
        try:
            if len(data) >= REQ_HDR.size:
                magic, op, _, seq, _ = REQ_HDR.unpack_from(data)
                if magic == lib.FAYT_REQ_MAGIC:
                    sock.send(REP_HDR.pack(lib.FAYT_REP_MAGIC, op, 0, seq, err.errno)
                              + err.message.encode())
        except OSError:
            pass
        finally:
            sock.close()

    def _keep(self, ctx):
        """ctx outlives its connection (its process holds locks it recorded,
        or share-points it made): its pidfd goes, Liveness watches it."""
        self._unwatch_pidfd(ctx)
        self.liveness.add(ctx)
        if self._live_fd < 0:
            fd = clib.fayt_timerfd_open()
            if fd < 0:
                raise OSError(-fd, "faytd: timerfd_create: %s" % os.strerror(-fd))
            self._live_fd = fd
            self.watch_fd(fd, self._on_liveness)
        if not self._live_armed:
            clib.fayt_timerfd_arm(self._live_fd, int(CHECK_S * 1e9))
            self._live_armed = True

    def _on_liveness(self, fd, events):
        clib.fayt_timerfd_drain(fd)
        self._live_armed = False
        contexts = self.k.contexts
        for ctx in self.liveness.dead():
            if contexts.get(ctx.id) is ctx and ctx.alive:
                self._on_death(ctx)
            else:
                self.liveness.discard(ctx)
        if len(self.liveness):
            clib.fayt_timerfd_arm(fd, int(CHECK_S * 1e9))
            self._live_armed = True

    def _drop_conn(self, ctx):
        if ctx.sock is not None:
            self.k.flood.disconnected(ctx)
            self.k.quotas.disconnected(ctx)
            clib.fayt_fast_unwatch(self.k.fast, ctx.sock.fileno())
            ctx.fast.fd = -1
            self._unwatch_fd(ctx.sock.fileno())
            ctx.sock.close()
            ctx.sock = None

    def _disconnect(self, ctx, why=None):
        if why:
            log.warning("context %d (pid %d): %s; disconnected", ctx.id, ctx.pid, why)
        self._drop_conn(ctx)
        if ctx.alive and ctx.pidfd >= 0:
            try:
                dead = bool(select_readable(ctx.pidfd))
            except OSError:
                dead = True
            if dead:
                return self._on_death(ctx)
        self.k.disconnected(ctx)
        if ctx.id not in self.k.contexts:
            self._unwatch_pidfd(ctx)
        else:
            self._keep(ctx)

    def _unwatch_pidfd(self, ctx):
        if ctx.pidfd >= 0:
            self._unwatch_fd(ctx.pidfd)
            ctx.close_pidfd()

    def _on_death(self, ctx):
        self._drop_conn(ctx)
        self._unwatch_pidfd(ctx)
        self.liveness.discard(ctx)
        log.debug("context %d: pid %d died", ctx.id, ctx.pid)
        self.k.died(ctx)

    def _read(self, result, noreply, err):
        """What fayt_fast_serve read and passed, out of its buffer: (result,
        noreply, err, data, fds, msg_flags)."""
        msg = self._msg
        return (result, noreply, err, bytes(self._bufview[:msg.len]), list(msg.fds[0:msg.nfds]),
                msg.mflags)

    def _passed_event(self, fd, kind, ctx, ctx_id, read):
        """The request fayt_fast_poll read for context ctx_id on fd, and did
        not perform.  An event handled before it in the same batch may have
        closed that connection (its process died) and another may have
        accepted a new one on the same fd number: then the request was its
        dead context's, and it goes with it."""
        if kind != "client" or ctx.id != ctx_id or ctx.sock is None or ctx.sock.fileno() != fd:
            log.debug("fd %d: a request of context %d whose connection is gone: dropped",
                      fd, ctx_id)
            for f in read[4]:
                os.close(f)
            return
        try:
            self._handle(fd, 0, kind, ctx, read)
        finally:
            self._check_sigbus(kind, fd)

    def _on_client(self, ctx, read=None):
        """One request of ctx: read (and, for the calls it takes, performed
        and answered) by the fast path in C; the rest is Python's.  read:
        what fayt_fast_poll read for it: (fayt_fast_serve's result, noreply,
        err, data, fds, msg_flags)."""
        k, msg = self.k, self._msg
        if read is None:
            r = clib.fayt_fast_serve(k.fast, ctx.fast, self._buf, msg, self._noreply, self._err)
            noreply, err = self._noreply[0], self._err[0]
            if r == clib.FAYT_FAST_PASS:
                read = self._read(r, noreply, err)
        else:
            r, noreply, err = read[:3]
        if r == clib.FAYT_FAST_AGAIN:
            return
        if r < 0:
            return self._disconnect(ctx, "recv: %s" % os.strerror(-r))
        self._read_one = True
        self._read_noreply = bool(noreply)
        if r == clib.FAYT_FAST_SERVED:
            return
        if r == clib.FAYT_FAST_UNSENT:
            return self._disconnect(ctx, "does not read its replies" if err == errno.EAGAIN
                                    else "send: %s" % os.strerror(err))
        data, fds, mflags = read[3:]
        self._read_one = bool(data)
        try:
            if not data:
                return self._disconnect(ctx)
            if mflags & _TRUNC:
                return self._disconnect(ctx, "message longer than %d bytes" % lib.FAYT_MSG_MAX)
            if len(data) < REQ_HDR.size:
                return self._disconnect(ctx, "short message (%d bytes)" % len(data))
            magic, op, flags, seq, tid = REQ_HDR.unpack_from(data)
            if magic != lib.FAYT_REQ_MAGIC:
                return self._disconnect(ctx, "bad magic %#x" % magic)
            if flags:
                body, out_fds = self._check_flags(op, flags), []
            if not flags or body is None:
                body, out_fds = self._perform(ctx, op, tid, data[REQ_HDR.size:], fds)
            if isinstance(body, Deferred):     # answered when its work is done
                return body.start(self, ctx, op, seq)
            if flags & _NOREPLY and not isinstance(body, KernelError):
                return
            try:
                self._reply(ctx, op, seq, body, out_fds)
            finally:
                for fd in out_fds:
                    os.close(fd)
        finally:
            for fd in fds:
                os.close(fd)

    @staticmethod
    def _check_flags(op, flags):
        """None if the header flags are valid for op, else the KernelError."""
        if flags & ~_NOREPLY:
            return KernelError(errno.EINVAL, "flags: unknown bits %#x" % (flags & ~_NOREPLY))
        if op not in _NOREPLY_OPS:
            return KernelError(errno.EINVAL, "flags: FAYT_REQ_NOREPLY is for UNMAP and "
                                             "UNMAP_DESTROY only")
        return None

    def _perform(self, ctx, op, tid, body, fds):
        """(reply body, fds) or (KernelError, []) for the request, timed
        for the trace while one runs (faytd/trace.py)."""
        tr = self.k.tracing
        if not tr.on:
            return self._perform_call(ctx, op, tid, body, fds)
        t0 = tr.call_begin(ctx, tid)
        out = self._perform_call(ctx, op, tid, body, fds)
        tr.call_end(ctx, tid, op, t0, out[0])
        return out

    def _perform_call(self, ctx, op, tid, body, fds):
        self.k.stats.python_call(op)
        handler = syscall.HANDLERS.get(op)
        try:
            if handler is None:
                raise KernelError(errno.ENOSYS, "op: %d is not a faytd system call" % op)
            if fds and op not in syscall.TAKES_FDS:
                raise KernelError(errno.EINVAL, "this call takes no file descriptors")
            if not ctx.registered and op not in syscall.NEED_NO_HELLO:
                raise KernelError(errno.EPROTO, "op %d before hello" % op)
            fault = self.k.injection.on_call(ctx, op) if self.k.injection.rules else None
            if fault is not None:
                if isinstance(fault, KernelError):
                    return fault, []
                return self._delayed(fault, handler, ctx, tid, body, fds), []
            return handler(self.k, ctx, tid, body, fds)
        except KernelError as e:
            return e, []
        except Exception:
            log.error("context %d: op %d raised:\n%s", ctx.id, op, traceback.format_exc())
            return KernelError(errno.EIO, "faytd: internal error (logged)"), []

    def _delayed(self, seconds, handler, ctx, tid, body, fds):
        """An injected delay (faytd/injection.py): a Deferred whose work
        sleeps, off the loop, and whose finish performs the call then;
        the caller's fds are dup'ed for it (the loop closes its own)."""
        kept = [os.dup(f) for f in fds]

        def close_kept():
            while kept:
                os.close(kept.pop())

        def finish():
            try:
                out = handler(self.k, ctx, tid, body, list(kept))
                if isinstance(out[0], Deferred):     # a call that defers itself: not delayed
                    raise KernelError(errno.EIO, "faytd: a delayed call deferred again")
                return out
            finally:
                close_kept()
        return Deferred(lambda: time.sleep(seconds), finish, close_kept)

    def _reply(self, ctx, op, seq, body, fds):
        if isinstance(body, KernelError):
            msg = REP_HDR.pack(lib.FAYT_REP_MAGIC, op, 0, seq, body.errno) + body.message.encode()
            fds = []
        else:
            msg = REP_HDR.pack(lib.FAYT_REP_MAGIC, op, len(fds), seq, 0) + body
        try:
            if fds:
                ctx.sock.sendmsg([msg], [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))])
            else:
                ctx.sock.send(msg)
        except BlockingIOError:
            self._disconnect(ctx, "does not read its replies")
        except OSError as e:
            self._disconnect(ctx, "send: %s" % e)


def _open_files():
    """faytd's RLIMIT_NOFILE, its soft limit raised to the hard one first
    (a daemon's connections are its descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _noreply_queued(sock):
    """Whether the next request queued on sock was sent with
    FAYT_REQ_NOREPLY (its header, peeked: it stays queued).  True too when
    the next read would find the end, an error or a short message: reading
    it handles those."""
    try:
        head = sock.recv(REQ_HDR.size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    if len(head) < REQ_HDR.size:
        return True
    return bool(REQ_HDR.unpack(head)[2] & _NOREPLY)


def select_readable(fd):
    """Whether fd is readable now (poll(2): no FD_SETSIZE limit)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return p.poll(0)
