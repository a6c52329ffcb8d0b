"""Physical memory: 4 KiB frames with physical addresses, and their backing.

faytd emulates a physical address space so that morphology.paddr[] means
something.  RAM is `ram_bytes` starting at RAM_BASE; a frame is its number,
paddr = RAM_BASE + number * 4096.  Each frame records the backing object that
holds it, its page offset there and a reference count, in flat arrays (a few
bytes per frame, so 10,000 one-page share-points cost nothing per frame).

A backing object is one memfd per portal, mode 0600, sealed against
shrinking, growing and further seals at its size (no process that holds a
descriptor of it can change its size under another that maps it), handed to
clients only as a file descriptor.  One object per portal, not one big RAM
file, because an fd grants all of its object: a client must never get a
descriptor that reaches another portal's memory.  Frames are taken from a
free stack, so a portal's frames need not be contiguous, as on real hardware.

Objects are held by the keeper, a process faytd forks at its start that
survives faytd's death (faytd/core/keeper.c); an object's name is
/proc/<keeper pid>/fd/<n>, which faytd opens for a descriptor, and which
the journal records: a restarted faytd takes the keeper over (its socket is
<state dir>/faytd.keeper) and with it the objects.  faytd itself holds no
descriptor per share-point or portal; it does keep one for each object it
maps with Python's mmap (context pages, rings, hints), which keeps a copy.

The frame arrays and the free stack are faytd's C core (faytd/core/frames.c,
in the one struct fayt_core: faytd/native.py), shared with the C request
path, so that there is one allocator.  New objects come from the object
pool, a C thread that makes them ahead of need and has released ones closed
(faytd/core/keeper.c): neither costs a reply's time.
"""
import array
import errno
import fcntl
import logging
import mmap
import os

from .native import core, ffi, lib

PAGE = 4096
RAM_BASE = lib.FAYT_RAM_BASE  # 1 MiB, as on a PC (faytd/core/core.h)
KEEPER = "faytd.keeper"       # the keeper's socket, in the state directory
POOL_TARGET = 32             # fresh objects the pool keeps ready
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


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
    """A property kept in self.fast, a C struct of faytd's core
    (faytd/core/core.h): both sides count from the same numbers."""
    return property(lambda self: getattr(self.fast, name),
                    lambda self, v: setattr(self.fast, name, v), doc=doc)


def _keeper_nofile():
    """The keeper's RLIMIT_NOFILE now (as it said at its start if unreadable)."""
    try:
        with open("/proc/%d/limits" % lib.fayt_keeper_pid(core)) as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return lib.fayt_keeper_nofile(core)


def _object_error(err):
    if err in (errno.EMFILE, errno.ENFILE):
        return KernelError(errno.ENFILE, "faytd cannot create a backing object: its keeper "
                           "(pid %d) holds one open file per live object and is at its "
                           "RLIMIT_NOFILE of %d" % (lib.fayt_keeper_pid(core), _keeper_nofile()))
    return KernelError(errno.ENOMEM, "faytd cannot create a backing object: %s"
                       % os.strerror(err))


def start_keeper(state_dir):
    """Take over the keeper a killed faytd left in state_dir, or start one
    (state_dir None: one no restart will find).  Returns (its pid, whether
    it was taken over)."""
    path = os.path.join(state_dir, KEEPER) if state_dir else None
    if path is not None:
        pid = lib.fayt_keeper_connect(core, path.encode())
        if pid > 0:
            return pid, True
        if -pid not in (errno.ENOENT, errno.ECONNREFUSED, errno.ENAMETOOLONG):
            # Something answers there that is not a keeper we may take over:
            # starting another would orphan it with what it holds.
            raise OSError(-pid, "faytd: cannot take over the object keeper at %s: %s"
                          % (path, os.strerror(-pid)))
    pid = lib.fayt_keeper_start(core, path.encode() if path else ffi.NULL)
    if pid == -errno.ENAMETOOLONG:
        logging.getLogger("faytd").warning(
            "state directory path too long for the object keeper's socket (%s): a restart "
            "after a SIGKILL will not take share-points back", path)
        pid = lib.fayt_keeper_start(core, ffi.NULL)
    if pid < 0:
        raise OSError(-pid, "faytd: cannot start its object keeper: %s" % os.strerror(-pid))
    return pid, False


