"""faytd's C path (faytd/core/serve.c, table.c): a share-point's create,
attach, unmap and its owner's destroy, and ANON portals, performed in C by
the core that owns them (and that faytd's Python calls for the calls it
handles), and the recycling of an object for the context that alone ever
held it.  Real faytds,
real processes; which path served a call is read from faytd's own count
(`fayt stats --json`), so a test that expects the fast path fails if the
fast path was not taken."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import libportal
from libportal._abi import ffi
from support.children import WAIT, Child, wait_child_exit, wait_until
from support.layout import list_share, meta_bytes, meta_size, read_meta
from support.procs import call_in_child, in_fork_child


def stats(d, *conns):
    """faytd's counters from `fayt stats --json`, after a round trip on each
    of conns (so that what they sent without a reply was performed)."""
    for c in conns:
        c.list_contexts()
    p = subprocess.run([sys.executable, "-m", "faytd.cli", "--socket", d.socket, "stats",
                        "--json"], capture_output=True, text=True, timeout=WAIT)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def fast_counts(d, *conns):
    """(share-points created, destroyed) by the fast path."""
    f = stats(d, *conns)["fast_path"]
    return f["sharepoints_created"], f["sharepoints_destroyed"]


def attach_counts(d, *conns):
    """(share-point attaches, share-point unmaps) by the fast path."""
    f = stats(d, *conns)["fast_path"]
    return f["sharepoints_attached"], f["sharepoints_unmapped"]


def anon_counts(d, *conns):
    """(mapped, unmapped) ANON portals by the fast path."""
    f = stats(d, *conns)["fast_path"]
    return f["anon_mapped"], f["anon_unmapped"]


def log_counts(log):
    """The same four counts from a stopped faytd's log line (it still writes it)."""
    m = re.search(r"fast path: (\d+) share-points created, (\d+) destroyed; (\d+) ANON "
                  r"portals mapped, (\d+) unmapped", log)
    assert m, "faytd did not log its fast path's counts:\n" + log[-2000:]
    return tuple(int(x) for x in m.groups())


def journal_objects(d, prefix):
    """The object names of every share-point record whose identifier starts with prefix."""
    with open(os.path.join(os.path.dirname(d.socket), "faytd.journal")) as f:
        return {ln.split()[7] for ln in f.read().splitlines()
                if ln.startswith("S ") and bytes.fromhex(ln.split()[9]).startswith(prefix.encode())}


def test_fastpath_serves_create_and_the_creators_destroy(fresh_faytd, conn_to):
    d = fresh_faytd()
    c = conn_to(d)
    for i in range(50):
        sp = libportal.share_create("fast-%d" % i, 4096, connection=c)
        sp.write(0, b"x")
        sp.destroy()
    counts = stats(d, c)
    c.close()
    # The first create of a context is Python's: it checks the calling thread
    # once; from then on the fast path knows it.  Every destroy is the C
    # path's, that first share-point's too: the core owns it, whichever path
    # made it.
    assert (counts["fast_path"]["sharepoints_created"],
            counts["fast_path"]["sharepoints_destroyed"]) == (49, 50)
    assert counts["calls"]["portal"] == {"fast": 49, "python": 1}
    assert counts["calls"]["unmap_destroy"] == {"fast": 50, "python": 0}
    assert counts["calls"]["hello"] == {"fast": 0, "python": 2}     # c's, and fayt's own
    # The log line at a clean stop says the same.
    assert log_counts(d.stop())[:2] == (49, 50)


