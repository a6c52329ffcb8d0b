"""DIRECT portals over RAM and DMA grants (docs/portals.md#direct-portals),
with real processes: aliasing another context's frames, frame lifetimes,
grants and their refusals (uid 65534), bad input, and a raw-bytes attacker
that names frames it was not granted."""
import errno
import json
import os
import time

import pytest

import libportal
from libportal._abi import lib, GRANT_REQ, HANDLE_REQ, PORTAL_REPLY
from libportal.portal_req import encode_portal_req

from support.children import wait_until
from support.daemon import NOBODY, fayt_objects, state, wait_state

PAGE = lib.FAYT_PAGE_SIZE
RW, RO = libportal.PROT_RW, libportal.PROT_READ
DIRECT = libportal.DIRECT
RAM_BASE = 0x100000

# A portal owner: makes an ANON portal of n pages, writes its tag at the
# start of each page, says its context id and frames, then obeys lines:
# "read i" prints page i's first 16 bytes, "grant ..." grants, "unmap".
OWNER = r"""
n = int(sys.argv[1]) if len(sys.argv) > 1 else 2
c = lp.connection()
p = lp.portal(lp.ANON, lp.PROT_RW, n * 4096)
for i in range(n):
    p.buf[i * 4096:i * 4096 + 7] = b"owner-%d" % i
print(json.dumps([c.context_id, list(p.paddr)]))
for line in sys.stdin:
    w = line.split()
    try:
        if w[0] == "read":
            i = int(w[1])
            print(bytes(p.buf[i * 4096:i * 4096 + 16]).rstrip(b"\0").decode())
        elif w[0] == "grant":           # grant context|category <to> <prot> [revoke]
            kw = {"category": int(w[2])} if w[1] == "category" else {"to": int(w[2])}
            lp.grant(p, prot=int(w[3]), revoke=len(w) > 4, **kw)
            print("ok")
        elif w[0] == "unmap":
            p.unmap()
            print("ok")
    except OSError as e:
        print("%s %s" % (errno.errorcode[e.errno], e))
"""


def owner(spawn, d, pages=2, **kw):
    o = spawn(OWNER, d.env(), args=[pages], **kw)
    cid, paddr = json.loads(o.expect())
    return o, cid, paddr


def test_direct_aliases_another_contexts_anon_portal(spawn, faytd, conn_to):
    """A core context's DIRECT over the frames of another context's ANON
    portal sees and changes the same bytes."""
    o, _, paddr = owner(spawn, faytd)
    c = conn_to(faytd)
    p = libportal.portal(DIRECT, RW, 2 * PAGE, paddr=paddr, connection=c)
    assert p.paddr == tuple(paddr)
    assert bytes(p.buf[0:7]) == b"owner-0" and bytes(p.buf[PAGE:PAGE + 7]) == b"owner-1"
    p.buf[PAGE:PAGE + 6] = b"direct"
    o.send("read 1")
    assert o.expect() == "direct1"
    # The frames in another order: page 0 of the mapping is the owner's page 1.
    q = libportal.portal(DIRECT, RO, 2 * PAGE, paddr=paddr[::-1], connection=c)
    assert bytes(q.buf[0:7]) == b"direct1" and bytes(q.buf[PAGE:PAGE + 7]) == b"owner-0"
    with pytest.raises(TypeError):
        q.buf[0:1] = b"x"               # read-only: PROT_READ
    q.unmap()
    p.unmap()


def test_direct_frame_outlives_its_portal(spawn, faytd, conn_to):
    """A frame stays allocated while a DIRECT mapping names it, after its
    portal's owner unmapped it and died; it is freed with the last mapping."""
    c = conn_to(faytd)
    before = state(faytd)
    o, _, paddr = owner(spawn, faytd, pages=3)
    p = libportal.portal(DIRECT, RW, PAGE, paddr=[paddr[1]], connection=c)
    o.send("unmap")
    assert o.expect() == "ok"
    o.kill()
    # The two frames nobody names are free again; the named one is not.
    assert wait_state(faytd, dict(before, mappings=before["mappings"] + 1,
                                 free_frames=before["free_frames"] - 1)) \
        == dict(before, mappings=before["mappings"] + 1, free_frames=before["free_frames"] - 1)
    assert bytes(p.buf[0:7]) == b"owner-1"
    with pytest.raises(libportal.PortalError) as ei:
        libportal.portal(DIRECT, RW, PAGE, paddr=[paddr[0]], connection=c)
    assert ei.value.errno == errno.EFAULT
    assert "morphology.paddr[0]: frame %#x is free" % paddr[0] in str(ei.value)
    p.unmap()
    assert wait_state(faytd, before) == before


@pytest.mark.parametrize("length, paddr, err, msg", [
    (PAGE, [RAM_BASE + 1], errno.EINVAL, "morphology.paddr[0]: 0x100001 is not 4 KiB aligned"),
    (2 * PAGE, ["ok", RAM_BASE + 0x800], errno.EINVAL,
     "morphology.paddr[1]: 0x100800 is not 4 KiB aligned"),
    (PAGE, [0x1000], errno.EFAULT, "morphology.paddr[0]: 0x1000 is not backed"),
    (PAGE, [1 << 40], errno.EFAULT, "morphology.paddr[0]: 0x10000000000 is not backed"),
    (PAGE + 1, ["ok", "ok"], errno.EINVAL, "length: 4097 is not a multiple of 4096"),
])
def test_direct_bad_input_names_the_field(faytd, conn_to, length, paddr, err, msg):
    """Unaligned frames or length are EINVAL, frames outside RAM EFAULT, each
    naming the field; nothing is mapped."""
    c = conn_to(faytd)
    p = libportal.portal(libportal.ANON, RW, PAGE, connection=c)
    before = state(faytd)
    paddr = [p.paddr[0] if a == "ok" else a for a in paddr]
    with pytest.raises(libportal.PortalError) as ei:
        libportal.portal(DIRECT, RW, length, paddr=paddr, connection=c)
    assert ei.value.errno == err and msg in str(ei.value), str(ei.value)
    assert state(faytd) == before
    p.unmap()


