"""Emulated devices behind DIRECT (docs/devices.md), with real processes:
windows in the configuration, a model's registration, DIRECT over a
window, register accesses in order, interrupts with a coalescing count,
hostile rings, a model's death and return, and the rights (uid 65534)."""
import contextlib
import errno
import json
import os
import signal
import struct
import time

import pytest

from faytd import config
from libportal._abi import lib, DEV_REQ

from support.daemon import NOBODY, faytd_refuses

PAGE = 4096
BASE = 0x40000000
DEVICES = [{"name": "blk0", "base": hex(BASE), "size": "16KiB"},
           {"name": "net0", "base": hex(BASE + 0x100000), "size": "8KiB"}]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as "
                                "uid 65534")

# A device model: serves window argv[1]; between serves it obeys lines:
# "set32 <off> <v>", "irq <n>", "data <off> <text>" (writes the data area),
# "peek <off>" (prints 16 bytes of the data area), "log" (the writes it
# took, in order), "raw <hex>" (writes raw bytes at the start of its own
# ring page), "exit".
MODEL = r"""
try:
    m = lp.register_device(sys.argv[1])
except OSError as e:
    print("%s %s" % (errno.errorcode[e.errno], e))
    sys.exit(0)
taken = []
def on_write(off, size, value):
    taken.append([off, size, value])
    (m.set32 if size == 4 else m.set64)(off, value)
m.on_write = on_write
print(json.dumps([m.id, m.base, m.size, m.generation]))
while True:
    try:
        m.serve(0.02)
    except OSError as e:
        print("serve %s" % errno.errorcode[e.errno])
    if not select.select([sys.stdin], [], [], 0)[0]:
        continue
    w = sys.stdin.readline().split()
    if not w or w[0] == "exit":
        break
    if w[0] == "set32":
        m.set32(int(w[1]), int(w[2]))
    elif w[0] == "irq":
        for _ in range(int(w[1])):
            m.irq()
    elif w[0] == "data":
        m.data[int(w[1]):int(w[1]) + len(w[2])] = w[2].encode()
    elif w[0] == "peek":
        print(bytes(m.data[int(w[1]):int(w[1]) + 16]).rstrip(b"\0").decode())
        continue
    elif w[0] == "log":
        print(json.dumps([taken, m.bad_entries]))
        continue
    elif w[0] == "raw":
        b = bytes.fromhex(w[1])
        m.mine[0:len(b)] = b
    print("ok")
"""

