"""Messages by reference on a channel (CHAN_PASS 45, CHAN_TAKE 46;
End.send_share, lp.Shared; docs/channels.md): a share-point or an ANON
portal handed to the peer between processes, read-only, writable and as a
sealed copy, the sender's continuing write access, split share-points
(more on portals: test_stream_portal_ref.py); the rights as uid
65534; a hostile sender of uid 65534 naming objects it does not own, in
raw requests and in raw frames."""
import errno
import json
import os
import struct

import pytest

import libportal
from libportal._abi import lib, CHAN_PASS_REQ, CHAN_TAKE_REQ
from support.children import WAIT

NOBODY = 65534

# The sender: a share-point of argv[2] bytes (argv[3] "portal": an ANON
# portal), filled with _pattern; on each line of stdin it does what it says.
SENDER = """
end = lp.connect(sys.argv[1], timeout=WAIT)
n = int(sys.argv[2])
portal = sys.argv[3:] == ["portal"]
if portal:
    obj = lp.portal(lp.ANON, lp.PROT_RW, n)
    ref, flags, n = obj.handle, lp._lib.FAYT_PASS_PORTAL, obj.length
    def poke(i, v): obj.buf[i] = v
    def peek(i): return obj.buf[i]
    def fill(d): obj.buf[:] = d
    drop = obj.unmap
else:
    obj = lp.share_create(sys.argv[1] + ".data", n)
    ref, flags, n = obj.sp_id, 0, obj.length
    def poke(i, v): obj.write(i, bytes([v]))
    def peek(i): return obj.read(i, 1)[0]
    def fill(d): obj.write(0, d)
    drop = obj.destroy
fill(bytes(range(256)) * (n // 256) + bytes(n % 256))
print(n, flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "send":
        kw = {"copy": "copy" in cmd, "writable": "writable" in cmd}
        print(end.send_share(obj, **kw), flush=True)
    elif cmd[0] == "poke":
        poke(int(cmd[1]), int(cmd[2]))
        print("poked", flush=True)
    elif cmd[0] == "peek":
        print(peek(int(cmd[1])), flush=True)
    elif cmd[0] == "unmapped":     # libportal's answer, then faytd's to the raw request
        drop()
        out = []
        for ask in (lambda: end.send_share(obj), lambda: lp.connection().call(
                lp._lib.FAYT_SYS_CHAN_PASS, struct.pack("<QQII", end.id, ref, flags, 0))):
            try:
                ask()
                out.append("ok")
            except OSError as e:
                out.append(errno.errorcode[e.errno])
        print(" ".join(out), flush=True)
    elif cmd[0] == "bytes":
        end.send(b"plain")
        print("sent", flush=True)
""".replace("WAIT", str(WAIT))


