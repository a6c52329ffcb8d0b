"""The portal system call against a real faytd: ANON portals, fixed
addresses (morphology.addr), RAM exhaustion, and the errors of share
create/attach.  Frame accounting is checked on private daemons so that
nothing else running in the session's faytd can move the numbers.
"""
import ctypes
import errno
import json
import mmap
import os
import subprocess
import sys
import time
import uuid

import pytest

import libportal
from libportal._abi import lib

PAGE = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def contexts(conn):
    body, _ = conn.call(lib.FAYT_SYS_LIST_CONTEXTS)
    return json.loads(body)


def free_frames(conn):
    return contexts(conn)["free_frames"]


def my_mappings(conn):
    """Mappings faytd records for this connection's context."""
    [me] = [c for c in contexts(conn)["contexts"] if c["id"] == conn.context_id]
    return me["mappings"]


def share_table(conn):
    body, _ = conn.call(lib.FAYT_SYS_LIST_SHARE)
    return {s["identifier"]: s for s in json.loads(body)}


def mapped_at(addr):
    """The /proc/self/maps line of the mapping that starts at addr, or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            start = int(line.split("-", 1)[0], 16)
            if start == addr:
                return line
    return None


class Hole:
    """Three reserved pages (PROT_NONE) with the middle one unmapped: .free is
    an address nothing else will take (a one-page hole), .taken is occupied."""

    def __init__(self):
        base = _libc.mmap(None, 3 * PAGE, 0,    # PROT_NONE
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        assert base not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        self.base = base
        self.taken = base
        self.free = base + PAGE
        assert _libc.munmap(self.free, PAGE) == 0

    def close(self):
        _libc.munmap(self.base, PAGE)
        _libc.munmap(self.base + 2 * PAGE, PAGE)


@pytest.fixture
def hole():
    h = Hole()
    yield h
    h.close()


@pytest.fixture
def private(fresh_faytd, conn_to):
    """A connection to a private faytd with 4 MiB of RAM."""
    return conn_to(fresh_faytd(ram="4MiB"))


def ident(tag):
    return "t-portal-%s-%s" % (tag, uuid.uuid4().hex[:10])


# -- ANON ---------------------------------------------------------------------

@pytest.mark.parametrize("asked,pages", [(1, 1), (4095, 1), (4096, 1), (4097, 2),
                                         (3 * 4096, 3), (10 * 4096 - 1, 10)])
def test_portal_anon_length_rounds_up_to_frames(lp, asked, pages):
    p = lp.portal(lp.ANON, lp.PROT_RW, asked)
    try:
        assert p.length == p.map_length == pages * PAGE
        assert len(p.buf) == pages * PAGE
        assert len(p.paddr) == pages
        assert len(set(p.paddr)) == pages
        assert all(a % PAGE == 0 and a > 0 for a in p.paddr)
        assert p.addr % PAGE == 0
        assert p.type == lp.ANON
    finally:
        p.unmap()


def test_portal_anon_data_is_visible_through_buf(lp):
    p = lp.portal(lp.ANON, lp.PROT_RW, 2 * PAGE)
    try:
        assert bytes(p.buf) == bytes(2 * PAGE)          # fresh frames are zeroed
        pattern = bytes(range(256)) * 32
        p.buf[:] = pattern
        assert ctypes.string_at(p.addr, 2 * PAGE) == pattern
        ctypes.memmove(p.addr + PAGE - 2, b"XYZW", 4)    # across the frame boundary
        assert bytes(p.buf[PAGE - 2:PAGE + 2]) == b"XYZW"
        line = mapped_at(p.addr)
        assert line is not None and line.split()[1].startswith("rw")
    finally:
        p.unmap()
    assert not p.mapped
    with pytest.raises(libportal.Unmapped) as ei:
        p.buf
    assert ei.value.errno == errno.EBADF
    with pytest.raises(libportal.Unmapped):
        p.unmap()


def test_portal_anon_read_only_buf(lp):
    p = lp.portal(lp.ANON, lp.PROT_READ, PAGE)
    try:
        assert p.buf.readonly
        with pytest.raises(TypeError):
            p.buf[0:1] = b"x"
        assert mapped_at(p.addr).split()[1].startswith("r-")
    finally:
        p.unmap()


def test_portal_anon_frames_are_taken_and_freed(lp, private):
    before = free_frames(private)
    assert before == 4 * 1024 * 1024 // PAGE
    assert my_mappings(private) == 0
    a = lp.portal(lp.ANON, lp.PROT_RW, 3 * PAGE, connection=private)
    b = lp.portal(lp.ANON, lp.PROT_RW, 5 * PAGE, connection=private)
    assert free_frames(private) == before - 8
    assert my_mappings(private) == 2
    assert not set(a.paddr) & set(b.paddr)
    a.unmap()
    assert free_frames(private) == before - 5
    assert my_mappings(private) == 1
    b.unmap()
    assert free_frames(private) == before
    assert my_mappings(private) == 0
    # Freed frames are handed out again.
    c = lp.portal(lp.ANON, lp.PROT_RW, 8 * PAGE, connection=private)
    assert set(c.paddr) == set(a.paddr) | set(b.paddr)
    c.unmap()
    assert free_frames(private) == before


def test_portal_anon_frames_of_a_dead_process_are_freed(fresh_faytd, conn_to):
    d = fresh_faytd(ram="4MiB")
    c = conn_to(d)
    before = free_frames(c)
    kid = subprocess.Popen([sys.executable, "-c",
                            "import libportal as lp, time\n"
                            "p = lp.portal(lp.ANON, lp.PROT_RW, 16 * 4096)\n"
                            "print('mapped', flush=True)\ntime.sleep(120)\n"],
                           env=d.env(), stdout=subprocess.PIPE, text=True)
    try:
        assert kid.stdout.readline().strip() == "mapped"
        assert free_frames(c) == before - 16
    finally:
        kid.kill()
        kid.wait(timeout=30)
        kid.stdout.close()
    deadline = time.monotonic() + 30
    while free_frames(c) != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert free_frames(c) == before


# -- morphology.addr ----------------------------------------------------------

def test_portal_fixed_address_maps_exactly_there(lp, hole):
    p = lp.portal(lp.ANON, lp.PROT_RW, PAGE, addr=hole.free)
    try:
        assert p.addr == hole.free
        assert mapped_at(hole.free) is not None
        p.buf[0:5] = b"fixed"
        assert ctypes.string_at(hole.free, 5) == b"fixed"
    finally:
        p.unmap()
    assert mapped_at(hole.free) is None


def test_portal_fixed_address_from_an_unmapped_portal(lp):
    first = lp.portal(lp.ANON, lp.PROT_RW, 2 * PAGE)
    a = first.addr
    first.unmap()
    p = lp.portal(lp.ANON, lp.PROT_RW, 2 * PAGE, addr=a)
    try:
        assert p.addr == a
        p.buf[PAGE:PAGE + 2] = b"hi"
        assert ctypes.string_at(a + PAGE, 2) == b"hi"
    finally:
        p.unmap()


def test_portal_share_point_at_a_fixed_address(lp, hole):
    name = ident("fixed")
    sp = lp.share_create(name, PAGE, addr=hole.free)
    try:
        assert sp.base == sp.addr == hole.free
        sp.write(0, b"here")
        assert ctypes.string_at(hole.free + sp.data_offset, 4) == b"here"
    finally:
        sp.destroy()


def test_portal_occupied_address_is_already_exists_and_leaves_nothing(lp, private, hole):
    before, maps = free_frames(private), my_mappings(private)
    with pytest.raises(libportal.AlreadyExists) as ei:
        lp.portal(lp.ANON, lp.PROT_RW, PAGE, addr=hole.taken, connection=private)
    assert ei.value.errno == errno.EEXIST
    assert free_frames(private) == before
    assert my_mappings(private) == maps
    assert mapped_at(hole.taken) is not None          # our reservation is untouched
    # A larger request that runs into the reservation is refused the same way.
    with pytest.raises(libportal.AlreadyExists):
        lp.portal(lp.ANON, lp.PROT_RW, 2 * PAGE, addr=hole.free, connection=private)
    assert free_frames(private) == before and my_mappings(private) == maps
    assert mapped_at(hole.free) is None

    # Creating a share-point there fails and creates nothing.
    with pytest.raises(libportal.AlreadyExists):
        lp.share_create("fixed-sp", PAGE, addr=hole.taken, connection=private)
    assert share_table(private) == {}
    assert free_frames(private) == before and my_mappings(private) == maps

    # Attaching one there fails and leaves it as it was.
    sp = lp.share_create("fixed-sp", PAGE, connection=private)
    try:
        captured = share_table(private)["fixed-sp"]["captured"]
        with pytest.raises(libportal.AlreadyExists):
            lp.share_attach("fixed-sp", addr=hole.taken, connection=private)
        assert share_table(private)["fixed-sp"]["captured"] == captured
        assert my_mappings(private) == maps + 1
    finally:
        sp.destroy()
    assert share_table(private) == {}
    assert free_frames(private) == before and my_mappings(private) == maps


@pytest.mark.parametrize("addr", [1, PAGE + 8, 0x7f0000000123])
def test_portal_unaligned_address_is_invalid(lp, private, addr):
    before, maps = free_frames(private), my_mappings(private)
    with pytest.raises(libportal.InvalidArgument) as ei:
        lp.portal(lp.ANON, lp.PROT_RW, PAGE, addr=addr, connection=private)
    assert ei.value.errno == errno.EINVAL
    assert "morphology.addr" in str(ei.value)
    with pytest.raises(libportal.InvalidArgument):
        lp.share_create("unaligned", PAGE, addr=addr, connection=private)
    assert share_table(private) == {}
    assert free_frames(private) == before and my_mappings(private) == maps


@pytest.mark.parametrize("length", [1 << 31, (1 << 31) + PAGE, 1 << 40, -(1 << 31) - 1])
def test_portal_length_above_what_int_holds_is_invalid(lp, private, length):
    """struct portal_req's length is the specification's int: a length it
    cannot hold is EINVAL naming `length`, for every class (before:
    struct.error from packing the request)."""
    before, maps = free_frames(private), my_mappings(private)
    calls = [lambda: lp.portal(lp.ANON, lp.PROT_RW, length, connection=private),
             lambda: lp.share_create("too-long", length, connection=private),
             lambda: lp.portal(lp.SPECIAL, lp.PROT_RW, length, chain="none",
                               connection=private)]
    for call in calls:
        with pytest.raises(libportal.InvalidArgument) as ei:
            call()
        assert ei.value.errno == errno.EINVAL
        assert "length" in str(ei.value) and str(length) in str(ei.value)
    assert share_table(private) == {}
    assert free_frames(private) == before and my_mappings(private) == maps


# -- RAM ----------------------------------------------------------------------

def test_portal_ram_exhaustion_is_out_of_memory(lp, fresh_faytd, conn_to):
    c = conn_to(fresh_faytd(ram="1MiB"))
    total = free_frames(c)
    assert total == 256
    with pytest.raises(libportal.OutOfMemory) as ei:
        lp.portal(lp.ANON, lp.PROT_RW, 2 * 1024 * 1024, connection=c)
    assert ei.value.errno == errno.ENOMEM
    assert free_frames(c) == total and my_mappings(c) == 0
    with pytest.raises(libportal.OutOfMemory):
        lp.share_create("too-big", 2 * 1024 * 1024, connection=c)
    assert share_table(c) == {}
    assert free_frames(c) == total and my_mappings(c) == 0

    # Exhausted by what is mapped: the last frame can be taken, one more cannot.
    big = lp.portal(lp.ANON, lp.PROT_RW, 1024 * 1024 - PAGE, connection=c)
    last = lp.portal(lp.ANON, lp.PROT_RW, PAGE, connection=c)
    assert free_frames(c) == 0
    with pytest.raises(libportal.OutOfMemory):
        lp.portal(lp.ANON, lp.PROT_RW, PAGE, connection=c)
    with pytest.raises(libportal.OutOfMemory):
        lp.share_create("no-room", PAGE, connection=c)
    assert share_table(c) == {} and my_mappings(c) == 2
    last.unmap()
    again = lp.portal(lp.ANON, lp.PROT_RW, PAGE, connection=c)
    assert again.paddr == last.paddr
    again.unmap()
    big.unmap()
    assert free_frames(c) == total and my_mappings(c) == 0


# -- share create / attach errors ---------------------------------------------

def test_portal_share_attach_with_more_prot_than_granted_is_refused(lp):
    name = ident("prot")
    sp = lp.share_create(name, PAGE, lp.PROT_READ)
    try:
        captured = share_table(lp.connection())[name]["captured"]
        for prot in (lp.PROT_RW, lp.PROT_WRITE, lp.PROT_READ | lp.PROT_EXEC):
            with pytest.raises(libportal.PermissionDenied) as ei:
                lp.share_attach(name, prot)
            assert ei.value.errno == errno.EACCES
        assert share_table(lp.connection())[name]["captured"] == captured
        ro = lp.share_attach(name, lp.PROT_READ)
        assert ro.prot == lp.PROT_READ
        ro.unmap()
    finally:
        sp.destroy()


def test_portal_share_create_of_an_existing_identifier_is_already_exists(lp):
    name = ident("dup")
    sp = lp.share_create(name, PAGE)
    try:
        sp.write(0, b"first")
        for length in (PAGE, 2 * PAGE):
            with pytest.raises(libportal.AlreadyExists) as ei:
                lp.share_create(name, length)
            assert ei.value.errno == errno.EEXIST
            assert name in str(ei.value)
        entry = share_table(lp.connection())[name]
        assert entry["id"] == sp.sp_id and entry["frames"] == list(sp.paddr)
        assert sp.read(0, 5) == b"first"
        assert sp.created
        other = lp.share_attach(name)
        assert not other.created and other.sp_id == sp.sp_id
        other.unmap()
    finally:
        sp.destroy()


def test_portal_share_attach_of_a_missing_identifier_is_not_found(lp):
    name = ident("missing")
    with pytest.raises(libportal.NotFound) as ei:
        lp.share_attach(name)
    assert ei.value.errno == errno.ENOENT
    assert name in str(ei.value)
    assert name not in share_table(lp.connection())


def test_portal_ram_quota_per_context(fresh_faytd, conn_to):
    """max_ram_per_context: one context cannot take more than its share of
    faytd's RAM (ANON portals and the share-points it creates count; an attach
    does not); past it ENOMEM and nothing is created; unmap and destroy give
    the quota back; another context has its own."""
    d = fresh_faytd(config={"max_ram_per_context": "64KiB"})
    c, other = conn_to(d), conn_to(d)
    name = ident("quota")
    a = libportal.portal(libportal.ANON, libportal.PROT_RW, 32 * 1024, connection=c)
    sp = libportal.share_create(name, 16 * 1024, connection=c)
    b = libportal.portal(libportal.ANON, libportal.PROT_RW, 16 * 1024, connection=c)
    free = c.list_contexts()["free_frames"]
    with pytest.raises(libportal.OutOfMemory) as ei:
        libportal.portal(libportal.ANON, libportal.PROT_RW, 4096, connection=c)
    assert ei.value.errno == errno.ENOMEM and "RAM quota" in str(ei.value)
    with pytest.raises(libportal.OutOfMemory):
        libportal.share_create(ident("quota2"), 4096, connection=c)
    assert c.list_contexts()["free_frames"] == free
    assert [s["identifier"] for s in c.list_sharepoints()] == [name]
    att = libportal.share_attach(name, connection=other)           # not charged
    o = libportal.portal(libportal.ANON, libportal.PROT_RW, 64 * 1024, connection=other)
    o.unmap()
    b.unmap()
    libportal.portal(libportal.ANON, libportal.PROT_RW, 16 * 1024, connection=c).unmap()
    att.unmap()
    sp.destroy()
    a.unmap()
    libportal.portal(libportal.ANON, libportal.PROT_RW, 64 * 1024, connection=c).unmap()