# -- grants, other uids, and an attacker ---------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as "
                                                          "uid 65534")

DRIVER_POLICY = {
    "categories": {"core": {"classes": ["SHARE", "DIRECT", "ANON", "COW", "SPECIAL"],
                            "notify_handlers": True, "shared_names": ["dma-*"]},
                   "driver": {"classes": ["SHARE", "DIRECT", "ANON"],
                              "shared_names": ["dma-*"]},
                   "server": {"classes": ["SHARE", "ANON"]}},
    "rules": [{"uid": "$owner", "category": "core"}, {"uid": 0, "category": "core"},
              {"uid": NOBODY, "category": "driver"}],
    "default": "server",
}

# A DIRECT client (as uid 65534): for each line "<prot> <paddr,...>" it
# tries a DIRECT portal over those frames and prints the outcome: "ok
# <first bytes of each page>" or the errno's name and message.  It sends
# the request as raw bytes (struct portal_req, paddr[]) with its own
# connection's transport, so nothing of libportal's checks stands between
# it and faytd; a granted mapping is checked by mapping it with libportal.
ATTACKER = r"""
from libportal._abi import lib, PORTAL_REQ, HANDLE_REQ, GRANT_REQ, portal_reply
c = lp.Connection(sys.argv[1])
print(json.dumps([c.context_id, c.category]))
for line in sys.stdin:
    w = line.split()
    try:
        if w[0] == "raw":               # raw <prot> <paddr,...>: the bytes of a PORTAL
            paddr = [int(x, 0) for x in w[2].split(",")]
            n = len(paddr) * 4096
            body = (PORTAL_REQ.pack(lib.FAYT_PORTAL_DIRECT, int(w[1]), n, 0, 0, 0, 0, 0, 0, n)
                    + struct.pack("<%dQ" % len(paddr), *paddr))
            data, fds = c.call(lib.FAYT_SYS_PORTAL, body)
            for fd in fds:
                os.close(fd)
            c.call(lib.FAYT_SYS_UNMAP, HANDLE_REQ.pack(portal_reply(data).handle))
            print("ok %d" % len(fds))
        elif w[0] == "short":           # a DIRECT of 2 pages naming 1 frame
            n = 2 * 4096
            body = (PORTAL_REQ.pack(lib.FAYT_PORTAL_DIRECT, 1, n, 0, 0, 0, 0, 0, 0, n)
                    + struct.pack("<Q", 0x100000))
            c.call(lib.FAYT_SYS_PORTAL, body)
            print("ok")
        elif w[0] == "map":             # map <prot> <paddr,...>
            paddr = [int(x, 0) for x in w[2].split(",")]
            p = lp.portal(lp.DIRECT, int(w[1]), 4096 * len(paddr), paddr=paddr, connection=c)
            print("ok " + ",".join(bytes(p.buf[i * 4096:i * 4096 + 7]).decode()
                                   for i in range(len(paddr))))
            p.unmap()
        elif w[0] == "grant":           # grant <handle> <kind> <to> <prot>: a forged GRANT
            c.call(lib.FAYT_SYS_GRANT, GRANT_REQ.pack(*[int(x) for x in w[1:5]], 0))
            print("ok")
        elif w[0] == "attach":          # attach <name> <prot>
            sp = lp.share_attach(w[1], int(w[2]), connection=c)
            print("ok " + sp.read(0, 8).decode())
            sp.unmap()
        elif w[0] == "sp":              # sp <name> <paddr,...>: SHARE|DIRECT, made and destroyed
            paddr = [int(x, 0) for x in w[2].split(",")]
            sp = lp.portal(lp.SHARE | lp.DIRECT, lp.PROT_RW, 4096 * len(paddr), identifier=w[1],
                           create=True, paddr=paddr, connection=c)
            sp.destroy()
            print("ok")
        elif w[0] == "anon":            # an ANON portal of its own, and its handle
            p = lp.portal(lp.ANON, lp.PROT_RW, 4096, connection=c)
            print("ok %d %d" % (p.handle, p.paddr[0]))
    except OSError as e:
        print("%s %s" % (errno.errorcode[e.errno], e))
"""


def attacker(spawn, as_user, d):
    a = spawn(ATTACKER, d.env(), as_user=as_user, uid=NOBODY, args=[d.socket])
    cid, cat = json.loads(a.expect())
    assert cat == lib.FAYT_CATEGORY_DRIVER
    return a, cid


def ask(child, line):
    child.send(line)
    return child.expect()