# A driver: attaches to window argv[1] (interrupt at slot 5) and obeys
# lines: "map <prot>" (DIRECT over the whole window), "w32/w64/r32/r64 <off>
# [v]", "data <off> <text>" / "peek <off>" (its DIRECT mapping's data
# area), "store" (a stray store to the register page), "irqs" (waits a
# little for interrupts, prints the handler's counts), "raw <at> <hex>"
# (raw bytes at offset at of its ring page; its head taken from there),
# "cw32/cw64/cr32/cr64 <off> [v]" (the C accessors of fayt/device.h, as a C
# driver calls them, on this driver's struct fayt_dev_driver).
DRIVER = r"""
import ctypes
from libportal import _fayt_cffi
from libportal._abi import ffi as _ffi
_c = ctypes.CDLL(_fayt_cffi.__file__)
for _n in ("write32", "write64", "read32", "read64"):
    getattr(_c, "fayt_dev_" + _n).restype = ctypes.c_int
def c_access(dev, op, off, value=0):
    d = ctypes.c_void_p(int(_ffi.cast("uintptr_t", dev._d)))
    if op.startswith("cw"):
        v = (ctypes.c_uint32 if op == "cw32" else ctypes.c_uint64)(value)
        r = getattr(_c, "fayt_dev_write" + op[2:])(d, ctypes.c_uint32(off), v,
                                                    ctypes.c_int64(5 * 10**9))
        return "ok" if r == 0 else errno.errorcode[r]
    out = (ctypes.c_uint32 if op == "cr32" else ctypes.c_uint64)()
    r = getattr(_c, "fayt_dev_read" + op[2:])(d, ctypes.c_uint32(off), ctypes.c_int64(5 * 10**9),
                                              ctypes.byref(out))
    return str(out.value) if r == 0 else errno.errorcode[r]
counts = []
try:
    dev = lp.attach_device(sys.argv[1], 5, counts.append, timeout=5)
except OSError as e:
    print("%s %s" % (errno.errorcode[e.errno], e))
    sys.exit(0)
print(json.dumps([dev.id, dev.base, dev.size]))
p = None
for line in sys.stdin:
    w = line.split()
    try:
        if w[0] == "map":
            p = dev.map(int(w[1]))
            print("ok")
        elif w[0] in ("w32", "w64"):
            getattr(dev, "write" + w[0][1:])(int(w[1], 0), int(w[2], 0))
            print("ok")
        elif w[0] in ("r32", "r64"):
            print(getattr(dev, "read" + w[0][1:])(int(w[1], 0)))
        elif w[0] in ("cw32", "cw64", "cr32", "cr64"):
            print(c_access(dev, w[0], *(int(x, 0) for x in w[1:])))
        elif w[0] == "data":
            p.buf[PAGE + int(w[1]):PAGE + int(w[1]) + len(w[2])] = w[2].encode()
            print("ok")
        elif w[0] == "peek":
            print(bytes(p.buf[PAGE + int(w[1]):PAGE + int(w[1]) + 16]).rstrip(b"\0").decode())
        elif w[0] == "reg":
            print(struct.unpack_from("<I", p.buf, int(w[1], 0))[0])
        elif w[0] == "store":
            import ctypes
            ctypes.c_uint32.from_address(p.addr).value = 1
            print("stored")
        elif w[0] == "irqs":
            deadline = time.monotonic() + float(w[1])
            while time.monotonic() < deadline and sum(counts) < int(w[2]):
                lp.notification_wait(timeout=0.05)
            print(json.dumps([sum(counts), len(counts), dev.irqs]))
        elif w[0] == "raw":
            b, at = bytes.fromhex(w[2]), int(w[1])
            dev.ring[at:at + len(b)] = b
            dev.head = struct.unpack_from("<Q", dev.ring, 0)[0]
            print("ok")
    except OSError as e:
        print("%s %s" % (errno.errorcode[e.errno], e))
""".replace("PAGE", "4096")


def model(spawn, d, name="blk0", **kw):
    m = spawn(MODEL, d.env(), args=[name], **kw)
    got = m.expect()
    return m, (json.loads(got) if got.startswith("[") else got)


def driver(spawn, d, name="blk0", **kw):
    c = spawn(DRIVER, d.env(), args=[name], **kw)
    got = c.expect()
    return c, got


def ask(child, line):
    child.send(line)
    return child.expect()


# -- the configuration ----------------------------------------------------------

@pytest.mark.parametrize("devices, message", [
    ([{"name": "a b", "base": BASE, "size": 4096}], "devices[0].name: 'a b' is not"),
    ([{"name": "a", "base": BASE + 1, "size": 4096}], "devices[0].base: 0x40000001 is not"),
    ([{"name": "a", "base": BASE, "size": 4097}], "devices[0].size: 4097 is not a multiple"),
    ([{"name": "a", "base": 0x200000, "size": 4096}], "devices[0]: 0x200000..0x201000 "
                                                      "overlaps RAM's frames"),
    ([{"name": "a", "base": BASE, "size": 8192}, {"name": "b", "base": BASE + 4096,
                                                  "size": 4096}], "devices[1]: 0x40001000"
                                                                  "..0x40002000 overlaps window a"),
    ([{"name": "a", "base": BASE, "size": 4096}, {"name": "a", "base": BASE + 8192,
                                                  "size": 4096}], "names another window"),
    ([{"name": "a", "base": (1 << 64) - 4096, "size": 8192}], "ends past 2^64"),
    ([{"name": "a", "base": BASE, "size": 4096, "irq": 3}], "unknown keys ['irq']"),
])
def test_devices_config_is_checked_when_read(tmp_path, devices, message):
    """A window is refused at start, its field named: faytd does not run."""
    path = tmp_path / "faytd.json"
    path.write_text(json.dumps({"devices": devices}))
    with pytest.raises(ValueError) as e:
        config.load(str(path), {"ram": "64MiB"})
    assert message in str(e.value)
    err = faytd_refuses(["--socket", str(tmp_path / "faytd.sock"), "--config", str(path),
                         "--ram", "64MiB"])
    assert message in err, err


# -- registration, DIRECT, registers, interrupts, failure (as faytd's owner) -----

