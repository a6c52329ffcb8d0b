"""COW views whose source is a share-point named by share.identifier
(docs/portals.md#cow-portals): the view is the share-point's mapping from
offset 0, `length` bytes; the rights are a PROT_READ attach's.  Real
processes own the share-points; refusals as uid 65534 with a policy that
grants it COW but not the name."""
import ctypes
import errno
import json
import os

import pytest

import libportal
from libportal._abi import lib, PORTAL_REQ
from libportal.portal_req import encode_portal_req

from support.daemon import NOBODY, state, wait_state

PAGE = lib.FAYT_PAGE_SIZE
RW, RO = libportal.PROT_RW, libportal.PROT_READ
COW = libportal.COW
ON_WRITE, SNAPSHOT = libportal.COW_ON_WRITE, libportal.COW_SNAPSHOT

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as "
                                                          "uid 65534")

# A share-point owner: creates `name` with `size` bytes of data, writes
# "page-<i>" at the start of each page i of its mapping past the
# meta-structure, prints its map length and frames, then obeys lines:
# "write <offset> <text>" (offset in the whole mapping, in the data),
# "destroy".
OWNER = r"""
name, size = sys.argv[1], int(sys.argv[2])
sp = lp.share_create(name, size)
d = sp.data_offset
for i in range(sp.map_length // 4096):
    if i * 4096 >= d:
        sp.write(i * 4096 - d, b"page-%d" % i)
print(json.dumps([sp.map_length, list(sp.paddr)]))
for line in sys.stdin:
    w = line.split()
    if w[0] == "write":
        sp.write(int(w[1]) - d, w[2].encode())
        print("ok")
    elif w[0] == "destroy":
        sp.destroy()
        print("ok")
"""


def owner(spawn, d, name, size=3 * PAGE):
    o = spawn(OWNER, d.env(), args=[name, size])
    map_length, paddr = json.loads(o.expect())
    return o, map_length, paddr


def ask(child, line):
    child.send(line)
    return child.expect()


def whole(m, n=None):
    """The bytes of mapping m (n: its first n), read at its address."""
    return ctypes.string_at(m.addr, m.map_length if n is None else n)


def attach_bytes(c, name):
    """The share-point's whole mapping as an attach sees it now."""
    sp = libportal.share_attach(name, RO, connection=c)
    try:
        return whole(sp)
    finally:
        sp.unmap()


def test_cow_source_view_sees_the_sharepoint(spawn, faytd, conn_to):
    """A view at least on write of a share-point by name is its mapping from
    offset 0 (meta-structure included): the same bytes an attach maps; a
    page-aligned prefix is its first pages.  Its writes never reach the
    share-point; a page it has not written shows the share-point's later
    writes; one it wrote keeps its own bytes."""
    o, map_length, _ = owner(spawn, faytd, "cowsrc-view")
    c = conn_to(faytd)
    v = libportal.portal(COW, RW, map_length, identifier="cowsrc-view", share_type=ON_WRITE,
                         connection=c)
    assert v.map_length == map_length
    assert whole(v) == attach_bytes(c, "cowsrc-view")
    assert b"page-1" in whole(v)
    prefix = libportal.portal(COW, RO, PAGE, identifier="cowsrc-view", connection=c)
    assert whole(prefix) == whole(v, PAGE)
    prefix.unmap()
    last = map_length - PAGE
    ctypes.memmove(v.addr + last, b"view", 4)
    assert attach_bytes(c, "cowsrc-view")[last:last + 4] != b"view"     # never the source's
    assert ask(o, "write %d later" % last) == "ok"
    assert ask(o, "write %d later" % (last - PAGE)) == "ok"
    assert whole(v)[last:last + 5] == b"view-"                  # its own page
    assert whole(v)[last - PAGE:last - PAGE + 5] == b"later"    # unwritten: the source's
    assert v.paddr == ()                # the reply lists no source frames
    with pytest.raises(libportal.InvalidArgument) as ei:
        libportal.physical(v)
    assert "lists no source frames" in str(ei.value)
    v.unmap()
    assert ask(o, "destroy") == "ok"
    o.kill()