@needs_root
def test_direct_grants_and_their_refusals(spawn, as_user, world_faytd):
    """A driver context (uid 65534) may map only frames of portals granted
    to it, within the grant's prot: ungranted frames, a wider prot, a grant
    to another context, a revoked grant are EPERM, and nothing is mapped."""
    d = world_faytd(DRIVER_POLICY)
    o, _, paddr = owner(spawn, d)
    a, acid = attacker(spawn, as_user, d)
    frames = ",".join(hex(x) for x in paddr)
    before = d.state()
    got = ask(a, "map 1 " + frames)
    assert got.startswith("EPERM") and ("morphology.paddr[0]: frame %#x is in no portal or "
                                        "share-point granted to this context" % paddr[0]) in got
    assert ask(o, "grant context %d 1" % (acid + 1000)) == "ok"     # another context's grant
    assert ask(a, "map 1 " + frames).startswith("EPERM")
    assert ask(o, "grant context %d 1" % acid) == "ok"
    assert ask(a, "map 1 " + frames) == "ok owner-0,owner-1"
    got = ask(a, "map 3 " + frames)
    assert got.startswith("EPERM") and "prot 0x3 asked, its grant allows 0x1" in got
    assert ask(o, "grant category %d 3" % lib.FAYT_CATEGORY_DRIVER) == "ok"
    assert ask(a, "map 3 " + frames) == "ok owner-0,owner-1"
    assert ask(o, "grant category %d 3 revoke" % lib.FAYT_CATEGORY_DRIVER) == "ok"
    assert ask(o, "grant context %d 1 revoke" % acid) == "ok"
    assert ask(a, "map 1 " + frames).startswith("EPERM")
    assert d.wait_state(before) == before
    # A grant wider than the mapping is EACCES.
    assert ask(o, "grant context %d 7" % acid).startswith("EACCES")


@needs_root
def test_direct_attacker_reaches_no_frame_it_was_not_granted(spawn, as_user, world_faytd):
    """Raw PORTAL bodies from uid 65534 naming frames of a portal not granted
    to it, or mixing granted frames with one that is not, are EPERM with no
    descriptor; forged GRANTs of handles that
    are not its own are EBADF; the granted frame alone maps."""
    d = world_faytd(DRIVER_POLICY)
    o, ocid, paddr = owner(spawn, d)
    a, acid = attacker(spawn, as_user, d)
    assert ask(o, "grant context %d 1" % acid) == "ok"
    mine = ask(a, "anon").split()
    assert mine[0] == "ok"
    o2, _, other = owner(spawn, d, pages=1)
    before = d.state()
    for frames in ([other[0]], [paddr[0], other[0]], [other[0], paddr[1]]):
        got = ask(a, "raw 1 " + ",".join(hex(x) for x in frames))
        assert got.startswith("EPERM"), (frames, got)
    # The handles of other contexts' portals mean nothing in its context.
    for h in range(1, 8):
        if h != int(mine[1]):
            assert ask(a, "grant %d 2 %d 1" % (h, lib.FAYT_GRANT_CATEGORY)).startswith("EBADF")
    assert ask(a, "raw 1 %#x" % paddr[0]) == "ok 1"
    assert d.wait_state(before) == before


# -- the C path (faytd/core/direct.c) --------------------------------------------

def fast_portals(d):
    """PORTAL calls faytd's C path has served, and those its Python has."""
    c = libportal.Connection(d.socket, faytd_uid=getattr(d, "uid", None))
    try:
        calls = c.stats()["calls"]["portal"]
    finally:
        c.close()
    return calls["fast"], calls["python"]


def portal_objects(d):
    """The objects of portals and share-points faytd's keeper holds (not
    context pages: those of the connections a check opens go soon after)."""
    return [o for o in fayt_objects([d.proc.pid]) if not o.startswith("fayt.ctx.")]


def objects_settle(d, want, timeout=15):
    """The objects faytd's keeper holds, polled until they equal `want`, or
    (a number) until there are that many (a release reaches the keeper
    through the pool's thread)."""
    deadline = time.monotonic() + timeout
    while True:
        got = portal_objects(d)
        if (len(got) if isinstance(want, int) else got) == want \
                or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


@needs_root
def test_direct_c_path_refusals_from_raw_bytes(spawn, as_user, world_faytd):
    """A granted frame is mapped by the C path; every request it cannot
    answer goes to Python with nothing changed, which refuses it with the
    same errno and message as ever: raw bodies from uid 65534 naming an
    unaligned, an unbacked or a free frame, a frame of a portal not granted
    to it, a prot wider than the grant, a revoked grant, the frames of an
    unmapped portal, fewer paddr[] entries than the length asks.  No
    mapping, frame or object is left behind."""
    d = world_faytd(DRIVER_POLICY)
    o, _, paddr = owner(spawn, d)
    o2, _, other = owner(spawn, d, pages=1)
    a, acid = attacker(spawn, as_user, d)
    assert ask(o, "grant context %d 1" % acid) == "ok"
    before, objects = d.state(), portal_objects(d)
    # (A connection's first call goes to Python, which checks its thread.)
    assert ask(a, "raw 1 %#x" % paddr[0]) == "ok 1"
    fast, python = fast_portals(d)
    assert ask(a, "raw 1 %#x,%#x" % (paddr[1], paddr[0])) == "ok 1"
    assert fast_portals(d) == (fast + 1, python)        # served in C
    c = libportal.Connection(d.socket)
    last = RAM_BASE + (c.stats()["frames"]["total"] - 1) * PAGE    # RAM's last: never used
    c.close()
    cases = [
        ("raw 1 %#x" % (paddr[0] + 8), "EINVAL", "morphology.paddr[0]: %#x is not 4 KiB "
         "aligned" % (paddr[0] + 8)),
        ("raw 1 %#x,%#x" % (paddr[0], 1 << 40), "EFAULT", "morphology.paddr[1]: 0x10000000000 "
         "is not backed"),
        ("raw 1 %#x" % last, "EFAULT", "morphology.paddr[0]: frame %#x is free" % last),
        ("raw 1 %#x,%#x" % (paddr[0], other[0]), "EPERM", "morphology.paddr[1]: frame %#x is "
         "in no portal or share-point granted to this context" % other[0]),
        ("raw 3 %#x" % paddr[0], "EPERM", "prot 0x3 asked, its grant allows 0x1"),
    ]
    for line, err, msg in cases:
        got = ask(a, line)
        assert got.startswith(err) and msg in got, (line, got)
    assert ask(o, "grant context %d 1 revoke" % acid) == "ok"
    got = ask(a, "raw 1 %#x" % paddr[0])
    assert got.startswith("EPERM") and "granted to this context" in got
    assert ask(o, "grant context %d 1" % acid) == "ok"
    assert ask(a, "raw 1 %#x" % paddr[0]) == "ok 1"
    assert d.wait_state(before) == before
    assert objects_settle(d, objects) == objects
    # Fewer paddr[] entries than the length asks: the decoder's refusal.
    a.send("short")
    got = a.expect()
    assert got.startswith("EFAULT") and "morphology.paddr: 2 entries named, fewer sent" in got
    # The grant goes with its portal: the frames are free then.
    assert ask(o, "unmap") == "ok"
    got = ask(a, "raw 1 %#x" % paddr[0])
    assert got.startswith("EFAULT") and "is free" in got, got
    o.kill()


