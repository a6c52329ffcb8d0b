"""Backing objects (faytd/frames.py, faytd/core/keeper.c): sealed memfds,
mode 0600, held by faytd's keeper.  No process can shrink or grow an object
another process maps (issue 9, point 3)."""
import copy
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import libportal as lp
from faytd.config import DEFAULT
from libportal._abi import lib
from support.daemon import NOBODY

PAGE = lib.FAYT_PAGE_SIZE
# Root's "obj-*" share-points are in the shared namespace, which uid 65534's
# server category may attach (docs/names.md): names are per uid otherwise.
SHARED_OBJ = copy.deepcopy(DEFAULT["policy"])
SHARED_OBJ["categories"]["server"]["shared_names"] = {"attach": ["obj-*"]}
TIMEOUT = 30                    # hang guards only
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as "
                                                          "another uid")

# A client that ignores libportal's mapping: it asks for a share-point with a
# raw PORTAL call, keeps the descriptor faytd sends, and tries to resize the
# object with it (and to add a seal that would deny others writable maps).
ATTACKER = r"""
import errno, fcntl, json, os, sys
import libportal as lp
from libportal._abi import lib
from libportal.portal import encode_portal_req
sock, ident, prot = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = lp.Connection(sock)
body, fds = c.call(lib.FAYT_SYS_PORTAL,
                   encode_portal_req(lp.SHARE | lp.ANON, prot, 0, identifier=ident))
# (A share-point of more than one page comes as two objects: page 0's and
# the rest's.  Every descriptor is tried.)
out = {"uid": os.getuid(), "size": sum(os.fstat(f).st_size for f in fds)}

def attempt(name, fn):
    for fd in fds:
        try:
            fn(fd)
            out[name] = "done"
            return
        except OSError as e:
            out[name] = errno.errorcode[e.errno]

attempt("grow", lambda fd: os.ftruncate(fd, 64 * 4096))
attempt("seal", lambda fd: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0x0010))  # F_SEAL_FUTURE_WRITE
attempt("reopen_rw", lambda fd: os.close(os.open("/proc/self/fd/%d" % fd, os.O_RDWR)))
attempt("shrink", lambda fd: os.ftruncate(fd, 0))
out["size_after"] = sum(os.fstat(f).st_size for f in fds)
print(json.dumps(out), flush=True)
"""

# The victim maps the share-point and reads every byte of it afterwards.
VICTIM = r"""
import sys
import libportal as lp
sp = lp.share_create(sys.argv[1], 4 * 4096)
sp.write(0, b"v" * sp.length)
print("ready", flush=True)
sys.stdin.readline()
data = sp.read(0, sp.length)
print("read %d %s" % (len(data), data == b"v" * sp.length), flush=True)
sys.stdin.readline()
"""


def _attack(as_user, d, ident, prot, uid):
    p = as_user.popen(ATTACKER, [d.socket, ident, prot], uid=uid, gid=uid,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, err
    return json.loads(out)


@pytest.mark.parametrize("uid", [NOBODY, 0], ids=["another-uid", "same-uid"])
def test_sharepoint_peer_cannot_resize_it(as_user, world_faytd, uid):
    """A peer attaches a share-point of root's (granted read-write) and
    calls ftruncate(2) on the descriptor faytd sent: shrink and grow are
    refused (EPERM: sealed); the creator, which maps it, reads every byte
    afterwards (no SIGBUS).  As uid 65534 (the security boundary) a further
    seal and a read-write reopen through /proc/self/fd are refused too;
    within one uid it is robustness: a peer's ftruncate never becomes the
    creator's SIGBUS."""
    d = world_faytd(policy=SHARED_OBJ)
    env = dict(os.environ, FAYT_SOCKET=d.socket)
    ident = "obj-victim-%d" % uid
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, ident], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "ready"
        rep = _attack(as_user, d, ident, lp.PROT_RW, uid)
        victim.stdin.write("\n")
        victim.stdin.flush()
        line = victim.stdout.readline().split()
        if not line:
            victim.wait(TIMEOUT)
        assert victim.poll() != -signal.SIGBUS, "the victim died of SIGBUS: %s" % rep
        assert line[2:] == ["True"], line
        assert rep["uid"] == uid and rep["size"] == 4 * PAGE
        assert rep["shrink"] == "EPERM" and rep["grow"] == "EPERM", rep
        assert rep["size_after"] == 4 * PAGE
        if uid == NOBODY:
            assert rep["seal"] == "EPERM", rep
            assert rep["reopen_rw"] == "EACCES", rep     # 0600, faytd's uid: not nobody's
        victim.stdin.write("\n")
        victim.stdin.flush()
        assert victim.wait(TIMEOUT) == 0
    finally:
        victim.kill()
        victim.wait()


