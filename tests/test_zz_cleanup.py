"""Runs last (file order): after everything, and after the session's faytd
stops, no shared-memory object of the project may be left in /dev/shm."""
import gc
import os
import signal
import subprocess
import sys

import libportal

from faytd_proc import Faytd, fayt_shm_objects


def test_cleanup_faytd_stop_leaves_nothing_in_dev_shm(tmp_path):
    """faytd stopped while a client still holds share-points and portals:
    every object it made is unlinked."""
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
        assert len(fayt_shm_objects([d.proc.pid])) >= 3   # leak-a, the ANON portal, a context page
        d.stop()
        assert fayt_shm_objects([d.proc.pid]) == []
    finally:
        d.stop()
        child.kill()
        child.wait()


def test_cleanup_killed_faytd_objects_are_swept_or_kept_for_its_restart(tmp_path):
    """A SIGKILLed faytd leaves its objects.  The next faytd removes them, but
    those its journal names (share-points, context pages: a restart on its
    state directory takes them back), even from another state directory;
    the restart then reclaims what nobody needs any more."""
    d1 = str(tmp_path / "d1")
    d = Faytd(d1)
    code = "import libportal as lp\nsp = lp.share_create('swept', 4096)\nprint('ok')\n"
    keeper = subprocess.Popen([sys.executable, "-c", code + "import time; time.sleep(60)\n"],
                              env=d.env(), stdout=subprocess.PIPE, text=True)
    assert keeper.stdout.readline().strip() == "ok"
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    left = fayt_shm_objects([d.proc.pid])
    assert len(left) > 3, "a SIGKILLed faytd leaves its objects until swept"
    keeper.kill()
    keeper.wait()
    d2 = Faytd(str(tmp_path / "d2"))
    try:
        kept = fayt_shm_objects([d.proc.pid])
        # The share-point, the keeper's context page, the marker naming d1.
        markers = [n for n in kept if n.endswith(".statedir")]
        assert len(kept) == 3 and len(markers) == 1, kept
        assert sum(".ctx." in n for n in kept) == 1
    finally:
        d2.stop()
    d3 = Faytd(d1)                 # the restart: the keeper died meanwhile
    try:
        c = libportal.Connection(d3.socket)
        assert c.list_sharepoints() == []
        c.close()
    finally:
        d3.stop()
    assert fayt_shm_objects([d.proc.pid, d2.proc.pid, d3.proc.pid]) == []


def test_zz_cleanup_session_leaves_nothing(faytd):
    """Last test of the suite: every test's objects are gone while faytd runs."""
    import libportal
    gc.collect()
    c = libportal.Connection(faytd.socket)
    import json
    shares = json.loads(c.call(libportal._abi.lib.FAYT_SYS_LIST_SHARE)[0])
    c.close()
    assert [s["identifier"] for s in shares] == []


def test_cleanup_a_dead_run_is_told_by_its_start_time_not_its_pid(tmp_path):
    """Objects are named /fayt.<pid>.<start time>.*: a run whose pid now
    belongs to another process (here: this test's pid, with a start time
    that is not ours) is dead, and its objects are swept."""
    import posix_ipc
    name = "/fayt.%d.12345.deadrun" % os.getpid()
    posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=4096).close_fd()
    try:
        d = Faytd(str(tmp_path / "d"))
        d.stop()
        assert name[1:] not in os.listdir("/dev/shm")
    finally:
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass
