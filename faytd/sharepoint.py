"""Share-points, as faytd's Python sees them: views of the core's records.

The core (faytd/core/table.c) owns every share-point: its record (id,
identifier, object(s), frames, prot, owner), the name index, the mappings
of it and the journal's S, D and A records.  A share-point is created by
portal(SHARE|ANON, create) and written at once (the meta-structure: lock
free, prot, data length, the morphology with every frame's physical
address), so the creator and every attacher see it before their first
access.  It is in the table from its creation until its destroy, or until
its owner has died and no mapping of it is left; destroy takes the
identifier out of the table at once, and the frames stay referenced by the
mappings that still exist and are freed with the last one.

What Python keeps is what is not hot: lock recovery (a view's meta_page),
the notices of a destroy, the list.  A view (SharePoint) holds the facts
that never change (id, identifier, object, frames, prot, owner) and asks
the core for the rest (destroyed, owner alive, who maps it).

Names: an identifier lives in a namespace (a uid's, or the shared one:
faytd/core/names.c, docs/names.md); the core resolves what a client sent
(SharePoints.resolve) and the index is keyed by (namespace, name).  Python
holds a resolved identifier as a Name: its bytes are the name in its
namespace, its `ns` the namespace.

Locks: when a context dies, its robust records (context page) name the
share-points whose lock it held or was taking.  faytd maps the first page of
such a share-point (lazily; most are never recovered) and releases the lock
with the owner-died bit set, waking one waiter.
"""
import array
import errno

from libportal._abi import ffi, lib

from .frames import KernelError, PAGE, BackingObject
from .native import core, ffi as cffi, lib as clib


def _frames(buf, n):
    """array('I') of the first n frames in a uint32_t[] of the core's."""
    a = array.array("I")
    a.frombytes(cffi.buffer(buf, 4 * n))
    return a

_INFO = cffi.new("struct fayt_sp_info *")
_MAX_MAPPERS = 4096
SHARED = clib.FAYT_NS_SHARED


class Name(bytes):
    """An identifier resolved to its namespace: the bytes of the name in
    it (no "uid:<uid>/"), and `ns`, a uid or SHARED.  Equal to, and hashed
    as, the same name in the same namespace only."""

    def __new__(cls, name, ns):
        self = super().__new__(cls, name)
        self.ns = ns
        return self

    def __eq__(self, other):
        return isinstance(other, Name) and self.ns == other.ns and bytes.__eq__(self, other)

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash((self.ns, bytes(self)))

    def __repr__(self):
        return "Name(%r, %s)" % (bytes(self), "SHARED" if self.ns == SHARED else self.ns)


def namespace_label(ns):
    """A namespace as the list and `fayt ls` show it: "uid:<uid>" or "shared"
    ("uid:<uid>/" + a name addresses a uid's name from outside it)."""
    return "shared" if ns == SHARED else "uid:%d" % ns


class SharePoint:
    """A view of the core's share-point `id` (made by SharePoints.get)."""
    __slots__ = ("id", "identifier", "namespace", "prot", "length", "data_offset",
                 "owner_pid", "owner_uid", "owner_start", "object", "frames", "_backing",
                 "_meta_map", "_meta_count")

    def __init__(self, info, frames):
        self.id = info.id
        self.identifier = cffi.unpack(info.identifier, info.ident_len)
        self.namespace = info.ns
        self.prot = info.prot
        self.length = info.length - info.data_offset        # bytes of data
        self.data_offset = info.data_offset
        self.owner_pid = info.owner_pid
        self.owner_uid = info.owner_uid
        self.owner_start = info.owner_start or None
        self.object = cffi.string(info.object).decode()
        self.frames = frames
        self._backing = None
        self._meta_map = None
        self._meta_count = 0

    def _info(self):
        return _INFO if clib.fayt_core_sp_info(core, self.id, _INFO, cffi.NULL, 0) == 0 else None

    @property
    def destroyed(self):
        i = self._info()
        return i is None or bool(i.destroyed)

    @property
    def owner_alive(self):
        i = self._info()
        return i is not None and bool(i.owner_alive)

    @property
    def captured(self):
        """{(context id, handle): (pid, tid)} of its mappings, now."""
        n = _MAX_MAPPERS
        ctx, handles = cffi.new("uint32_t[]", n), cffi.new("uint64_t[]", n)
        pids, tids = cffi.new("int32_t[]", n), cffi.new("int32_t[]", n)
        got = min(n, clib.fayt_core_sp_mappers(core, self.id, ctx, handles, pids, tids, n))
        return {(ctx[i], handles[i]): (pids[i], tids[i]) for i in range(got)}

    @property
    def backing(self):
        """Its object(s), by name (faytd's own access: lock recovery, the list)."""
        if self._backing is None:
            self._backing = BackingObject.named(0, self.object, self.length + self.data_offset,
                                                self.frames)
        return self._backing

    def meta_page(self):
        """faytd's own mapping of the first page (for lock recovery), made
        afresh if faytd's SIGBUS guard replaced any page since it was made
        (a client truncated an object: this mapping may be a private copy
        now).  KernelError EIO if the object is shorter than a page."""
        count = clib.fayt_sigbus_count()
        if self._meta_map is not None and self._meta_count != count:
            self.close_meta()
        if self._meta_map is None:
            # Python maps its object: never lent to another share-point again.
            clib.fayt_core_sp_expose(core, self.id)
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


class Destroyed:
    """What a destroy leaves for its notices: the share-point's id, its
    identifier and who mapped it at that moment."""
    __slots__ = ("id", "identifier", "captured")

    def __init__(self, sp, captured):
        self.id, self.identifier, self.captured = sp.id, sp.identifier, captured