def _objects(kpid):
    """{memfd name: [descriptor paths in the keeper]}"""
    base = "/proc/%d/fd/" % kpid
    out = {}
    for n in os.listdir(base):
        try:
            link = os.readlink(base + n)
        except OSError:
            continue
        if link.startswith("/memfd:fayt"):
            out.setdefault(link[len("/memfd:"):].split(" ")[0], []).append(base + n)
    return out


def test_objects_of_every_kind_refuse_resizing(fresh_faytd):
    """Every object faytd made (share-points, ANON portals, context pages,
    rings, hints, notification stacks, a chain's channel) is a memfd of mode 0600 sealed against shrinking, growing and
    further seals: ftruncate(2) through any descriptor of it fails, even a
    read-write one that root reopens from the keeper's."""
    from faytd.frames import POOL_TARGET
    from support.daemon import keepers
    d = fresh_faytd()
    code = r"""
import sys, libportal as lp
sp = lp.share_create("kinds-sp", 2 * 4096)
anon = lp.portal(lp.ANON, lp.PROT_RW, 3 * 4096)
lp.install_handler(1, lambda p, i, s: 7)
me = lp.connection().context_id
other = lp.Connection()
lp.notify(me, 1, b"x", connection=other)
lp.notification_dispatch()
srv = lp.chain_join("kinds-chain")
print("ready", flush=True)
sys.stdin.readline()
"""
    env = d.env()
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        (kpid,) = keepers([d.dir])
        objs = _objects(kpid)
        assert {"fayt", "fayt.ctx", "fayt.ring", "fayt.hint", "fayt.chain"} <= set(objs), objs
        pooled = 0
        for name, paths in objs.items():
            for path in paths:
                fd = os.open(path, os.O_RDWR)
                try:
                    st = os.fstat(fd)
                    assert st.st_mode & 0o7777 == 0o600, (name, oct(st.st_mode))
                    if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS != SEALS:
                        # The pool's: made ahead of need, never handed out yet
                        # (sealed at their size when taken).
                        assert name in ("fayt", "fayt.ctx") and st.st_size == PAGE
                        pooled += 1
                        continue
                    for size in (0, st.st_size + PAGE):
                        with pytest.raises(PermissionError):
                            os.ftruncate(fd, size)
                    assert os.fstat(fd).st_size == st.st_size
                finally:
                    os.close(fd)
        assert pooled <= POOL_TARGET + 8      # portals' objects, context pages
    finally:
        child.kill()
        child.wait()


def test_objects_keeper_outlives_a_killed_faytd_and_ends_with_a_clean_stop(fresh_faytd):
    """The keeper holds every object across faytd's SIGKILL (a restart takes
    it over: tests/test_journal.py), and goes with faytd's clean stop."""
    from support.daemon import Faytd, keepers
    d = fresh_faytd()
    (kpid,) = keepers([d.dir])
    d.proc.kill()
    d.proc.wait()
    time.sleep(0.1)
    assert list(keepers([d.dir])) == [kpid]
    d2 = Faytd(os.path.dirname(d.socket))
    try:
        assert list(keepers([d.dir])) == [kpid]
        assert "took over the object keeper (pid %d)" % kpid in open(d2.log).read()
    finally:
        d2.stop()
    assert keepers([d.dir]) == {}
    assert not os.path.exists(os.path.join(d.dir, "faytd.keeper"))


