"""Connected channels (LISTEN, CONNECT, ACCEPT, CHAN_CLOSE; libportal/stream.py,
faytd/stream.py, docs/channels.md): servers and clients in separate
processes, framing, blocking and non-blocking, backpressure, shutdown, the
failures (a peer killed mid-message, a listener gone with its queue, faytd
killed and restarted), a hostile peer scribbling its own ring as uid 65534,
the namespaces as uid 65534, readiness for selectors and asyncio, and bad
requests as raw bytes."""
import asyncio
import errno
import json
import mmap
import os
import selectors
import struct

import pytest

import libportal
from libportal._abi import lib, CONNECT_REQ, HANDLE_REQ, LISTEN_REQ
from support.children import WAIT, wait_until

NOBODY = 65534

# An echo server: listens on argv[1], answers each message upper-cased,
# one client after another, until its stdin closes.
ECHO = """
lst = lp.listen(sys.argv[1], backlog=int(sys.argv[2]) if len(sys.argv) > 2 else 0)
print("listening", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    try:
        end = lst.accept(timeout=0.2)
    except lp.TimedOut:
        continue
    print(json.dumps(list(end.peer)), flush=True)
    while True:
        m = end.recv(timeout=WAITS)
        if not m:
            break
        end.send(m.upper())
    end.close()
lst.close()
""".replace("WAITS", str(WAIT))


def _fds():
    return len(os.listdir("/proc/self/fd"))


def test_stream_echo_between_processes_with_credentials(lp, spawn):
    srv = spawn(ECHO, args=["chan.echo"])
    assert srv.expect() == "listening"
    lp.connection()
    before = _fds()
    with lp.connect("chan.echo", timeout=WAIT, ring_bytes=4096) as end:
        assert end.peer.pid == srv.pid and end.peer.uid == os.getuid()
        assert end.peer.category == lp.CATEGORY_CORE
        assert json.loads(srv.expect()) == [lp.connection().context_id, os.getpid(),
                                            os.getuid(), lp.CATEGORY_CORE]
        assert end.max_message == 4096 - 8
        # Sizes that wrap round the 4 KiB ring in every way, and the largest.
        for i, n in enumerate([1, 7, 8, 9, 1000, 3000, 4088, 13, 2049, 4088] * 3):
            msg = bytes([97 + i % 26]) * n
            end.send(msg)
            assert end.recv(timeout=WAIT) == msg.upper()
        buf = bytearray(100)
        end.send(b"into")
        assert end.recv_into(buf, timeout=WAIT) == 4 and buf[:4] == b"INTO"
        end.send(b"x" * 200)
        with pytest.raises(OSError) as e:
            end.recv_into(buf, timeout=WAIT)     # does not fit: nothing taken
        assert e.value.errno == errno.EMSGSIZE
        assert str(e.value) == "[Errno 90] buffer: 100 bytes; the message has 200"
        assert end.recv(timeout=WAIT) == b"X" * 200
        with pytest.raises(libportal.InvalidArgument) as e:
            end.send(b"")
        assert "data: 0 bytes; a message holds 1 to 4088" in str(e.value)
        with pytest.raises(OSError) as e:
            end.send(b"y" * 4089)
        assert e.value.errno == errno.EMSGSIZE
    assert _fds() == before                         # the objects, eventfds and pidfd closed
    srv.finish()


