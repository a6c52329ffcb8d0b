"""Bad input never crashes faytd and never leaves anything behind.

Every case sends a real request to a real faytd, checks the exact errno (and
that the message names the argument at fault), then checks that faytd is
still alive and serving (another client can create and destroy a
share-point) and that nothing was created: the share-point table, the free
frames and the mappings of every context are as they were.

Malformed messages are crafted on a raw SOCK_SEQPACKET socket:
REQ_HDR + body, exactly what a C client would write.  A client that breaks
the protocol (bad magic, short or oversized message, replies it never reads)
is disconnected; the others go on.

The daemons here are private to this module (support.daemon.Faytd, whose log
goes to a file: this module makes thousands of connections, each logged).
"""
import array
import errno
import json
import os
import random
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter

import pytest

import libportal
from libportal._abi import (ffi, lib, REQ_HDR, REP_HDR, HANDLE_REQ, HELLO_REQ,
                            LIST_REQ, PORTAL_REQ_SIZE, CHAIN_JOIN, portal_reply)
from libportal.portal import encode_portal_req
from support.daemon import Faytd, poll_equal
from support.procs import CTX

ANON, SHARE, DIRECT = lib.FAYT_PORTAL_ANON, lib.FAYT_PORTAL_SHARE, lib.FAYT_PORTAL_DIRECT
COW, SPECIAL = lib.FAYT_PORTAL_COW, lib.FAYT_PORTAL_SPECIAL
RW = lib.FAYT_PROT_READ | lib.FAYT_PROT_WRITE
PAGE = lib.FAYT_PAGE_SIZE

OFF_TYPE = ffi.offsetof("struct portal_req", "type")
OFF_PROT = ffi.offsetof("struct portal_req", "prot")
OFF_LENGTH = ffi.offsetof("struct portal_req", "length")
OFF_IDENT = ffi.offsetof("struct portal_req", "share", "identifier")
OFF_SHARE_TYPE = ffi.offsetof("struct portal_req", "share", "type")
OFF_CREATE = ffi.offsetof("struct portal_req", "share", "create")
OFF_CHAIN = ffi.offsetof("struct portal_req", "sp_req_chain", "name")
OFF_MESSAGE = ffi.offsetof("struct portal_req", "sp_req_chain", "message")
OFF_ADDR = ffi.offsetof("struct portal_req", "morphology", "addr")
OFF_MLEN = ffi.offsetof("struct portal_req", "morphology", "length")

TIMEOUT = 10.0
HELLO_BODY = HELLO_REQ.pack(lib.FAYT_WIRE_ABI, 0)


# -- helpers --------------------------------------------------------------

def _unique(tag):
    return "badinput-%s-%s" % (tag, uuid.uuid4().hex[:12])


def _poke(body, off, fmt, value):
    b = bytearray(body)
    struct.pack_into("<" + fmt, b, off, value)
    return bytes(b)


def _close_fds(fds):
    for fd in fds:
        os.close(fd)


class Reply:
    def __init__(self, op, seq, err, body, nfds):
        self.op, self.seq, self.err, self.body, self.nfds = op, seq, err, body, nfds

    @property
    def message(self):
        return self.body.decode("utf-8", "replace")


class Raw:
    """A client that speaks the wire protocol by hand."""

    def __init__(self, path, hello=True, timeout=TIMEOUT):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.s.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s.connect(path)
                break
            except BlockingIOError:         # listen backlog full: faytd is behind
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        self.seq = 0
        if hello:
            r = self.call(lib.FAYT_SYS_HELLO, HELLO_BODY)
            assert r.err == 0, r.message
            assert r.nfds == 1

    def send(self, op, body=b"", flags=0, fds=(), tid=None, magic=lib.FAYT_REQ_MAGIC):
        self.seq = (self.seq + 1) & 0xffffffff
        msg = REQ_HDR.pack(magic, op, flags, self.seq,
                           threading.get_native_id() if tid is None else tid) + body
        if fds:
            self.s.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.s.send(msg)
        return self.seq

    def recv(self):
        """The next reply (its fds closed), or None when faytd closed the connection."""
        try:
            # A larger buffer than FAYT_MSG_MAX: a reply that breaks the limit
            # is seen whole here (test_badinput_reply_within_msg_max pins it).
            data, anc, _, _ = self.s.recvmsg(1 << 18, socket.CMSG_SPACE(8 * 4))
        except ConnectionResetError:
            return None
        fds = []
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(cdata[:len(cdata) - len(cdata) % 4])
                fds.extend(a)
        _close_fds(fds)
        if not data:
            return None
        assert len(data) >= REP_HDR.size
        magic, op, nfds, seq, err = REP_HDR.unpack_from(data)
        assert magic == lib.FAYT_REP_MAGIC
        assert nfds == len(fds)
        return Reply(op, seq, err, data[REP_HDR.size:], nfds)

    def call(self, op, body=b"", **kw):
        seq = self.send(op, body, **kw)
        r = self.recv()
        assert r is not None, "faytd closed the connection on op %d" % op
        assert (r.op, r.seq) == (op, seq)
        return r

    def wait_disconnected(self, timeout=TIMEOUT):
        """Drain replies until faytd closes the connection; return how many came."""
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            self.s.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                r = self.recv()
            except socket.timeout:
                break
            if r is None:
                return n
            n += 1
        raise AssertionError("faytd did not disconnect the client within %.0fs" % timeout)

    def close(self):
        self.s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_observers = {}


def _observer(path):
    """One raw registered connection per daemon for looking (LIST needs a
    context; the observer maps nothing, so it changes no figure it reads)."""
    r = _observers.get(path)
    if r is None:
        r = _observers[path] = Raw(path)
    return r


def _list_all(r, op, key=None):
    """Every entry of a paged LIST reply (fayt_list_req: entries after an id)."""
    out, after, head = [], 0, {}
    while True:
        rep = r.call(op, LIST_REQ.pack(after))
        assert rep.err == 0, rep.message
        assert REP_HDR.size + len(rep.body) <= lib.FAYT_MSG_MAX
        page = json.loads(rep.body)
        if key:
            head, page = page, page.pop(key)
        if not page:
            break
        out.extend(page)
        after = page[-1]["id"]
    if key:
        head[key] = out
        return head
    return out


def state(path):
    """What faytd holds: share-point identifiers, free frames, all mappings."""
    r = _observer(path)
    try:
        shares = _list_all(r, lib.FAYT_SYS_LIST_SHARE)
        ctxs = _list_all(r, lib.FAYT_SYS_LIST_CONTEXTS, "contexts")
    except BaseException:
        _observers.pop(path, None)
        r.close()
        raise
    return {"shares": sorted(s["identifier"] for s in shares),
            "free_frames": ctxs["free_frames"],
            "mappings": sum(c["mappings"] for c in ctxs["contexts"]),
            "mapped_bytes": sum(c["mapped_bytes"] for c in ctxs["contexts"])}


def wait_state(path, want, timeout=TIMEOUT):
    """Poll until faytd's state equals `want` (death is handled asynchronously)."""
    return poll_equal(lambda: state(path), want, timeout)


