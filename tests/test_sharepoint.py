"""Share-points between real processes, against a real faytd.

Each helper process is `python -c CODE` with FAYT_SOCKET pointing at the
daemon; it talks to the test over its stdin/stdout, one line at a time, and
every wait for a line, a state or an exit is bounded so that a broken lock
fails a test instead of hanging the suite.  Every test destroys what it
creates (the `names` fixture destroys what a failed test left behind).
"""
import errno
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

import libportal
from libportal._abi import ffi, lib
from support.children import PRELUDE, WAIT, sleeping_on_futex, wait_until
from support.daemon import SERVER_GID, SERVER_GID_CONFIG
from support.layout import list_share, lock_state, meta_bytes, read_meta, records_of
from support.procs import call_in_child, in_fork_child


@pytest.fixture
def names(lp):
    """names(tag) -> a fresh identifier; whatever is left of them is destroyed."""
    made = []

    def make(tag):
        n = "t-sp-%s-%s" % (tag, uuid.uuid4().hex[:10])
        made.append(n)
        return n

    yield make
    for n in made:
        try:
            lp.share_attach(n, lp.PROT_NONE).destroy()
        except libportal.NotFound:
            pass


N, M = 4, 5000


# -- mutual exclusion between processes ---------------------------------------

def test_sharepoint_explicit_lock_serialises_processes(lp, spawn, names):
    name = names("count")
    sp = lp.share_create(name, 4096)
    try:
        kids = [spawn("""
            sp = lp.share_attach(%r)
            v = sp.view()
            print("ready")
            sys.stdin.readline()
            bad = 0
            for _ in range(%d):
                if sp.lock() != 0:
                    bad += 1
                n, = struct.unpack_from("<q", v, 0)
                struct.pack_into("<q", v, 0, n + 1)
                sp.unlock()
            v.release()
            print("done", bad)
            """ % (name, M)) for _ in range(N)]
        for k in kids:
            assert k.expect() == "ready"
        for k in kids:
            k.send("go")
        for k in kids:
            assert k.expect(timeout=120) == "done 0"
            k.finish()
        assert struct.unpack("<q", sp.read(0, 8)) == (N * M,)
        assert sp.lock_state == lib.FAYT_LOCK_FREE
    finally:
        sp.destroy()


def test_sharepoint_fused_add_serialises_processes(lp, spawn, names):
    name = names("add")
    sp = lp.share_create(name, 4096)
    try:
        kids = [spawn("""
            sp = lp.share_attach(%r)
            print("ready")
            sys.stdin.readline()
            last, backwards = -1, 0
            for _ in range(%d):
                v = sp.add(0, 1)
                if v <= last:
                    backwards += 1
                last = v
            print("done", backwards)
            """ % (name, M)) for _ in range(N)]
        for k in kids:
            assert k.expect() == "ready"
        for k in kids:
            k.send("go")
        for k in kids:
            assert k.expect(timeout=120) == "done 0"
            k.finish()
        assert sp.add(0, 0) == N * M
        assert struct.unpack("<q", sp.read(0, 8)) == (N * M,)
        assert sp.lock_state == lib.FAYT_LOCK_FREE
    finally:
        sp.destroy()


def test_sharepoint_data_written_by_one_process_is_read_by_another(lp, spawn, names):
    name = names("data")
    sp = lp.share_create(name, 3 * 4096)
    payload = bytes(range(256)) * 4 + b"the end"
    off = 4096 - 100          # crosses a frame boundary in the data
    try:
        w = spawn("""
            sp = lp.share_attach(%r)
            sp.write(%d, bytes.fromhex(sys.stdin.readline().strip()))
            print("written")
            """ % (name, off))
        w.send(payload.hex())
        assert w.expect() == "written"
        w.finish()
        r = spawn("""
            sp = lp.share_attach(%r, lp.PROT_READ)
            print(sp.read(%d, %d).hex())
            """ % (name, off, len(payload)))
        assert bytes.fromhex(r.expect()) == payload
        r.finish()
        assert sp.read(off, len(payload)) == payload
        assert bytes(sp.view()[off:off + len(payload)]) == payload
    finally:
        sp.destroy()


# -- a holder that dies -------------------------------------------------------

