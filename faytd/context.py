"""Contexts: one per connected server process, and what it has mapped.

A context is born at the HELLO call with a context page (a 4 KiB sealed memfd
object mapped by faytd and the client).  The page holds the robust lock
records and the notification state (include/fayt/context.h; faytd's side of
notifications is notification.py).

Two events end a context, and they can come in either order:
- its connection closes (EOF): its mappings are dropped, but a process that
  is still alive may still hold share-point locks, so the page is kept;
- its process dies (the pidfd, from pidfd_open(2), becomes readable): its
  locks are recovered, then everything goes.
The pidfd matters because a fork child can keep the socket open after the
context's own process died.

Descriptors: a connected context holds two, its socket and its pidfd; its
context page is mapped with mmap(2) and the object's descriptor closed
(ObjectMap: Python's mmap would keep a copy of it for its whole life).  A
context kept after its connection closed holds none: what lock recovery
needs is the page's mapping, in faytd's memory, and its process's liveness
is looked up by (pid, start time) in /proc, a bounded batch at a time
(Liveness), instead of a pidfd.  So faytd's descriptors bound its
connections, never the contexts that processes leave behind.

Limits (Quotas): how many connections and contexts one uid and one process
may have, for contexts that are not core, and the connections only core
contexts may take (docs/limits.md).  Errors are EAGAIN, as fork(2) past
RLIMIT_NPROC: a process table entry of this user, not memory, is short.
"""
import array
import bisect
import collections
import errno
import os

from libportal._abi import ffi, lib

from .frames import BackingObject, KernelError, shared_field
from .native import core, ffi as cffi, lib as clib

_PROT_RW = 1 | 2                    # PROT_READ | PROT_WRITE


def _frames(buf, n):
    """array('I') of the first n frames in a uint32_t[] of the core's."""
    a = array.array("I")
    a.frombytes(cffi.buffer(buf, 4 * n))
    return a

PAGE_SIZE = ffi.sizeof("struct fayt_context_page")
# The context page object: the page, then its trace area (fayt/context.h).
CONTEXT_BYTES = lib.FAYT_CONTEXT_BYTES


class ObjectMap:
    """faytd's own MAP_SHARED mapping of the first `length` bytes of a
    backing object, holding no descriptor (the object's is closed once
    mapped; the mapping keeps the object alive).  .ptr is its address as a
    char *; close() unmaps it (twice is harmless)."""
    __slots__ = ("addr", "length", "ptr")

    def __init__(self, backing, length):
        fd = backing.open_fd()
        err = ffi.new("int *")
        try:
            addr = lib.fayt_map(fd, length, 0, _PROT_RW, err)
        finally:
            os.close(fd)
        if not addr:
            raise KernelError(errno.ENOMEM, "faytd cannot map its object %s: %s"
                              % (backing.name, os.strerror(err[0])))
        self.addr, self.length = addr, length
        self.ptr = ffi.cast("char *", addr)

    def close(self):
        if self.addr:
            lib.fayt_unmap(self.addr, self.length)
            self.addr, self.ptr = 0, None


class Mapping:
    """One mapped portal of a context: its handle, and what it references."""
    __slots__ = ("handle", "backing", "sp", "pid", "tid", "length", "prot", "type", "charged")

    def __init__(self, handle, type, backing, sp, pid, tid, prot):
        self.handle = handle
        self.type = type
        self.backing = backing
        self.sp = sp
        self.pid = pid
        self.tid = tid
        self.length = backing.length
        self.prot = prot
        self.charged = 0            # bytes of the context's RAM quota it carries


