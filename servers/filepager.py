"""A file pager: serves a file's contents to SPECIAL portals through a chain.

    python -m servers.filepager --chain files &
    # a client:  sp = lp.portal(lp.SPECIAL, lp.PROT_READ, size,
    #                           chain="files", message="/path/to/file")

Each page request names the file in sp_req_chain.message (a path) and the
page by its offset.  The pager answers with a run of following pages, as
many as the request allows (run_max, up to the region's end): prefetch, so
that a sequential reader faults once per run, not once per page.  Bytes
past the end of the file read as zeros up to the page's end; a page wholly
past the end fails with ENXIO (the client's access gets SIGBUS, as with a
mapped file truncated under it).  A path it cannot open fails with its errno.
The pager reads straight into the request's slot (os.preadv), so a page
costs one copy here and the UFFDIO_COPY in faytd.

--position-last makes it the backing server behind a cache (servers/cachechain.py):
it answers whatever the chain forwards to it.  Uses only libportal's public API.
"""
import argparse
import errno
import os
import signal
import sys

import libportal as lp


class FilePager:
    def __init__(self, root=None, max_open=16):
        self.root = root
        self.files = {}             # message -> fd
        self.max_open = max_open
        self.served = 0
        self.pages = 0

    def _fd(self, message):
        fd = self.files.get(message)
        if fd is None:
            path = os.fsdecode(message)
            if self.root is not None:
                path = os.path.join(self.root, path.lstrip("/"))
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            if len(self.files) >= self.max_open:
                os.close(self.files.pop(next(iter(self.files))))
            self.files[message] = fd
        return fd

    def __call__(self, req):
        if req.present:             # a write report: nothing to read
            req.supply(length=0)
            return
        fd = self._fd(req.message)
        n = os.preadv(fd, [req.data], req.offset)
        if n <= 0:
            raise OSError(errno.ENXIO, "offset %d is past the end of the file" % req.offset)
        self.served += 1
        self.pages += (n + 4095) // 4096
        req.supply(length=n)

    def close(self):
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


def serve(chain, run_max=1 << 20, slots=8, timeout=None, stop=None, ready=None):
    """Join `chain` and serve files until stop() is true or the chain ends."""
    pager = FilePager()
    server = lp.chain_join(chain, slots=slots, run_max=run_max, timeout=timeout)
    if ready is not None:
        ready()
    try:
        server.serve(pager, stop=stop)
    finally:
        pager.close()
        try:
            server.leave()
        except OSError:
            pass
    return pager


def read_through(chain, path):
    """The client side: map `path` as a SPECIAL portal of `chain`, read it
    through the chain and compare with the file read directly."""
    want = open(path, "rb").read()
    size = max(len(want), 1)
    with lp.portal(lp.SPECIAL, lp.PROT_READ, size, chain=chain, message=os.fsencode(path)) as sp:
        got = sp.read(0, len(want))
    same = got == want
    print("read %d bytes of %s through chain %r: %s" % (len(got), path, chain,
                                                         "identical" if same else "DIFFERENT"),
          flush=True)
    return 0 if same else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chain", default="files")
    ap.add_argument("--run", type=int, default=1 << 20, help="bytes per answer (prefetch)")
    ap.add_argument("--read", metavar="PATH", help="be a client: read PATH through the chain")
    args = ap.parse_args(argv)
    if args.read:
        return read_through(args.chain, args.read)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *a: stopping.append(1))
    pager = serve(args.chain, run_max=args.run, stop=lambda: bool(stopping),
                  ready=lambda: print("file pager serving chain %r (pid %d)"
                                      % (args.chain, os.getpid()), flush=True))
    print("file pager: %d requests, %d pages" % (pager.served, pager.pages), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