def test_devices_direct_map_registers_and_data_area(spawn, fresh_faytd):
    """A driver maps the window with DIRECT: the data area is memory shared
    with the model, the register page is read-only (a stray store faults);
    register writes reach the model in order and reads return what it set."""
    d = fresh_faytd(config={"devices": DEVICES}, ram="64MiB", clean=True)
    c, got = driver(spawn, d)
    assert got.startswith("ENODEV"), got          # no model has served it yet
    c.kill()
    m, (wid, base, size, gen) = model(spawn, d)
    assert (wid, base, size, gen) == (1, BASE, 16384, 1)
    _, got = model(spawn, d)                       # a second model is EBUSY
    assert got.startswith("EBUSY") and "window blk0 is served by context" in got
    c, got = driver(spawn, d)
    assert json.loads(got) == [1, BASE, 16384]
    assert ask(c, "map 3") == "ok"
    assert ask(c, "data 0 from-driver") == "ok"
    assert ask(m, "peek 0") == "from-driver"
    assert ask(m, "data 100 from-model") == "ok"
    assert ask(c, "peek 100") == "from-model"
    assert ask(m, "set32 8 77") == "ok"
    assert ask(c, "r32 8") == "77"
    assert ask(c, "reg 8") == "77"                 # the read-only page shows it too
    for i in range(600):                           # more than the ring holds
        c.send("w32 %d %d" % (4 * (i % 16), i))
    assert [c.expect() for _ in range(600)] == ["ok"] * 600
    assert ask(c, "w64 0x100 0x1122334455667788") == "ok"
    assert ask(c, "r64 0x100") == str(0x1122334455667788)
    taken, bad = json.loads(ask(m, "log"))
    assert taken == [[4 * (i % 16), 4, i] for i in range(600)] + [[0x100, 8, 0x1122334455667788]]
    assert bad == 0
    assert ask(c, "r32 4096").startswith("EINVAL")
    assert ask(c, "r32 3").startswith("EINVAL")
    c.send("store")
    assert c.proc.wait(timeout=30) == -signal.SIGSEGV


def test_devices_interrupts_coalesce_with_a_count(spawn, fresh_faytd):
    """Interrupts raised faster than the driver takes them are delivered
    with their count: none is lost."""
    d = fresh_faytd(config={"devices": DEVICES}, ram="64MiB", clean=True)
    m, _ = model(spawn, d)
    c, _ = driver(spawn, d)
    assert ask(m, "irq 1") == "ok"
    assert json.loads(ask(c, "irqs 10 1"))[0] == 1
    assert ask(m, "irq 500") == "ok"
    total, calls, irqs = json.loads(ask(c, "irqs 20 501"))
    assert total == irqs == 501
    assert calls <= 501


def test_devices_c_accessors(spawn, fresh_faytd):
    """The accessors in C (fayt/device.h's fayt_dev_write32 and friends, as a
    C driver calls them) share the ring with the Python ones: in order,
    none lost, reads answered by the model; a bad offset is EINVAL; a dead
    model ENODEV."""
    d = fresh_faytd(config={"devices": DEVICES}, ram="64MiB", clean=True)
    m, _ = model(spawn, d)
    c, _ = driver(spawn, d)
    assert ask(m, "set32 8 77") == "ok"
    assert ask(c, "cr32 8") == "77"
    for i in range(300):                           # more than the ring holds, both kinds
        c.send("%s %d %d" % ("cw32" if i % 2 else "w32", 4 * (i % 16), i))
    assert [c.expect() for _ in range(300)] == ["ok"] * 300
    assert ask(c, "cw64 0x100 0x1122334455667788") == "ok"
    assert ask(c, "cr64 0x100") == str(0x1122334455667788)
    assert ask(c, "r64 0x100") == str(0x1122334455667788)
    taken, bad = json.loads(ask(m, "log"))
    assert taken == [[4 * (i % 16), 4, i] for i in range(300)] + [[0x100, 8, 0x1122334455667788]]
    assert bad == 0
    assert ask(c, "cr32 4094") == "EINVAL"
    assert ask(c, "cw64 4 1") == "EINVAL"
    m.kill()
    assert ask(c, "cr32 8") == "ENODEV"
    assert ask(c, "cw32 8 1") == "ENODEV"


