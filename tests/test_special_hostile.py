"""SPECIAL portals against a hostile client: what a local client can do to
faytd's fault engine (faytd/core/fault.c, libportal/include/fayt/common/uffd_io.h,
faytd/regions.py) with a userfaultfd it prepares itself.

The Linux facts the attacks use:
- A userfaultfd is one file description: the fd faytd dups from the one
  the client sent shares with the client its O_NONBLOCK flag and every
  event.  UFFDIO_API may be called once, by whoever holds the fd; until
  then the fd registers nothing and poll(2) says EPOLLERR.
- While a non-cooperative event (here: the REMOVE of a
  madvise(MADV_DONTNEED)) is unread, the thread that made it sleeps and
  UFFDIO_COPY of that userfaultfd answers EAGAIN (mmap_changing); reading
  the event ends both.

Each test runs its own faytd: an attack that worked would wedge it, and
the session's faytd must stay out of it.  Every wait is bounded; a client
that hangs is killed."""
import contextlib
import ctypes
import errno
import fcntl
import os
import select
import struct
import threading
import uuid

import pytest

import libportal as lp
from libportal import special
from libportal._abi import ffi, lib
from libportal.portal import encode_portal_req
from support.procs import CTX, exit_code_of, stop_child

PAGE = 4096
WAIT = 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282}[os.uname().machine]
_UFFDIO_API = 0xc018aa3f                # _IOWR(0xAA, 0x3F, struct uffdio_api)
_UFFDIO_REGISTER = 0xc020aa00           # _IOWR(0xAA, 0x00, struct uffdio_register)
_UFFD_API = 0xAA
_EVENT_REMOVE = 1 << 3                  # UFFD_FEATURE_EVENT_REMOVE
_MODE_MISSING = 1                       # UFFDIO_REGISTER_MODE_MISSING
_MADV_DONTNEED = 4


def _chain():
    return "hostile-%s" % uuid.uuid4().hex[:8]


def _raw_userfaultfd(flags=os.O_CLOEXEC):
    """A userfaultfd without UFFDIO_API (libportal always calls it at once)."""
    fd = _libc.syscall(_NR_USERFAULTFD, flags)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "userfaultfd(2)")
    return fd


def _api(fd, features):
    fcntl.ioctl(fd, _UFFDIO_API, bytearray(struct.pack("QQQ", _UFFD_API, features, 0)))


def _register(fd, addr, length):
    fcntl.ioctl(fd, _UFFDIO_REGISTER, bytearray(struct.pack("QQQQ", addr, length,
                                                            _MODE_MISSING, 0)))


def _run(target, *args):
    """exit_code_of, bounded by this module's WAIT."""
    return exit_code_of(target, *args, timeout=WAIT)


def _share_create_and_destroy(socket_path):
    conn = lp.Connection(socket_path)
    sp = lp.share_create("hostile-%s" % uuid.uuid4().hex[:8], PAGE, connection=conn)
    sp.destroy()
    conn.close()


def _assert_faytd_answers(d):
    """Another (root) client's call is answered: faytd is not wedged."""
    assert _run(_share_create_and_destroy, d.socket) == 0


def _page_bytes(offset):
    return (offset + 1).to_bytes(8, "little") + bytes(PAGE - 8)


def _server(socket_path, chain, ready, stop):
    conn = lp.Connection(socket_path)
    s = lp.chain_join(chain, connection=conn)
    ready.set()
    s.serve(lambda req: req.supply(_page_bytes(req.offset)), stop=stop.is_set, poll=0.05)
    s.leave()



@contextlib.contextmanager
def _served_chain(d):
    """A chain of faytd d, served by a plain server in a child while in use."""
    chain = _chain()
    ready, stop = CTX.Event(), CTX.Event()
    srv = CTX.Process(target=_server, args=(d.socket, chain, ready, stop))
    srv.start()
    try:
        assert ready.wait(WAIT)
        yield chain
    finally:
        stop_child(stop, srv)


# -- a userfaultfd that has not had UFFDIO_API -------------------------------

def _portal_with(conn, fd, chain, npages=4):
    """A SPECIAL portal call sending fd (raw: libportal would register first)."""
    err = ffi.new("int *")
    base = lib.fayt_map_special(npages * PAGE, 0, lp.PROT_READ, err)
    assert base, os.strerror(err[0])
    return special._call_fds(conn, lib.FAYT_SYS_PORTAL, encode_portal_req(
        lp.SPECIAL, lp.PROT_READ, npages * PAGE, chain=chain.encode(), message=b"m", addr=base),
        [fd])