def keeper_objects():
    """{name: size} of every object the keeper holds (a restart)."""
    base = "/proc/%d/fd/" % lib.fayt_keeper_pid(core)
    out = {}
    for n in os.listdir(base):
        try:
            if not os.readlink(base + n).startswith("/memfd:fayt"):
                continue
            out[base + n] = os.stat(base + n).st_size
        except OSError:
            continue
    return out


def release_objects(names):
    """Have the keeper close these objects now (names as the journal has
    them: "a+b" is two)."""
    nums = [int(p.rsplit("/", 1)[1]) for n in names for p in n.split("+")]
    if nums:
        lib.fayt_keeper_close(core, ffi.new("int32_t[]", nums), len(nums))


class BackingObject:
    """A sealed memfd holding the frames of one portal, held by the keeper.

    faytd keeps the name (/proc/<keeper pid>/fd/<n>), not a descriptor:
    10,000 share-points must not cost 10,000 open files.  open_fd() gives a
    fresh descriptor for one reply (the server closes it once sent); a new
    object keeps its creation descriptor until the first open_fd() hands it
    out.  `tag` is the run tag, and what the object is for after a dot
    (".ctx", ".ring", ".hint", ".chain"...): such objects are made at
    once, their memfd named fayt.<kind> (/proc/<keeper>/fd shows what each
    is); portals' objects come from the pool."""

    __slots__ = ("id", "name", "length", "frames", "_fd", "tail", "__weakref__")

    def __init__(self, oid, tag, length, frames):
        self.id = oid
        self.length = length
        self.frames = frames
        self.tail = None
        name = ffi.new("char[]", lib.FAYT_OBJ_NAME_MAX)
        kind = tag.rsplit(".", 1)[1].encode() if tag.count(".") > 1 else None
        fd = lib.fayt_objpool_take(core, length, kind or ffi.NULL, name)
        if fd < 0:
            raise _object_error(-fd)
        self.name, self._fd = ffi.string(name).decode(), fd

    @classmethod
    def named(cls, oid, name, length, frames):
        """An object faytd made and knows by name (the fast path's; a split
        share-point's is "<page 0>+<the rest>")."""
        obj = cls.__new__(cls)
        obj.id, obj.name, obj.length, obj.frames, obj._fd = oid, name, length, frames, -1
        obj.tail = None
        if "+" in name:
            obj.name, rest = name.split("+", 1)
            obj.tail = cls.named(0, rest, length - PAGE, [])
        return obj

    @classmethod
    def adopt(cls, oid, name, length, frames):
        """The existing object `name` (a restarted faytd's journal names it;
        "<page 0>+<the rest>" for a split share-point); KernelError ENOENT if
        the keeper holds no such object, EINVAL if it is not sealed or its
        size is not `length`."""
        if "+" in name:
            head, rest = name.split("+", 1)
            obj = cls.adopt(oid, head, PAGE, frames)
            obj.tail = cls.adopt(0, rest, length - PAGE, [])
            obj.length = length
            return obj
        obj = cls.__new__(cls)
        obj.id, obj.name, obj.length, obj.frames, obj._fd = oid, name, length, frames, -1
        obj.tail = None
        if not name.startswith("/proc/%d/fd/" % lib.fayt_keeper_pid(core)):
            raise KernelError(errno.ENOENT, "object %s is not held by this keeper" % name)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            raise KernelError(errno.ENOENT, "object %s is gone" % name) from None
        try:
            size = os.fstat(fd).st_size
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        finally:
            os.close(fd)
        if seals & SEALS != SEALS:
            raise KernelError(errno.EINVAL, "object %s is not a sealed faytd object" % name)
        if size != length:
            raise KernelError(errno.EINVAL, "object %s has %d bytes, the journal says %d"
                              % (name, size, length))
        return obj

    @property
    def names(self):
        """What the journal records: the name, or "<page 0>+<the rest>"."""
        return self.name if self.tail is None else "%s+%s" % (self.name, self.tail.name)

    def write(self, offset, data):
        """pwrite(2) into the object (keeps the creation descriptor if any);
        past page 0 of a split object, into its tail."""
        if self.tail is not None and offset + len(data) > PAGE:
            if offset < PAGE:
                self.write(offset, data[:PAGE - offset])
                data, offset = data[PAGE - offset:], PAGE
            return self.tail.write(offset - PAGE, data)
        fd = self._fd if self._fd >= 0 else self.open_fd()
        try:
            os.pwrite(fd, data, offset)
        finally:
            if fd != self._fd:
                os.close(fd)

    def open_fd(self, readonly=False):
        """A descriptor of the object, owned by the caller (readonly: opened
        O_RDONLY; the object is 0600 and faytd's, so another uid cannot
        reopen it read-write through /proc/<pid>/fd)."""
        if not readonly:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                return fd
        if self.name is None:
            raise KernelError(errno.EBADF, "backing object already released")
        try:
            return os.open(self.name, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):     # faytd's own limit, not the keeper's
                raise KernelError(errno.ENFILE, "faytd cannot open backing object %s: faytd "
                                  "is out of open files (%s)" % (self.name, e.strerror)) from None
            raise KernelError(errno.ENOMEM, "faytd cannot open backing object %s: %s"
                              % (self.name, e.strerror)) from None

    def map(self, length=None):
        """faytd's own mmap.mmap of the object (the first `length` bytes;
        of a split object, at most its page 0)."""
        if self.tail is not None and (length is None or length > PAGE):
            raise KernelError(errno.EINVAL, "a split object maps page 0 alone")
        fd = self.open_fd()
        try:
            return mmap.mmap(fd, self.length if length is None else length)
        finally:
            os.close(fd)

    def release(self):
        """The keeper closes it soon (the pool's thread tells it; mappings
        stay valid until unmapped)."""
        if self.tail is not None:
            self.tail.release()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.name is not None:
            lib.fayt_objpool_release(core, self.name.encode())
            self.name = None