def test_cow_source_strict_snapshot(spawn, faytd, conn_to):
    """A strict snapshot of a share-point by name is a copy made during the
    call: neither the share-point's later writes nor its destroy and its
    owner's death change it; its writes never reach the share-point."""
    before = state(faytd)
    o, map_length, paddr = owner(spawn, faytd, "cowsrc-snap")
    c = conn_to(faytd)
    s = libportal.portal(COW, RW, map_length, identifier="cowsrc-snap", share_type=SNAPSHOT,
                         connection=c)
    first = attach_bytes(c, "cowsrc-snap")
    assert whole(s) == first
    assert len(s.paddr) == map_length // PAGE and not set(s.paddr) & set(paddr)
    last = map_length - PAGE
    assert ask(o, "write %d later" % last) == "ok"
    assert whole(s) == first
    ctypes.memmove(s.addr + last, b"snap", 4)
    assert attach_bytes(c, "cowsrc-snap")[last:last + 5] == b"later"
    assert ask(o, "destroy") == "ok"
    o.kill()
    assert whole(s)[last:last + 4] == b"snap" and whole(s)[:last] == first[:last]
    s.unmap()
    assert wait_state(faytd, before) == before


def test_cow_source_bad_requests(spawn, faytd, conn_to):
    """A name that does not exist is ENOENT naming share.identifier; a
    length past the share-point's mapping, or not a multiple of 4096, is
    EINVAL naming length; a source named both ways (identifier and paddr[])
    is EINVAL naming both fields, from libportal and as raw bytes; nothing
    is made."""
    o, map_length, paddr = owner(spawn, faytd, "cowsrc-bad")
    c = conn_to(faytd)
    before = state(faytd)
    for mode in (ON_WRITE, SNAPSHOT):
        with pytest.raises(libportal.PortalError) as ei:
            libportal.portal(COW, RW, PAGE, identifier="cowsrc-none", share_type=mode,
                             connection=c)
        assert ei.value.errno == errno.ENOENT and \
            "share.identifier: no share-point 'cowsrc-none'" in str(ei.value)
        for length in (map_length + PAGE, PAGE + 1):
            with pytest.raises(libportal.PortalError) as ei:
                libportal.portal(COW, RW, length, identifier="cowsrc-bad", share_type=mode,
                                 connection=c)
            assert ei.value.errno == errno.EINVAL and str(ei.value).count("length: %d" % length)
        with pytest.raises(libportal.PortalError) as ei:
            libportal.portal(COW, RW, PAGE, identifier="cowsrc-bad", paddr=paddr[:1],
                             share_type=mode, connection=c)
        assert ei.value.errno == errno.EINVAL and \
            "share.identifier and morphology.paddr: both" in str(ei.value)
    # Raw: paddr[] and the identifier after it (what libportal sent above),
    # and share.create set on a source.
    body = encode_portal_req(COW, RW, PAGE, identifier="cowsrc-bad", paddr=paddr[:1])
    with pytest.raises(libportal.PortalError) as ei:
        c.call(lib.FAYT_SYS_PORTAL, body)
    assert ei.value.errno == errno.EINVAL and "morphology.paddr" in str(ei.value)
    body = PORTAL_REQ.pack(COW, RW, PAGE, 1, 0, 1, 0, 0, 0, 0) + b"cowsrc-bad\0"
    with pytest.raises(libportal.PortalError) as ei:
        c.call(lib.FAYT_SYS_PORTAL, body)
    assert ei.value.errno == errno.EINVAL and "share.create: 1" in str(ei.value)
    assert state(faytd) == before
    assert ask(o, "destroy") == "ok"
    o.kill()


