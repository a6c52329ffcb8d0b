"""ANON portals sent by reference on a channel (End.send_share of an lp.Portal,
CHAN_PASS with FAYT_PASS_PORTAL; docs/channels.md; between processes,
read-only, writable and as a copy: test_stream_ref.py): a store into the
read-only mapping is a SIGSEGV; forged and foreign handles refused, nothing
left behind; a hostile peer of uid 65534.  And the channels' RAM charge
(docs/limits.md): a connect past the quota is ENOMEM, and the charge goes
when the channel ends."""
import errno
import json
import os
import signal
import subprocess
import sys

import pytest

import libportal
from libportal._abi import lib, CHAN_PASS_REQ
from support.children import WAIT, wait_until
from test_stream_ref import POLICY   # root core, others server; pub.* shared

NOBODY = 65534
PORTAL = lib.FAYT_PASS_PORTAL

def _ram(conn):
    return conn.stats()["limits"]["ram"]


# A receiver that stores into a read-only mapping of a portal: SIGSEGV.
STORER = """
import ctypes
end = lp.connect(sys.argv[1], timeout=WAIT)
s = end.recv(timeout=WAIT)
print(bytes(s.buffer[:5]).decode(), s.buffer.readonly, flush=True)
sys.stdin.readline()
ctypes.memset(s._map.data, 0x41, 1)
print("stored", flush=True)
""".replace("WAIT", str(WAIT))


def test_stream_portal_ref_a_store_into_the_read_only_mapping_is_sigsegv(lp, spawn):
    lst = lp.listen("chan.pref.segv")
    child = spawn(STORER, args=["chan.pref.segv"])
    end = lst.accept(timeout=WAIT)
    p = lp.portal(lp.ANON, lp.PROT_RW, 4096)
    try:
        p.buf[:5] = b"hello"
        end.send_share(p)
        assert child.expect() == "hello True"
        child.send("")
        assert child.proc.wait(timeout=WAIT) == -signal.SIGSEGV, child.stderr()
        assert bytes(p.buf[:5]) == b"hello"             # nothing reached the portal
    finally:
        p.unmap()
        end.close()
        lst.close()