class CoreMapping:
    """A mapping the core holds (a share-point's, or an ANON portal), as
    the Python code that needs one sees it (a chain's backing): made once
    per handle (asking marks its object as Python's: never recycled); its
    RAM charge is the core's."""
    __slots__ = ("ctx", "handle", "type", "backing", "sp_id", "pid", "tid", "length", "prot")
    sp = None                       # its destroy is the core's (syscalls/portal.py)

    def __init__(self, ctx, info, backing):
        self.ctx, self.handle, self.type = ctx, info.handle, info.type
        self.backing, self.sp_id = backing, info.sp_id
        self.pid, self.tid, self.length, self.prot = info.pid, info.tid, info.length, info.prot

    @property
    def charged(self):
        info = cffi.new("struct fayt_map_info *")
        if clib.fayt_core_map_info(core, self.ctx.fast, self.handle, info, cffi.NULL, 0):
            return 0
        return info.charged

    @charged.setter
    def charged(self, value):
        clib.fayt_core_map_set_charged(core, self.ctx.fast, self.handle, value)


class Mappings:
    """A context's mappings by handle: Python's own (SPECIAL portals,
    notification stacks) and, looked up in the core, the core's (share-point
    and ANON portals).  len() counts both (the mapping quota)."""
    __slots__ = ("_ctx", "_py", "_core")

    def __init__(self, ctx):
        self._ctx, self._py, self._core = ctx, {}, {}

    def __len__(self):
        return len(self._py) + self._ctx.fast.nmaps

    def __setitem__(self, handle, m):
        self._py[handle] = m

    def pop(self, handle, default=None):
        self._core.pop(handle, None)
        return self._py.pop(handle, default)

    def own(self):
        """Python's own mappings."""
        return list(self._py.values())

    def own_get(self, handle):
        return self._py.get(handle)

    def get(self, handle, default=None):
        m = self._py.get(handle)
        if m is not None:
            return m
        info = cffi.new("struct fayt_map_info *")
        fast = self._ctx.fast
        if clib.fayt_core_map_info(core, fast, handle, info, cffi.NULL, 0):
            self._core.pop(handle, None)
            return default
        m = self._core.get(handle)
        if m is None:
            frames = cffi.new("uint32_t[]", max(1, info.nframes))
            clib.fayt_core_map_info(core, fast, handle, info, frames, info.nframes)
            backing = BackingObject.named(info.oid, cffi.string(info.object).decode(),
                                          info.length, _frames(frames, info.nframes))
            m = self._core[handle] = CoreMapping(self._ctx, info, backing)
        return m

    def peek(self, handle, default=None):
        """As get(), but a core mapping not looked up before is not kept:
        the core unmaps its mappings without telling Python, so an entry
        kept for a one-off look (a CHAN_PASS of an ANON portal) would stay,
        with its frame list, for the rest of the context's life."""
        known = handle in self._core
        m = self.get(handle, default)
        if not known:
            self._core.pop(handle, None)
        return m

    def __getitem__(self, handle):
        m = self.get(handle)
        if m is None:
            raise KeyError(handle)
        return m

    def __contains__(self, handle):
        return self.get(handle) is not None


def _conn_put(c):
    clib.fayt_core_conn_put(core, c)


