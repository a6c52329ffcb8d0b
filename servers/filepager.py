"""A file pager: serves a file's contents to SPECIAL portals through a chain.

    python -m servers.filepager --chain files [--file PATH ...] [--copy] &
    # a client:  sp = lp.portal(lp.SPECIAL, lp.PROT_READ, size,
    #                           chain="files", message="/path/to/file")

Each page request names the file in sp_req_chain.message (a path) and the
page by its offset.  The pager answers with a run of following pages, as
many as the request allows (run_max, up to the region's end): prefetch, so
that a sequential reader faults once per run, not once per page.  Bytes
past the end of the file read as zeros up to the page's end; a page wholly
past the end fails with ENXIO (the client's access gets SIGBUS, as with a
mapped file truncated under it).  A path it cannot open fails with its errno.

By reference (the default).  Per file, the pager keeps a cache: an ANON
portal the size of the file (whole pages), declared with ChainServer.back()
as the backing for that message when the pager first hears of the file (a
first request, or --file / prepare() before any).  On a request it reads
into the cache the pages of the run it has not read yet (one pread per
missing stretch, straight into the portal's memory), then answers "these
pages are in my backing" (req.map): faytd maps the cache's own pages into
the client, no copy.  A later portal of the file is served from the cache
with no read of the file and no copy.  A region that does not map this
cache (a portal made before the cache was declared, one longer than the
file, or one of a file since changed) is answered with a copy of the cached
pages (req.supply).  What a client sees is a private file mapping's
semantics: the cache's page until it writes it (then its own copy; it
cannot change the cache), the pager's later writes to that page until then.

The file changing: each request stats the path; if the file is another
(replaced), or its size or mtime changed, that file's cache is dropped
(unbacked, unmapped) and a new one started.  Regions mapped before keep the
pages they had; the pages they fetch after come from the file as it is
then.  A change that keeps the size and lands in the same mtime tick is not
seen, as with any cache keyed by mtime.  At most `max_open` files are held;
the oldest is dropped first.

--copy: the old behaviour, kept to show and measure it: no cache; each run
is read straight into the request's slot (os.preadv) and faytd copies it
into the client (UFFDIO_COPY), a copy per page per portal.

--position-last makes it the backing server behind a cache (servers/cachechain.py):
it answers whatever the chain forwards to it.  Uses only libportal's public API.
"""
import argparse
import errno
import os
import signal
import sys

import libportal as lp

PAGE = lp.PAGE_SIZE


def _pages(n):
    return (n + PAGE - 1) // PAGE * PAGE


class FileCache:
    """One file held by reference: its fd, its identity when it was opened,
    and the cache (an ANON portal, the pages read so far, the backing id)."""
    __slots__ = ("message", "fd", "ident", "size", "portal", "view", "filled", "backing")

    def __init__(self, message, fd, st):
        self.message = message
        self.fd = fd
        self.ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self.size = st.st_size
        self.portal = None
        self.view = None
        self.filled = None          # one byte per page: read into the cache
        self.backing = 0