def test_stream_backlog_nonblocking_and_backpressure(lp):
    lst = lp.listen("chan.bp", backlog=2)
    client = libportal.Connection()
    try:
        with pytest.raises(libportal.WouldBlock):
            lst.accept(timeout=0)
        with pytest.raises(libportal.TimedOut):
            lst.accept(timeout=0.05)
        a = lp.connect("chan.bp", connection=client, ring_bytes=4096)
        b = lp.connect("chan.bp", connection=client, ring_bytes=4096)
        with pytest.raises(libportal.WouldBlock) as e:
            lp.connect("chan.bp", connection=client)
        assert str(e.value) == "[Errno 11] name: the accept queue of 'chan.bp' is full (backlog 2)"
        sa = lst.accept(timeout=0)
        assert sa.peer.context == client.context_id
        sb = lst.accept(timeout=0)
        # Before the server reads: a sends until the ring is full, whole frames only.
        a.setblocking(False)
        sent = 0
        with pytest.raises(libportal.WouldBlock):
            while True:
                a.send(struct.pack("<I", sent) + b"." * 1000)     # 1008 bytes a frame
                sent += 1
        assert sent == 4                            # 4 x 1008 of 4096; a 5th does not fit
        with pytest.raises(libportal.TimedOut):
            a.send(b"z" * 1004, timeout=0.05)
        a.send(b"fits")                             # 16 bytes still do
        got = [sa.recv(timeout=0) for _ in range(5)]
        assert [struct.unpack_from("<I", m)[0] for m in got[:4]] == [0, 1, 2, 3]
        assert got[4] == b"fits"
        with pytest.raises(libportal.WouldBlock):
            sa.recv(timeout=0)
        with pytest.raises(libportal.TimedOut):
            sa.recv(timeout=0.05)
        a.send(b"z" * 4000, timeout=0)             # room again: backpressure released
        assert sa.recv() == b"z" * 4000
        # The other pair works on its own.
        sb.send(b"to b")
        assert b.recv(timeout=WAIT) == b"to b"
        for x in (a, b, sa, sb):
            x.close()
        with pytest.raises(libportal.Unmapped):
            a.send(b"closed")
    finally:
        lst.close()
        client.close()


def test_stream_the_spin_is_bounded_by_the_timeout_and_finds_a_late_message(lp, spawn):
    import time
    lst = lp.listen("chan.spin")
    a = lp.connect("chan.spin", ring_bytes=4096)
    b = lst.accept(timeout=0)
    try:
        assert a.spin_ns == int(os.environ.get("FAYT_CHAN_SPIN_NS", libportal.stream.SPIN_NS
                                               if (os.cpu_count() or 1) > 1 else 0))
        for bad in (-1, 1.5, "x"):
            with pytest.raises(libportal.InvalidArgument) as e:
                a.set_spin(bad)
            assert "ns: " in str(e.value)
        # A spin of a minute: timeout 0 never spins, a timeout ends it.
        a.set_spin(60 * 10**9)
        t0 = time.monotonic()
        with pytest.raises(libportal.WouldBlock):
            a.recv(timeout=0)
        with pytest.raises(libportal.TimedOut):
            a.recv(timeout=0.05)
        a.settimeout(0.05)
        with pytest.raises(libportal.TimedOut):
            a.recv()
        a.setblocking(False)
        with pytest.raises(libportal.WouldBlock):
            a.recv()
        assert time.monotonic() - t0 < 30            # a hang bound, not a measure
        a.setblocking(True)
        # Backpressure: send's spin is bounded the same way.
        b.set_spin(60 * 10**9)
        for _ in range(4):
            b.send(b"." * 1000, timeout=0)
        with pytest.raises(libportal.TimedOut):
            b.send(b"." * 1000, timeout=0.05)
        for _ in range(4):
            assert a.recv(timeout=0) == b"." * 1000
        # Without a spin the sleep path works alike; with one, a message from
        # another process that comes while it spins is taken.
        for ns in (0, 60 * 10**9):
            a.set_spin(ns)
            child = spawn("""
end = lp.connect(sys.argv[1], timeout=WAITS)
end.send(b"late")
assert end.recv(timeout=WAITS) == b""
""".replace("WAITS", str(WAIT)), args=["chan.spin"])
            peer = lst.accept(timeout=WAIT)
            peer.set_spin(ns)
            assert peer.recv(timeout=WAIT) == b"late"
            peer.close()
            child.finish()
    finally:
        a.close()
        b.close()
        lst.close()


def test_stream_shutdown_close_and_epipe(lp):
    with lp.listen("chan.shut") as lst:
        c = lp.connect("chan.shut")
        s = lst.accept(timeout=WAIT)
        c.send(b"last")
        c.shutdown(lp.SHUT_WR)
        assert s.recv() == b"last"
        assert s.recv() == b"" and s.recv(timeout=0) == b""     # the end, at once
        with pytest.raises(libportal.ChannelClosed) as e:
            c.send(b"more")
        assert e.value.errno == errno.EPIPE
        s.send(b"still open")                       # the other way still works
        assert c.recv(timeout=WAIT) == b"still open"
        c.shutdown(lp.SHUT_RD)
        with pytest.raises(libportal.ChannelClosed):
            s.send(b"nobody reads")
        assert c.recv() == b""
        with pytest.raises(libportal.InvalidArgument):
            s.shutdown(7)
        s.close()
        c.close()
        c.close()                                   # idempotent


