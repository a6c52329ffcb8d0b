"""A two-server chain: a page cache in front of a backing file pager.

    python -m servers.cachechain --chain cached &

The cache joins the chain first, the file pager (servers/filepager.py) after
it.  The cache holds pages in memory, keyed by (message, offset): it answers
what it holds and forwards the rest down the chain, where the file pager
reads them.  A chain server does not see the answers of the servers after
it, so the cache is filled by the file pager's owner (here: `warm`, the
pages to hold before serving, read from the file at start-up), the way a
boot cache is primed.  Counters show which server answered what.

The file pager answers by reference: it declares its own cache of each
file the backing for that message (the files named in `warm` before
serving, others at their first request).  The region then maps the file
pager's backing although the cache is the chain's first server: the
cache's answers are copies (UFFDIO_COPY makes private pages there), the
misses it forwards are mapped from the file pager's pages.
Uses only libportal's public API.
"""
import argparse
import os
import signal
import sys
import threading

import libportal as lp

from . import filepager

PAGE = lp.PAGE_SIZE


class PageCache:
    def __init__(self):
        self.pages = {}             # (message, offset) -> bytes of one page
        self.hits = 0
        self.forwarded = 0

    def warm(self, message, npages):
        path = os.fsdecode(message)
        with open(path, "rb") as f:
            for i in range(npages):
                b = f.read(PAGE)
                if not b:
                    break
                self.pages[(bytes(message), i * PAGE)] = b

    def __call__(self, req):
        if req.present:
            req.supply(length=0)
            return
        page = self.pages.get((req.message, req.offset))
        if page is None:
            self.forwarded += 1
            req.forward()
            return
        self.hits += 1
        req.supply(page)


def serve_chain(chain, warm=(), stop=None, ready=None, timeout=None):
    """Run the cache (this thread) and the file pager (a second connection
    and thread of this process: two servers of the chain, in order)."""
    cache = PageCache()
    for message, npages in warm:
        cache.warm(message, npages)
    front = lp.chain_join(chain, timeout=timeout)
    back_conn = lp.Connection()
    back = lp.chain_join(chain, run_max=1 << 16, connection=back_conn)
    pager = filepager.FilePager(server=back)
    for message, _ in warm:
        pager.prepare(message)
    t = threading.Thread(target=back.serve, args=(pager,), kwargs={"stop": stop}, daemon=True)
    t.start()
    if ready is not None:
        ready()
    try:
        front.serve(cache, stop=stop)
    finally:
        t.join(5)
        for s in (front, back):
            try:
                s.leave()
            except OSError:
                pass
        pager.close()
        back_conn.close()
    return cache, pager


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chain", default="cached")
    ap.add_argument("--warm", action="append", default=[], metavar="PATH:PAGES",
                    help="pages of a file to hold before serving")
    args = ap.parse_args(argv)
    warm = []
    for w in args.warm:
        path, _, n = w.rpartition(":")
        warm.append((os.fsencode(path), int(n)))
    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *a: stopping.append(1))
    cache, pager = serve_chain(args.chain, warm, stop=lambda: bool(stopping),
                               ready=lambda: print("cache chain %r serving (pid %d)"
                                                   % (args.chain, os.getpid()), flush=True))
    print("cache: %d hits, %d forwarded; file pager: %d requests, %d pages by reference"
          % (cache.hits, cache.forwarded, pager.served, pager.mapped), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
