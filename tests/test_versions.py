"""Versions: the wire ABI that HELLO carries both ways (fayt/syscall.h
FAYT_WIRE_ABI), and the journal's format version (faytd/journal.py).
Real faytds; the client's own check is seen against a socket server of
this test that answers HELLO with another version."""
import errno
import os
import socket
import struct
import threading

import pytest

import libportal
from faytd import journal as journal_mod
from libportal._abi import lib, HELLO_REPLY, HELLO_REQ, REP_HDR, REQ_HDR
from support.children import share_owner
from support.daemon import keepers

TIMEOUT = 10.0


def raw_hello(path, body):
    """Send HELLO with `body` on a new connection: (err, message, nfds), and
    whether the connection still answers (a refusal is a reply, not a hang-up)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(TIMEOUT)
    try:
        s.connect(path)
        s.send(REQ_HDR.pack(lib.FAYT_REQ_MAGIC, lib.FAYT_SYS_HELLO, 0, 1,
                            threading.get_native_id()) + body)
        data, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
        nfds = 0
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for (fd,) in struct.iter_unpack("i", cdata[:len(cdata) - len(cdata) % 4]):
                    os.close(fd)
                    nfds += 1
        magic, op, _, seq, err = REP_HDR.unpack_from(data)
        assert (magic, op, seq) == (lib.FAYT_REP_MAGIC, lib.FAYT_SYS_HELLO, 1)
        body_out = data[REP_HDR.size:]
        return err, body_out, nfds
    finally:
        s.close()


@pytest.mark.parametrize("body, theirs", [
    (HELLO_REQ.pack(lib.FAYT_WIRE_ABI + 1, 0), lib.FAYT_WIRE_ABI + 1),
    (HELLO_REQ.pack(lib.FAYT_WIRE_ABI + 1, 0) + bytes(24), lib.FAYT_WIRE_ABI + 1),  # a longer, later HELLO
    (b"", 0),                                   # the layout before versions: no body
])
def test_versions_faytd_refuses_another_wire_abi(fresh_faytd, body, theirs):
    d = fresh_faytd()
    err, msg, nfds = raw_hello(d.socket, body)
    why = ("hello: wire ABI mismatch: the client speaks version %d%s, this faytd speaks "
           "version %d (install the same fayt-portals on both sides)"
           % (theirs, " (a HELLO without a version)" if not body else "", lib.FAYT_WIRE_ABI))
    assert err == errno.EPROTO and nfds == 0
    assert msg.decode() == why
    # faytd serves on, and says which version it speaks.
    err, reply, nfds = raw_hello(d.socket, HELLO_REQ.pack(lib.FAYT_WIRE_ABI, 0))
    assert err == 0 and nfds == 1
    assert HELLO_REPLY.unpack_from(reply)[3] == lib.FAYT_WIRE_ABI
    log = d.stop()
    assert why in log, "faytd did not log the refusal:\n" + log[-2000:]


def test_versions_faytd_refuses_a_malformed_hello(fresh_faytd):
    d = fresh_faytd()
    err, msg, _ = raw_hello(d.socket, b"\x01\x00")
    assert err == errno.EINVAL and msg.decode() == "hello: body of 2 bytes; fayt_hello_req has 8"
    err, msg, _ = raw_hello(d.socket, HELLO_REQ.pack(lib.FAYT_WIRE_ABI, 0) + b"x")
    assert err == errno.EINVAL and msg.decode() == "hello: body of 9 bytes; fayt_hello_req has 8"
    err, msg, _ = raw_hello(d.socket, HELLO_REQ.pack(lib.FAYT_WIRE_ABI, 7))
    assert err == errno.EINVAL and msg.decode() == "hello: reserved: must be 0"


def test_versions_the_client_sends_its_wire_abi(fresh_faytd, conn_to):
    d = fresh_faytd()
    c = conn_to(d)
    assert c.context_id >= 1
    assert "wire ABI mismatch" not in d.stop()


class FakeFaytd:
    """A socket server of this test that answers HELLO as a faytd of
    wire ABI `version` would (context page: a memfd), and records the body."""

    def __init__(self, path, version):
        self.path, self.version = path, version
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        self.listener.listen(1)
        self.listener.settimeout(TIMEOUT)
        self.got = None
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            data = conn.recv(4096)
            _, op, _, seq, _ = REQ_HDR.unpack_from(data)
            self.got = (op, data[REQ_HDR.size:])
            page = os.memfd_create("fake-context-page")
            try:
                os.ftruncate(page, 1 << 16)
                conn.sendmsg([REP_HDR.pack(lib.FAYT_REP_MAGIC, op, 1, seq, 0)
                              + HELLO_REPLY.pack(1, lib.FAYT_CATEGORY_CORE, 0, self.version)],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", page))])
            finally:
                os.close(page)
            try:
                conn.recv(4096)         # until the client hangs up
            except OSError:
                pass

    def close(self):
        self.thread.join(TIMEOUT)
        self.listener.close()


def _fds():
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("version", [0, lib.FAYT_WIRE_ABI + 1])
def test_versions_client_refuses_a_faytd_of_another_wire_abi(tmp_path, version):
    before = _fds()
    fake = FakeFaytd(str(tmp_path / "fake.sock"), version)
    try:
        with pytest.raises(libportal.ProtocolError) as e:
            libportal.Connection(fake.path)
    finally:
        fake.close()
    assert fake.got == (lib.FAYT_SYS_HELLO, HELLO_REQ.pack(lib.FAYT_WIRE_ABI, 0))
    assert e.value.errno == errno.EPROTO
    assert str(e.value) == (
        "[Errno %d] hello: wire ABI mismatch: faytd at %s speaks version %d, this client "
        "speaks version %d (install the same fayt-portals on both sides)"
        % (errno.EPROTO, fake.path, version, lib.FAYT_WIRE_ABI))
    assert _fds() == before, "the refused connection left descriptors open"


# -- the journal's format ------------------------------------------------------


def _journal(restartable):
    return os.path.join(restartable.dir, "faytd.journal")


def test_versions_journal_names_its_format_first(restartable, spawn):
    d = restartable.start()
    share_owner(spawn, d, "v-first", b"x")
    with open(_journal(restartable), "rb") as f:
        assert f.readline() == b"V %d\n" % journal_mod.FORMAT
    assert journal_mod.FORMAT == 3


def test_versions_journal_of_format_1_is_taken_and_migrated(restartable, spawn):
    """Today's journal before versions (no V line) is read as format 1 and
    rewritten in format 3 at the restart; its share-points come back."""
    d = restartable.start()
    share_owner(spawn, d, "v-old", b"format 1")
    restartable.kill()
    path = _journal(restartable)
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(b"V 3\nN ")
    with open(path, "wb") as f:
        f.write(data[len(b"V 3\n"):])           # as a faytd before versions wrote it
    d = restartable.start()
    log = d.read_log()
    assert ("journal %s: format 1 (before versions: no V line); read as such, and migrated in "
            "place to format 3 when faytd rewrites it at start" % path) in log
    assert "restored 1 share-points" in log
    with open(path, "rb") as f:
        assert f.readline() == b"V 3\n"
    conn = libportal.Connection(d.socket)
    try:
        assert libportal.share_attach("v-old", connection=conn).read(0, 8) == b"format 1"
    finally:
        conn.close()


@pytest.mark.parametrize("line", [b"V 4", b"V two"])
def test_versions_journal_of_an_unknown_format_is_refused_untouched(restartable, spawn, line):
    """faytd does not start on a journal it cannot read (a newer faytd's):
    the message names the file and the formats; the journal and the keeper
    holding its objects are left as they were, for the faytd that can."""
    d = restartable.start()
    share_owner(spawn, d, "v-new", b"kept for the newer faytd")
    restartable.kill()
    path = _journal(restartable)
    with open(path, "rb") as f:
        data = f.read()
    newer = line + b"\n" + data[len(b"V 3\n"):]
    with open(path, "wb") as f:
        f.write(newer)
    (keeper,) = keepers([restartable.dir])
    with pytest.raises(RuntimeError) as e:
        restartable.start()
    shown = line[2:].decode()
    assert ("faytd: journal %s: format %s; this faytd reads formats 1, 2 and 3 and writes 3. A "
            "newer faytd wrote it: run that one on this state directory (or move the journal "
            "away, and its share-points are lost). Nothing was changed." % (path, shown)
            ) in str(e.value)
    with open(path, "rb") as f:
        assert f.read() == newer
    assert list(keepers([restartable.dir])) == [keeper]
    # The faytd that reads it takes everything back (here: the same line as before).
    with open(path, "wb") as f:
        f.write(data)
    d = restartable.start()
    conn = libportal.Connection(d.socket)
    try:
        sp = libportal.share_attach("v-new", connection=conn)
        assert sp.read(0, 24) == b"kept for the newer faytd"
    finally:
        conn.close()