def test_stream_bad_requests_as_raw_bytes(lp):
    c = lp.connection()
    lst = lp.listen("chan.raw")
    try:
        cases = [
            (lib.FAYT_SYS_LISTEN, b"", errno.EINVAL, "listen: expected 8 bytes and the name"),
            (lib.FAYT_SYS_LISTEN, LISTEN_REQ.pack(0, 0), errno.EINVAL, "name: empty"),
            (lib.FAYT_SYS_LISTEN, LISTEN_REQ.pack(8, 0) + b"x", errno.EINVAL,
             "flags: unknown bits 0x8"),
            (lib.FAYT_SYS_LISTEN, LISTEN_REQ.pack(0, 4097) + b"x", errno.EINVAL,
             "backlog: 4097; at most 4096"),
            (lib.FAYT_SYS_LISTEN, LISTEN_REQ.pack(0, 0) + b"chan.raw", errno.EADDRINUSE,
             "name: 'chan.raw' already has a listener (context %d" % c.context_id),
            (lib.FAYT_SYS_LISTEN, LISTEN_REQ.pack(1, 0) + b"x", errno.EINVAL,
             "listen: closing takes the listener's id (8 bytes), got 1"),
            (lib.FAYT_SYS_LISTEN, LISTEN_REQ.pack(1, 0) + (99999).to_bytes(8, "little"),
             errno.ENOENT, "listener: 99999 is not a listener of this context"),
            (lib.FAYT_SYS_CONNECT, b"\0" * 7, errno.EINVAL, "connect: expected 8 bytes"),
            (lib.FAYT_SYS_CONNECT, CONNECT_REQ.pack(0, 1) + b"chan.raw", errno.EINVAL,
             "reserved: 1, not 0"),
            (lib.FAYT_SYS_CONNECT, CONNECT_REQ.pack(5000, 0) + b"chan.raw", errno.EINVAL,
             "ring_bytes: 5000; a power of two from 4096 to 16777216"),
            (lib.FAYT_SYS_CONNECT, CONNECT_REQ.pack(2048, 0) + b"chan.raw", errno.EINVAL,
             "ring_bytes: 2048"),
            (lib.FAYT_SYS_CONNECT, CONNECT_REQ.pack(0, 0) + b"chan.none", errno.ENOENT,
             "name: nothing listens on 'chan.none'"),
            (lib.FAYT_SYS_CONNECT, CONNECT_REQ.pack(0, 0) + b"a\0b", errno.EINVAL,
             "name: holds a NUL byte"),
            (lib.FAYT_SYS_CONNECT, CONNECT_REQ.pack(0, 0) + b"n" * 256, errno.ENAMETOOLONG,
             "name: 256 bytes; at most 255"),
            (lib.FAYT_SYS_ACCEPT, b"", errno.EINVAL, "accept: expected 8 bytes, got 0"),
            (lib.FAYT_SYS_ACCEPT, HANDLE_REQ.pack(99999), errno.ENOENT,
             "listener: 99999 is not a listener of this context"),
            (lib.FAYT_SYS_CHAN_CLOSE, HANDLE_REQ.pack(99999), errno.ENOENT,
             "channel: 99999 is not an open channel of this context"),
        ]
        for op, body, err, message in cases:
            with pytest.raises(OSError) as e:
                c.call(op, body)
            assert e.value.errno == err, (body, e.value)
            assert message in str(e.value), (body, str(e.value))
        # Another context may not accept on this listener, nor close its channels.
        other = libportal.Connection()
        try:
            end = lp.connect("chan.raw")
            with pytest.raises(libportal.NotFound):
                other.call(lib.FAYT_SYS_ACCEPT, HANDLE_REQ.pack(lst.id))
            with pytest.raises(libportal.NotFound):
                other.call(lib.FAYT_SYS_CHAN_CLOSE, HANDLE_REQ.pack(end.id))
            lst.accept(timeout=0).close()
            end.close()
        finally:
            other.close()
        with pytest.raises(TypeError):
            lp.connect(5)
        with pytest.raises(libportal.InvalidArgument):
            lp.listen("chan.neg", backlog=-1)
    finally:
        lst.close()


KILLED_SENDER = """
end = lp.connect(sys.argv[1], timeout=WAITS)
print("connected", flush=True)
i = 0
while True:
    n = 1 + (i * 7919) % 3000
    end.send(struct.pack("<II", i, n) + bytes([i % 251]) * n)
    i += 1
""".replace("WAITS", str(WAIT))


