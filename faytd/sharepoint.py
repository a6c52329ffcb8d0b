"""The share-point table: identifier -> frames, prot, owner, captured threads.

A share-point is created by portal(SHARE|ANON, create) and written at once:
faytd pwrite(2)s the meta-structure (lock free, prot, data length, the
morphology with every frame's physical address) into the new backing object,
so the creator and every attacher see it before their first access.

Lifetime: in the table from creation until destroy(), or until its owner
has died and no captured thread maps it any more.  Destroy takes the
identifier out of the table at once; the frames stay referenced by the
mappings that still exist and are freed with the last one.

Locks: when a context dies, its robust records (context page) name the
share-points whose lock it held or was taking.  faytd maps the first page of
such a share-point (lazily; most are never recovered) and releases the lock
with the owner-died bit set, waking one waiter.
"""
import errno
import os

from libportal._abi import ffi, lib, SHAREPOINT_META

from .frames import KernelError, PAGE, pages
from .native import lib as clib

META_SIZE = ffi.sizeof("struct fayt_sharepoint_meta")


class SharePoint:
    __slots__ = ("id", "identifier", "backing", "prot", "length", "data_offset", "owner_pid",
                 "owner_uid", "owner_alive", "captured", "destroyed", "_meta_map", "created_at",
                 "charged", "owner_start", "_meta_count")

    def __init__(self, sp_id, identifier, backing, prot, owner_pid, owner_uid):
        self.id = sp_id
        self.identifier = identifier
        self.backing = backing
        self.prot = prot
        nframes = len(backing.frames)
        self.data_offset = lib.fayt_sp_data_offset(nframes)
        self.length = backing.length - self.data_offset
        self.owner_pid = owner_pid
        self.owner_uid = owner_uid
        self.owner_alive = True
        self.captured = {}          # (context id, handle) -> (pid, tid)
        self.destroyed = False
        self.charged = None         # (context, bytes) the creator's RAM quota carries
        self.owner_start = None     # the owner's start time (frames.start_time)
        self._meta_map = None
        self._meta_count = 0

    def write_meta(self, paddrs):
        """The meta-structure: lock free, prot, data length, the morphology."""
        self.backing.write(0, SHAREPOINT_META.pack(0, self.prot, self.length, self.backing.length)
                           + paddrs.tobytes())

    def meta_page(self):
        """faytd's own mapping of the first page (for lock recovery), made
        afresh if faytd's SIGBUS guard replaced any page since it was made
        (a client truncated an object: this mapping may be a private copy
        now).  KernelError EIO if the object is shorter than a page."""
        count = lib.fayt_sigbus_count()
        if self._meta_map is not None and self._meta_count != count:
            self.close_meta()
        if self._meta_map is None:
            try:
                self._meta_map = self.backing.map(PAGE)
            except ValueError:          # mmap(2) past the end: the object is shorter
                raise KernelError(errno.EIO, "share-point %r: its object was truncated"
                                  % self.identifier.decode("utf-8", "replace")) from None
            self._meta_count = count
        return ffi.from_buffer(self._meta_map)

    def recover_lock(self):
        lib.fayt_sp_recover(self.meta_page())

    def lock_state(self):
        return lib.fayt_sp_lock_state(self.meta_page())

    def close_meta(self):
        if self._meta_map is not None:
            self._meta_map.close()
            self._meta_map = None


