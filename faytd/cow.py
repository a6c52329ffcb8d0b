"""COW portals: views of frames, copy-on-write, in two modes.

The Linux facts: a MAP_PRIVATE mapping of a file gets a private anonymous
copy of a page on its first write to it (the kernel's copy-on-write: no
trap, no faytd), and until then reads the page cache, so it sees later
writes of others to pages it has not written.  Zircon calls that
SNAPSHOT_AT_LEAST_ON_WRITE.  Stores by other processes into a shared object
cannot be trapped or paused, so a strict snapshot can only be a copy.

- FAYT_COW_ON_WRITE: faytd sends read-only descriptors of the objects that
  hold the source frames, with their runs, as for DIRECT (direct.py); the
  client maps them MAP_PRIVATE.  The view's writes never reach the source.
  It holds a reference to each source frame (they outlive the source), and
  its possible private pages are charged to the caller's RAM quota at
  creation when it is writable, as Linux charges a private writable
  mapping (its commit charge).
- FAYT_COW_SNAPSHOT: a new object with frames of its own (charged), filled
  by one memmove per run of the source, both mapped in faytd, in a thread
  (deferred.py: ctypes drops the GIL for the copy), off faytd's loop; the source frames are referenced for the copy only.
  Nothing changes it afterwards but the view itself.  Bytes others write
  while the copy runs may be torn; a caller that needs consistency holds
  the share-point's lock across the call.

The source is frames the caller may map: any frame for core, else frames
of portals granted to it with PROT_READ (direct.py's rules); or a
share-point named by share.identifier (morphology.paddr[] empty), which the
caller may read if it may attach it PROT_READ: the view is its mapping from
offset 0 (meta-structure included), `length` bytes, its runs built from
the share-point's objects at once (no frame named one by one).  The mode is
portal_req.share.type.
"""
import array
import ctypes
import errno
import os
import threading

from libportal._abi import lib
from libportal.direct import map_fd

from .context import Mapping
from .deferred import Deferred
from .direct import DirectBacking
from .frames import BackingObject, KernelError, PAGE
from .native import core, ffi as cffi, lib as clib
from .policy import Policy

_libc = ctypes.CDLL(None, use_errno=True)
_MAP_SHARED, _MAP_POPULATE = 0x01, 0x8000

COW = lib.FAYT_PORTAL_COW
_SP_INFO = cffi.new("struct fayt_sp_info *")
MODES = (lib.FAYT_COW_ON_WRITE, lib.FAYT_COW_SNAPSHOT)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_pvr = _libc.process_vm_readv
_pvr.restype = ctypes.c_ssize_t
_pvr.argtypes = (ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.POINTER(_Iovec),
                 ctypes.c_ulong, ctypes.c_ulong)


def read_process(pid, remote, local, n):
    """process_vm_readv(2) of n bytes at remote in pid into local (this
    process's); OSError on failure (EPERM: faytd may not ptrace pid)."""
    while n:
        li, ri = _Iovec(local, n), _Iovec(remote, n)
        got = _pvr(pid, ctypes.byref(li), 1, ctypes.byref(ri), 1, 0)
        if got <= 0:
            e = ctypes.get_errno() if got < 0 else errno.EFAULT
            raise OSError(e, os.strerror(e))
        remote, local, n = remote + got, local + got, n - got


def _copy_runs(plan, srcs, dst):
    """Each run (source key, offset, bytes, offset in dst) copied from
    srcs[key] into dst with copy_file_range(2): True, or False if the
    kernel cannot (nothing to undo: the caller copies again its way)."""
    for key, off, n, at in plan:
        while n:
            try:
                got = os.copy_file_range(srcs[key], dst, n, off, at)
            except OSError as e:
                if e.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    return False
                raise
            if got <= 0:
                raise OSError(errno.EIO, "copy_file_range: the source ended early")
            off, at, n = off + got, at + got, n - got
    return True


class PrivatePages:
    """The pages a COW view at least on write has written, given frames
    when asked (COW_PADDR).  They are anonymous pages of the view's process,
    in no object: DIRECT cannot map them; a strict snapshot copies them
    from that process with process_vm_readv(2).  Its frames' owner id is
    this record's, their offset the page's index in the view."""
    __slots__ = ("id", "ctx", "m", "base", "frames", "tail", "name")

    def __init__(self, oid, ctx, m, base):
        self.id, self.ctx, self.m, self.base = oid, ctx, m, base
        self.frames = {}            # page index -> frame
        self.tail = self.name = None


