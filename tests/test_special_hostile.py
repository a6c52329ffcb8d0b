"""SPECIAL portals against a hostile client: what a local client can do to
faytd's fault engine (faytd/core/fault.c, libportal/src/uffd_io.h,
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
import ctypes
import errno
import fcntl
import multiprocessing
import os
import socket
import struct
import threading
import uuid

import libportal as lp
from libportal import special
from libportal._abi import ffi, lib
from libportal.portal import encode_portal_req

PAGE = 4096
CTX = multiprocessing.get_context("fork")
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


def _run(target, *args, timeout=WAIT):
    """Run target(*args) in a forked child; its exit code (bounded: a child
    still running after `timeout` seconds is killed, and that fails)."""
    p = CTX.Process(target=target, args=args)
    p.start()
    p.join(timeout)
    alive = p.is_alive()
    if alive:
        p.kill()
        p.join(WAIT)
    assert not alive, "%s hung" % target.__name__
    return p.exitcode


def _share_create_and_destroy(socket_path):
    conn = lp.Connection(socket_path)
    sp = lp.share_create("hostile-%s" % uuid.uuid4().hex[:8], PAGE, connection=conn)
    sp.destroy()
    conn.close()


def _assert_faytd_answers(d):
    """Another (root) client's call is answered: faytd is not wedged."""
    assert _run(_share_create_and_destroy, d.socket) == 0


def _read_page(addr, out, key):
    """Fault addr from C (the GIL released: only this thread waits)."""
    buf = bytearray(8)
    lib.fayt_copy(ffi.cast("uintptr_t", ffi.from_buffer(buf)), addr, 8)
    out[key] = int.from_bytes(buf, "little")


def _page_bytes(offset):
    return (offset + 1).to_bytes(8, "little") + bytes(PAGE - 8)


# -- a userfaultfd initialised after faytd looked at it ----------------------

def _quiet_server(socket_path, chain, efd_to, go, ready, stop):
    """A chain server that helps the client: the first request for an even
    page is answered without ringing faytd (the client rings it), and the
    client is told; every other request is answered as usual."""
    conn = lp.Connection(socket_path)
    s = lp.chain_join(chain, connection=conn)
    socket.send_fds(efd_to, [b"e"], [s._efd])
    header = ffi.cast("struct fayt_pager_header *", s._ch)
    trapped = set()
    ready.set()

    def answer(req):
        if req.offset % (2 * PAGE) == 0 and req.offset not in trapped:
            trapped.add(req.offset)
            header.rung = 1         # "a ring is outstanding": answer() writes no eventfd
            req.supply(_page_bytes(req.offset))
            os.write(go, b"g")
        else:
            req.supply(_page_bytes(req.offset))

    s.serve(answer, stop=stop.is_set, poll=0.05)
    s.leave()


def _arm_after_faytd_looked(fd):
    """In a child: wait until faytd set O_NONBLOCK on the fd (it has its dup
    and reads the fdinfo next), then UFFDIO_API with EVENT_REMOVE at once.
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


def _ring_and_remove(efd, addr):
    os.write(efd, (1).to_bytes(8, "little"))
    _libc.madvise(addr, PAGE, _MADV_DONTNEED)


def _late_api_client(socket_path, chain, efd_from, go, out, release, attempts, npages):
    conn = lp.Connection(socket_path)
    _, (efd,), _, _ = socket.recv_fds(efd_from, 1, 1)
    size = npages * PAGE
    err = ffi.new("int *")
    try:
        for attempt in range(attempts):
            fd = _raw_userfaultfd()         # blocking, no API yet
            base = lib.fayt_map_special(size, 0, lp.PROT_READ, err)
            assert base, os.strerror(err[0])
            pid = os.fork()
            if pid == 0:
                _arm_after_faytd_looked(fd)
            try:
                special._call_fds(conn, lib.FAYT_SYS_PORTAL, encode_portal_req(
                    lp.SPECIAL, lp.PROT_READ, size, None, 0, 0, chain.encode(), b"m", base),
                    [fd])
            except OSError as e:
                os.waitpid(pid, 0)
                out.put(("refused", e.errno, str(e)))
                continue
            armed = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            if armed != 0:
                out.put(("not armed", armed, ""))
                continue
            _register(fd, base, size)
            # Did faytd keep the region?  (Too late: its first read of the fd,
            # before UFFDIO_API, failed with EINVAL and it closed the region.)
            got = {}
            t = threading.Thread(target=_read_page, args=(base + PAGE, got, "probe"),
                                 daemon=True)
            t.start()
            t.join(1)
            if "probe" not in got:
                out.put(("too late", attempt, ""))
                continue
            out.put(("armed", attempt, ""))
            # The fd now has EVENT_REMOVE.  Thread A faults an even page; the
            # server answers it without telling faytd; then, back to back,
            # ring faytd and make a REMOVE event: faytd's UFFDIO_COPY meets
            # mmap_changing before it reads the event.
            # (The REMOVE's thread sleeps until faytd reads the event.)
            for page in range(0, npages - 2, 2):
                t = threading.Thread(target=_read_page, args=(base + page * PAGE, got, page),
                                     daemon=True)
                t.start()
                os.read(go, 1)
                remove = threading.Thread(target=_ring_and_remove,
                                          args=(efd, base + (page + 3) * PAGE), daemon=True)
                remove.start()
                t.join(WAIT)
                remove.join(WAIT if page in got else 0)
                out.put(("page", page, got.get(page)))
                if page not in got or remove.is_alive():
                    return
            return
    finally:
        out.put(("end", 0, ""))
        out.close()
        out.join_thread()
        release.wait(3 * WAIT)      # alive while the test looks at faytd: its exit
        os._exit(0)                 # would end a stalled copy (ESRCH)


def test_special_hostile_late_api_with_remove_events_does_not_wedge_faytd(fresh_faytd):
    """The client sends a userfaultfd without UFFDIO_API (its fdinfo shows
    no features: faytd's check passes), calls UFFDIO_API with EVENT_REMOVE
    just after faytd looked, registers the range and makes a REMOVE event
    while faytd copies a page in.  faytd's copy gives up after a few EAGAINs
    (the thread faults again and gets its page), and faytd answers others."""
    d = fresh_faytd()
    chain = _chain()
    ready, stop, release = CTX.Event(), CTX.Event(), CTX.Event()
    out = CTX.Queue()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    go_r, go_w = os.pipe()
    srv = CTX.Process(target=_quiet_server, args=(d.socket, chain, a, go_w, ready, stop))
    srv.start()
    client = None
    try:
        assert ready.wait(WAIT)
        npages = 16
        client = CTX.Process(target=_late_api_client,
                             args=(d.socket, chain, b, go_r, out, release, 40, npages))
        client.start()
        results = []
        while not results or results[-1][0] != "end":
            results.append(out.get(timeout=2 * WAIT))
        _assert_faytd_answers(d)
        release.set()
        client.join(WAIT)
        assert not client.is_alive()
        pages = [r[1:] for r in results if r[0] == "page"]
        if any(r[0] == "armed" for r in results):
            assert pages == [(p, p * PAGE + 1) for p in range(0, npages - 2, 2)]
    finally:
        release.set()
        stop.set()
        for p in (client, srv):
            if p is not None:
                p.join(WAIT)
                if p.is_alive():
                    p.kill()
                    p.join(WAIT)
        for fd in (go_r, go_w):
            os.close(fd)
        a.close()
        b.close()
    log = d.stop()
    if pages:
        assert "UFFDIO_COPY at" in log and "Resource temporarily unavailable" in log, log
