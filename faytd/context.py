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
"""
import array
import os

from libportal._abi import ffi, lib

from .frames import BackingObject, PAGE, shared_field
from .native import core, ffi as cffi, lib as clib


def _frames(buf, n):
    """array('I') of the first n frames in a uint32_t[] of the core's."""
    a = array.array("I")
    a.frombytes(cffi.buffer(buf, 4 * n))
    return a

PAGE_SIZE = ffi.sizeof("struct fayt_context_page")


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
        self.fast.fd = sock.fileno() if sock is not None else -1
        self.fast.ctx_id = cid
        self.fast.pid = pid
        self.fast.uid = uid
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

    ram = shared_field("ram", "Bytes of frames charged to this context's quota.")
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
        self.adopt_page(BackingObject(0, tag + ".ctx", PAGE, []))
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
        self.page_map = obj.map(PAGE)
        self.page_struct = ffi.cast("struct fayt_context_page *", ffi.from_buffer(self.page_map))
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
