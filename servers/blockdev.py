"""The reference block device: a device model serving a disk image, and its
driver (docs/devices.md#the-reference-block-device).

    python -m servers.blockdev model --name blk0 --image disk.img

The window (faytd's configuration declares it) needs only its register
page: the descriptors and buffers are in the driver's DMA-able RAM, an
ANON portal it grants to the model's context, as a real driver hands a
device its descriptor ring and buffers by physical address.

Registers: DOORBELL (0x00, 32-bit, the driver writes its producer count),
COMPLETED (0x04, 32-bit, the model's completion count), BLOCKS (0x08, the
image's size in blocks), BLOCK_SIZE (0x0c, 4096), RING (0x10, 64-bit, the
physical address of the page of descriptors), ERROR (0x18, 32-bit, why the
model could not read the ring: 0 or an errno).
A descriptor (32 bytes): op (1 read, 2 write), status (0 or an errno),
block, buffer (the physical address of a 4 KiB frame), reserved.

The model maps what the driver names with DIRECT portals (faytd checks the
grant: a frame the driver did not grant it is EPERM, and the descriptor
completes with EFAULT), takes every descriptor from its count up to the
doorbell's, checks each (op, block inside the image: else EINVAL), reads
or writes the image, sets COMPLETED and raises the interrupt.  BlockDriver
(below) is the driver: read(block) and write(block, data), one request at
a time, waiting for the completion interrupt (bounded).  Uses only
libportal's public API.
"""
import argparse
import errno
import os
import struct
import sys
import time
from collections import OrderedDict

import libportal as lp
from libportal import errors

BLOCK = 4096
SLOTS = 16
DOORBELL, COMPLETED, BLOCKS, BLOCK_SIZE, RING, ERROR = 0x00, 0x04, 0x08, 0x0c, 0x10, 0x18
DESC = struct.Struct("<IIQQQ")          # op, status, block, buffer, reserved
OP_READ, OP_WRITE = 1, 2
WINDOW_MIN = BLOCK                      # the register page
DMA_LENGTH = BLOCK + SLOTS * BLOCK      # the driver's: the descriptors, then SLOTS buffers
MAPPED_MAX = 64                         # the model's DIRECT mappings of buffers kept at most


class Model:
    """Serves window `name` from the image file at `path`."""

    def __init__(self, name, path, connection=None):
        self.fd = os.open(path, os.O_RDWR)
        self.blocks = os.fstat(self.fd).st_size // BLOCK
        self.conn = connection
        self.dev = lp.register_device(name, connection=connection)
        if self.dev.size < WINDOW_MIN:
            raise OSError(errno.EINVAL, "window %s: %d bytes, the block device needs %d"
                          % (name, self.dev.size, WINDOW_MIN))
        self.done = self.dev.get32(COMPLETED)       # a restarted model goes on from here
        self.dev.set32(BLOCKS, self.blocks)
        self.dev.set32(BLOCK_SIZE, BLOCK)
        self.dev.on_write = self.on_write
        self.ring = None                # (its physical address, the DIRECT portal of it)
        self.mapped = OrderedDict()     # a buffer's physical address -> its DIRECT portal
        self.driver = 0                 # the driver those are of (faytd's state page)

    def _forget(self):
        """Unmap what was mapped of a driver's RAM (its grants end with it:
        faytd takes them back when it detaches, but a mapping made stays)."""
        if self.ring is not None:
            self.ring[1].unmap()
            self.ring = None
        while self.mapped:
            self.mapped.popitem()[1].unmap()

    def _direct(self, paddr):
        return lp.portal(lp.DIRECT, lp.PROT_RW, BLOCK, paddr=[paddr], connection=self.conn)

    def _ring(self):
        """The driver's page of descriptors (RING): a memoryview, or None
        (ERROR then says why)."""
        at = self.dev.get64(RING)
        if self.ring is not None and self.ring[0] != at:
            self.ring[1].unmap()
            self.ring = None
        if self.ring is None:
            try:
                if not at or at % BLOCK:
                    raise errors.error(errno.EINVAL, "RING: %#x is not a page address" % at)
                self.ring = (at, self._direct(at))
            except OSError as e:
                self.dev.set32(ERROR, e.errno)
                print("ring %#x: %s" % (at, e), flush=True)
                return None
        self.dev.set32(ERROR, 0)
        return self.ring[1].buf

    def _buffer(self, paddr):
        """The frame at paddr, mapped by DIRECT (kept for the next request);
        OSError if the driver did not grant it."""
        p = self.mapped.get(paddr)
        if p is None:
            if paddr % BLOCK:
                raise errors.error(errno.EINVAL, "buffer: %#x is not a page address" % paddr)
            p = self.mapped[paddr] = self._direct(paddr)
            if len(self.mapped) > MAPPED_MAX:
                self.mapped.popitem(last=False)[1].unmap()
        else:
            self.mapped.move_to_end(paddr)
        return p.buf

    def on_write(self, off, size, value):
        if off != DOORBELL or size != 4:
            if off == RING and size == 8:
                self.dev.set64(RING, value)
            return                  # the other registers are read-only
        self.dev.set32(DOORBELL, value)
        if self.dev.driver != self.driver:
            self._forget()              # another driver: nothing of the last one's RAM
            self.driver = self.dev.driver
        ring = self._ring()
        if ring is None:
            self.dev.irq()          # the driver finds ERROR set
            return
        # At most SLOTS descriptors past what is done: a driver's count
        # beyond that is its error, taken as SLOTS.
        upto = self.done + min((value - self.done) & 0xffffffff, SLOTS)
        while self.done != upto:
            at = (self.done % SLOTS) * DESC.size
            op, _, block, paddr, _ = DESC.unpack_from(ring, at)
            status = 0
            try:
                if op not in (OP_READ, OP_WRITE) or block >= self.blocks:
                    raise errors.error(errno.EINVAL, "descriptor")
                buf = self._buffer(paddr)
                if op == OP_READ:
                    buf[:] = os.pread(self.fd, BLOCK, block * BLOCK).ljust(BLOCK, b"\0")
                else:
                    os.pwrite(self.fd, buf, block * BLOCK)
            except OSError as e:
                status = errno.EINVAL if e.errno == errno.EINVAL else errno.EFAULT
            struct.pack_into("<I", ring, at + 4, status)
            self.done = (self.done + 1) & 0xffffffff
        self.dev.set32(COMPLETED, self.done)
        self.dev.irq()

    def serve(self, until=None):
        while until is None or time.monotonic() < until:
            self.dev.serve(0.5)