def test_sharepoint_killed_holder_gives_next_locker_owner_died(lp, spawn, names):
    name = names("dead")
    sp = lp.share_create(name, 4096)
    try:
        sp.write(0, struct.pack("<q", 40))
        holder = spawn("""
            sp = lp.share_attach(%r)
            assert sp.lock() == 0
            struct.pack_into("<q", sp.view(), 0, 41)     # an update left half done
            print("locked")
            time.sleep(120)
            """ % name)
        assert holder.expect() == "locked"
        assert lock_state(sp) == lib.FAYT_LOCK_HELD
        holder.kill()

        # The next locker is told, and holds the lock to repair the data.
        assert sp.lock(WAIT) == errno.EOWNERDEAD
        assert sp.held and sp.owner_died
        assert struct.unpack("<q", bytes(sp.view()[0:8])) == (41,)
        sp.unlock()                        # not repaired: the mark stays
        assert sp.owner_died
        assert lock_state(sp) == lib.FAYT_LOCK_FREE

        # A fused access refuses the inconsistent data and leaves the lock free.
        for call in (lambda: sp.read(0, 8), lambda: sp.write(0, b"x"), lambda: sp.add(0, 1)):
            with pytest.raises(libportal.OwnerDied) as ei:
                call()
            assert ei.value.errno == errno.EOWNERDEAD
            assert not sp.held
            assert lock_state(sp) == lib.FAYT_LOCK_FREE
        assert records_of(sp.connection, sp.sp_id) == []
        with pytest.raises(libportal.OwnerDied):
            with sp:
                pass
        assert not sp.held

        # Repair, mark consistent: everything is normal again.
        assert sp.lock(WAIT) == errno.EOWNERDEAD
        struct.pack_into("<q", sp.view(), 0, 100)
        sp.mark_consistent()
        assert not sp.owner_died
        sp.unlock()
        assert sp.lock_state == lib.FAYT_LOCK_FREE
        assert sp.add(0, 1) == 101
        assert sp.lock() == 0
        sp.unlock()
        with sp:
            assert struct.unpack("<q", bytes(sp.view()[0:8])) == (101,)
        other = spawn("""
            sp = lp.share_attach(%r)
            r, died = sp.lock(), sp.owner_died
            sp.unlock()
            print(r, died, sp.add(0, 1))
            """ % name)
        assert other.expect() == "0 False 102"
        other.finish()
    finally:
        sp.destroy()


def test_sharepoint_killed_holder_wakes_a_sleeping_waiter_with_owner_died(lp, spawn, names):
    name = names("wake")
    sp = lp.share_create(name, 4096)
    try:
        holder = spawn("""
            sp = lp.share_attach(%r)
            assert sp.lock() == 0
            print("locked")
            time.sleep(120)
            """ % name)
        assert holder.expect() == "locked"
        waiter = spawn("""
            sp = lp.share_attach(%r)
            print("waiting")
            try:
                r = sp.lock(%r)
            except lp.TimedOut:
                print("timed out")
                raise SystemExit(1)
            print(r, sp.owner_died)
            sp.mark_consistent()
            sp.unlock()
            print("released")
            """ % (name, WAIT))
        assert waiter.expect() == "waiting"
        # It announced itself (contended) and sleeps on the futex.
        wait_until(lambda: lock_state(sp) == lib.FAYT_LOCK_CONTENDED and
                   sleeping_on_futex(waiter.pid), "the waiter to sleep on the futex")
        holder.kill()
        assert waiter.expect() == "%d True" % errno.EOWNERDEAD
        assert waiter.expect() == "released"
        waiter.finish()
        assert sp.lock_state == lib.FAYT_LOCK_FREE
        assert not sp.owner_died
        assert sp.lock(WAIT) == 0
        sp.unlock()
    finally:
        sp.destroy()


def test_sharepoint_killed_holder_of_a_destroyed_share_point_is_recovered(lp, spawn, names):
    name = names("destroyed-dead")
    sp = lp.share_create(name, 4096)
    holder = spawn("""
        sp = lp.share_attach(%r)
        assert sp.lock() == 0
        print("locked")
        time.sleep(120)
        """ % name)
    try:
        assert holder.expect() == "locked"
        waiter = spawn("""
            sp = lp.share_attach(%r)
            print("attached")
            sys.stdin.readline()
            try:
                print(sp.lock(5))
            except lp.TimedOut:
                print("timed out")
            """ % name)
        assert waiter.expect() == "attached"
    finally:
        sp.destroy()                 # the identifier goes; both still map it
    waiter.send("go")
    holder.kill()
    assert waiter.expect() == str(errno.EOWNERDEAD)
    waiter.finish()