def test_direct_c_path_frame_outlives_its_portal(spawn, faytd, conn_to):
    """A DIRECT mapping the C path made (a granted frame) keeps its frame and
    its object after the portal's owner unmapped it and died; both go with
    its unmap."""
    c = conn_to(faytd)
    before, objects = state(faytd), portal_objects(faytd)
    o, _, paddr = owner(spawn, faytd, pages=3)
    assert ask(o, "grant context %d 3" % c.context_id) == "ok"
    libportal.portal(DIRECT, RW, PAGE, paddr=[paddr[0]], connection=c).unmap()
    fast, python = fast_portals(faytd)   # (the first call went to Python: its thread)
    p = libportal.portal(DIRECT, RW, PAGE, paddr=[paddr[1]], connection=c)
    assert fast_portals(faytd) == (fast + 1, python)
    assert ask(o, "unmap") == "ok"
    o.kill()
    want = dict(before, mappings=before["mappings"] + 1, free_frames=before["free_frames"] - 1)
    assert wait_state(faytd, want) == want
    # Its object stays.
    assert len(objects_settle(faytd, len(objects) + 1)) == len(objects) + 1
    assert bytes(p.buf[0:7]) == b"owner-1"
    p.buf[0:5] = b"still"
    assert bytes(p.buf[0:7]) == b"still-1"
    p.unmap()
    assert wait_state(faytd, before) == before
    assert objects_settle(faytd, objects) == objects


def test_cow_c_path_view_becomes_pythons_when_asked_for_addresses(faytd, conn_to):
    """A COW view at least on write over a granted portal is made by the C
    path; physical() of it (COW_PADDR) hands it to faytd's Python, which
    gives its written page a frame; its unmap frees every frame and the
    view's charge."""
    c = conn_to(faytd)
    objects0 = portal_objects(faytd)
    src = libportal.portal(libportal.ANON, RW, 2 * PAGE, connection=c)
    src.buf[0:3] = b"src"
    libportal.grant(src, to=c.context_id)
    before, objects = state(faytd), portal_objects(faytd)
    ram = c.stats()["limits"]["ram"]
    fast, python = fast_portals(faytd)
    v = libportal.portal(COW, RW, 2 * PAGE, paddr=src.paddr, connection=c)
    assert fast_portals(faytd) == (fast + 1, python)
    assert c.stats()["limits"]["ram"] == ram + 2 * PAGE     # charged at creation
    assert bytes(v.buf[0:3]) == b"src"
    v.buf[0:4] = b"view"
    assert bytes(src.buf[0:4]) == b"src\0"
    got = libportal.physical(v)
    assert got[1] == src.paddr[1] and got[0] not in src.paddr
    assert state(faytd)["free_frames"] == before["free_frames"] - 1
    assert libportal.physical(v) == got                 # asked again: the same frame
    with pytest.raises(libportal.PortalError) as ei:     # not granted as a portal
        libportal.grant(v, to=c.context_id)
    assert ei.value.errno == errno.EINVAL
    v.unmap()
    assert wait_state(faytd, before) == before
    assert c.stats()["limits"]["ram"] == ram
    assert objects_settle(faytd, objects) == objects
    src.unmap()
    assert objects_settle(faytd, objects0) == objects0


def _raw_scenario(c):
    """DIRECT and COW calls as raw bytes on connection c: each reply's body
    and its descriptors' access modes, or the refusal's errno and message."""
    import fcntl
    src = libportal.portal(libportal.ANON, RW, 3 * PAGE, connection=c)
    libportal.grant(src, to=c.context_id)
    pa = list(src.paddr)
    out = []
    for t, prot, frames, mode in ((DIRECT, RW, pa[:1], 0), (DIRECT, RO, pa[::-1], 0),
                                  (COW, RW, pa, 0), (COW, RO, pa[1:], 0),
                                  (COW, RW, pa * 3, 0), (DIRECT, RW, [pa[0] + 1], 0)):
        body = encode_portal_req(t, prot, PAGE * len(frames), share_type=mode, paddr=frames)
        try:
            data, fds = c.call(lib.FAYT_SYS_PORTAL, body)
        except OSError as e:
            out.append((e.errno, str(e)))
            continue
        out.append((data.hex(), [fcntl.fcntl(f, fcntl.F_GETFL) & os.O_ACCMODE for f in fds]))
        for f in fds:
            os.close(f)
        c.call(lib.FAYT_SYS_UNMAP, HANDLE_REQ.pack(PORTAL_REPLY.unpack_from(data)[0]))
    src.unmap()
    return out