class FrameAllocator:
    """Hands out frames of the emulated RAM and tracks their references
    (the arrays are the core's: struct fayt_frames in faytd/core/core.h)."""

    def __init__(self, ram_bytes, tag=None):
        if ram_bytes < PAGE:
            raise ValueError("ram must be at least one frame")
        self.nframes = ram_bytes // PAGE
        self.tag = tag or run_tag()
        self.c = ffi.addressof(core, "frames")
        if lib.fayt_frames_init(self.c, self.nframes):
            raise MemoryError("frame arrays for %d frames" % self.nframes)
        self.objects = {}                # id -> BackingObject

    def start_pool(self):
        """Start the object pool's thread (when faytd starts serving: a start
        that fails before leaves no pooled object behind).  Until then, and
        after release_all(), objects are made one by one."""
        err = lib.fayt_objpool_start(core, POOL_TARGET)
        if err:
            raise OSError(err, "faytd: cannot start its object pool: %s" % os.strerror(err))

    @property
    def free_frames(self):
        return lib.fayt_frames_free(self.c)

    def paddr(self, frame):
        return RAM_BASE + frame * PAGE

    def paddrs(self, obj):
        """array('Q') of the physical addresses of obj's frames, in order."""
        return array.array("Q", [RAM_BASE + f * PAGE for f in obj.frames])

    def allocate(self, length, obj=None):
        """A new backing object of `length` bytes (page multiple) with fresh
        frames, each referenced once (Python's own objects: notification
        stacks; share-points and ANON portals are the core's).  obj: an
        object of that length made ahead (BackingObject.ahead), which gets
        the frames instead of a new one."""
        n = pages(length)
        if n > self.free_frames:
            raise KernelError(errno.ENOMEM, "length: %d frames asked, %d free in faytd's RAM"
                              % (n, self.free_frames))
        frames = array.array("I", bytes(4 * n))
        oid = self.c.next_oid
        lib.fayt_frames_alloc(self.c, n, oid, ffi.from_buffer("uint32_t[]", frames))
        if obj is not None:
            obj.id, obj.frames = oid, frames
        else:
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

    def adopted(self):
        """After the last adopt(): the frames below the highest adopted one
        that no object took are free."""
        lib.fayt_frames_adopted(self.c)

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
        """A clean stop: every object goes, now, and the keeper with them."""
        for obj in list(self.objects.values()):
            obj.release()
        self.objects.clear()
        lib.fayt_objpool_stop(core)
        lib.fayt_keeper_quit(core)