def _scenario(conn, tag):
    """What a client sees of create, errors and destroy; comparable across faytds."""
    seen = []
    a = libportal.share_create(tag + "-a", 3 * 4096 + 5, libportal.PROT_READ, connection=conn)
    seen.append(("a", a.map_length, a.data_offset, a.length, a.prot, len(a.paddr), a.created,
                 meta_bytes(a)[:meta_size(0)]))
    m = ffi.cast("struct fayt_sharepoint_meta *", a.base)
    seen.append(("a paddr", [m.morphology.paddr[i] for i in range(len(a.paddr))] == list(a.paddr)))
    for bad in [dict(identifier=tag + "-a", length=4096),          # exists
                dict(identifier="", length=4096),                  # empty
                dict(identifier=b"\xff\xfe", length=4096),         # not UTF-8
                dict(identifier=tag + "-z", length=0)]:            # no length
        try:
            libportal.share_create(bad["identifier"], bad["length"], connection=conn)
            seen.append(("no error", bad))
        except OSError as e:
            seen.append((e.errno, str(e).replace(tag, "T")))
    p = libportal.portal(libportal.ANON, libportal.PROT_READ, 3 * 4096 - 1, connection=conn)
    seen.append(("anon", p.length, p.prot, len(p.paddr), bytes(p.buf[:16]), p.buf.readonly))
    p.unmap()
    b = libportal.share_create(tag + "-b", 4096, connection=conn)
    b.write(0, b"hello")
    other = libportal.share_attach(tag + "-b", connection=conn)
    seen.append(("attach", other.read(0, 5), other.sp_id == b.sp_id))
    listed = {k.replace(tag, "T"): (v["size"], v["prot"], v["nframes"], len(v["captured"]))
              for k, v in list_share(conn).items() if k.startswith(tag)}
    seen.append(("list", sorted(listed.items())))
    other.unmap()
    b.destroy()
    a.destroy()
    try:
        libportal.share_attach(tag + "-a", connection=conn)
        seen.append("attached a destroyed share-point")
    except libportal.NotFound as e:
        seen.append(("gone", e.errno))
    return seen


def test_fastpath_and_python_path_agree(fresh_faytd, conn_to):
    fast = fresh_faytd()
    slow = fresh_faytd(config={"fast_syscalls": False})
    c1, c2 = conn_to(fast), conn_to(slow)
    # One call each first: the fast path takes a context's calls once its thread is known.
    libportal.share_create("warm", 4096, connection=c1).destroy()
    libportal.share_create("warm", 4096, connection=c2).destroy()
    assert _scenario(c1, "agree") == _scenario(c2, "agree")
    assert fast_counts(fast, c1)[0] >= 1      # b (a: pages, not PROT_WRITE: Python's)
    off = stats(slow, c2)
    assert off["fast_path"]["enabled"] is False
    assert fast_counts(slow) == (0, 0)
    assert all(c["fast"] == 0 for c in off["calls"].values())
    assert off["calls"]["portal"]["python"] >= 8
    c1.close()
    c2.close()


def test_fastpath_recycles_an_object_for_its_own_context_only(fresh_faytd, conn_to):
    d = fresh_faytd()
    c, other = conn_to(d), conn_to(d)
    libportal.share_create("warm", 4096, connection=c).destroy()
    a = libportal.share_create("r-a", 4096, connection=c)
    a.write(0, b"secret" * 100)
    a_ino = a._ino
    a.destroy()
    # The same context, the same size: the same object, all zeros again
    # (data and a fresh meta-structure), with a new id and frames.
    b = libportal.share_create("r-b", 4096, connection=c)
    assert b._ino == a_ino
    assert b.read(0, b.length) == bytes(b.length)
    m = ffi.cast("struct fayt_sharepoint_meta *", b.base)
    assert m.lock == b"\0" and m.prot == libportal.PROT_RW and m.length == b.length
    assert m.morphology.paddr[0] == b.paddr[0]
    assert b.sp_id != a.sp_id
    b_ino = b._ino
    b.destroy()
    # Another context never gets it.
    e = libportal.share_create("r-e", 4096, connection=other)
    assert e._ino != b_ino
    e.destroy()
    # Another size does not take it either.
    f = libportal.share_create("r-f", 2 * 4096, connection=c)
    assert f._ino != b_ino
    f.destroy()
    # An object another context mapped is never kept: it goes.
    g = libportal.share_create("r-g", 4096, connection=c)
    g_ino = g._ino
    seen = libportal.share_attach("r-g", connection=other)
    seen.unmap()
    g.destroy()
    h = libportal.share_create("r-h", 4096, connection=c)
    assert h._ino not in (g_ino,)
    h.destroy()
    c.close()
    other.close()
    d.stop()


