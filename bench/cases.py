"""The benchmark cases.  Each takes (faytd, scale) and returns rows:
{"name", "ours", "unit", "peer", "peer_value", "ratio", "target"}.

Timing: the best of several rounds of a tight loop (the least disturbed by
the other core's noise), ours and the peer's taking turns in each round
(best_of); multi-process cases time from a common start barrier to the
last worker's end.
"""
import contextlib
import multiprocessing
import mmap
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid

import posix_ipc
import psutil
from multiprocessing import shared_memory

import libportal as lp


def best_of(n, repeats, *fns, pause=0.0):
    """Seconds per iteration of each fn: the best of `repeats` rounds, each
    round running every fn(n) in turn, so that all of them are measured in
    the same stretches of time (this VM's speed drifts from one moment to
    the next; timing one side, then the other, measures the drift too).
    pause: seconds of rest before each fn (work a peer leaves behind, such
    as multiprocessing's resource tracker, must not fall in another's time)."""
    out = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            if pause:
                time.sleep(pause)
            t = time.perf_counter()
            fn(n)
            out[i] = min(out[i], (time.perf_counter() - t) / n)
    return out


def _n(base, scale, least=200):
    return max(least, int(base * scale))


def _name(tag):
    return "bench-%s-%s" % (tag, uuid.uuid4().hex[:8])


# -- uncontended lock + unlock ----------------------------------------------

def case_lock(d, scale):
    n = _n(200000, scale, 2000)
    sp = lp.share_create(_name("lock"), 4096)
    ml = multiprocessing.Lock()
    sem = posix_ipc.Semaphore(None, posix_ipc.O_CREX, initial_value=1)
    try:
        def ours(k):
            lock, unlock = sp.lock, sp.unlock
            for _ in range(k):
                lock()
                unlock()

        def mp(k):
            a, r = ml.acquire, ml.release
            for _ in range(k):
                a()
                r()

        def psem(k):
            a, r = sem.acquire, sem.release
            for _ in range(k):
                a()
                r()

        t_ours, t_mp, t_sem = best_of(n, 7, ours, mp, psem)
    finally:
        sp.destroy()
        sem.unlink()
        sem.close()
    return [
        {"name": "lock+unlock, uncontended", "ours": t_ours * 1e9, "unit": "ns",
         "peer": "multiprocessing.Lock", "peer_value": t_mp * 1e9, "ratio": t_ours / t_mp,
         "target": ("<=", 1.0)},
        {"name": "lock+unlock, uncontended", "ours": t_ours * 1e9, "unit": "ns",
         "peer": "posix_ipc.Semaphore", "peer_value": t_sem * 1e9, "ratio": t_ours / t_sem,
         "target": None},
    ]


# -- fused locked 64-byte write ----------------------------------------------

def case_write(d, scale):
    n = _n(200000, scale, 2000)
    data = b"x" * 64
    sp = lp.share_create(_name("write"), 4096)
    shm = shared_memory.SharedMemory(create=True, size=4096)
    ml = multiprocessing.Lock()
    try:
        def ours(k):
            w = sp.write
            for _ in range(k):
                w(0, data)

        buf = shm.buf

        def mp(k):
            a, r = ml.acquire, ml.release
            for _ in range(k):
                a()
                buf[0:64] = data
                r()

        t_ours, t_mp = best_of(n, 7, ours, mp)
        del buf
    finally:
        sp.destroy()
        shm.close()
        shm.unlink()
    return [{"name": "fused locked 64 B write", "ours": t_ours * 1e9, "unit": "ns",
             "peer": "mp.Lock + shm slice + release", "peer_value": t_mp * 1e9,
             "ratio": t_ours / t_mp, "target": ("<=", 0.7)}]


# -- two processes incrementing a shared counter under the lock --------------

_PIN = r"""
import os
cpus = sorted(os.sched_getaffinity(0))
if len(cpus) > 1:
    os.sched_setaffinity(0, {cpus[int(sys.argv[3]) % len(cpus)]})
"""

_OURS_WORKER = r"""
import sys, time, libportal as lp
""" + _PIN + r"""
name, n = sys.argv[1], int(sys.argv[2])
sp = lp.share_attach(name)
mv = sp.view().cast("q")
lock, unlock = sp.lock, sp.unlock
print("ready", flush=True)
sys.stdin.readline()
for _ in range(n):
    lock()
    mv[0] += 1
    unlock()
print(time.perf_counter(), flush=True)
mv.release()
"""

_OURS_FUSED_WORKER = r"""
import sys, time, libportal as lp
""" + _PIN + r"""
name, n = sys.argv[1], int(sys.argv[2])
sp = lp.share_attach(name)
add = sp.add
print("ready", flush=True)
sys.stdin.readline()
for _ in range(n):
    add(8, 1)
print(time.perf_counter(), flush=True)
"""