def _prefault(fd, length):
    """Allocate every page of an object ahead of its use (a thread of its
    own: shmem allocates and zeroes each page, most of a snapshot's cost),
    at the lowest CPU priority: it is work ahead of need."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)    # this thread
        os.posix_fallocate(fd, 0, length)
    except OSError:
        pass                        # the copy allocates what is missing
    finally:
        os.close(fd)


class Cow:
    def __init__(self, k):
        self.k = k
        self.private = {}           # owner id -> PrivatePages
        self.copying = set()        # contexts whose snapshot is being copied (one each)
        # The spare: one object made ahead, its pages allocated by a thread,
        # for the next strict snapshot of the same length (config
        # cow_snapshot_spare bounds it; docs/limits.md).  No frames, no
        # charge until a snapshot takes it.
        self.spare = None

    def _take_spare(self, length):
        """The spare if it has this length (it is the caller's then), else None."""
        obj = self.spare
        if obj is not None and obj.length == length:
            self.spare = None
            return obj
        return None

    def _refill(self, length):
        """A new spare of `length` bytes (none past cow_snapshot_spare), made
        here (the pool's object) and filled by a thread; the old one goes."""
        if self.spare is not None or not 0 < length <= self.k.cfg["cow_snapshot_spare"]:
            return
        try:
            obj = BackingObject(0, self.k.frames.tag, length, array.array("I"))
            fd = obj.open_fd()
        except (KernelError, OSError):
            return                  # no object now: the next snapshot makes its own
        self.spare = obj
        threading.Thread(target=_prefault, args=(fd, length), name="faytd-spare",
                         daemon=True).start()

    def drop_spare(self):
        if self.spare is not None:
            self.spare.release()
            self.spare = None

    def assign(self, ctx, handle, base, pages):
        """Frames for the written pages of ctx's view `handle` (mapped at
        base): their physical addresses, in order."""
        k = self.k
        m = ctx.mappings.own_get(handle) or self.adopt(ctx, handle)
        if m is None:
            raise KernelError(errno.EBADF, "handle: %d names no mapping of this context" % handle)
        b = m.backing
        if m.type != COW or not isinstance(b, DirectBacking):
            raise KernelError(errno.EINVAL, "handle: %d is not a COW view at least on write "
                              "(only its written pages get frames)" % handle)
        n = len(b.frames)
        for i, p in enumerate(pages):
            if p >= n:
                raise KernelError(errno.EINVAL, "page[%d]: %d is past the view's %d pages"
                                  % (i, p, n))
        pp = b.private
        fr = k.frames.c
        if pp is None:
            pp = b.private = PrivatePages(fr.next_oid, ctx, m, base)
            fr.next_oid += 1
            self.private[pp.id] = pp
        pp.base = base
        new = list(dict.fromkeys(p for p in pages if p not in pp.frames))
        if new:
            got = array.array("I", bytes(4 * len(new)))
            if clib.fayt_frames_alloc(fr, len(new), pp.id, cffi.from_buffer("uint32_t[]", got)):
                raise KernelError(errno.ENOMEM, "page: %d frames asked, %d free in faytd's RAM"
                                  % (len(new), k.frames.free_frames))
            for p, f in zip(new, got):
                fr.offset[f] = p
                pp.frames[p] = f
        return [k.frames.paddr(pp.frames[p]) for p in pages]

    def adopt(self, ctx, handle):
        """ctx's view `handle` if the core made it (faytd/core/direct.c: a
        view at least on write over granted RAM), made Python's own mapping
        with the same handle, its frames' references and its charge (its
        written pages get frames here); None if the core holds no view of
        that handle."""
        k = self.k
        info = cffi.new("struct fayt_map_info *")
        if clib.fayt_core_map_info(core, ctx.fast, handle, info, cffi.NULL, 0) \
                or info.type != COW:
            return None
        frames = cffi.new("uint32_t[]", max(1, info.nframes))
        clib.fayt_core_map_info(core, ctx.fast, handle, info, frames, info.nframes)
        objects, i = [], 0
        o = cffi.new("struct fayt_map_info *")
        while not clib.fayt_direct_map_object(core, ctx.fast, handle, i, o, cffi.NULL, 0):
            ofr = cffi.new("uint32_t[]", max(1, o.nframes))
            clib.fayt_direct_map_object(core, ctx.fast, handle, i, o, ofr, o.nframes)
            obj = k.direct.objects.get(o.oid)
            if obj is None or obj.name is None:
                obj = k.direct.objects[o.oid] = BackingObject.named(
                    o.oid, cffi.string(o.object).decode(), o.length,
                    array.array("I", cffi.buffer(ofr, 4 * o.nframes)[:]))
            objects.append(obj)
            i += 1
        charged = info.charged
        clib.fayt_direct_disown(core, ctx.fast, handle)
        ctx.mappings.pop(handle)
        m = Mapping(handle, COW, DirectBacking(array.array("I", cffi.buffer(
            frames, 4 * info.nframes)[:]), objects), None, info.pid, info.tid, info.prot)
        m.charged = charged
        k.add_mapping(ctx, m)
        return m

    def forget(self, pp):
        """The view goes: its private frames are freed."""
        self.private.pop(pp.id, None)
        frames = array.array("I", pp.frames.values())
        pp.frames = {}
        if frames:
            clib.fayt_frames_put(self.k.frames.c, cffi.from_buffer("uint32_t[]", frames),
                                 len(frames))

    @staticmethod
    def check_mode(mode):
        if mode not in MODES:
            raise KernelError(errno.EINVAL, "share.type: %d is not a COW mode (0: at least on "
                              "write, 1: strict snapshot)" % mode)

    def sharepoint_source(self, ctx, ident, length):
        """The source a COW request names by share.identifier: the
        share-point's mapping from offset 0, `length` bytes (a multiple of
        4096, at most its mapping's), as (frames, runs, objects).  The rights
        are a PROT_READ attach's: EPERM for a name the caller may not use
        (names.c), ENOENT naming share.identifier, EACCES if the share-point
        does not grant PROT_READ."""
        k = self.k
        shown = ident.decode("utf-8", "replace")
        name = k.sharepoints.resolve(ctx, ident, False)
        if name in k.sharepoints.by_name:
            k.catch_up(ctx)         # a destroy already sent by another process comes first
        sp_id = k.sharepoints.lookup(name)
        info = _SP_INFO
        if not sp_id or clib.fayt_core_sp_info(core, sp_id, info, cffi.NULL, 0):
            raise KernelError(errno.ENOENT, "share.identifier: no share-point %r" % shown)
        Policy.check_prot(lib.FAYT_PROT_READ, info.prot, "share-point %r" % shown)
        mapped = info.length
        if length % PAGE or length > mapped:
            raise KernelError(errno.EINVAL, "length: %d; a COW view of share-point %r is a "
                              "multiple of 4096 bytes from its offset 0, at most its %d mapped "
                              "bytes" % (length, shown, mapped))
        n = length // PAGE
        # Only the frames the view covers (the core copies its own record).
        buf = cffi.new("uint32_t[]", n)
        clib.fayt_core_sp_info(core, sp_id, info, buf, n)
        frames = array.array("I")
        frames.frombytes(cffi.buffer(buf, 4 * n))
        obj = k.direct.object_of(k.frames.c.owner[frames[0]])
        if obj is None:
            raise KernelError(errno.EFAULT, "share.identifier: share-point %r is in no object "
                              "faytd can map" % shown)
        # Frame i of a share-point is page i of its object (page 0, then its
        # tail's pages, for a split one: the meta page and the data).
        if obj.tail is None:
            runs = [[obj, 0, n, 0]]
        else:
            runs = [[obj, 0, 1, 0]] + ([[obj.tail, 0, n - 1, PAGE]] if n > 1 else [])
        return frames, runs, [obj]

    def _source(self, ctx, tid, mode, length, paddrs, src=None):
        """The source's frames, runs and objects, checked (EINVAL, EFAULT,
        EPERM naming the field at fault; ESRCH; the mapping quota); src:
        already found (a share-point's, sharepoint_source)."""
        k = self.k
        self.check_mode(mode)
        if src is None:
            k.direct.check_range(length, paddrs)
            src = k.direct.resolve(ctx, lib.FAYT_PROT_READ, paddrs)
        if len(ctx.mappings) >= k.cfg["max_mappings_per_context"]:
            raise KernelError(errno.ENOMEM, "this context has %d mappings, the quota"
                              % len(ctx.mappings))
        if not ctx.check_tid(tid):
            raise KernelError(errno.ESRCH, "tid %d is not a thread of pid %d" % (tid, ctx.pid))
        return src

    def on_write(self, ctx, tid, prot, length, paddrs, src=None):
        """An at-least-on-write view: (Mapping, runs, parts), as
        Direct.map; charged `length` if writable."""
        k = self.k
        frames, runs, objects = self._source(ctx, tid, lib.FAYT_COW_ON_WRITE, length, paddrs,
                                             src)
        parts = list(dict.fromkeys(r[0] for r in runs))
        k.direct.check_runs(runs, parts, "a COW view at least on write")
        charged = length if prot & lib.FAYT_PROT_WRITE else 0
        if charged:
            k.charge(ctx, charged)
        clib.fayt_frames_get(k.frames.c, cffi.from_buffer("uint32_t[]", frames), len(frames))
        m = Mapping(ctx.new_handle(), COW, DirectBacking(frames, objects), None, ctx.pid, tid,
                    prot)
        m.charged = charged
        k.add_mapping(ctx, m)
        return m, runs, parts

    def snapshot(self, ctx, tid, prot, length, paddrs, reply, src=None):
        """A strict snapshot: a Deferred whose finish() returns
        reply(Mapping, its object's fd)."""
        k = self.k
        if ctx in self.copying:
            raise KernelError(errno.EBUSY, "a strict snapshot of this context is being made "
                              "(one call at a time per connection)")
        frames, runs, objects = self._source(ctx, tid, lib.FAYT_COW_SNAPSHOT, length, paddrs,
                                             src)
        spare = self._take_spare(length)
        if spare is None and self.spare is not None:    # another length: it goes
            self.drop_spare()
        try:
            obj = k.allocate_for(ctx, length, spare)    # charged, fresh frames
        except BaseException:
            if spare is not None:
                spare.release()
            raise
        fr = k.frames.c
        clib.fayt_frames_get(fr, cffi.from_buffer("uint32_t[]", frames), len(frames))
        try:
            dst = obj.open_fd()
            srcs = {}
            for part, page, n, at in runs:
                if isinstance(part, PrivatePages):
                    self._may_read(part, page)
                elif id(part) not in srcs:
                    srcs[id(part)] = part.open_fd(readonly=True)
        except BaseException:
            self._drop_source(frames, objects)
            k.frames.put(obj)
            ctx.ram -= length
            raise
        lengths = {id(part): part.length for part, *_ in runs
                   if not isinstance(part, PrivatePages)}
        plan = [(id(part), page * PAGE, n * PAGE, at) if not isinstance(part, PrivatePages)
                else (part.ctx.pid, part.base + page * PAGE, n * PAGE, at)
                for part, page, n, at in runs]
        remote = [isinstance(part, PrivatePages) for part, *_ in runs]

        def work():
            # Objects only: one copy_file_range(2) per run, page cache to page
            # cache in the kernel (no page tables: populating a mapping of
            # each side cost ten times the copy), the GIL dropped.
            if not any(remote) and _copy_runs(plan, srcs, dst):
                return
            # Both sides mapped here, populated in one call each (a fault per
            # page of a fresh shmem object costs more than the copy), and one
            # memmove per run: ctypes drops the GIL for it, so faytd's loop
            # runs meanwhile.
            maps = {}
            try:
                os.posix_fallocate(dst, 0, length)
                for key, fd in list(srcs.items()) + [("dst", dst)]:
                    size = length if key == "dst" else lengths[key]
                    maps[key] = (map_fd(0, size, lib.FAYT_PROT_READ | (
                        lib.FAYT_PROT_WRITE if key == "dst" else 0),
                        _MAP_SHARED | _MAP_POPULATE, fd, 0), size)
                base = maps["dst"][0]
                for (key, off, n, at), far in zip(plan, remote):
                    if far:                 # a view's private pages: in its process
                        read_process(key, off, base + at, n)
                    else:
                        ctypes.memmove(base + at, maps[key][0] + off, n)
            finally:
                for a, size in maps.values():
                    lib.fayt_unmap(a, size)

        def close():
            self.copying.discard(ctx)
            self._refill(length)        # for the next one, now that this copy is done
            for fd in srcs.values():
                os.close(fd)
            self._drop_source(frames, objects)

        def finish():
            close()
            m = Mapping(ctx.new_handle(), COW, obj, None, ctx.pid, tid, prot)
            m.charged = length
            k.add_mapping(ctx, m)
            return reply(m, dst)

        def abandon():
            # (ctx, held here, keeps its core record: its charge is taken
            # back even if it has gone, so that its uid's account is right.)
            close()
            os.close(dst)
            k.frames.put(obj)
            ctx.ram -= length

        self.copying.add(ctx)
        return Deferred(work, finish, abandon)

    @staticmethod
    def _may_read(pp, page):
        """EPERM unless faytd may read the view's process (ptrace access):
        one byte of the page, read now."""
        one = ctypes.create_string_buffer(1)
        try:
            read_process(pp.ctx.pid, pp.base + page * PAGE, ctypes.addressof(one), 1)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.ESRCH, errno.EACCES):
                raise KernelError(errno.EPERM, "morphology.paddr: private pages of a COW view "
                                  "of pid %d: faytd may not read that process's memory (%s)"
                                  % (pp.ctx.pid, e.strerror)) from None
            raise KernelError(errno.EFAULT, "morphology.paddr: private pages of a COW view of "
                              "pid %d: not readable at %#x (%s)"
                              % (pp.ctx.pid, pp.base + page * PAGE, e.strerror)) from None

    def _drop_source(self, frames, objects):
        self.k.direct.release(DirectBacking(frames, objects))
