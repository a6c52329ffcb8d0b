"""Memoryviews of mapped memory cannot be invalidated once made, so, as
mmap.mmap and multiprocessing.shared_memory do, unmap() and destroy() raise
BufferError while any exists, and nothing touches freed memory.  A thread
waiting in lock() when another unmaps the share-point gets an error.

Each case runs in a child process: before, the same steps were a SIGSEGV,
which must fail the test rather than end the test run.
"""
import errno

from support.children import WAIT, wait_until


def _run(spawn, code):
    c = spawn(code)
    out = c.finish()
    return out


def test_portal_unmap_with_a_live_view_raises_buffer_error(lp, spawn):
    out = _run(spawn, """
        p = lp.portal(lp.ANON, lp.PROT_RW, 8192)
        v = p.buf[100:200]                    # a slice: the same export as p.buf
        v[0:5] = b"hello"
        try:
            p.unmap()
        except BufferError as e:
            print("BufferError", "memoryview" in str(e))
        print(p.mapped, bytes(v[0:5]))        # still mapped: the view is usable
        w = memoryview(p.buf).cast("Q")       # another one, made after the refusal
        try:
            p.unmap()
        except BufferError:
            print("again")
        v.release()
        w.release()
        p.unmap()
        print(p.mapped)
        """)
    assert out == ["BufferError True", "True b'hello'", "again", "False"]


def test_sharepoint_unmap_and_destroy_with_a_live_view_raise_buffer_error(lp, spawn):
    out = _run(spawn, """
        import uuid
        sp = lp.share_create("t-sp-view-" + uuid.uuid4().hex[:10], 4096)
        other = lp.share_attach(sp.identifier)
        with sp:
            v = sp.view()
            v[0:3] = b"abc"
        w = other.view()[0:3]
        for call in (sp.destroy, other.unmap):
            try:
                call()
            except BufferError:
                print("BufferError")
        print(sp.mapped, other.mapped, bytes(v[0:3]), bytes(w))
        v.release()
        del w                                 # dropping it releases it too
        other.unmap()
        sp.destroy()
        print(sp.mapped, other.mapped)
        try:
            sp.view()
        except lp.Unmapped:
            print("EBADF")
        """)
    assert out == ["BufferError", "BufferError", "True True b'abc' b'abc'", "False False",
                   "EBADF"]


def test_sharepoint_unmap_while_another_thread_waits_in_lock_gives_it_an_error(lp, spawn):
    c = spawn("""
        import uuid
        sp = lp.share_create("t-sp-unmapw-" + uuid.uuid4().hex[:10], 4096)
        other = lp.share_attach(sp.identifier)
        assert other.lock() == 0              # held through another mapping
        got = []

        def waiter():
            try:
                got.append(sp.lock(%r))
            except OSError as e:
                got.append((type(e).__name__, e.errno))
        t = threading.Thread(target=waiter)
        t.start()
        print("waiting", flush=True)
        sys.stdin.readline()                  # the test saw it asleep on the futex
        sp.unmap()
        t.join(%r)
        print(got, t.is_alive(), flush=True)
        other.unlock()
        other.destroy()
        """ % (WAIT, WAIT))
    assert c.expect() == "waiting"
    wait_until(lambda: any(sleeping_on_futex_task(c.pid)), "the waiter to sleep")
    c.send("go")
    assert c.expect() == "[('Unmapped', %d)] False" % errno.EBADF
    c.finish()


def sleeping_on_futex_task(pid):
    """Whether each thread of pid sleeps in a futex wait."""
    import os
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/wchan" % (pid, tid)) as f:
                yield "futex" in f.read()
        except OSError:
            yield False


def test_portal_connection_close_keeps_live_views_valid_until_released(faytd, spawn):
    """Connection.close() cannot refuse: a portal with live memoryviews is
    invalidated, but its memory stays mapped until the last view goes,
    which unmaps it (before: close() unmapped it under the views)."""
    out = _run(spawn, """
        c = lp.Connection()
        p = lp.portal(lp.ANON, lp.PROT_RW, 4096, connection=c)
        sp = lp.share_create("t-sp-close-" + str(os.getpid()), 4096, connection=c)
        v, w = p.buf[0:4], sp.view()[0:4]
        v[:] = b"abcd"
        w[:] = b"wxyz"
        addr = p.addr

        def mapped():
            with open("/proc/self/maps") as f:
                return any(int(l.split("-")[0], 16) == addr for l in f)
        c.close()
        print(p.mapped, sp.mapped, bytes(v), bytes(w), mapped())
        v.release()
        w.release()
        print(mapped())
        lp.share_attach("t-sp-close-" + str(os.getpid())).destroy()
        """)
    assert out == ["False False b'abcd' b'wxyz' True", "False"]