def _pin(i):
    """Worker i on CPU i: the two contend from two cores, whatever else runs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[i % len(cpus)]})


def _mp_worker(lock, name, n, ready, go, out, i):
    """lock: a multiprocessing.Lock, or the name of a posix_ipc.Semaphore."""
    _pin(i)
    sem = posix_ipc.Semaphore(lock) if isinstance(lock, str) else None
    if sem is not None:
        lock = sem
    shm = shared_memory.SharedMemory(name=name)
    mv = shm.buf.cast("q")
    a, r = lock.acquire, lock.release
    ready.release()
    go.wait()
    for _ in range(n):
        a()
        mv[0] += 1
        r()
    out.put(time.perf_counter())
    mv.release()
    shm.close()
    if sem is not None:
        sem.close()


def _run_ours(code, name, n, nprocs=2):
    procs = [subprocess.Popen([sys.executable, "-c", code, name, str(n), str(i)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for i in range(nprocs)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    ends = [float(p.stdout.readline()) for p in procs]
    for p in procs:
        p.wait(timeout=60)
    return nprocs * n / (max(ends) - t0)


def _run_mp(n, nprocs=2, semaphore=False):
    """nprocs processes (spawned) count to n each under multiprocessing.Lock,
    or a named posix_ipc.Semaphore; ops/s."""
    ctx = multiprocessing.get_context("spawn")
    shm = shared_memory.SharedMemory(create=True, size=4096)
    sem = None
    try:
        lock, ready, go, out = ctx.Lock(), ctx.Semaphore(0), ctx.Event(), ctx.Queue()
        if semaphore:
            sem = posix_ipc.Semaphore(None, posix_ipc.O_CREX, initial_value=1)
            lock = sem.name
        procs = [ctx.Process(target=_mp_worker,
                             args=(lock, shm.name, n, ready, go, out, i))
                 for i in range(nprocs)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.acquire()
        t0 = time.perf_counter()
        go.set()
        ends = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(60)
        total = shm.buf.cast("q")[0]
    finally:
        shm.close()
        shm.unlink()
        if sem is not None:
            sem.unlink()
            sem.close()
    assert total == nprocs * n, "lost updates under %s" % (
        "posix_ipc.Semaphore" if semaphore else "multiprocessing.Lock")
    return nprocs * n / (max(ends) - t0)


# -- N processes incrementing a shared counter (--procs) -----------------------

PROCS = (1, 2, 4)       # bench --procs N,N...: the process counts of case_contention


def case_contention(d, scale):
    """N processes (bench --procs; 1, 2 and 4 by default) each add 1 to a
    shared counter n times under a lock: the share-point's, a
    multiprocessing.Lock's, a named posix_ipc.Semaphore's; total increments
    per second, the best of a few rounds (kinds interleaved).  Worker i runs
    on CPU i mod the CPUs: with more processes than CPUs, some share one,
    and a lock holder may be preempted (what every lock here then pays).
    No targets: the rows show how each scales."""
    n = _n(100000, scale, 2000)
    rounds = 3 if scale >= 1 else 1
    rows = []
    for k in PROCS:
        per = max(1, n // k)
        ours, mp, sem = [], [], []
        for _ in range(rounds):
            name = _name("contention")
            sp = lp.share_create(name, 4096)
            try:
                ours.append(_run_ours(_OURS_WORKER, name, per, k))
                got = int.from_bytes(sp.read(0, 8), "little")
            finally:
                sp.destroy()
            assert got == k * per, "lost updates under the share-point lock"
            mp.append(_run_mp(per, k))
            sem.append(_run_mp(per, k, semaphore=True))
        o = max(ours)
        for peer, v in (("multiprocessing.Lock", max(mp)), ("posix_ipc.Semaphore", max(sem))):
            rows.append({"name": "%d process%s, locked counter" % (k, "" if k == 1 else "es"),
                         "ours": o, "unit": "ops/s", "peer": peer, "peer_value": v,
                         "ratio": o / v, "target": None, "procs": k})
    return rows


def case_counter(d, scale):
    """Rounds alternate between the peers; each keeps its best round (the
    least disturbed by whatever else the two cores run).  Worker i is pinned
    to CPU i, so the two really contend from two cores: left to the
    scheduler, both sometimes share one core and the figure measures the
    scheduler (multiprocessing.Lock was seen from 1.5 to 3.3 M/s that way)."""
    n = _n(300000, scale, 5000)
    rounds = 5 if scale >= 1 else 1
    ours, fused, peer = [], [], []
    for _ in range(rounds):
        name = _name("counter")
        sp = lp.share_create(name, 4096)
        try:
            ours.append(_run_ours(_OURS_WORKER, name, n))
            got = sp.read(0, 8)
            fused.append(_run_ours(_OURS_FUSED_WORKER, name, n))
            got_fused = sp.read(8, 8)
        finally:
            sp.destroy()
        assert int.from_bytes(got, "little") == 2 * n, "lost updates under the share-point lock"
        assert int.from_bytes(got_fused, "little") == 2 * n, "lost updates under sp.add"
        peer.append(_run_mp(n))
    ours, fused, peer = max(ours), max(fused), max(peer)
    return [
        {"name": "2 processes, locked counter", "ours": ours, "unit": "ops/s",
         "peer": "multiprocessing.Lock", "peer_value": peer, "ratio": ours / peer,
         "target": (">=", 1.0)},
        {"name": "2 processes, fused sp.add", "ours": fused, "unit": "ops/s",
         "peer": "multiprocessing.Lock", "peer_value": peer, "ratio": fused / peer,
         "target": None},
    ]


# -- create, map, unmap, destroy a 4 KiB SHARE portal -------------------------

def case_create(d, scale):
    n = _n(3000, scale, 100)
    prefix = _name("create")

    def ours(k):
        for i in range(k):
            sp = lp.share_create("%s-%d" % (prefix, i), 4096)
            sp.destroy()

    def peer(k):
        for _ in range(k):
            s = shared_memory.SharedMemory(create=True, size=4096)
            s.close()
            s.unlink()

    def anon(k):
        for _ in range(k):
            lp.portal(lp.ANON, lp.PROT_RW, 4096).unmap()

    t_ours, t_peer, t_anon = best_of(n, 5, ours, peer, anon, pause=0.05)
    return [
        {"name": "4 KiB SHARE: create+map+unmap+destroy", "ours": t_ours * 1e6, "unit": "us",
         "peer": "shared_memory create+close+unlink", "peer_value": t_peer * 1e6,
         "ratio": t_ours / t_peer, "target": ("<=", 1.0)},
        {"name": "4 KiB ANON: portal+unmap", "ours": t_anon * 1e6, "unit": "us",
         "peer": "shared_memory create+close+unlink", "peer_value": t_peer * 1e6,
         "ratio": t_anon / t_peer, "target": None},
    ]


# -- attach to an existing 4 KiB share-point -------------------------------------

def case_attach(d, scale):
    """What a second user of a share-point pays: attach it by name, map it,
    unmap it; against attaching a named shared_memory segment and closing
    it.  Both objects exist before the loop and outlive it."""
    n = _n(3000, scale, 100)
    sp = lp.share_create(_name("attach"), 4096)
    shm = shared_memory.SharedMemory(create=True, size=4096)
    try:
        name, shm_name = sp.identifier, shm.name

        def ours(k):
            attach = lp.share_attach
            for _ in range(k):
                attach(name).unmap()

        def peer(k):
            for _ in range(k):
                shared_memory.SharedMemory(name=shm_name).close()

        t_ours, t_peer = best_of(n, 5, ours, peer, pause=0.05)
    finally:
        sp.destroy()
        shm.close()
        shm.unlink()
    return [{"name": "4 KiB SHARE: attach+unmap of an existing one", "ours": t_ours * 1e6,
             "unit": "us", "peer": "shared_memory attach+close", "peer_value": t_peer * 1e6,
             "ratio": t_ours / t_peer, "target": ("<=", 1.25)}]


# -- 10,000 share-points --------------------------------------------------------

def case_scale(d, scale):
    total = 10000 if scale >= 1 else 1000
    prefix = _name("scale")
    fd_proc = psutil.Process(d.proc.pid)
    rss0 = fd_proc.memory_info().rss
    sps, lat = [], []
    try:
        for i in range(total):
            t = time.perf_counter()
            sps.append(lp.share_create("%s-%d" % (prefix, i), 4096))
            lat.append(time.perf_counter() - t)
        first = sum(lat[:100]) / 100
        last = sum(lat[-100:]) / 100
        time.sleep(0.05)        # faytd takes what its fast path made over when idle
        t = time.perf_counter()
        lp.share_attach("%s-%d" % (prefix, total // 2)).unmap()
        attach = time.perf_counter() - t
        rss1 = fd_proc.memory_info().rss
    finally:
        for sp in sps:
            sp.destroy()
    return [
        {"name": "share-point create, first 100", "ours": first * 1e6, "unit": "us",
         "target": None},
        {"name": "share-point create, last 100 of %d" % total, "ours": last * 1e6, "unit": "us",
         "peer": "(first 100)", "peer_value": first * 1e6, "ratio": last / first,
         "target": ("<=", 1.5)},
        {"name": "attach with %d in the table" % total, "ours": attach * 1e6, "unit": "us",
         "target": None},
        {"name": "faytd memory per share-point", "ours": (rss1 - rss0) / total, "unit": "B",
         "target": None},
    ]


# -- notifications: return-flag round trip, deferred one-way rate ---------------

_NOTIFY_TARGET = r"""
import sys, time, libportal as lp
n = int(sys.argv[1])
count = [0]
def h(p, i, s):
    count[0] += 1
    return 1
lp.install_handler(1, h)
print(lp.connection().context_id, flush=True)
end = time.monotonic() + 300
while count[0] < n and time.monotonic() < end:
    lp.notification_wait(1.0)
