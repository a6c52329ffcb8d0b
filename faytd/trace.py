"""The timeline trace (docs/tracing.md): what ran when, in which context,
as Chrome trace-event JSON, the format the Perfetto UI (ui.perfetto.dev)
and chrome://tracing open.

Where each kind of event comes from:
- system calls: faytd performs them, so it times them itself (Server._perform
  calls call_begin and call_end).  While a trace runs every request is
  performed in Python (the core's `disabled` word): the C fast path
  (faytd/core/serve.c) would otherwise answer PORTAL and UNMAP unseen;
- notifications (post, handler, return) and contended lock waits never
  pass through faytd: libportal records them in its own context page's
  trace area (fayt/context.h: a ring of fixed-size records after the page,
  in the same object) while faytd has set `trace.on` there.  faytd drains
  every context's area on a timer (DRAIN_S), when the context goes and at
  stop.  The area is the process's own memory: every record is read
  between two loads of its seq word and checked (kind, times, thread, and
  each id against faytd's own records: the ring it names must be this
  context's, the share-point one faytd knows); a record that fails is
  counted as dropped, never believed, so a process can only mislead its
  own track;
- SPECIAL faults and each chain server's answer: faytd's fault engine (C)
  queues one FAYT_FAULT_EV_TRACE line per answer and per end of a request
  while `trace` is set in it (faytd/faults.py hands them here);
- share-point create, attach and destroy, owner-died recoveries, injected
  faults: faytd's Python, which performs them, reports them here.

Tracks: one process track per context (its pid; named by its published
names, its executable and context id), threads by their tid; faytd's own
work (recoveries, faults injected into chains) on faytd's track.  Flows
(Chrome's "s"/"f" events, bound to the enclosing slice) join a post to its
handler and, with the return flag, the handler's end to the sender's
return; a fault to each server's answer.

The file is the caller's (`fayt trace start` passes a descriptor it opened
itself; `faytd --trace FILE` opens FILE without following a symlink); it
must be a regular file, so that a write never blocks faytd on a reader.
The JSON is completed at stop and when faytd stops cleanly; a trace cut
short by a crash is a JSON array Perfetto still opens.
"""
import errno
import fcntl
import json
import logging
import os
import stat
import struct
import time

from libportal._abi import ffi, lib

from .frames import KernelError
from .native import lib as clib
from .stats import OP_NAMES

log = logging.getLogger("faytd")

DRAIN_S = 0.01                  # how often the contexts' trace areas are drained
FLUSH_BYTES = 1 << 16           # events kept before a write
RECORDS = lib.FAYT_TRACE_RECORDS
SLACK_NS = 1_000_000_000        # a record's time may be this far outside [start, now]
PENDING_MAX = 4096              # faults awaiting their end, posts awaiting their return
JUMP_MAX = 1 << 24              # records a context may take between two drains (~800M/s)
LATE_TICKS = 3                  # drains a record taken but not yet written is waited for
TID_MAX = 1 << 22               # PID_MAX_LIMIT
MASK32 = 0xffffffff
_REC = struct.Struct("<IHHiIQIIq")     # struct fayt_trace_record
_REC_SIZE = _REC.size
if _REC_SIZE != ffi.sizeof("struct fayt_trace_record"):
    raise ImportError("faytd.trace: struct fayt_trace_record is %d bytes, its format %d"
                      % (ffi.sizeof("struct fayt_trace_record"), _REC_SIZE))
_IMMEDIATE, _RETURN = lib.FAYT_NOTIFY_IMMEDIATE, lib.FAYT_NOTIFY_RETURN
_SEND, _BEGIN, _END = (lib.FAYT_TRACE_NOTIFY_SEND, lib.FAYT_TRACE_NOTIFY_BEGIN,
                       lib.FAYT_TRACE_NOTIFY_END)
_RETURNED, _SLOTS, _NEST_MAX = (lib.FAYT_TRACE_NOTIFY_RETURN, lib.FAYT_NOTIFICATION_SLOTS,
                                lib.FAYT_NEST_MAX)
_VERDICTS = {lib.FAYT_PAGE_DATA: "DATA", lib.FAYT_PAGE_FORWARD: "FORWARD",
             lib.FAYT_PAGE_FAIL: "FAIL", lib.FAYT_PAGE_MAPPED: "MAPPED"}