def test_fastpath_recycled_object_is_what_the_journal_names(fresh_faytd, conn_to, tmp_path):
    d = fresh_faytd()
    c = conn_to(d)
    libportal.share_create("warm", 4096, connection=c).destroy()
    a = libportal.share_create("j-a", 4096, connection=c)
    a.destroy()
    b = libportal.share_create("j-b", 4096, connection=c)
    b.write(0, b"kept")
    journal = os.path.join(os.path.dirname(d.socket), "faytd.journal")
    with open(journal) as f:
        lines = f.read().splitlines()
    s_lines = [ln.split() for ln in lines if ln.startswith("S ")]
    by_id = {int(f[1]): f for f in s_lines}
    assert "D %d" % a.sp_id in lines
    # S <id> <pid> <start> <uid> <prot> <length> <object> <frames> <identifier hex>
    rec = by_id[b.sp_id]
    assert rec[2] == str(os.getpid()) and rec[5] == str(libportal.PROT_RW)
    assert rec[6] == "4096" and bytes.fromhex(rec[9]) == b"j-b"
    assert rec[7] == by_id[a.sp_id][7]      # one object, named again for its new share-point
    assert os.stat(rec[7]).st_ino == b._ino
    frame = (b.paddr[0] - 0x100000) // 4096
    assert rec[8] == str(frame)
    b.destroy()
    c.close()
    d.stop()


def _mapped(addr):
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


def _portals_are_not_in_a_fork_childs_address_space():
    sp = libportal.share_create("fork-maps-%d" % os.getpid(), 4096)
    anon = libportal.portal(libportal.ANON, libportal.PROT_RW, 4096)
    try:
        assert _mapped(sp.base) and _mapped(anon.addr)
        got = in_fork_child(lambda: [_mapped(sp.base), _mapped(anon.addr)])
        assert got == [False, False]
        assert _mapped(sp.base) and _mapped(anon.addr)
    finally:
        anon.unmap()
        sp.destroy()


def test_fastpath_portals_are_not_in_a_fork_childs_address_space(lp, faytd):
    """About fork() itself: the body runs in a single-threaded child."""
    call_in_child(_portals_are_not_in_a_fork_childs_address_space)


def test_fastpath_share_points_it_made_are_everyones_at_once(fresh_faytd, conn_to):
    d = fresh_faytd()
    c = conn_to(d)
    libportal.share_create("warm", 4096, connection=c).destroy()
    sp = libportal.share_create("everyone", 4096, connection=c)
    sp.write(0, b"made in C")
    child = Child("""
        sp = lp.share_attach("everyone")
        print(sp.read(0, 9).decode(), sp.sp_id)
        """, d.env())
    try:
        assert child.expect() == "made in C %d" % sp.sp_id
        child.finish()
    finally:
        child.kill()
    entry = list_share(c)["everyone"]
    assert entry["owner"] == os.getpid() and entry["id"] == sp.sp_id
    assert entry["captured"] and all(pid == os.getpid() for pid, _ in entry["captured"])
    sp.destroy()
    assert fast_counts(d, c)[0] == 1        # "everyone" (the first create is Python's)
    c.close()


def test_fastpath_owner_killed_with_share_points_only_c_knew(fresh_faytd, conn_to):
    d = fresh_faytd()
    probe = conn_to(d)
    child = Child("""
        lp.share_create("k-warm", 4096).destroy()
        made = [lp.share_create("k-%d" % i, 4096) for i in range(20)]
        made[3].write(0, b"x")
        assert made[3].lock() == 0
        print("ready", flush=True)
        sys.stdin.readline()
        """, d.env())
    try:
        assert child.expect() == "ready"
        wait_until(lambda: len(journal_objects(d, "k-")) >= 20, "the creates' records")
        # (k-warm's object, closed already, may be a pool object's number now.)
        objects = journal_objects(d, "k-") - journal_objects(d, "k-warm")
        inodes = {os.stat(o).st_ino for o in objects if os.path.exists(o)}
        os.kill(child.pid, signal.SIGKILL)
        child.proc.wait(WAIT)
        # Its share-points were unmapped by its death and ownerless: reclaimed.
        wait_until(lambda: not any(k.startswith("k-") for k in list_share(probe)),
                   "the dead owner's share-points to be reclaimed")
        with pytest.raises(libportal.NotFound):
            libportal.share_attach("k-3", connection=probe)
        # Their objects go too (none is kept: their context is gone).
        assert len(objects) >= 19 and len(inodes) == len(objects)

        def gone():
            left = set()
            for o in objects:
                try:
                    left.add(os.stat(o).st_ino)
                except OSError:
                    pass
            return not (left & inodes)
        wait_until(gone, "the dead owner's objects to be closed")
        sp = libportal.share_create("k-3", 4096, connection=probe)   # the name is free
        sp.destroy()
    finally:
        child.kill()
    assert fast_counts(d, probe)[0] >= 20
    probe.close()
    log = d.stop()
    assert "error" not in log.lower(), log


