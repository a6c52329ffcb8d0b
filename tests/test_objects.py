"""Backing objects (faytd/frames.py, libportal/src/objpool.c): sealed memfds,
mode 0600, held by faytd's keeper.  No process can shrink or grow an object
another process maps (issue 9, point 3)."""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import libportal as lp
from libportal._abi import lib
from test_policy import NOBODY, as_user, start, world_dir  # noqa: F401 (fixtures)

PAGE = lib.FAYT_PAGE_SIZE
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
out = {"uid": os.getuid(), "size": os.fstat(fds[0]).st_size}

def attempt(name, fn):
    try:
        fn()
        out[name] = "done"
    except OSError as e:
        out[name] = errno.errorcode[e.errno]

attempt("grow", lambda: os.ftruncate(fds[0], 64 * 4096))
attempt("seal", lambda: fcntl.fcntl(fds[0], fcntl.F_ADD_SEALS, 0x0010))  # F_SEAL_FUTURE_WRITE
attempt("reopen_rw", lambda: os.close(os.open("/proc/self/fd/%d" % fds[0], os.O_RDWR)))
attempt("shrink", lambda: os.ftruncate(fds[0], 0))
out["size_after"] = os.fstat(fds[0]).st_size
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


def test_sharepoint_peer_of_another_uid_cannot_resize_it(as_user, start):
    """uid 65534 attaches a share-point of root's (granted read-write), and
    calls ftruncate(2) on the descriptor faytd sent: shrink and grow are
    refused (EPERM: sealed), so is a further seal; the creator, which maps
    it, reads every byte afterwards (no SIGBUS)."""
    d = start()
    env = dict(os.environ, FAYT_SOCKET=d.socket)
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, "obj-victim"], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "ready"
        rep = _attack(as_user, d, "obj-victim", lp.PROT_RW, NOBODY)
        victim.stdin.write("\n")
        victim.stdin.flush()
        line = victim.stdout.readline().split()
        if not line:
            victim.wait(TIMEOUT)
        assert victim.poll() != -signal.SIGBUS, "the victim died of SIGBUS: %s" % rep
        assert line[2:] == ["True"], line
        assert rep["uid"] == NOBODY and rep["size"] == 4 * PAGE
        assert rep["shrink"] == "EPERM" and rep["grow"] == "EPERM", rep
        assert rep["seal"] == "EPERM", rep
        assert rep["reopen_rw"] == "EACCES", rep     # 0600, faytd's uid: not nobody's
        assert rep["size_after"] == 4 * PAGE
        victim.stdin.write("\n")
        victim.stdin.flush()
        assert victim.wait(TIMEOUT) == 0
    finally:
        victim.kill()
        victim.wait()


def test_sharepoint_attacher_of_the_same_uid_cannot_resize_it(as_user, start):
    """Within one uid too (robustness): a peer's ftruncate never becomes the
    creator's SIGBUS."""
    d = start()
    env = dict(os.environ, FAYT_SOCKET=d.socket)
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, "obj-same"], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "ready"
        rep = _attack(as_user, d, "obj-same", lp.PROT_RW, 0)
        victim.stdin.write("\n")
        victim.stdin.flush()
        line = victim.stdout.readline().split()
        if not line:
            victim.wait(TIMEOUT)
        assert victim.poll() != -signal.SIGBUS, "the victim died of SIGBUS: %s" % rep
        assert line[2:] == ["True"], line
        assert rep["shrink"] == "EPERM" and rep["grow"] == "EPERM", rep
        assert rep["size_after"] == 4 * PAGE
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
    from faytd.launch import keepers
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
                        assert name == "fayt" and st.st_size == PAGE
                        pooled += 1
                        continue
                    for size in (0, st.st_size + PAGE):
                        with pytest.raises(PermissionError):
                            os.ftruncate(fd, size)
                    assert os.fstat(fd).st_size == st.st_size
                finally:
                    os.close(fd)
        assert pooled <= POOL_TARGET
    finally:
        child.kill()
        child.wait()


def test_objects_keeper_outlives_a_killed_faytd_and_ends_with_a_clean_stop(fresh_faytd):
    """The keeper holds every object across faytd's SIGKILL (a restart takes
    it over: tests/test_journal.py), and goes with faytd's clean stop."""
    from faytd.launch import Faytd, keepers
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