_BOOL = {0: "false"}
for _b in (_IMMEDIATE, _RETURN):
    _BOOL[_b] = "true"
_NOTIFY_SEND = ('{"ph":"X","name":%s,"cat":"notify","pid":%d,"tid":%d,"ts":%.3f,"dur":0,'
                '"args":{"target":%d,"slot":%d,"pos":%d,"ring":%d,"immediate":%s,'
                '"return":%s}},\n'
                '{"ph":"s","id":"n.%d.%d","name":"notification","cat":"notify","pid":%d,'
                '"tid":%d,"ts":%.3f}')
_NOTIFY_BEGIN = ('{"ph":"f","bp":"e","id":"n.%d.%d","name":"notification","cat":"notify",'
                 '"pid":%d,"tid":%d,"ts":%.3f}')
_NOTIFY_END = ('{"ph":"X","name":%s,"cat":"notify","pid":%d,"tid":%d,"ts":%.3f,"dur":%.3f,'
               '"args":{"slot":%d,"sender":%d,"depth":%d,"ring":%d,"pos":%d,"result":%d,'
               '"return":%s,"immediate":%s}}')
_NOTIFY_RET_FROM = ('{"ph":"s","id":"r.%d.%d","name":"return","cat":"notify","pid":%d,'
                    '"tid":%d,"ts":%.3f}')
_NOTIFY_RETURN = ('{"ph":"X","name":%s,"cat":"notify","pid":%d,"tid":%d,"ts":%.3f,"dur":%.3f,'
                  '"args":{"target":%d,"slot":%s,"ring":%d,"pos":%d,"result":%d,"status":%d}},\n'
                  '{"ph":"f","bp":"e","id":"r.%d.%d","name":"return","cat":"notify","pid":%d,'
                  '"tid":%d,"ts":%.3f}')
_NAMES = {_SEND: "notify slot %d -> %s", _END: "handler slot %d from %s",
          _RETURNED: "call -> %s returned"}
_NAMING = (lib.FAYT_SYS_PUBLISH, lib.FAYT_SYS_LISTEN, lib.FAYT_SYS_CHAN_CLOSE)


def _program(ctx):
    """The script or module a python context runs (from /proc, once per
    track), else its executable's name."""
    exe = os.path.basename(ctx.exe) if ctx.exe else "?"
    try:
        with open("/proc/%d/cmdline" % ctx.pid, "rb") as f:
            argv = f.read(4096).split(b"\0")
    except OSError:
        return exe
    if exe.startswith("python"):
        args = [a.decode("utf-8", "replace") for a in argv[1:] if a]
        for i, a in enumerate(args):
            if a == "-m" and i + 1 < len(args):
                return args[i + 1]
            if a == "-c":
                return "%s -c" % exe
            if not a.startswith("-"):
                return os.path.basename(a)
    return exe


def _errname(e):
    return errno.errorcode.get(e, str(e))


class _Area:
    """faytd's side of one context's trace area: its own read position."""
    __slots__ = ("ctx", "buf", "tail", "late", "dropped", "lost", "begun")

    def __init__(self, ctx, head):
        self.ctx = ctx
        self.buf = ffi.buffer(ffi.cast("char *", ctx.page_map.ptr) + lib.FAYT_PAGE_SIZE,
                              RECORDS * _REC_SIZE)
        self.tail = head
        self.late = 0
        self.dropped = 0            # records that failed a check
        self.lost = 0               # records overwritten before faytd read them
        self.begun = {}             # (tid, ring, pos) -> (ts, slot, depth, flags, sender)