def test_direct_and_cow_both_paths_agree(fresh_faytd, conn_to):
    """The same DIRECT and COW calls, on a faytd whose C path serves them
    and on one with fast_syscalls off: the same replies, byte for byte,
    the same descriptor modes, the same refusals (a view past the RAM
    quota, an unaligned frame)."""
    cfg = {"max_ram_per_context": "32KiB"}
    fast = fresh_faytd(config=cfg, ram="16MiB")
    slow = fresh_faytd(config=dict(cfg, fast_syscalls=False), ram="16MiB")
    c1, c2 = conn_to(fast), conn_to(slow)
    before = fast_portals(fast)[0]
    got = _raw_scenario(c1)
    assert got == _raw_scenario(c2)
    assert [x[0] for x in got[-2:]] == [errno.ENOMEM, errno.EINVAL], got[-2:]
    # The four that mapped were served in C (and the ANON portal).
    assert fast_portals(fast)[0] - before >= 4
    assert fast_portals(slow)[0] == 0


def test_direct_c_path_mapping_is_not_granted_again(faytd, conn_to):
    """A DIRECT mapping (made by the C path) is not a portal one may grant:
    EINVAL, as for one Python made."""
    c = conn_to(faytd)
    src = libportal.portal(libportal.ANON, RW, PAGE, connection=c)
    libportal.grant(src, to=c.context_id)
    p = libportal.portal(DIRECT, RW, PAGE, paddr=src.paddr, connection=c)
    with pytest.raises(libportal.PortalError) as ei:
        libportal.grant(p, to=c.context_id)
    assert ei.value.errno == errno.EINVAL and "is not an ANON portal or a share-point" \
        in str(ei.value)
    p.unmap()
    src.unmap()


# -- SHARE|DIRECT ----------------------------------------------------------------

def test_direct_sharepoint_over_granted_portal(spawn, faytd, conn_to):
    """SHARE|DIRECT over the frames of another context's ANON portal: the
    meta-structure at its head, the data at the next 16-byte boundary,
    attachable like any share-point; its frames outlive the portal and go
    with the share-point's last mapping."""
    c = conn_to(faytd)
    before = state(faytd)
    o, _, paddr = owner(spawn, faytd, pages=2)
    sp = libportal.portal(libportal.SHARE | DIRECT, RW, 2 * PAGE, identifier="direct-sp",
                          create=True, paddr=paddr, connection=c)
    assert sp.created and sp.paddr == tuple(paddr)
    assert sp.data_offset == 48 and sp.length == 2 * PAGE - 48   # 28 + 2 * 8 bytes, rounded to 16
    sp.write(PAGE - 48, b"through-sp")          # the start of the owner's page 1
    o.send("read 1")
    assert o.expect() == "through-sp"
    other = libportal.share_attach("direct-sp", connection=conn_to(faytd))
    assert other.read(PAGE - 48, 10) == b"through-sp"
    o.send("unmap")
    assert o.expect() == "ok"
    o.kill()
    assert other.read(PAGE - 48, 10) == b"through-sp"
    other.unmap()
    sp.destroy()
    assert wait_state(faytd, before) == before


@pytest.mark.parametrize("which, msg", [
    ("part", "a SHARE|DIRECT share-point is one whole object"),
    ("reversed", "a SHARE|DIRECT share-point is one whole object"),
    ("sharepoint", "a SHARE|DIRECT share-point is one whole object"),
])
def test_direct_sharepoint_names_one_whole_portal(spawn, faytd, conn_to, which, msg):
    """A SHARE|DIRECT share-point maps one whole ANON portal's object from
    its start: part of one, its frames out of order, or a share-point's are
    EINVAL naming morphology.paddr; nothing is created."""
    c = conn_to(faytd)
    p = libportal.portal(libportal.ANON, RW, 2 * PAGE, connection=c)
    s = libportal.share_create("direct-src", 2 * PAGE, connection=c)
    before = state(faytd)
    paddr = {"part": list(p.paddr[:1]), "reversed": list(p.paddr[::-1]),
             "sharepoint": list(s.paddr)}[which]
    with pytest.raises(libportal.PortalError) as ei:
        libportal.portal(libportal.SHARE | DIRECT, RW, PAGE * len(paddr), identifier="direct-x",
                         create=True, paddr=paddr, connection=c)
    assert ei.value.errno == errno.EINVAL and "morphology.paddr: " + msg in str(ei.value)
    assert state(faytd) == before
    s.destroy()
    p.unmap()


@needs_root
def test_direct_sharepoint_other_uid(spawn, as_user, world_faytd, conn_to):
    """A SHARE|DIRECT share-point is one object: another uid's PROT_READ
    attach is EACCES (faytd cannot hand it a descriptor that keeps it from
    writing), a read-write one works.  A driver makes one over a portal
    granted to it read-write, not over one granted read-only (EPERM)."""
    d = world_faytd(DRIVER_POLICY)
    c = conn_to(d)
    p = libportal.portal(libportal.ANON, RW, 2 * PAGE, connection=c)
    sp = libportal.portal(libportal.SHARE | DIRECT, RW, 2 * PAGE, identifier="dma-ring",
                          create=True, paddr=p.paddr, connection=c)
    sp.write(0, b"ring-hdr")
    a, acid = attacker(spawn, as_user, d)
    got = ask(a, "attach dma-ring %d" % RO)
    assert got.startswith("EACCES") and ("prot: 0x1 asked; share-point 'dma-ring' is one "
                                         "object (SHARE|DIRECT)") in got, got
    assert ask(a, "attach dma-ring %d" % RW) == "ok ring-hdr"
    sp.destroy()
    q = libportal.portal(libportal.ANON, RW, 2 * PAGE, connection=c)
    frames = ",".join(hex(x) for x in q.paddr)
    libportal.grant(q, to=acid, prot=RO)
    got = ask(a, "sp dma-q " + frames)
    assert got.startswith("EPERM") and "its grant allows 0x1" in got, got
    libportal.grant(q, to=acid, prot=RW)
    assert ask(a, "sp dma-q " + frames) == "ok"
    q.unmap()
    p.unmap()