def test_devices_model_death_enodev_and_return(spawn, fresh_faytd):
    """A dead model: register accesses fail ENODEV at once, the data area
    keeps its bytes; a restarted model takes the window back, with the
    register page as it was."""
    d = fresh_faytd(config={"devices": DEVICES}, ram="64MiB", clean=True)
    m, _ = model(spawn, d)
    c, _ = driver(spawn, d)
    assert ask(c, "map 3") == "ok"
    assert ask(c, "data 0 kept") == "ok"
    assert ask(c, "w32 16 99") == "ok"
    assert ask(c, "r32 16") == "99"
    m.kill()
    got = ask(c, "r32 16")
    assert got.startswith("ENODEV") and "its device model is gone" in got
    assert ask(c, "w32 16 1").startswith("ENODEV")
    assert ask(c, "peek 0") == "kept"
    m, (_, _, _, gen) = model(spawn, d)
    assert gen == 2
    assert ask(m, "peek 0") == "kept"
    assert ask(c, "r32 16") == "99"


def test_devices_hostile_rings(spawn, fresh_faytd):
    """Raw bytes in the rings: a driver's bad entries are refused and
    counted, its head out of range is EPROTO at the model; a model's tail
    out of range is EPROTO at the driver; faytd is not disturbed."""
    d = fresh_faytd(config={"devices": DEVICES}, ram="64MiB", clean=True)
    m, _ = model(spawn, d)
    c, _ = driver(spawn, d)
    assert ask(c, "w32 0 5") == "ok"
    # An entry with op 9 at position 1, a write to offset 4095 at 2, and
    # the head moved past them.
    assert ask(c, "raw 80 " + struct.pack("<IIQIIQ", 9, 0, 7, 1, 4095, 7).hex()) == "ok"
    assert ask(c, "raw 0 " + struct.pack("<Q", 3).hex()) == "ok"
    assert ask(c, "r32 0") == "5"
    _, bad = json.loads(ask(m, "log"))
    assert bad == 2
    # A head far ahead: the model refuses the ring.
    assert ask(c, "raw 0 " + struct.pack("<Q", 1 << 40).hex()) == "ok"
    c.send("w32 0 1")
    assert "serve EPROTO" in m.expect()
    # A model whose tail goes past the driver's head: the driver says EPROTO.
    m2, _ = model(spawn, d, name="net0")
    c2, _ = driver(spawn, d, name="net0")
    # A driver's irq_seen far ahead is a clamped hint to faytd: its
    # interrupts still come, counted.
    assert ask(c2, "raw 8 " + struct.pack("<Q", (1 << 64) - 1).hex()) == "ok"
    assert ask(m2, "irq 3") == "ok"
    assert json.loads(ask(c2, "irqs 10 3"))[0] == 3
    assert ask(m2, "raw " + struct.pack("<Q", 1 << 40).hex()) == "ok"
    assert ask(c2, "w32 0 1").startswith("EPROTO")


def test_devices_sharepoint_direct_over_a_window_is_einval(spawn, fresh_faytd):
    d = fresh_faytd(config={"devices": DEVICES}, ram="64MiB", clean=True)
    m, _ = model(spawn, d)
    c = spawn(r"""
try:
    lp.portal(lp.SHARE | lp.DIRECT, lp.PROT_RW, 8192, identifier="w", create=True,
              paddr=[%d, %d])
except OSError as e:
    print(errno.errorcode[e.errno], e)
try:
    lp.portal(lp.DIRECT, lp.PROT_RW, 8192, paddr=[%d, %d])
except OSError as e:
    print(errno.errorcode[e.errno], e)
""" % (BASE, BASE + PAGE, BASE + PAGE, BASE), d.env())
    got = c.expect()
    assert got.startswith("EINVAL") and "is in device window blk0" in got
    got = c.expect()
    assert got.startswith("EINVAL") and "consecutive pages" in got


# -- rights (uid 65534) ---------------------------------------------------------

POLICY = {
    "categories": {"core": {"classes": ["SHARE", "DIRECT", "ANON", "COW", "SPECIAL"],
                            "notify_handlers": True, "mmio": ["*"], "chains": ["*"],
                            "notify": ["*"]},
                   "driver": {"classes": ["SHARE", "DIRECT", "ANON"], "mmio": ["blk*"]},
                   "server": {"classes": ["SHARE", "ANON"]}},
    "rules": [{"uid": "$owner", "category": "core"}, {"uid": 0, "category": "core"},
              {"uid": NOBODY, "category": "driver"}],
    "default": "server",
}
SERVER_POLICY = dict(POLICY, rules=[{"uid": "$owner", "category": "core"},
                                    {"uid": 0, "category": "core"}])


