"""Device windows: emulated devices behind DIRECT (docs/devices.md).

A window is a range of physical addresses outside RAM (config "devices").
Its memory is made at the first registration of a device model and kept
while faytd runs, so a model that comes back finds it as the dead one left
it: the register page and the data area, and the three pages of the
register protocol (the driver's ring, the model's page, faytd's state),
each a memfd of its own, mode 0600, sealed at its size, handed read-write
only to its one writer.  faytd writes only the state page, and the driver's
ring's head at an attach (no driver holds it then); it reads the driver's
irq_seen, as a clamped hint, and nothing else a client writes.

Objects only: the calls are decoded and their rights checked in
syscalls/devices.py; DIRECT over a window comes here from syscalls/direct.py.
"""
import errno
import fcntl
import logging
import mmap
import os
import struct
import threading

from libportal._abi import ffi, lib

from .context import Mapping
from .direct import DirectBacking
from .frames import KernelError, PAGE

log = logging.getLogger("faytd")

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
SERVED, DEAD = lib.FAYT_DEV_STATE_SERVED, lib.FAYT_DEV_STATE_DEAD
# Word offsets of the pages (docs/devices.md, fayt/syscall.h).
RING_HEAD, RING_IRQ_SEEN = 0, 8                  # the driver's ring
MODEL_TAIL = 0                                   # the model's page
STATE_STATE, STATE_GEN, STATE_RAISED, STATE_WINDOW, STATE_MODEL, STATE_DRIVER = \
    0, 8, 16, 24, 32, 40
_Q = struct.Struct("<Q")
_FENCE = threading.Lock()       # acquire+release: a locked instruction, a full barrier


def _fence():
    _FENCE.acquire()
    _FENCE.release()