def test_fastpath_large_share_points_the_same_way(fresh_faytd, conn_to):
    """Small or large, the C path serves the call (the core's create), and
    writes a meta-structure that spans page 0's object and the rest's (a
    share-point of more than one page is two: see test_objects.py)."""
    d = fresh_faytd(ram="64MiB")
    c = conn_to(d)
    libportal.share_create("warm", 4096, connection=c).destroy()
    for name, frames in (("small", 1024), ("big", 1025)):
        sp = libportal.share_create(name, frames * 4096, connection=c)
        assert len(sp.paddr) == frames == sp.map_length // 4096
        head, paddr = read_meta(meta_bytes(sp))
        assert head[3] == sp.map_length                 # morphology.length
        assert paddr == list(sp.paddr)
        sp.write(sp.length - 4, b"last")
        assert sp.read(sp.length - 4, 4) == b"last"
        sp.destroy()
    assert fast_counts(d, c) == (2, 3)      # both (and the warm-up's destroy)
    c.close()


def test_fastpath_quotas_refuse_as_python_does(fresh_faytd, conn_to):
    d = fresh_faytd(config={"max_mappings_per_context": 3, "max_sharepoints": 5,
                            "max_ram_per_context": 3 * 4096})
    c = conn_to(d)
    libportal.share_create("warm", 4096, connection=c).destroy()
    a = libportal.share_create("q-a", 4096, connection=c)
    b = libportal.share_create("q-b", 4096, connection=c)
    with pytest.raises(libportal.OutOfMemory) as e:
        libportal.share_create("q-c", 2 * 4096, connection=c)
    assert "RAM quota" in str(e.value)
    cc = libportal.share_create("q-c", 4096, connection=c)
    with pytest.raises(libportal.OutOfMemory) as e:
        libportal.share_create("q-d", 4096, connection=c)
    assert e.value.errno == errno.ENOMEM
    for sp in (a, b, cc):
        sp.destroy()
    c.close()
    d.stop()


@pytest.mark.forks_with_threads      # what it tests: another thread forks meanwhile
def test_fastpath_no_fork_child_inherits_a_share_points_fd(fresh_faytd, conn_to):
    """The fd of a portal's object exists in the client only inside the C call
    that reads the reply, maps it and closes it, the GIL held: a thread that
    forks meanwhile never hands it to a child (with recycling, that fd would
    show the parent's later share-points).  Before, a child caught one within
    a few dozen creates; this creates and destroys until 300 forks are done."""
    import sys
    import threading
    d = fresh_faytd()
    c = conn_to(d)
    libportal.share_create("warm", 4096, connection=c).destroy()
    pool_object = re.compile(r"/memfd:fayt \(deleted\)$")
    caught, forks, stop = [], [0], threading.Event()
    r, w = os.pipe()

    def forker():
        while not stop.is_set():
            pid = os.fork()
            if pid == 0:
                held = b"0"
                for f in os.listdir("/proc/self/fd"):
                    try:
                        if pool_object.match(os.readlink("/proc/self/fd/" + f)):
                            held = b"1"
                    except OSError:
                        pass
                os.write(w, held)
                os._exit(0)
            got = os.read(r, 1)
            wait_child_exit(pid)
            forks[0] += 1
            if got == b"1":
                caught.append(pid)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)         # switch threads as often as Python can
    t = threading.Thread(target=forker)
    t.start()
    i, deadline = 0, time.monotonic() + 20
    try:
        while forks[0] < 300 and time.monotonic() < deadline:
            sp = libportal.share_create("fw-%d" % i, 4096, connection=c)
            sp.write(0, b"data")
            sp.destroy()
            i += 1
    finally:
        stop.set()
        t.join(WAIT)
        sys.setswitchinterval(old)
        os.close(r)
        os.close(w)
    assert forks[0] >= 100, "the forking thread hardly ran: %d forks" % forks[0]
    assert caught == [], "%d of %d fork children held a share-point's fd (%d creates)" % (
        len(caught), forks[0], i)
    assert fast_counts(d, c)[0] >= i - 1
    c.close()