@needs_root
def test_devices_rights_mmio_globs_and_categories(spawn, as_user, world_faytd):
    """uid 65534 as a driver: its mmio globs name blk0, not net0 (EPERM on
    DIRECT, attach and register, nothing mapped); as a server it may not
    register at all."""
    d = world_faytd(POLICY, devices=DEVICES)
    m, _ = model(spawn, d, as_user=as_user, uid=NOBODY)      # a driver may serve blk0
    c, got = driver(spawn, d, as_user=as_user, uid=NOBODY)
    assert json.loads(got)[0] == 1
    assert ask(c, "map 3") == "ok"
    assert ask(c, "data 0 nobody") == "ok"
    assert ask(m, "peek 0") == "nobody"
    assert ask(c, "w32 0 3") == "ok" and ask(c, "r32 0") == "3"
    _, got = model(spawn, d, name="net0", as_user=as_user, uid=NOBODY)
    assert got.startswith("EPERM") and "may not reach device window net0" in got
    _, got = driver(spawn, d, name="net0", as_user=as_user, uid=NOBODY)
    assert got.startswith("EPERM") and "may not reach device window net0" in got
    x = spawn(r"""
c = lp.Connection(sys.argv[1])
for paddr in ([%d], [%d]):
    try:
        lp.portal(lp.DIRECT, lp.PROT_READ, 4096, paddr=paddr, connection=c)
        print("ok")
    except OSError as e:
        print(errno.errorcode[e.errno], e)
""" % (BASE + 0x100000, BASE), d.env(), as_user=as_user, uid=NOBODY, args=[d.socket])
    got = x.expect()
    assert got.startswith("EPERM") and "may not reach device window net0" in got
    assert x.expect() == "ok"


@needs_root
def test_devices_a_server_cannot_register(spawn, as_user, world_faytd):
    d = world_faytd(SERVER_POLICY, devices=DEVICES)
    x = spawn(r"""
c = lp.Connection(sys.argv[1])
body = struct.pack("<IiQII", 0, 0, 0, 0, 0) + b"blk0"
try:
    c.call(%d, body)
    print("ok")
except OSError as e:
    print(errno.errorcode[e.errno], e)
""" % lib.FAYT_SYS_DEV_REGISTER, d.env(), as_user=as_user, uid=NOBODY, args=[d.socket])
    got = x.expect()
    assert got.startswith("EPERM") and "category server may not serve a device window" in got
    assert DEV_REQ.size == 24


# -- the reference block device (servers/blockdev.py) --------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLK_DEVICES = [{"name": "blk0", "base": hex(BASE), "size": "72KiB"}]
BLOCK_DRIVER = r"""
sys.path.insert(0, sys.argv[1])
from servers.blockdev import BlockDriver
b = BlockDriver("blk0")
print(b.blocks)
for line in sys.stdin:
    w = line.split()
    try:
        if w[0] == "read":
            print(b.read(int(w[1]))[:16].rstrip(b"\0").decode())
        elif w[0] == "write":
            b.write(int(w[1]), w[2].encode().ljust(4096, b"\0"))
            print("ok")
        elif w[0] == "irqs":
            print(b.irqs)
        elif w[0] == "badbuf":              # a descriptor naming a frame not granted
            other = lp.portal(lp.ANON, lp.PROT_RW, 4096)
            at = b.produced % 16 + 1        # the next request's buffer
            b.dma.paddr = b.dma.paddr[:at] + (other.paddr[0],) + b.dma.paddr[at + 1:]
            print(b.read(int(w[1]))[:16].rstrip(b"\0").decode())
        elif w[0] == "badring":             # RING at a frame not granted
            other = lp.portal(lp.ANON, lp.PROT_RW, 4096)
            b.dev.write64(0x10, other.paddr[0])
            print(b.read(int(w[1]))[:16].rstrip(b"\0").decode())
        elif w[0] == "paddr":               # the frame of buffer slot w[1]
            print(b.dma.paddr[int(w[1]) + 1])
        elif w[0] == "peek":                # what buffer slot w[1] holds now
            at = 4096 * (int(w[1]) + 1)
            print(bytes(b.buf[at:at + 16]).rstrip(b"\0").decode() or "-")
        elif w[0] == "detach":              # stop driving; keep the DMA RAM
            b.dev.close()
            print("ok")
        elif w[0] == "foreign":             # a descriptor naming another's frame
            at = b.produced % 16 + 1
            b.dma.paddr = b.dma.paddr[:at] + (int(w[1]),) + b.dma.paddr[at + 1:]
            print(b.read(int(w[2]))[:16].rstrip(b"\0").decode())
    except OSError as e:
        print("%s %s" % (errno.errorcode[e.errno], e))
"""