def test_stream_a_peer_killed_mid_message_leaves_whole_messages_then_reset(lp, spawn):
    with lp.listen("chan.killed") as lst:
        snd = spawn(KILLED_SENDER, args=["chan.killed"])
        end = lst.accept(timeout=WAIT)
        assert snd.expect() == "connected"
        for i in range(50):                          # it runs, blocked on a full ring at times
            m = end.recv(timeout=WAIT)
            assert struct.unpack_from("<II", m) == (i, 1 + (i * 7919) % 3000)
        snd.kill()                                   # mid-send, most likely
        got = 50
        with pytest.raises(libportal.ChannelReset) as e:
            while True:
                m = end.recv(timeout=WAIT)
                i, n = struct.unpack_from("<II", m)
                assert (i, len(m)) == (got, 8 + n) and m[8:] == bytes([i % 251]) * n
                got += 1
        assert "the peer" in str(e.value)
        with pytest.raises(libportal.ChannelReset):
            end.recv(timeout=0)                      # it stays reset
        with pytest.raises((libportal.ChannelClosed, libportal.ChannelReset)):
            end.send(b"anyone?")
        end.close()


def test_stream_a_listener_dies_with_clients_in_its_queue(lp, spawn):
    srv = spawn("lst = lp.listen('chan.queue', backlog=4)\nprint('listening')\ntime.sleep(120)")
    assert srv.expect() == "listening"
    ends = [lp.connect("chan.queue", timeout=WAIT) for _ in range(3)]
    ends[0].send(b"never read")                     # room in the ring, before any accept
    srv.kill()
    for end in ends:
        with pytest.raises(libportal.ChannelReset):
            end.recv(timeout=WAIT)
        with pytest.raises(libportal.ChannelClosed):
            end.send(b"x")
        end.close()
    assert wait_until(lambda: _not_listened("chan.queue"), "the name to be free")


def _not_listened(name):
    try:
        libportal.connect(name).close()
        return False
    except libportal.NotFound:
        return True


# Serves echo on argv[1] through any number of faytd restarts: a lost faytd
# makes it connect and listen again.
RELISTEN = """
def serve():
    c = lp.Connection()
    lst = lp.listen(sys.argv[1], connection=c)
    print("listening", flush=True)
    end = lst.accept()
    while True:
        m = end.recv()
        if not m:
            return
        end.send(m.upper())

while True:
    try:
        serve()
    except (lp.ChannelReset, lp.DaemonUnavailable, lp.ChannelClosed):
        _end = time.monotonic() + WAITS
        while True:
            try:
                lp.Connection().close()
                break
            except lp.DaemonUnavailable:
                if time.monotonic() > _end:
                    raise
                time.sleep(0.05)
""".replace("WAITS", str(WAIT))


def test_stream_faytd_killed_resets_channels_and_they_are_made_again(restartable, spawn):
    d = restartable.start()
    srv = spawn(RELISTEN, d.env(), args=["chan.restart"])
    assert srv.expect() == "listening"
    c = libportal.Connection(d.socket)
    end = libportal.connect("chan.restart", connection=c, timeout=WAIT)
    end.send(b"before")
    assert end.recv(timeout=WAIT) == b"BEFORE"
    restartable.kill()
    with pytest.raises(libportal.ChannelReset):      # faytd's hang-up, or the peer's reset
        end.recv(timeout=WAIT)
    end.close()
    c.close()
    d = restartable.start()
    assert srv.expect() == "listening"              # the server listens again
    c = libportal.Connection(d.socket)
    try:
        with libportal.connect("chan.restart", connection=c, timeout=WAIT) as end:
            end.send(b"after")
            assert end.recv(timeout=WAIT) == b"AFTER"
    finally:
        c.close()
    srv.kill()


def test_stream_readiness_with_selectors_and_asyncio(lp, spawn):
    srv = spawn(ECHO, args=["chan.ready"])
    assert srv.expect() == "listening"
    end = lp.connect("chan.ready", timeout=WAIT)
    try:
        assert not end.ready()                      # nothing yet: armed
        sel = selectors.DefaultSelector()
        sel.register(end, selectors.EVENT_READ)
        end.send(b"sel")
        assert sel.select(timeout=WAIT)             # the eventfd turned readable
        assert end.recv(timeout=0) == b"SEL"
        sel.close()
        assert end.ready(write=True)                # room to send: no wait

        async def talk():
            out = []
            for m in (b"one", b"two", b"three"):
                await end.send_async(m)
                out.append(await end.recv_async())
            return out
        assert asyncio.run(asyncio.wait_for(talk(), WAIT)) == [b"ONE", b"TWO", b"THREE"]
    finally:
        end.close()
    srv.finish()