class Obj:
    """One object of a window: a sealed memfd of `size` bytes, 0600."""
    __slots__ = ("fd", "size", "readonly_only")

    def __init__(self, name, size, readonly_only=False):
        fd = os.memfd_create("fayt-dev-" + name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except OSError:
            os.close(fd)
            raise
        self.fd, self.size, self.readonly_only = fd, size, readonly_only

    def open_fd(self, readonly=False):
        """A descriptor for a client: read-only ones are reopened O_RDONLY
        (the object is 0600 and faytd's: another uid cannot reopen it
        read-write through /proc)."""
        try:
            if readonly or self.readonly_only:
                return os.open("/proc/self/fd/%d" % self.fd, os.O_RDONLY | os.O_CLOEXEC)
            return os.dup(self.fd)
        except OSError as e:
            raise KernelError(errno.ENFILE if e.errno in (errno.EMFILE, errno.ENFILE)
                              else errno.ENOMEM, "faytd cannot open a device object: %s"
                              % e.strerror) from None

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Window:
    """One configured window, its memory once a model registered, and who
    serves and drives it."""

    def __init__(self, wid, name, base, size):
        self.id, self.name, self.base, self.size = wid, name, base, size
        self.made = False
        self.model = None           # the serving context
        self.driver = None          # the attached context
        self.irq_index = None
        self.posted = 0             # irq_raised when faytd last delivered
        self.generation = 0
        self.raised = 0

    def make(self):
        objs = []
        try:
            for what, size in (("regs", PAGE), ("data", max(PAGE, self.size - PAGE)),
                               ("ring-driver", PAGE), ("ring-model", PAGE), ("state", PAGE)):
                objs.append(Obj("%s-%s" % (self.name, what), size,
                                readonly_only=(what == "state")))
            self.ev_model = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.ev_driver = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except OSError as e:
            for o in objs:
                o.close()
            raise KernelError(errno.ENOMEM, "window %s: faytd cannot make its memory: %s"
                              % (self.name, e.strerror)) from None
        self.regs, self.data, self.ring_driver, self.ring_model, self.state = objs
        self.state_map = mmap.mmap(self.state.fd, PAGE)
        self.ring_map = mmap.mmap(self.ring_driver.fd, PAGE)
        # Words: one aligned 8-byte load or store each (pack_into is bytewise).
        self.state_w = memoryview(self.state_map).cast("Q")
        self.ring_w = memoryview(self.ring_map).cast("Q")
        self.state_w[STATE_WINDOW // 8] = self.id
        self.made = True

    def close(self):
        if not self.made:
            return
        self.state_w.release()
        self.ring_w.release()
        self.state_map.close()
        self.ring_map.close()
        for o in (self.regs, self.data, self.ring_driver, self.ring_model, self.state):
            o.close()
        os.close(self.ev_model)
        os.close(self.ev_driver)
        self.made = False

    def set_state(self, state):
        self.state_w[STATE_GEN // 8] = self.generation
        self.state_w[STATE_MODEL // 8] = self.model.id if self.model is not None else 0
        self.state_w[STATE_STATE // 8] = state

    def wake(self):
        for fd in (self.ev_model, self.ev_driver):
            try:
                os.eventfd_write(fd, 1)
            except OSError:         # the counter is full: it is awake anyway
                pass

    def descriptors(self, objs):
        """Descriptors of (object, readonly) in order, then the two
        eventfds (the model's, the driver's); none left open on failure."""
        fds = []
        try:
            for o, ro in objs:
                fds.append(o.open_fd(readonly=ro))
            fds.append(os.dup(self.ev_model))
            fds.append(os.dup(self.ev_driver))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def reply(self):
        return struct.pack("<QQII", self.base, self.size, self.id, self.generation)


class ReadOnly:
    """An object as a DIRECT run of a driver sees it: read-only whatever the
    prot (the register page: a stray store faults)."""
    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def open_fd(self, readonly=True):
        return self.obj.open_fd(readonly=True)


class DeviceBacking(DirectBacking):
    """A DIRECT mapping of a window's pages: no frames (a window is not RAM)."""
    __slots__ = ("window",)

    def __init__(self, window, pages):
        DirectBacking.__init__(self, [], [])
        self.length = pages * PAGE
        self.window = window


class Devices:
    def __init__(self, k):
        self.k = k
        self.windows = {}           # name -> Window
        self.by_id = {}
        for i, w in enumerate(k.cfg.get("devices") or (), 1):
            win = Window(i, w["name"], w["base"], w["size"])
            self.windows[win.name] = self.by_id[i] = win

    def named(self, name):
        w = self.windows.get(name)
        if w is None:
            raise KernelError(errno.ENOENT, "name: no device window %r in faytd's "
                              "configuration" % name)
        return w

    def of_id(self, wid):
        w = self.by_id.get(wid)
        if w is None:
            raise KernelError(errno.ENOENT, "window: %d names no device window" % wid)
        return w

    def window_at(self, paddr):
        for w in self.by_id.values():
            if w.base <= paddr < w.base + w.size:
                return w
        return None

    def check_no_window(self, paddrs):
        """A DIRECT over RAM names no page of a window (EINVAL)."""
        for i, pa in enumerate(paddrs):
            w = self.window_at(pa)
            if w is not None:
                raise KernelError(errno.EINVAL, "morphology.paddr[%d]: %#x is in device window "
                                  "%s: a DIRECT maps RAM frames or one window's pages, not "
                                  "both" % (i, pa, w.name))

    # -- the model --------------------------------------------------------
    def register(self, ctx, w):
        """ctx serves w: the reply and the model's descriptors."""
        if w.model is not None:
            raise KernelError(errno.EBUSY, "name: window %s is served by context %d"
                              % (w.name, w.model.id))
        if not w.made:
            w.make()
        fds = w.descriptors(((w.regs, False), (w.data, False), (w.ring_driver, True),
                             (w.ring_model, False), (w.state, True)))
        w.model = ctx
        w.generation += 1
        w.set_state(SERVED)
        w.wake()                    # a driver waiting for room looks again
        log.info("window %s: served by context %d (pid %d), generation %d",
                 w.name, ctx.id, ctx.pid, w.generation)
        return w.reply(), fds

    def raise_irq(self, ctx, w):
        if w.model is not ctx:
            raise KernelError(errno.EPERM, "window: context %d does not serve window %s"
                              % (ctx.id, w.name))
        w.raised += 1
        w.state_w[STATE_RAISED // 8] = w.raised
        _fence()                    # irq_raised is seen before irq_seen is read
        d = w.driver
        if d is None or w.irq_index is None:
            return
        seen = min(w.ring_w[RING_IRQ_SEEN // 8], w.raised)
        if seen < w.posted:
            return                  # the last one is not taken yet: this one coalesces
        w.posted = w.raised
        self._deliver(d, w)

    def _deliver(self, d, w):
        n = self.k.notifications
        e = ffi.new("struct fayt_event_payload *")
        e.event, e.context_id, e.sp_id = lib.FAYT_EVENT_IRQ, w.id, w.raised & 0xffffffff
        try:
            r = n.ring(None, d)
        except KernelError as err:
            log.warning("window %s: cannot deliver its interrupt to context %d: %s",
                        w.name, d.id, err.message)
            w.posted = 0            # deliver at the next one
            return
        try:
            if r.post(w.irq_index, bytes(ffi.buffer(e))):
                n._backlogged(r)
        except KernelError:
            n.corrupt(r)

    # -- the driver -------------------------------------------------------
    def attach(self, ctx, w, index, cookie):
        if w.driver is not None and w.driver is not ctx:
            raise KernelError(errno.EBUSY, "name: window %s is driven by context %d"
                              % (w.name, w.driver.id))
        if not w.made:
            raise KernelError(errno.ENODEV, "name: no device model has served window %s yet"
                              % w.name)
        # Start the new driver where the model is: what an earlier driver
        # posted and the model did not take is dropped.
        tail = _Q.unpack_from(os.pread(w.ring_model.fd, 8, MODEL_TAIL))[0]
        w.ring_w[RING_HEAD // 8] = tail
        w.ring_w[RING_IRQ_SEEN // 8] = w.raised
        fds = w.descriptors(((w.ring_driver, False), (w.ring_model, True), (w.state, True)))
        self.k.notifications.install(ctx, index, cookie)
        w.driver, w.irq_index, w.posted = ctx, index, w.raised
        w.state_w[STATE_DRIVER // 8] = ctx.id
        return w.reply(), fds

    def detach(self, ctx, w):
        if w.model is ctx:
            self._model_gone(w)
        elif w.driver is ctx:
            self._driver_gone(w)
        else:
            raise KernelError(errno.EINVAL, "window: context %d neither serves nor drives "
                              "window %s" % (ctx.id, w.name))

    def _model_gone(self, w):
        log.info("window %s: its device model (context %d) is gone", w.name, w.model.id)
        w.model = None
        w.set_state(DEAD)
        w.wake()

    def _driver_gone(self, w):
        d, w.driver = w.driver, None
        w.state_w[STATE_DRIVER // 8] = 0
        if w.model is not None:
            # What it granted the model ends with it: a later driver of the
            # window must not reach this one's RAM through the model.
            n = self.k.direct.revoke_to(d, w.model)
            if n:
                log.info("window %s: %d grant(s) of its driver (context %d) to the model "
                         "(context %d) end with the driver", w.name, n, d.id, w.model.id)
        if w.irq_index is not None and d.page_struct is not None and d.alive:
            self.k.notifications.remove(d, w.irq_index)
        w.irq_index = None

    def context_gone(self, ctx):
        for w in self.by_id.values():
            if w.model is ctx:
                self._model_gone(w)
            if w.driver is ctx:
                self._driver_gone(w)

    def shutdown(self):
        for w in self.by_id.values():
            w.close()

    # -- DIRECT over a window -------------------------------------------
    def map(self, ctx, tid, prot, length, paddrs, check):
        """A DIRECT mapping of pages of one window: (Mapping, runs, parts)
        as Direct.map answers.  check(ctx, window): the mmio right."""
        from .direct import Direct
        Direct.check_range(length, paddrs)
        w = self.window_at(paddrs[0])
        for i, pa in enumerate(paddrs):
            if pa % PAGE:
                raise KernelError(errno.EINVAL, "morphology.paddr[%d]: %#x is not 4 KiB "
                                  "aligned" % (i, pa))
            if pa != paddrs[0] + i * PAGE or pa >= w.base + w.size:
                raise KernelError(errno.EINVAL, "morphology.paddr[%d]: %#x: a DIRECT over "
                                  "device window %s names consecutive pages of that window "
                                  "alone, in order" % (i, pa, w.name))
        check(ctx, w)
        if not w.made:
            raise KernelError(errno.ENODEV, "morphology.paddr[0]: %#x: no device model has "
                              "served window %s yet" % (paddrs[0], w.name))
        if len(ctx.mappings) >= self.k.cfg["max_mappings_per_context"]:
            raise KernelError(errno.ENOMEM, "this context has %d mappings, the quota"
                              % len(ctx.mappings))
        if not ctx.check_tid(tid):
            raise KernelError(errno.ESRCH, "tid %d is not a thread of pid %d" % (tid, ctx.pid))
        first = (paddrs[0] - w.base) // PAGE
        runs, parts = [], []
        n = len(paddrs)
        if first == 0:
            regs = ReadOnly(w.regs)
            runs.append([regs, 0, 1, 0])
            parts.append(regs)
        if first + n > 1:
            start = max(first, 1)
            runs.append([w.data, start - 1, first + n - start, (start - first) * PAGE])
            parts.append(w.data)
        m = Mapping(ctx.new_handle(), lib.FAYT_PORTAL_DIRECT, DeviceBacking(w, n), None,
                    ctx.pid, tid, prot)
        self.k.add_mapping(ctx, m)
        return m, runs, parts