# -- restart ---------------------------------------------------------------------

def test_direct_what_survives_a_killed_faytd(restartable):
    """A SHARE|DIRECT share-point is journaled and taken back with its
    frames and bytes; DIRECT mappings and grants are not (the process keeps
    its memory; the restarted faytd finds the frame free)."""
    d = restartable.start()
    old = libportal.Connection(d.socket)
    p = libportal.portal(libportal.ANON, RW, 2 * PAGE, connection=old)
    sp = libportal.portal(libportal.SHARE | DIRECT, RW, 2 * PAGE, identifier="j-direct",
                          create=True, paddr=p.paddr, connection=old)
    sp.write(PAGE, b"over the portal")
    q = libportal.portal(libportal.ANON, RW, PAGE, connection=old)
    libportal.grant(q, to=old.context_id)
    dm = libportal.portal(DIRECT, RW, PAGE, paddr=q.paddr, connection=old)
    dm.buf[0:6] = b"direct"
    restartable.kill()
    d = restartable.start()
    assert "restored 1 share-points" in d.read_log()
    c = libportal.Connection(d.socket)
    try:
        again = libportal.share_attach("j-direct", connection=c)
        assert again.paddr == tuple(p.paddr) and again.read(PAGE, 15) == b"over the portal"
        assert bytes(dm.buf[0:6]) == b"direct" and bytes(q.buf[0:6]) == b"direct"
        with pytest.raises(libportal.PortalError) as ei:
            libportal.portal(DIRECT, RW, PAGE, paddr=q.paddr, connection=c)
        assert ei.value.errno == errno.EFAULT and "is free" in str(ei.value)
        again.destroy()
        for m in (dm, q, sp, p):
            m.unmap()                   # a lost connection: unmaps here only
    finally:
        c.close()
        old.close()


# -- COW ---------------------------------------------------------------------------

COW = libportal.COW


def test_cow_at_least_on_write(spawn, faytd, conn_to):
    """A view at least on write: its writes never reach the source; a page
    it has not written shows the source's later writes; a page it wrote
    keeps its own bytes."""
    o, _, paddr = owner(spawn, faytd)
    c = conn_to(faytd)
    v = libportal.portal(COW, RW, 2 * PAGE, paddr=paddr, share_type=libportal.COW_ON_WRITE,
                         connection=c)
    assert v.paddr == tuple(paddr)      # shared frames keep their addresses
    assert bytes(v.buf[0:7]) == b"owner-0"
    v.buf[0:4] = b"view"
    o.send("read 0")
    assert o.expect() == "owner-0"      # the source never sees the view's write
    d = libportal.portal(DIRECT, RW, 2 * PAGE, paddr=paddr, connection=c)
    d.buf[0:5] = b"later"
    d.buf[PAGE:PAGE + 5] = b"later"
    assert bytes(v.buf[0:7]) == b"viewr-0"         # its own page
    assert bytes(v.buf[PAGE:PAGE + 7]) == b"later-1"   # not written: the source's
    d.unmap()
    v.unmap()


def test_cow_strict_snapshot(spawn, faytd, conn_to):
    """A strict snapshot is a copy made during the call: nothing written to
    the source afterwards, nor its unmap and its owner's death, changes it;
    its writes never reach the source; its frames are its own."""
    before = state(faytd)
    o, _, paddr = owner(spawn, faytd)
    c = conn_to(faytd)
    s = libportal.portal(COW, RW, 2 * PAGE, paddr=paddr, share_type=libportal.COW_SNAPSHOT,
                         connection=c)
    assert len(s.paddr) == 2 and not set(s.paddr) & set(paddr)
    d = libportal.portal(DIRECT, RW, 2 * PAGE, paddr=paddr, connection=c)
    d.buf[PAGE:PAGE + 5] = b"later"
    s.buf[0:4] = b"snap"
    assert bytes(s.buf[0:7]) == b"snapr-0" and bytes(s.buf[PAGE:PAGE + 7]) == b"owner-1"
    assert bytes(d.buf[0:7]) == b"owner-0"
    d.unmap()
    o.send("unmap")
    assert o.expect() == "ok"
    o.kill()
    assert bytes(s.buf[PAGE:PAGE + 7]) == b"owner-1"
    s.unmap()
    assert wait_state(faytd, before) == before


@pytest.mark.parametrize("spare", ["64KiB", 0])
def test_cow_snapshot_spare(fresh_faytd, conn_to, spare):
    """After a strict snapshot faytd holds one spare object of its length
    (at most config cow_snapshot_spare; 0: none) for the next one of that
    length, which copies into it: each snapshot has its own bytes; a
    longer one gets no spare; stopping faytd releases it."""
    d = fresh_faytd(config={"cow_snapshot_spare": spare}, ram="16MiB")
    c = conn_to(d)
    src = libportal.portal(libportal.ANON, RW, 2 * PAGE, connection=c)
    big = libportal.portal(libportal.ANON, RW, 32 * PAGE, connection=c)
    src.buf[0:5] = b"first"
    base = portal_objects(d)
    snaps = []
    for word in (b"first", b"again", b"third"):
        src.buf[0:5] = word
        snaps.append(libportal.portal(COW, RW, 2 * PAGE, paddr=src.paddr,
                                      share_type=libportal.COW_SNAPSHOT, connection=c))
        # The snapshots' objects, and the spare made after each if allowed.
        want = len(base) + len(snaps) + (1 if spare else 0)
        assert len(objects_settle(d, want)) == want
    assert [bytes(x.buf[0:5]) for x in snaps] == [b"first", b"again", b"third"]
    snaps[0].buf[0:5] = b"mine!"
    assert bytes(snaps[1].buf[0:5]) == b"again" and bytes(src.buf[0:5]) == b"third"
    long = libportal.portal(COW, RW, 32 * PAGE, paddr=big.paddr,
                            share_type=libportal.COW_SNAPSHOT, connection=c)
    # Past the bound: the old spare goes, and no new one is made.
    want = len(base) + len(snaps) + 1
    assert len(objects_settle(d, want)) == want
    for x in snaps + [long, src, big]:
        x.unmap()
    c.close()
    d.stop()
    assert fayt_objects([d.proc.pid], pooled=True) == []