def test_fastpath_a_request_read_ahead_is_never_performed_for_another_context(fresh_faytd):
    """faytd's C wait reads a request, and Python handles the batch's events
    in order: the connection's process may have died (its pidfd came first,
    the socket is closed) and a new connection accepted on the same fd number
    before Python reaches the request.  It was the dead context's: it is
    dropped, never performed for the newcomer.  A fork child keeps its dead
    parent's socket and sends on it while faytd is stopped (SIGSTOP), so all
    three events wait in one batch."""
    import subprocess
    import sys
    import textwrap
    d = fresh_faytd()
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, socket, sys, time
        from libportal._abi import lib, REQ_HDR, HELLO_REQ
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(sys.argv[1])
        r, w = os.pipe()
        if os.fork() == 0:              # keeps its parent's connection
            os.close(w)
            os.read(r, 1)
            s.send(REQ_HDR.pack(lib.FAYT_REQ_MAGIC, lib.FAYT_SYS_HELLO, 0, 999, os.getpid())
                   + HELLO_REQ.pack(lib.FAYT_WIRE_ABI, 0))
            time.sleep(5)
            os._exit(0)
        os.close(r)
        print(os.getpid(), w, flush=True)
        sys.stdin.readline()
        """), d.socket], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=d.env())
    newcomer = None
    stopped = False
    try:
        pid, wfd = (int(x) for x in parent.stdout.readline().split())
        go = os.open("/proc/%d/fd/%d" % (pid, wfd), os.O_WRONLY)
        wait_until(lambda: "context" in open(d.log).read(), "faytd to accept the first connection")
        os.kill(d.proc.pid, signal.SIGSTOP)
        stopped = True
        parent.stdin.close()
        parent.wait(WAIT)               # 1: its pidfd is readable
        newcomer = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
            import sys, libportal
            c = libportal.Connection(sys.argv[1])
            print("ok", c.context_id, flush=True)
            """), d.socket], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=d.env())
        time.sleep(0.5)                 # 2: the newcomer's connect waits in the backlog
        os.write(go, b"g")              # 3: the child's HELLO on the dead parent's socket
        os.close(go)
        time.sleep(0.3)
        os.kill(d.proc.pid, signal.SIGCONT)
        stopped = False
        out, err = newcomer.communicate(timeout=WAIT)
        assert out.startswith("ok "), "the newcomer's HELLO failed:\n" + err
    finally:
        if stopped:
            os.kill(d.proc.pid, signal.SIGCONT)
        for p in (parent, newcomer):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(WAIT)
    log = d.stop()
    assert "error" not in log.lower(), log


def test_fastpath_deferred_work_that_fails_is_retried_now_and_then(fresh_faytd, conn_to):
    """The journal's compaction (deferred work) fails when its new file cannot
    be made; faytd goes on serving and tries again about once a second, it
    does not spin on it (before: 130,000 warnings in 2 s, a whole CPU)."""
    d = fresh_faytd()
    state = os.path.dirname(d.socket)
    blocker = os.path.join(state, "faytd.journal.new")
    os.mkdir(blocker)                   # the compaction's temporary file cannot be made
    c = conn_to(d)
    try:
        for i in range(2200):           # 4,400 journal records, 0 live: compaction wanted
            libportal.share_create("idle-%d" % i, 4096, connection=c).destroy()
        c.list_sharepoints()
        time.sleep(2)
        sp = libportal.share_create("still-serving", 4096, connection=c)
        sp.destroy()
    finally:
        os.rmdir(blocker)
    c.close()
    log = d.stop()
    failed = [ln for ln in log.splitlines() if "idle work" in ln]
    assert 1 <= len(failed) <= 10, "%d failed tries logged:\n%s" % (len(failed), "\n".join(failed[:5]))