def assert_serving(d):
    """faytd runs, and a new client can create, use and destroy a share-point."""
    assert d.proc.poll() is None, "faytd died: %s" % d.proc.returncode
    c = libportal.Connection(d.socket)
    try:
        name = _unique("alive")
        sp = libportal.share_create(name, 8192, connection=c)
        sp.write(0, b"still here")
        assert sp.read(0, 10) == b"still here"
        sp.destroy()
    finally:
        c.close()


def destroy_if_exists(path, identifier):
    """Clean-up for a test that failed half-way: attach and destroy (we are core)."""
    c = libportal.Connection(path)
    try:
        libportal.share_attach(identifier, libportal.PROT_NONE, connection=c).destroy()
    except libportal.NotFound:
        pass
    finally:
        c.close()


@pytest.fixture(scope="module")
def module_daemon(tmp_path_factory):
    d = Faytd(str(tmp_path_factory.mktemp("badinput")))
    yield d
    _observers.pop(d.socket, None)
    d.stop_clean()


@pytest.fixture
def private(fresh_faytd):
    """private(config=..., ram=...) -> a fresh faytd, stopped after the test:
    it must not have died by itself nor logged an internal error (an EIO
    reply's Traceback).  Its observer is forgotten first."""
    started = []

    def start(**kw):
        d = fresh_faytd(clean=True, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        _observers.pop(d.socket, None)


@pytest.fixture
def daemon(module_daemon):
    """The module's faytd; after the test it must serve and hold what it held."""
    before = state(module_daemon.socket)
    yield module_daemon
    assert_serving(module_daemon)
    assert wait_state(module_daemon.socket, before) == before


@pytest.fixture(scope="module")
def module_conn(module_daemon):
    c = libportal.Connection(module_daemon.socket)
    yield c
    c.close()


@pytest.fixture
def conn(daemon, module_conn):
    return module_conn


def refused(conn, body, op=lib.FAYT_SYS_PORTAL):
    """conn.call that must fail: returns (errno, message)."""
    with pytest.raises(libportal.PortalError) as ei:
        conn.call(op, body)
    return ei.value.errno, ei.value.strerror


def expect(conn, body, err, field):
    d = conn.path
    before = state(d)
    got, msg = refused(conn, body)
    assert (errno.errorcode.get(got, got), field in msg) == (errno.errorcode[err], True), msg
    assert state(d) == before


# -- portal_req fields ----------------------------------------------------

@pytest.mark.parametrize("type_", [0x20 | ANON, 0x40, 0x100 | SHARE | ANON, -1,
                                   -0x80000000, 0x7fffffff])
def test_badinput_unknown_class_bits(conn, type_):
    expect(conn, encode_portal_req(type_, RW, PAGE), errno.EINVAL, "type: unknown class bits")


def test_badinput_type_zero(conn):
    expect(conn, encode_portal_req(0, RW, PAGE), errno.EINVAL, "type: none is not a valid")


@pytest.mark.parametrize("type_", [ANON | DIRECT, ANON | COW, ANON | SPECIAL, SHARE,
                                   SHARE | ANON | DIRECT, SHARE | COW, DIRECT | COW,
                                   lib.FAYT_PORTAL_CLASSES])
def test_badinput_bad_class_combination(conn, type_):
    # A DIRECT or COW body names paddr[] entries: send them so that the
    # combination, not the missing array, is what faytd refuses.
    npaddr = 1 if type_ & (DIRECT | COW) else 0
    body = encode_portal_req(type_, RW, PAGE, paddr=[0x100000] * npaddr)
    expect(conn, body, errno.EINVAL, "is not a valid combination of classes")


@pytest.mark.parametrize("prot", [0x8, 0x10 | RW, -1, 0x7fffffff])
def test_badinput_unknown_prot_bits(conn, prot):
    expect(conn, encode_portal_req(ANON, prot, PAGE), errno.EINVAL, "prot: unknown bits")


@pytest.mark.parametrize("length", [0, -1, -PAGE, -0x80000000])
def test_badinput_length_zero_or_negative(conn, length):
    expect(conn, encode_portal_req(ANON, RW, length), errno.EINVAL, "length: %d" % length)
    body = encode_portal_req(SHARE | ANON, RW, length, identifier=_unique("len"), create=1)
    expect(conn, body, errno.EINVAL, "length: %d" % length)


def test_badinput_length_above_max_portal_length(conn):
    """The default config: max_portal_length 1GiB; portal_req.length is an int."""
    for length in ((1 << 30) + 1, 0x7fffffff):
        expect(conn, encode_portal_req(ANON, RW, length), errno.EINVAL,
               "is more than one portal may map")
        body = encode_portal_req(SHARE | ANON, RW, length, identifier=_unique("big"), create=1)
        expect(conn, body, errno.EINVAL, "is more than one portal may map")


def test_badinput_length_above_ram_is_enomem_above_max_is_einval(private):
    """> RAM but within max_portal_length: ENOMEM; > max_portal_length: EINVAL
    whatever the RAM."""
    d = private(config={"max_portal_length": "64MiB"}, ram="16MiB")
    c = libportal.Connection(d.socket)
    before = state(d.socket)
    assert before["free_frames"] == 16 * 256
    for length in (16 * (1 << 20) + 1, 32 << 20, 64 << 20):
        got, msg = refused(c, encode_portal_req(ANON, RW, length))
        assert got == errno.ENOMEM and "RAM" in msg, msg
        got, msg = refused(c, encode_portal_req(SHARE | ANON, RW, length,
                                                identifier="big", create=1))
        assert got == errno.ENOMEM and "free in faytd's RAM" in msg, msg
    got, msg = refused(c, encode_portal_req(ANON, RW, (64 << 20) + 1))
    assert got == errno.EINVAL and "more than one portal may map (67108864)" in msg, msg
    # Exactly the RAM works, and then one more frame is ENOMEM.
    p = libportal.portal(ANON, RW, 16 << 20, connection=c)
    assert state(d.socket)["free_frames"] == 0
    got, msg = refused(c, encode_portal_req(ANON, RW, PAGE))
    assert got == errno.ENOMEM, msg
    p.unmap()
    assert state(d.socket) == before
    assert_serving(d)


def test_badinput_quotas(private):
    """Requests beyond a quota: ENOMEM, and nothing is created."""
    d = private(config={"max_mappings_per_context": 3, "max_sharepoints": 2}, ram="16MiB")
    c = libportal.Connection(d.socket)
    try:
        a = libportal.share_create("quota-a", PAGE, connection=c)
        b = libportal.share_create("quota-b", PAGE, connection=c)
        before = state(d.socket)
        got, msg = refused(c, encode_portal_req(SHARE | ANON, RW, PAGE, identifier="quota-c",
                                                create=1))
        assert got == errno.ENOMEM and "share-point table is full (2)" in msg, msg
        assert state(d.socket) == before
        p = libportal.portal(ANON, RW, PAGE, connection=c)     # the third mapping
        before = state(d.socket)
        got, msg = refused(c, encode_portal_req(ANON, RW, PAGE))
        assert got == errno.ENOMEM and "this context has 3 mappings, the quota" in msg, msg
        got, msg = refused(c, encode_portal_req(SHARE | ANON, RW, 0, identifier="quota-a"))
        assert got == errno.ENOMEM, msg
        assert state(d.socket) == before
        # another context has its own quota
        other = libportal.Connection(d.socket)
        libportal.portal(ANON, RW, PAGE, connection=other).unmap()
        other.close()
        p.unmap()
        a.destroy()
        b.destroy()
        assert state(d.socket)["shares"] == []
    finally:
        c.close()
    assert_serving(d)


def test_badinput_morphology_length_differs(conn):
    body = _poke(encode_portal_req(ANON, RW, PAGE), OFF_MLEN, "Q", 2 * PAGE)
    expect(conn, body, errno.EINVAL, "morphology.length: 8192 differs from length 4096")


@pytest.mark.parametrize("addr", [1, 0x7f0000000001, 0x7f0000000800, 0x7f0000000fff,
                                  0xffffffffffffffff])
def test_badinput_unaligned_morphology_addr(conn, addr):
    expect(conn, encode_portal_req(ANON, RW, PAGE, addr=addr), errno.EINVAL,
           "morphology.addr: %#x is not 4 KiB aligned" % addr)
    # The library passes it through and reports faytd's errno.
    with pytest.raises(libportal.InvalidArgument) as ei:
        libportal.portal(ANON, RW, PAGE, addr=addr, connection=conn)
    assert ei.value.errno == errno.EINVAL


# -- identifiers ----------------------------------------------------------

def test_badinput_empty_identifier(conn):
    body = encode_portal_req(SHARE | ANON, RW, PAGE, identifier=b"", create=1)
    expect(conn, body, errno.EINVAL, "share.identifier: a share-point needs a name")
    body = encode_portal_req(SHARE | ANON, RW, 0, identifier=b"", create=0)
    expect(conn, body, errno.EINVAL, "share.identifier: a share-point needs a name")
    # A NULL identifier is no better.
    body = encode_portal_req(SHARE | ANON, RW, PAGE, identifier=None, create=1)
    expect(conn, body, errno.EINVAL, "share.identifier: a share-point needs a name")


def test_badinput_identifier_256_bytes_is_too_long_255_works(conn):
    base = uuid.uuid4().hex
    long_ = (base * 8)[:256].encode()
    body = encode_portal_req(SHARE | ANON, RW, PAGE, identifier=long_, create=1)
    expect(conn, body, errno.ENAMETOOLONG, "share.identifier: longer than 255 bytes")
    with pytest.raises(libportal.InvalidArgument):
        libportal.share_create(long_, PAGE * 2, connection=conn)
    ok = long_[:255]
    sp = libportal.share_create(ok, 2 * PAGE, connection=conn)
    try:
        assert ok.decode() in state(conn.path)["shares"]
        # 255 bytes of multi-byte UTF-8 (85 x 3 bytes) is a valid name too.
        sp2 = libportal.share_create("\u20ac" * 85, 2 * PAGE, connection=conn)
        sp2.destroy()
        body = encode_portal_req(SHARE | ANON, RW, PAGE, identifier="\u20ac" * 86, create=1)
        expect(conn, body, errno.ENAMETOOLONG, "share.identifier: longer than 255 bytes")
    finally:
        sp.destroy()


@pytest.mark.parametrize("ident", [b"\xff\xfe", b"ok\xc3", b"\xc0\xaf", b"\xed\xa0\x80"])
def test_badinput_identifier_not_utf8(conn, ident):
    body = encode_portal_req(SHARE | ANON, RW, PAGE, identifier=ident, create=1)
    expect(conn, body, errno.EINVAL, "share.identifier: not valid UTF-8")
    body = encode_portal_req(SHARE | ANON, RW, 0, identifier=ident, create=0)
    expect(conn, body, errno.EINVAL, "share.identifier: not valid UTF-8")


def test_badinput_identifier_pointer_outside_message(conn):
    good = encode_portal_req(SHARE | ANON, RW, PAGE, identifier=b"abc", create=1)
    trailer = len(good) - PORTAL_REQ_SIZE           # 4: "abc\0"
    for ptr in (trailer + 1, trailer + 2, 1 << 20, 0x7fffffffffffffff,
                -1 & 0xffffffffffffffff, 0x8000000000000000):
        body = _poke(good, OFF_IDENT, "Q", ptr)
        expect(conn, body, errno.EFAULT, "share.identifier: points outside the request")
    # The other pointer fields are checked the same way.
    sp = encode_portal_req(SPECIAL, RW, PAGE, chain="pager", message="m")
    for off, field in ((OFF_CHAIN, "sp_req_chain.name"), (OFF_MESSAGE, "sp_req_chain.message")):
        expect(conn, _poke(sp, off, "Q", 1 << 40), errno.EFAULT, field + ": points outside")


def test_badinput_identifier_not_nul_terminated(conn):
    good = encode_portal_req(SHARE | ANON, RW, PAGE, identifier=b"abc", create=1)
    expect(conn, good[:-1], errno.EFAULT, "share.identifier: not terminated inside the request")
    # A pointer into the middle of the trailer is fine as long as it ends in it.
    body = _poke(good + b"xyz", OFF_IDENT, "Q", 5)
    expect(conn, body, errno.EFAULT, "share.identifier: not terminated")
    # An unterminated run longer than the limit is reported as too long.
    body = encode_portal_req(SHARE | ANON, RW, PAGE, create=1)
    body = _poke(body, OFF_IDENT, "Q", 1) + b"a" * 300
    expect(conn, body, errno.ENAMETOOLONG, "share.identifier: longer than 255 bytes")


def test_badinput_identifier_without_share(conn):
    body = encode_portal_req(ANON, RW, PAGE, identifier="lonely")
    expect(conn, body, errno.EINVAL, "share.identifier: given without the SHARE class")
    with pytest.raises(libportal.InvalidArgument):
        libportal.portal(ANON, RW, PAGE, identifier="lonely", connection=conn)


def test_badinput_chain_without_special(conn):
    body = encode_portal_req(ANON, RW, PAGE, chain="pager")
    expect(conn, body, errno.EINVAL, "sp_req_chain: given without the SPECIAL class")


@pytest.mark.parametrize("create", [2, -1, 0x100])
def test_badinput_share_create_not_0_or_1(conn, create):
    body = encode_portal_req(SHARE | ANON, RW, PAGE, identifier=_unique("c"), create=create)
    expect(conn, body, errno.EINVAL, "share.create: %d is neither 0 nor 1" % create)


def test_badinput_share_type(conn):
    body = encode_portal_req(SHARE | ANON, RW, PAGE, identifier=_unique("t"), create=1,
                             share_type=lib.FAYT_SHARE_ADVANCED)
    expect(conn, body, errno.ENOSYS, "share.type: the advanced share-point is not built yet")
    body = encode_portal_req(SHARE | ANON, RW, PAGE, identifier=_unique("t"), create=1,
                             share_type=7)
    expect(conn, body, errno.EINVAL, "share.type: unknown type 7")


# -- share-point table ----------------------------------------------------

def test_badinput_attach_missing(conn):
    name = _unique("missing")
    body = encode_portal_req(SHARE | ANON, RW, 0, identifier=name, create=0)
    expect(conn, body, errno.ENOENT, "share.identifier: no share-point %r" % name)
    with pytest.raises(libportal.NotFound):
        libportal.share_attach(name, connection=conn)


def test_badinput_duplicate_create(conn):
    name = _unique("dup")
    sp = libportal.share_create(name, 2 * PAGE, connection=conn)
    try:
        sp.write(0, b"first")
        before = state(conn.path)
        body = encode_portal_req(SHARE | ANON, RW, 2 * PAGE, identifier=name, create=1)
        got, msg = refused(conn, body)
        assert got == errno.EEXIST and ("%r exists" % name) in msg, msg
        # Another process's try is refused the same way; the first is untouched.
        other = libportal.Connection(conn.path)
        try:
            with pytest.raises(libportal.AlreadyExists):
                libportal.share_create(name, 4 * PAGE, connection=other)
        finally:
            other.close()
        assert state(conn.path) == before
        assert sp.read(0, 5) == b"first"
    finally:
        sp.destroy()


def test_badinput_prot_escalation_on_attach(conn):
    name = _unique("ro")
    sp = libportal.share_create(name, 2 * PAGE, prot=libportal.PROT_READ, connection=conn)
    try:
        before = state(conn.path)
        for prot in (RW, libportal.PROT_WRITE, libportal.PROT_READ | libportal.PROT_EXEC):
            body = encode_portal_req(SHARE | ANON, prot, 0, identifier=name, create=0)
            got, msg = refused(conn, body)
            assert got == errno.EACCES and "prot: %#x asked" % prot in msg, msg
        assert state(conn.path) == before
        ro = libportal.share_attach(name, libportal.PROT_READ, connection=conn)
        ro.unmap()
    finally:
        sp.destroy()


def test_badinput_attach_with_wrong_length(conn):
    name = _unique("len")
    sp = libportal.share_create(name, 2 * PAGE, connection=conn)
    try:
        body = encode_portal_req(SHARE | ANON, RW, 3 * PAGE, identifier=name, create=0)
        expect(conn, body, errno.EINVAL, "length: 12288; share-point")
    finally:
        sp.destroy()


def test_badinput_one_byte_share_point(conn):
    """A share-point of one byte rounds up to one frame: the meta-structure
    and the data both fit (lengths are not refused for being small)."""
    name = _unique("tiny")
    sp = libportal.share_create(name, 1, connection=conn)
    try:
        assert sp.map_length == PAGE
        sp.write(0, b"z")
        assert sp.read(0, 1) == b"z"
    finally:
        sp.destroy()


# -- message framing ------------------------------------------------------

@pytest.mark.parametrize("cut", [0, 1, 12, PORTAL_REQ_SIZE - 1])
def test_badinput_truncated_portal_req(conn, cut):
    body = encode_portal_req(ANON, RW, PAGE)[:cut]
    expect(conn, body, errno.EFAULT, "portal_req: %d bytes sent, the struct has %d"
           % (cut, PORTAL_REQ_SIZE))


def test_badinput_missing_paddr_entries(conn):
    """DIRECT/COW name morphology.length / 4096 paddr[] entries; fewer is EFAULT."""
    for t in (DIRECT, COW, SHARE | DIRECT):
        body = encode_portal_req(t, RW, 4 * PAGE, identifier="x" if t & SHARE else None,
                                 create=1, paddr=[0x100000] * 3)
        # the trailer (if any) comes right after: cut it so the count is short
        body = body[:PORTAL_REQ_SIZE + 3 * 8]
        expect(conn, body, errno.EFAULT, "morphology.paddr: 4 entries named, fewer sent")


@pytest.mark.parametrize("op", [0, 99, 1000, 0x7fff, 0xffff])   # 8..16: notifications
def test_badinput_unknown_op(daemon, op):
    with Raw(daemon.socket) as r:
        rep = r.call(op, b"whatever")
        assert rep.err == errno.ENOSYS and "op: %d is not a faytd system call" % op in rep.message
        # The connection stays usable.
        assert r.call(lib.FAYT_SYS_LIST_SHARE).err == 0
    with Raw(daemon.socket, hello=False) as r:      # before hello too
        assert r.call(op).err == errno.ENOSYS


def test_badinput_unmap_unknown_handle(conn):
    for op in (lib.FAYT_SYS_UNMAP, lib.FAYT_SYS_SHARE_DESTROY, lib.FAYT_SYS_UNMAP_DESTROY):
        for h in (0, 1, 12345, 2 ** 64 - 1):
            got, msg = refused(conn, HANDLE_REQ.pack(h), op)
            assert got == errno.EBADF and "handle: %d names no mapping" % h in msg, msg
        for body in (b"", b"\0" * 7, b"\0" * 9):
            got, msg = refused(conn, body, op)
            assert got == errno.EINVAL and "handle: expected 8 bytes, got %d" % len(body) in msg
    # Another context's handle is not ours.
    other = libportal.Connection(conn.path)
    try:
        p = libportal.portal(ANON, RW, PAGE, connection=other)
        # the handle is per context: make sure conn has no mapping with that number
        got, msg = refused(conn, HANDLE_REQ.pack(p.handle), lib.FAYT_SYS_UNMAP)
        assert got == errno.EBADF
        p.unmap()
    finally:
        other.close()


def test_badinput_share_destroy_of_anon_handle(conn):
    p = libportal.portal(ANON, RW, PAGE, connection=conn)
    try:
        got, msg = refused(conn, HANDLE_REQ.pack(p.handle), lib.FAYT_SYS_SHARE_DESTROY)
        assert got == errno.EINVAL and "is not a share-point" in msg
    finally:
        p.unmap()


def test_badinput_unmap_twice(conn):
    p = libportal.portal(ANON, RW, PAGE, connection=conn)
    h = p.handle
    p.unmap()
    got, _ = refused(conn, HANDLE_REQ.pack(h), lib.FAYT_SYS_UNMAP)
    assert got == errno.EBADF
    with pytest.raises(libportal.Unmapped):
        p.unmap()


def test_badinput_tid_not_of_caller(daemon):
    """The header's tid must be a thread of the SO_PEERCRED pid."""
    before = state(daemon.socket)
    with Raw(daemon.socket) as r:
        for tid in (0, -1, 1, 0x7fffffff):
            rep = r.call(lib.FAYT_SYS_PORTAL, encode_portal_req(ANON, RW, PAGE), tid=tid)
            assert rep.err == errno.ESRCH and "is not a thread of pid %d" % os.getpid() in rep.message
    assert state(daemon.socket) == before


def test_badinput_request_before_hello(daemon):
    before = state(daemon.socket)
    with Raw(daemon.socket, hello=False) as r:
        body = encode_portal_req(ANON, RW, PAGE)
        for op, b in ((lib.FAYT_SYS_PORTAL, body), (lib.FAYT_SYS_UNMAP, HANDLE_REQ.pack(1)),
                      (lib.FAYT_SYS_SHARE_DESTROY, HANDLE_REQ.pack(1)),
                      (lib.FAYT_SYS_UNMAP_DESTROY, HANDLE_REQ.pack(1))):
            rep = r.call(op, b)
            assert rep.err == errno.EPROTO and "op %d before hello" % op in rep.message
            assert rep.nfds == 0
        assert state(daemon.socket) == before
        # Not a disconnection: hello then works, and a second hello is EALREADY.
        rep = r.call(lib.FAYT_SYS_HELLO, HELLO_BODY)
        assert rep.err == 0 and rep.nfds == 1
        rep = r.call(lib.FAYT_SYS_HELLO, HELLO_BODY)
        assert rep.err == errno.EALREADY
        rep = r.call(lib.FAYT_SYS_PORTAL, body)
        assert rep.err == 0
        handle = portal_reply(rep.body).handle
        assert r.call(lib.FAYT_SYS_UNMAP, HANDLE_REQ.pack(handle)).err == 0


def test_badinput_header_flags_unknown_bits(daemon):
    """fayt_req_hdr.flags has one bit (FAYT_REQ_NOREPLY); unknown bits are
    EINVAL like every other unknown bit, and nothing is created."""
    before = state(daemon.socket)
    got = {}
    with Raw(daemon.socket) as r:
        for flags in (0x2, 0x80, 0x8000, 0xffff):
            rep = r.call(lib.FAYT_SYS_PORTAL, encode_portal_req(ANON, RW, PAGE), flags=flags)
            if rep.err == 0:                            # clean up what was made
                handle = portal_reply(rep.body).handle
                assert r.call(lib.FAYT_SYS_UNMAP, HANDLE_REQ.pack(handle)).err == 0
            got[hex(flags)] = (errno.errorcode.get(rep.err, rep.err),
                               "flags" in rep.message if rep.err else "portal made")
    assert got == {f: ("EINVAL", True) for f in got}
    assert state(daemon.socket) == before


def test_badinput_noreply_flag(daemon):
    """FAYT_REQ_NOREPLY (syscall.h: "UNMAP, UNMAP_DESTROY: do not answer
    unless it fails"): a successful UNMAP is not answered, a failed one (and
    a failed UNMAP_DESTROY) is, and the flag on another call is EINVAL."""
    before = state(daemon.socket)
    with Raw(daemon.socket) as r:
        rep = r.call(lib.FAYT_SYS_PORTAL, encode_portal_req(ANON, RW, PAGE))
        assert rep.err == 0
        handle = portal_reply(rep.body).handle
        r.send(lib.FAYT_SYS_UNMAP, HANDLE_REQ.pack(handle), flags=lib.FAYT_REQ_NOREPLY)
        seq = r.send(lib.FAYT_SYS_LIST_SHARE)
        first = r.recv()
        if (first.op, first.seq) != (lib.FAYT_SYS_LIST_SHARE, seq):
            r.recv()                                    # keep in step for the rest
        assert (first.op, first.seq) == (lib.FAYT_SYS_LIST_SHARE, seq), \
            "a successful NOREPLY UNMAP was answered (op %d err %d)" % (first.op, first.err)
        seq = r.send(lib.FAYT_SYS_UNMAP, HANDLE_REQ.pack(handle), flags=lib.FAYT_REQ_NOREPLY)
        rep = r.recv()
        assert (rep.op, rep.seq, rep.err) == (lib.FAYT_SYS_UNMAP, seq, errno.EBADF)
        seq = r.send(lib.FAYT_SYS_UNMAP_DESTROY, HANDLE_REQ.pack(handle),
                     flags=lib.FAYT_REQ_NOREPLY)
        rep = r.recv()
        assert (rep.op, rep.seq, rep.err) == (lib.FAYT_SYS_UNMAP_DESTROY, seq, errno.EBADF)
        rep = r.call(lib.FAYT_SYS_LIST_SHARE, flags=lib.FAYT_REQ_NOREPLY)
        assert rep.err == errno.EINVAL
    assert state(daemon.socket) == before


# -- protocol violations: disconnected, others go on ----------------------

def _bystander(path):
    """A well-behaved client that holds a share-point across the violation."""
    c = libportal.Connection(path)
    sp = libportal.share_create(_unique("bystander"), 2 * PAGE, connection=c)
    sp.write(0, b"unharmed")
    return c, sp


def _check_bystander(c, sp):
    assert sp.read(0, 8) == b"unharmed"
    p = libportal.portal(ANON, RW, PAGE, connection=c)     # its connection still works
    p.unmap()
    sp.destroy()
    c.close()


def _violate(daemon, payload, hello=True):
    c, sp = _bystander(daemon.socket)
    with Raw(daemon.socket, hello=hello) as r:
        r.s.send(payload)
        assert r.wait_disconnected() == 0
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(3):
                r.send(lib.FAYT_SYS_LIST_SHARE)
                time.sleep(0.01)
    _check_bystander(c, sp)


@pytest.mark.parametrize("hello", [True, False])
def test_badinput_bad_magic(daemon, hello):
    for magic in (0, lib.FAYT_REP_MAGIC, lib.FAYT_REQ_MAGIC ^ 1, 0xffffffff):
        _violate(daemon, REQ_HDR.pack(magic, lib.FAYT_SYS_LIST_SHARE, 0, 1,
                                      threading.get_native_id()), hello)


@pytest.mark.parametrize("n", [0, 1, 4, REQ_HDR.size - 1])
def test_badinput_message_shorter_than_header(daemon, n):
    full = REQ_HDR.pack(lib.FAYT_REQ_MAGIC, lib.FAYT_SYS_LIST_SHARE, 0, 1,
                        threading.get_native_id())
    _violate(daemon, full[:n])


def test_badinput_random_bytes(daemon):
    rnd = random.Random(0xfa47)
    for i in range(40):
        n = rnd.choice([1, 7, REQ_HDR.size, REQ_HDR.size + 1, 100, 1000, 60000])
        payload = os.urandom(n)
        if payload[:4] == REQ_HDR.pack(lib.FAYT_REQ_MAGIC, 0, 0, 0, 0)[:4]:
            continue            # 2**-32: a valid magic is not a violation
        with Raw(daemon.socket, hello=bool(i % 2)) as r:
            r.s.send(payload)
            assert r.wait_disconnected() == 0
    assert_serving(daemon)


def test_badinput_oversized_message(daemon):
    c, sp = _bystander(daemon.socket)
    for size in (lib.FAYT_MSG_MAX + 1, 100000):
        with Raw(daemon.socket) as r:
            body = encode_portal_req(ANON, RW, PAGE)
            body += b"\0" * (size - REQ_HDR.size - len(body))
            r.send(lib.FAYT_SYS_PORTAL, body)
            assert r.wait_disconnected() == 0
    # Exactly FAYT_MSG_MAX is a message faytd reads (and answers).
    with Raw(daemon.socket) as r:
        body = encode_portal_req(ANON, RW, PAGE)
        body += b"\0" * (lib.FAYT_MSG_MAX - REQ_HDR.size - len(body))
        rep = r.call(lib.FAYT_SYS_PORTAL, body)
        assert rep.err == 0
        handle = portal_reply(rep.body).handle
        assert r.call(lib.FAYT_SYS_UNMAP, HANDLE_REQ.pack(handle)).err == 0
    _check_bystander(c, sp)


def test_badinput_pipelined_requests_without_reading(daemon):
    """One call at a time: a client that floods faytd and never reads its
    replies is disconnected instead of blocking the daemon."""
    c, sp = _bystander(daemon.socket)
    r = Raw(daemon.socket)
    try:
        r.s.settimeout(2.0)
        sent = 0
        deadline = time.monotonic() + 30
        try:
            while sent < 200000 and time.monotonic() < deadline:
                r.send(lib.FAYT_SYS_LIST_CONTEXTS)
                sent += 1
                if sent % 1000 == 0:
                    # faytd keeps serving others while we flood it
                    assert sp.read(0, 8) == b"unharmed"
        except (BrokenPipeError, ConnectionResetError):
            pass
        got = r.wait_disconnected(timeout=20)
        assert got < sent, "faytd answered all %d pipelined requests" % sent
    finally:
        r.close()
    _check_bystander(c, sp)


def test_badinput_file_descriptors_with_a_request(daemon):
    """A call that takes no fds and is sent some: EINVAL, nothing created, and
    faytd closes what it received (the pipe sees EOF)."""
    before = state(daemon.socket)
    with Raw(daemon.socket, hello=False) as r:
        for op, body in ((lib.FAYT_SYS_HELLO, HELLO_BODY),
                         (lib.FAYT_SYS_LIST_SHARE, b"")):
            rd, wr = os.pipe()
            try:
                rep = r.call(op, body, fds=[wr])
                os.close(wr)
                assert rep.err == errno.EINVAL
                assert "this call takes no file descriptors" in rep.message
                _assert_eof(rd)
            finally:
                os.close(rd)
        assert r.call(lib.FAYT_SYS_HELLO, HELLO_BODY).err == 0
        for op, body in ((lib.FAYT_SYS_PORTAL, encode_portal_req(ANON, RW, PAGE)),
                         (lib.FAYT_SYS_PORTAL, encode_portal_req(
                             SHARE | ANON, RW, PAGE, identifier=_unique("fd"), create=1)),
                         (lib.FAYT_SYS_UNMAP, HANDLE_REQ.pack(1))):
            pipes = [os.pipe() for _ in range(3)]
            try:
                rep = r.call(op, body, fds=[w for _, w in pipes])
                for _, w in pipes:
                    os.close(w)
                assert rep.err == errno.EINVAL and rep.nfds == 0, rep.message
                for rd, _ in pipes:
                    _assert_eof(rd)
            finally:
                for rd, _ in pipes:
                    os.close(rd)
        assert state(daemon.socket) == before
    # More fds than faytd takes (4): the control data is cut, so the
    # message is refused as a protocol violation; every fd is still closed.
    with Raw(daemon.socket) as r:
        pipes = [os.pipe() for _ in range(12)]
        try:
            r.send(lib.FAYT_SYS_LIST_SHARE, fds=[w for _, w in pipes])
            for _, w in pipes:
                os.close(w)
            assert r.wait_disconnected() == 0
            for rd, _ in pipes:
                _assert_eof(rd)
        finally:
            for rd, _ in pipes:
                os.close(rd)


def _assert_eof(rd, timeout=TIMEOUT):
    r, _, _ = select.select([rd], [], [], timeout)
    assert r, "faytd kept a file descriptor it was sent"
    assert os.read(rd, 1) == b""


# -- clients that go away mid-call ----------------------------------------

_CLOSER = r"""
import os, socket, sys, threading
from libportal._abi import lib, REQ_HDR, HELLO_REQ
from libportal.portal import encode_portal_req
path, name = sys.argv[1], sys.argv[2]

def raw():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.send(REQ_HDR.pack(lib.FAYT_REQ_MAGIC, lib.FAYT_SYS_HELLO, 0, 1, threading.get_native_id())
           + HELLO_REQ.pack(lib.FAYT_WIRE_ABI, 0))
    data, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(16))
    return s

def fire(body):
    s = raw()
    s.send(REQ_HDR.pack(lib.FAYT_REQ_MAGIC, lib.FAYT_SYS_PORTAL, 0, 2,
                        threading.get_native_id()) + body)
    s.close()               # never read the reply

fire(encode_portal_req(lib.FAYT_PORTAL_ANON, 3, 1 << 20))
fire(encode_portal_req(lib.FAYT_PORTAL_SHARE | lib.FAYT_PORTAL_ANON, 3, 8192,
                       identifier=name, create=1))
print("fired", flush=True)
sys.stdin.readline()        # stay alive until told
"""


def test_badinput_close_without_reading_reply(daemon):
    before = state(daemon.socket)
    # In this process: the ANON portal's frames come back at once.
    with Raw(daemon.socket) as r:
        r.send(lib.FAYT_SYS_PORTAL, encode_portal_req(ANON, RW, 1 << 20))
    assert wait_state(daemon.socket, before) == before
    # In a child: while it lives, its share-point stays (its owner lives, as
    # documented) but its mappings are gone; once it exits, it is reclaimed.
    name = _unique("closer")
    child = subprocess.Popen([sys.executable, "-c", _CLOSER, daemon.socket, name],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "fired"
        want = dict(before, shares=sorted(before["shares"] + [name]),
                    free_frames=before["free_frames"] - 2)
        assert wait_state(daemon.socket, want) == want
        child.stdin.write("bye\n")
        child.stdin.flush()
        assert child.wait(timeout=TIMEOUT) == 0
        assert wait_state(daemon.socket, before) == before
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if name in state(daemon.socket)["shares"]:
            destroy_if_exists(daemon.socket, name)


_BUSY = r"""
import os, sys
import libportal as lp
i = 0
keep = []
while True:
    if i == 1:
        print("go", flush=True)
    i += 1
    p = lp.portal(lp.ANON, lp.PROT_RW, 65536)
    sp = lp.share_create("badinput-killed-%d-%d" % (os.getpid(), i), 8192)
    sp.write(0, b"x")
    other = lp.share_attach(sp.identifier)
    with sp:
        keep.append((p, sp, other))
        if len(keep) > 20:
            a, b, c = keep.pop(0)
            a.unmap(); c.unmap(); b.destroy()
"""


def test_badinput_sigkill_in_the_middle_of_calls(daemon):
    """A process killed while it makes calls (holding locks, mid-request)
    leaves nothing: its ANON frames, its share-points, its mappings go."""
    before = state(daemon.socket)
    rnd = random.Random(7)
    for _ in range(6):
        child = subprocess.Popen([sys.executable, "-c", _BUSY], env=daemon.env(),
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "go"
            time.sleep(rnd.uniform(0.05, 0.4))
            during = state(daemon.socket)
            assert during["free_frames"] < before["free_frames"]
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=TIMEOUT)
        assert child.returncode == -signal.SIGKILL
        assert wait_state(daemon.socket, before) == before
    assert_serving(daemon)


# -- fuzz -----------------------------------------------------------------

_INTERESTING = [0, 1, -1, 2, 3, 4, 7, 0x10, 0x1f, 0x20, PAGE - 1, PAGE, PAGE + 1,
                0x7fffffff, -0x80000000, 1 << 20, 1 << 30]
_FIELDS = [(OFF_TYPE, "i"), (OFF_PROT, "i"), (OFF_LENGTH, "i"), (OFF_IDENT, "Q"),
           (OFF_SHARE_TYPE, "i"), (OFF_CREATE, "i"), (OFF_CHAIN, "Q"), (OFF_MESSAGE, "Q"),
           (OFF_ADDR, "Q"), (OFF_MLEN, "Q")]
_ALLOWED = {errno.EINVAL, errno.EFAULT, errno.ENAMETOOLONG, errno.ENOMEM, errno.ENOENT,
            errno.EEXIST, errno.EACCES, errno.ENOSYS}


def _mutate(rnd, body):
    b = bytearray(body)
    for _ in range(rnd.randint(1, 3)):
        how = rnd.randrange(6)
        if how == 0 and b:                                  # flip bits
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
        elif how == 1 and b:                                # random byte
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif how == 2:                                      # interesting field value
            off, fmt = rnd.choice(_FIELDS)
            v = rnd.choice(_INTERESTING)
            if fmt == "Q":
                v &= 0xffffffffffffffff
            else:
                v = (v + 2 ** 31) % 2 ** 32 - 2 ** 31
            if len(b) >= off + struct.calcsize(fmt):
                struct.pack_into("<" + fmt, b, off, v)
        elif how == 3:                                      # truncate
            del b[rnd.randrange(len(b) + 1):]
        elif how == 4:                                      # append junk
            b.extend(os.urandom(rnd.randint(1, 300)))
        else:                                               # pointer into the trailer
            off = rnd.choice([OFF_IDENT, OFF_CHAIN, OFF_MESSAGE])
            if len(b) >= off + 8:
                struct.pack_into("<Q", b, off, rnd.randint(0, max(1, len(b) - PORTAL_REQ_SIZE + 2)))
    return bytes(b)


def test_badinput_fuzz_portal_bodies(private):
    """2,000 random mutations of valid portal bodies from one raw client:
    each is answered (never EIO, an internal error), faytd never goes down,
    and whatever the mutations created is released with its handle."""
    d = private(ram="64MiB")
    c = libportal.Connection(d.socket)
    base = libportal.share_create("fuzz-base", 2 * PAGE, connection=c)
    before = state(d.socket)
    seeds = [
        encode_portal_req(ANON, RW, 2 * PAGE),
        encode_portal_req(SHARE | ANON, RW, 2 * PAGE, identifier="fuzz-new", create=1),
        encode_portal_req(SHARE | ANON, RW, 0, identifier="fuzz-base", create=0),
        encode_portal_req(SPECIAL, RW, PAGE, chain="pager", message="hello"),
        encode_portal_req(DIRECT, RW, PAGE, paddr=[0x100000]),
        encode_portal_req(COW | 0, libportal.PROT_READ, 2 * PAGE, paddr=[0x100000, 0x101000]),
    ]
    rnd = random.Random(20240611)
    seen = Counter()
    r = Raw(d.socket)
    try:
        for i in range(2000):
            body = _mutate(rnd, rnd.choice(seeds))
            rep = r.call(lib.FAYT_SYS_PORTAL, body)
            seen[rep.err] += 1
            assert rep.err == 0 or rep.err in _ALLOWED, \
                "mutation %d: %s %s (body %s)" % (i, errno.errorcode.get(rep.err, rep.err),
                                                  rep.message, body.hex())
            if rep.err == 0:
                assert rep.nfds in (1, 2)       # 2: a split share-point
                p = portal_reply(rep.body)
                handle, flags = p.handle, p.flags
                op = (lib.FAYT_SYS_UNMAP_DESTROY if flags & lib.FAYT_PORTAL_REPLY_CREATED
                      else lib.FAYT_SYS_UNMAP)
                assert r.call(op, HANDLE_REQ.pack(handle)).err == 0
            else:
                assert rep.nfds == 0
        assert d.proc.poll() is None
        assert r.call(lib.FAYT_SYS_LIST_SHARE).err == 0
    finally:
        r.close()
    assert seen[errno.EINVAL] and seen[errno.EFAULT] and seen[0], seen
    assert wait_state(d.socket, before) == before
    base.destroy()
    after = state(d.socket)
    assert after["shares"] == [] and after["free_frames"] == 64 * 256 and after["mappings"] == 0
    assert_serving(d)


# -- resources held for a connection --------------------------------------

def _fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def test_badinput_connect_close_loop_leaks_nothing(private):
    """A long-lived process that opens and closes connections (each with a
    hello) must not grow faytd: no contexts, fds or shm objects per cycle."""
    d = private(ram="16MiB")
    warm = libportal.Connection(d.socket)
    warm.close()
    time.sleep(0.1)
    fds0 = _fd_count(d.proc.pid)
    for _ in range(200):
        c = libportal.Connection(d.socket)
        c.close()
    with Raw(d.socket) as r:
        ctxs = json.loads(r.call(lib.FAYT_SYS_LIST_CONTEXTS).body)["contexts"]
        grown = _fd_count(d.proc.pid) - fds0
    stale = [x for x in ctxs if not x["connected"]]
    assert (len(stale), grown < 20) == (0, True), \
        "faytd keeps %d contexts of closed connections and %d more fds" % (len(stale), grown)


def test_badinput_list_after_beyond_32_bits_not_core(private):
    """A context that is not core pages the share-points of its namespaces
    through the C core, whose ids are 32-bit: an `after` above that is an
    empty page, not an internal error (found by bench/fuzz.py)."""
    d = private(config={"policy": {"categories": {"server": {"classes": ["SHARE", "ANON"]}},
                                   "rules": [], "default": "server"}})
    c = libportal.Connection(d.socket)
    sp = libportal.share_create(_unique("list32"), PAGE, connection=c)
    try:
        with Raw(d.socket) as r:
            assert len(json.loads(r.call(lib.FAYT_SYS_LIST_SHARE, LIST_REQ.pack(0)).body)) == 1
            for after in (2 ** 32 - 1, 2 ** 32, 2 ** 63, 2 ** 64 - 1):
                rep = r.call(lib.FAYT_SYS_LIST_SHARE, LIST_REQ.pack(after))
                assert rep.err == 0, rep.message
                assert json.loads(rep.body) == []
    finally:
        sp.destroy()
        c.close()


def test_badinput_reply_within_msg_max(private):
    """FAYT_MSG_MAX bounds messages "either way" (syscall.h), and libportal
    receives at most that much: the list replies come in pages that fit, and
    paging (fayt_list_req.after) yields every entry once."""
    d = private(ram="64MiB")
    c = libportal.Connection(d.socket)
    names = ["badinput-list-%03d-%s" % (i, "x" * 200) for i in range(150)]
    sps = [libportal.share_create(n, 16 * PAGE, connection=c) for n in names]
    peers = [Raw(d.socket, hello=False) for _ in range(450)]
    try:
        r = _observer(d.socket)
        listed = _list_all(r, lib.FAYT_SYS_LIST_SHARE)       # checks each page's size
        assert sorted(x["identifier"] for x in listed) == names
        first = json.loads(r.call(lib.FAYT_SYS_LIST_SHARE).body)    # no body: first page
        assert 0 < len(first) < 150
        assert [x["identifier"] for x in c.list_sharepoints()] == \
            [x["identifier"] for x in listed]
        ctxs = _list_all(r, lib.FAYT_SYS_LIST_CONTEXTS, "contexts")["contexts"]
        ids = [x["id"] for x in ctxs]
        assert len(ids) > 450 and ids == sorted(set(ids))
        for bad in (b"\0", b"\0" * 7, b"\0" * 9):
            for op in (lib.FAYT_SYS_LIST_SHARE, lib.FAYT_SYS_LIST_CONTEXTS):
                rep = r.call(op, bad)
                assert rep.err == errno.EINVAL
                assert "list: expected 8 bytes, got %d" % len(bad) in rep.message
        for after in (2 ** 64 - 1, 2 ** 63):
            assert json.loads(r.call(lib.FAYT_SYS_LIST_SHARE, LIST_REQ.pack(after)).body) == []
    finally:
        for sp in sps:
            sp.destroy()
        c.close()
        # 450 peers keep faytd's fds below 1024, clear of the select() crash
        # that test_badinput_many_clients_then_disconnect is about
        for p in peers:
            p.close()
    assert_serving(d)


@pytest.fixture
def many_fds():
    """Let this process and the faytd it starts have a few thousand fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if want < 2048:
        pytest.skip("RLIMIT_NOFILE hard limit %d is too low" % hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_badinput_many_clients_then_disconnect(many_fds, private):
    """600 clients connected at once, then all go: faytd stays up.  (Its fds
    pass 1023 here: nothing in faytd may use select(2), which cannot watch
    an fd above FD_SETSIZE.)"""
    d = private(ram="16MiB")
    d.crash_reported = True         # this test reports a crash itself (not the teardown)
    peers = [Raw(d.socket, hello=False) for _ in range(600)]
    ctxs = _list_all(_observer(d.socket), lib.FAYT_SYS_LIST_CONTEXTS, "contexts")
    assert len(ctxs["contexts"]) > 600          # all accepted
    highest = max(int(n) for n in os.listdir("/proc/%d/fd" % d.proc.pid))
    assert highest >= 1024
    for p in peers:
        p.close()
    deadline = time.monotonic() + TIMEOUT
    while d.proc.poll() is None and time.monotonic() < deadline:
        try:
            ctxs = _list_all(_observer(d.socket), lib.FAYT_SYS_LIST_CONTEXTS, "contexts")
        except (OSError, AssertionError):
            break
        if sum(x["connected"] for x in ctxs["contexts"]) <= 1:
            break
        time.sleep(0.05)
    try:
        d.proc.wait(timeout=1)          # let a crash show as one
    except subprocess.TimeoutExpired:
        pass
    assert d.proc.poll() is None, "faytd died: %s" % d.read_log()[-1500:]
    assert_serving(d)
    d.crash_reported = False


def test_badinput_list_before_hello_is_refused(daemon):
    """Listing needs a context the policy admitted: a client that has not
    (or could not) register sees no identifiers, pids or frames."""
    with Raw(daemon.socket, hello=False) as r:
        for op in (lib.FAYT_SYS_LIST_SHARE, lib.FAYT_SYS_LIST_CONTEXTS):
            rep = r.call(op)
            assert rep.err == errno.EPROTO and "before hello" in rep.message


# -- objects truncated under faytd ---------------------------------------------

def _hello_with_page_fd(path):
    """A registered connection that keeps its context page's fd."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(TIMEOUT)
    s.connect(path)
    s.send(REQ_HDR.pack(lib.FAYT_REQ_MAGIC, lib.FAYT_SYS_HELLO, 0, 1, threading.get_native_id())
           + HELLO_REQ.pack(lib.FAYT_WIRE_ABI, 0))
    _, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
    fds = array.array("i")
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - len(cdata) % 4])
    assert len(fds) == 1
    return s, fds[0]