def test_stream_portal_ref_bad_arguments_and_forged_handles(lp):
    c = lp.connection()
    before = _ram(c)
    lst = lp.listen("chan.pref.bad")
    a = lp.connect("chan.pref.bad")
    b = lst.accept(timeout=0)
    other = libportal.Connection()
    mine = lp.portal(lp.ANON, lp.PROT_RW, 4096)
    ro = lp.portal(lp.ANON, lp.PROT_READ, 4096)
    sp = lp.share_create("chan.pref.bad.sp", 4096)
    theirs = [lp.portal(lp.ANON, lp.PROT_RW, 4096, connection=other) for _ in range(8)]
    gone = lp.portal(lp.ANON, lp.PROT_RW, 4096)
    gone.unmap()

    def raw(ref, flags):
        try:
            c.call(lib.FAYT_SYS_CHAN_PASS, CHAN_PASS_REQ.pack(a.id, ref, flags, 0))
            return "ok"
        except OSError as e:
            return errno.errorcode[e.errno] + ": " + str(e)
    try:
        with pytest.raises(libportal.InvalidArgument) as e:
            a.send_share(theirs[0])
        assert "another connection" in str(e.value)
        with pytest.raises(OSError) as e:
            a.send_share(gone)
        assert e.value.errno == errno.EBADF and "unmapped" in str(e.value)
        with pytest.raises(OSError) as e:
            a.send_share(ro, writable=True)
        assert e.value.errno == errno.EACCES and "prot" in str(e.value)
        with pytest.raises(libportal.InvalidArgument):
            a.send_share(mine, copy=True, writable=True)
        # Raw requests: what faytd's records say, whatever the bytes.
        assert raw(0, PORTAL).startswith("EBADF: ")
        assert raw(1 << 63, PORTAL).startswith("EBADF: ")
        assert raw(gone.handle, PORTAL).startswith("EBADF: ")
        # Another context's handle, one that names no live mapping here
        # (handles count per context: the same number may be ours too).
        live = {m.handle for m in (r() for r in c._mappings.values()) if m is not None
                and m.mapped}
        top = next(x.handle for x in theirs if x.handle not in live)
        out = raw(top, PORTAL)
        assert out.startswith("EBADF: ") and "names no mapping of this context" in out, out
        out = raw(sp.handle, PORTAL)                     # a share-point's mapping
        assert out.startswith("EINVAL: ") and "is not an ANON portal" in out, out
        out = raw(mine.handle, PORTAL | lib.FAYT_PASS_CANCEL)
        assert out.startswith("EINVAL: ") and "CANCEL" in out, out
        out = raw(mine.handle, PORTAL | 0x100)
        assert out.startswith("EINVAL: ") and "unknown bits 0x100" in out, out
        # Nothing went: no pass was left pending (all 16 places are free),
        # the peer has no message, and the channel works on.
        for _ in range(lib.FAYT_PASS_PENDING_MAX):
            a.send_share(mine, copy=True)
        with pytest.raises(OSError) as e:
            a.send_share(mine, copy=True)
        assert e.value.errno == errno.ENOSPC
        for _ in range(lib.FAYT_PASS_PENDING_MAX):
            b.recv(timeout=0).close()
        with pytest.raises(libportal.WouldBlock):
            b.recv(timeout=0)
        mine.buf[:2] = b"ok"
        a.send_share(mine)
        with b.recv(timeout=0) as s:
            assert bytes(s.buffer[:2]) == b"ok" and s.portal
        b.send_share(ro)                                 # the acceptor's end too
        with a.recv(timeout=0) as s:
            assert len(s) == 4096 and s.buffer.readonly
    finally:
        a.close()
        b.close()
        lst.close()
        for p in theirs:
            p.unmap()
        other.close()
        mine.unmap()
        ro.unmap()
        sp.destroy()
    # Every charge given back (faytd sees `other` closed when it reads its EOF).
    wait_until(lambda: _ram(c) == before, "the RAM charged back to %d bytes" % before)



def test_stream_portal_ref_direct_and_cow_handles_do_not_go(lp):
    """A DIRECT or COW portal over an ANON portal's own frames is not an
    ANON portal: its handle is EINVAL in CHAN_PASS (raw bytes), with or
    without WRITE, and leaves no pass behind."""
    c = lp.connection()
    lst = lp.listen("chan.pref.direct")
    a = lp.connect("chan.pref.direct")
    b = lst.accept(timeout=0)
    src = lp.portal(lp.ANON, lp.PROT_RW, 8192)
    views = [lp.portal(lp.DIRECT, lp.PROT_RW, 8192, paddr=list(src.paddr)),
             lp.portal(lp.COW, lp.PROT_RW, 8192, paddr=list(src.paddr),
                       share_type=lp.COW_ON_WRITE)]
    try:
        for v in views:
            for flags in (PORTAL, PORTAL | lib.FAYT_PASS_WRITE, PORTAL | lib.FAYT_PASS_COPY):
                with pytest.raises(OSError) as e:
                    c.call(lib.FAYT_SYS_CHAN_PASS, CHAN_PASS_REQ.pack(a.id, v.handle, flags, 0))
                assert e.value.errno == errno.EINVAL and "not an ANON portal" in str(e.value)
        with pytest.raises(libportal.WouldBlock):
            b.recv(timeout=0)
        src.buf[:2] = b"ok"
        a.send_share(src)                               # the source itself goes
        with b.recv(timeout=0) as s:
            assert bytes(s.buffer[:2]) == b"ok"
    finally:
        for v in views:
            v.unmap()
        src.unmap()
        a.close()
        b.close()
        lst.close()