class _Names:
    """`name in sharepoints.by_name` (a Name): the core's name index."""

    def __contains__(self, name):
        return clib.fayt_core_sp_lookup(core, name.ns, name, len(name)) != 0


class NamedShares(dict):
    """Name -> SPECIAL|SHARE share (the pager's), its names in the core's
    name index too, in their namespaces: so that no share-point takes one."""

    def __setitem__(self, name, sh):
        if name not in self:
            clib.fayt_fast_name_add(core, name.ns, name, len(name))
        super().__setitem__(name, sh)

    def pop(self, name, *default):
        if name in self:
            clib.fayt_fast_name_del(core, name.ns, name, len(name))
        return super().pop(name, *default)

    def __delitem__(self, ident):
        self.pop(ident)

    def clear(self):
        for ident in list(self):
            self.pop(ident)


class SharePoints:
    """The core's share-point table, for faytd's Python."""

    def __init__(self, max_sharepoints):
        self.max = max_sharepoints
        self.by_name = _Names()
        self.on_destroy = []        # callables(Destroyed), after a destroy Python performed
        self._views = {}            # id -> SharePoint (views Python asked for)
        self._frames = cffi.new("uint32_t[]", 64)

    def get(self, sp_id, keep=True):
        """The view of share-point sp_id (in the table, or destroyed and
        still mapped), or None.  keep: remember it (a view that maps the
        meta page for lock recovery must be the same next time); a walk of
        the whole table (the list, the journal, stats) keeps none."""
        v = self._views.get(sp_id)
        if v is not None:
            if clib.fayt_core_sp_info(core, sp_id, _INFO, cffi.NULL, 0) == 0:
                return v
            del self._views[sp_id]
            v.close_meta()
            return None
        if clib.fayt_core_sp_info(core, sp_id, _INFO, cffi.NULL, 0):
            return None
        frames = cffi.new("uint32_t[]", max(1, _INFO.nframes))
        clib.fayt_core_sp_info(core, sp_id, _INFO, frames, _INFO.nframes)
        v = SharePoint(_INFO, _frames(frames, _INFO.nframes))
        if not keep:
            return v
        if len(self._views) > 4096:     # views of gone share-points: forget them now and then
            for i in [i for i in self._views if clib.fayt_core_sp_info(core, i, _INFO,
                                                                     cffi.NULL, 0)]:
                self._views.pop(i).close_meta()
        self._views[sp_id] = v
        return v

    @staticmethod
    def resolve(ctx, identifier, create, field=b"share.identifier"):
        """The Name an identifier ctx sent resolves to, to create or attach
        (names.c); KernelError EINVAL (a malformed "uid:" form) or EPERM
        (another uid's namespace, a shared name its category may not use),
        its message naming field."""
        ref = cffi.new("struct fayt_name_ref *")
        msg = cffi.new("char[]", 512)
        err = clib.fayt_name_resolve(core, ctx.fast, field, identifier,
                                     len(identifier), clib.FAYT_NAME_CREATE if create
                                     else clib.FAYT_NAME_ATTACH, ref, msg, 512)
        if err:
            raise KernelError(err, cffi.string(msg).decode())
        return Name(identifier[ref.at:ref.at + ref.len], ref.ns)

    def lookup(self, name):
        """The id of the share-point named `name` (a Name), or 0."""
        return clib.fayt_core_sp_lookup(core, name.ns, name, len(name))

    def ids(self, after=0, most=None):
        """Ids of the share-points in the table above `after`, in order (the
        first `most`: O(most), whatever the table holds)."""
        if after >= 0xffffffff:
            return []
        n = core.nsharepoints if most is None else min(most, core.nsharepoints)
        out = cffi.new("uint32_t[]", max(1, n))
        got = clib.fayt_core_sp_ids(core, after, out, n)
        return list(out[0:got])

    def __len__(self):
        return core.nsharepoints

    @property
    def next_id(self):
        return core.next_sp_id

    def skip_ids(self, next_id):
        """Never hand out an id below next_id again (a restart: ids of
        share-points destroyed before it may still be in lock records)."""
        clib.fayt_core_skip_sp_ids(core, next_id)

    def adopt(self, rec):
        """A share-point of a journal record (its object checked by the
        caller): into the core's table, its frames adopted.  A record of a
        journal before namespaces (format 1 or 2: rec.namespace None) takes
        the namespace its creator would name it in now: shared if the
        policy shares the name, else its owner's uid."""
        ns = rec.namespace
        if ns is None:
            ns = (SHARED if clib.fayt_names_shared(core, rec.identifier, len(rec.identifier))
                  else rec.uid)
        frames = array.array("I", rec.frames)
        msg = cffi.new("char[]", 256)
        err = clib.fayt_core_sp_adopt(
            core, rec.id, ns, rec.identifier, len(rec.identifier), rec.prot, rec.pid, rec.uid,
            rec.start or 0, rec.length, rec.object.encode(),
            cffi.from_buffer("uint32_t[]", frames) if len(frames) else cffi.NULL, len(frames),
            msg, 256)
        if err:
            raise KernelError(err, cffi.string(msg).decode())

    def owns(self, pid):
        return bool(clib.fayt_core_owns(core, pid))

    def owner_died(self, pid):
        clib.fayt_core_owner_died(core, pid)

    def destroyed(self, sp, captured):
        """Python performed sp's destroy (captured: who mapped it then)."""
        d = Destroyed(sp, captured)
        for hook in self.on_destroy:
            hook(d)
        sp.close_meta()

    def destroy_all(self):
        clib.fayt_core_destroy_all(core)
        for v in self._views.values():
            v.close_meta()
        self._views.clear()
