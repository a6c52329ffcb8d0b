"""SPECIAL portals: pages supplied by chains of servers through userfaultfd.

Real processes throughout: chain servers and faulting clients are children
of the fork server (support.procs: this process has libportal's guard
thread once it maps a SPECIAL portal, so it does not fork), talking to a
real faytd.  What a child runs is a function at module level (with its
arguments bound by functools.partial).  Every wait is bounded."""
import errno
import faulthandler
import functools
import json
import os
import re
import signal
import subprocess
import time
import uuid

import pytest

import libportal as lp
from support.daemon import Faytd, fayt_objects
from support.procs import CTX, exit_code_of, stop_child

PAGE = 4096
WAIT = 20


def _chain():
    return "test-%s" % uuid.uuid4().hex[:8]


def _pattern(offset, n):
    """Bytes whose every page starts with its own offset: easy to check."""
    out = bytearray((n + PAGE - 1) // PAGE * PAGE)
    for i in range(0, n, PAGE):
        out[i:i + 8] = (offset + i).to_bytes(8, "little")
        out[i + 8:i + 16] = b"FAYTPAGE"
    return bytes(out[:n])


class ChildServer:
    """A chain server in a child process: handler(req, log) answers each request.
    With setup: state = setup(chain server) runs in the child after the
    join, and the handler is called as handler(req, log, state); do(name,
    *args) runs actions[name](state, *args) there, between requests, and
    returns its result."""

    def __init__(self, chain, handler, socket=None, setup=None, actions=None, **join):
        self.ready = CTX.Event()
        self.stop = CTX.Event()
        self.log = CTX.Queue()
        self._cmd, self._res = CTX.Queue(), CTX.Queue()
        self.proc = CTX.Process(target=_serve_chain, args=(
            chain, handler, socket, setup, actions or {}, join,
            self.ready, self.stop, self.log, self._cmd, self._res))
        self.proc.start()
        assert self.ready.wait(WAIT), "the chain server did not join"

    def do(self, name, *args):
        self._cmd.put((name, args))
        how, value = self._res.get(timeout=WAIT)
        assert how == "ok", "the chain server's %s raised %s" % (name, value)
        return value

    def entries(self, n, timeout=WAIT):
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            out.append(self.log.get(timeout=max(0.01, deadline - time.monotonic())))
        return out

    def close(self):
        stop_child(self.stop, self.proc)


def _serve_chain(chain, handler, socket, setup, actions, join, ready, stop_event, log,
                 cmd, res):
    """ChildServer's process."""
    conn = lp.Connection(socket) if socket else None
    s = lp.chain_join(chain, connection=conn, **join)
    state = setup(s) if setup else None
    answer = (lambda req: handler(req, log, state)) if setup else \
        (lambda req: handler(req, log))

    def stop():
        while not cmd.empty():
            name, args = cmd.get(timeout=WAIT)
            try:
                res.put(("ok", actions[name](state, *args)))
            except Exception as e:
                res.put(("raised", repr(e)))
        return stop_event.is_set()

    ready.set()
    s.serve(answer, stop=stop, poll=0.05)
    s.leave()



def _pattern_server(req, log):
    log.put((req.offset, req.access, req.present, req.hop, req.message))
    if req.present:
        return req.supply(length=0)
    req.supply(_pattern(req.offset, min(req.run_max, PAGE)))


def _run_client(target, *args):
    """exit_code_of, bounded by this module's WAIT."""
    return exit_code_of(target, *args, timeout=WAIT)


def _touch(chain, offset, socket=None):
    faulthandler.disable()      # the SIGBUS is expected: no traceback dump
    conn = lp.Connection(socket) if socket else None
    sp = lp.portal(lp.SPECIAL, lp.PROT_READ, 4 * PAGE, chain=chain, message=b"m",
                   connection=conn)
    sp.buf[offset]          # faults here
    os._exit(0)


@pytest.fixture
def chain_server(lp):
    made = []

    def make(handler=_pattern_server, chain=None, **join):
        s = ChildServer(chain or _chain(), handler, **join)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_special_pages_arrive_with_the_right_bytes(lp, chain_server):
    chain = _chain()
    srv = chain_server(chain=chain)
    sp = lp.portal(lp.SPECIAL, lp.PROT_READ, 8 * PAGE, chain=chain, message=b"hello")
    try:
        assert isinstance(sp, lp.SpecialPortal) and sp.length == 8 * PAGE
        assert sp.read(3 * PAGE, PAGE) == _pattern(3 * PAGE, PAGE)        # C copy, no GIL
        assert bytes(sp.buf[5 * PAGE:6 * PAGE]) == _pattern(5 * PAGE, PAGE)  # Python access
        assert sp.read(3 * PAGE, 16) == _pattern(3 * PAGE, 16)              # fetched once
        got = srv.entries(2)
        assert [(o, a, m) for o, a, _, _, m in got] == [(3 * PAGE, lp.ACCESS_READ, b"hello"),
                                                      (5 * PAGE, lp.ACCESS_READ, b"hello")]
        assert srv.log.empty()
    finally:
        sp.unmap()


def _supply_the_run(req, log):
    log.put(req.offset)
    req.supply(_pattern(req.offset, req.run_max))


def test_special_prefetch_run_fills_following_pages(lp, chain_server):
    chain = _chain()
    srv = chain_server(_supply_the_run, chain=chain, run_max=4 * PAGE)
    with lp.portal(lp.SPECIAL, lp.PROT_READ, 10 * PAGE, chain=chain) as sp:
        whole = b"".join(sp.read(i * PAGE, PAGE) for i in range(10))   # in order
        assert whole == _pattern(0, 10 * PAGE)
        assert srv.entries(3) == [0, 4 * PAGE, 8 * PAGE]    # three faults for ten pages
        time.sleep(0.1)
        assert srv.log.empty()


def _front_forwards_odd_pages(req, log):
    log.put(("front", req.offset, req.hop))
    if req.offset // PAGE % 2:
        return req.forward()
    req.supply(_pattern(req.offset, PAGE))


def _back_supplies(req, log):
    log.put(("back", req.offset, req.hop))
    req.supply(_pattern(req.offset, PAGE))


def test_special_forwarding_through_a_two_server_chain(lp):
    chain = _chain()
    a = ChildServer(chain, _front_forwards_odd_pages)
    b = ChildServer(chain, _back_supplies)
    try:
        with lp.portal(lp.SPECIAL, lp.PROT_READ, 4 * PAGE, chain=chain) as sp:
            assert sp.read(0, 4 * PAGE) == _pattern(0, 4 * PAGE)
        assert sorted(a.entries(4)) == [("front", i * PAGE, 0) for i in range(4)]
        assert sorted(b.entries(2)) == [("back", PAGE, 1), ("back", 3 * PAGE, 1)]
    finally:
        a.close()
        b.close()


def _front_of_two(req, log):
    """Pages 0-1 here (a two-page run from page 0), 2 forwarded, 3 failed."""
    log.put(("front", req.offset, req.hop))
    page = req.offset // PAGE
    if page == 2:
        return req.forward()
    if page == 3:
        return req.fail(errno.ENOSPC)
    req.supply(_pattern(req.offset, min(req.run_max, 2 * PAGE - req.offset)))


def _back_of_two(req, log):
    log.put(("back", req.offset, req.hop))
    req.supply(_pattern(req.offset, PAGE))


@pytest.mark.parametrize("spin_us", [0, 2000000], ids=["loop-path", "fast-path"])
def test_special_fast_path_and_loop_path_agree(fresh_faytd, conn_to, spin_us):
    """faytd answers a read fault either in one C call (post, spin for the
    answer, copy: when pager_spin_us > 0 and the server has nothing else in
    flight) or through its loop (the eventfd).  Both give the same pages, the
    same forwarding, the same SIGBUS, whatever the CPU count of the machine.
    (The fast variant spins up to 2 s, so that even a slow server's answer
    is caught by the spin: page 0's is, the forward and the failure are
    handed to the loop.)"""
    d = fresh_faytd(config={"pager_spin_us": spin_us})
    conn = conn_to(d)
    chain = _chain()
    a = ChildServer(chain, _front_of_two, socket=d.socket, run_max=2 * PAGE)
    b = ChildServer(chain, _back_of_two, socket=d.socket)
    try:
        sp = lp.portal(lp.SPECIAL, lp.PROT_READ, 4 * PAGE, chain=chain, message=b"m",
                       connection=conn)
        try:
            assert sp.read(0, 3 * PAGE) == _pattern(0, 3 * PAGE)
        finally:
            sp.unmap()
        assert _run_client(_touch, chain, 3 * PAGE, d.socket) == -signal.SIGBUS
        assert sorted(a.entries(3)) == [("front", 0, 0), ("front", 2 * PAGE, 0),
                                        ("front", 3 * PAGE, 0)]
        assert b.entries(1) == [("back", 2 * PAGE, 1)]
        assert a.log.empty() and b.log.empty()          # page 1 came with page 0's run
        # Page 0's fault in one C call (fast path only); page 2's (forwarded) and
        # the child's page 3 (failed) through the loop.
        faults = conn.stats()["faults"]
        assert faults["in_one_call"] == (1 if spin_us else 0)
        assert faults["total"] >= 3
        assert faults["by_loop"] == faults["total"] - faults["in_one_call"]
    finally:
        a.close()
        b.close()
    log = d.stop()
    assert "page at 0x3000 failed: No space left on device" in log
    assert "UFFDIO_COPY" not in log
    one_call = re.search(r"region \d+ \(chain %r\) closed: 2 faults, 3 pages fetched "
                         r"\((\d+) faults answered in one call\)" % chain, log)
    assert one_call, log
    assert int(one_call.group(1)) == (1 if spin_us else 0)


def _slow_server(req, log):
    time.sleep(0.0005)          # answers after faytd's spin: through the eventfd
    req.supply(_pattern(req.offset, PAGE))


def _fault_pages(socket, n, out):
    faulthandler.disable()
    conn = lp.Connection(socket)
    chain = out.get()
    sp = lp.portal(lp.SPECIAL, lp.PROT_READ, n * PAGE, chain=chain, message=b"m",
                   connection=conn)
    for i in range(n):
        sp.buf[i * PAGE]
    os._exit(0)


def _list(conn, sp_name):
    conn.list_sharepoints()


def _attach(conn, sp_name):
    lp.share_attach(sp_name, connection=conn).unmap()


@pytest.mark.parametrize("look", [_list, _attach], ids=["list", "attach"])
def test_special_answers_are_not_lost_while_faytd_catches_up(fresh_faytd, conn_to, look):
    """A list makes faytd look at every fd that is ready (catch-up), and
    the C path looks at what else is ready before it serves an attach; a
    chain's answer eventfd is edge-triggered, so the edge either look sees
    must still reach the fault engine.  One client faults page after page
    while another lists (or attaches) without pause: no fault may wait out
    the chain's timeout (SIGBUS)."""
    d = fresh_faytd(config={"pager_spin_us": 0, "pager_timeout": 2})
    lister = conn_to(d)
    listed = lp.share_create("listed", PAGE, connection=lister)
    chain = _chain()
    srv = ChildServer(chain, _slow_server, socket=d.socket)
    q = CTX.Queue()
    q.put(chain)
    client = CTX.Process(target=_fault_pages, args=(d.socket, 600, q))
    client.start()
    try:
        while client.is_alive():
            look(lister, "listed")
        client.join(WAIT)
        assert client.exitcode == 0, "a fault waited out the timeout (exit %s)" % client.exitcode
    finally:
        if client.is_alive():
            client.kill()
            client.join(WAIT)
        srv.close()
        listed.destroy()


def _fail_eio(req, log):
    log.put(req.offset)
    req.fail(errno.EIO)


def _forward(req, log):
    req.forward()


def _stall(req, log):
    log.put(req.offset)
    time.sleep(3600)


def test_special_failed_request_gives_sigbus(lp, chain_server):
    chain = _chain()
    srv = chain_server(_fail_eio, chain=chain)
    assert _run_client(_touch, chain, PAGE) == -signal.SIGBUS
    assert srv.entries(1) == [PAGE]


def test_special_end_of_chain_gives_sigbus(lp, chain_server):
    chain = _chain()
    chain_server(_forward, chain=chain)
    assert _run_client(_touch, chain, 0) == -signal.SIGBUS


def test_special_server_killed_mid_request_fails_not_hangs(lp, chain_server):
    chain = _chain()
    srv = chain_server(_stall, chain=chain, timeout=60)
    client = CTX.Process(target=_touch, args=(chain, 0))
    client.start()
    try:
        assert srv.entries(1) == [0]
        t = time.monotonic()
        srv.proc.kill()
        client.join(WAIT)
        assert not client.is_alive(), "the client hung after its chain server died"
        assert client.exitcode == -signal.SIGBUS
        assert time.monotonic() - t < 10            # the death, not the 60 s timeout
    finally:
        if client.is_alive():
            client.kill()
            client.join(WAIT)


def _answer_too_late(req, log):
    log.put(req.offset)
    time.sleep(2)           # silent past the chain's 0.3 s
    req.supply(_pattern(req.offset, PAGE))     # too late: dropped


def test_special_silent_server_times_out(lp, chain_server):
    chain = _chain()
    chain_server(_answer_too_late, chain=chain, timeout=0.3)
    t = time.monotonic()
    assert _run_client(_touch, chain, 0) == -signal.SIGBUS
    took = time.monotonic() - t
    assert 0.3 <= took < 10


def test_special_write_reports_the_first_write(lp, chain_server):
    chain = _chain()
    srv = chain_server(chain=chain, write_reports=True)
    with lp.portal(lp.SPECIAL, lp.PROT_RW, 4 * PAGE, chain=chain) as sp:
        if not sp.write_protect:
            pytest.fail("this kernel lacks userfaultfd write-protect on anonymous memory")
        assert sp.read(0, 8) == _pattern(0, 8)                  # read: supplied protected
        sp.write(16, b"written")                                # first write: reported
        sp.write(32, b"again")                                  # second: not reported
        sp.write(PAGE + 16, b"fresh")                           # write to a missing page
        assert sp.read(0, 40) == _pattern(0, 16) + b"written" + bytes(9) + b"again" + bytes(3)
        assert sp.read(PAGE + 16, 5) == b"fresh"
        got = [(o, a, p) for o, a, p, _, _ in srv.entries(3)]
        assert got == [(0, lp.ACCESS_READ, False), (0, lp.ACCESS_WRITE, True),
                       (PAGE, lp.ACCESS_WRITE, False)]
        time.sleep(0.1)
        assert srv.log.empty()


def _hold_page_2(seen, req, log):
    log.put(req.offset)
    if req.offset != 2 * PAGE:
        return req.supply(_pattern(req.offset, PAGE))
    deadline = time.monotonic() + WAIT
    while not req.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    seen.put(req.cancelled)
    req.supply(_pattern(req.offset, PAGE))      # dropped by faytd


def test_special_client_death_cancels_its_requests(lp, chain_server):
    chain = _chain()
    seen = CTX.Queue()
    srv = chain_server(functools.partial(_hold_page_2, seen), chain=chain)
    client = CTX.Process(target=_touch, args=(chain, 2 * PAGE))
    client.start()
    assert srv.entries(1) == [2 * PAGE]
    client.kill()
    client.join(WAIT)
    assert seen.get(timeout=WAIT) is True
    # faytd and the chain go on serving.
    with lp.portal(lp.SPECIAL, lp.PROT_READ, PAGE, chain=chain) as sp:
        assert sp.read(0, 8) == _pattern(0, 8)


def test_special_chain_needs_a_server_and_the_right(lp, fresh_faytd, conn_to):
    with pytest.raises(lp.NotFound, match="no server serves chain 'nobody-serves-this'"):
        lp.portal(lp.SPECIAL, lp.PROT_READ, PAGE, chain="nobody-serves-this")
    with pytest.raises(lp.InvalidArgument, match="needs a chain"):
        lp.portal(lp.SPECIAL, lp.PROT_READ, PAGE)
    cfg = {"policy": {"categories": {"core": {"classes": ["SPECIAL", "ANON"],
                                              "chains": ["files.*"]}},
                      "default": "core"}}
    d = fresh_faytd(config=cfg)
    c = conn_to(d)
    with pytest.raises(lp.PermissionDenied, match="chain 'other': category core may not "
                                                   "serve it"):
        lp.chain_join("other", connection=c)
    s = lp.chain_join("files.a", connection=c)
    s.leave()


def test_special_chain_server_may_not_map_its_own_chain(lp):
    chain = _chain()
    s = lp.chain_join(chain)
    try:
        with pytest.raises(lp.Deadlock, match="serves chain"):
            lp.portal(lp.SPECIAL, lp.PROT_READ, PAGE, chain=chain)
    finally:
        s.leave()


def test_special_faytd_death_gives_sigbus_not_hang(fresh_faytd, tmp_path):
    d = fresh_faytd()
    chain = _chain()
    srv = ChildServer(chain, _stall, socket=d.socket)
    client = CTX.Process(target=_touch, args=(chain, 0, d.socket))
    client.start()
    _faytd_dies_under(d, client, srv, before=lambda: srv.entries(1) == [0])


def _faytd_dies_under(d, client, srv, before, after=lambda: True):
    """Once before() holds, kill faytd d; once after() holds, the client
    must end with SIGBUS, not hang.  A faytd restarted on the dead one's
    state directory then removes what it left (the contexts its journal
    names died too)."""
    try:
        assert before()
        d.proc.kill()
        d.proc.wait(WAIT)
        assert after()
        client.join(WAIT)
        assert not client.is_alive(), "the client hung after faytd died"
        assert client.exitcode == -signal.SIGBUS
    finally:
        for p in (client, srv.proc):
            if p.is_alive():
                p.kill()
                p.join(WAIT)
    again = Faytd(os.path.dirname(d.socket))
    again.stop()
    assert fayt_objects([d.proc.pid, again.proc.pid]) == []


def test_special_nothing_left_in_dev_shm(fresh_faytd, conn_to):
    d = fresh_faytd()
    chain = _chain()
    srv = ChildServer(chain, _pattern_server, socket=d.socket)
    c = conn_to(d)
    sp = lp.portal(lp.SPECIAL, lp.PROT_READ, 4 * PAGE, chain=chain, connection=c)
    assert sp.read(0, 4 * PAGE) == _pattern(0, 4 * PAGE)
    sp.unmap()
    srv.close()
    c.close()
    d.stop()
    assert fayt_objects([d.proc.pid]) == []


def _serve_file_counted(chain, ready, stop, out, by_reference, prepare):
    from servers import filepager
    pager = filepager.serve(chain, run_max=8 * PAGE, stop=stop.is_set, ready=ready.set,
                            by_reference=by_reference, files=prepare)
    out.put(pager.counters())
    out.close()
    out.join_thread()
    os._exit(0)


class FilePagerChild:
    """servers/filepager.py in a child process (runs of 8 pages), on its own chain."""

    def __init__(self, by_reference=True, prepare=()):
        self.chain = _chain()
        self.ready, self.stop, self.out = CTX.Event(), CTX.Event(), CTX.Queue()
        self.proc = CTX.Process(target=_serve_file_counted, args=(
            self.chain, self.ready, self.stop, self.out, by_reference, list(prepare)))
        self.proc.start()
        assert self.ready.wait(WAIT), "the file pager did not start"

    def counters(self):
        """Stop it; its counters."""
        self.stop.set()
        got = self.out.get(timeout=WAIT)
        self.close()
        return got

    def close(self):
        stop_child(self.stop, self.proc)


def _serve_cache(chain, path, ready, stop, out):
    from servers import cachechain
    cache, pager = cachechain.serve_chain(chain, [(path, 2)], stop=stop.is_set,
                                          ready=ready.set)
    out.put((cache.hits, cache.forwarded, pager.served))
    out.close()
    out.join_thread()       # the queue's feeder thread, before os._exit
    os._exit(0)


@pytest.mark.parametrize("by_reference", [True, False], ids=["by-reference", "by-copy"])
def test_special_file_pager_serves_a_file(lp, tmp_path, by_reference):
    """The first portal of a file (by reference: its cache is declared at the
    first request, so this one gets copies of it) and the second (backed
    by the cache, or copies again with --copy)."""
    data = os.urandom(20 * PAGE + 100)
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    pager = FilePagerChild(by_reference=by_reference)
    chain = pager.chain
    try:
        for backed in (False, by_reference):
            with lp.portal(lp.SPECIAL, lp.PROT_READ, 21 * PAGE, chain=chain,
                           message=str(path)) as sp:
                assert sp.backed is backed
                assert sp.read(0, len(data)) == data                    # the tail page too
                assert sp.read(len(data), 21 * PAGE - len(data)) == bytes(21 * PAGE - len(data))
                assert _smaps(sp.addr)["Anonymous"] == (0 if backed else 21 * 4)
        with lp.portal(lp.SPECIAL, lp.PROT_READ, 22 * PAGE, chain=chain,
                       message=str(path)) as sp:
            assert not sp.backed                # longer than the file's cache
            assert sp.read(0, 16) == data[:16]
        missing = CTX.Process(target=_touch_file, args=(chain, str(tmp_path / "missing")))
        missing.start()
        missing.join(WAIT)
        assert missing.exitcode == -signal.SIGBUS                  # ENOENT: SIGBUS, not zeros
    finally:
        pager.close()


def _touch_file(chain, path):
    faulthandler.disable()
    sp = lp.portal(lp.SPECIAL, lp.PROT_READ, PAGE, chain=chain, message=path)
    sp.buf[0]
    os._exit(0)


def test_special_cache_chain_forwards_misses_to_the_file_pager(lp, tmp_path):
    data = os.urandom(6 * PAGE)
    path = tmp_path / "cached.bin"
    path.write_bytes(data)
    chain = _chain()
    ready, stop, out = CTX.Event(), CTX.Event(), CTX.Queue()
    p = CTX.Process(target=_serve_cache, args=(chain, os.fsencode(path), ready, stop, out))
    p.start()
    try:
        assert ready.wait(WAIT)
        with lp.portal(lp.SPECIAL, lp.PROT_READ, 6 * PAGE, chain=chain,
                       message=os.fsencode(path)) as sp:
            got = b"".join(sp.read(i * PAGE, PAGE) for i in range(6))
        assert got == data
        stop.set()
        hits, forwarded, served = out.get(timeout=WAIT)
        assert hits == 2 and forwarded >= 1 and served == forwarded
    finally:
        stop.set()
        p.join(WAIT)
        if p.is_alive():
            p.kill()
            p.join(WAIT)


def _attach_and_read(ident, n, out):
    sp = lp.portal(lp.SPECIAL | lp.SHARE, lp.PROT_READ, n * PAGE, identifier=ident)
    out.put((sp.created, sp.read(0, n * PAGE) == _pattern(0, n * PAGE)))
    sp.unmap()
    out.close()
    out.join_thread()


def test_special_share_point_mapped_by_two_processes_fetches_each_page_once(lp, chain_server):
    chain = _chain()
    srv = chain_server(chain=chain)
    ident = "special-share-%s" % uuid.uuid4().hex[:8]
    sp = lp.portal(lp.SPECIAL | lp.SHARE, lp.PROT_READ, 4 * PAGE, identifier=ident, create=True,
                   chain=chain, message=b"shared")
    try:
        assert sp.created
        assert sp.read(0, 2 * PAGE) == _pattern(0, 2 * PAGE)
        with pytest.raises(lp.AlreadyExists):
            lp.portal(lp.SPECIAL | lp.SHARE, lp.PROT_READ, 4 * PAGE, identifier=ident,
                      create=True, chain=chain)
        out = CTX.Queue()
        p = CTX.Process(target=_attach_and_read, args=(ident, 4, out))
        p.start()
        assert out.get(timeout=WAIT) == (False, True)
        p.join(WAIT)
        assert p.exitcode == 0
        assert sp.read(2 * PAGE, 2 * PAGE) == _pattern(2 * PAGE, 2 * PAGE)   # fetched by the child
        got = sorted(o for o, _, _, _, _ in srv.entries(4))
        assert got == [0, PAGE, 2 * PAGE, 3 * PAGE]
        time.sleep(0.1)
        assert srv.log.empty()          # each page once, whoever touched it first
    finally:
        sp.unmap()
    with pytest.raises(lp.NotFound, match="no special share-point"):
        lp.portal(lp.SPECIAL | lp.SHARE, lp.PROT_READ, 4 * PAGE, identifier=ident)


_UNPRIVILEGED_CLIENT = r"""
import json, os, sys
import libportal as lp
c = lp.Connection(sys.argv[1])
sp = lp.portal(lp.SPECIAL, lp.PROT_READ, 2 * 4096, chain=sys.argv[2], connection=c)
data = sp.read(0, 2 * 4096)
print(json.dumps({"uid": os.getuid(), "user_mode_only": sp.user_mode_only,
                  "first": int.from_bytes(data[4096:4104], "little")}))
sp.unmap()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_special_unprivileged_client_gets_user_mode_only(as_user, world_faytd):
    """vm.unprivileged_userfaultfd is 0 here: a plain userfaultfd is refused
    to an unprivileged process, UFFD_USER_MODE_ONLY is not, and suffices."""
    d = world_faytd(policy={"categories": {"core": {"classes": ["SPECIAL", "ANON"],
                                              "chains": ["*"]}},
                      "default": "core"})
    chain = _chain()
    srv = ChildServer(chain, _pattern_server, socket=d.socket)
    try:
        p = as_user.popen(_UNPRIVILEGED_CLIENT, [d.socket, chain], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
        try:
            out, err = p.communicate(timeout=WAIT)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0, err
        rep = json.loads(out.strip().splitlines()[-1])
        assert rep["uid"] != 0
        assert rep["first"] == PAGE
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            if f.read().strip() == "0":
                assert rep["user_mode_only"] is True
    finally:
        srv.close()


# userfaultfd(2)'s number and the seccomp audit arch, per machine.
_UFFD_SYSCALL = {"x86_64": (323, 0xC000003E), "aarch64": (282, 0xC00000B7)}


def _deny_userfaultfd(err):
    """From now on userfaultfd(2) fails with `err` in this process: a seccomp
    filter, as container runtimes install (Docker's default profile answers
    EPERM), or as a kernel without CONFIG_USERFAULTFD answers ENOSYS."""
    import ctypes
    import platform
    nr, arch = _UFFD_SYSCALL[platform.machine()]

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte),
                    ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

    ld_abs, jeq, ret = 0x20, 0x15, 0x06                      # BPF_LD|W|ABS, JMP|JEQ|K, RET|K
    insns = (Insn * 6)(Insn(ld_abs, 0, 0, 4),                # seccomp_data.arch
                       Insn(jeq, 0, 3, arch),                # another arch: allow
                       Insn(ld_abs, 0, 0, 0),                # seccomp_data.nr
                       Insn(jeq, 0, 1, nr),
                       Insn(ret, 0, 0, 0x00050000 | err),    # SECCOMP_RET_ERRNO | err
                       Insn(ret, 0, 0, 0x7fff0000))          # SECCOMP_RET_ALLOW
    prog = Prog(6, insns)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(prog), 0, 0):
        raise OSError(ctypes.get_errno(), "prctl: cannot install the seccomp filter")


def _special_without_uffd(chain, err, out):
    try:
        sp = lp.portal(lp.SPECIAL, lp.PROT_READ, 2 * PAGE, chain=chain, message=b"m")
        before = sp.read(PAGE, 16) == _pattern(PAGE, 16)
        sp.unmap()
        _deny_userfaultfd(err)
        try:
            lp.portal(lp.SPECIAL, lp.PROT_READ, 2 * PAGE, chain=chain, message=b"m")
            out.put(("no error", before))
        except OSError as e:
            me = [c for c in lp.connection().list_contexts()["contexts"]
                  if c["pid"] == os.getpid()]
            out.put((type(e).__name__, before, e.errno, str(e), [c["mappings"] for c in me]))
    except BaseException as e:
        out.put(("child failed", repr(e)))
    out.close()
    out.join_thread()           # the queue's feeder thread has sent it: os._exit is next
    os._exit(0)


@pytest.mark.parametrize("err", [errno.ENOSYS, errno.EPERM, errno.EACCES],
                         ids=["ENOSYS", "EPERM", "EACCES"])
def test_special_without_userfaultfd_is_a_clear_enosys_or_eperm(lp, chain_server, err):
    """No userfaultfd (a kernel without it, a seccomp filter): the SPECIAL
    portal fails with ENOSYS or EPERM and a message naming the cause, and
    nothing is created.  The same call works in the same process before."""
    import platform
    if platform.machine() not in _UFFD_SYSCALL:
        pytest.skip("no seccomp filter written for %s: userfaultfd's syscall number "
                    "is known here for %s only" % (platform.machine(), sorted(_UFFD_SYSCALL)))
    chain = _chain()
    chain_server(chain=chain)
    out = CTX.Queue()
    assert _run_client(_special_without_uffd, chain, err, out) == 0
    got = out.get(timeout=WAIT)
    want = errno.ENOSYS if err == errno.ENOSYS else errno.EPERM
    assert got[:3] == ("NotImplementedClass" if want == errno.ENOSYS else "PermissionDenied",
                       True, want), got
    assert "userfaultfd" in got[3] and ("seccomp" in got[3]), got[3]
    assert got[4] == [0], "the refused call left a mapping in faytd: %r" % (got,)


def _read_two_pages(chain, socket=None):
    faulthandler.disable()
    conn = lp.Connection(socket) if socket else None
    sp = lp.portal(lp.SPECIAL, lp.PROT_READ, 16 * PAGE, chain=chain, message=b"m",
                   connection=conn)
    ok = bytes(sp.buf[0:PAGE]) == _pattern(0, PAGE) and \
        bytes(sp.buf[PAGE:2 * PAGE]) == _pattern(PAGE, PAGE)
    os._exit(0 if ok else 3)


def _oversized_answer(saved, req, log):
    """Supplies one page, claims 16 and a bit, with the slot stride
    scribbled over (put back at the next request: saved)."""
    L, ffi = lp._abi.lib, lp._abi.ffi
    h = ffi.cast("struct fayt_pager_header *", req.server._ch)
    if saved:
        h.slot_stride = saved.pop("stride")
    log.put(req.offset)
    req.data[:PAGE] = _pattern(req.offset, PAGE)
    d = L.fayt_pager_slot(req.server._ch, req.slot)
    d.error = 0
    d.answer_length = 16 * PAGE + 100
    d.verdict = L.FAYT_PAGE_DATA
    saved["stride"] = h.slot_stride
    h.slot_stride = 0x7ffff000
    head = h.ans_head
    h.ans_ring[head % L.FAYT_PAGER_SLOTS_MAX] = req.slot
    h.ans_head = head + 1
    h.rung = 1
    os.eventfd_write(req.server._efd, 1)
    req._answered = True


def test_special_a_servers_answer_is_bounded_by_faytd_not_by_the_channel(lp, chain_server):
    """The channel is the server's to scribble on.  A hostile server that
    publishes an answer by hand claiming 16 pages (and a bit) from a one-page
    slot, after setting the header's slot stride to nonsense, supplies one
    page: faytd finds slots with its own stride and bounds answer_length by
    the slot and the region, whole pages only.  The next page is asked for
    again, never filled from beyond the slot, and faytd lives on."""
    chain = _chain()
    srv = chain_server(functools.partial(_oversized_answer, {}), chain=chain, run_max=PAGE)
    assert _run_client(_read_two_pages, chain) == 0
    assert srv.entries(2) == [0, PAGE]
    conn = lp.Connection()
    try:
        assert isinstance(conn.list_contexts()["contexts"], list)     # faytd is alive
    finally:
        conn.close()


# -- answers by reference: a chain server's backing --------------------------

def _backing_setup(npages, filled, message, s):
    p = lp.portal(lp.ANON, lp.PROT_RW, npages * PAGE, connection=s.connection)
    for i in (range(npages) if filled is None else filled):
        p.buf[i * PAGE:(i + 1) * PAGE] = _pattern(i * PAGE, PAGE)
    return {"server": s, "portal": p, "backing": s.back(message, p), "message": message}


def _backing(npages, filled=None, message=b"m"):
    """A ChildServer setup: an ANON portal of npages whose pages in `filled`
    (all by default; the others are never touched, so the object lacks
    them) hold _pattern, declared the backing for `message`."""
    return functools.partial(_backing_setup, npages, filled, message)


def _write_backing(st, off, data):
    st["portal"].buf[off:off + len(data)] = data


def _read_backing(st, off, n):
    return bytes(st["portal"].buf[off:off + n])


def _unmap_backing(st):
    st["portal"].unmap()


def _unback(st):
    st["server"].unback(st["message"])


def _the_backing(st):
    return st["backing"]


_BACKING_ACTIONS = {
    "write": _write_backing,
    "read": _read_backing,
    "unmap": _unmap_backing,
    "unback": _unback,
    "backing": _the_backing,
}


def _by_reference(req, log, state):
    """Backed requests: map the whole run; others: the pattern, one page."""
    log.put((req.offset, req.backed, req.backing))
    if req.backed:
        return req.map(req.run_max)
    req.supply(_pattern(req.offset, PAGE))


def _backed_server(chain, npages, filled=None, handler=_by_reference, **join):
    return ChildServer(chain, handler, setup=_backing(npages, filled),
                       actions=_BACKING_ACTIONS, **join)


def _smaps(addr):
    """{field: value} of this process's mapping that starts at addr (kB as ints)."""
    out, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if not head.endswith(":"):              # a mapping's first line
                if inside:
                    break
                inside = int(head.split("-")[0], 16) == addr
            elif inside:
                value = line.split(":", 1)[1].split()
                out[head[:-1]] = int(value[0]) if value and value[0].isdigit() else value
    return out


def _free_frames(conn):
    return conn.list_contexts()["free_frames"]


def test_special_backed_pages_arrive_by_reference(lp):
    chain = _chain()
    srv = _backed_server(chain, 8, run_max=2 * PAGE)
    try:
        backing = srv.do("backing")
        with lp.portal(lp.SPECIAL, lp.PROT_READ, 8 * PAGE, chain=chain, message=b"m") as sp:
            assert sp.backed and not sp.write_protect
            assert "ui" in _smaps(sp.addr)["VmFlags"]           # registered for minor faults
            assert sp.read(0, 8 * PAGE) == _pattern(0, 8 * PAGE)
            assert srv.entries(4) == [(i * PAGE, True, backing) for i in (0, 2, 4, 6)]
            m = _smaps(sp.addr)
            assert (m["Rss"], m["Anonymous"]) == (32, 0)         # the server's pages, no copy
            # The server's later write to a page the client has is seen there.
            srv.do("write", 3 * PAGE + 100, b"written later")
            assert sp.read(3 * PAGE + 100, 13) == b"written later"
        assert srv.log.empty()
    finally:
        srv.close()


def test_special_backed_client_writes_stay_private(lp):
    chain = _chain()
    srv = _backed_server(chain, 8, run_max=PAGE)
    try:
        with lp.portal(lp.SPECIAL, lp.PROT_RW, 8 * PAGE, chain=chain, message=b"m") as sp:
            assert sp.backed
            assert sp.read(PAGE, 16) == _pattern(PAGE, 16)
            sp.write(PAGE + 8, b"CLIENT")                    # a page mapped: copied on write
            sp.write(5 * PAGE, b"FRESH")                     # a page not mapped yet
            assert sp.read(PAGE, 16) == _pattern(PAGE, 8) + b"CLIENTGE"
            assert sp.read(5 * PAGE, 8) == b"FRESH" + _pattern(5 * PAGE, 8)[5:]
            assert srv.do("read", PAGE, 16) == _pattern(PAGE, 16)            # not the server's
            assert srv.do("read", 5 * PAGE, 16) == _pattern(5 * PAGE, 16)
            assert _smaps(sp.addr)["Anonymous"] == 8         # the two written pages only
            srv.do("write", PAGE + 8, b"SERVER")             # after the client's write: not seen
            assert sp.read(PAGE + 8, 6) == b"CLIENT"
        assert [o for o, _, _ in srv.entries(2)] == [PAGE, 5 * PAGE]
    finally:
        srv.close()


def test_special_backed_region_faults_on_every_run(lp):
    """Linux does not fault around in uffd-minor VMAs: with all of the
    backing's pages in its page cache, each page still comes through a
    request (one page a run here), for a second portal too."""
    chain = _chain()
    srv = _backed_server(chain, 8, run_max=PAGE)
    try:
        for _ in range(2):
            with lp.portal(lp.SPECIAL, lp.PROT_READ, 8 * PAGE, chain=chain, message=b"m") as sp:
                assert sp.backed
                assert bytes(sp.buf[0:8 * PAGE]) == _pattern(0, 8 * PAGE)
            # (sorted: bytes() of a view is one memcpy, which may touch the
            # last page before the second, depending on alignment)
            assert sorted(o for o, _, _ in srv.entries(8)) == [i * PAGE for i in range(8)]
        assert srv.log.empty()
    finally:
        srv.close()


def _touch_twice(chain, first, then, socket=None, out=None):
    """Read page `first` (its pattern, else exit 3), then touch `then`."""
    faulthandler.disable()
    conn = lp.Connection(socket) if socket else None
    sp = lp.portal(lp.SPECIAL, lp.PROT_READ, 4 * PAGE, chain=chain, message=b"m",
                   connection=conn)
    if not sp.backed or sp.read(first, 16) != _pattern(first, 16):
        os._exit(3)
    sp.buf[then]
    os._exit(0)


def test_special_mapped_answer_for_pages_the_backing_lacks_gives_sigbus(fresh_faytd):
    d = fresh_faytd()
    chain = _chain()
    srv = _backed_server(chain, 4, filled=[0], socket=d.socket, run_max=4 * PAGE)
    try:
        assert _run_client(_touch_twice, chain, 0, 2 * PAGE, d.socket) == -signal.SIGBUS
        assert [o for o, _, _ in srv.entries(2)] == [0, 2 * PAGE]
    finally:
        srv.close()
    log = d.stop()
    assert "UFFDIO_CONTINUE at 0x0 stopped after 4096 bytes: Bad address" in log
    assert "UFFDIO_CONTINUE at 0x2000: Bad address" in log
    assert "page at 0x2000 failed: Bad address; the access gets SIGBUS" in log


def _mapped_anyway(req, log):
    """A server that answers MAPPED whatever the region maps."""
    log.put((req.offset, req.backed))
    req._answer(lp._abi.lib.FAYT_PAGE_MAPPED, 0, PAGE)


def test_special_mapped_from_a_server_whose_backing_the_region_does_not_map(fresh_faytd):
    """MAPPED is a protocol error from the chain's first server when the
    region maps the second's backing, and from a server of a chain without
    backings: the request fails (EPROTO), the access gets SIGBUS, faytd and
    the chain go on."""
    d = fresh_faytd()
    chain, bare = _chain(), _chain()
    front = ChildServer(chain, _mapped_anyway, socket=d.socket)
    back = _backed_server(chain, 4, socket=d.socket)
    alone = ChildServer(bare, _mapped_anyway, socket=d.socket)
    try:
        assert _run_client(_touch, chain, PAGE, d.socket) == -signal.SIGBUS
        assert front.entries(1) == [(PAGE, False)]
        assert _run_client(_touch, bare, 0, d.socket) == -signal.SIGBUS
        assert alone.entries(1) == [(0, False)]
        assert back.log.empty()
    finally:
        for s in (front, back, alone):
            s.close()
    log = d.stop()
    assert len(re.findall(r"server pid \d+ answered MAPPED for region \d+, which does not map "
                          r"its backing: a protocol error, request failed", log)) == 2, log
    assert log.count("failed: Protocol error; the access gets SIGBUS") == 2


def _agree_handler(req, log, state):
    """Page 0: a two-page run; page 2: a two-page run of which the backing
    holds one page; page 3 (the backing lacks it): mapped anyway."""
    log.put(req.offset)
    req.map(2 * PAGE if req.offset in (0, 2 * PAGE) else PAGE)


@pytest.mark.parametrize("spin_us", [0, 2000000], ids=["loop-path", "fast-path"])
def test_special_backed_fast_path_and_loop_path_agree(fresh_faytd, conn_to, spin_us):
    """A MAPPED answer is resolved in faytd's C fast path (one call: post,
    spin, UFFDIO_CONTINUE) or in its loop: the same pages, the same stop at
    a page the backing lacks, the same SIGBUS."""
    d = fresh_faytd(config={"pager_spin_us": spin_us})
    conn = conn_to(d)
    chain = _chain()
    srv = _backed_server(chain, 4, filled=[0, 1, 2], handler=_agree_handler, socket=d.socket,
                         run_max=2 * PAGE)
    try:
        sp = lp.portal(lp.SPECIAL, lp.PROT_READ, 4 * PAGE, chain=chain, message=b"m",
                       connection=conn)
        try:
            assert sp.backed
            assert sp.read(0, 3 * PAGE) == _pattern(0, 3 * PAGE)
        finally:
            sp.unmap()
        assert _run_client(_touch_twice, chain, 0, 3 * PAGE, d.socket) == -signal.SIGBUS
        assert srv.entries(4) == [0, 2 * PAGE, 0, 3 * PAGE]
        assert srv.log.empty()
    finally:
        srv.close()
    log = d.stop()
    assert "UFFDIO_CONTINUE at 0x2000 stopped after 4096 bytes: Bad address" in log
    assert "UFFDIO_CONTINUE at 0x3000: Bad address" in log
    assert "UFFDIO_COPY" not in log
    closed = re.findall(r"region \d+ \(chain %r\) closed: (\d+) faults, (\d+) pages fetched "
                        r"\((\d+) faults answered in one call\), (\d+) mapped by reference"
                        % chain, log)
    one = 1 if spin_us else 0
    assert closed == [("2", "3", str(2 * one), "3"), ("2", "2", str(one), "2")], log


def _chain_back_raw(conn, chain_id, handle, message, op=None, length=None):
    from libportal._abi import CHAIN_BACK
    L = lp._abi.lib
    return conn.call(op or L.FAYT_SYS_CHAIN_BACK, CHAIN_BACK.pack(
        chain_id, len(message) if length is None else length, handle, message))


def test_special_chain_back_errors(lp, chain_server):
    L = lp._abi.lib
    chain = _chain()
    s = lp.chain_join(chain)
    conn = s.connection
    p = lp.portal(lp.ANON, lp.PROT_RW, 4 * PAGE, connection=conn)
    share = lp.share_create("back-%s" % uuid.uuid4().hex[:8], PAGE, connection=conn)
    other = _chain()
    chain_server(chain=other)
    special = lp.portal(lp.SPECIAL, lp.PROT_READ, PAGE, chain=other, connection=conn)
    stranger = lp.Connection()
    before = _free_frames(conn)
    try:
        with pytest.raises(lp.PermissionDenied, match=r"^\[Errno 1\] chain id %d: this context "
                           r"does not serve it$" % s.chain_id):
            _chain_back_raw(stranger, s.chain_id, p.handle, b"m")
        with pytest.raises(lp.PermissionDenied, match="chain id %d: this context does not serve"
                           % (s.chain_id + 1000)):
            _chain_back_raw(conn, s.chain_id + 1000, p.handle, b"m")
        with pytest.raises(lp.Unmapped, match=r"^\[Errno 9\] handle: 9999 names no mapping of "
                           r"this context$"):
            _chain_back_raw(conn, s.chain_id, 9999, b"m")
        with pytest.raises(lp.InvalidArgument, match=r"^\[Errno 22\] handle: %d is a SHARE\|ANON "
                           r"portal; a backing is an ANON portal$" % share.handle):
            s.back("m", share)
        with pytest.raises(lp.InvalidArgument, match=r"handle: %d is a SPECIAL portal; a backing "
                           r"is an ANON portal" % special.handle):
            s.back("m", special)
        too_long = L.FAYT_MESSAGE_MAX + 1
        with pytest.raises(lp.InvalidArgument, match=r"^\[Errno 36\] message: %d bytes, longer "
                           r"than %d$" % (too_long, L.FAYT_MESSAGE_MAX)) as e:
            _chain_back_raw(conn, s.chain_id, p.handle, b"m", length=too_long)
        assert e.value.errno == errno.ENAMETOOLONG
        with pytest.raises(lp.InvalidArgument, match=r"message: holds a NUL byte"):
            s.back(b"a\0b", p)
        with pytest.raises(lp.InvalidArgument, match=r"message: not valid UTF-8"):
            s.back(b"\xff", p)
        with pytest.raises(lp.InvalidArgument, match="chain_back: expected 4112 bytes, got 16"):
            conn.call(L.FAYT_SYS_CHAIN_BACK, bytes(16))
        with pytest.raises(lp.NotFound, match=r"^\[Errno 2\] message 'm': this server has no "
                           r"backing for it in chain %r$" % chain):
            s.unback("m")
        with pytest.raises(lp.InvalidArgument, match="portal: not mapped through this chain "
                                                     "server's connection"):
            s.back("m", lp.portal(lp.ANON, lp.PROT_RW, PAGE, connection=stranger))
        # Nothing was made by the failures: the first real back works, once.
        assert _free_frames(conn) == before - 1                  # the stranger's page only
        backing = s.back("m", p)
        assert backing > 0
        with pytest.raises(lp.AlreadyExists, match="message 'm': this server backs it already"):
            s.back("m", lp.portal(lp.ANON, lp.PROT_RW, PAGE, connection=conn))
        with pytest.raises(lp.PortalError, match=r"handle: %d backs message 'm' already" % p.handle) as e:
            s.back("n", p)
        assert e.value.errno == errno.EBUSY
        with pytest.raises(lp.InvalidArgument, match="unback names the message only"):
            _chain_back_raw(conn, s.chain_id, p.handle, b"m", op=L.FAYT_SYS_CHAIN_UNBACK)
        s.unback("m")
        with pytest.raises(lp.NotFound):
            s.unback("m")
    finally:
        special.unmap()
        share.destroy()
        p.unmap()
        s.leave()
        stranger.close()


def test_special_write_report_chain_cannot_be_backed(lp):
    s = lp.chain_join(_chain(), write_reports=True)
    p = lp.portal(lp.ANON, lp.PROT_RW, PAGE, connection=s.connection)
    try:
        with pytest.raises(lp.InvalidArgument, match="asks for write reports: its regions are "
                                                     "never answered by reference"):
            s.back("m", p)
    finally:
        p.unmap()
        s.leave()


def test_special_region_longer_than_the_backing_is_answered_by_copy(lp):
    chain = _chain()
    srv = _backed_server(chain, 4)
    try:
        with lp.portal(lp.SPECIAL, lp.PROT_READ, 8 * PAGE, chain=chain, message=b"m") as sp:
            assert not sp.backed
            assert sp.read(5 * PAGE, 16) == _pattern(5 * PAGE, 16)
            assert _smaps(sp.addr)["Anonymous"] == 4                 # a copy
        with lp.portal(lp.SPECIAL, lp.PROT_READ, 4 * PAGE, chain=chain, message=b"other") as sp:
            assert not sp.backed                                     # another message
            assert sp.read(0, 16) == _pattern(0, 16)
        with lp.portal(lp.SPECIAL, lp.PROT_READ, 3 * PAGE, chain=chain, message=b"m") as sp:
            assert sp.backed                                         # shorter: backed
            assert sp.read(2 * PAGE, 16) == _pattern(2 * PAGE, 16)
        assert srv.entries(3) == [(5 * PAGE, False, 0), (0, False, 0),
                                  (2 * PAGE, True, srv.do("backing"))]
    finally:
        srv.close()


def test_special_backing_outlives_the_servers_unmap_while_a_region_maps_it(fresh_faytd, conn_to):
    """The backing keeps the portal's frames, and its RAM charge, after the
    server unmapped it; a region still maps it and is still answered by
    reference.  The frames are freed once the backing (unback) and the last
    region mapping it are both gone."""
    d = fresh_faytd(config={"max_ram_per_context": 8 * PAGE})
    conn = conn_to(d)
    chain = _chain()
    base = _free_frames(conn)
    srv = _backed_server(chain, 8, socket=d.socket, run_max=PAGE)
    try:
        assert _free_frames(conn) == base - 8
        sp = lp.portal(lp.SPECIAL, lp.PROT_READ, 8 * PAGE, chain=chain, message=b"m",
                       connection=conn)
        assert sp.backed and sp.read(0, 16) == _pattern(0, 16)
        srv.do("unmap")
        assert _free_frames(conn) == base - 8
        assert sp.read(0, 8 * PAGE) == _pattern(0, 8 * PAGE)    # faulted after the unmap
        assert srv.do("anon", 1) == errno.ENOMEM                 # the backing holds the charge
        srv.do("unback")
        assert srv.do("anon", 1) == 0                            # charge released with it
        assert _free_frames(conn) == base - 8                    # the region still maps them
        assert sp.read(7 * PAGE, 16) == _pattern(7 * PAGE, 16)
        sp.unmap()
        assert _free_frames(conn) == base
        assert [o for o, _, _ in srv.entries(8)] == [i * PAGE for i in range(8)]
    finally:
        srv.close()


def _anon(st, npages):
    """0 if an ANON portal of npages can be made (and unmapped) now, else its errno."""
    try:
        lp.portal(lp.ANON, lp.PROT_RW, npages * PAGE, connection=st["server"].connection).unmap()
        return 0
    except OSError as e:
        return e.errno


_BACKING_ACTIONS["anon"] = _anon


def _read_then_wait(chain, socket, ready, go, out):
    """Map 4 pages, read pages 0-1, tell; once told, read page 0 again
    (reported), then touch page 3."""
    faulthandler.disable()
    sp = lp.portal(lp.SPECIAL, lp.PROT_READ, 4 * PAGE, chain=chain, message=b"m",
                   connection=lp.Connection(socket))
    first = sp.backed and sp.read(0, 2 * PAGE) == _pattern(0, 2 * PAGE)
    ready.set()
    if not go.wait(WAIT):
        os._exit(4)
    out.put((first, sp.read(0, 2 * PAGE) == _pattern(0, 2 * PAGE)))
    out.close()
    out.join_thread()
    sp.buf[3 * PAGE]
    os._exit(0)


def test_special_backed_server_dies_with_a_region_mapped(fresh_faytd, conn_to):
    """The server dies: its backing goes, the client keeps the pages it has
    (they are the object's pages, held by its mapping), a page it has not
    got fails (SIGBUS: no server left), and the frames are freed with the
    client's region."""
    d = fresh_faytd()
    conn = conn_to(d)
    chain = _chain()
    base = _free_frames(conn)
    srv = _backed_server(chain, 4, socket=d.socket, run_max=2 * PAGE)
    ready, go, out = CTX.Event(), CTX.Event(), CTX.Queue()
    client = CTX.Process(target=_read_then_wait, args=(chain, d.socket, ready, go, out))
    client.start()
    try:
        assert ready.wait(WAIT)
        srv.proc.kill()
        srv.proc.join(WAIT)
        go.set()
        assert out.get(timeout=WAIT) == (True, True)
        client.join(WAIT)
        assert client.exitcode == -signal.SIGBUS
        assert _wait_free_frames(conn, base) == base
    finally:
        if client.is_alive():
            client.kill()
            client.join(WAIT)
        srv.close()


def _wait_free_frames(conn, want):
    """faytd's free frames once they are `want`, or after WAIT seconds (it
    handles the deaths of processes in its own time)."""
    deadline = time.monotonic() + WAIT
    while _free_frames(conn) != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return _free_frames(conn)


def _read_one_then_touch(chain, socket, ready, go, out):
    """Map 4 pages, read page 0 (one-page runs), tell; once told (faytd
    killed), read page 0 again (reported), then touch page 1, which the
    server's backing holds but this region was never given."""
    faulthandler.disable()
    sp = lp.portal(lp.SPECIAL, lp.PROT_READ, 4 * PAGE, chain=chain, message=b"m",
                   connection=lp.Connection(socket))
    first = sp.backed and sp.read(0, PAGE) == _pattern(0, PAGE)
    ready.set()
    if not go.wait(WAIT):
        os._exit(4)
    out.put((first, sp.read(0, PAGE) == _pattern(0, PAGE)))
    out.close()
    out.join_thread()
    sp.buf[PAGE]
    os._exit(0)


def test_special_faytd_death_poisons_what_a_backed_region_was_not_given(fresh_faytd):
    """faytd dies: the client's guard poisons every page not mapped yet.  On
    a backed region that matters for the pages the server's object holds:
    registered for minor faults, they would fault with nobody to answer
    (a hang) and, unregistered, would read the backing directly."""
    d = fresh_faytd()
    chain = _chain()
    srv = _backed_server(chain, 4, socket=d.socket, run_max=PAGE)
    ready, go, out = CTX.Event(), CTX.Event(), CTX.Queue()
    client = CTX.Process(target=_read_one_then_touch, args=(chain, d.socket, ready, go, out))
    client.start()

    def kept_what_it_was_given():
        go.set()
        return out.get(timeout=WAIT) == (True, True)

    _faytd_dies_under(d, client, srv, before=lambda: ready.wait(WAIT),
                      after=kept_what_it_was_given)


def test_special_backed_nothing_left_in_dev_shm(fresh_faytd, conn_to):
    """A backed region and its backing, then faytd stopped while a second
    backed region is still mapped and its server still serves: every object
    is unlinked."""
    d = fresh_faytd()
    chain = _chain()
    srv = _backed_server(chain, 4, socket=d.socket)
    c = conn_to(d)
    sp = lp.portal(lp.SPECIAL, lp.PROT_READ, 4 * PAGE, chain=chain, message=b"m", connection=c)
    assert sp.backed and sp.read(0, 4 * PAGE) == _pattern(0, 4 * PAGE)
    sp.unmap()
    srv.do("unmap")
    still = lp.portal(lp.SPECIAL, lp.PROT_READ, 4 * PAGE, chain=chain, message=b"m", connection=c)
    assert still.backed and still.read(0, PAGE) == _pattern(0, PAGE)
    assert len(fayt_objects([d.proc.pid])) > 0
    d.stop()
    srv.close()
    still.unmap()
    assert fayt_objects([d.proc.pid]) == []


def test_special_file_pager_second_portal_reads_nothing_and_copies_nothing(lp, tmp_path):
    data = os.urandom(20 * PAGE + 100)
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    pager = FilePagerChild(prepare=[str(path)])
    try:
        for _ in range(2):
            with lp.portal(lp.SPECIAL, lp.PROT_READ, 21 * PAGE, chain=pager.chain,
                           message=str(path)) as sp:
                assert sp.backed
                assert sp.read(0, 21 * PAGE) == data + bytes(21 * PAGE - len(data))
                assert _smaps(sp.addr)["Anonymous"] == 0
        got = pager.counters()
    finally:
        pager.close()
    # Runs of 8 pages: 0-7, 8-15, 16-20, one pread each, for the first portal only.
    assert got == {"served": 6, "pages": 42, "reads": 3, "read_bytes": len(data),
                   "mapped": 42, "copied": 0, "dropped": 0}


def test_special_file_pager_drops_its_cache_when_the_file_changes(lp, tmp_path):
    old = os.urandom(16 * PAGE)
    new = os.urandom(18 * PAGE)
    path = tmp_path / "changing.bin"
    path.write_bytes(old)
    pager = FilePagerChild(prepare=[str(path)])
    try:
        first = lp.portal(lp.SPECIAL, lp.PROT_READ, 16 * PAGE, chain=pager.chain,
                          message=str(path))
        try:
            assert first.backed and first.read(0, 8 * PAGE) == old[:8 * PAGE]
            path.write_bytes(new)                       # another size, another mtime
            # Made before the pager's next stat: it still has the old, shorter,
            # cache declared, so this one is answered by copy, from the new file.
            with lp.portal(lp.SPECIAL, lp.PROT_READ, 18 * PAGE, chain=pager.chain,
                           message=str(path)) as second:
                assert not second.backed
                assert second.read(0, 18 * PAGE) == new
            with lp.portal(lp.SPECIAL, lp.PROT_READ, 18 * PAGE, chain=pager.chain,
                           message=str(path)) as third:
                assert third.backed                     # the new cache
                assert third.read(0, 18 * PAGE) == new
                assert _smaps(third.addr)["Anonymous"] == 0
            # The first keeps the pages it had; the rest comes from the file as it is now.
            assert first.read(0, 8 * PAGE) == old[:8 * PAGE]
            assert first.read(8 * PAGE, 8 * PAGE) == new[8 * PAGE:16 * PAGE]
        finally:
            first.unmap()
        got = pager.counters()
    finally:
        pager.close()
    assert got["dropped"] == 1
    # mapped: the first's 8 pages, the third's 18; copied: the second's 18,
    # the first's last 8; read: 8 old pages, then the 18 new ones once.
    assert (got["mapped"], got["copied"], got["reads"]) == (8 + 18, 18 + 8, 1 + 3)


def test_special_file_pager_caches_a_file_of_more_frames_than_a_reply_lists(lp, tmp_path):
    """A cache portal of 33 MiB: more frames than one portal() reply can
    list (FAYT_MSG_MAX); the portal is made all the same and backs the file."""
    data = os.urandom(1 << 20) * 33
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    pager = FilePagerChild(prepare=[str(path)])
    try:
        with lp.portal(lp.SPECIAL, lp.PROT_READ, len(data), chain=pager.chain,
                       message=str(path)) as sp:
            assert sp.backed
            got = bytearray(len(data))
            sp.readinto(0, got)
            assert got == data
        assert pager.counters()["copied"] == 0
    finally:
        pager.close()


def test_special_share_and_share_points_have_one_namespace(lp, chain_server):
    """A SPECIAL|SHARE share's name is in the core's one name index: no
    share-point takes it (the C path's create included), and it is free
    again once the share is gone."""
    chain = _chain()
    chain_server(chain=chain)
    ident = "one-namespace-%s" % uuid.uuid4().hex[:8]
    lp.share_create("warm-%s" % ident, 4096).destroy()     # the C path knows this thread
    sp = lp.portal(lp.SPECIAL | lp.SHARE, lp.PROT_READ, 4 * PAGE, identifier=ident, create=True,
                   chain=chain)
    try:
        with pytest.raises(lp.AlreadyExists):
            lp.share_create(ident, 4096)
    finally:
        sp.unmap()
    lp.share_create(ident, 4096).destroy()


# -- the fault engine in faytd's C ---------------------------------------------

@pytest.mark.parametrize("spin_us", [0, 2000000], ids=["loop-path", "spin"])
def test_special_served_fault_runs_no_python_in_faytd(fresh_faytd, conn_to, spin_us):
    """A fault a chain server answers is read, posted, reaped and resolved
    by faytd's C fault engine inside faytd's wait (fayt_fast_poll): none of
    its fds (the uffd, the answer eventfd) reaches faytd's Python.  `fayt
    stats` counts the engine's faults and its events, those served in C and
    those Python handed to it.  Without spinning every answer comes back
    through the eventfd; with it, through the spin that follows the post."""
    d = fresh_faytd(config={"pager_spin_us": spin_us})
    conn = conn_to(d)
    chain = _chain()
    srv = ChildServer(chain, _pattern_server, socket=d.socket, run_max=PAGE)
    try:
        sp = lp.portal(lp.SPECIAL, lp.PROT_READ, 8 * PAGE, chain=chain, message=b"m",
                       connection=conn)
        try:
            for i in range(8):
                assert sp.read(i * PAGE + 8, 8) == b"FAYTPAGE"
        finally:
            sp.unmap()
        assert [e[0] for e in srv.entries(8)] == [i * PAGE for i in range(8)]
        f = conn.stats()["faults"]
    finally:
        srv.close()
    assert (f["total"], f["fetched"], f["failed"]) == (8, 8, 0), f
    assert f["events_in_python"] == 0, f
    assert f["events_in_c"] >= (8 if spin_us else 16), f    # a fault; an answer unless spun for
    # With the spin, an answer that comes within it is taken in the same
    # call; on a loaded machine the server may be descheduled past it, so
    # "most", not "all" (without it, none: that is exact).
    if spin_us:
        assert 1 <= f["in_one_call"] <= 8, f
    else:
        assert f["in_one_call"] == 0, f
    log = d.stop()
    assert re.search(r"pager: 8 faults, 8 pages fetched .* engine events: \d+ in C, 0 through "
                     r"Python", log), log


def _answer_a_slot_it_does_not_hold(slot, req, log):
    L, ffi = lp._abi.lib, lp._abi.ffi
    log.put((req.offset, req.slot))
    h = ffi.cast("struct fayt_pager_header *", req.server._ch)
    head = h.ans_head
    h.ans_ring[head % L.FAYT_PAGER_SLOTS_MAX] = slot
    h.ans_head = head + 1
    h.rung = 1
    os.eventfd_write(req.server._efd, 1)
    req._answered = True


def _answers_a_slot_it_does_not_hold(slot):
    """A hostile handler: publishes `slot` (not the request's) in the answer
    ring by hand and rings faytd."""
    return functools.partial(_answer_a_slot_it_does_not_hold, slot)


@pytest.mark.parametrize("slot", [1, 63], ids=["free-slot", "no-such-slot"])
def test_special_server_answering_a_slot_it_does_not_hold_leaves_the_chain(fresh_faytd, slot):
    """A server that publishes an answer for a slot faytd did not give it
    (a free slot of its two, or a number past them) broke the channel
    protocol: faytd drops it from the chain (EPROTO), the request it held
    fails (the access gets SIGBUS, never zeros), and faytd serves on: a
    new server of the chain answers the next fault."""
    d = fresh_faytd(config={"pager_spin_us": 0})
    chain = _chain()
    bad = ChildServer(chain, _answers_a_slot_it_does_not_hold(slot), socket=d.socket,
                      slots=2, run_max=PAGE)
    try:
        assert _run_client(_touch, chain, 0, d.socket) == -signal.SIGBUS
        assert bad.entries(1) == [(0, 0)]
        bad.proc.join(WAIT)             # its channel closed: serve() returns
        assert not bad.proc.is_alive()
    finally:
        bad.close()
    good = ChildServer(chain, _pattern_server, socket=d.socket)
    try:
        assert _run_client(_touch, chain, PAGE, d.socket) == 0
    finally:
        good.close()
    log = d.stop()
    assert re.search(r"chain %r: server pid \d+ answered a slot it does not hold; it leaves "
                     r"the chain" % chain, log), log
    assert re.search(r"chain %r: server pid \d+ broke the channel protocol with a request in "
                     r"flight: failed" % chain, log), log
    assert "page at 0x0 failed: Protocol error; the access gets SIGBUS" in log


def _scribbles_faytds_ring_positions(req, log):
    """Writes nonsense into the answer ring's tail (faytd's to write) before
    each answer."""
    h = lp._abi.ffi.cast("struct fayt_pager_header *", req.server._ch)
    log.put(req.offset)
    h.ans_tail = h.ans_tail + 7
    req.supply(_pattern(req.offset, PAGE))


def test_special_faytd_keeps_its_own_ring_positions(fresh_faytd):
    """faytd never reads back what only it writes in a channel: a server
    that scribbles over the answer ring's tail before each answer still
    gets its answers taken in order, each page right."""
    d = fresh_faytd(config={"pager_spin_us": 0})
    chain = _chain()
    srv = ChildServer(chain, _scribbles_faytds_ring_positions, socket=d.socket, run_max=PAGE)
    try:
        assert _run_client(_read_two_pages, chain, d.socket) == 0
        assert srv.entries(2) == [0, PAGE]
    finally:
        srv.close()
    log = d.stop()
    assert "does not hold" not in log, log
    assert "page at" not in log, log


def _special_with_noncooperative_uffd(chain, out):
    """A client whose userfaultfd asks for UFFD_FEATURE_EVENT_REMOVE (its
    own fd, made with raw system calls: libportal never asks for it)."""
    import ctypes
    import fcntl
    import struct
    libc = ctypes.CDLL(None, use_errno=True)
    nr_userfaultfd = {"x86_64": 323, "aarch64": 282}[os.uname().machine]
    uffdio_api = 0xc018aa3f                     # _IOWR(0xAA, 0x3F, struct uffdio_api)
    event_remove = 1 << 3

    def hostile_open():
        fd = libc.syscall(nr_userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK)
        assert fd >= 0, os.strerror(ctypes.get_errno())
        api = bytearray(struct.pack("QQQ", 0xAA, event_remove, 0))
        fcntl.ioctl(fd, uffdio_api, api)
        return fd, 0

    import libportal.special as special
    special.open_userfaultfd = hostile_open
    try:
        lp.portal(lp.SPECIAL, lp.PROT_READ, 4 * PAGE, chain=chain, message=b"m")
        out.put("mapped")
    except OSError as e:
        out.put((e.errno, str(e)))


def test_special_a_userfaultfd_with_noncooperative_events_is_refused(lp, chain_server):
    """While a fork/remap/remove/unmap event of such a userfaultfd is
    unread, UFFDIO_COPY answers EAGAIN (and the client's thread waits for
    faytd to read it): faytd refuses such an fd with EINVAL, naming it."""
    chain = _chain()
    chain_server(chain=chain)
    out = CTX.Queue()
    assert _run_client(_special_with_noncooperative_uffd, chain, out) == 0
    got = out.get(timeout=WAIT)
    assert got != "mapped"
    err, msg = got
    assert err == errno.EINVAL and "uffd" in msg and "non-cooperative" in msg, got