def test_badinput_objects_clients_hold_cannot_be_truncated(private):
    """ftruncate(2) on an fd faytd gave out (a context page, a chain's
    channel) is refused (the objects are sealed memfds), so faytd never
    meets a SIGBUS there; it serves on."""
    d = private()
    s, page_fd = _hello_with_page_fd(d.socket)
    for size in (0, 4 * PAGE):
        with pytest.raises(PermissionError):
            os.ftruncate(page_fd, size)
    os.close(page_fd)
    s.close()                   # faytd reads its lock records at the disconnect
    c = libportal.Connection(d.socket)
    try:
        body, fds = c.call(lib.FAYT_SYS_CHAIN_JOIN, CHAIN_JOIN.pack(8, 65536, 0, 300, b"cut"))
        for size in (0, 1 << 20):
            with pytest.raises(PermissionError):
                os.ftruncate(fds[0], size)
        for fd in fds:
            os.close(fd)
        assert d.proc.poll() is None
        sp = libportal.share_create("after-the-cut", PAGE, connection=c)     # still serving
        sp.destroy()
    finally:
        c.close()


def _holder(socket_path, names, locked):
    """A child process: take the locks of `names`, say so, wait to be killed."""
    c = libportal.Connection(socket_path)
    sps = [libportal.share_attach(n, connection=c) for n in names]
    for sp in sps:
        assert sp.lock(TIMEOUT) == 0
    locked.set()
    time.sleep(60)