class BlockDriver:
    """The driver of window `name`: read(block) -> 4096 bytes, write(block,
    data); interrupts at notification slot `index`.  Its descriptors and
    buffers are an ANON portal granted to the model's context."""

    def __init__(self, name, index=9, timeout=10, connection=None):
        from libportal.notification import runtime
        self.conn = connection or lp.connection()
        self.timeout = timeout
        self.irqs = 0
        self.dev = lp.attach_device(name, index, self._irq, timeout=timeout,
                                    connection=self.conn)
        self.dma = lp.portal(lp.ANON, lp.PROT_RW, DMA_LENGTH, connection=self.conn)
        self.buf = self.dma.buf
        self.granted = 0                # the model context granted the portal
        self.blocks = self.dev.read32(BLOCKS)
        self.produced = self.done = self.dev.read32(COMPLETED)
        self._wait = runtime(self.conn).wait
        self._grant()
        self.dev.write64(RING, self.dma.paddr[0])

    def _grant(self):
        """Grant the DMA portal to the model serving the window now (a
        restarted model is another context: faytd's state page says which)."""
        model = self.dev.model
        if model and model != self.granted:
            if self.granted:
                lp.grant(self.dma, to=self.granted, prot=lp.PROT_RW, revoke=True)
            lp.grant(self.dma, to=model, prot=lp.PROT_RW)
            self.granted = model

    def _irq(self, count):
        self.irqs += count

    def _request(self, op, block, data=None):
        self._grant()
        slot = self.produced % SLOTS
        buf = BLOCK + slot * BLOCK
        if data is not None:
            self.buf[buf:buf + BLOCK] = data
        DESC.pack_into(self.buf, slot * DESC.size, op, 0xffffffff, block,
                       self.dma.paddr[buf // BLOCK], 0)
        self.produced = (self.produced + 1) & 0xffffffff
        self.dev.write32(DOORBELL, self.produced)
        deadline = time.monotonic() + self.timeout
        while self.dev.read32(COMPLETED) != self.produced:
            err = self.dev.read32(ERROR)
            if err:
                self.produced = (self.produced - 1) & 0xffffffff
                raise errors.error(err, "block %d: the device could not read the "
                                        "descriptors: %s" % (block, os.strerror(err)))
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.error(errno.ETIMEDOUT, "block %d: no completion within %gs"
                                      % (block, self.timeout))
            self._wait(min(left, 0.5))
        status = struct.unpack_from("<I", self.buf, slot * DESC.size + 4)[0]
        if status:
            raise errors.error(status, "block %d: the device answered %s"
                                  % (block, errno.errorcode.get(status, status)))
        return buf

    def read(self, block):
        buf = self._request(OP_READ, block)
        return bytes(self.buf[buf:buf + BLOCK])

    def write(self, block, data):
        if len(data) != BLOCK:
            raise errors.error(errno.EINVAL, "data: %d bytes, a block is %d"
                                  % (len(data), BLOCK))
        self._request(OP_WRITE, block, data)

    def close(self):
        self.buf.release()
        self.dma.unmap()
        self.dev.close()


# -- files on the disk, served through a chain ----------------------------------
#
# The disk's layout (no real filesystem): block 0 is a table of lines
# "name first-block bytes\n"; each file's bytes are in consecutive blocks.

def make_image(path, files):
    """Write a disk image holding files ({name: bytes})."""
    table, blocks, first = [], [], 1
    for name, data in files.items():
        n = (len(data) + BLOCK - 1) // BLOCK
        table.append("%s %d %d\n" % (name, first, len(data)))
        blocks.append(data.ljust(n * BLOCK, b"\0"))
        first += n
    head = "".join(table).encode()
    if len(head) > BLOCK:
        raise ValueError("make_image: the table is more than one block")
    with open(path, "wb") as f:
        f.write(head.ljust(BLOCK, b"\0") + b"".join(blocks))


class DiskFiles:
    """A chain server's handler: the page a SPECIAL portal of message
    `name` faults is read from that file's blocks through the driver."""

    def __init__(self, driver):
        self.driver = driver
        self.files = {}
        for line in driver.read(0).rstrip(b"\0").decode().splitlines():
            name, first, size = line.split()
            self.files[name.encode()] = (int(first), int(size))

    def __call__(self, req):
        if req.present:             # a write report: nothing to read
            req.supply(length=0)
            return
        f = self.files.get(bytes(req.message))
        if f is None:
            raise OSError(errno.ENOENT, "no file %r on the disk" % bytes(req.message))
        first, size = f
        if req.offset >= size:
            raise OSError(errno.ENXIO, "offset %d is past the end of the file" % req.offset)
        n = min(BLOCK, size - req.offset)
        req.data[:BLOCK] = self.driver.read(first + req.offset // BLOCK)
        req.supply(length=n)


def serve_disk(chain, name, ready=None):
    """Drive window `name` and serve the files of its disk on `chain`."""
    drv = BlockDriver(name)
    server = lp.chain_join(chain, run_max=BLOCK)
    if ready is not None:
        ready()
    try:
        server.serve(DiskFiles(drv))
    finally:
        drv.close()


def cat(chain, name, image=None):
    """The client: map file `name` as a SPECIAL portal of `chain` and read
    it; with image, compare with its blocks read from the image directly."""
    want = None
    if image is not None:
        with open(image, "rb") as f:
            for line in f.read(BLOCK).rstrip(b"\0").decode().splitlines():
                n, first, size = line.split()
                if n == name:
                    f.seek(int(first) * BLOCK)
                    want = f.read(int(size))
    size = len(want) if want is not None else BLOCK
    with lp.portal(lp.SPECIAL, lp.PROT_READ, size, chain=chain, message=name.encode()) as sp:
        got = sp.read(0, size)
    same = want is None or got == want
    print("read %d bytes of %s through chain %r: %s" % (
        len(got), name, chain, "identical to the image" if same else "DIFFERENT"), flush=True)
    return 0 if same else 1


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m servers.blockdev")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model", help="serve a device window from a disk image")
    m.add_argument("--name", required=True)
    m.add_argument("--image", required=True)
    c = sub.add_parser("disk", help="drive the window, serve its files on a chain")
    c.add_argument("--name", required=True)
    c.add_argument("--chain", required=True)
    r = sub.add_parser("cat", help="read a file of the disk through a SPECIAL portal")
    r.add_argument("--chain", required=True)
    r.add_argument("--file", required=True)
    r.add_argument("--image", help="compare with the file's bytes in this image")
    args = ap.parse_args(argv)
    if args.cmd == "cat":
        return cat(args.chain, args.file, args.image)
    if args.cmd == "disk":
        serve_disk(args.chain, args.name,
                   ready=lambda: print("serving chain %s" % args.chain, flush=True))
        return 0
    model = Model(args.name, args.image)
    print("serving %s: %d blocks" % (args.name, model.blocks), flush=True)
    try:
        model.serve()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