# -- timeouts and try_lock ----------------------------------------------------

def test_sharepoint_lock_timeout_and_try_lock_on_a_held_lock(lp, spawn, names):
    name = names("busy")
    sp = lp.share_create(name, 4096)
    try:
        holder = spawn("""
            sp = lp.share_attach(%r)
            assert sp.lock() == 0
            print("locked")
            sys.stdin.readline()
            sp.unlock()
            print("unlocked")
            """ % name)
        assert holder.expect() == "locked"
        t0 = time.monotonic()
        with pytest.raises(libportal.TimedOut) as ei:
            sp.lock(0.2)
        took = time.monotonic() - t0
        assert ei.value.errno == errno.ETIMEDOUT
        assert 0.2 <= took < 5.0
        assert not sp.held
        assert sp.try_lock() == errno.EBUSY
        assert not sp.held
        with pytest.raises(libportal.TimedOut):
            sp.lock(0)
        # A failed attempt leaves no robust record behind (faytd would
        # otherwise think this process holds the lock).
        assert records_of(sp.connection, sp.sp_id) == []
        assert lock_state(sp) in (lib.FAYT_LOCK_HELD, lib.FAYT_LOCK_CONTENDED)
        holder.send("go")
        assert holder.expect() == "unlocked"
        holder.finish()
        assert sp.try_lock() == 0
        assert sp.held
        assert records_of(sp.connection, sp.sp_id) == [lib.FAYT_HELD_HELD]
        sp.unlock()
        assert records_of(sp.connection, sp.sp_id) == []
        assert sp.lock(0.2) == 0
        sp.unlock()
    finally:
        sp.destroy()


def test_sharepoint_lock_takes_timeout_as_a_keyword(lp, names):
    sp = lp.share_create(names("kw"), 4096)
    try:
        assert sp.lock(timeout=0.2) == 0
        sp.unlock()
    finally:
        sp.destroy()


# -- bounds, protection, misuse -----------------------------------------------

def test_sharepoint_bounds_are_checked_on_every_access(lp, names):
    sp = lp.share_create(names("bounds"), 2 * 4096)
    try:
        L = sp.length
        assert L == 2 * 4096 - sp.data_offset
        sp.write(L - 4, b"abcd")
        assert sp.read(L - 4, 4) == b"abcd"
        assert sp.read(L, 0) == b""
        assert len(sp.read(0, L)) == L
        bad = [lambda: sp.read(L - 4, 8), lambda: sp.read(L, 1), lambda: sp.read(-1, 1),
               lambda: sp.read(0, L + 1), lambda: sp.read(0, -1), lambda: sp.read(L + 4096, 1),
               lambda: sp.write(L - 1, b"ab"), lambda: sp.write(L, b"a"),
               lambda: sp.write(-8, b"a"), lambda: sp.add(L - 4, 1), lambda: sp.add(L, 1),
               lambda: sp.add(-1, 1)]
        for call in bad:
            with pytest.raises(libportal.InvalidArgument) as ei:
                call()
            assert ei.value.errno == errno.EINVAL
            assert not sp.held and sp.lock_state == lib.FAYT_LOCK_FREE
        assert sp.read(L - 4, 4) == b"abcd"        # nothing was written
        assert sp.add(L - 8, 0) == struct.unpack("<q", sp.read(L - 8, 8))[0]
        assert len(sp.view()) == L
    finally:
        sp.destroy()


def test_sharepoint_add_at_an_offset_not_naturally_aligned_is_invalid(lp, names):
    """add() works on a native int64: at an offset that is not a multiple
    of 8 it is EINVAL naming the offset, and nothing is written (before: an
    unaligned int64 was read and written without a word)."""
    sp = lp.share_create(names("align"), 4096)
    try:
        sp.write(0, bytes(range(24)))
        for off in (1, 4, 7, 12, 20):
            with pytest.raises(libportal.InvalidArgument) as ei:
                sp.add(off, 1)
            assert ei.value.errno == errno.EINVAL
            assert "offset %d" % off in str(ei.value)
            assert not sp.held and sp.lock_state == lib.FAYT_LOCK_FREE
        assert sp.read(0, 24) == bytes(range(24))
        assert sp.add(8, 0) == struct.unpack("<q", bytes(range(8, 16)))[0]
        assert sp.add(16, 1) == struct.unpack("<q", bytes(range(16, 24)))[0] + 1
    finally:
        sp.destroy()