def test_objects_keeper_of_a_killed_faytd_ends_when_its_state_directory_goes(fresh_faytd):
    """A keeper waits for a restart on <state-dir>/faytd.keeper; once that
    socket is gone no faytd can ever take it over, so it exits and its
    objects go with it."""
    import shutil
    from support.daemon import keepers
    d = fresh_faytd()
    (kpid,) = keepers([d.dir])
    d.proc.kill()
    d.proc.wait()
    time.sleep(0.1)
    assert list(keepers([d.dir])) == [kpid]
    shutil.rmtree(d.dir)
    deadline = time.monotonic() + 30          # a hang bound, not a timing
    while kpid in keepers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kpid not in keepers(), "the keeper of a removed state directory still runs"


# -- read-only attachers (issue 9, point 7) ----------------------------------

# uid 65534, granted PROT_READ, tries every way to store past page 0: through
# the descriptors faytd sent (pwrite, a writable shared mapping, a read-write
# reopen through /proc/self/fd), and by mprotect(2) of libportal's mapping.
# Page 0 stays writable: it takes and releases the lock.
READER = r"""
import ctypes, errno, json, mmap, os, sys
import libportal as lp
from libportal._abi import lib
from libportal.portal import encode_portal_req
sock, ident = sys.argv[1], sys.argv[2]
c = lp.Connection(sock)
body, fds = c.call(lib.FAYT_SYS_PORTAL,
                   encode_portal_req(lp.SHARE | lp.ANON, lp.PROT_READ, 0, identifier=ident))
out = {"uid": os.getuid(), "nfds": len(fds), "sizes": [os.fstat(f).st_size for f in fds],
       "stores": []}

def attempt(what, fn):
    try:
        fn()
        out["stores"].append([what, "done"])
    except OSError as e:
        out["stores"].append([what, errno.errorcode[e.errno]])

def map_write(fd, off):
    size = os.fstat(fd).st_size
    if off >= size:
        raise OSError(errno.ENXIO, "past the object")
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    m[off:off + 4] = b"EVIL"
    m.close()

def reopen_write(fd, off):
    w = os.open("/proc/self/fd/%d" % fd, os.O_RDWR)
    try:
        os.pwrite(w, b"EVIL", off)
    finally:
        os.close(w)

# Object offsets that are share-point offsets 4096 and up: the first fd's
# from 4096 on (a single object), the second fd's from 0 (the rest).
sp = lp.share_attach(ident, prot=lp.PROT_READ, connection=c)
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
if libc.mprotect(sp.addr + 4096, sp.map_length - 4096, 3) == 0:
    ctypes.memmove(sp.addr + 4096 + 8, b"EVIL", 4)
    out["stores"].append(["mprotect", "done"])
else:
    out["stores"].append(["mprotect", errno.errorcode[ctypes.get_errno()]])
out["read"] = sp.read(4096, 4).decode()   # fused: lock, copy, unlock
with sp:                      # page 0 is writable: the lock works
    v = sp.view()
    out["view"] = bytes(v[4096:4100]).decode()
    v.release()
out["locked"] = sp.lock(5) == 0
sp.unlock()
for i, fd in enumerate(fds):
    off = 4096 + 8 if i == 0 else 8
    attempt("pwrite fd%d" % i, lambda: os.pwrite(fd, b"EVIL", off))
    attempt("mmap fd%d" % i, lambda: map_write(fd, off))
    attempt("reopen fd%d" % i, lambda: reopen_write(fd, off))
for i, fd in enumerate(fds):
    attempt("grow fd%d" % i, lambda: os.ftruncate(fd, 64 * 4096))
print(json.dumps(out), flush=True)
"""