def test_stream_accept_async(lp, spawn):
    async def serve():
        with lp.listen("chan.aacc") as lst:
            client = spawn("e = lp.connect('chan.aacc', timeout=%r)\ne.send(b'hi')\n"
                           "print(e.recv(timeout=%r).decode())" % (WAIT, WAIT))
            end = await asyncio.wait_for(lst.accept_async(), WAIT)
            assert await asyncio.wait_for(end.recv_async(), WAIT) == b"hi"
            end.send(b"back")
            assert client.expect() == "back"
            end.close()
            client.finish()
    asyncio.run(serve())


POLICY = {
    "categories": {
        "core": {"classes": ["SHARE", "DIRECT", "ANON", "COW", "SPECIAL"],
                 "notify_handlers": True, "notify": ["*"], "chains": ["*"], "mmio": ["*"],
                 "shared_names": {"create": ["pub.*"]}},
        "server": {"classes": ["SHARE", "ANON"], "notify": ["$uid"],
                   "shared_names": {"attach": ["pub.*"]}},
    },
    "rules": [{"uid": 0, "category": "core"}],
    "default": "server",
}

# A client of another uid: one request per line, answers as JSON.
USER = """
c = lp.Connection(sys.argv[1])
print(json.dumps(c.context_id), flush=True)
ends = {}
for line in sys.stdin:
    op, name = line.split()
    try:
        if op == "listen":
            ends[name] = lp.listen(name, connection=c)
            print(json.dumps("ok"))
        elif op == "connect":
            e = ends[name] = lp.connect(name, connection=c)
            e.send(b"from nobody")
            print(json.dumps([list(e.peer), e.recv(timeout=WAITS).decode()]))
    except OSError as e:
        print(json.dumps([errno.errorcode[e.errno], str(e)]))
""".replace("WAITS", str(WAIT))


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a client as uid 65534: needs root")
def test_stream_names_and_rights_as_uid_65534(world_faytd, spawn, as_user):
    d = world_faytd(POLICY, max_channels_per_uid=2)
    root = libportal.Connection(d.socket)
    try:
        mine = libportal.listen("kv", connection=root)
        shared = libportal.listen("pub.kv", connection=root)
        user = spawn(USER, d.env(), as_user=as_user, uid=NOBODY, args=[d.socket])
        uctx = json.loads(user.expect())

        def ask(line):
            user.send(line)
            return json.loads(user.expect())
        # Its "kv" is its own name: root's listener is not found, nor squatted.
        assert ask("connect kv")[0] == "ENOENT"
        got = ask("connect uid:0/kv")
        assert got[0] == "EPERM" and "only a core server may name another uid's" in got[1]
        got = ask("listen pub.mine")                # a shared name it may not create
        assert got[0] == "EPERM", got
        # The shared name: it may connect, and both sides see faytd's credentials.
        user.send("connect pub.kv")
        end = shared.accept(timeout=WAIT)
        assert end.peer == (uctx, user.pid, NOBODY, libportal.CATEGORY_SERVER)
        assert end.recv(timeout=WAIT) == b"from nobody"
        end.send(b"from root")
        assert json.loads(user.expect()) == [[root.context_id, os.getpid(), 0,
                                              libportal.CATEGORY_CORE], "from root"]
        assert ask("listen kv") == "ok"             # its own namespace: 2 of 2 held
        got = ask("listen kv2")
        assert got[0] == "ENOSPC" and "uid 65534 holds 2 channels and listeners" in got[1]
        user.kill()
        with pytest.raises(libportal.ChannelReset):
            end.recv(timeout=WAIT)
        end.close()
        mine.close()
        shared.close()
    finally:
        root.close()


