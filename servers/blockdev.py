"""The reference block device: a device model serving a disk image, and its
driver (docs/devices.md#the-reference-block-device).

    python -m servers.blockdev model --name blk0 --image disk.img

The window (at least 72 KiB; faytd's configuration declares it): the
register page, then a descriptor ring of SLOTS descriptors (one page),
then one 4 KiB buffer per slot.

Registers (32-bit): DOORBELL (0x00, the driver writes its producer
count), COMPLETED (0x04, the model's completion count), BLOCKS (0x08, the
image's size in blocks), BLOCK_SIZE (0x0c, 4096).
A descriptor (32 bytes): op (1 read, 2 write), status (0 or an errno),
block, buffer (its offset in the data area), reserved.

The model takes every descriptor from its count up to the doorbell's,
checks each (op, block inside the image, buffer inside the data area: a
bad one completes with EINVAL), reads or writes the image, sets
COMPLETED and raises the interrupt.  BlockDriver (below) is the driver:
read(block) and write(block, data), one request at a time, waiting for the
completion interrupt (bounded).  Uses only libportal's public API.
"""
import argparse
import errno
import os
import struct
import sys
import time

import libportal as lp
from libportal import errors

BLOCK = 4096
SLOTS = 16
DOORBELL, COMPLETED, BLOCKS, BLOCK_SIZE = 0x00, 0x04, 0x08, 0x0c
DESC = struct.Struct("<IIQQQ")          # op, status, block, buffer, reserved
OP_READ, OP_WRITE = 1, 2
RING = 0                                # data-area offset of the descriptors
BUFFERS = BLOCK                         # data-area offset of slot 0's buffer
WINDOW_MIN = BLOCK + BLOCK + SLOTS * BLOCK


class Model:
    """Serves window `name` from the image file at `path`."""

    def __init__(self, name, path, connection=None):
        self.fd = os.open(path, os.O_RDWR)
        self.blocks = os.fstat(self.fd).st_size // BLOCK
        self.dev = lp.register_device(name, connection=connection)
        if self.dev.size < WINDOW_MIN:
            raise OSError(errno.EINVAL, "window %s: %d bytes, the block device needs %d"
                          % (name, self.dev.size, WINDOW_MIN))
        self.done = self.dev.get32(COMPLETED)       # a restarted model goes on from here
        self.dev.set32(BLOCKS, self.blocks)
        self.dev.set32(BLOCK_SIZE, BLOCK)
        self.dev.on_write = self.on_write

    def on_write(self, off, size, value):
        if off != DOORBELL or size != 4:
            return                  # the other registers are read-only
        self.dev.set32(DOORBELL, value)
        # At most SLOTS descriptors past what is done: a driver's count
        # beyond that is its error, taken as SLOTS.
        upto = self.done + min((value - self.done) & 0xffffffff, SLOTS)
        data = self.dev.data
        while self.done != upto:
            at = RING + (self.done % SLOTS) * DESC.size
            op, _, block, buf, _ = DESC.unpack_from(data, at)
            status = 0
            if op not in (OP_READ, OP_WRITE) or block >= self.blocks or \
                    buf % BLOCK or not BUFFERS <= buf <= len(data) - BLOCK:
                status = errno.EINVAL
            elif op == OP_READ:
                data[buf:buf + BLOCK] = os.pread(self.fd, BLOCK, block * BLOCK).ljust(BLOCK, b"\0")
            else:
                os.pwrite(self.fd, data[buf:buf + BLOCK], block * BLOCK)
            struct.pack_into("<I", data, at + 4, status)
            self.done = (self.done + 1) & 0xffffffff
        self.dev.set32(COMPLETED, self.done)
        self.dev.irq()

    def serve(self, until=None):
        while until is None or time.monotonic() < until:
            self.dev.serve(0.5)


class BlockDriver:
    """The driver of window `name`: read(block) -> 4096 bytes, write(block,
    data); interrupts at notification slot `index`."""

    def __init__(self, name, index=9, timeout=10, connection=None):
        from libportal.notification import runtime
        self.conn = connection or lp.connection()
        self.timeout = timeout
        self.irqs = 0
        self.dev = lp.attach_device(name, index, self._irq, timeout=timeout,
                                    connection=self.conn)
        self.window = self.dev.map(lp.PROT_RW)
        self.buf = self.window.buf
        self.blocks = self.dev.read32(BLOCKS)
        self.produced = self.done = self.dev.read32(COMPLETED)
        self._wait = runtime(self.conn).wait

    def _irq(self, count):
        self.irqs += count

    def _request(self, op, block, data=None):
        slot = self.produced % SLOTS
        buf = BUFFERS + slot * BLOCK
        if data is not None:
            self.buf[BLOCK + buf:BLOCK + buf + BLOCK] = data
        DESC.pack_into(self.buf, BLOCK + RING + slot * DESC.size, op, 0xffffffff, block, buf, 0)
        self.produced = (self.produced + 1) & 0xffffffff
        self.dev.write32(DOORBELL, self.produced)
        deadline = time.monotonic() + self.timeout
        while self.dev.read32(COMPLETED) != self.produced:
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.error(errno.ETIMEDOUT, "block %d: no completion within %gs"
                                      % (block, self.timeout))
            self._wait(min(left, 0.5))
        status = struct.unpack_from("<I", self.buf, BLOCK + RING + slot * DESC.size + 4)[0]
        if status:
            raise errors.error(status, "block %d: the device answered %s"
                                  % (block, errno.errorcode.get(status, status)))
        return buf

    def read(self, block):
        buf = self._request(OP_READ, block)
        return bytes(self.buf[BLOCK + buf:BLOCK + buf + BLOCK])

    def write(self, block, data):
        if len(data) != BLOCK:
            raise errors.error(errno.EINVAL, "data: %d bytes, a block is %d"
                                  % (len(data), BLOCK))
        self._request(OP_WRITE, block, data)

    def close(self):
        self.buf.release()
        self.window.unmap()
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