OWNER = r"""
import sys
import libportal as lp
lp.share_create(sys.argv[1] + "-warm", 4096).destroy()   # then creates are the fast path's
sp = lp.share_create(sys.argv[1], 4 * 4096)
sp.write(0, b"o" * sp.length)
print("ready", flush=True)
sys.stdin.readline()
raw = lp.share_attach(sys.argv[1])      # the bytes as they are, object offsets
data = bytes(raw.read(0, raw.length))
start = 4096 - raw.data_offset           # share-point offset 4096 in the data
print(data[start:].count(b"o") == len(data) - start, flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("fast", [True, False], ids=["c-create", "python-create"])
def test_sharepoint_read_only_attacher_cannot_store_past_page_0(as_user, world_faytd, fast):
    """A share-point of four pages, created by root; uid 65534 attaches it
    granted PROT_READ.  Nothing it does stores into bytes 4096 and up, nor
    changes the size: it gets two descriptors, page 0's (read-write: the
    lock) and the rest's, read-only, of a 0600 object it cannot reopen
    read-write; mprotect of its mapping of the rest fails.  Its wrappers
    still lock.  The share-point is made by faytd's C fast path, or by its
    Python."""
    d = world_faytd(policy=SHARED_OBJ, fast_syscalls=fast)
    env = dict(os.environ, FAYT_SOCKET=d.socket)
    owner = subprocess.Popen([sys.executable, "-c", OWNER, "obj-ro"], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "ready"
        p = as_user.popen(READER, [d.socket, "obj-ro"], uid=NOBODY, gid=NOBODY,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err
        rep = json.loads(out)
        owner.stdin.write("\n")
        owner.stdin.flush()
        unchanged = owner.stdout.readline().strip()
        assert unchanged == "True", "bytes past page 0 changed: %s" % rep
        assert rep["uid"] == NOBODY
        assert rep["nfds"] == 2 and rep["sizes"] == [PAGE, 3 * PAGE], rep
        assert [s for s in rep["stores"] if s[1] == "done"] == [], rep
        assert rep["read"] == rep["view"] == "oooo" and rep["locked"], rep
        owner.stdin.write("\n")
        owner.stdin.flush()
        assert owner.wait(TIMEOUT) == 0
    finally:
        owner.kill()
        owner.wait()
    log = d.stop()
    assert ("1 share-points created" if fast else "0 share-points created") in log


def test_objects_keeper_file_limit_is_a_clear_enfile(fresh_faytd, conn_to):
    """The keeper holds one open file per live object: at its RLIMIT_NOFILE
    a create fails with ENFILE, naming the keeper and its limit, creates
    nothing, and faytd serves on; freed objects make room again."""
    import resource
    from support.daemon import keepers
    d = fresh_faytd()
    c = conn_to(d)
    (kpid,) = keepers([d.dir])
    lp.share_create("lim-warm", PAGE, connection=c).destroy()
    limit = len(os.listdir("/proc/%d/fd" % kpid)) + 8
    resource.prlimit(kpid, resource.RLIMIT_NOFILE, (limit, limit))
    made, err = [], None
    for i in range(limit + 64):         # the pool's ready objects go first
        try:
            made.append(lp.share_create("lim-%d" % i, PAGE, connection=c))
        except OSError as e:
            err = e
            break
    assert err is not None and err.errno == errno.ENFILE, err
    assert "keeper (pid %d)" % kpid in str(err) and "RLIMIT_NOFILE of %d" % limit in str(err)
    with pytest.raises(lp.NotFound):
        lp.share_attach("lim-%d" % len(made), connection=c)
    for sp in made:
        sp.destroy()
    deadline = time.monotonic() + TIMEOUT
    while True:                          # the pool's thread has the keeper close them
        try:
            lp.share_create("lim-again", PAGE, connection=c).destroy()
            break
        except OSError as e:
            assert e.errno == errno.ENFILE and time.monotonic() < deadline
            time.sleep(0.05)