class Context:
    """A context.  Its counters (next handle, RAM charged) live in `fast`,
    the struct fayt_fast_conn of faytd's C core (faytd/core/core.h), so
    both count from the same numbers; the core holds its share-point and
    ANON mappings and what it ever mapped."""
    __slots__ = ("id", "sock", "pid", "uid", "gid", "exe", "category", "pidfd", "page",
                 "page_map", "page_struct", "mappings", "connected", "alive",
                 "registered", "tids", "notify_armed", "_start", "fast")

    def __init__(self, cid, sock, pid, uid, gid, exe, category):
        c = clib.fayt_core_conn_new(core)
        if c == cffi.NULL:
            raise MemoryError("faytd: a context's record")
        self.fast = cffi.gc(c, _conn_put)
        if clib.fayt_core_conn_bind(core, c, uid):
            raise MemoryError("faytd: uid %d's account" % uid)
        self.fast.fd = sock.fileno() if sock is not None else -1
        self.fast.ctx_id = cid
        self.fast.pid = pid
        if category is not None and category.id == lib.FAYT_CATEGORY_CORE:
            self.fast.flags |= clib.FAYT_FAST_CONN_PRIO     # its requests are served first
        self.id = cid
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.exe = exe
        self.category = category
        self.pidfd = -1
        self.page = None
        self.page_map = None
        self.page_struct = None
        self.mappings = Mappings(self)
        self.connected = True
        self.alive = True
        self.registered = False
        self.tids = set()           # threads already checked to belong to pid
        self.notify_armed = False   # its runtime handles the doorbell signal
        self._start = None

    @property
    def start(self):
        """The process's start time (frames.start_time)."""
        return self._start

    @start.setter
    def start(self, value):
        self._start = value
        self.fast.start = value or 0

    @property
    def ram(self):
        """Bytes of frames charged to this context's quota (and its uid's:
        the core counts both)."""
        return self.fast.ram

    @ram.setter
    def ram(self, value):
        clib.fayt_core_ram_set(core, self.fast, value)

    def charge(self, nbytes):
        """Charge nbytes of new frames: ENOMEM past this context's quota, its
        uid's limit or (not core) into the RAM reserved for core contexts."""
        msg = cffi.new("char[]", 512)
        err = clib.fayt_core_charge(core, self.fast, nbytes, msg, 512)
        if err:
            raise KernelError(err, cffi.string(msg).decode())

    @property
    def is_core(self):
        return self.category is not None and self.category.id == lib.FAYT_CATEGORY_CORE

    next_handle = shared_field("next_handle")

    def check_tid(self, tid):
        """Whether tid is a thread of this context's process (cached once
        seen; the last one seen is the one the fast path takes)."""
        if tid in self.tids:
            self.fast.tid = tid
            return True
        if tid > 0 and os.path.exists("/proc/%d/task/%d" % (self.pid, tid)):
            self.tids.add(tid)
            self.fast.tid = tid
            return True
        return False

    def make_page(self, tag):
        self.adopt_page(BackingObject(0, tag + ".ctx", CONTEXT_BYTES, []))
        p = self.page_struct
        p.magic = lib.FAYT_CONTEXT_MAGIC
        p.version = lib.FAYT_CONTEXT_VERSION
        p.pid = self.pid
        p.context_id = self.id
        p.notify.provider = lib.FAYT_NO_PROVIDER
        self.registered = True

    def adopt_page(self, obj):
        """Use obj as the context page (a new one, or one a journal names)."""
        self.page = obj
        self.page_map = ObjectMap(obj, CONTEXT_BYTES)
        self.page_struct = ffi.cast("struct fayt_context_page *", self.page_map.ptr)
        self.registered = True

    def new_handle(self):
        h = self.fast.next_handle
        self.fast.next_handle = h + 1
        return h

    def count_mappings(self):
        """Tell the core how many mappings Python holds (its quota check)."""
        self.fast.py_mappings = len(self.mappings.own())

    def lock_records(self):
        """[(sp_id, state)] of the robust records in use."""
        p = self.page_struct
        if p is None:
            return []
        out = []
        for i in range(lib.FAYT_HELD_LOCKS_MAX):
            sp_id = p.held[i].sp_id
            if sp_id:
                out.append((sp_id, p.held[i].state))
        return out

    def mapped_lock_records(self, sharepoints):
        """([(share-point, state)] of the robust records that name a
        share-point this context was granted a mapping of (the core's
        record of it), number of records naming any other).  The records
        are bytes the process writes: only the first kind can ever be acted
        on.  A share-point it mapped that is gone (destroyed, nobody maps
        it) is neither: there is no lock left to act on."""
        mine, ignored = [], 0
        for sp_id, state in self.lock_records():
            if not clib.fayt_core_conn_mapped(core, self.fast, sp_id):
                ignored += 1
                continue
            sp = sharepoints.get(sp_id)
            if sp is not None:
                mine.append((sp, state))
        return mine, ignored

    def mapped_bytes(self):
        return sum(m.length for m in self.mappings.own()) + self.fast.mapped_bytes

    def close_page(self):
        if self.page_map is not None:
            self.page_struct = None
            self.page_map.close()
            self.page_map = None
        if self.page is not None:
            self.page.release()
            self.page = None

    def close_pidfd(self):
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class ContextTable(dict):
    """Contexts by id, and their ids in order, so that a page of
    LIST_CONTEXTS costs O(page) (a bisection, then the page)."""

    def __init__(self):
        super().__init__()
        self._ids = []

    def __setitem__(self, cid, ctx):
        if cid not in self:
            if not self._ids or cid > self._ids[-1]:
                self._ids.append(cid)       # ids are handed out in order
            else:
                bisect.insort(self._ids, cid)
        super().__setitem__(cid, ctx)

    def pop(self, cid, *default):
        if cid in self:
            del self._ids[bisect.bisect_left(self._ids, cid)]
        return super().pop(cid, *default)

    def __delitem__(self, cid):
        if cid not in self:
            raise KeyError(cid)
        self.pop(cid)

    def after(self, after, most):
        """The first `most` contexts whose id is above `after`, in order."""
        i = bisect.bisect_right(self._ids, after)
        return [self[c] for c in self._ids[i:i + most]]


