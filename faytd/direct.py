"""DIRECT over RAM: mappings of named frames, and the grants that allow them.

The Linux facts: each frame of faytd's RAM is a page of one backing object,
a sealed memfd per portal (frames.py); a process maps a page of a memfd only
through a descriptor of it, a descriptor reaches its whole object, and
mmap(2) maps any page-aligned range of it (MAP_SHARED: the same page cache
pages, so every mapping sees every store).  What follows:

- A DIRECT portal names its frames one page at a time (morphology.paddr[]);
  faytd finds the object and page of each, groups consecutive pages of one
  object into runs, and sends one descriptor per object with the runs; the
  client maps each run at its place in the range (MAP_FIXED from the run's
  offset).  The mapping aliases the frames: it sees and changes the bytes
  of the portal (or share-point) that owns them.
- Grants are per object, since a descriptor is: a context makes a whole
  portal or share-point DMA-able (GRANT) for one context or one category,
  up to a prot, while the granting mapping lives.  A DIRECT of a context
  that is not core may name only frames of objects granted to it; core may
  name any frame.  Revoking a grant stops new DIRECT mappings, not those
  made (a device that was given a DMA address keeps it; so does a process
  that mapped a descriptor).
- Lifetime: a DIRECT mapping holds one reference to each frame it names,
  so a frame stays allocated while any mapping refers to it.  A frame the
  owner's unmap frees while a DIRECT still names another frame of the same
  object is free for the allocator; the object (the memfd) goes when none
  of its frames is allocated any more, whoever drops the last.
- Limits: one reply carries at most FAYT_DIRECT_OBJECTS_MAX descriptors
  (objects), and as many runs as fit a message; each run is one mapping in
  the client (vm.max_map_count bounds those of a process).
- Two paths: the grants are the core's table (faytd/core/direct.c), and
  the core performs the common DIRECT (and COW view) itself, frames of
  granted ANON portals and share-points only, as core mappings; this
  module performs the rest (device windows aside: devices.py), with the
  same checks and messages, and its mappings are Python's own.
"""
import array
import errno

from libportal._abi import ffi as abi, lib

from .context import Mapping
from .frames import BackingObject, KernelError, PAGE, RAM_BASE
from .native import core, ffi as cffi, lib as clib

