"""A stopped faytd leaves no object keeper and no object; a killed one's
keeper waits for the restart on its state directory.  (That the whole
session leaves nothing behind is the harness's check at its end:
support/leaks.py.)"""
import os
import signal
import subprocess
import sys
import time

import libportal
from support.daemon import Faytd, fayt_objects, keepers


def test_cleanup_faytd_stop_leaves_no_keeper_and_no_object(tmp_path):
    """faytd stopped while a client still holds share-points and portals:
    every object it made goes, and its keeper with them."""
    d = Faytd(str(tmp_path / "d"))
    code = ("import libportal as lp, sys\n"
            "a = lp.share_create('leak-a', 8192)\n"
            "b = lp.portal(lp.ANON, lp.PROT_RW, 4096)\n"
            "c = lp.share_create('leak-c', 4096)\n"
            "c.destroy()\n"
            "print('ok', flush=True)\n"
            "sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code], env=d.env(), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ok"
        conn = libportal.Connection(d.socket)
        assert [s["identifier"] for s in conn.list_sharepoints()] == ["leak-a"]
        conn.close()
        assert len(keepers([d.dir])) == 1
        assert len(fayt_objects([d.proc.pid])) >= 3   # leak-a, the ANON portal, a context page
        d.stop()
        assert d.proc.returncode == 0
        assert keepers([d.dir]) == {} and fayt_objects([d.proc.pid], pooled=True) == []
        assert not os.path.exists(os.path.join(d.dir, "faytd.keeper"))
    finally:
        d.stop()
        child.kill()
        child.wait()


def test_cleanup_killed_faytd_keeper_waits_for_its_restart(tmp_path):
    """A SIGKILLed faytd leaves its keeper, holding its objects; a faytd on
    another state directory leaves it alone; the restart on its directory
    takes it over, closes what the journal does not name, reclaims what
    nobody needs any more, and ends it at its clean stop."""
    d1 = str(tmp_path / "d1")
    d = Faytd(d1)
    code = "import libportal as lp\nsp = lp.share_create('swept', 4096)\nprint('ok')\n"
    owner = subprocess.Popen([sys.executable, "-c", code + "import time; time.sleep(60)\n"],
                             env=d.env(), stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "ok"
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    (keeper,) = keepers([d1])
    # The keeper may still be taking in what the killed faytd sent it last.
    left = _settled(lambda: fayt_objects([d.proc.pid], pooled=True))
    assert len(left) > 3, "a SIGKILLed faytd's keeper holds its objects until the restart"
    before = _inodes(keeper)
    owner.kill()
    owner.wait()
    d2 = Faytd(str(tmp_path / "d2"))
    try:
        assert fayt_objects([d.proc.pid], pooled=True) == left     # not d2's to touch
    finally:
        d2.stop()
    d3 = Faytd(d1)                 # the restart: the owner died meanwhile
    try:
        assert list(keepers([d1])) == [keeper]
        # All but what the journal names go at once (the dead faytd's pool,
        # its ANON objects); the share-point (its owner is gone) and the dead
        # owner's context page are given back soon after.
        assert len(before & _inodes(keeper)) <= 2
        c = libportal.Connection(d3.socket)
        assert c.list_sharepoints() == []
        c.close()
    finally:
        d3.stop()
    assert keepers([d1]) == {} and fayt_objects([d.proc.pid, d2.proc.pid, d3.proc.pid]) == []


def _inodes(kpid):
    base = "/proc/%d/fd/" % kpid
    return {os.stat(base + n).st_ino for n in os.listdir(base)
            if os.readlink(base + n).startswith("/memfd:fayt")}


def _settled(read, timeout=30):
    """read()'s value once two reads 0.1 s apart agree."""
    last, deadline = read(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError("still changing after %ds: %s" % (timeout, last))
