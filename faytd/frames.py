"""Physical memory: 4 KiB frames with physical addresses, and their backing.

faytd emulates a physical address space so that morphology.paddr[] means
something.  RAM is `ram_bytes` starting at RAM_BASE; a frame is its number,
paddr = RAM_BASE + number * 4096.  Each frame records the backing object that
holds it, its page offset there and a reference count, in flat arrays (a few
bytes per frame, so 10,000 one-page share-points cost nothing per frame).

A backing object is one POSIX shared memory object per portal (posix_ipc),
created 0600 with an unguessable name and handed to clients only as a file
descriptor.  One object per portal, not one big RAM file, because an fd
grants all of its object: a client must never get a descriptor that reaches
another portal's memory.  Frames are taken from a free stack, so a portal's
frames need not be contiguous, as on real hardware.

The frame arrays and the free stack are C (libportal/src/frames.c), shared
with faytd's fast system calls (fayt/kernel.h), so that there is one
allocator.  New objects come from the object pool, a C thread that makes
them ahead of need and unlinks released ones (src/objpool.c): neither costs
a reply's time.
"""
import array
import errno
import fcntl
import mmap
import os
import secrets

import posix_ipc

from libportal._abi import ffi, lib

PAGE = 4096
MARKER = "/fayt.%s.statedir"  # a faytd's state directory (per run tag), for others' sweeps (journal.py)
RAM_BASE = lib.FAYT_RAM_BASE  # 1 MiB, as on a PC (fayt/kernel.h)
NAME_PREFIX = "/fayt."
POOL_TARGET = 32             # fresh objects the pool keeps ready
_pool_tag = None             # the run tag whose plain objects come from the pool


