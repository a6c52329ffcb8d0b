"""faytd's C core is faytd's alone: a client never loads it, and libportal's
compiled module carries none of it (issue 10, part 1)."""
import os
import subprocess
import sys
import textwrap

WAIT = 60

# A client that uses share-points (create, attach, destroy), notifications
# (a handler, a notice of a destroyed share-point) and a SPECIAL portal
# whose page a forked chain server answers; then prints what it loaded.
_CLIENT = textwrap.dedent("""
    import os, sys, time, uuid
    import libportal as lp

    chain = "layout-%s" % uuid.uuid4().hex[:8]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        s = lp.chain_join(chain)
        os.write(w, b"j")
        done = []
        def answer(req):
            req.supply(b"P" * 4096)
            done.append(1)
        s.serve(answer, stop=lambda: bool(done), poll=0.05)
        time.sleep(0.2)
        s.leave()
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"j"
    sp = lp.portal(lp.SPECIAL, lp.PROT_READ, 4096, chain=chain)
    assert sp.read(0, 4) == b"PPPP"
    sp.unmap()
    os.waitpid(pid, 0)

    got = []
    lp.install_handler(3, lambda p, i, s: got.append(i))
    lp.subscribe(lp.SP_DESTROYED, 3)
    name = "layout-%d" % os.getpid()
    a = lp.share_create(name, 4096)
    b = lp.share_attach(name)
    a.destroy()
    deadline = time.monotonic() + 20
    while not got and time.monotonic() < deadline:
        lp.notification_wait(timeout=0.1)
    assert got == [3], got
    b.unmap()

    from libportal._abi import lib
    core = [n for n in dir(lib) if n.startswith(("fayt_fast", "fayt_objpool", "fayt_frames",
                                                "fayt_keeper", "fayt_core", "fayt_timerfd",
                                                "fayt_portal_decode", "fayt_journal"))]
    print("core-loaded" if "faytd._core" in sys.modules else "core-not-loaded", core)
    """)


def test_a_client_never_loads_faytds_core(faytd):
    out = subprocess.run([sys.executable, "-c", _CLIENT], capture_output=True, text=True,
                         timeout=WAIT, env=dict(os.environ, FAYT_SOCKET=faytd.socket))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["core-not-loaded", "[]"], out.stdout