# uid 65534: argv[1] the socket, argv[2] the handle of root's portal.
HOSTILE = """
c = lp.Connection(sys.argv[1])
e = lp.connect("pub.pref", connection=c, ring_bytes=4096)
def ask(ref, flags):
    try:
        c.call(lp._lib.FAYT_SYS_CHAN_PASS, struct.pack("<QQII", e.id, ref, flags, 0))
        return "ok"
    except OSError as x:
        return errno.errorcode[x.errno] + ": " + str(x)
out = {"root_handle": ask(int(sys.argv[2]), PORTAL), "zero": ask(0, PORTAL)}
print(json.dumps(out), flush=True)
s = e.recv(timeout=WAIT)
perms = [l.split()[1] for l in open("/proc/self/maps")
         if int(l.split("-")[0], 16) == s._map.addr]
print(json.dumps([s.portal, s.buffer.readonly, perms, s.buffer[:4].tobytes().hex()]),
      flush=True)
s.close()
mine = lp.portal(lp.ANON, lp.PROT_RW, 8192, connection=c)
mine.buf[:11] = b"from nobody"
e.send_share(mine, copy=True)
mine.buf[:4] = b"FROM"                  # after the copy: root must not see it
e.send_share(mine)
print("shared", flush=True)
sys.stdin.readline()
m = e._mine_map                         # a raw REF frame naming ticket 77, flags PORTAL
head = struct.unpack_from("<Q", m, 64)[0]
pos = head % 4096
struct.pack_into("<Q", m, 4096 + pos, 24 | (1 << 32))
struct.pack_into("<QQII", m, 4096 + (pos + 8) % 4096, 77, 8192, PORTAL, 0)
struct.pack_into("<Q", m, 64, head + 32)
print("forged", flush=True)
sys.stdin.readline()
""".replace("WAIT", str(WAIT)).replace("PORTAL", str(PORTAL))


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a hostile peer as uid 65534: needs root")
def test_stream_portal_ref_across_uids_and_a_hostile_peer_as_uid_65534(world_faytd, spawn,
                                                                       as_user):
    d = world_faytd(POLICY)
    root = libportal.Connection(d.socket)
    p = None
    try:
        lst = libportal.listen("pub.pref", connection=root)
        p = libportal.portal(libportal.ANON, libportal.PROT_RW, 4096, connection=root)
        p.buf[:4] = b"\xca\xfe\xba\xbe"
        bad = spawn(HOSTILE, d.env(), as_user=as_user, uid=NOBODY, args=[d.socket, p.handle])
        end = lst.accept(timeout=WAIT)
        assert end.peer.uid == NOBODY
        out = json.loads(bad.expect())
        assert out["root_handle"].startswith("EBADF: ") and \
            "names no mapping of this context" in out["root_handle"], out
        assert out["zero"].startswith("EBADF: ")
        # root hands it its portal read-only: nobody maps it without write.
        end.send_share(p)
        is_portal, readonly, perms, head = json.loads(bad.expect())
        assert is_portal and readonly and head == "cafebabe"
        assert perms and all("w" not in x for x in perms), perms
        assert bad.expect() == "shared"
        with end.recv(timeout=WAIT) as cp, end.recv(timeout=WAIT) as live:
            assert cp.copy and bytes(cp.buffer[:11]) == b"from nobody"  # sealed before
            assert not live.copy and bytes(live.buffer[:11]) == b"FROM nobody"
        bad.send("")
        assert bad.expect() == "forged"
        with pytest.raises(libportal.ProtocolError):
            end.recv(timeout=WAIT)
        with pytest.raises(libportal.ChannelReset):
            end.recv(timeout=WAIT)
        end.close()
        bad.send("")
        bad.kill()
        lst.close()
    finally:
        if p is not None and p.mapped:
            p.unmap()
        root.close()


# -- RAM: channels are charged to the connecting context ------------------------

RING = 1 << 20
CHANNEL = 2 * (4096 + RING)