def test_cow_charges_a_writable_view_at_creation(spawn, fresh_faytd, conn_to):
    """A writable view's possible private pages are charged to the caller's
    RAM quota when it is made (a read-only view's are not); ENOMEM past the
    quota, naming length; the charge goes with the view."""
    d = fresh_faytd(config={"max_ram_per_context": 4 * PAGE})
    c = conn_to(d)
    p = libportal.portal(libportal.ANON, RW, 2 * PAGE, connection=c)
    v = libportal.portal(COW, RW, 2 * PAGE, paddr=p.paddr, connection=c)
    with pytest.raises(libportal.PortalError) as ei:
        libportal.portal(COW, RW, PAGE, paddr=p.paddr[:1], connection=c)
    assert ei.value.errno == errno.ENOMEM and "length: 4096 bytes more would take this " \
        "context past its RAM quota" in str(ei.value)
    with pytest.raises(libportal.PortalError) as ei:
        libportal.portal(COW, RW, PAGE, paddr=p.paddr[:1], share_type=libportal.COW_SNAPSHOT,
                         connection=c)
    assert ei.value.errno == errno.ENOMEM
    r = libportal.portal(COW, RO, 2 * PAGE, paddr=p.paddr, connection=c)     # not charged
    v.unmap()
    s = libportal.portal(COW, RW, PAGE, paddr=p.paddr[:1], share_type=libportal.COW_SNAPSHOT,
                         connection=c)
    s.unmap()
    r.unmap()
    p.unmap()


def test_cow_bad_mode_and_bad_source(faytd, conn_to):
    """An unknown mode is EINVAL naming share.type; a free source frame is
    EFAULT naming the entry; nothing is made."""
    c = conn_to(faytd)
    p = libportal.portal(libportal.ANON, RW, PAGE, connection=c)
    before = state(faytd)
    with pytest.raises(libportal.PortalError) as ei:
        libportal.portal(COW, RW, PAGE, paddr=p.paddr, share_type=7, connection=c)
    assert ei.value.errno == errno.EINVAL and "share.type: 7 is not a COW mode" in str(ei.value)
    q = libportal.portal(libportal.ANON, RW, PAGE, connection=c)
    gone = q.paddr
    q.unmap()
    with pytest.raises(libportal.PortalError) as ei:
        libportal.portal(COW, RW, PAGE, paddr=gone, share_type=libportal.COW_SNAPSHOT,
                         connection=c)
    assert ei.value.errno == errno.EFAULT and "morphology.paddr[0]" in str(ei.value)
    assert state(faytd) == before
    p.unmap()


@needs_root
def test_cow_source_must_be_granted(spawn, as_user, world_faytd):
    """COW is core's by default (a server gets EPERM naming type); a
    category given COW reads only frames granted to it (PROT_READ)."""
    policy = json.loads(json.dumps(DRIVER_POLICY))
    policy["categories"]["driver"]["classes"].append("COW")
    d = world_faytd(policy)
    o, _, paddr = owner(spawn, d)
    code = r"""
c = lp.Connection(sys.argv[1])
print(c.context_id)
for line in sys.stdin:
    mode, paddr = line.split()
    try:
        v = lp.portal(lp.COW, lp.PROT_RW, 4096, paddr=[int(paddr)], share_type=int(mode),
                      connection=c)
        print("ok " + bytes(v.buf[0:7]).decode())
        v.unmap()
    except OSError as e:
        print("%s %s" % (errno.errorcode[e.errno], e))
"""
    a = spawn(code, d.env(), as_user=as_user, uid=NOBODY, args=[d.socket])
    acid = int(a.expect())
    for mode in (0, 1):
        got = ask(a, "%d %d" % (mode, paddr[1]))
        assert got.startswith("EPERM") and "granted to this context" in got, got
    assert ask(o, "grant context %d 1" % acid) == "ok"
    for mode in (0, 1):
        assert ask(a, "%d %d" % (mode, paddr[1])) == "ok owner-1"


VIEWER = r"""
c = lp.Connection(sys.argv[1], faytd_uid=int(sys.argv[2]) if len(sys.argv) > 2 else None)
src = lp.portal(lp.ANON, lp.PROT_RW, 2 * 4096, connection=c)
src.buf[0:6] = b"source"
src.buf[4096:4102] = b"source"
v = lp.portal(lp.COW, lp.PROT_RW, 2 * 4096, paddr=src.paddr, connection=c)
v.buf[4096:4103] = b"private"
print(json.dumps([list(src.paddr), lp.physical(v)]))
sys.stdin.readline()
"""