def test_sharepoint_prot_read_attach_refuses_writes(lp, names):
    name = names("ro")
    sp = lp.share_create(name, 4096)
    sp.write(0, b"secret")
    ro = lp.share_attach(name, lp.PROT_READ)
    try:
        assert ro.prot == lp.PROT_READ
        assert ro.read(0, 6) == b"secret"
        for call in (lambda: ro.write(0, b"x"), lambda: ro.add(0, 1)):
            with pytest.raises(libportal.PermissionDenied) as ei:
                call()
            assert ei.value.errno == errno.EACCES
            assert not ro.held and ro.lock_state == lib.FAYT_LOCK_FREE
        v = ro.view()
        assert v.readonly
        with pytest.raises(TypeError):
            v[0:1] = b"x"
        assert bytes(v[0:6]) == b"secret"
        v.release()                         # a live view would make unmap() a BufferError
        assert not sp.view().readonly
        # The read-only mapping still takes the lock (readers serialise too).
        assert ro.lock() == 0
        assert sp.try_lock() == errno.EBUSY
        ro.unlock()
        assert sp.read(0, 6) == b"secret"
    finally:
        ro.unmap()
        sp.destroy()


def test_sharepoint_unlock_without_holding_and_double_lock(lp, names):
    sp = lp.share_create(names("misuse"), 4096)
    try:
        with pytest.raises(libportal.PermissionDenied) as ei:
            sp.unlock()
        assert ei.value.errno == errno.EPERM
        with pytest.raises(libportal.PermissionDenied) as ei:
            sp.mark_consistent()
        assert ei.value.errno == errno.EPERM
        assert sp.lock() == 0
        for call in (sp.lock, lambda: sp.lock(0.1), sp.try_lock, lambda: sp.read(0, 1),
                     lambda: sp.write(0, b"x"), lambda: sp.add(0, 1), sp.__enter__):
            with pytest.raises(libportal.Deadlock) as ei:
                call()
            assert ei.value.errno == errno.EDEADLK
            assert sp.held
        sp.unlock()
        assert sp.lock_state == lib.FAYT_LOCK_FREE
        with pytest.raises(libportal.PermissionDenied):
            sp.unlock()
        # Another object of the same process is another holder: it waits.
        twin = lp.share_attach(sp.identifier)
        try:
            assert sp.lock() == 0
            with pytest.raises(libportal.TimedOut):
                twin.lock(0.1)
            with pytest.raises(libportal.PermissionDenied):
                twin.unlock()
            assert sp.held and lock_state(sp) != lib.FAYT_LOCK_FREE
            sp.unlock()
        finally:
            twin.unmap()
    finally:
        sp.destroy()


# -- the meta-structure -------------------------------------------------------

@pytest.mark.parametrize("length,prot", [(1, libportal.PROT_RW), (3 * 4096 + 5, libportal.PROT_RW),
                                         (64 * 4096, libportal.PROT_READ)])