def uncount(counts, key):
    """One less of key in counts (a dict of counts): the entry goes at 0,
    so that a uid's or a process's record does not outlive what it held."""
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


class Quotas:
    """Connections (checked when one is accepted) and registered contexts
    (checked at HELLO; one kept after its connection closed counts until
    it is forgotten), per uid and per process, (pid, start time): the
    limits bind contexts that are not core; everyone counts in the totals,
    whose last `reserved_connections` only core contexts may take."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.max_connections = cfg["max_connections"]     # the server sets it if None
        self.connections = 0            # open connections
        self.noncore_connections = 0    # ... of contexts that are not core
        self.contexts = 0               # registered contexts
        self._conns = collections.Counter()     # ("uid", uid) / ("pid", pid, start) -> open
        self._ctxs = collections.Counter()      # the same keys -> registered contexts
        self._conn_of = {}              # context id -> (its keys, core) while counted
        self._ctx_of = {}
        self._procs = {}                # (pid, start) -> ids of its contexts faytd knows

    def limit_connections(self, most):
        """What faytd's descriptors allow: the limit when the config names
        none, else the lesser of the two."""
        if self.max_connections is None or most < self.max_connections:
            self.max_connections = most

    @staticmethod
    def _keys(uid, pid, start):
        return ("uid", uid), ("pid", pid, start or 0)

    def check_connect(self, uid, pid, start, core):
        """KernelError EAGAIN if a connection of this process may not be
        accepted now."""
        c = self.cfg
        most = self.max_connections
        if most is not None and self.connections >= most:
            raise KernelError(errno.EAGAIN, "connect: faytd has %d connections, its limit "
                              "(config max_connections)" % self.connections)
        if core:
            return
        reserved = c["reserved_connections"]
        if most is not None and self.noncore_connections >= most - reserved:
            raise KernelError(errno.EAGAIN, "connect: the last %d of faytd's %d connections are "
                              "reserved for core servers (config reserved_connections)"
                              % (reserved, most))
        by_uid, by_pid = self._keys(uid, pid, start)
        if self._conns[by_uid] >= c["max_connections_per_uid"]:
            raise KernelError(errno.EAGAIN, "connect: uid %d has %d connections, its limit "
                              "(config max_connections_per_uid)" % (uid, self._conns[by_uid]))
        if self._conns[by_pid] >= c["max_connections_per_process"]:
            raise KernelError(errno.EAGAIN, "connect: pid %d has %d connections, its limit "
                              "(config max_connections_per_process)"
                              % (pid, self._conns[by_pid]))

    def watched_elsewhere(self, ctx):
        """Whether another context of ctx's process is known (connected,
        or kept): it watches the process for what it owns."""
        return bool(self._procs.get((ctx.pid, ctx.start or 0), set()) - {ctx.id})

    def _known(self, ctx):
        self._procs.setdefault((ctx.pid, ctx.start or 0), set()).add(ctx.id)

    def connected(self, ctx):
        self._known(ctx)
        keys = self._keys(ctx.uid, ctx.pid, ctx.start)
        self._conn_of[ctx.id] = (keys, ctx.is_core)
        for key in keys:
            self._conns[key] += 1
        self.connections += 1
        self.noncore_connections += not ctx.is_core

    def disconnected(self, ctx):
        keys, core = self._conn_of.pop(ctx.id, (None, None))
        if keys is None:
            return
        for key in keys:
            uncount(self._conns, key)
        self.connections -= 1
        self.noncore_connections -= not core

    def register(self, ctx, check=True):
        """HELLO: count ctx as a context, or KernelError EAGAIN past a limit
        (check False: a restart's, counted whatever it is)."""
        if ctx.id in self._ctx_of:
            return
        self._known(ctx)
        keys = self._keys(ctx.uid, ctx.pid, ctx.start)
        if check and not ctx.is_core:
            for key, limit, who in ((keys[0], "max_contexts_per_uid", "uid %d" % ctx.uid),
                                    (keys[1], "max_contexts_per_process", "pid %d" % ctx.pid)):
                if self._ctxs[key] >= self.cfg[limit]:
                    raise KernelError(errno.EAGAIN, "hello: %s has %d contexts, its limit (config "
                                      "%s; a context whose connection closed counts while its "
                                      "process holds locks it recorded or share-points it "
                                      "made)" % (who, self._ctxs[key], limit))
        self._ctx_of[ctx.id] = keys
        for key in keys:
            self._ctxs[key] += 1
        self.contexts += 1

    def forget(self, ctx):
        proc = self._procs.get((ctx.pid, ctx.start or 0))
        if proc is not None:
            proc.discard(ctx.id)
            if not proc:
                del self._procs[(ctx.pid, ctx.start or 0)]
        self.disconnected(ctx)
        keys = self._ctx_of.pop(ctx.id, None)
        if keys is not None:
            for key in keys:
                uncount(self._ctxs, key)
            self.contexts -= 1

    def usage(self, uid):
        """{connections, contexts} of uid."""
        return {"connections": self._conns[("uid", uid)], "contexts": self._ctxs[("uid", uid)]}


CHECK_S = 0.05          # Liveness: a batch every CHECK_S seconds ...
CHECK_BATCH = 64        # ... of this many contexts


def process_alive(pid, start):
    """Whether process pid, started at `start` (clock ticks; None: any), is
    alive: /proc/<pid>/stat exists, names that start time and a state that
    is not a zombie's (what a pidfd reports as exited)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return False
    return start is None or int(fields[19]) == start


class Liveness:
    """Contexts kept after their connection closed, watched without a
    descriptor: every CHECK_S the next CHECK_BATCH of them (round robin)
    have their process looked up (process_alive).  Bounded work per tick,
    whatever their number; a death is seen within ceil(n / CHECK_BATCH)
    ticks (n <= CHECK_BATCH: one)."""

    def __init__(self):
        self._ctxs = collections.OrderedDict()      # id -> context, next to check first

    def __len__(self):
        return len(self._ctxs)

    def add(self, ctx):
        self._ctxs[ctx.id] = ctx

    def discard(self, ctx):
        self._ctxs.pop(ctx.id, None)

    def dead(self):
        """The contexts of the next batch whose process is gone."""
        out = []
        for _ in range(min(CHECK_BATCH, len(self._ctxs))):
            cid, ctx = self._ctxs.popitem(last=False)
            self._ctxs[cid] = ctx
            if not process_alive(ctx.pid, ctx.start):
                out.append(ctx)
        return out
