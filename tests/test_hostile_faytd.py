"""The client's system call (_fastpath.Transport.request) against a faytd
that breaks the protocol: a fake server (a real process on a real
SOCK_SEQPACKET socket in a directory of this uid) answers HELLO properly
and then one scripted bad reply.  The call must raise an OSError with the
errno a kernel would use (EPROTO for a reply that breaks the protocol,
ECONNRESET when the server hangs up), close every descriptor the reply
carried, and leave the connection closed once its replies cannot be
trusted to match its requests."""
import errno
import gc
import os
import subprocess
import sys
import textwrap

import pytest

import libportal
from libportal._abi import lib

WAIT = 30

# The fake faytd: argv[1] socket path, argv[2] scenario.  It answers HELLO
# (a context page as a memfd), then each request by the scenario's script,
# then echoes a good empty reply to every later request.
SERVER = textwrap.dedent(r"""
    import array, os, socket, struct, sys
    from libportal._abi import lib, ffi, REQ_HDR, REP_HDR, HELLO_REPLY, PORTAL_REPLY
    path, scenario = sys.argv[1], sys.argv[2]
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(1)
    print("ready", flush=True)
    c, _ = srv.accept()
    M = lib.FAYT_REP_MAGIC

    def rep(op, seq, err=0, body=b"", fds=(), magic=M):
        msg = REP_HDR.pack(magic, op, len(fds), seq, err) + body
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        c.sendmsg([msg], anc)

    def memfds(n, size=4096):
        out = []
        for _ in range(n):
            fd = os.memfd_create("fake")
            os.ftruncate(fd, size)
            out.append(fd)
        return out

    def recv():
        data = c.recv(70000)
        if not data:
            sys.exit(0)
        magic, op, flags, seq, tid = REQ_HDR.unpack_from(data)
        return op, flags, seq, data[REQ_HDR.size:]

    op, flags, seq, body = recv()
    page = memfds(1, ffi.sizeof("struct fayt_context_page"))
    rep(op, seq, body=HELLO_REPLY.pack(1, 0, 0, lib.FAYT_WIRE_ABI), fds=page)
    op, flags, seq, body = recv()

    def portal_body(map_length=4096, nframes=1, flags=0):
        return (PORTAL_REPLY.pack(7, map_length, 0, 0, nframes, 3, flags)
                + bytes(ffi.sizeof("struct portal_req")) + bytes(8 * min(nframes, 8)))

    if scenario == "wrong_seq":
        rep(op, seq + 1000, fds=memfds(2))
    elif scenario == "seq_never_sent":
        rep(op, seq + 5, fds=memfds(2))
        rep(op, seq)
    elif scenario == "wrong_op":
        rep(op + 1, seq, fds=memfds(2))
    elif scenario == "bad_magic":
        rep(op, seq, fds=memfds(2), magic=0x12345678)
    elif scenario == "short":
        c.sendmsg([b"\x01\x02\x03\x04"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", memfds(2)))])
    elif scenario == "too_many_fds":
        rep(op, seq, fds=memfds(20))
    elif scenario == "too_long":
        rep(op, seq, body=bytes(lib.FAYT_MSG_MAX + 100), fds=memfds(2))
    elif scenario == "huge_err":
        rep(op, seq, err=0x7fffffff, body=b"x" * 60000, fds=memfds(2))
    elif scenario == "negative_err":
        rep(op, seq, err=-5, body=b"bad", fds=memfds(2))
    elif scenario == "hangup":
        c.close()
        sys.exit(0)
    elif scenario == "portal_3fds":
        rep(op, seq, body=portal_body(), fds=memfds(3))
    elif scenario == "portal_short":
        rep(op, seq, body=b"\0" * 8, fds=memfds(1))
    elif scenario == "portal_nofd":
        rep(op, seq, body=portal_body())
    elif scenario == "portal_split_anon":
        rep(op, seq, body=portal_body(8192, 2, lib.FAYT_PORTAL_REPLY_SPLIT), fds=memfds(2))
    elif scenario == "portal_huge_length":
        rep(op, seq, body=portal_body(1 << 62), fds=memfds(1))
    elif scenario == "portal_nframes":
        rep(op, seq, body=portal_body(4096, 0xffffffff), fds=memfds(1))
    while True:                     # later requests: a good empty reply each
        op, flags, seq, body = recv()
        if not flags & lib.FAYT_REQ_NOREPLY:
            rep(op, seq)
""")