def _uninitialised_uffd(socket_path, chain, out):
    conn = lp.Connection(socket_path)
    fd = _raw_userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        _portal_with(conn, fd, chain)
        out.put(("mapped",))
    except OSError as e:
        out.put(("refused", e.errno, str(e)))
    try:
        _api(fd, _EVENT_REMOVE)             # too late: faytd chose for it
        out.put(("api", 0))
    except OSError as e:
        out.put(("api", e.errno))
    out.close()
    out.join_thread()


def test_special_hostile_userfaultfd_without_uffdio_api_is_refused(fresh_faytd):
    """Its fdinfo shows no features, as an fd that will never ask for any:
    a client could pass the non-cooperative check and ask for EVENT_REMOVE
    afterwards.  faytd calls UFFDIO_API itself (no features), refuses the
    fd with EINVAL naming uffd, and the client's UFFDIO_API then fails."""
    d = fresh_faytd()
    with _served_chain(d) as chain:
        out = CTX.Queue()
        assert _run(_uninitialised_uffd, d.socket, chain, out) == 0
        refused, api = out.get(timeout=WAIT), out.get(timeout=WAIT)
        assert refused[:2] == ("refused", errno.EINVAL), refused
        assert refused[2].startswith("[Errno 22] uffd: the userfaultfd has not had UFFDIO_API")
        assert api == ("api", errno.EINVAL)
        _assert_faytd_answers(d)
    assert "region 1" not in d.stop()


def _arm_after_faytd_looked(fd):
    """In a child: wait until faytd set O_NONBLOCK on the fd (it has its dup
    and looks at it next), then UFFDIO_API with EVENT_REMOVE at once.
    Exit code: 0 armed, else the errno (ETIMEDOUT: faytd never looked)."""
    for _ in range(50_000_000):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK:
            break
    else:
        os._exit(errno.ETIMEDOUT)
    try:
        _api(fd, _EVENT_REMOVE)
    except OSError as e:
        os._exit(e.errno)
    os._exit(0)


def _late_api_client(socket_path, chain, out, attempts):
    conn = lp.Connection(socket_path)
    for _ in range(attempts):
        fd = _raw_userfaultfd()             # blocking: faytd's set_blocking shows
        pid = os.fork()
        if pid == 0:
            _arm_after_faytd_looked(fd)
        try:
            _portal_with(conn, fd, chain)
            outcome = ("mapped",)
        except OSError as e:
            outcome = ("refused", e.errno)
        armed = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        out.put(outcome + (armed,))
        os.close(fd)
    out.close()
    out.join_thread()


def test_special_hostile_userfaultfd_armed_while_faytd_looks_is_refused(fresh_faytd):
    """The race the check above closes: a helper of the client calls
    UFFDIO_API with EVENT_REMOVE the moment faytd has the fd (its
    O_NONBLOCK shows).  Before faytd's own UFFDIO_API: faytd sees the
    feature and refuses; after it: the helper's fails.  Never mapped.
    (Before the check, one try in 5-40 got a region whose REMOVE events
    stalled faytd's UFFDIO_COPY; see uffd_io_copy's bound below.)"""
    d = fresh_faytd()
    with _served_chain(d) as chain:
        out, attempts = CTX.Queue(), 30
        assert _run(_late_api_client, d.socket, chain, out, attempts) == 0
        got = [out.get(timeout=WAIT) for _ in range(attempts)]
        assert all(g[:2] == ("refused", errno.EINVAL) for g in got), got
        assert all(g[2] in (0, errno.EINVAL) for g in got), got    # armed, or too late
        _assert_faytd_answers(d)
    d.stop()


# -- UFFDIO_COPY while a REMOVE event is unread ------------------------------

def _copy_while_remove_unread(out):
    fd = _raw_userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
    _api(fd, _EVENT_REMOVE)
    err = ffi.new("int *")
    base = lib.fayt_map_special(2 * PAGE, 0, lp.PROT_READ | lp.PROT_WRITE, err)
    assert base, os.strerror(err[0])
    _register(fd, base, 2 * PAGE)
    # madvise sleeps until the REMOVE event is read; the event makes the fd
    # readable only after mmap_changing went up.
    remove = threading.Thread(target=_libc.madvise, args=(base + PAGE, PAGE, _MADV_DONTNEED),
                              daemon=True)
    remove.start()
    p = select.poll()
    p.register(fd, select.POLLIN)
    assert p.poll(WAIT * 1000), "no REMOVE event"
    src = bytes(_page_bytes(0))
    copied = ffi.new("uint64_t *")
    first = lib.fayt_uffd_copy(fd, base, src, PAGE, 0, copied), copied[0]
    faults = ffi.new("struct fayt_uffd_fault[32]")
    n = lib.fayt_uffd_read(fd, faults, 32)  # takes the event: no fault among it
    remove.join(WAIT)
    then = lib.fayt_uffd_copy(fd, base, src, PAGE, 0, copied), copied[0]
    out.put((first, n, remove.is_alive(), then))
    out.close()
    out.join_thread()