class Tracing:
    """faytd's one trace (at most one runs)."""

    def __init__(self, kernel):
        self.k = kernel
        self.on = False
        self._fd = -1
        self._out = []
        self._size = 0
        self._first = True
        self._base = 0
        self._areas = {}            # context id -> _Area
        self._named = {}            # context id -> the label its track was given
        self._labels = {}           # context id -> its label now (dropped when it changes)
        self._quoted = {}           # (kind, slot, context) -> its events' name, as JSON
        self._rings = {}            # ring id -> (sender id, target id), as faytd made them
        self._sps = {}              # share-point id -> identifier, as faytd saw them
        self._sends = {}            # (ring id, pos) -> post time (return flag)
        self._faults = {}           # request id -> [answers]
        self._calls = []            # (ctx, tid) of the calls being performed, innermost last
        self._timer = -1
        self.events = 0
        self.by = None
        kernel.sharepoints.on_destroy.append(self._destroyed)

    # -- start and stop ------------------------------------------------------
    def start(self, fd, by):
        """Trace into fd (taken over: closed at stop).  EBUSY if one runs;
        EINVAL unless fd is a regular file open for writing."""
        try:
            if self.on:
                raise KernelError(errno.EBUSY, "trace: one already runs (started by %s); "
                                  "`fayt trace stop` ends it" % self.by)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KernelError(errno.EINVAL, "trace: the file must be a regular file "
                                  "(a pipe or a device could block faytd)")
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
                raise KernelError(errno.EBADF, "trace: the file is not open for writing")
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self.by, self.on = fd, by, True
        self._out, self._size, self._first, self.events = [], 0, True, 0
        self._base = time.monotonic_ns()
        self._write_raw('{"traceEvents":[\n')
        self._named.clear()
        self._labels.clear()
        self._quoted.clear()
        self._lost_closed = self._dropped_closed = 0
        self._rings = {r.id: (r.sender.id if r.sender else 0, r.target.id)
                       for r in self.k.notifications.rings.values()}
        self._track(None)
        self.k.fast.disabled = 1        # every call through Python: timed here
        self.k.pager.faults.set_trace(True)
        for ctx in list(self.k.contexts.values()):
            self.context_seen(ctx)
        self._arm()
        log.info("trace: started by %s", by)

    def stop(self):
        """Drain everything, complete the JSON, close the file: a summary."""
        if not self.on:
            raise KernelError(errno.ENOENT, "trace: none runs (`fayt trace start FILE`)")
        for ctx in list(self.k.contexts.values()):
            self._drain(ctx, final=True)
            self._area_off(ctx)
        self.k.pager.faults.set_trace(False)
        self.k.fast.disabled = 0
        dropped = sum(a.dropped for a in self._areas.values())
        lost = sum(a.lost for a in self._areas.values()) + self._lost_closed
        dropped += self._dropped_closed
        summary = {"events": self.events, "dropped": dropped, "lost": lost, "by": self.by,
                   "contexts": {str(cid): {"dropped": a.dropped, "lost": a.lost}
                                for cid, a in self._areas.items() if a.dropped or a.lost}}
        self.on = False
        self._flush()
        self._write_raw('\n],"displayTimeUnit":"ns","otherData":%s}\n'
                        % json.dumps({"producer": "faytd", "clock": "CLOCK_MONOTONIC",
                                      "records_dropped": dropped, "records_lost": lost}))
        os.close(self._fd)
        self._fd = -1
        self._areas.clear()
        self._sends.clear()
        self._faults.clear()
        self._disarm()
        log.info("trace: stopped: %d events, %d client records dropped (failed a check), "
                 "%d lost (overwritten before read)", self.events, dropped, lost)
        return summary

    _lost_closed = _dropped_closed = 0

    def shutdown(self):
        if self.on:
            try:
                self.stop()
            except OSError as e:
                log.warning("trace: completing the file: %s", e)

    # -- the timer -------------------------------------------------------------
    def serving(self):
        """The server runs: a trace faytd --trace started may arm its timer."""
        if self.on:
            self._arm()

    def _arm(self):
        srv = self.k.server
        if srv is None:
            return
        if self._timer < 0:
            fd = clib.fayt_timerfd_open()
            if fd < 0:
                log.error("trace: timerfd_create: %s", os.strerror(-fd))
                return
            self._timer = fd
            srv.watch_fd(fd, self._on_timer)
        clib.fayt_timerfd_arm(self._timer, int(DRAIN_S * 1e9))

    def _disarm(self):
        fd, self._timer = self._timer, -1
        if fd >= 0:
            if self.k.server is not None:
                self.k.server.unwatch_fd(fd)
            os.close(fd)

    def _on_timer(self, fd, events):
        clib.fayt_timerfd_drain(fd)
        if not self.on:
            return
        for ctx in list(self.k.contexts.values()):
            self._drain(ctx)
        self._flush()
        clib.fayt_timerfd_arm(fd, int(DRAIN_S * 1e9))

    # -- writing -----------------------------------------------------------------
    def _write_raw(self, text):
        data = text.encode()
        while data:
            n = os.write(self._fd, data)
            data = data[n:]

    def _emit(self, ev):
        self._text(json.dumps(ev, separators=(",", ":")))

    def _text(self, text, n=1):
        """n events already written as JSON (comma-separated)."""
        if self._first:
            self._first = False
        else:
            text = ",\n" + text
        self._out.append(text)
        self._size += len(text)
        self.events += n
        if self._size >= FLUSH_BYTES:
            self._flush()

    def _name(self, kind, slot, peer):
        """A notification event's name, as a JSON string: cached by (kind,
        slot, the other context), dropped when a track's label changes."""
        key = (kind, slot, peer)
        q = self._quoted.get(key)
        if q is None:
            if len(self._quoted) > 4096:
                self._quoted.clear()
            name = (_NAMES[kind] % (slot, self._peer(peer)) if kind != _RETURNED
                    else _NAMES[kind] % self._peer(peer))
            q = self._quoted[key] = json.dumps(name)
        return q

    def _flush(self):
        if self._out and self._fd >= 0:
            try:
                self._write_raw("".join(self._out))
            except OSError as e:
                log.warning("trace: writing: %s; events lost", e)
            self._out, self._size = [], 0

    def _us(self, ns):
        return round((ns - self._base) / 1000, 3)

    # -- tracks ---------------------------------------------------------------
    def _label(self, ctx):
        """What ctx's track is called: its published names and channel
        listeners' names, its program (the script or module python runs,
        else the executable) and its context id."""
        if ctx is None:
            return "faytd"
        names = sorted(n.decode("utf-8", "replace")
                       for n in self.k.published.by_ctx.get(ctx.id, ()))
        names += sorted(lst.name.decode("utf-8", "replace")
                        for lst in self.k.channels.listeners.values() if lst.ctx is ctx)
        head = ", ".join(names) + " " if names else ""
        return "%s(%s, context %d)" % (head, _program(ctx), ctx.id)

    def _track(self, ctx):
        """The pid of ctx's track (faytd's: None), named first if new."""
        key = ctx.id if ctx is not None else 0
        pid = ctx.pid if ctx is not None else os.getpid()
        label = self._labels.get(key)
        if label is None:
            label = self._labels[key] = self._label(ctx)
        if self._named.get(key) != label:
            self._named[key] = label
            args = {"name": label}
            self._emit({"ph": "M", "name": "process_name", "pid": pid, "tid": pid,
                        "args": args})
            if ctx is not None:
                self._emit({"ph": "M", "name": "process_labels", "pid": pid, "tid": pid,
                            "args": {"labels": "exe %s, uid %d, context %d"
                                     % (ctx.exe, ctx.uid, ctx.id)}})
        return pid

    def context_seen(self, ctx):
        """ctx has a context page: its area is switched on."""
        if not self.on or ctx.page_struct is None or ctx.id in self._areas:
            return
        p = ctx.page_struct
        self._areas[ctx.id] = _Area(ctx, p.trace.head)
        p.trace.on = 1
        self._track(ctx)

    def _area_off(self, ctx):
        p = ctx.page_struct
        if p is not None:
            p.trace.on = 0

    def context_gone(self, ctx):
        """ctx died or left: what it recorded, then the end of its track."""
        if not self.on:
            return
        a = self._areas.get(ctx.id)
        if a is None:
            return
        self._drain(ctx, final=True)
        pid = self._track(ctx)
        self._emit({"ph": "i", "s": "p", "name": "context ends", "cat": "context",
                    "pid": pid, "tid": pid, "ts": self._us(time.monotonic_ns()),
                    "args": {"died": not ctx.alive}})
        self._lost_closed += a.lost
        self._dropped_closed += a.dropped
        self._areas.pop(ctx.id, None)
        self._labels.pop(ctx.id, None)

    def named(self, ctx):
        """ctx published or withdrew a name: its track's label follows."""
        if self.on:
            self._labels.pop(ctx.id, None)
            self._quoted.clear()
            self._track(ctx)

    # -- what faytd performs -----------------------------------------------------
    def call_begin(self, ctx, tid):
        """A call of ctx's thread tid is performed from now (calls nest: a
        catch-up performs other contexts' calls inside one)."""
        self._calls.append((ctx, tid))
        return time.monotonic_ns()

    def call_end(self, ctx, tid, op, t0, body):
        if self._calls:
            self._calls.pop()
        if not self.on:
            return
        if op in _NAMING:
            self._labels.pop(ctx.id, None)
            self._quoted.clear()
        if ctx.id not in self._areas:
            self.context_seen(ctx)
        pid = self._track(ctx)
        t1 = time.monotonic_ns()
        err = getattr(body, "errno", 0) if isinstance(body, KernelError) else 0
        args = {"op": op, "errno": err}
        if err:
            args["error"] = _errname(err)
            args["message"] = body.message
        if type(body).__name__ == "Deferred":
            args["deferred"] = True
        self._emit({"ph": "X", "name": OP_NAMES.get(op, "op_%d" % op), "cat": "syscall",
                    "pid": pid, "tid": tid if 0 < tid < TID_MAX else pid, "ts": self._us(t0),
                    "dur": self._us(t1) - self._us(t0), "args": args})

    def _here(self):
        """(pid, tid) of the call being performed, or faytd's track."""
        if self._calls:
            ctx, tid = self._calls[-1]
            return self._track(ctx), tid if 0 < tid < TID_MAX else ctx.pid
        pid = self._track(None)
        return pid, pid

    def _instant(self, name, cat, args, pid=None, tid=None, ts=None):
        if pid is None:
            pid, tid = self._here()
        self._emit({"ph": "X", "name": name, "cat": cat, "pid": pid, "tid": tid,
                    "ts": self._us(ts or time.monotonic_ns()), "dur": 0, "args": args})

    def share(self, ctx, what, sp_id, ident):
        """A share-point created or attached by the call being performed."""
        if not self.on:
            return
        name = ident.decode("utf-8", "replace") if ident is not None else None
        if sp_id:
            self._sps[sp_id] = name
        self._instant("share-point %s %s" % (what, name), "sharepoint",
                      {"share_point": name, "id": sp_id, "what": what})

    def _destroyed(self, d):
        if not self.on:
            return
        name = d.identifier.decode("utf-8", "replace")
        self._sps[d.id] = name
        self._instant("share-point destroy %s" % name, "sharepoint",
                      {"share_point": name, "id": d.id, "what": "destroy",
                       "mapped_by": len(d.captured or ())})

    def recovered(self, pid, sp):
        """faytd released the lock of a dead holder (owner-died set)."""
        if not self.on:
            return
        name = sp.identifier.decode("utf-8", "replace")
        me = self._track(None)
        self._instant("owner-died recovery: %s" % name, "lock",
                      {"share_point": name, "id": sp.id, "dead_pid": pid,
                       "what": "released with the owner-died bit"}, me, me)

    def injected(self, rule, ctx, what, n):
        """A fault injection rule fired (faytd/injection.py)."""
        if not self.on:
            return
        args = {"rule": rule.id, "kind": rule.kind, "what": what, "faults": n}
        if ctx is not None:
            pid = self._track(ctx)
            self._instant("injected: %s" % rule.kind, "inject", args, pid, pid)
        else:
            me = self._track(None)
            args["chain"] = rule.chain.name if rule.chain is not None else None
            self._instant("injected: %s" % rule.kind, "inject", args, me, me)

    # -- the fault engine's lines ---------------------------------------------
    def fault_line(self, text):
        """A FAYT_FAULT_EV_TRACE line (faytd/core/fault.h)."""
        if not self.on:
            return
        f = text.split()
        try:
            if f[0] == "A" and len(f) == 11:
                req = int(f[1])
                if req in self._faults or len(self._faults) < PENDING_MAX:
                    self._faults.setdefault(req, []).append(
                        (int(f[4]), int(f[5]), int(f[6]), int(f[7]), int(f[9])))
            elif f[0] == "D" and len(f) == 8:
                self._fault_done(int(f[1]), int(f[2]), int(f[3]), int(f[4]), int(f[5]),
                                 int(f[6]), int(f[7]))
        except (ValueError, IndexError):
            log.warning("trace: a fault line that does not parse: %r", text)

    def _ctx_of_pid(self, pid):
        for c in self.k.contexts.values():
            if c.pid == pid:
                return c
        return None

    def _fault_done(self, req, region, pid, err, t0, t1, offset):
        answers = self._faults.pop(req, [])
        client = self._ctx_of_pid(pid)
        cpid = self._track(client) if client is not None else pid
        r = self.k.pager.regions.by_id.get(region)
        chain = getattr(r.chain, "name", r.chain) if r is not None else None
        args = {"region": region, "offset": offset, "errno": err,
                "answers": [{"server_pid": a[0], "verdict": _VERDICTS.get(a[1], str(a[1])),
                             "error": a[2], "hop": a[3]} for a in answers]}
        if err:
            args["error"] = _errname(err)
        if chain:
            args["chain"] = chain
        self._emit({"ph": "X", "name": "page fault +%#x" % offset, "cat": "fault",
                    "pid": cpid, "tid": cpid, "ts": self._us(t0),
                    "dur": max(0.0, self._us(t1) - self._us(t0)), "args": args})
        for server_pid, verdict, error, hop, when in answers:
            srv = self._ctx_of_pid(server_pid)
            spid = self._track(srv) if srv is not None else server_pid
            fid = "fault.%d.%d" % (req, hop)
            self._emit({"ph": "s", "id": fid, "name": "page request", "cat": "fault",
                        "pid": cpid, "tid": cpid, "ts": self._us(t0)})
            v = _VERDICTS.get(verdict, str(verdict))
            self._emit({"ph": "X", "name": "page answer %s" % v, "cat": "fault", "pid": spid,
                        "tid": spid, "ts": self._us(when), "dur": 0,
                        "args": {"verdict": v, "error": error, "hop": hop, "offset": offset,
                                 "client_pid": pid}})
            self._emit({"ph": "f", "bp": "e", "id": fid, "name": "page request",
                        "cat": "fault", "pid": spid, "tid": spid, "ts": self._us(when)})

    # -- the contexts' own records ----------------------------------------------
    def _drain(self, ctx, final=False):
        """Read ctx's new records: they are copied in one go, and a
        record counts only if its seq says it was whole when copied and no
        writer can have reused its slot meanwhile (head read again after
        the copy)."""
        a = self._areas.get(ctx.id)
        p = ctx.page_struct
        if a is None or p is None:
            return
        head = p.trace.head
        n = (head - a.tail) & MASK32
        if n > JUMP_MAX:                # head moved back, or further than any writer
            a.dropped += 1              # could between two drains: scribbled
            a.tail = head
            return
        if n == 0:
            return
        if n > RECORDS:
            a.lost += n - RECORDS
            a.tail = (head - RECORDS) & MASK32
        tail, n = a.tail, (head - a.tail) & MASK32
        first = tail % RECORDS              # the records tail..head, in order: one or two
        raw = a.buf[first * _REC_SIZE:min(RECORDS, first + n) * _REC_SIZE]   # slices
        if first + n > RECORDS:
            raw += a.buf[:(first + n - RECORDS) * _REC_SIZE]
        after = p.trace.head
        now = time.monotonic_ns()
        unpack, record, at = _REC.unpack_from, self._record, 0
        while tail != head:
            seq, kind, slot, tid, rid, ts, pos, aux, value = unpack(raw, at)
            at += _REC_SIZE
            if seq != (tail + 1) & MASK32 or ((after - tail) & MASK32) > RECORDS:
                if not final and a.late < LATE_TICKS and ((head - tail) & MASK32) <= 64 \
                        and seq != (tail + 1 + RECORDS) & MASK32:
                    a.late += 1         # taken, not yet written: the next drain
                    break
                a.lost += 1
            elif not record(a, ctx, kind, slot, tid, rid, ts, pos, aux, value, now):
                a.dropped += 1
            a.late = 0
            tail = (tail + 1) & MASK32
        a.tail = tail

    def _ring(self, ring_id):
        got = self._rings.get(ring_id)
        if got is None:
            r = self.k.notifications.rings.get(ring_id)
            if r is not None:
                got = self._rings[ring_id] = (r.sender.id if r.sender else 0, r.target.id)
        return got

    def _ring_of_pair(self, sender_id, target_id):
        r = self.k.notifications.pairs.get((sender_id, target_id))
        if r is None:
            return None
        self._rings[r.id] = (sender_id, target_id)
        return r.id

    def _peer(self, cid):
        if cid == 0:
            return "faytd"
        c = self.k.contexts.get(cid)
        return self._named.get(cid) or (self._label(c) if c is not None else "context %d" % cid)

    def _record(self, a, ctx, kind, slot, tid, rid, ts, pos, aux, value, now):
        """One record of ctx's area, checked: False if it fails a check."""
        base = self._base
        if not (base - SLACK_NS <= ts <= now + SLACK_NS) or not 0 < tid < TID_MAX:
            return False
        pid = self._track(ctx)
        us = (ts - base) / 1000
        # The notification kinds come by the hundred thousand a second:
        # their events are written from templates (_NOTIFY_*), not dicts,
        # with the constants they compare against held in globals.
        if kind == _SEND:
            ring = self._ring_of_pair(ctx.id, rid)
            if ring is None or slot >= _SLOTS:
                return False
            flags = aux & 0xffff
            self._text(_NOTIFY_SEND % (
                self._name(_SEND, slot, rid), pid, tid, us, rid,
                slot, pos, ring, _BOOL[flags & _IMMEDIATE], _BOOL[flags & _RETURN],
                ring, pos, pid, tid, us), 2)
            if flags & _RETURN and len(self._sends) < PENDING_MAX:
                self._sends[(ring, pos)] = (ts, slot)
            return True
        if kind == _BEGIN or kind == _END:
            pair = self._ring(rid)
            if pair is None or pair[1] != ctx.id or slot >= _SLOTS:
                return False
            key = (tid, rid, pos)
            if kind == _BEGIN:
                depth, flags = aux & 0xffff, aux >> 16
                if not 1 <= depth <= _NEST_MAX + 1 or len(a.begun) >= PENDING_MAX:
                    return False
                a.begun[key] = (ts, slot, depth, flags, pair[0])
                if pair[0]:             # faytd's own notices are posted by no context
                    self._text(_NOTIFY_BEGIN % (rid, pos, pid, tid, us))
                return True
            b = a.begun.pop(key, None)
            if b is None or ts < b[0]:
                return False
            t0, slot0, depth, flags, sender = b
            self._text(_NOTIFY_END % (
                self._name(_END, slot0, sender), pid, tid,
                (t0 - base) / 1000, (ts - t0) / 1000, slot0, sender, depth, rid, pos, value,
                _BOOL[flags & _RETURN], _BOOL[flags & _IMMEDIATE]))
            if flags & _RETURN:
                self._text(_NOTIFY_RET_FROM % (rid, pos, pid, tid, us))
            return True
        if kind == _RETURNED:
            ring = self._ring_of_pair(ctx.id, rid)
            if ring is None:
                return False
            sent = self._sends.pop((ring, pos), None)
            t0, slot = sent if sent is not None and sent[0] <= ts else (ts, None)
            self._text(_NOTIFY_RETURN % (
                self._name(_RETURNED, 0, rid), pid, tid, (t0 - base) / 1000,
                (ts - t0) / 1000, rid, "null" if slot is None else slot, ring, pos, value,
                aux, ring, pos, pid, tid, us), 2)
            return True
        if kind == lib.FAYT_TRACE_LOCK_WAIT:
            name = self._sps.get(rid)
            if name is None:
                sp = self.k.sharepoints.get(rid, keep=False)
                if sp is None:
                    return False
                name = self._sps[rid] = sp.identifier.decode("utf-8", "replace")
            if not 0 <= value <= now - ts + SLACK_NS:
                return False
            outcome = "taken" if aux == 0 else _errname(aux)
            self._emit({"ph": "X", "name": "lock wait %s" % name, "cat": "lock", "pid": pid,
                        "tid": tid, "ts": us, "dur": round(value / 1000, 3),
                        "args": {"share_point": name, "id": rid, "waited_ns": value,
                                 "outcome": outcome}})
            return True
        return False
