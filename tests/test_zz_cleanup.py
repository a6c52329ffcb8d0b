"""Runs last (file order): after everything, and after the session's faytd
stops, no shared-memory object of the project may be left in /dev/shm."""
import gc
import os
import signal
import subprocess
import sys
import time

from faytd_proc import Faytd, fayt_shm_objects


def test_cleanup_faytd_stop_leaves_nothing_in_dev_shm(tmp_path):
    before = set(fayt_shm_objects())
    d = Faytd(str(tmp_path / "d"))
    code = ("import libportal as lp\n"
            "a = lp.share_create('leak-a', 8192)\n"
            "b = lp.portal(lp.ANON, lp.PROT_RW, 4096)\n"
            "c = lp.share_create('leak-c', 4096)\n"
            "c.destroy()\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], env=d.env(), capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
    mine = set(fayt_shm_objects()) - before
    assert mine, "the owner-alive share-point 'leak-a' should still exist in faytd"
    d.stop()
    assert set(fayt_shm_objects()) - before == set()


def test_cleanup_killed_faytd_objects_are_swept_by_the_next(tmp_path):
    before = set(fayt_shm_objects())
    d = Faytd(str(tmp_path / "d1"))
    code = "import libportal as lp\nsp = lp.share_create('swept', 4096)\nprint('ok')\n"
    env = d.env()
    keeper = subprocess.Popen([sys.executable, "-c", code + "import time; time.sleep(60)\n"],
                              env=env, stdout=subprocess.PIPE, text=True)
    assert keeper.stdout.readline().strip() == "ok"
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    left = set(fayt_shm_objects()) - before
    assert left, "a SIGKILLed faytd leaves its objects behind until swept"
    keeper.kill()
    keeper.wait()
    d2 = Faytd(str(tmp_path / "d2"))
    try:
        assert set(fayt_shm_objects()) - before == set()
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