print(count[0], flush=True)
"""


def _notify_target(d, n):
    p = subprocess.Popen([sys.executable, "-c", _NOTIFY_TARGET, str(n)], env=d.env(),
                         stdout=subprocess.PIPE, text=True)
    return p, int(p.stdout.readline())


def _pingpong(n, make):
    """Round trip of one byte between this process and a forked child."""
    a_send, a_recv, b_send, b_recv, close = make()
    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(n + 100):
                b_recv()
                b_send()
        finally:
            os._exit(0)
    for _ in range(100):
        a_send()
        a_recv()
    t = time.perf_counter()
    for _ in range(n):
        a_send()
        a_recv()
    dt = (time.perf_counter() - t) / n
    os.waitpid(pid, 0)
    close()
    return dt


def _pipes():
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    return (lambda: os.write(w1, b"x"), lambda: os.read(r2, 1),
            lambda: os.write(w2, b"y"), lambda: os.read(r1, 1),
            lambda: [os.close(f) for f in (r1, w1, r2, w2)])


def _sockets():
    import socket
    a, b = socket.socketpair()
    return (lambda: a.send(b"x"), lambda: a.recv(1), lambda: b.send(b"y"), lambda: b.recv(1),
            lambda: (a.close(), b.close()))


def _mpq_consumer(q, n, out):
    get = q.get
    for _ in range(n):
        get()
    out.put(time.perf_counter())


def _traced(d, call, n, rounds=5):
    """Seconds a return-flag round trip, untraced and while faytd writes a
    timeline trace (docs/tracing.md) into a scratch file: the best of
    `rounds` rounds, each timing n / rounds calls untraced, then as many
    traced (the trace's start and stop untimed), so that both are measured
    in the same stretches of time; and the records the traces lost."""
    import json
    import tempfile
    from libportal._abi import lib
    conn = lp.connection()
    k = max(1, n // rounds)
    best, best_traced, lost = float("inf"), float("inf"), 0
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(k):
            call(1, b"x", timeout=30)
        best = min(best, (time.perf_counter() - t) / k)
        with tempfile.NamedTemporaryFile(prefix="fayt-bench-trace-", suffix=".json") as f:
            conn.call(lib.FAYT_SYS_TRACE_START, b"", send_fds=[f.fileno()])
            try:
                t = time.perf_counter()
                for _ in range(k):
                    call(1, b"x", timeout=30)
                best_traced = min(best_traced, (time.perf_counter() - t) / k)
            finally:
                lost += json.loads(conn.call(lib.FAYT_SYS_TRACE_STOP)[0])["lost"]
    return best, best_traced, lost, 4 * k * rounds


def case_notify(d, scale):
    n = _n(20000, scale, 500)
    p, tid = _notify_target(d, 2 * n + 100 + 2 * max(1, n // 5) * 5)
    try:
        call = lp.notification_channel(tid).call
        for _ in range(100):
            call(1, b"x", timeout=30)
        t = time.perf_counter()
        for _ in range(n):
            call(1, b"x", timeout=30)                     # return flag
        rtt = (time.perf_counter() - t) / n
        t = time.perf_counter()
        for _ in range(n):
            call(1, b"x", immediate=True, timeout=30)     # immediate + return flag
        rtt_imm = (time.perf_counter() - t) / n
        rtt_untraced, rtt_traced, lost, records = _traced(d, call, n)
        assert int(p.stdout.readline()) == 2 * n + 100 + 2 * max(1, n // 5) * 5
    finally:
        p.kill()
        p.wait()
    pipe = _pingpong(n, _pipes)
    unix = _pingpong(n, _sockets)
    iox2 = _iox()
    iox = _iox_event_pingpong(iox2, n) if iox2 is not None else None
    if iox is None:
        print("bench notify: the iceoryx2 event ping-pong row skipped: iceoryx2 is not "
              "installed (pip install fayt-portals[bench])", file=sys.stderr)

    m = _n(200000, scale, 5000)
    p, tid = _notify_target(d, m)
    try:
        payload = b"x" * 16
        send = lp.notification_channel(tid).send
        t = time.perf_counter()
        for _ in range(m):
            send(1, payload, timeout=60)
        got = int(p.stdout.readline())
        ours = m / (time.perf_counter() - t)
        assert got == m, "notifications lost: %d of %d" % (got, m)
    finally:
        p.kill()
        p.wait()
    ctx = multiprocessing.get_context("spawn")
    q, out = ctx.Queue(), ctx.Queue()
    c = ctx.Process(target=_mpq_consumer, args=(q, m, out))
    c.start()
    q.put(payload)      # the consumer is up once this is taken... time from here
    t = time.perf_counter()
    put = q.put
    for _ in range(m - 1):
        put(payload)
    end = out.get(timeout=300)
    c.join(60)
    peer = (m - 1) / (end - t)
    rows = [] if iox is None else [
        {"name": "notify, return flag, round trip", "ours": rtt * 1e6, "unit": "us",
         "peer": "iceoryx2 event ping-pong", "peer_value": iox * 1e6, "ratio": rtt / iox,
         "target": ("<=", 1.0)}]
    return rows + [
        {"name": "notify, return flag, round trip", "ours": rtt * 1e6, "unit": "us",
         "peer": "pipe ping-pong", "peer_value": pipe * 1e6, "ratio": rtt / pipe,
         "target": ("<=", 1.5)},
        {"name": "notify, return flag, round trip", "ours": rtt * 1e6, "unit": "us",
         "peer": "Unix socket ping-pong", "peer_value": unix * 1e6, "ratio": rtt / unix,
         "target": None},
        {"name": "notify, return flag, round trip, traced (%d of %d records lost)"
         % (lost, records), "ours": rtt_traced * 1e6, "unit": "us",
         "peer": "the same, not traced", "peer_value": rtt_untraced * 1e6,
         "ratio": rtt_traced / rtt_untraced, "target": ("<=", 1.5)},
        {"name": "notify, immediate + return, round trip", "ours": rtt_imm * 1e6, "unit": "us",
         "peer": "pipe ping-pong", "peer_value": pipe * 1e6, "ratio": rtt_imm / pipe,
         "target": None},
        {"name": "notify, deferred, one way (16 B)", "ours": ours, "unit": "ops/s",
         "peer": "multiprocessing.Queue", "peer_value": peer, "ratio": ours / peer,
         "target": (">=", 5.0)},
    ]


# -- SPECIAL: one fault through a chain, sequential read of a file ---------------

def _special_server(chain, run_max, ready, handler_kind, path=None):
    """A chain server in a forked child (os._exit at the end).  Kinds:
    "page" (one page, copied), "file" (the file pager by reference, `path`'s
    cache declared before serving), "file-copy" (the file pager by copy)."""
    try:
        lp.set_default(None)
        s = lp.chain_join(chain, run_max=run_max, slots=8)
        if handler_kind == "page":
            page = bytes(range(256)) * 16

            def h(req):
                req.supply(page)
        else:
            from servers.filepager import FilePager
            h = FilePager(by_reference=handler_kind == "file", server=s)
            if path is not None and handler_kind == "file":
                h.prepare(path)
        os.write(ready, b"1")
        s.serve(h, poll=0.5)
    except BaseException:
        import traceback
        traceback.print_exc()           # the parent says it did not start; this says why
    finally:
        os._exit(0)


def _start_special_server(chain, run_max, kind, path=None):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _special_server(chain, run_max, w, kind, path)
    os.close(w)
    if os.read(r, 1) != b"1":
        raise RuntimeError("the chain server did not start")
    os.close(r)
    return pid


def _stop(pid):
    os.kill(pid, 9)
    os.waitpid(pid, 0)


def _bare_pager(npages):
    """The peer: a raw userfaultfd pager in a forked child serving this
    process's region, one UFFDIO_COPY per fault (what one would write by hand)."""
    from libportal._abi import ffi, lib
    size = npages * 4096
    err = ffi.new("int *")
    base = lib.fayt_map_special(size, 0, 3, err)
    uffd, _ = lp.open_userfaultfd()
    assert lib.fayt_uffd_register(uffd, base, size, 0) == 0
    pid = os.fork()
    if pid == 0:
        import select
        try:
            page = ffi.from_buffer(bytearray(bytes(range(256)) * 16))
            faults = ffi.new("struct fayt_uffd_fault[32]")
            copied = ffi.new("uint64_t *")
            p = select.poll()
            p.register(uffd, select.POLLIN)
            while True:
                p.poll()
                n = lib.fayt_uffd_read(uffd, faults, 32)
                for i in range(n):
                    a = faults[i].address & ~4095
                    lib.fayt_uffd_copy(uffd, a, page, 4096, 0, copied)
        finally:
            os._exit(0)
    return base, size, uffd, pid


def case_special(d, scale):
    from libportal._abi import lib
    npages = _n(4000, scale, 200)
    chain = _name("special")
    spid = _start_special_server(chain, 4096, "page")
    try:
        def ours_round():
            sp = lp.portal(lp.SPECIAL, lp.PROT_READ, npages * 4096, chain=chain)
            buf = sp.buf
            t = time.perf_counter()
            for i in range(0, npages * 4096, 4096):
                buf[i]
            el = time.perf_counter() - t
            del buf
            sp.unmap()
            return el / npages

        def peer_round():
            base, size, uffd, pid = _bare_pager(npages)
            try:
                buf = memoryview(lp._abi.ffi.buffer(lp._abi.ffi.cast("char *", base), size))
                t = time.perf_counter()
                for i in range(0, size, 4096):
                    buf[i]
                el = time.perf_counter() - t
                buf.release()
            finally:
                _stop(pid)
                os.close(uffd)
                lib.fayt_unmap(base, size)
            return el / npages

        # The peer has two speeds (about 5 us a fault while its process
        # stays on a CPU, 13-70 us when each fault must wake it): seven
        # rounds, taking turns, and each side's best, so that both are
        # compared in their fast mode (three rounds often caught only the
        # peer's slow one, a ratio of 0.2x that says nothing).
        t_ours = t_peer = float("inf")
        for _ in range(7 if scale >= 1 else 3):
            t_ours = min(t_ours, ours_round())
            t_peer = min(t_peer, peer_round())
    finally:
        _stop(spid)

    mib = 64 if scale >= 1 else 16
    rounds = 5 if scale >= 1 else 1
    fd, path = tempfile.mkstemp(prefix="fayt-bench-special-")
    try:
        block = os.urandom(1 << 20)
        for _ in range(mib):
            os.write(fd, block)
        size = mib << 20
        chunk = bytearray(1 << 20)
        run = 2 << 20

        def read_through(sp):
            """Seconds to read all of sp, chunk by chunk; sp is unmapped after."""
            t = time.perf_counter()
            for off in range(0, size, len(chunk)):
                sp.readinto(off, chunk)
            el = time.perf_counter() - t
            sp.unmap()
            return el

        def portal_of(chain, backed):
            sp = lp.portal(lp.SPECIAL, lp.PROT_READ, size, chain=chain, message=path.encode())
            if sp.backed != backed:
                sp.unmap()
                raise RuntimeError("chain %s: the portal is %sbacked" % (chain, "" if sp.backed
                                                                          else "not "))
            return sp

        r_peer = [float("inf")]

        def peer_read():
            t = time.perf_counter()
            for off in range(0, size, len(chunk)):
                os.preadv(fd, [chunk], off)
            r_peer[0] = min(r_peer[0], time.perf_counter() - t)

        def paired(read):
            """read's seconds, the peer timed just before it: the peer's best
            is taken over all rounds, in the conditions of every row."""
            peer_read()
            return read()

        def fresh_pages():
            # What any design that hands the reader new memory pays at
            # least: the kernel makes 64 MiB of pages and copies into them
            # (what UFFDIO_COPY does), with no userfaultfd and no faytd.
            m = mmap.mmap(-1, size)
            t = time.perf_counter()
            for off in range(0, size, len(block)):
                m.write(block)
            el = time.perf_counter() - t
            m.close()
            return el

        def cold_read():
            # A file pager whose cache of the file is declared but empty: it
            # reads each run into its cache during the read (new pages).
            chain = _name("specialcold")
            pid = _start_special_server(chain, run, "file", path)
            try:
                return read_through(portal_of(chain, True))
            finally:
                _stop(pid)

        r_fresh = min(paired(fresh_pages) for _ in range(rounds))
        r_cold = min(paired(cold_read) for _ in range(rounds))

        # By reference, warm: the pager's cache was filled by an earlier
        # portal, as os.pread reads the warm Linux page cache.
        chain_ref = _name("specialfile")
        ref_pid = _start_special_server(chain_ref, run, "file", path)
        try:
            read_through(portal_of(chain_ref, True))
            r_warm = min(paired(lambda: read_through(portal_of(chain_ref, True)))
                         for _ in range(rounds))
        finally:
            _stop(ref_pid)

        # By copy (filepager --copy): each page read into the slot, then
        # UFFDIO_COPY into fresh pages; and SPECIAL|SHARE through it: a
        # share-point per file whose pages an earlier mapper fetched.
        chain_copy = _name("specialcopy")
        copy_pid = _start_special_server(chain_copy, run, "file-copy")
        try:
            r_copy = min(paired(lambda: read_through(portal_of(chain_copy, False)))
                         for _ in range(rounds))
            ident = _name("cache")
            holder = lp.portal(lp.SPECIAL | lp.SHARE, lp.PROT_READ, size, identifier=ident,
                               create=True, chain=chain_copy, message=path.encode())
            try:
                for off in range(0, size, len(chunk)):
                    holder.readinto(off, chunk)
                r_share = min(paired(lambda: read_through(lp.portal(
                    lp.SPECIAL | lp.SHARE, lp.PROT_READ, size, identifier=ident)))
                    for _ in range(rounds))
            finally:
                holder.unmap()
        finally:
            _stop(copy_pid)
    finally:
        os.close(fd)
        os.unlink(path)
    mb = {k: size / v / 1e6 for k, v in (("peer", r_peer[0]), ("warm", r_warm), ("cold", r_cold),
                                          ("copy", r_copy), ("share", r_share),
                                          ("fresh", r_fresh))}

    def row(name, key, target=None):
        return {"name": name, "ours": mb[key], "unit": "MB/s", "peer": "os.pread",
                "peer_value": mb["peer"], "ratio": mb[key] / mb["peer"], "target": target}

    return [
        {"name": "SPECIAL: one fault, one-server chain", "ours": t_ours * 1e6, "unit": "us",
         "peer": "bare userfaultfd pager process", "peer_value": t_peer * 1e6,
         "ratio": t_ours / t_peer, "target": ("<=", 1.5)},
        row("SPECIAL: sequential read %d MiB by reference, warm" % mib, "warm", (">=", 0.6)),
        row("SPECIAL: the same, cold (pager fills its cache)", "cold"),
        row("SPECIAL: the same by copy (filepager --copy)", "copy"),
        row("SPECIAL|SHARE: by copy, pages fetched before", "share"),
        row("floor: %d MiB written into fresh pages" % mib, "fresh"),
    ]


# -- fairness: the owner's calls while other uids flood faytd ---------------------

# A process of uid 65534 (run as root, it drops to it after importing
# libportal: the venv's interpreter may not be one nobody can run) that
# floods faytd with one kind of call, each waiting for its reply, until its
# stdin is readable.  tests/test_limits.py runs it too.
FLOODER = r"""
import json, os, select, sys
import libportal as lp
from libportal._abi import lib, LIST_REQ, NOTIFY_OPEN
if os.getuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
sock, kind, tag = sys.argv[1], sys.argv[2], sys.argv[3]
c = lp.Connection(sock)
other = lp.Connection(sock) if kind == "ring" else None
print("ready", flush=True)
n, after = 0, 0
while not (n & 15 == 0 and select.select([sys.stdin], [], [], 0)[0]):
    if kind == "mix":               # create, attach, destroy, a bad request
        name = "%s-%d" % (tag, n)
        sp = lp.share_create(name, 4096, connection=c)
        lp.share_attach(name, connection=c).unmap()
        sp.destroy()
        try:
            c.call(lib.FAYT_SYS_UNMAP, b"bad")
        except lp.PortalError:
            pass
    elif kind == "hello":           # connect, HELLO, close
        lp.Connection(sock).close()
    elif kind == "ring":            # open a ring into another context, close it
        fds = c.call(lib.FAYT_SYS_NOTIFY_OPEN, NOTIFY_OPEN.pack(other.context_id, 0))[1]
        for fd in fds:
            os.close(fd)
        c.call(lib.FAYT_SYS_NOTIFY_CLOSE, NOTIFY_OPEN.pack(other.context_id, 0))
    elif kind == "list":            # page through LIST_SHARE, again and again
        page = json.loads(c.call(lib.FAYT_SYS_LIST_SHARE, LIST_REQ.pack(after))[0])
        after = page[-1]["id"] if page else 0
    n += 1
"""


def _owner_loop(conn, prefix, n):
    """Seconds per share-point create+destroy of the owner (root)."""
    t = time.perf_counter()
    for i in range(n):
        lp.share_create("%s-%d" % (prefix, i), 4096, connection=conn).destroy()
    return (time.perf_counter() - t) / n


def case_fair(d, scale):
    """The owner's share-point create+destroy while three processes of uid
    65534 flood faytd (each call waiting for its reply), against the same
    with faytd quiet: quiet and flooded runs alternate, the medians are
    compared.  Floods: a mix (create, attach, destroy, a bad request),
    HELLO/close, ring open/close, LIST_SHARE pages over a table of 10,000.
    Each row also gives faytd's own count (fayt stats: fairness) of the
    requests of others the owner's waited behind, mean and most."""
    if os.geteuid() != 0:
        print("  fair: needs root (its floods run as uid 65534): skipped", file=sys.stderr)
        return []
    from faytd.launch import Faytd
    n = _n(2000, scale, 100)
    rounds = 5 if scale >= 1 else 2
    top = tempfile.mkdtemp(prefix="fayt-bench-fair-")
    os.chmod(top, 0o755)
    f = Faytd(os.path.join(top, "faytd"), config={"socket_mode": "0666"}, ram="1GiB")
    os.chmod(os.path.dirname(f.socket), 0o755)
    rows = []
    env = dict(os.environ)
    if os.environ.get("FAYT_BENCH_FLOOD_SPIN_NS") is not None:     # what the floods spin for
        env["FAYT_CALL_SPIN_NS"] = os.environ["FAYT_BENCH_FLOOD_SPIN_NS"]
    try:
        conn = lp.Connection(f.socket)
        table = [lp.share_create(_name("table") + "-%d" % i, 4096, connection=conn)
                 for i in range(10000 if scale >= 1 else 1000)]
        for kind, target in (("mix", ("<=", 2.0)), ("hello", None), ("ring", None),
                             ("list", None)):
            quiet, flooded, waited, owner = [], [], [], []
            for r in range(rounds):
                quiet.append(_owner_loop(conn, _name("quiet"), n))
                procs = [subprocess.Popen([sys.executable, "-c", FLOODER, f.socket, kind,
                                           _name("flood%d" % i)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, env=env)
                         for i in range(3)]
                try:
                    for p in procs:
                        assert p.stdout.readline().strip() == "ready"
                    time.sleep(0.05)
                    s0 = conn.stats()["fairness"]
                    flooded.append(_owner_loop(conn, _name("flooded"), n))
                    s1 = conn.stats()["fairness"]
                finally:
                    for p in procs:
                        p.stdin.close()
                    for p in procs:
                        p.wait(timeout=60)
                        p.stdout.close()
                waited.append(s1["owner_waited_behind"] - s0["owner_waited_behind"])
                owner.append(s1["owner_requests"] - s0["owner_requests"])
            q, fl = sorted(quiet), sorted(flooded)
            mq, mf = q[len(q) // 2], fl[len(fl) // 2]
            most = conn.stats()["fairness"]["owner_waited_behind_max"]
            mean = sum(waited) / max(1, sum(owner))
            rows.append({"name": "owner create+destroy, 3 uid-65534 flooding: %s" % kind,
                         "ours": mf * 1e6, "unit": "us", "peer": "same, faytd quiet",
                         "peer_value": mq * 1e6, "ratio": mf / mq, "target": target,
                         "flooded_range_us": [fl[0] * 1e6, fl[-1] * 1e6],
                         "quiet_range_us": [q[0] * 1e6, q[-1] * 1e6],
                         "waited_behind_mean": mean, "waited_behind_max_so_far": most})
            print("  fair %s: flooded %.1f us (%.1f-%.1f), quiet %.1f us (%.1f-%.1f), owner "
                  "waited behind %.2f requests of others on average, %d at most so far"
                  % (kind, mf * 1e6, fl[0] * 1e6, fl[-1] * 1e6, mq * 1e6, q[0] * 1e6,
                     q[-1] * 1e6, mean, most), file=sys.stderr)
        for sp in table:
            sp.destroy()
        conn.close()
    finally:
        f.stop()
        shutil.rmtree(top, ignore_errors=True)
    return rows


# -- DIRECT and COW (docs/portals.md) -----------------------------------------------

def median_of(n, repeats, *fns):
    """Seconds per iteration of each fn: the median of `repeats` rounds,
    every fn(n) once in each round, in turn (peers interleaved)."""
    out = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn(n)
            out[i].append((time.perf_counter() - t) / n)
    return [sorted(x)[len(x) // 2] for x in out]


# One request's paddr[] fits one message: 8,182 frames at most (31.9 MiB).
_BIG_PAGES = 8000


def case_direct(d, scale):
    n = _n(3000, scale, 100)
    src = lp.portal(lp.ANON, lp.PROT_RW, 4096)
    lp.grant(src, to=lp.connection().context_id)
    one = list(src.paddr)

    def anon(k):
        for _ in range(k):
            lp.portal(lp.ANON, lp.PROT_RW, 4096).unmap()

    def direct(k):
        for _ in range(k):
            lp.portal(lp.DIRECT, lp.PROT_RW, 4096, paddr=one).unmap()

    def cow(k):
        for _ in range(k):
            lp.portal(lp.COW, lp.PROT_RW, 4096, paddr=one).unmap()

    t_anon, t_direct, t_cow = median_of(n, 7, anon, direct, cow)
    big = lp.portal(lp.ANON, lp.PROT_RW, _BIG_PAGES * 4096)
    big.buf[:] = b"\x5a" * len(big.buf)
    many = list(big.paddr)
    if len(many) < _BIG_PAGES:           # a reply lists at most 8,177 frames
        raise RuntimeError("bench: the big portal's reply listed %d frames" % len(many))
    m = max(3, _n(30, scale, 3))

    def cow_big(k):
        for _ in range(k):
            lp.portal(lp.COW, lp.PROT_RW, _BIG_PAGES * 4096, paddr=many).unmap()

    def cow_small(k):
        cow(k)

    t_big, t_small = median_of(m, 5, cow_big, cow_small)
    # First writes: a fresh view each round, every page written once.
    fd = os.memfd_create("bench-cow")
    os.ftruncate(fd, _BIG_PAGES * 4096)
    os.pwrite(fd, b"\x5a" * (_BIG_PAGES * 4096), 0)
    writes = {"ours": [], "peer": []}
    snaps = {"ours": [], "peer": []}
    for _ in range(max(3, _n(7, scale, 3))):
        v = lp.portal(lp.COW, lp.PROT_RW, _BIG_PAGES * 4096, paddr=many)
        buf = v.buf
        t = time.perf_counter()
        for i in range(0, len(buf), 4096):
            buf[i] = 1
        writes["ours"].append(time.perf_counter() - t)
        buf.release()
        v.unmap()
        pm = mmap.mmap(fd, _BIG_PAGES * 4096, flags=mmap.MAP_PRIVATE)
        t = time.perf_counter()
        for i in range(0, len(pm), 4096):
            pm[i] = 1
        writes["peer"].append(time.perf_counter() - t)
        pm.close()
        t = time.perf_counter()
        s = lp.portal(lp.COW, lp.PROT_RW, _BIG_PAGES * 4096, paddr=many,
                      share_type=lp.COW_SNAPSHOT)
        snaps["ours"].append(time.perf_counter() - t)
        s.unmap()
        mv = big.buf
        t = time.perf_counter()
        copy = bytes(mv)
        snaps["peer"].append(time.perf_counter() - t)
        del copy
    os.close(fd)
    big.unmap()
    src.unmap()
    sp_rows = _cow_by_sharepoint(scale)
    med = {k: {w: sorted(v)[len(v) // 2] for w, v in x.items()}
           for k, x in (("writes", writes), ("snaps", snaps))}
    mib = _BIG_PAGES * 4096 / (1 << 20)
    return sp_rows + [
        {"name": "4 KiB DIRECT (granted RAM): portal+unmap", "ours": t_direct * 1e6,
         "unit": "us", "peer": "4 KiB ANON portal+unmap", "peer_value": t_anon * 1e6,
         "ratio": t_direct / t_anon, "target": ("<=", 1.2)},
        {"name": "4 KiB COW at least on write: portal+unmap", "ours": t_cow * 1e6,
         "unit": "us", "peer": "4 KiB ANON portal+unmap", "peer_value": t_anon * 1e6,
         "ratio": t_cow / t_anon, "target": ("<=", 1.2)},
        {"name": "%.2f MiB COW at least on write: portal+unmap" % mib, "ours": t_big * 1e6,
         "unit": "us", "peer": "its own 4 KiB figure", "peer_value": t_small * 1e6,
         "ratio": t_big / t_small, "target": ("<=", 2.0)},
        {"name": "first write of each of %d pages of a COW view" % _BIG_PAGES,
         "ours": med["writes"]["ours"] * 1e6, "unit": "us",
         "peer": "same, mmap(MAP_PRIVATE) of the object", "peer_value":
         med["writes"]["peer"] * 1e6, "ratio": med["writes"]["ours"] / med["writes"]["peer"],
         "target": ("<=", 1.5)},
        {"name": "%.2f MiB COW strict snapshot" % mib, "ours": med["snaps"]["ours"] * 1e6,
         "unit": "us", "peer": "bytes(memoryview) of it", "peer_value":
         med["snaps"]["peer"] * 1e6, "ratio": med["snaps"]["ours"] / med["snaps"]["peer"],
         "target": ("<=", 1.5)},
    ]


# A COW source named as a share-point (share.identifier): no paddr[], so
# no one-message bound on the view's length.
_SP_BYTES = 64 << 20


def _cow_by_sharepoint(scale):
    """Rows of COW views whose source is a 64 MiB share-point by name: a
    64 MiB view at least on write vs a 4 KiB one of the same share-point,
    and a 64 MiB strict snapshot vs bytes(memoryview) of its 64 MiB."""
    name = "bench-cow-source"
    sp = lp.share_create(name, _SP_BYTES)
    try:
        mv = sp.view()
        mv[:] = b"\x5a" * len(mv)

        def view(length):
            def run(k):
                for _ in range(k):
                    lp.portal(lp.COW, lp.PROT_RW, length, identifier=name).unmap()
            return run

        m = max(3, _n(30, scale, 3))
        t_big, t_small = median_of(m, 7, view(_SP_BYTES), view(4096))
        snaps = {"ours": [], "peer": []}
        for _ in range(max(3, _n(7, scale, 3))):
            t = time.perf_counter()
            s = lp.portal(lp.COW, lp.PROT_RW, _SP_BYTES, identifier=name,
                          share_type=lp.COW_SNAPSHOT)
            snaps["ours"].append(time.perf_counter() - t)
            s.unmap()
            t = time.perf_counter()
            copy = bytes(mv[:_SP_BYTES])
            snaps["peer"].append(time.perf_counter() - t)
            del copy
        mv.release()
    finally:
        sp.destroy()
    med = {w: sorted(v)[len(v) // 2] for w, v in snaps.items()}
    return [
        {"name": "64 MiB COW at least on write, source a share-point by name: portal+unmap",
         "ours": t_big * 1e6, "unit": "us", "peer": "its own 4 KiB figure",
         "peer_value": t_small * 1e6, "ratio": t_big / t_small, "target": ("<=", 2.0)},
        {"name": "64 MiB COW strict snapshot, source a share-point by name",
         "ours": med["ours"] * 1e6, "unit": "us", "peer": "bytes(memoryview) of 64 MiB",
         "peer_value": med["peer"] * 1e6, "ratio": med["ours"] / med["peer"],
         "target": ("<=", 1.5)},
    ]


# -- connected channels: 64 B request-response and one-way messages ----------------

_CHAN_PEER = r"""
import sys, time
import libportal as lp
lst = lp.listen(sys.argv[1])
print("ready", flush=True)
end = lst.accept()
if sys.argv[2] == "echo":
    send, recv = end.send, end.recv
    while True:
        m = recv()
        if not m:
            break
        send(m)
elif sys.argv[2] == "ref":          # take each message by reference, answer one byte
    send, recv = end.send, end.recv
    while True:
        m = recv()
        if not m:
            break
        m.close()
        send(b"k")
else:                               # sink: take argv[3] messages, then say when
    recv, n = end.recv, int(sys.argv[3])
    for _ in range(n):
        recv()
    print(time.perf_counter(), flush=True)
    recv()
end.close()
"""

_MQ_SINK = r"""
import sys, time
import posix_ipc
mq = posix_ipc.MessageQueue(sys.argv[1])
print("ready", flush=True)
recv = mq.receive
for _ in range(int(sys.argv[2])):
    recv()
print(time.perf_counter(), flush=True)
"""


# The iceoryx2 peer (optional: pip install fayt-portals[bench]).  argv[1]:
# "server" (request-response echo, 64 B, woken by an event) or "sub"
# (take argv[3] 64 B samples, then say when); argv[2]: the service prefix.
# Every side blocks when idle, in an event Listener's timed_wait (a spin
# first, as our channel's, made iceoryx2's round trip 2-3x slower here:
# Python's polling loop costs more than it saves, so SPIN is 0).
_IOX_PEER = r"""
import ctypes, sys, time
import iceoryx2 as iox2
iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
P = ctypes.c_uint8 * 64
SPIN = 0.0
tag, node = sys.argv[2], iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
def event(name):
    return node.service_builder(iox2.ServiceName.new(tag + "/" + name)).event().open_or_create()
def idle(lis, poll):
    end = time.perf_counter() + SPIN
    while time.perf_counter() < end:
        if poll():
            return
        time.sleep(0)
    lis.timed_wait(iox2.Duration.from_millis(1))
if sys.argv[1] == "server":
    svc = node.service_builder(iox2.ServiceName.new(tag + "/rr")).request_response(P, P) \
        .open_or_create()
    server = svc.server_builder().create()
    lis = event("to_server").listener_builder().create()
    notif = event("to_client").notifier_builder().create()
    print("ready", flush=True)
    while True:
        req = server.receive()
        if req is None:
            idle(lis, lambda: server.has_requests)
            continue
        data = req.payload().contents
        if data[0] == 255:
            req.delete()
            break
        req.send_copy(data)
        req.delete()
        notif.notify()
elif sys.argv[1] == "event":       # event ping-pong: a Notifier/Listener pair each way
    lis = event("ping").listener_builder().create()
    notif = event("pong").notifier_builder().create()
    print("ready", flush=True)
    n, got = int(sys.argv[3]), 0
    while got < n:
        if lis.timed_wait(iox2.Duration.from_millis(1)):
            got += 1
            notif.notify()
else:
    svc = node.service_builder(iox2.ServiceName.new(tag + "/ps")).publish_subscribe(P) \
        .enable_safe_overflow(False).subscriber_max_buffer_size(4096).open_or_create()
    sub = svc.subscriber_builder().create()
    lis = event("to_sub").listener_builder().create()
    print("ready", flush=True)
    n, got = int(sys.argv[3]), 0
    while got < n:
        s = sub.receive()
        if s is None:
            idle(lis, lambda: sub.has_samples)
            continue
        s.delete()
        got += 1
    print(time.perf_counter(), flush=True)
"""


def _iox():
    try:
        import iceoryx2
        return iceoryx2
    except ImportError:
        return None


class _IoxClient:
    """Our side of the iceoryx2 request-response pair: round trips of 64 B
    (the client sleeps on its Listener until the response's event)."""

    def __init__(self, iox2):
        import ctypes
        self.iox2, self.tag = iox2, _name("iox")
        self.p = subprocess.Popen([sys.executable, "-c", _IOX_PEER, "server", self.tag],
                                  stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "ready"
        P = ctypes.c_uint8 * 64
        self.node = node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)

        def event(name):
            return node.service_builder(iox2.ServiceName.new(self.tag + "/" + name)).event() \
                .open_or_create()
        svc = node.service_builder(iox2.ServiceName.new(self.tag + "/rr")).request_response(P, P) \
            .open_or_create()
        self.client = svc.client_builder().create()
        self.lis = event("to_client").listener_builder().create()
        self.notif = event("to_server").notifier_builder().create()
        self.msg, self.stop_msg = P(*([1] * 64)), P(*([255] * 64))

    def run(self, k):
        send, notify, lis = self.client.send_copy, self.notif.notify, self.lis
        ms = self.iox2.Duration.from_millis(1)
        for _ in range(k):
            pend = send(self.msg)
            notify()
            while True:
                r = pend.receive()
                if r is not None:
                    r.delete()
                    break
                lis.timed_wait(ms)
            pend.delete()

    def stop(self):
        self.client.send_copy(self.stop_msg).delete()
        self.notif.notify()
        self.p.wait(30)


def _iox_event_pingpong(iox2, n):
    """Seconds a round trip of iceoryx2 events: notify the peer's Listener,
    sleep on ours until its answer."""
    tag = _name("iox")
    p = subprocess.Popen([sys.executable, "-c", _IOX_PEER, "event", tag, str(n + 100)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)

    def event(name):
        return node.service_builder(iox2.ServiceName.new(tag + "/" + name)).event() \
            .open_or_create()
    ping = event("ping").notifier_builder().create()
    pong = event("pong").listener_builder().create()
    ms = iox2.Duration.from_millis(1)

    def run(k):
        notify, wait = ping.notify, pong.timed_wait
        for _ in range(k):
            notify()
            while not wait(ms):
                pass
    run(100)
    t = time.perf_counter()
    run(n)
    rtt = (time.perf_counter() - t) / n
    p.wait(30)
    return rtt


def _one_way_iox(iox2, m):
    import ctypes
    tag = _name("iox")
    p = subprocess.Popen([sys.executable, "-c", _IOX_PEER, "sub", tag, str(m)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    P = ctypes.c_uint8 * 64
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    svc = node.service_builder(iox2.ServiceName.new(tag + "/ps")).publish_subscribe(P) \
        .enable_safe_overflow(False).subscriber_max_buffer_size(4096).open_or_create()
    pub = svc.publisher_builder().backpressure_strategy(
        iox2.BackpressureStrategy.RetryUntilDelivered).create()
    notif = node.service_builder(iox2.ServiceName.new(tag + "/to_sub")).event() \
        .open_or_create().notifier_builder().create()
    msg = P(*([1] * 64))
    send, notify = pub.send_copy, notif.notify
    t = time.perf_counter()
    for i in range(m):
        send(msg)
        if i & 255 == 255:          # a wake-up every 256 samples; the sleeper also times out
            notify()
    notify()
    done = float(p.stdout.readline())
    p.wait(30)
    return m / (done - t)


def _chan_peer(d, mode, m=0):
    name = _name("chan")
    p = subprocess.Popen([sys.executable, "-c", _CHAN_PEER, name, mode, str(m)], env=d.env(),
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p, lp.connect(name, timeout=30)


def _echo_child(make):
    """A forked child echoing 64 B messages on a pair made by make() until
    EOF; (send, recv, close) for this side."""
    a_send, a_recv, b_send, b_recv, close = make()
    pid = os.fork()
    if pid == 0:
        try:
            while True:
                m = b_recv()
                if not m:
                    break
                b_send(m)
        finally:
            os._exit(0)

    def stop():             # the child holds this side's ends too: no EOF comes, kill it
        close()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return a_send, a_recv, stop


def _pipes64():
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    return (lambda m: os.write(w1, m), lambda: os.read(r2, 64),
            lambda m: os.write(w2, m), lambda: os.read(r1, 64),
            lambda: [os.close(f) for f in (w1, r2, r1, w2)])


def _sockets64():
    import socket
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return (a.send, lambda: a.recv(64), b.send, lambda: b.recv(64),
            lambda: (a.close(), b.close()))


def case_channel(d, scale):
    """64 B request-response between two processes: a channel vs a Unix
    socket (SOCK_SEQPACKET) and a pipe pair, interleaved in rounds (median);
    then one-way 64 B messages/s vs posix_ipc.MessageQueue.  iceoryx2 and
    faster-fifo rows are left out, with a printed reason, when they are not
    installed (pip install fayt-portals[bench])."""
    n = _n(20000, scale, 500)
    msg = b"q" * 64
    p, end = _chan_peer(d, "echo")
    u_send, u_recv, u_stop = _echo_child(_sockets64)
    q_send, q_recv, q_stop = _echo_child(_pipes64)
    try:
        def ours(k):
            send, recv = end.send, end.recv
            for _ in range(k):
                send(msg)
                recv()

        def unix(k):
            for _ in range(k):
                u_send(msg)
                u_recv()

        def pipe(k):
            for _ in range(k):
                q_send(msg)
                q_recv()
        iox2 = _iox()
        iox = _IoxClient(iox2) if iox2 is not None else None
        fns = (ours, unix, pipe) + ((iox.run,) if iox is not None else ())
        for f in fns:
            f(100)
        got = median_of(n, 5, *fns)
        t_ours, t_unix, t_pipe = got[:3]
        t_iox = got[3] if iox is not None else None
        if iox is not None:
            iox.stop()
    finally:
        end.close()
        p.wait(30)
        u_stop()
        q_stop()
    best = min([t_unix, t_pipe] + ([t_iox] if t_iox else []))
    rows = [
        {"name": "channel 64 B request-response", "ours": t_ours * 1e6, "unit": "us",
         "peer": "Unix socket (seqpacket)", "peer_value": t_unix * 1e6,
         "ratio": t_ours / t_unix, "target": ("<=", 1.0) if best == t_unix else None},
        {"name": "channel 64 B request-response", "ours": t_ours * 1e6, "unit": "us",
         "peer": "pipe pair", "peer_value": t_pipe * 1e6, "ratio": t_ours / t_pipe,
         "target": ("<=", 1.0) if best == t_pipe else None},
    ]
    if t_iox is not None:
        rows.append({"name": "channel 64 B request-response", "ours": t_ours * 1e6, "unit": "us",
                     "peer": "iceoryx2 request-response", "peer_value": t_iox * 1e6,
                     "ratio": t_ours / t_iox, "target": ("<=", 1.0) if best == t_iox else None})
    else:
        _skip("iceoryx2", "iceoryx2 request-response and publish-subscribe rows")

    rows += _by_reference(d, scale)

    m = _n(200000, scale, 5000)
    ours = _one_way_ours(d, m, msg)
    peer = _one_way_mq(m, msg)
    rows.append({"name": "channel one way, 64 B", "ours": ours, "unit": "msgs/s",
                 "peer": "posix_ipc.MessageQueue", "peer_value": peer, "ratio": ours / peer,
                 "target": None})
    if iox2 is not None:
        peer = _one_way_iox(iox2, m)
        rows.append({"name": "channel one way, 64 B", "ours": ours, "unit": "msgs/s",
                     "peer": "iceoryx2 publish-subscribe", "peer_value": peer,
                     "ratio": ours / peer, "target": (">=", 2.0)})
    _skip("faster_fifo", "the faster-fifo row")
    return rows


MIB = 1 << 20


def _by_reference(d, scale):
    """1 MiB from one process to another, acknowledged with one byte: a
    share-point by reference (End.send_share; the receiver maps it, then
    unmaps it) vs a Unix stream socket's sendall / recv_into a reused
    buffer; an ANON portal by reference and the copy mode (faytd copies
    into a sealed object) reported."""
    n = _n(300, scale, 20)
    p, end = _chan_peer(d, "ref")
    sp = lp.share_create(_name("ref"), MIB + 4096)
    assert sp.length >= MIB
    anon = lp.portal(lp.ANON, lp.PROT_RW, MIB)
    import socket
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            a.close()
            buf = bytearray(MIB)
            view = memoryview(buf)
            while True:
                got = 0
                while got < MIB:
                    k = b.recv_into(view[got:])
                    if not k:
                        os._exit(0)
                    got += k
                b.sendall(b"k")
        finally:
            os._exit(0)
    b.close()
    data = bytes(MIB)
    try:
        def ours(k):
            for _ in range(k):
                end.send_share(sp)
                end.recv()

        def portal(k):
            for _ in range(k):
                end.send_share(anon)
                end.recv()

        def copied(k):
            for _ in range(k):
                end.send_share(sp, copy=True)
                end.recv()

        def unix(k):
            for _ in range(k):
                a.sendall(data)
                a.recv(1)
        for f in (ours, portal, copied, unix):
            f(5)
        t_ours, t_anon, t_copy, t_unix = median_of(n, 5, ours, portal, copied, unix)
    finally:
        end.close()
        p.wait(30)
        a.close()
        os.waitpid(pid, 0)
        sp.destroy()
        anon.unmap()
    return [
        {"name": "channel 1 MiB by reference", "ours": 1 / t_ours, "unit": "msgs/s",
         "peer": "Unix socket sendall/recv_into", "peer_value": 1 / t_unix,
         "ratio": t_unix / t_ours, "target": (">=", 5.0)},
        {"name": "channel 1 MiB ANON portal by reference", "ours": 1 / t_anon,
         "unit": "msgs/s", "peer": "Unix socket sendall/recv_into", "peer_value": 1 / t_unix,
         "ratio": t_unix / t_anon, "target": None},
        {"name": "channel 1 MiB by reference, copy mode", "ours": 1 / t_copy, "unit": "msgs/s",
         "peer": "Unix socket sendall/recv_into", "peer_value": 1 / t_unix,
         "ratio": t_unix / t_copy, "target": None},
    ]


def _skip(module, what):
    try:
        __import__(module)
    except ImportError:
        print("bench channel: %s skipped: %s is not installed (pip install "
              "fayt-portals[bench])" % (what, module), file=sys.stderr)
        return True
    print("bench channel: %s skipped: %s is installed but this case does not measure it yet"
          % (what, module), file=sys.stderr)
    return True


def _one_way_ours(d, m, msg):
    p, end = _chan_peer(d, "sink", m)
    try:
        send = end.send
        t = time.perf_counter()
        for _ in range(m):
            send(msg)
        done = float(p.stdout.readline())
    finally:
        end.close()
        p.wait(30)
    return m / (done - t)


def _one_way_mq(m, msg):
    name = "/" + _name("mq")
    mq = posix_ipc.MessageQueue(name, posix_ipc.O_CREX, max_messages=10, max_message_size=64)
    try:
        p = subprocess.Popen([sys.executable, "-c", _MQ_SINK, name, str(m)],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        send = mq.send
        t = time.perf_counter()
        for _ in range(m):
            send(msg)
        done = float(p.stdout.readline())
        p.wait(30)
    finally:
        mq.unlink()
        mq.close()
    return m / (done - t)
# -- an emulated device: descriptor, doorbell, completion, interrupt -----------

_DEVICE_MODEL = r"""
import sys, struct, time
import libportal as lp
m = lp.register_device("bench0")
def on_write(off, size, value):
    m.set32(off, value)
    if off == 0:                            # the doorbell: complete descriptor `value`
        at = 64 * (value % 32)
        m.data[at + 8:at + 16] = m.data[at:at + 8]
        m.irq()
m.on_write = on_write
print("ready", flush=True)
end = time.monotonic() + 600
while time.monotonic() < end and m.state[0] == 1:
    m.serve(1.0)
"""


@contextlib.contextmanager
def _device_faytd(tmp, name, size, model_code, model_args=()):
    """A faytd of its own with window `name`, a model process started from
    model_code (it prints one line when it serves), a connection to it;
    all stopped after."""
    from faytd.launch import Faytd
    dev_d = Faytd(os.path.join(tmp, "faytd"), ram="64MiB", config={"devices": [
        {"name": name, "base": 0x40000000, "size": size}]})
    model = c = None
    try:
        model = subprocess.Popen([sys.executable, "-c", model_code] + list(model_args),
                                 env=dev_d.env(), stdout=subprocess.PIPE, text=True)
        model.stdout.readline()
        c = lp.Connection(dev_d.socket)
        yield c
    finally:
        if c is not None:
            c.close()
        if model is not None:
            model.kill()
            model.wait()
        dev_d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def case_device(d, scale):
    """Driver -> device round trip: write a descriptor into the window's data
    area, ring the doorbell (write32), the model completes it and raises the
    interrupt, the driver's handler runs; vs a pipe ping-pong."""
    n = _n(3000, scale, 200)
    with _device_faytd(tempfile.mkdtemp(prefix="fayt-bench-dev-"), "bench0", "16KiB",
                       _DEVICE_MODEL) as c:
        done = [0]
        dev = lp.attach_device("bench0", 7, lambda count: done.__setitem__(0, done[0] + count),
                               connection=c)
        win = dev.map(lp.PROT_RW)
        buf = win.buf
        wait = lp.notification.runtime(c).wait

        def ours(k):
            for i in range(k):
                at = 4096 + 64 * (i % 32)
                buf[at:at + 8] = struct.pack("<Q", i)
                want = done[0] + 1
                dev.write32(0, i)
                while done[0] < want:
                    wait(10)
                if buf[at + 8:at + 16] != buf[at:at + 8]:
                    raise RuntimeError("bench: descriptor %d not completed" % i)

        ours(50)
        rounds = {"ours": [], "peer": []}
        for _ in range(5):
            t = time.perf_counter()
            ours(n)
            rounds["ours"].append((time.perf_counter() - t) / n)
            rounds["peer"].append(_pingpong(n, _pipes))
        buf.release()
        win.unmap()
        dev.close()
    med = {k: sorted(v)[len(v) // 2] for k, v in rounds.items()}
    return [
        {"name": "device round trip (descriptor, doorbell, completion, interrupt)",
         "ours": med["ours"] * 1e6, "unit": "us", "peer": "pipe ping-pong",
         "peer_value": med["peer"] * 1e6, "ratio": med["ours"] / med["peer"],
         "target": ("<=", 2.0),
         "range": [min(rounds["ours"]) * 1e6, max(rounds["ours"]) * 1e6]},
    ]


_BLOCK_MODEL = r"""
import sys
sys.path.insert(0, sys.argv[1])
from servers import blockdev
sys.exit(blockdev.main(["model", "--name", "blk0", "--image", sys.argv[2]]))
"""


def case_blockdev(d, scale):
    """4 KiB block reads/s through the reference block device's driver
    (servers/blockdev.py) vs os.pread of the image; reported, no target."""
    from servers.blockdev import BlockDriver
    n = _n(3000, scale, 200)
    tmp = tempfile.mkdtemp(prefix="fayt-bench-blk-")
    image = os.path.join(tmp, "disk.img")
    with open(image, "wb") as f:
        f.write(os.urandom(64 * 4096))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with _device_faytd(tmp, "blk0", "72KiB", _BLOCK_MODEL, (root, image)) as c:
        drv = BlockDriver("blk0", connection=c)
        fd = os.open(image, os.O_RDONLY)

        def ours(k):
            for i in range(k):
                drv.read(i % 64)

        def peer(k):
            for i in range(k):
                os.pread(fd, 4096, (i % 64) * 4096)

        ours(50)
        t_ours, t_peer = median_of(n, 5, ours, peer)
        os.close(fd)
        drv.close()
    return [
        {"name": "4 KiB block reads through the block device's driver", "ours": 1 / t_ours,
         "unit": "ops/s", "peer": "os.pread of the image", "peer_value": 1 / t_peer,
         "ratio": t_peer / t_ours, "target": None},
    ]


CASES = {
    "lock": case_lock,
    "write": case_write,
    "counter": case_counter,
    "create": case_create,
    "attach": case_attach,
    "scale": case_scale,
    "notify": case_notify,
    "special": case_special,
    "fair": case_fair,
    "direct": case_direct,
    "contention": case_contention,
    "channel": case_channel,
    "device": case_device,
    "blockdev": case_blockdev,
}
from .queue_case import case_queue  # noqa: E402  (its own module: the queue's peers)
CASES["queue"] = case_queue
from .sched_case import case_sched  # noqa: E402  (scheduling events and decisions)
CASES["sched"] = case_sched