# A peer of another uid that breaks the protocol by writing its own object:
# argv[1] the socket, argv[2] the case.  It cannot write the server's object.
HOSTILE = """
import mmap
c = lp.Connection(sys.argv[1])
e = lp.connect("pub.h", connection=c, ring_bytes=4096)
# The descriptors as faytd sent them: the peer's object is read-only.
body, fds = c.call(lp._lib.FAYT_SYS_CONNECT, struct.pack("<II", 4096, 0) + b"pub.h")
try:
    os.open("/proc/self/fd/%d" % fds[1], os.O_RDWR)
    print("reopened", flush=True)
except PermissionError:
    print("no reopen", flush=True)
try:
    mmap.mmap(fds[1], 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    print("mapped", flush=True)
except PermissionError:
    print("no map", flush=True)
for fd in fds:
    os.close(fd)
m = e._mine_map
case = sys.argv[2]
if case == "head_beyond":
    struct.pack_into("<Q", m, 64, 4096 + 4104)
elif case == "head_unaligned":
    struct.pack_into("<Q", m, 64, 12)
elif case == "head_backwards":
    e.send(b"ok")
    print("sent", flush=True)
    sys.stdin.readline()
    struct.pack_into("<Q", m, 64, 0)
elif case == "length_zero":
    struct.pack_into("<QQ", m, 4096, 0, 0)
    struct.pack_into("<Q", m, 64, 16)
elif case == "length_long":
    struct.pack_into("<Q", m, 4096, 100)
    struct.pack_into("<Q", m, 64, 16)
elif case == "length_huge":
    struct.pack_into("<Q", m, 4096, 1 << 40)
    struct.pack_into("<Q", m, 64, 16)
elif case == "tail_beyond":
    struct.pack_into("<Q", m, 128, 1 << 20)
elif case == "random":
    import random
    random.seed(16)
    for _ in range(2000):
        off = random.randrange(0, 8192 - 8)
        m[off:off + 8] = random.randbytes(8)
print("scribbled", flush=True)
sys.stdin.readline()
try:
    e.recv(timeout=0)
    print("no error", flush=True)
except OSError as x:
    print(errno.errorcode[x.errno], flush=True)
"""

CASES = ["head_beyond", "head_unaligned", "head_backwards", "length_zero", "length_long",
         "length_huge", "tail_beyond", "random"]


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a hostile peer as uid 65534: needs root")
@pytest.mark.parametrize("case", CASES)
def test_stream_a_hostile_peer_scribbling_its_ring_as_uid_65534(world_faytd, spawn, as_user,
                                                                case):
    d = world_faytd(POLICY)
    root = libportal.Connection(d.socket)
    try:
        lst = libportal.listen("pub.h", connection=root)
        bad = spawn(HOSTILE, d.env(), as_user=as_user, uid=NOBODY, args=[d.socket, case])
        end = lst.accept(timeout=WAIT)
        lst.accept(timeout=WAIT).close()            # its raw CONNECT
        assert bad.expect() == "no reopen"
        assert bad.expect() == "no map"
        if case == "head_backwards":
            assert bad.expect() == "sent"
            assert end.recv(timeout=WAIT) == b"ok"
            bad.send("")
        assert bad.expect() == "scribbled"
        if case == "tail_beyond":
            with pytest.raises(libportal.ProtocolError) as e:
                end.send(b"to a liar")
        else:
            with pytest.raises((libportal.ProtocolError, libportal.WouldBlock,
                                libportal.ChannelReset)) as e:
                for _ in range(100):                # whatever it wrote: an error, never a hang
                    end.recv(timeout=0)
            if case != "random":
                assert isinstance(e.value, libportal.ProtocolError), e.value
        if isinstance(e.value, libportal.ProtocolError):
            assert "the peer broke the ring protocol" in str(e.value)
            with pytest.raises(libportal.ChannelReset):
                end.recv(timeout=WAIT)              # it stays closed, and never hangs
            bad.send("")
            # the peer is told (or it finds its own scribbles first)
            assert bad.expect() in (("ECONNRESET", "EPROTO") if case in ("tail_beyond", "random")
                                    else ("ECONNRESET",))
        end.close()
        lst.close()
        bad.kill()
    finally:
        root.close()


def test_stream_the_object_layout_matches_the_header():
    from libportal._abi import ffi
    assert ffi.offsetof("struct fayt_stream_end", "tx_head") == 64
    assert ffi.offsetof("struct fayt_stream_end", "rx_tail") == 128
    assert ffi.offsetof("struct fayt_stream_end", "state") == 192
    assert ffi.sizeof("struct fayt_stream_end") <= lib.FAYT_STREAM_HEADER_SIZE
    assert mmap.PAGESIZE == lib.FAYT_STREAM_HEADER_SIZE