def start_time(pid):
    """The start time of pid (clock ticks since boot), or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def run_tag(pid=None):
    """<pid>.<start time>: what names every object of one faytd run.  The
    start time tells a dead faytd's objects from those of a later process
    that got the same pid (in a container, faytd may get the same pid on
    every start)."""
    pid = pid or os.getpid()
    return "%d.%d" % (pid, start_time(pid) or 0)


class KernelError(Exception):
    """A system call fails with errno `err` and `message` (the argument at fault)."""

    def __init__(self, err, message):
        super().__init__(err, message)
        self.errno = err
        self.message = message


def pages(length):
    return (length + PAGE - 1) // PAGE


def shared_field(name, doc=None):
    """A property kept in self.fast, the C struct faytd's fast system calls
    share (fayt/kernel.h): both sides count from the same numbers."""
    return property(lambda self: getattr(self.fast, name),
                    lambda self, v: setattr(self.fast, name, v), doc=doc)


class BackingObject:
    """A POSIX shared memory object holding the frames of one portal.

    faytd keeps the name, not a descriptor: 10,000 share-points must not cost
    10,000 open files.  open_fd() gives a fresh descriptor for one reply (the
    server closes it once sent); a new object keeps its creation descriptor
    until the first open_fd() hands it out."""

    __slots__ = ("id", "name", "length", "frames", "_fd", "__weakref__")

    def __init__(self, oid, tag, length, frames):
        self.id = oid
        self.length = length
        self.frames = frames
        if tag == _pool_tag:
            name = ffi.new("char[]", lib.FAYT_OBJ_NAME_MAX)
            fd = lib.fayt_objpool_take(length, name)
            if fd < 0:
                raise KernelError(errno.ENFILE if -fd in (errno.EMFILE, errno.ENFILE)
                                  else errno.ENOMEM,
                                  "faytd cannot create a backing object: %s" % os.strerror(-fd))
            self.name, self._fd = ffi.string(name).decode(), fd
            return
        for _ in range(4):
            self.name = "%s%s.%s" % (NAME_PREFIX, tag, secrets.token_hex(12))
            try:
                shm = posix_ipc.SharedMemory(self.name, posix_ipc.O_CREX, mode=0o600, size=length)
                break
            except posix_ipc.ExistentialError:
                continue
            except OSError as e:
                raise KernelError(errno.ENFILE if e.errno in (errno.EMFILE, errno.ENFILE)
                                  else errno.ENOMEM,
                                  "faytd cannot create a backing object: %s" % e) from None
        else:
            raise KernelError(errno.EEXIST, "could not name a backing object")
        self._fd = shm.fd

    @classmethod
    def named(cls, oid, name, length, frames):
        """An object faytd made and knows by name (the fast path's)."""
        obj = cls.__new__(cls)
        obj.id, obj.name, obj.length, obj.frames, obj._fd = oid, name, length, frames, -1
        return obj

    @classmethod
    def adopt(cls, oid, name, length, frames):
        """The existing object `name` (a restarted faytd's journal names it);
        KernelError ENOENT if it is gone or EINVAL if its size is not `length`."""
        obj = cls.__new__(cls)
        obj.id, obj.name, obj.length, obj.frames, obj._fd = oid, name, length, frames, -1
        try:
            fd = posix_ipc.SharedMemory(name).fd
        except posix_ipc.ExistentialError:
            raise KernelError(errno.ENOENT, "object %s is gone" % name) from None
        try:
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size != length:
            raise KernelError(errno.EINVAL, "object %s has %d bytes, the journal says %d"
                              % (name, size, length))
        return obj

    def write(self, offset, data):
        """pwrite(2) into the object (keeps the creation descriptor if any)."""
        fd = self._fd if self._fd >= 0 else self.open_fd()
        try:
            os.pwrite(fd, data, offset)
        finally:
            if fd != self._fd:
                os.close(fd)

    def open_fd(self):
        """A descriptor of the object, owned by the caller."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            return fd
        if self.name is None:
            raise KernelError(errno.EBADF, "backing object already released")
        return posix_ipc.SharedMemory(self.name).fd

    def map(self, length=None):
        """faytd's own mmap.mmap of the object (the first `length` bytes)."""
        fd = self.open_fd()
        try:
            return mmap.mmap(fd, self.length if length is None else length)
        finally:
            os.close(fd)

    def release(self):
        """Unlink the name soon (the pool's thread does it; mappings stay
        valid until unmapped)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.name is not None:
            lib.fayt_objpool_release(self.name.encode())
            self.name = None


class FrameAllocator:
    """Hands out frames of the emulated RAM and tracks their references
    (the arrays are C's: fayt/kernel.h struct fayt_frames)."""

    def __init__(self, ram_bytes, tag=None):
        if ram_bytes < PAGE:
            raise ValueError("ram must be at least one frame")
        self.nframes = ram_bytes // PAGE
        self.tag = tag or run_tag()
        self.c = ffi.new("struct fayt_frames *")
        if lib.fayt_frames_init(self.c, self.nframes):
            raise MemoryError("frame arrays for %d frames" % self.nframes)
        self.objects = {}                # id -> BackingObject

    def start_pool(self):
        """Start the object pool's thread (when faytd starts serving: a start
        that fails before leaves no pooled object behind).  Until then, and
        after release_all(), objects are made one by one."""
        global _pool_tag
        err = lib.fayt_objpool_start(("%s%s." % (NAME_PREFIX, self.tag)).encode(), POOL_TARGET)
        if err:
            raise OSError(err, "faytd: cannot start its object pool: %s" % os.strerror(err))
        _pool_tag = self.tag

    @property
    def free_frames(self):
        return lib.fayt_frames_free(self.c)

    def paddr(self, frame):
        return RAM_BASE + frame * PAGE

    def paddrs(self, obj):
        """array('Q') of the physical addresses of obj's frames, in order."""
        return array.array("Q", [RAM_BASE + f * PAGE for f in obj.frames])

    def allocate(self, length):
        """A new backing object of `length` bytes (page multiple) with fresh frames,
        each referenced once."""
        n = pages(length)
        if n > self.free_frames:
            raise KernelError(errno.ENOMEM, "length: %d frames asked, %d free in faytd's RAM"
                              % (n, self.free_frames))
        frames = array.array("I", bytes(4 * n))
        oid = self.c.next_oid
        lib.fayt_frames_alloc(self.c, n, oid, ffi.from_buffer("uint32_t[]", frames))
        try:
            obj = BackingObject(oid, self.tag, n * PAGE, frames)
        except BaseException:
            self.put_frames(frames)
            raise
        self.c.next_oid = oid + 1
        self.objects[oid] = obj
        return obj

    def put_frames(self, frames):
        """One reference less to each of these frames; how many were freed."""
        return lib.fayt_frames_put(self.c, ffi.from_buffer("uint32_t[]", frames), len(frames)) \
            if len(frames) else 0

    def adopt(self, name, length, frames):
        """Take back an object and its frames from the journal (restart):
        each frame referenced once, as allocate() leaves them."""
        frames = array.array("I", frames)
        oid = self.c.next_oid
        if len(frames) * PAGE != length or lib.fayt_frames_adopt(
                self.c, ffi.from_buffer("uint32_t[]", frames), len(frames), oid):
            raise KernelError(errno.EINVAL, "frames %s do not fit this RAM (%d frames) or are "
                              "taken twice" % (list(frames[:8]), self.nframes))
        try:
            obj = BackingObject.adopt(oid, name, length, frames)
        except BaseException:
            self.put_frames(frames)
            raise
        self.c.next_oid = oid + 1
        self.objects[obj.id] = obj
        return obj

    def adopted(self):
        """After the last adopt(): the frames below the highest adopted one
        that no object took are free."""
        lib.fayt_frames_adopted(self.c)

    def take_over(self, obj):
        """An object the fast path made (its frames counted already)."""
        self.objects[obj.id] = obj

    def get(self, obj):
        """One more reference to every frame of obj."""
        if len(obj.frames):
            lib.fayt_frames_get(self.c, ffi.from_buffer("uint32_t[]", obj.frames), len(obj.frames))

    def put(self, obj):
        """Drop one reference to every frame of obj; at zero the frames are free
        again and the backing object is released."""
        if self.put_frames(obj.frames) == len(obj.frames):
            self.objects.pop(obj.id, None)
            obj.release()

    def release_all(self):
        """A clean stop: every object goes, now."""
        for obj in list(self.objects.values()):
            obj.release()
        self.objects.clear()
        lib.fayt_objpool_stop()


def sweep_stale(kept_for=None, own_tag=None):
    """Unlink the objects left by faytd runs that ended (see run_tag).

    Names are /fayt.<pid>.<start>.<random> (/fayt.<pid>.<random> before
    run tags: those go when the pid no longer runs).  kept_for(tag, marker)
    -> the set of names to keep among a dead run's objects (those a journal
    names, see journal.py; `marker` is the name of its state-directory
    marker or None).  A marker goes when none of its run's objects is kept.
    Returns (how many were removed, the markers of the dead runs whose
    objects are kept)."""
    own_tag = own_tag or run_tag()
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return 0, []
    runs = {}
    for n in names:
        if not n.startswith(NAME_PREFIX[1:]):
            continue
        parts = n.split(".")
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        start = int(parts[2]) if len(parts) >= 4 and parts[2].isdigit() else None
        runs.setdefault((int(parts[1]), start), []).append("/" + n)
    removed, markers = 0, []
    for (pid, start), objs in runs.items():
        tag = "%d.%d" % (pid, start) if start is not None else "%d" % pid
        if tag == own_tag:
            continue
        marker = MARKER % tag
        if start is not None and start_time(pid) == start:
            continue                    # that run goes on (in this PID namespace)
        if marker in objs and _marker_locked(marker):
            # A faytd holds a lock on its marker while it runs: this holds
            # across PID namespaces, where its pid means nothing here.
            continue
        if start is None and _pid_alive(pid) and pid != os.getpid():
            continue                    # an old-style name of a live pid
        keep = kept_for(tag, marker if marker in objs else None) if kept_for else set()
        if any(o in keep for o in objs):
            keep = set(keep) | {marker}
            if marker in objs:
                markers.append(marker)
        for o in objs:
            if o in keep:
                continue
            try:
                posix_ipc.unlink_shared_memory(o)
                removed += 1
            except (posix_ipc.ExistentialError, posix_ipc.PermissionsError, OSError):
                pass        # gone already, or another user's: not ours to remove
    return removed, markers


def _marker_locked(name):
    """Whether the faytd that made marker `name` still runs (holds its lock)."""
    try:
        fd = posix_ipc.SharedMemory(name, read_only=True).fd
    except (posix_ipc.ExistentialError, posix_ipc.PermissionsError, ValueError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