def test_cow_physical_addresses_of_written_pages(faytd, conn_to):
    """A view reports its pages' physical addresses: unwritten ones keep the
    source's, a written one gets a frame of its own when asked (the same on
    the next ask).  A strict snapshot of those frames copies the view as it
    is; DIRECT cannot map a private page (EINVAL); the frame goes with the
    view."""
    c = conn_to(faytd)
    before = state(faytd)
    src = libportal.portal(libportal.ANON, RW, 2 * PAGE, connection=c)
    src.buf[0:6] = b"source"
    v = libportal.portal(COW, RW, 2 * PAGE, paddr=src.paddr, connection=c)
    assert libportal.physical(v) == list(src.paddr)
    assert bytes(v.buf[0:6]) == b"source"           # read, not written: still the source's
    assert libportal.physical(v) == list(src.paddr)
    v.buf[PAGE:PAGE + 7] = b"private"
    phys = libportal.physical(v)
    assert phys[0] == src.paddr[0] and phys[1] not in src.paddr
    assert libportal.physical(v) == phys
    s = libportal.portal(COW, RW, 2 * PAGE, paddr=phys, share_type=libportal.COW_SNAPSHOT,
                         connection=c)
    assert bytes(s.buf[0:6]) == b"source" and bytes(s.buf[PAGE:PAGE + 7]) == b"private"
    for t, kw in ((DIRECT, {}), (COW, {})):
        with pytest.raises(libportal.PortalError) as ei:
            libportal.portal(t, RW, PAGE, paddr=phys[1:], connection=c, **kw)
        assert ei.value.errno == errno.EINVAL and "pages a COW view wrote" in str(ei.value)
    s.unmap()
    v.unmap()
    src.unmap()
    assert wait_state(faytd, before) == before


def test_cow_snapshot_of_another_process_view(spawn, faytd, conn_to):
    """A strict snapshot of another process's view copies its private pages
    from that process (process_vm_readv: faytd may ptrace it here)."""
    o = spawn(VIEWER, faytd.env(), args=[faytd.socket])
    paddr, phys = json.loads(o.expect())
    assert phys[0] == paddr[0] and phys[1] != paddr[1]
    c = conn_to(faytd)
    s = libportal.portal(COW, RO, 2 * PAGE, paddr=phys, share_type=libportal.COW_SNAPSHOT,
                         connection=c)
    assert bytes(s.buf[0:6]) == b"source" and bytes(s.buf[PAGE:PAGE + 7]) == b"private"
    s.unmap()
    o.send()
    o.finish()


@needs_root
def test_cow_snapshot_eperm_where_faytd_may_not_ptrace(spawn, as_user, world_faytd):
    """A faytd running as uid 65534 may not read a root process's memory: a
    strict snapshot of that process's private pages is EPERM, naming why;
    nothing is made."""
    policy = json.loads(json.dumps(DRIVER_POLICY))
    d = world_faytd(policy, as_user=as_user, uid=NOBODY)
    o = spawn(VIEWER, d.env(), args=[d.socket, NOBODY])
    paddr, phys = json.loads(o.expect())
    c = libportal.Connection(d.socket, faytd_uid=NOBODY)
    try:
        before = d.state()
        with pytest.raises(libportal.PortalError) as ei:
            libportal.portal(COW, RO, 2 * PAGE, paddr=phys, share_type=libportal.COW_SNAPSHOT,
                             connection=c)
        assert ei.value.errno == errno.EPERM and "faytd may not read that process's memory" \
            in str(ei.value), str(ei.value)
        assert d.state() == before
    finally:
        c.close()
    o.send()
    o.finish()


def test_direct_and_cow_over_a_split_sharepoint(faytd, conn_to):
    """A share-point of three pages is two objects (page 0, the rest):
    DIRECT over its frames maps both at adjacent addresses; a COW view of
    it outlives its destroy, which keeps its own rules (the name goes at
    once, ENOENT)."""
    c = conn_to(faytd)
    before = state(faytd)
    sp = libportal.share_create("direct-split", 3 * PAGE, connection=c)
    off = PAGE - sp.data_offset
    sp.write(off, b"page-1")
    sp.write(off + PAGE, b"page-2")
    p = libportal.portal(DIRECT, RW, 3 * PAGE, paddr=sp.paddr, connection=c)
    assert bytes(p.buf[PAGE:PAGE + 6]) == b"page-1" and bytes(p.buf[2 * PAGE:2 * PAGE + 6]) \
        == b"page-2"
    p.buf[2 * PAGE:2 * PAGE + 6] = b"PAGE-2"
    assert sp.read(off + PAGE, 6) == b"PAGE-2"
    with sp:        # a consistent copy: the lock held across the call
        s = libportal.portal(COW, RO, 3 * PAGE, paddr=sp.paddr,
                             share_type=libportal.COW_SNAPSHOT, connection=c)
    v = libportal.portal(COW, RO, 3 * PAGE, paddr=sp.paddr, connection=c)
    sp.destroy()
    with pytest.raises(libportal.NotFound):
        libportal.share_attach("direct-split", connection=c)
    assert bytes(v.buf[PAGE:PAGE + 6]) == b"page-1" and bytes(s.buf[2 * PAGE:2 * PAGE + 6]) \
        == b"PAGE-2"
    for m in (p, s, v):
        m.unmap()
    assert wait_state(faytd, before) == before


def test_cow_snapshot_spare_goes_with_the_last_connection(fresh_faytd, conn_to):
    """The spare is held for the next snapshot only while someone could
    take it: `fayt stats` shows its length, and when the last connection
    closes faytd releases it (the keeper holds nothing more)."""
    d = fresh_faytd(ram="16MiB")
    c = conn_to(d)
    base = portal_objects(d)
    src = libportal.portal(libportal.ANON, RW, 2 * PAGE, connection=c)
    snap = libportal.portal(COW, RW, 2 * PAGE, paddr=src.paddr,
                            share_type=libportal.COW_SNAPSHOT, connection=c)
    wait_until(lambda: c.stats()["cow"]["snapshot_spare_bytes"] == 2 * PAGE,
               "faytd holds a spare of the snapshot's length")
    snap.unmap()
    src.unmap()
    assert len(objects_settle(d, len(base) + 1)) == len(base) + 1     # the spare alone
    c.close()
    assert len(objects_settle(d, len(base))) == len(base)