def test_sharepoint_meta_structure_bytes(lp, spawn, names, length, prot):
    name = names("meta")
    sp = lp.share_create(name, length, prot)
    try:
        nframes = -(-length // 4096)
        assert sp.map_length == nframes * 4096
        assert len(sp.paddr) == nframes
        m = ffi.cast("struct fayt_sharepoint_meta *", sp.base)
        assert m.lock == b"\0"
        assert m.prot == prot
        assert m.length == sp.length
        assert m.morphology.length == sp.map_length
        assert [m.morphology.paddr[i] for i in range(nframes)] == list(sp.paddr)
        raw = meta_bytes(sp, nframes)
        want = (len(raw) + 15) // 16 * 16
        assert sp.data_offset == want == lib.fayt_sp_data_offset(nframes)
        assert sp.length == sp.map_length - want
        assert (sp.base + sp.data_offset) % 16 == 0
        # The same bytes, read raw, at the header's packed offsets (test_abi.py
        # pins them as the specification's).
        head, paddr = read_meta(raw)
        assert head == (0, prot, sp.length, sp.map_length)
        assert paddr == list(sp.paddr)
        assert list_share()[name]["frames"] == list(sp.paddr)
        # Another process sees the same meta-structure and frames.
        other = spawn("""
            from libportal._abi import ffi
            sp = lp.share_attach(%r, lp.PROT_READ)
            m = ffi.cast("struct fayt_sharepoint_meta *", sp.base)
            n = m.morphology.length // 4096
            print(m.prot, m.length, m.morphology.length, sp.data_offset,
                  *[m.morphology.paddr[i] for i in range(n)])
            """ % name)
        assert other.expect().split() == [str(x) for x in (prot, sp.length, sp.map_length,
                                                            sp.data_offset, *sp.paddr)]
        other.finish()
        # The lock byte is the meta-structure's.
        assert sp.lock() == 0
        assert m.lock == bytes([lib.FAYT_LOCK_HELD])
        sp.unlock()
        assert m.lock == b"\0"
    finally:
        sp.destroy()


# -- lifetime -----------------------------------------------------------------

def test_sharepoint_destroy_refuses_new_attaches_but_mappers_keep_their_data(lp, spawn, names):
    name = names("destroy")
    sp = lp.share_create(name, 2 * 4096)
    sp.write(0, b"still here")
    mapper = spawn("""
        sp = lp.share_attach(%r)
        print("attached")
        sys.stdin.readline()
        print(sp.read(0, 10).decode())
        sp.write(0, b"written after")
        print(sp.read(0, 13).decode())
        sp.unmap()
        print(sp.mapped)
        """ % name)
    try:
        assert mapper.expect() == "attached"
    finally:
        sp.destroy()
    assert not sp.mapped
    for call in (lambda: sp.read(0, 1), sp.lock, sp.view, sp.destroy, sp.unmap):
        with pytest.raises(libportal.Unmapped) as ei:
            call()
        assert ei.value.errno == errno.EBADF
    with pytest.raises(libportal.NotFound) as ei:
        lp.share_attach(name)
    assert ei.value.errno == errno.ENOENT
    assert name not in list_share()
    mapper.send("go")
    assert mapper.expect() == "still here"
    assert mapper.expect() == "written after"
    assert mapper.expect() == "False"
    mapper.finish()
    # The identifier is free again.
    again = lp.share_create(name, 4096)
    assert again.read(0, 10) == bytes(10)
    again.destroy()


def test_sharepoint_destroy_is_not_answered_but_comes_before_what_it_caused(
        fresh_faytd, conn_to, spawn):
    """destroy() by the owner is sent with FAYT_REQ_NOREPLY (no round trip).
    A process told of the destroy must still find the name gone, even when
    faytd reads its create before the destroy: faytd performs what other
    connections already sent before answering for a name that exists.

    Made deterministic with SIGSTOP: while faytd is stopped, this process
    queues an unmap and then two destroys (NOREPLY calls) and only then tells
    the children, whose create/attach/list are queued after.  epoll reports
    this connection first, but faytd reads one request per connection per
    turn: without the catch-up it would perform the unmap, then the
    children's calls, and only then the destroys."""
    d = fresh_faytd()
    me = conn_to(d)
    for attempt in range(3):
        recreated, vanished = "again-%d" % attempt, "gone-%d" % attempt
        sps = [libportal.share_create(n, 4096, connection=me) for n in (recreated, vanished)]
        for sp in sps:
            sp.write(0, b"old")
        other = libportal.portal(libportal.ANON, libportal.PROT_RW, 4096, connection=me)
        creator = spawn("""
            c = lp.Connection()
            print("ready", flush=True)
            sys.stdin.readline()
            print("calling", flush=True)
            try:
                sp = lp.share_create(%r, 4096, connection=c)
                print("created", sp.read(0, 3))
                sp.destroy()
            except OSError as e:
                print("failed", errno.errorcode.get(e.errno), e)
            """ % recreated, env=d.env())
        attacher = spawn("""
            c = lp.Connection()
            print("ready", flush=True)
            sys.stdin.readline()
            print("calling", flush=True)
            try:
                lp.share_attach(%r, connection=c)
                print("attached")
            except lp.NotFound as e:
                print("gone", errno.errorcode.get(e.errno))
            print(sorted(s["identifier"] for s in c.list_sharepoints()))
            """ % vanished, env=d.env())
        assert creator.expect() == "ready" and attacher.expect() == "ready"
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            other.unmap()
            for sp in sps:
                sp.destroy()                # returns with faytd stopped: nothing waited
                assert not sp.mapped
            attacher.send("go")
            assert attacher.expect() == "calling"
            creator.send("go")
            assert creator.expect() == "calling"
            time.sleep(0.3)                 # their requests are in faytd's queues
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        assert creator.expect() == "created %r" % bytes(3)
        assert attacher.expect() == "gone ENOENT"
        assert vanished not in attacher.expect()
        creator.finish()
        attacher.finish()
    assert me.list_sharepoints() == []


def test_sharepoint_catch_up_nests_so_order_holds_through_a_third_connection(
        fresh_faytd, conn_to):
    """C's attach makes faytd catch up with B's queue, where B's attach of x
    needs A's queued destroy of x performed first: the catch-up nests.
    Queued with faytd stopped: C attach y; B unmap (NOREPLY); A destroy x
    (NOREPLY); then B attach x, sent after the destroy returned."""
    d = fresh_faytd()
    a, b, c = conn_to(d), conn_to(d), conn_to(d)
    libportal.share_create("y", 4096, connection=a)
    x = libportal.share_create("x", 4096, connection=a)
    anon = libportal.portal(libportal.ANON, libportal.PROT_RW, 4096, connection=b)
    got = {}

    def attach(name, conn, ident):
        try:
            libportal.share_attach(ident, connection=conn)
            got[name] = "attached"
        except OSError as e:
            got[name] = errno.errorcode.get(e.errno)

    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        tc = threading.Thread(target=attach, args=("C", c, "y"))
        tc.start()
        time.sleep(0.2)
        anon.unmap()
        time.sleep(0.05)
        x.destroy()
        time.sleep(0.05)
        tb = threading.Thread(target=attach, args=("B", b, "x"))
        tb.start()
        time.sleep(0.2)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    tc.join(WAIT)
    tb.join(WAIT)
    assert got == {"C": "attached", "B": "ENOENT"}


def test_sharepoint_destroy_by_a_non_owner_server_is_refused(fresh_faytd, conn_to, spawn):
    """Every test process runs as faytd's owner (core), so a private faytd with a
    policy that makes gid 4242 a plain `server` gives the non-core process."""
    d = fresh_faytd(config=SERVER_GID_CONFIG)
    core = conn_to(d)
    assert core.category == lib.FAYT_CATEGORY_CORE
    sp = libportal.share_create("guarded", 4096, connection=core)
    sp.write(0, b"keep")
    other = spawn("""
        os.setgroups([]); os.setgid(%d)
        c = lp.Connection()
        print(c.category)
        sp = lp.share_attach("guarded", connection=c)
        try:
            sp.destroy()
            print("destroyed")
        except lp.PermissionDenied as e:
            print("refused", e.errno, sp.mapped, sp.read(0, 4).decode())
        mine = lp.share_create("servers-own", 4096, connection=c)
        mine.destroy()
        print("own destroyed", mine.mapped)
        theirs = lp.share_create("servers-kept", 4096, connection=c)
        print("created")
        sys.stdin.readline()
        """ % SERVER_GID, env=d.env())
    assert other.expect() == str(lib.FAYT_CATEGORY_SERVER)
    assert other.expect() == "refused %d True keep" % errno.EPERM
    assert other.expect() == "own destroyed False"
    assert other.expect() == "created"
    table = list_share(core)
    assert set(table) == {"guarded", "servers-kept"}
    assert len(table["guarded"]["captured"]) == 2      # the refusal changed nothing
    # A core server may destroy a share-point it does not own.
    kept = libportal.share_attach("servers-kept", connection=core)
    kept.destroy()
    assert set(list_share(core)) == {"guarded"}
    other.send("go")
    other.finish()
    sp.destroy()
    assert list_share(core) == {}


def _spawn_with_pid(spawn, pid, code, env):
    """A child given pid (a dead process's): /proc/sys/kernel/ns_last_pid
    names the pid the kernel hands out next; other processes of the machine
    may take it first, so try again."""
    for _ in range(200):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        c = spawn(code, env=env)
        if c.pid == pid:
            return c
        c.kill()
    raise AssertionError("no child was given pid %d in 200 tries" % pid)


def test_sharepoint_a_dead_owners_pid_does_not_make_its_owner(fresh_faytd, conn_to, spawn):
    """The owner dies while core keeps its share-point mapped; a process
    that the kernel gives the dead owner's pid is not its owner: its
    destroy is refused (faytd compares the start time as well)."""
    d = fresh_faytd(config=SERVER_GID_CONFIG)
    core = conn_to(d)
    owner = spawn("""
        os.setgroups([]); os.setgid(%d)
        sp = lp.share_create("reused", 4096, connection=lp.Connection())
        print(os.getpid())
        sys.stdin.readline()
        """ % SERVER_GID, env=d.env())
    pid = int(owner.expect())
    kept = libportal.share_attach("reused", connection=core)
    owner.send("go")
    owner.finish()
    wait_until(lambda: not list_share(core)["reused"]["owner_alive"], "the owner's death seen")
    code = """
        os.setgroups([]); os.setgid(%d)
        sp = lp.share_attach("reused", connection=lp.Connection())
        try:
            sp.destroy()
            print("destroyed")
        except lp.PermissionDenied as e:
            print("refused", e.errno, sp.mapped)
        """ % SERVER_GID
    impostor = _spawn_with_pid(spawn, pid, code, d.env())
    assert impostor.expect() == "refused %d True" % errno.EPERM
    impostor.finish()
    assert "reused" in list_share(core)
    kept.destroy()                  # core still may
    assert list_share(core) == {}


def test_sharepoint_owner_death_reclaims_an_unmapped_share_point(lp, spawn, names):
    name = names("orphan")
    owner = spawn("""
        sp = lp.share_create(%r, 4096)
        print(os.getpid())
        sys.stdin.readline()
        """ % name)
    assert owner.expect() == str(owner.pid)
    entry = list_share()[name]
    assert entry["owner"] == owner.pid and entry["owner_alive"]
    owner.send("exit")                  # a clean exit
    owner.finish()
    wait_until(lambda: name not in list_share(), "faytd to reclaim %r" % name)
    with pytest.raises(libportal.NotFound):
        lp.share_attach(name)

    killed = spawn("""
        sp = lp.share_create(%r, 4096)
        print("created")
        time.sleep(120)
        """ % name)
    assert killed.expect() == "created"
    killed.kill()                       # SIGKILL
    wait_until(lambda: name not in list_share(), "faytd to reclaim %r" % name)


def test_sharepoint_owner_death_keeps_a_mapped_share_point_until_unmapped(lp, spawn, names):
    name = names("orphan-mapped")
    owner = spawn("""
        sp = lp.share_create(%r, 4096)
        sp.write(0, b"from the dead")
        print("created")
        time.sleep(120)
        """ % name)
    assert owner.expect() == "created"
    sp = lp.share_attach(name)
    try:
        owner.kill()
        wait_until(lambda: not list_share()[name]["owner_alive"], "faytd to see the owner die")
        entry = list_share()[name]
        assert entry["captured"] == [[os.getpid(), threading.get_native_id()]]
        assert sp.read(0, 13) == b"from the dead"
        late = lp.share_attach(name, lp.PROT_READ)     # still in the table
        assert late.read(0, 13) == b"from the dead"
        late.unmap()
        assert name in list_share()
    finally:
        sp.unmap()
    assert name not in list_share()     # the last mapping of an ownerless one
    with pytest.raises(libportal.NotFound):
        lp.share_attach(name)


def test_sharepoint_captured_threads_follow_attach_unmap_and_death(lp, spawn, names):
    name = names("captured")
    sp = lp.share_create(name, 4096)
    me = [os.getpid(), threading.get_native_id()]
    try:
        assert list_share()[name]["captured"] == [me]
        kid = spawn("""
            sp = lp.share_attach(%r)
            box = {}
            def attach():
                box["sp"] = lp.share_attach(%r)
                box["tid"] = threading.get_native_id()
            t = threading.Thread(target=attach)
            t.start(); t.join(%r)
            print(os.getpid(), threading.get_native_id(), box["tid"])
            sys.stdin.readline()
            box["sp"].unmap()
            print("unmapped")
            time.sleep(120)
            """ % (name, name, WAIT))
        pid, main_tid, other_tid = map(int, kid.expect().split())
        assert pid == kid.pid and main_tid == pid and other_tid != pid
        assert sorted(list_share()[name]["captured"]) == sorted(
            [me, [pid, main_tid], [pid, other_tid]])
        kid.send("unmap")
        assert kid.expect() == "unmapped"
        assert sorted(list_share()[name]["captured"]) == sorted([me, [pid, main_tid]])
        kid.kill()
        wait_until(lambda: list_share()[name]["captured"] == [me],
                   "faytd to drop the dead process's captured threads")
        assert list_share()[name]["owner_alive"]
    finally:
        sp.destroy()


# -- fork ---------------------------------------------------------------------
# These tests are about fork() itself: their bodies run in a child of the fork
# server (support.procs), a process with one thread, which then forks.

def _does_not_survive_fork(name):
    sp = libportal.share_create(name, 4096)
    anon = libportal.portal(libportal.ANON, libportal.PROT_RW, 4096)
    try:
        sp.write(0, b"parent")

        def child():
            seen = {"mapped": sp.mapped, "anon_mapped": anon.mapped}
            calls = {"read": lambda: sp.read(0, 1), "write": lambda: sp.write(0, b"c"),
                     "add": lambda: sp.add(0, 1), "lock": sp.lock, "try_lock": sp.try_lock,
                     "view": sp.view, "unlock": sp.unlock, "destroy": sp.destroy,
                     "unmap": sp.unmap, "anon.buf": lambda: anon.buf,
                     "anon.unmap": anon.unmap}
            for what, call in calls.items():
                try:
                    call()
                    seen[what] = "no error"
                except libportal.Unmapped as e:
                    seen[what] = e.errno
            # The child is a new context: it may attach the share-point itself.
            own = libportal.share_attach(name)
            seen["attach"] = own.read(0, 6).decode()
            seen["context"] = own.connection is not sp.connection
            own.unmap()
            return seen

        seen = in_fork_child(child)
        assert seen.pop("mapped") is False and seen.pop("anon_mapped") is False
        assert seen.pop("attach") == "parent" and seen.pop("context") is True
        assert seen == {k: errno.EBADF for k in seen}
        # The parent is untouched.
        assert sp.mapped and anon.mapped
        assert sp.read(0, 6) == b"parent"
        assert sp.lock_state == lib.FAYT_LOCK_FREE
        assert sp.add(8, 1) == 1
        anon.buf[0:2] = b"ok"
        assert bytes(anon.buf[0:2]) == b"ok"
    finally:
        anon.unmap()
        sp.destroy()


def test_sharepoint_does_not_survive_fork(lp, names):
    call_in_child(_does_not_survive_fork, names("fork"))


def _fork_child_leaves_the_parents_lock_held(name):
    sp = libportal.share_create(name, 4096)
    try:
        assert sp.lock() == 0
        assert in_fork_child(lambda: sp.mapped) is False
        # The parent still holds its lock, and faytd's robust record says so.
        assert sp.held
        assert lock_state(sp) == lib.FAYT_LOCK_HELD
        assert records_of(sp.connection, sp.sp_id) == [lib.FAYT_HELD_HELD]
    finally:
        if sp.held:
            try:
                sp.unlock()
            except libportal.PortalError:
                pass
        sp.destroy()


def test_sharepoint_fork_child_leaves_the_parents_lock_held(lp, names):
    call_in_child(_fork_child_leaves_the_parents_lock_held, names("fork-held"))


def test_sharepoint_connection_close_invalidates_its_share_points(faytd, names):
    name = names("conn-close")
    out = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent("""
        c = lp.Connection()
        sp = lp.share_create(%r, 4096, connection=c)
        sp.write(0, b"x")
        c.close()
        try:
            sp.read(0, 1)
            print("read after close")
        except lp.Unmapped as e:
            print("unmapped", e.errno)
        """ % name)], env=faytd.env(), capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0, "exit %s: %s" % (out.returncode, out.stderr[-2000:])
    assert out.stdout.strip() == "unmapped %d" % errno.EBADF


# -- threads -------------------------------------------------------------------

def test_sharepoint_threads_share_one_object_and_the_lock_excludes_them(lp, names):
    """The lock belongs to the thread that took it through the object: other
    threads using the same object wait for it, and cannot unlock it."""
    import threading
    sp = lp.share_create(names("threads"), 4096)
    try:
        mv = sp.view().cast("q")
        errors = []

        def work():
            try:
                for _ in range(20000):
                    sp.lock()
                    mv[0] += 1
                    sp.unlock()
            except BaseException as e:          # pragma: no cover - reported below
                errors.append(e)

        ts = [threading.Thread(target=work) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert errors == [] and not any(t.is_alive() for t in ts)
        assert mv[0] == 80000

        assert sp.lock() == 0
        seen = {}

        def intruder():
            seen["held"] = sp.held
            try:
                sp.unlock()
            except lp.PermissionDenied as e:
                seen["unlock"] = e.errno
            seen["try"] = sp.try_lock()

        t = threading.Thread(target=intruder)
        t.start()
        t.join(10)
        assert seen == {"held": False, "unlock": errno.EPERM, "try": errno.EBUSY}
        assert sp.held
        sp.unlock()
        mv.release()
    finally:
        sp.destroy()
