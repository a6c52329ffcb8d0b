"""Runs last (file order): after everything, and after the session's faytd
stops, no shared-memory object of the project may be left in /dev/shm."""
import gc
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


def test_cleanup_killed_faytd_objects_are_swept_by_the_next(tmp_path):
    d = Faytd(str(tmp_path / "d1"))
    code = "import libportal as lp\nsp = lp.share_create('swept', 4096)\nprint('ok')\n"
    env = d.env()
    keeper = subprocess.Popen([sys.executable, "-c", code + "import time; time.sleep(60)\n"],
                              env=env, stdout=subprocess.PIPE, text=True)
    assert keeper.stdout.readline().strip() == "ok"
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    assert fayt_shm_objects([d.proc.pid]), "a SIGKILLed faytd leaves its objects until swept"
    keeper.kill()
    keeper.wait()
    d2 = Faytd(str(tmp_path / "d2"))
    try:
        assert fayt_shm_objects([d.proc.pid]) == []
    finally:
        d2.stop()


def test_zz_cleanup_session_leaves_nothing(faytd):
    """Last test of the suite: every test's objects are gone while faytd runs."""
    import libportal
    gc.collect()
    c = libportal.Connection(faytd.socket)
    import json
    shares = json.loads(c.call(libportal._abi.lib.FAYT_SYS_LIST_SHARE)[0])
    c.close()
    assert [s["identifier"] for s in shares] == []