def test_stream_ram_a_connect_past_the_quota_is_enomem_and_close_gives_it_back(fresh_faytd):
    d = fresh_faytd(config={"max_ram_per_context": "3MiB"})
    c = libportal.Connection(d.socket)
    try:
        lst = libportal.listen("chan.ram", connection=c)
        base = _ram(c)
        one = libportal.connect("chan.ram", ring_bytes=RING, connection=c)
        assert _ram(c) == base + CHANNEL
        with pytest.raises(libportal.OutOfMemory) as e:
            libportal.connect("chan.ram", ring_bytes=RING, connection=c)
        assert e.value.errno == errno.ENOMEM
        assert "ring_bytes: %d: a channel's two objects (%d bytes" % (RING, CHANNEL) \
            in str(e.value) and "past its RAM quota" in str(e.value), str(e.value)
        assert _ram(c) == base + CHANNEL                # nothing charged, nothing queued
        acc = lst.accept(timeout=0)
        with pytest.raises(libportal.WouldBlock):
            lst.accept(timeout=0)
        # A copy held untaken is the sender's too; taking it gives it back,
        # and one past the quota is refused with nothing sent.
        half = 512 << 10
        p = libportal.portal(libportal.ANON, libportal.PROT_RW, half, connection=c)
        with pytest.raises(libportal.OutOfMemory) as e:
            one.send_share(p, copy=True)                # 2 MiB + 4 pages + 2 x 512 KiB > 3 MiB
        assert "past its RAM quota" in str(e.value)
        assert _ram(c) == base + CHANNEL + half
        with pytest.raises(libportal.WouldBlock):
            acc.recv(timeout=0)
        p.unmap()
        p = libportal.portal(libportal.ANON, libportal.PROT_RW, 8192, connection=c)
        one.send_share(p, copy=True)
        assert _ram(c) == base + CHANNEL + 2 * 8192
        acc.recv(timeout=0).close()
        assert _ram(c) == base + CHANNEL + 8192
        p.unmap()
        one.close()
        assert _ram(c) == base + CHANNEL                # the acceptor still holds its end
        acc.close()
        assert _ram(c) == base                          # the channel ended: all of it back
        again = libportal.connect("chan.ram", ring_bytes=RING, connection=c)
        assert _ram(c) == base + CHANNEL
        again.close()
        lst.accept(timeout=0).close()
        assert _ram(c) == base
        lst.close()
    finally:
        c.close()


# The connector in a child: argv[1] the name; killed by the test.
CONNECTOR = """
end = lp.connect(sys.argv[1], ring_bytes=RING, timeout=WAIT)
print("connected", flush=True)
time.sleep(WAIT)
""".replace("WAIT", str(WAIT)).replace("RING", str(RING))

ACCEPTOR = """
lst = lp.listen(sys.argv[1])
print("listening", flush=True)
end = lst.accept(timeout=WAIT)
print("accepted", flush=True)
time.sleep(WAIT)
""".replace("WAIT", str(WAIT))


def test_stream_ram_a_peers_death_ends_the_channel_and_its_charge(fresh_faytd, spawn):
    d = fresh_faytd(config={"max_ram_per_context": "3MiB"})
    c = libportal.Connection(d.socket)
    try:
        base = _ram(c)
        # The connector dies: its charge stays while the acceptor holds its
        # end (the memory lives), and goes with the acceptor's close.
        lst = libportal.listen("chan.ram.death", connection=c)
        kid = spawn(CONNECTOR, d.env(), args=["chan.ram.death"])
        assert kid.expect() == "connected"
        end = lst.accept(timeout=WAIT)
        assert _ram(c) == base + CHANNEL                # the child's context, this uid
        kid.kill()
        with pytest.raises(libportal.ChannelReset):
            end.recv(timeout=WAIT)
        assert _ram(c) == base + CHANNEL
        end.close()
        assert _ram(c) == base
        lst.close()
        # The acceptor dies, the connector closes: all of it back, and the
        # quota lets the next connect in.
        srv = spawn(ACCEPTOR, d.env(), args=["chan.ram.death2"])
        assert srv.expect() == "listening"
        end = libportal.connect("chan.ram.death2", ring_bytes=RING, connection=c, timeout=WAIT)
        assert srv.expect() == "accepted"
        srv.kill()
        with pytest.raises(libportal.ChannelReset):
            end.recv(timeout=WAIT)
        end.close()
        assert _ram(c) == base
    finally:
        c.close()