class SharePointTable:
    """Identifiers and ids of live share-points; faytd's only owner of them.

    The C path (faytd/core/serve.c) creates and destroys share-points
    too; every identifier is also in the core's name index (`fast`), so that they
    tell a new one at once, and ids come from one counter there.  What they
    made, faytd takes over (take_over) before Python handles anything."""

    def __init__(self, frames, max_sharepoints, fast):
        self.frames = frames
        self.fast = fast
        self.by_name = {}
        self.by_id = {}
        self.max = max_sharepoints
        self.by_owner = {}          # owner pid -> {sp id}
        self.on_destroy = []        # callables(sp), run before a share-point leaves the table
        self.journal = None         # journal.Journal once faytd serves

    def create(self, identifier, length, prot, owner_pid, owner_uid, owner_start=None):
        if identifier in self.by_name:
            raise KernelError(errno.EEXIST, "share.identifier: %r exists"
                              % identifier.decode("utf-8", "replace"))
        if len(self.by_id) >= self.max:
            raise KernelError(errno.ENOMEM, "share-point table is full (%d)" % self.max)
        n = pages(length)
        if lib.fayt_sp_data_offset(n) >= n * PAGE:
            raise KernelError(errno.EINVAL, "length: %d bytes leave no room for data after "
                              "the meta-structure" % length)
        backing = self.frames.allocate(n * PAGE, split=True)
        sp_id = clib.fayt_core_new_sp_id(self.fast)
        sp = SharePoint(sp_id, identifier, backing, prot, owner_pid, owner_uid)
        sp.owner_start = owner_start
        try:
            sp.write_meta(self.frames.paddrs(backing))
            self._insert(sp)
        except BaseException:
            self.frames.put(backing)
            raise
        if self.journal is not None:
            self.journal.sharepoint_created(sp)
        return sp

    def _insert(self, sp, named=False):
        if not named:
            err = clib.fayt_fast_name_add(self.fast, sp.identifier, len(sp.identifier))
            if err:
                raise KernelError(err, "share.identifier: %r: %s"
                                  % (sp.identifier.decode("utf-8", "replace"), os.strerror(err)))
        self.by_name[sp.identifier] = sp
        self.by_id[sp.id] = sp
        self.by_owner.setdefault(sp.owner_pid, set()).add(sp.id)

    def take_over(self, sp_id, identifier, backing, prot, owner_pid, owner_uid, owner_start):
        """A share-point the fast path made (its name is in C's table, its
        journal record written): now faytd's Python's."""
        sp = SharePoint(sp_id, identifier, backing, prot, owner_pid, owner_uid)
        sp.owner_start = owner_start
        self._insert(sp, named=True)
        return sp

    def adopt(self, rec, backing):
        """A share-point of a journal record, over its adopted backing object.
        Its meta-structure and data are in the object already (and its lock
        as its holder left it)."""
        if rec.identifier in self.by_name or rec.id in self.by_id:
            raise KernelError(errno.EEXIST, "journal: share-point %d named twice" % rec.id)
        sp = SharePoint(rec.id, rec.identifier, backing, rec.prot, rec.pid, rec.uid)
        sp.owner_start = rec.start
        self._insert(sp)
        self.skip_ids(rec.id % 0xfffffffe + 1)
        return sp

    @property
    def next_id(self):
        return self.fast.next_sp_id

    def skip_ids(self, next_id):
        """Never hand out an id below next_id again (a restart: ids of
        share-points destroyed before it may still be in lock records)."""
        clib.fayt_core_skip_sp_ids(self.fast, next_id)

    def lookup(self, identifier):
        sp = self.by_name.get(identifier)
        if sp is None:
            raise KernelError(errno.ENOENT, "share.identifier: no share-point %r"
                              % identifier.decode("utf-8", "replace"))
        return sp

    def capture(self, sp, key, pid, tid):
        """A mapping of sp by (context, handle): one reference to its frames."""
        self.frames.get(sp.backing)
        sp.captured[key] = (pid, tid)

    def release(self, sp, key):
        """Drop a mapping; reclaim an ownerless, unmapped share-point."""
        if sp.captured.pop(key, None) is None:
            return
        self.frames.put(sp.backing)
        if not sp.captured and not sp.owner_alive and not sp.destroyed:
            self.destroy(sp)

    def destroy(self, sp):
        """Take sp out of the table; its frames go with the last mapping."""
        if sp.destroyed:
            return
        for hook in self.on_destroy:
            hook(sp)
        if self.journal is not None:
            self.journal.sharepoint_destroyed(sp)
        sp.destroyed = True
        if self.by_name.pop(sp.identifier, None) is not None:
            clib.fayt_fast_name_del(self.fast, sp.identifier, len(sp.identifier))
        self.by_id.pop(sp.id, None)
        owned = self.by_owner.get(sp.owner_pid)
        if owned is not None:
            owned.discard(sp.id)
            if not owned:
                del self.by_owner[sp.owner_pid]
        sp.close_meta()
        self.frames.put(sp.backing)     # the table's own reference

    def owns(self, pid):
        return pid in self.by_owner

    def owner_died(self, pid):
        for sp_id in list(self.by_owner.pop(pid, ())):
            sp = self.by_id[sp_id]
            sp.owner_alive = False
            if not sp.captured:
                self.destroy(sp)

    def destroy_all(self):
        for sp in list(self.by_id.values()):
            self.destroy(sp)
