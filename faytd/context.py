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
import os

from libportal._abi import ffi, lib

from .frames import BackingObject, PAGE, shared_field
from .native import ffi as cffi

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


class Context:
    """A context.  Its counters (next handle, RAM charged) live in `fast`,
    the struct fayt_fast_conn that faytd's C core shares
    (faytd/core/core.h), so both count from the same numbers."""
    __slots__ = ("id", "sock", "pid", "uid", "gid", "exe", "category", "pidfd", "page",
                 "page_map", "page_struct", "mappings", "connected", "alive",
                 "registered", "tids", "notify_armed", "_start", "fast", "sp_mapped",
                 "sp_prune_at")

    def __init__(self, cid, sock, pid, uid, gid, exe, category):
        self.fast = cffi.new("struct fayt_fast_conn *")
        self.fast.fd = sock.fileno() if sock is not None else -1
        self.fast.ctx_id = cid
        self.fast.pid = pid
        self.fast.uid = uid
        self.fast.next_handle = 1
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
        self.mappings = {}
        self.connected = True
        self.alive = True
        self.registered = False
        self.tids = set()           # threads already checked to belong to pid
        self.notify_armed = False   # its runtime handles the doorbell signal
        self._start = None
        # Every share-point this context was granted a mapping of, in its
        # life (sp id -> SharePoint): the only ones its lock records may
        # make faytd act on (Kernel.recover_locks).
        self.sp_mapped = {}
        self.sp_prune_at = 64

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
        """Tell the fast path how many mappings Python holds (its quota check)."""
        self.fast.py_mappings = len(self.mappings)

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

    def mapped_lock_records(self):
        """([(share-point, state)] of the robust records that name a
        share-point this context was granted a mapping of, number of
        records naming any other).  The records are bytes the process
        writes: only the first kind can ever be acted on."""
        mine, ignored = [], 0
        for sp_id, state in self.lock_records():
            sp = self.sp_mapped.get(sp_id)
            if sp is None:
                ignored += 1
            else:
                mine.append((sp, state))
        return mine, ignored

    def mapped_bytes(self):
        return sum(m.length for m in self.mappings.values())

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