DIRECT = lib.FAYT_PORTAL_DIRECT
OBJECTS_MAX = lib.FAYT_DIRECT_OBJECTS_MAX
# Runs one reply holds after its fixed part (header, fayt_portal_reply, portal_req).
RUNS_MAX = ((lib.FAYT_MSG_MAX - abi.sizeof("struct fayt_rep_hdr")
             - abi.sizeof("struct fayt_portal_reply") - abi.sizeof("struct portal_req"))
            // abi.sizeof("struct fayt_direct_run"))


class DirectBacking:
    """What a DIRECT mapping references: the frames it names (one reference
    each) and the objects that hold them."""
    __slots__ = ("frames", "objects", "length", "private")

    def __init__(self, frames, objects):
        self.frames = frames
        self.objects = objects
        self.length = len(frames) * PAGE
        self.private = None         # a COW view's written pages given frames (cow.py)


class Direct:
    """The objects DIRECT has looked up (by object id); the grants are the
    core's (faytd/core/direct.c), which the C path reads too."""

    def __init__(self, k):
        self.k = k
        self.objects = {}           # oid -> BackingObject (named, with its frames)
        self.fr = k.frames.c
        self._resolve_bufs = None

    # -- objects ---------------------------------------------------------
    def _alive(self, obj):
        """Whether any frame of obj is still its."""
        owner, refs = self.fr.owner, self.fr.refcount
        return any(owner[f] == obj.id and refs[f] for f in obj.frames)

    def object_of(self, oid):
        """The object whose id is oid (a portal's, a share-point's, or one of
        faytd's own), or None."""
        obj = self.objects.get(oid)
        if obj is not None:
            return obj
        obj = self.k.frames.objects.get(oid)
        if obj is None:
            info = cffi.new("struct fayt_map_info *")
            if clib.fayt_core_oid_info(core, oid, info, cffi.NULL, 0):
                return None
            frames = cffi.new("uint32_t[]", max(1, info.nframes))
            clib.fayt_core_oid_info(core, oid, info, frames, info.nframes)
            obj = BackingObject.named(oid, cffi.string(info.object).decode(), info.length,
                                      array.array("I", cffi.buffer(frames, 4 * info.nframes)[:]))
        self.objects[oid] = obj
        return obj

    # -- grants (the core's table: faytd/core/direct.c) --------------------
    def grant(self, ctx, handle, backing, kind, to, prot, revoke):
        """ctx's mapping `handle` (its backing object) made DMA-able for
        (kind, to) up to prot, or that grant taken back.  The grant lasts
        while that mapping does."""
        oid = backing.id
        if not revoke:
            mine = clib.fayt_direct_grants_by(core, ctx.id)
            if mine >= self.k.cfg["max_mappings_per_context"]:
                raise KernelError(errno.ENOMEM, "this context has %d grants, the quota "
                                  "(max_mappings_per_context)" % mine)
            self.objects.setdefault(oid, backing)
        if clib.fayt_direct_grant(core, oid, ctx.id, handle, kind, to, prot, bool(revoke)):
            raise KernelError(errno.ENOMEM, "faytd: out of memory for a grant")

    def granted_prot(self, ctx, oid):
        """The prot ctx's grants of object oid allow (0: none)."""
        return clib.fayt_direct_granted_prot(core, ctx.fast, oid)

    def revoke_to(self, ctx, to):
        """Take back every grant ctx made to context `to` (not to a
        category); how many.  DIRECT mappings already made stay."""
        return clib.fayt_direct_revoke_to(core, ctx.id, to.id)

    def context_gone(self, ctx):
        clib.fayt_direct_context_gone(core, ctx.id)

    # -- DIRECT ----------------------------------------------------------
    def resolve(self, ctx, prot, paddrs):
        """The frames paddrs (an array('Q')) name, and the runs (part object,
        first page, pages, byte offset in the range) they make; EINVAL,
        EFAULT, EPERM naming the entry at fault.  The frames are looked up
        by the core in one call (fayt_frames_resolve); the grants once per
        run."""
        n = len(paddrs)
        fr = self.fr
        frames = array.array("I", bytes(4 * n))
        c = self._bufs(n)
        bad = c["bad"]
        why = clib.fayt_frames_resolve(fr, cffi.from_buffer("uint64_t[]", paddrs), n,
                                       cffi.from_buffer("uint32_t[]", frames), c["oid"],
                                       c["page"], c["pages"], c["at"], c["nruns"], bad)
        if why:
            i = bad[0]
            pa = paddrs[i]
            field = "morphology.paddr[%d]" % i
            if why == clib.FAYT_FRAMES_UNALIGNED:
                raise KernelError(errno.EINVAL, "%s: %#x is not 4 KiB aligned" % (field, pa))
            if why == clib.FAYT_FRAMES_UNBACKED:
                raise KernelError(errno.EFAULT, "%s: %#x is not backed (faytd's RAM is "
                                  "%#x..%#x; no MMIO window is there)"
                                  % (field, pa, RAM_BASE, RAM_BASE + fr.nframes * PAGE))
            raise KernelError(errno.EFAULT, "%s: frame %#x is free" % (field, pa))
        core_ctx = ctx.is_core
        runs = []                   # [part, page in part, pages, at]
        checked = {}
        for r in range(c["nruns"][0]):
            oid, page, pages, at = c["oid"][r], c["page"][r], c["pages"][r], c["at"][r]
            obj = checked.get(oid)
            if obj is None:
                field = "morphology.paddr[%d]" % at
                pa = paddrs[at]
                own = self.k.cow.private.get(oid)
                if not core_ctx and not (own is not None and own.ctx is ctx):
                    allowed = self.granted_prot(ctx, oid)
                    if not allowed:
                        raise KernelError(errno.EPERM, "%s: frame %#x is in no portal or "
                                          "share-point granted to this context" % (field, pa))
                    if prot & ~allowed:
                        raise KernelError(errno.EPERM, "%s: frame %#x: prot %#x asked, its "
                                          "grant allows %#x" % (field, pa, prot, allowed))
                obj = self.object_of(oid) or own
                if obj is None:
                    raise KernelError(errno.EFAULT, "%s: frame %#x is in no object faytd "
                                      "can map" % (field, pa))
                checked[oid] = obj
            if obj.tail is not None:        # a split share-point: page 0, then the rest
                if page == 0:
                    runs.append([obj, 0, 1, at * PAGE])
                    page, pages, at = 1, pages - 1, at + 1
                if pages:
                    runs.append([obj.tail, page - 1, pages, at * PAGE])
            else:
                runs.append([obj, page, pages, at * PAGE])
        return frames, runs, list(checked.values())

    def _bufs(self, n):
        """The core's output arrays for n entries (kept for the next call)."""
        b = self._resolve_bufs
        if b is None or b["n"] < n:
            m = max(n, 64)
            b = self._resolve_bufs = {
                "n": m, "oid": cffi.new("uint32_t[]", m), "page": cffi.new("uint32_t[]", m),
                "pages": cffi.new("uint32_t[]", m), "at": cffi.new("uint32_t[]", m),
                "nruns": cffi.new("uint32_t *"), "bad": cffi.new("uint32_t *")}
        return b

    @staticmethod
    def check_range(length, paddrs):
        if length % PAGE:
            raise KernelError(errno.EINVAL, "length: %d is not a multiple of 4096 (DIRECT maps "
                              "whole frames)" % length)
        if len(paddrs) != length // PAGE:
            raise KernelError(errno.EINVAL, "morphology.length: DIRECT names one paddr[] entry "
                              "per 4 KiB of length (%d), %d named" % (length // PAGE, len(paddrs)))

    @staticmethod
    def check_runs(runs, parts, what="a DIRECT portal"):
        """What one reply can carry: EINVAL naming morphology.paddr past it,
        or for private pages of a COW view (no object holds them)."""
        for p in parts:
            if p.name is None and hasattr(p, "ctx"):
                raise KernelError(errno.EINVAL, "morphology.paddr: frames of pages a COW view "
                                  "wrote are in its process's memory, not in an object: %s "
                                  "cannot map them (a strict snapshot copies them)" % what)
        if len(parts) > OBJECTS_MAX:
            raise KernelError(errno.EINVAL, "morphology.paddr: frames of %d objects; one portal "
                              "maps at most %d (descriptors per reply)"
                              % (len(parts), OBJECTS_MAX))
        if len(runs) > RUNS_MAX:
            raise KernelError(errno.EINVAL, "morphology.paddr: %d runs of frames; one reply "
                              "holds at most %d" % (len(runs), RUNS_MAX))

    def map(self, ctx, tid, prot, length, paddrs):
        """A DIRECT mapping of ctx: (Mapping, runs, parts): the caller
        packs the reply and opens one descriptor per part."""
        k = self.k
        self.check_range(length, paddrs)
        if len(self.objects) > 4096:         # forget the objects that are gone
            self.objects = {o: x for o, x in self.objects.items() if self._alive(x)}
        frames, runs, objects = self.resolve(ctx, prot, paddrs)
        parts = list(dict.fromkeys(r[0] for r in runs))
        self.check_runs(runs, parts)
        if len(ctx.mappings) >= k.cfg["max_mappings_per_context"]:
            raise KernelError(errno.ENOMEM, "this context has %d mappings, the quota"
                              % len(ctx.mappings))
        if not ctx.check_tid(tid):
            raise KernelError(errno.ESRCH, "tid %d is not a thread of pid %d" % (tid, ctx.pid))
        clib.fayt_frames_get(self.fr, cffi.from_buffer("uint32_t[]", frames), len(frames))
        m = Mapping(ctx.new_handle(), DIRECT, DirectBacking(frames, objects), None, ctx.pid,
                    tid, prot)
        k.add_mapping(ctx, m)
        return m, runs, parts

    def unmap(self, m):
        """m's references go; an object none of whose frames is allocated
        any more is released."""
        self.release(m.backing)

    def release(self, b):
        """b's (a DirectBacking's) references go, and with them every
        object none of whose frames is allocated any more."""
        if b.private is not None:
            self.k.cow.forget(b.private)
            b.private = None
        if not len(b.frames):
            return
        clib.fayt_frames_put(self.fr, cffi.from_buffer("uint32_t[]", b.frames), len(b.frames))
        b.frames = array.array("I")
        for obj in b.objects:
            if obj.name is not None and not self._alive(obj):
                self.objects.pop(obj.id, None)
                self.k.frames.objects.pop(obj.id, None)
                obj.release()