def test_stream_ram_a_restarted_faytd_charges_only_the_channels_made_again(restartable):
    d = restartable.start()
    c = libportal.Connection(d.socket)
    lst = libportal.listen("chan.ram.restart", connection=c)
    end = libportal.connect("chan.ram.restart", ring_bytes=RING, connection=c)
    assert _ram(c) == CHANNEL
    restartable.kill()
    with pytest.raises(libportal.ChannelReset):
        end.recv(timeout=WAIT)
    end.close()
    lst.close()
    c.close()
    d = restartable.start()
    c = libportal.Connection(d.socket)
    try:
        assert _ram(c) == 0
        lst = libportal.listen("chan.ram.restart", connection=c)
        with libportal.connect("chan.ram.restart", ring_bytes=RING, connection=c):
            assert _ram(c) == CHANNEL
        lst.accept(timeout=0).close()
        assert _ram(c) == 0
        lst.close()
    finally:
        c.close()


# uid 65534 listens and connects in one process: its uid's limit binds.
UID_LIMIT = """
c = lp.Connection(sys.argv[1])
lst = lp.listen("mine", connection=c)
out = []
try:
    lp.connect("mine", ring_bytes=RING, connection=c)
    out.append("ok")
except OSError as e:
    out.append(errno.errorcode[e.errno] + ": " + str(e))
with lp.connect("mine", connection=c):          # a 64 KiB channel fits
    out.append(c.stats()["limits"]["ram"])
lst.accept(timeout=0).close()
out.append(c.stats()["limits"]["ram"])
print(json.dumps(out), flush=True)
""".replace("RING", str(RING))


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a client as uid 65534: needs root")
def test_stream_ram_a_uid_past_max_ram_per_uid_cannot_connect(world_faytd, spawn, as_user):
    d = world_faytd(POLICY, max_ram_per_uid="1MiB")
    kid = spawn(UID_LIMIT, d.env(), as_user=as_user, uid=NOBODY, args=[d.socket])
    refused, held, after = json.loads(kid.expect())
    assert refused.startswith("ENOMEM: ") and "max_ram_per_uid" in refused, refused
    assert held == 2 * (4096 + 65536) and after == 0
    kid.finish()
    root = libportal.Connection(d.socket)           # core: no uid limit
    try:
        lst = libportal.listen("pub.big", connection=root)
        with libportal.connect("pub.big", ring_bytes=RING, connection=root):
            pass
        lst.accept(timeout=0).close()
        lst.close()
    finally:
        root.close()