def test_cow_source_of_64_mib(spawn, fresh_faytd, conn_to):
    """A 64 MiB share-point: a view at least on write of all of it (one
    request, no paddr[]: more than one message could name frame by frame)
    and a strict snapshot of it."""
    d = fresh_faytd(ram="512MiB")
    size = 64 << 20
    o, map_length, _ = owner(spawn, d, "cowsrc-big", size)
    c = conn_to(d)
    n = 64 << 20
    v = libportal.portal(COW, RW, n, identifier="cowsrc-big", connection=c)
    assert v.map_length == n and whole(v, PAGE) == attach_bytes(c, "cowsrc-big")[:PAGE]
    assert ctypes.string_at(v.addr + n - PAGE, 16).startswith(b"page-%d" % (n // PAGE - 1))
    s = libportal.portal(COW, RO, n, identifier="cowsrc-big", share_type=SNAPSHOT,
                         connection=c)
    assert ctypes.string_at(s.addr + n - PAGE, 16) == ctypes.string_at(v.addr + n - PAGE, 16)
    s.unmap()
    v.unmap()
    assert ask(o, "destroy") == "ok"
    o.kill()


# COW for the driver category (uid 65534), and shared names: "dma-*" it may
# attach, "pub-*" only core may.
POLICY = {
    "categories": {"core": {"classes": ["SHARE", "DIRECT", "ANON", "COW", "SPECIAL"],
                            "notify_handlers": True, "shared_names": ["dma-*", "pub-*"]},
                   "driver": {"classes": ["SHARE", "ANON", "COW"],
                              "shared_names": ["dma-*"]},
                   "server": {"classes": ["SHARE", "ANON"]}},
    "rules": [{"uid": "$owner", "category": "core"}, {"uid": 0, "category": "core"},
              {"uid": NOBODY, "category": "driver"}],
    "default": "server",
}

# As uid 65534: for each line "<mode> <length> <identifier>" a COW view of
# that share-point, its first bytes after the meta page, or the errno.
VIEWER = r"""
c = lp.Connection(sys.argv[1])
for line in sys.stdin:
    mode, length, name = line.split()
    try:
        v = lp.portal(lp.COW, lp.PROT_RW, int(length), identifier=name, share_type=int(mode),
                      connection=c)
        print("ok " + bytes(v.buf[4096:4102]).decode())
        v.unmap()
    except OSError as e:
        print("%s %s" % (errno.errorcode[e.errno], e))
"""


@needs_root
def test_cow_source_rights_are_an_attachs(spawn, as_user, world_faytd):
    """uid 65534, whose category has COW: a share-point it may attach is a
    source (a shared name of its policy); one it may not is refused as an
    attach is (EPERM for a shared name its category may not use and for
    another uid's namespace); nothing is made."""
    d = world_faytd(POLICY)
    owners = [owner(spawn, d, name) for name in ("dma-cow", "pub-cow", "private-cow")]
    a = spawn(VIEWER, d.env(), as_user=as_user, uid=NOBODY, args=[d.socket])
    length = 2 * PAGE
    before = d.state()
    for mode in (ON_WRITE, SNAPSHOT):
        assert ask(a, "%d %d dma-cow" % (mode, length)) == "ok page-1"
        got = ask(a, "%d %d pub-cow" % (mode, length))
        assert got.startswith("EPERM") and "share.identifier" in got, got
        got = ask(a, "%d %d uid:0/private-cow" % (mode, length))
        assert got.startswith("EPERM") and "share.identifier" in got, got
        got = ask(a, "%d %d private-cow" % (mode, length))     # its own namespace: none
        assert got.startswith("ENOENT") and "share.identifier" in got, got
    assert d.state() == before
    for o, _, _ in owners:
        assert ask(o, "destroy") == "ok"
        o.kill()


def test_cow_source_one_page_and_prot(faytd, conn_to):
    """A one-page share-point (one object, not split) is a source too; one
    that does not grant PROT_READ is EACCES with the message an attach
    gets."""
    c = conn_to(faytd)
    one = libportal.share_create("cowsrc-one", 100, connection=c)
    v = libportal.portal(COW, RW, PAGE, identifier="cowsrc-one", connection=c)
    one.write(0, b"hello")                  # not written by the view: the source's
    assert whole(v)[one.data_offset:one.data_offset + 5] == b"hello"
    v.unmap()
    one.destroy()
    wo = libportal.share_create("cowsrc-wo", 100, libportal.PROT_WRITE, connection=c)
    with pytest.raises(libportal.PortalError) as attach:
        libportal.share_attach("cowsrc-wo", RO, connection=c)
    for mode in (ON_WRITE, SNAPSHOT):
        with pytest.raises(libportal.PortalError) as ei:
            libportal.portal(COW, RO, PAGE, identifier="cowsrc-wo", share_type=mode,
                             connection=c)
        assert ei.value.errno == errno.EACCES and str(ei.value) == str(attach.value)
    wo.destroy()