def test_devices_block_device_reads_and_writes_the_image(spawn, fresh_faytd, tmp_path):
    """The model serves a disk image; the driver reads and writes its blocks
    through descriptors, the doorbell and the completion interrupt; a block
    out of the image completes with EINVAL."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"".join(b"block-%d" % i + b"\0" * (4096 - len(b"block-%d" % i))
                               for i in range(8)))
    d = fresh_faytd(config={"devices": BLK_DEVICES}, ram="64MiB", clean=True)
    m = spawn("sys.path.insert(0, sys.argv[1])\nfrom servers import blockdev\n"
              "sys.exit(blockdev.main(['model', '--name', 'blk0', '--image', sys.argv[2]]))",
              d.env(), args=[ROOT, str(image)])
    assert m.expect() == "serving blk0: 8 blocks"
    c = spawn(BLOCK_DRIVER, d.env(), args=[ROOT])
    assert c.expect() == "8"
    for i in (0, 7, 3, 3):
        assert ask(c, "read %d" % i) == "block-%d" % i
    assert ask(c, "write 5 written") == "ok"
    assert ask(c, "read 5") == "written"
    with open(image, "rb") as f:
        f.seek(5 * 4096)
        assert f.read(7) == b"written"
    assert ask(c, "read 8").startswith("EINVAL")
    assert int(ask(c, "irqs")) >= 1
    for i in range(40):                     # more requests than the ring has slots
        c.send("read %d" % (i % 8))
    assert [c.expect() for _ in range(40)] == [
        "written" if i % 8 == 5 else "block-%d" % (i % 8) for i in range(40)]


@contextlib.contextmanager
def _nobody_model(spawn, as_user, world_faytd):
    """A faytd with window blk0 and the reference block device's model serving
    an 8-block image as uid 65534 (category driver: its DIRECT reaches only
    frames granted to it); yields the faytd."""
    import shutil
    import tempfile
    top = tempfile.mkdtemp(prefix="fayt-blk-")
    try:
        os.chmod(top, 0o755)
        image = os.path.join(top, "disk.img")
        with open(image, "wb") as f:
            f.write(b"".join(b"block-%d" % i + b"\0" * (4096 - len(b"block-%d" % i))
                             for i in range(8)))
        os.chmod(image, 0o666)
        d = world_faytd(POLICY, devices=BLK_DEVICES)
        m = spawn("sys.path.insert(0, sys.argv[1])\nfrom servers import blockdev\n"
                  "sys.exit(blockdev.main(['model', '--name', 'blk0', '--image', sys.argv[2]]))",
                  d.env(), args=[ROOT, image], as_user=as_user, uid=NOBODY)
        assert m.expect() == "serving blk0: 8 blocks"
        yield d
    finally:
        shutil.rmtree(top, ignore_errors=True)


@needs_root
def test_devices_block_device_dma_only_into_granted_ram(spawn, as_user, world_faytd):
    """The model runs as uid 65534 (category driver: DIRECT reaches only
    frames granted to it): it reads and writes the driver's descriptors and
    buffers because the driver granted them to its context; a descriptor
    naming a frame that was not granted completes with EFAULT, and a RING
    at such a frame is refused (the driver's read fails EPERM), while
    granted requests go on working."""
    with _nobody_model(spawn, as_user, world_faytd) as d:
        c = spawn(BLOCK_DRIVER, d.env(), args=[ROOT])
        assert c.expect() == "8"
        assert ask(c, "read 3") == "block-3"
        assert ask(c, "write 6 by-dma") == "ok"
        assert ask(c, "read 6") == "by-dma"
        got = ask(c, "badbuf 2")
        assert got.startswith("EFAULT") and "the device answered EFAULT" in got
        got = ask(c, "badring 1")
        assert got.startswith("EPERM") and "could not read the descriptors" in got
        c.kill()
        c = spawn(BLOCK_DRIVER, d.env(), args=[ROOT])   # a new driver: its own grant
        assert c.expect() == "8"
        assert ask(c, "read 6") == "by-dma"


@needs_root
def test_devices_block_model_uses_no_frame_a_later_driver_did_not_grant(spawn, as_user,
                                                                      world_faytd):
    """Driver 1 reads a block through its granted buffer, then detaches
    (keeping its RAM). Driver 2 attaches and names driver 1's frame in a
    descriptor, which it never granted: the model must complete it with
    EFAULT, not DMA into driver 1's memory.  (The review's finding: faytd
    now ends a driver's grants to the model when it detaches, and the model
    drops its mappings when the state page names another driver.)"""
    with _nobody_model(spawn, as_user, world_faytd) as d:
        one = spawn(BLOCK_DRIVER, d.env(), args=[ROOT])
        assert one.expect() == "8"
        assert ask(one, "read 3") == "block-3"          # slot 0: the model maps its frame
        frame = int(ask(one, "paddr 0"))
        assert ask(one, "detach") == "ok"
        two = spawn(BLOCK_DRIVER, d.env(), args=[ROOT])
        assert two.expect() == "8"
        got = ask(two, "foreign %d 5" % frame)
        assert ask(one, "peek 0") == "block-3", "the model wrote block 5 into driver 1's RAM"
        assert got.startswith("EFAULT"), got
        two.kill()
        one.kill()


def test_devices_chain_server_serves_a_file_of_the_disk(spawn, fresh_faytd, tmp_path):
    """The whole path: a SPECIAL portal's faults go to the disk's chain
    server, which reads the file's blocks through the block driver, whose
    requests the model answers from the image."""
    import sys
    sys.path.insert(0, ROOT)
    from servers.blockdev import make_image
    text = bytes(range(256)) * 40                   # 10,240 bytes: three blocks
    image = tmp_path / "disk.img"
    make_image(str(image), {"hello.txt": b"hello, disk", "big.bin": text})
    d = fresh_faytd(config={"devices": BLK_DEVICES}, ram="64MiB", clean=True)
    m = spawn("sys.path.insert(0, sys.argv[1])\nfrom servers import blockdev\n"
              "sys.exit(blockdev.main(['model', '--name', 'blk0', '--image', sys.argv[2]]))",
              d.env(), args=[ROOT, str(image)])
    assert m.expect() == "serving blk0: 5 blocks"        # the table, 1 + 3 blocks
    s = spawn("sys.path.insert(0, sys.argv[1])\nfrom servers import blockdev\n"
              "sys.exit(blockdev.main(['disk', '--name', 'blk0', '--chain', 'disk']))",
              d.env(), args=[ROOT])
    assert s.expect() == "serving chain disk"
    c = spawn(r"""