def _spawn_holder(d, names):
    locked = CTX.Event()
    p = CTX.Process(target=_holder, args=(d.socket, names, locked))
    p.start()
    assert locked.wait(TIMEOUT), "the holder did not take its locks"
    return p


def test_badinput_a_share_point_cannot_be_cut_under_lock_recovery(private):
    """A holder dies holding two locks; a client's ftruncate(2) of one
    share-point's object is refused, and both locks are recovered."""
    d = private()
    c = libportal.Connection(d.socket)
    try:
        cut = libportal.share_create("cut", 2 * PAGE, connection=c)
        fine = libportal.share_create("fine", PAGE, connection=c)
        body, fds = c.call(lib.FAYT_SYS_PORTAL, encode_portal_req(
            libportal.SHARE | libportal.ANON, libportal.PROT_RW, 0, identifier="cut"))
        try:
            holder = _spawn_holder(d, ["cut", "fine"])
            for fd in fds:          # page 0's object and the rest's
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, 0)
            holder.kill()
            holder.join(TIMEOUT)
            assert fine.lock(TIMEOUT) == errno.EOWNERDEAD
            fine.mark_consistent()
            fine.unlock()
            assert cut.lock(TIMEOUT) == errno.EOWNERDEAD
            cut.mark_consistent()
            cut.unlock()
        finally:
            for fd in fds:
                os.close(fd)
        cut.destroy()
        fine.destroy()
    finally:
        c.close()
    assert "its object was truncated" not in d.read_log()