def _rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_stream_portal_ref_passes_leave_nothing_in_faytd_for_the_contexts_life(fresh_faytd):
    """Each pass of a new ANON portal (made, passed, taken, unmapped) left
    faytd's lookup of it, with its frame list, until the context went:
    ~34 KiB per pass of a 32 MiB portal, 34 MiB over these 1000.  A
    generous bound (a quarter of that) on faytd's RSS, not a measure."""
    d = fresh_faytd(ram="256MiB")
    c = libportal.Connection(d.socket)
    try:
        lst = libportal.listen("chan.pref.leak", connection=c)
        a = libportal.connect("chan.pref.leak", ring_bytes=4096, connection=c)
        b = lst.accept(timeout=0)
        size, n = 32 << 20, 1000

        def one():
            p = libportal.portal(libportal.ANON, libportal.PROT_RW, size, connection=c)
            a.send_share(p)
            b.recv(timeout=WAIT).close()
            p.unmap()

        for _ in range(50):     # faytd's own first allocations
            one()
        before = _rss_kib(d.proc.pid)
        for _ in range(n):
            one()
        grown = _rss_kib(d.proc.pid) - before
        assert grown < n * (size // 4096) * 8 // 1024 // 4, "faytd grew %d KiB" % grown
        a.close()
        b.close()
        lst.close()
    finally:
        c.close()


# uid 65534 fills its channels with passes of one portal, 16 per direction:
# each pass is one of faytd's descriptors.  argv[1] the socket.
FD_HOG = """
c = lp.Connection(sys.argv[1])
lst = lp.listen("mine.fds", connection=c)
p = lp.portal(lp.ANON, lp.PROT_RW, 4096, connection=c)
ends, n, err = [], 0, None
try:
    for i in range(1000):
        a = lp.connect("mine.fds", connection=c, ring_bytes=4096)
        b = lst.accept(timeout=0)
        ends.append((a, b))
        for e in (a, b):
            for _ in range(16):
                c.call(lp._lib.FAYT_SYS_CHAN_PASS, struct.pack("<QQII", e.id, p.handle,
                                                              PORTAL | e._side, 0))
                n += 1
except OSError as x:
    err = errno.errorcode[x.errno] + ": " + str(x)
print(json.dumps([len(ends), n, err]), flush=True)
sys.stdin.readline()
""".replace("PORTAL", str(PORTAL))


ROOT_SERVED = """
import errno, sys, libportal
try:
    c = libportal.Connection(sys.argv[1])
except OSError as e:
    print(errno.errorcode[e.errno])
    sys.exit(0)
libportal.portal(libportal.ANON, libportal.PROT_RW, 4096, connection=c).unmap()
lst = libportal.listen("root.fds", connection=c)
libportal.connect("root.fds", connection=c).close()
lst.accept(timeout=0).close()
print("served")
"""


def _hogged(world_faytd, spawn, as_user, **config):
    """A faytd (its RLIMIT_NOFILE lowered to 8192, what a small machine
    gives; its count of connections was made from the limit it started
    with) where uid 65534's FD_HOG passed what it could: (faytd, hog, what
    the hog printed)."""
    import resource
    d = world_faytd(POLICY, **config)
    resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE, (8192, 8192))
    hog = spawn(FD_HOG, d.env(), as_user=as_user, uid=NOBODY, args=[d.socket])
    return d, hog, json.loads(hog.expect())


def _root_served(d):
    """What a new root client gets (in a child, bounded: a faytd out of
    descriptors once left its HELLO unanswered for ever)."""
    try:
        p = subprocess.run([sys.executable, "-c", ROOT_SERVED, d.socket], env=d.env(),
                           capture_output=True, text=True, timeout=WAIT)
    except subprocess.TimeoutExpired:
        return "no answer within %d s" % WAIT
    return p.stdout.strip() or p.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a client as uid 65534: needs root")
def test_stream_portal_ref_faytd_out_of_descriptors_resets_newcomers(world_faytd, spawn,
                                                                      as_user):
    """faytd at its RLIMIT_NOFILE closes a new connection unanswered: the
    client's Connection() raises DaemonUnavailable (ECONNRESET) at once
    instead of waiting for ever for its HELLO, faytd does not log a line
    per turn of its loop, and it serves again once the hog is gone."""
    # Its passes unbounded per uid, the hog takes every descriptor.
    d, hog, (channels, passes, err) = _hogged(world_faytd, spawn, as_user,
                                              max_passes_per_uid=10 ** 6)
    try:
        assert err is not None and "open files" in err, (channels, passes, err)
        assert [_root_served(d) for _ in range(3)] == ["ECONNRESET"] * 3
    finally:
        hog.kill()
    wait_until(lambda: _root_served(d) == "served", "faytd to serve root again")
    lines = [x for x in open(d.log) if "accept:" in x]
    assert 1 <= len(lines) <= 3 and "unanswered" in lines[0], lines[:5]


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a client as uid 65534: needs root")
def test_stream_portal_ref_a_uids_passes_cannot_take_faytds_descriptors(world_faytd, spawn,
                                                                         as_user):
    """Untaken passes hold faytd's descriptors: one uid's are bounded in
    all (max_passes_per_uid), not only per channel, so uid 65534's hog
    stops at ENOSPC naming the limit and faytd still serves root."""
    d, hog, (channels, passes, err) = _hogged(world_faytd, spawn, as_user)
    try:
        assert err is not None and "max_passes_per_uid" in err, (channels, passes, err)
        assert err.startswith("ENOSPC") and passes == 256, (channels, passes, err)
        assert _root_served(d) == "served"      # faytd still serves others
    finally:
        hog.kill()
