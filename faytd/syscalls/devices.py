"""DEV_REGISTER, DEV_ATTACH, DEV_IRQ, DEV_DETACH: device windows
(faytd/devices.py holds them; docs/devices.md)."""
import errno

from libportal._abi import lib, DEV_REQ

from ..frames import KernelError
from ..policy import Policy
from .wire import utf8


def _req(body, what, named):
    """(index, cookie, window, name) of a fayt_dev_req (and the name after
    it when `named`); EINVAL naming the field at fault."""
    if len(body) < DEV_REQ.size or (not named and len(body) != DEV_REQ.size):
        raise KernelError(errno.EINVAL, "%s: expected %d bytes%s, got %d"
                          % (what, DEV_REQ.size, " and the window's name" if named else "",
                             len(body)))
    flags, index, cookie, window, reserved = DEV_REQ.unpack_from(body)
    if flags:
        raise KernelError(errno.EINVAL, "flags: unknown bits %#x" % flags)
    if reserved:
        raise KernelError(errno.EINVAL, "reserved: %d, not 0" % reserved)
    name = None
    if named:
        raw = bytes(body[DEV_REQ.size:])
        if not raw or len(raw) > 31 or b"\0" in raw:
            raise KernelError(errno.EINVAL, "name: 1 to 31 bytes, no NUL (%d sent)" % len(raw))
        name = utf8(raw, "name").decode()
    return index, cookie, window, name


def sys_dev_register(k, ctx, tid, body, fds):
    index, cookie, window, name = _req(body, "dev_register", True)
    if index or cookie or window:
        raise KernelError(errno.EINVAL, "index, cookie, window: 0 for DEV_REGISTER")
    w = k.devices.named(name)
    Policy.check_device_model(ctx, w)
    return k.devices.register(ctx, w)


def sys_dev_attach(k, ctx, tid, body, fds):
    index, cookie, window, name = _req(body, "dev_attach", True)
    if window:
        raise KernelError(errno.EINVAL, "window: 0 for DEV_ATTACH (the name names it)")
    if not 0 <= index < lib.FAYT_NOTIFICATION_SLOTS:
        raise KernelError(errno.EINVAL, "index: %d is not a notification slot (0..%d)"
                          % (index, lib.FAYT_NOTIFICATION_SLOTS - 1))
    if cookie == 0:
        raise KernelError(errno.EINVAL, "cookie: 0 means no handler")
    w = k.devices.named(name)
    Policy.check_mmio(ctx, w, "name")
    return k.devices.attach(ctx, w, index, cookie)


def _window(k, body, what):
    """The window a DEV_IRQ or DEV_DETACH names (index and cookie 0)."""
    index, cookie, window, _ = _req(body, what, False)
    if index or cookie:
        raise KernelError(errno.EINVAL, "index, cookie: 0 for %s" % what)
    return k.devices.of_id(window)


def sys_dev_irq(k, ctx, tid, body, fds):
    k.devices.raise_irq(ctx, _window(k, body, "dev_irq"))
    return b"", []


def sys_dev_detach(k, ctx, tid, body, fds):
    k.devices.detach(ctx, _window(k, body, "dev_detach"))
    return b"", []