def _pattern(n):
    return bytes(range(256)) * (n // 256) + bytes(n % 256)


def _perms(addr):
    """The permissions of the mapping at addr in /proc/self/maps."""
    with open("/proc/self/maps") as f:
        return [line.split()[1] for line in f if int(line.split("-")[0], 16) == addr]


@pytest.mark.parametrize("kind,size", [("share", 100), ("share", 1 << 20),  # a split one
                                       ("portal", 4096), ("portal", 1 << 20)])
def test_stream_ref_memory_by_reference_between_processes(lp, spawn, kind, size):
    """A share-point or an ANON portal (End.send_share) from a sender process."""
    name = "chan.ref.%s%d" % (kind, size)
    lst = lp.listen(name)
    snd = spawn(SENDER, args=[name, size, kind])
    end = lst.accept(timeout=WAIT)
    length = int(snd.expect())
    try:
        # Read-only: the peer's own memory, which the sender may still write.
        snd.send("send")
        assert int(snd.expect()) == length
        got = end.recv(timeout=WAIT)
        assert isinstance(got, libportal.Shared) and len(got) == length
        assert not got.copy and not got.writable and got.buffer.readonly
        assert got.portal == (kind == "portal")
        assert bytes(got.buffer) == _pattern(length)
        perms = _perms(got._map.addr)
        assert perms and all("w" not in p for p in perms), perms
        snd.send("poke %d 7" % (length - 1))
        assert snd.expect() == "poked"
        assert got.buffer[length - 1] == 7              # the sender kept write access
        with pytest.raises(TypeError):
            got.buffer[0] = 1
        # A copy: sealed, later writes of the sender do not reach it.
        snd.send("send copy")
        snd.expect()
        with end.recv(timeout=WAIT) as cp:
            assert cp.copy and cp.buffer.readonly and cp.buffer[length - 1] == 7
            snd.send("poke %d 9" % (length - 1))
            assert snd.expect() == "poked"
            assert cp.buffer[length - 1] == 7
            assert bytes(cp.buffer[:length - 1]) == _pattern(length)[:length - 1]
            assert got.buffer[length - 1] == 9          # the plain one follows
        # Writable: the receiver's writes reach the sender.
        snd.send("send writable")
        snd.expect()
        with end.recv(timeout=WAIT) as w:
            assert w.writable and not w.buffer.readonly
            w.buffer[3] = 201
            snd.send("peek 3")
            assert snd.expect() == "201"
            w.buffer[3] = 3
        # Sent again: the same mapping, no faytd call on either side.
        snd.send("send")
        snd.expect()
        with end.recv(timeout=WAIT) as again:
            assert again._map is got._map and again.buffer[length - 1] == 9
        # recv_into never takes a reference (nothing taken); recv does.
        snd.send("send")
        snd.expect()
        snd.send("bytes")
        assert snd.expect() == "sent"
        with pytest.raises(OSError) as e:
            end.recv_into(bytearray(64), timeout=WAIT)
        assert e.value.errno == errno.ENOMSG and "take it with recv()" in str(e.value)
        end.recv(timeout=WAIT).close()
        assert end.recv(timeout=WAIT) == b"plain"
        # What the sender no longer maps: refused by libportal and by
        # faytd's record (EPERM for a share-point id, EBADF for a handle);
        # what the receiver mapped stays readable.
        snd.send("unmapped")
        assert snd.expect() == ("EPERM EPERM" if kind == "share" else "EBADF EBADF")
        assert got.buffer[length - 1] == 9 and bytes(got.buffer[:5]) == _pattern(length)[:5]
        got.close()
        got.close()                                     # idempotent
        with pytest.raises(libportal.WouldBlock):
            end.recv(timeout=0)                         # nothing else came
    finally:
        end.close()
        lst.close()
        snd.kill()


def test_stream_ref_bad_arguments_in_process(lp):
    lst = lp.listen("chan.refbad")
    a = lp.connect("chan.refbad")
    b = lst.accept(timeout=0)
    sp = lp.share_create("chan.refbad.sp", 4096)
    try:
        for bad in (None, b"x", 3):
            with pytest.raises(libportal.InvalidArgument) as e:
                a.send_share(bad)
            assert "sp: " in str(e.value)
        with pytest.raises(libportal.InvalidArgument) as e:
            a.send_share(sp, copy=True, writable=True)
        assert "COPY hands over an immutable copy" in str(e.value)
        # More untaken passes than FAYT_PASS_PENDING_MAX: ENOSPC, and a frame
        # that could not go withdraws its pass (the ring stays consistent).
        for _ in range(lib.FAYT_PASS_PENDING_MAX):
            a.send_share(sp, copy=True)             # copies never go again: each passes
        with pytest.raises(OSError) as e:
            a.send_share(sp, copy=True)
        assert e.value.errno == errno.ENOSPC and "FAYT_PASS_PENDING_MAX" in str(e.value)
        for _ in range(lib.FAYT_PASS_PENDING_MAX):
            b.recv(timeout=0).close()
        # Both ends in one context: each end's passes go to the other.
        b.send_share(sp)
        with a.recv(timeout=0) as s:
            assert len(s) == sp.length
    finally:
        a.close()
        b.close()
        sp.destroy()
        lst.close()


def test_stream_ref_sent_again_reuses_the_mapping_and_a_forged_again_is_eproto(lp):
    lst = lp.listen("chan.again")
    a = lp.connect("chan.again", ring_bytes=4096)
    b = lst.accept(timeout=0)
    sps = [lp.share_create("chan.again.%d" % i, 4096) for i in range(10)]
    try:
        for i, sp in enumerate(sps):
            sp.write(0, b"sp %d" % i)
        first = None
        for i, sp in enumerate(sps):                # 10 share-points: 2 leave the cache
            a.send_share(sp)
            s = b.recv(timeout=0)
            assert bytes(s.buffer[:4]) == b"sp %d" % i
            if i == 0:
                first = s                           # kept open past its eviction
            else:
                s.close()
        assert bytes(first.buffer[:4]) == b"sp 0"
        sps[0].write(0, b"SP")
        assert bytes(first.buffer[:2]) == b"SP"     # still the sender's memory
        first.close()
        for i in (9, 0, 5, 0):                      # cached, evicted (passes again), cached
            a.send_share(sps[i])
            with b.recv(timeout=0) as s:
                assert bytes(s.buffer[3:4]) == str(i).encode()
                assert s.writable is False
        # A frame naming a ticket this end never took, as if sent again.
        from libportal._abi import STREAM_REF
        m = a._mine_map
        head = struct.unpack_from("<Q", m, 64)[0]
        pos = head % 4096
        frame = struct.pack("<Q", 24 | (1 << 32)) + STREAM_REF.pack(999, 4096, 0x100, 0)
        for k in range(0, 32, 8):
            struct.pack_into("<Q", m, 4096 + (pos + k) % 4096,
                             struct.unpack_from("<Q", frame, k)[0])
        struct.pack_into("<Q", m, 64, head + 32)
        with pytest.raises(libportal.ProtocolError):
            b.recv(timeout=0)
        with pytest.raises(libportal.ChannelReset):
            b.recv(timeout=0)
    finally:
        a.close()
        b.close()
        for sp in sps:
            sp.destroy()
        lst.close()


POLICY = {
    "categories": {
        "core": {"classes": ["SHARE", "DIRECT", "ANON", "COW", "SPECIAL"],
                 "notify_handlers": True, "notify": ["*"],
                 "shared_names": {"create": ["pub.*"]}},
        "server": {"classes": ["SHARE", "ANON"], "notify": ["$uid"],
                   "shared_names": {"attach": ["pub.*"]}},
    },
    "rules": [{"uid": 0, "category": "core"}],
    "default": "server",
}

# A hostile peer of uid 65534: argv[1] the socket, argv[2] root's
# share-point id.  Raw CHAN_PASS/CHAN_TAKE requests naming what it does not
# own, then what it was passed (read-only), then a raw REF frame.
HOSTILE = """
import mmap
c = lp.Connection(sys.argv[1])
e = lp.connect("pub.ref", connection=c, ring_bytes=4096)
PASS, TAKE = lp._lib.FAYT_SYS_CHAN_PASS, lp._lib.FAYT_SYS_CHAN_TAKE
def ask(op, body):
    try:
        c.call(op, body)
        return "ok"
    except OSError as x:
        return errno.errorcode[x.errno] + ": " + str(x)
out = {
    "root_sp": ask(PASS, struct.pack("<QQII", e.id, int(sys.argv[2]), 0, 0)),
    "no_sp": ask(PASS, struct.pack("<QQII", e.id, 0, 0, 0)),
    "huge_sp": ask(PASS, struct.pack("<QQII", e.id, 1 << 40, 0, 0)),
    "short": ask(PASS, struct.pack("<QQI", e.id, 1, 0)),
    "flags": ask(PASS, struct.pack("<QQII", e.id, 1, 0x100, 0)),
    "copy_write": ask(PASS, struct.pack("<QQII", e.id, 1, 3, 0)),
    "reserved": ask(PASS, struct.pack("<QQII", e.id, 1, 0, 5)),
    "not_its_channel": ask(PASS, struct.pack("<QQII", 999999, 1, 0, 0)),
    "acceptor_side": ask(PASS, struct.pack("<QQII", e.id, 1, 0x10, 0)),
    "cancel": ask(PASS, struct.pack("<QQII", e.id, 1, 4, 0)),
    "take_unpassed": ask(TAKE, struct.pack("<QQ", e.id, 1)),
    "take_other": ask(TAKE, struct.pack("<QQ", 999999, 1)),
}
print(json.dumps(out), flush=True)
# What root passed it: read-only here, and the mapping has no write right.
s = e.recv(timeout=WAIT)
lo = s._map.addr
perms = [l.split()[1] for l in open("/proc/self/maps")
         if int(l.split("-")[0], 16) == lo]
print(json.dumps([type(s).__name__, s.buffer.readonly, perms, s.buffer[:4].tobytes().hex()]),
      flush=True)
s.close()
# Its own share-point, passed to root the honest way.
mine = lp.share_create("mine", 4096, connection=c)
mine.write(0, b"from nobody")
e.send_share(mine)
print("shared", flush=True)
sys.stdin.readline()
# A raw REF frame naming ticket 77, which faytd never gave it.
m = e._mine_map
head = struct.unpack_from("<Q", m, 64)[0]
pos = head % 4096
struct.pack_into("<Q", m, 4096 + pos, 24 | (1 << 32))
struct.pack_into("<QQII", m, 4096 + (pos + 8) % 4096, 77, 4096, 0, 0)
struct.pack_into("<Q", m, 64, head + 32)
print("forged", flush=True)
sys.stdin.readline()
""".replace("WAIT", str(WAIT))


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a hostile peer as uid 65534: needs root")
def test_stream_ref_rights_and_a_hostile_sender_as_uid_65534(world_faytd, spawn, as_user):
    d = world_faytd(POLICY)
    root = libportal.Connection(d.socket)
    try:
        lst = libportal.listen("pub.ref", connection=root)
        sp = libportal.share_create("root.secret", 4096, connection=root)
        sp.write(0, b"\xca\xfe\xba\xbe")
        bad = spawn(HOSTILE, d.env(), as_user=as_user, uid=NOBODY,
                    args=[d.socket, sp.sp_id])
        end = lst.accept(timeout=WAIT)
        out = json.loads(bad.expect())
        assert out["root_sp"].startswith("EPERM: ") and \
            "is not a share-point this context maps" in out["root_sp"]
        assert out["no_sp"].startswith("EPERM") and out["huge_sp"].startswith("EPERM")
        assert out["short"].startswith("EINVAL: ") and "chan_pass: expected 24 bytes" \
            in out["short"]
        assert out["flags"].startswith("EINVAL: ") and "flags: unknown bits 0x100" in out["flags"]
        assert out["copy_write"].startswith("EINVAL")
        assert out["reserved"].startswith("EINVAL: ") and "reserved" in out["reserved"]
        for k in ("not_its_channel", "acceptor_side"):
            assert out[k].startswith("ENOENT: ") and "is not an open channel" in out[k], out
        assert out["cancel"].startswith("ENOENT: ") and "untaken pass" in out["cancel"]
        for k in ("take_unpassed", "take_other"):
            assert out[k].startswith("EPERM: ") and "ticket: 1 is not a share-point passed" \
                in out[k], out
        # root hands it its share-point read-only: it cannot write it.
        end.send_share(sp)
        kind, readonly, perms, head = json.loads(bad.expect())
        assert kind == "Shared" and readonly and head == "cafebabe"
        assert perms and all("w" not in p for p in perms), perms
        assert bad.expect() == "shared"
        with end.recv(timeout=WAIT) as s:
            assert bytes(s.buffer[:11]) == b"from nobody"
        # A forged frame: faytd refuses the ticket, root sees a protocol
        # break and the channel is reset, never a crash or a hang.
        bad.send("")
        assert bad.expect() == "forged"
        with pytest.raises(libportal.ProtocolError) as e:
            end.recv(timeout=WAIT)
        assert e.value.errno == errno.EPROTO
        with pytest.raises(libportal.ChannelReset):
            end.recv(timeout=WAIT)
        end.close()
        bad.send("")
        bad.kill()
        sp.destroy()
        lst.close()
    finally:
        root.close()


def test_stream_ref_wire_structs_match_the_header():
    from libportal._abi import ffi
    assert CHAN_PASS_REQ.size == ffi.sizeof("struct fayt_chan_pass_req") == 24
    assert CHAN_TAKE_REQ.size == ffi.sizeof("struct fayt_chan_take_req") == 16
    assert ffi.sizeof("struct fayt_stream_ref") == 24
    assert lib.FAYT_SYS_CHAN_PASS == 45 and lib.FAYT_SYS_CHAN_TAKE == 46
    assert struct.calcsize("<QQII") == 24