def _fds():
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def fake_faytd(tmp_path):
    """fake_faytd(scenario) -> the socket path of a fake faytd running it."""
    procs = []

    def start(scenario):
        d = tmp_path / ("f%d" % len(procs))
        d.mkdir(mode=0o700)
        path = str(d / "faytd.sock")
        p = subprocess.Popen([sys.executable, "-c", SERVER, path, scenario],
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "ready"
        return path

    yield start
    for p in procs:
        p.kill()
        p.wait(WAIT)
        p.stdout.close()


PROTO = ["wrong_seq", "seq_never_sent", "wrong_op", "bad_magic", "short", "too_many_fds",
         "too_long"]


def _stats(c):
    c.call(lib.FAYT_SYS_STATS)


def _anon(c):
    libportal.portal(libportal.ANON, libportal.PROT_RW, 4096, connection=c)


def _refused(path, call):
    """Connect to path, call(c), close: (the OSError call raised, whether
    the connection was closed by it); no descriptor left behind."""
    gc.collect()            # earlier tests' garbage closes nothing in between
    before = _fds()
    c = libportal.Connection(path)
    with pytest.raises(OSError) as e:
        call(c)
    closed = c.closed
    c.close()
    assert not _fds() - before, "descriptors left open"
    return e.value, closed


@pytest.mark.parametrize("scenario", PROTO)
def test_hostile_a_reply_that_breaks_the_protocol_is_eproto(fake_faytd, scenario):
    e, _ = _refused(fake_faytd(scenario), _stats)
    assert e.errno == errno.EPROTO, e


@pytest.mark.parametrize("scenario", PROTO)
def test_hostile_after_eproto_the_connection_is_closed(fake_faytd, scenario):
    """Once a reply broke the protocol, later replies cannot be matched to
    their requests: the connection is closed (the next call raises
    ECONNRESET at once, and connection() would make a new one)."""
    c = libportal.Connection(fake_faytd(scenario))
    with pytest.raises(OSError):
        c.call(lib.FAYT_SYS_STATS)
    assert c.closed
    with pytest.raises(OSError) as e:
        c.call(lib.FAYT_SYS_STATS)
    assert e.value.errno == errno.ECONNRESET, e.value
    c.close()


@pytest.mark.parametrize("scenario", ["huge_err", "negative_err"])
def test_hostile_an_odd_err_is_an_oserror_and_its_fds_closed(fake_faytd, scenario):
    e, _ = _refused(fake_faytd(scenario), _stats)
    if scenario == "negative_err":          # "0 or a positive errno": anything else breaks it
        assert e.errno == errno.EPROTO, e


def test_hostile_hangup_is_connreset_and_closes(fake_faytd):
    e, closed = _refused(fake_faytd("hangup"), _stats)
    assert e.errno == errno.ECONNRESET and closed, e


@pytest.mark.parametrize("scenario", ["portal_3fds", "portal_short", "portal_nofd",
                                      "portal_split_anon", "portal_nframes"])
def test_hostile_a_malformed_portal_reply_is_eproto(fake_faytd, scenario):
    e, _ = _refused(fake_faytd(scenario), _anon)
    assert e.errno == errno.EPROTO, e


def test_hostile_a_portal_too_long_to_map_is_an_oserror(fake_faytd):
    e, _ = _refused(fake_faytd("portal_huge_length"), _anon)
    assert e.errno in (errno.ENOMEM, errno.EINVAL, errno.EOVERFLOW), e