def test_special_hostile_uffdio_copy_gives_up_while_an_event_is_unread():
    """What faytd's fault engine does if such an fd ever reaches it: its
    UFFDIO_COPY (uffd_io_copy, the code libportal's fayt_uffd_copy runs)
    answers EAGAIN, copying nothing, instead of retrying for as long as the
    event stays unread (forever: the caller is the one that would read
    it).  Once the event is read, the copy goes in."""
    out = CTX.Queue()
    assert _run(_copy_while_remove_unread, out) == 0
    first, n, remove_waits, then = out.get(timeout=WAIT)
    assert first == (errno.EAGAIN, 0)
    assert n == 0 and not remove_waits
    assert then == (0, PAGE)


# -- a userfaultfd the client makes blocking again ---------------------------

def _faults_read(fd):
    """(pending, total) of the fd's fdinfo: faults not yet read, and all
    the faults whose thread still waits."""
    with open("/proc/self/fdinfo/%d" % fd) as f:
        info = dict(line.split(":", 1) for line in f if ":" in line)
    return int(info["pending"]), int(info["total"])


def _one_uffd_two_portals(socket_path, chain, out, release):
    """Two SPECIAL portals over one userfaultfd (libportal opens one per
    portal): faytd watches two dups of one file description; then the
    client clears O_NONBLOCK on it, which faytd's dups share, and faults."""
    conn = lp.Connection(socket_path)
    fd, caps = special.open_userfaultfd()
    special.open_userfaultfd = lambda: (os.dup(fd), caps)
    a = lp.portal(lp.SPECIAL, lp.PROT_READ, 4 * PAGE, chain=chain, message=b"a",
                  connection=conn)
    lp.portal(lp.SPECIAL, lp.PROT_READ, 4 * PAGE, chain=chain, message=b"b", connection=conn)
    os.set_blocking(fd, True)
    threading.Thread(target=lambda: lib.fayt_copy(
        ffi.cast("uintptr_t", ffi.from_buffer(bytearray(8))), a.addr, 8), daemon=True).start()
    # faytd read the fault through one of its fds (the fault is no longer
    # pending); both were ready, so it reads the other next, finding nothing.
    for _ in range(WAIT * 100):
        pending, total = _faults_read(fd)
        if total and not pending:
            break
        threading.Event().wait(0.01)
    out.put((pending, total))
    out.close()
    out.join_thread()
    release.wait(3 * WAIT)          # alive while the test looks at faytd
    os._exit(0)


def test_special_hostile_blocking_userfaultfd_does_not_block_faytd(fresh_faytd):
    """The O_NONBLOCK faytd sets on its dup of a client's userfaultfd is
    the client's too, which can clear it.  Then a read of faytd's with no
    fault ready would sleep until the client's next fault: here it finds
    none (the one fault was read through the other portal's fd), and faytd
    answers others.  (With a plain read(2) it slept there: no other client
    was answered, and faytd did not even stop on SIGTERM.)"""
    d = fresh_faytd()
    with _served_chain(d) as chain:
        out, release = CTX.Queue(), CTX.Event()
        client = CTX.Process(target=_one_uffd_two_portals, args=(d.socket, chain, out, release))
        client.start()
        try:
            assert out.get(timeout=2 * WAIT) == (0, 1)     # (pending, total)
            _assert_faytd_answers(d)
        finally:
            stop_child(release, client)
    d.stop()


# -- a chain server that scribbles on its own channel -------------------------

def test_special_take_refuses_a_scribbled_slot_number(lp):
    """The request ring is shared memory: a slot number past the channel's
    slots (here the server wrote it itself) is EPROTO from take(), never an
    index or an address (found by bench/fuzz.py: IndexError before)."""
    from libportal._abi import ffi
    s = lp.chain_join(_chain(), slots=2)
    try:
        h = ffi.cast("struct fayt_pager_header *", s._addr)
        for bad in (2, 63, 64, 0xffffffff):
            h.req_ring[h.req_tail % 64] = bad
            h.req_head = h.req_tail + 1
            with pytest.raises(lp.ProtocolError, match="slot"):
                s.take(timeout=1)
        assert s.take(timeout=0) is None        # nothing else: the ring is empty again
    finally:
        s.leave()