class FilePager:
    """The handler of a file pager's requests (by reference, or by copy).
    `server` is the ChainServer whose backings it declares (the one whose
    requests it answers: taken from the first request if not given)."""

    def __init__(self, root=None, max_open=16, by_reference=True, server=None):
        self.root = root
        self.files = {}             # message -> fd (copy mode) or FileCache
        self.max_open = max_open
        self.by_reference = by_reference
        self.server = server
        self.served = 0             # requests answered
        self.pages = 0              # pages answered
        self.reads = 0              # preads of a file
        self.read_bytes = 0
        self.mapped = 0             # pages answered by reference (req.map)
        self.copied = 0             # pages answered with data (req.supply)
        self.dropped = 0            # caches dropped because their file changed

    def _path(self, message):
        path = os.fsdecode(message)
        if self.root is not None:
            path = os.path.join(self.root, path.lstrip("/"))
        return path

    def _keep(self, message, held):
        while len(self.files) >= self.max_open:
            self._drop(next(iter(self.files)))
        self.files[message] = held

    def _fd(self, message):
        """Copy mode: the file's fd."""
        fd = self.files.get(message)
        if fd is None:
            fd = os.open(self._path(message), os.O_RDONLY | os.O_CLOEXEC)
            self._keep(message, fd)
        return fd

    # -- by reference -------------------------------------------------------
    def prepare(self, message):
        """Open the file `message` names and declare its cache the backing
        for it, before any request: portals of it made from now on are
        answered by reference from the first page on."""
        return self._cache(bytes(os.fsencode(message)))

    def _cache(self, message):
        """The file's FileCache, made (again, if the file changed)."""
        path = self._path(message)
        c = self.files.get(message)
        try:
            st = os.stat(path)
        except OSError:
            if c is not None:
                self._drop(message)
            raise
        if c is not None:
            if c.ident == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns):
                return c
            self._drop(message)
            self.dropped += 1
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        c = FileCache(message, fd, os.fstat(fd))
        if c.size:
            try:
                c.portal = lp.portal(lp.ANON, lp.PROT_RW, _pages(c.size),
                                     connection=self.server.connection)
                c.view = c.portal.buf
                c.filled = bytearray(_pages(c.size) // PAGE)
                c.backing = self.server.back(message, c.portal)
            except OSError as e:
                # No cache for this file (too big for one portal, faytd's RAM,
                # a quota, a chain with write reports): served by copy.
                print("file pager: %s served by copy: %s" % (path, e), file=sys.stderr,
                      flush=True)
                self._uncache(c)
        self._keep(message, c)
        return c

    def _fill(self, c, start, end):
        """Read into the cache the pages of [start, end) not read yet: one
        pread per stretch of missing pages, straight into the portal."""
        filled, last = c.filled, end // PAGE
        i = filled.find(0, start // PAGE, last)
        while i >= 0:
            j = filled.find(1, i, last)
            j = last if j < 0 else j
            at, stop = i * PAGE, min(j * PAGE, c.size)
            while at < stop:
                n = os.preadv(c.fd, [c.view[at:stop]], at)
                self.reads += 1
                if n <= 0:
                    break               # shorter than it was: the next stat sees it
                self.read_bytes += n
                at += n
            filled[i:j] = b"\1" * (j - i)
            i = filled.find(0, j, last) if j < last else -1

    def _uncache(self, c):
        """Unback and unmap c's cache (regions that map it keep their pages)."""
        if c.backing:
            try:
                self.server.unback(c.message)
            except OSError:
                pass                    # the chain was left: the backing went with it
        if c.view is not None:
            c.view.release()
        if c.portal is not None and c.portal.mapped:
            try:
                c.portal.unmap()
            except OSError:
                pass
        c.portal = c.view = c.filled = None
        c.backing = 0

    def _drop(self, message):
        c = self.files.pop(message)
        if isinstance(c, int):
            os.close(c)
            return
        self._uncache(c)
        os.close(c.fd)

    def _by_reference(self, req):
        c = self._cache(req.message)
        if req.offset >= c.size:
            raise OSError(errno.ENXIO, "offset %d is past the end of the file" % req.offset)
        if c.portal is None:
            return self._by_copy(req, c.fd)
        end = min(req.offset + req.run_max, _pages(c.size))
        self._fill(c, req.offset, end)
        n = end - req.offset
        self.served += 1
        self.pages += n // PAGE
        if req.backed and req.backing == c.backing:
            self.mapped += n // PAGE
            req.map(n)
        else:                           # a region that does not map this cache
            self.copied += n // PAGE
            req.data[:n] = c.view[req.offset:end]
            req.supply(length=n)

    def _by_copy(self, req, fd):
        n = os.preadv(fd, [req.data], req.offset)
        self.reads += 1
        if n <= 0:
            raise OSError(errno.ENXIO, "offset %d is past the end of the file" % req.offset)
        self.read_bytes += n
        self.served += 1
        self.pages += (n + PAGE - 1) // PAGE
        self.copied += (n + PAGE - 1) // PAGE
        req.supply(length=n)

    def __call__(self, req):
        if req.present:             # a write report: nothing to read
            req.supply(length=0)
            return
        if not self.by_reference:
            return self._by_copy(req, self._fd(req.message))
        if self.server is None:
            self.server = req.server
        return self._by_reference(req)

    def close(self):
        for message in list(self.files):
            self._drop(message)

    def counters(self):
        return {k: getattr(self, k) for k in ("served", "pages", "reads", "read_bytes",
                                               "mapped", "copied", "dropped")}


def serve(chain, run_max=1 << 20, slots=8, timeout=None, stop=None, ready=None,
          by_reference=True, files=()):
    """Join `chain` and serve files until stop() is true or the chain ends.
    files: paths to prepare (cache declared) before serving."""
    server = lp.chain_join(chain, slots=slots, run_max=run_max, timeout=timeout)
    pager = FilePager(by_reference=by_reference, server=server)
    if by_reference:
        for path in files:
            pager.prepare(path)
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
        how = "by reference" if sp.backed else "by copy"
    same = got == want
    print("read %d bytes of %s through chain %r (%s): %s" % (
        len(got), path, chain, how, "identical" if same else "DIFFERENT"), flush=True)
    return 0 if same else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chain", default="files")
    ap.add_argument("--run", type=int, default=1 << 20, help="bytes per answer (prefetch)")
    ap.add_argument("--read", metavar="PATH", help="be a client: read PATH through the chain")
    ap.add_argument("--file", action="append", default=[], metavar="PATH",
                    help="declare PATH's cache before serving (by reference from the first portal)")
    ap.add_argument("--copy", action="store_true",
                    help="answer with copies (no cache, no answers by reference)")
    args = ap.parse_args(argv)
    if args.read:
        return read_through(args.chain, args.read)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *a: stopping.append(1))
    pager = serve(args.chain, run_max=args.run, stop=lambda: bool(stopping),
                  by_reference=not args.copy, files=args.file,
                  ready=lambda: print("file pager serving chain %r (pid %d)%s"
                                      % (args.chain, os.getpid(), " by copy" if args.copy else ""),
                                      flush=True))
    print("file pager: %d requests, %d pages (%d by reference, %d copied), %d reads"
          % (pager.served, pager.pages, pager.mapped, pager.copied, pager.reads), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