def test_fastpath_recycling_can_be_turned_off(fresh_faytd, conn_to):
    d = fresh_faytd(config={"recycle_objects": False})
    c = conn_to(d)
    libportal.share_create("warm", 4096, connection=c).destroy()
    a = libportal.share_create("off-a", 4096, connection=c)
    a_ino = a._ino
    a.destroy()
    b = libportal.share_create("off-b", 4096, connection=c)
    assert b._ino != a_ino
    b.destroy()
    assert fast_counts(d, c) == (2, 3)      # the fast path, without recycling
    c.close()


def _inode_at(addr):
    with open("/proc/self/maps") as f:
        for line in f:
            if int(line[:line.index("-")], 16) == addr:
                return int(line.split()[4])
    raise AssertionError("nothing mapped at %#x" % addr)


def test_fastpath_anon_portals_and_their_recycling(fresh_faytd, conn_to):
    d = fresh_faytd()
    c, other = conn_to(d), conn_to(d)
    libportal.portal(libportal.ANON, libportal.PROT_RW, 4096, connection=c).unmap()
    libportal.portal(libportal.ANON, libportal.PROT_RW, 4096, connection=other).unmap()
    free0 = c.list_contexts()["free_frames"]
    a = libportal.portal(libportal.ANON, libportal.PROT_RW, 8192, connection=c)
    a.buf[:] = b"\xab" * 8192
    a_ino = _inode_at(a.addr)
    a.unmap()
    # Its own context's next ANON portal of that size: the same object, zeros again.
    b = libportal.portal(libportal.ANON, libportal.PROT_RW, 8192, connection=c)
    assert _inode_at(b.addr) == a_ino
    assert bytes(b.buf) == bytes(8192)
    b_ino = _inode_at(b.addr)
    b.unmap()
    e = libportal.portal(libportal.ANON, libportal.PROT_RW, 8192, connection=other)
    assert _inode_at(e.addr) != b_ino         # never another context's
    e.unmap()
    # A big one is zeroed by punching its pages out when kept.
    big = libportal.portal(libportal.ANON, libportal.PROT_RW, 64 * 4096, connection=c)
    big.buf[-4:] = b"last"
    big_ino = _inode_at(big.addr)
    big.unmap()
    again = libportal.portal(libportal.ANON, libportal.PROT_RW, 64 * 4096, connection=c)
    assert _inode_at(again.addr) == big_ino and bytes(again.buf[-4:]) == bytes(4)
    # Taken over by Python (a list is a Python call), then unmapped through Python.
    assert c.list_contexts()["free_frames"] == free0 - 64
    again.unmap()
    assert c.list_contexts()["free_frames"] == free0
    mapped, unmapped = anon_counts(d, c, other)
    c.close()
    other.close()
    assert mapped >= 5 and unmapped >= 4


def test_fastpath_anon_quota_refuses_as_python_does(fresh_faytd, conn_to):
    d = fresh_faytd(config={"max_ram_per_context": 4 * 4096})
    c = conn_to(d)
    libportal.portal(libportal.ANON, libportal.PROT_RW, 4096, connection=c).unmap()
    p = libportal.portal(libportal.ANON, libportal.PROT_RW, 3 * 4096, connection=c)
    with pytest.raises(libportal.OutOfMemory) as e:
        libportal.portal(libportal.ANON, libportal.PROT_RW, 2 * 4096, connection=c)
    assert "RAM quota" in str(e.value)
    q = libportal.portal(libportal.ANON, libportal.PROT_RW, 4096, connection=c)
    q.unmap()
    p.unmap()
    assert anon_counts(d, c)[0] >= 2
    c.close()


def test_fastpath_serves_attach_and_unmap_of_any_share_point(fresh_faytd, conn_to):
    """The core owns every share-point: an attach of one Python made (the
    first create of a context is Python's) and its unmap are the C path's."""
    d = fresh_faytd()
    c = conn_to(d)
    made = libportal.share_create("attach-me", 4096, connection=c)     # Python's (first call)
    made.write(0, b"hello")
    for _ in range(20):
        sp = libportal.share_attach("attach-me", connection=c)
        assert sp.read(0, 5) == b"hello" and sp.sp_id == made.sp_id
        sp.unmap()
    made.destroy()
    attached, unmapped = attach_counts(d, c)
    assert attached == 20 and unmapped == 21        # the destroy's unmap too
    assert fast_counts(d) == (0, 1)
    c.close()