for name, size in (("hello.txt", 11), ("big.bin", 10240)):
    with lp.portal(lp.SPECIAL, lp.PROT_READ, size, chain="disk", message=name.encode()) as p:
        print(p.read(0, size).hex())
""", d.env())
    assert bytes.fromhex(c.expect()) == b"hello, disk"
    assert bytes.fromhex(c.expect()) == text


def test_devices_a_dead_driver_is_detached(spawn, fresh_faytd):
    """A second live driver is EBUSY; once the first dies the window is
    free, and the new driver starts where the model is."""
    d = fresh_faytd(config={"devices": DEVICES}, ram="64MiB", clean=True)
    m, _ = model(spawn, d)
    c, _ = driver(spawn, d)
    assert ask(c, "w32 0 41") == "ok"
    _, got = driver(spawn, d)
    assert got.startswith("EBUSY") and "window blk0 is driven by context" in got
    c.kill()
    for _ in range(100):                    # faytd sees the death asynchronously
        c2, got = driver(spawn, d)
        if not got.startswith("EBUSY"):
            break
        c2.kill()
        time.sleep(0.05)
    assert json.loads(got)[0] == 1
    assert ask(c2, "r32 0") == "41"
    assert ask(m, "irq 1") == "ok"
    assert json.loads(ask(c2, "irqs 10 1"))[0] == 1
