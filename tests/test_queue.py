"""The user->kernel queue (QUEUE_OPEN, QUEUE_CLOSE; faytd/queue.py,
libportal/queue.py, docs/queue.md): records drained by a real faytd, a full
queue (WouldBlock, TimedOut), a hostile producer of uid 65534 writing raw
bytes, a producer that dies mid-record, bad requests as raw bytes."""
import errno
import json
import os
import signal

import pytest

import libportal
from libportal._abi import ffi, lib, QUEUE_OPEN, QUEUE_REPLY, HANDLE_REQ
from support.children import WAIT, wait_until

NOBODY = 65534
REC = ffi.sizeof("struct fayt_queue_record")


def _stats(c):
    return c.stats()["queues"]


def test_queue_put_and_put_many_reach_faytd(fresh_faytd, conn_to):
    d = fresh_faytd()
    c = conn_to(d)
    q = libportal.queue_open(connection=c)
    assert q.size == lib.FAYT_QUEUE_SIZE_DEFAULT
    q.put(b"x" * 16)
    q.put(b"")
    q.put_many([b"%08d" % i for i in range(20000)])     # wraps the 64 KiB ring
    assert wait_until(lambda: _stats(c)["records"] == 20002, "faytd to drain 20002 records")
    assert q.stats()["records"] == 20002
    assert _stats(c) == {"open": 1, "records": 20002, "dropped": 0}
    q.close()
    q.close()                                           # once is enough
    assert _stats(c)["open"] == 0
    with pytest.raises(libportal.Unmapped):
        q.put(b"x")


def test_queue_bad_arguments(lp):
    q = lp.queue_open(4096)
    try:
        with pytest.raises(libportal.InvalidArgument) as e:
            q.put(b"x" * 257)
        assert str(e.value) == "[Errno 22] payload: 257 bytes; at most 256"
        with pytest.raises(libportal.InvalidArgument) as e:
            q.put_many([b"ab", b"abc"])
        assert str(e.value) == "[Errno 22] payloads[1]: 3 bytes, not 2 like payloads[0]"
        with pytest.raises(libportal.InvalidArgument):
            q.put(b"x", timeout=-1)
    finally:
        q.close()


def test_queue_threads_putting_at_once_lose_and_tear_nothing(fresh_faytd, conn_to):
    """Four threads put into one small queue at once, two by the fast path
    (one C call, never waiting) and two with a timeout (the path that waits
    for space with the GIL released): the ring fills, so waits happen while
    the others' fast puts step aside.  faytd must drain every record and
    drop nothing (a torn record or a seq out of order would drop the queue)."""
    import threading
    d = fresh_faytd()
    c = conn_to(d)
    q = libportal.queue_open(4096, connection=c)
    per = 5000
    errs = []

    def worker(k):
        try:
            for i in range(per):
                rec = b"%02d%06d" % (k, i) + b"." * (16 * (i % 3))
                if k % 2:
                    q.put(rec, timeout=WAIT)
                else:
                    q.put(rec)
        except BaseException as e:          # reported below, not lost in the thread
            errs.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads), "a putting thread hung"
    assert errs == []
    assert wait_until(lambda: _stats(c)["records"] == 4 * per, "faytd to drain every record")
    assert _stats(c)["dropped"] == 0
    assert q.stats()["records"] == 4 * per
    with pytest.raises(TypeError, match="payload"):
        q.put(12345)
    q.close()


def test_queue_full_is_wouldblock_or_timedout_until_faytd_drains(fresh_faytd, conn_to):
    d = fresh_faytd()
    c = conn_to(d)
    q = libportal.queue_open(4096, connection=c)
    fits = 4096 // (REC + 16)
    os.kill(d.proc.pid, signal.SIGSTOP)                 # faytd drains nothing meanwhile
    try:
        with pytest.raises(libportal.WouldBlock) as e:
            q.put_many([b"y" * 16] * (fits + 10), timeout=0)
        assert e.value.put == fits
        assert str(e.value) == "[Errno 11] put_many: queue %d is full" % q.id
        with pytest.raises(libportal.WouldBlock):
            q.put(b"y" * 16, timeout=0)
        with pytest.raises(libportal.TimedOut) as e:
            q.put(b"y" * 16, timeout=0.05)
        assert "stayed full until the timeout" in str(e.value)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    q.put(b"z" * 16, timeout=WAIT)                      # waits for the space faytd frees
    assert wait_until(lambda: _stats(c)["records"] == fits + 1, "faytd to drain")
    q.close()


def test_queue_a_flooding_producer_does_not_hold_faytd(fresh_faytd, conn_to, spawn):
    d = fresh_faytd()
    flood = spawn("""
        q = lp.queue_open(1 << 20)
        batch = [b"f" * 16] * 4096
        print("flooding")
        while True:
            q.put_many(batch)
        """, d.env())
    assert flood.expect() == "flooding"
    c = conn_to(d)
    for _ in range(20):                                 # served between the drain's rounds
        assert c.stats()["queues"]["open"] == 1
        libportal.share_create("q.flood", 4096, connection=c).destroy()
    flood.kill()
    assert wait_until(lambda: _stats(c)["open"] == 0, "the flooder's queue to go")
    assert _stats(c)["dropped"] == 0


def test_queue_a_producer_killed_mid_record_leaves_only_what_it_published(fresh_faytd, conn_to,
                                                                         spawn):
    d = fresh_faytd()
    # It publishes 100 records, then writes a record's bytes without
    # publishing them (head stays), and is killed there.
    child = spawn("""
        from libportal._abi import ffi, lib
        q = lp.queue_open(4096)
        q.put_many([b"p" * 16] * 100)
        h = ffi.cast("struct fayt_queue_header *", q._q)
        off = lib.FAYT_QUEUE_DATA_OFFSET + (h.head & (q.size - 1))
        struct.pack_into("<HHI", q._map, off, lib.FAYT_QREC_DATA, 16, 0)
        q._map[off + 8:off + 16] = b"half rec"
        print("written")
        time.sleep(120)
        """, d.env())
    assert child.expect() == "written"
    c = conn_to(d)
    assert wait_until(lambda: _stats(c)["records"] == 100, "faytd to drain 100 records")
    child.kill()
    assert wait_until(lambda: _stats(c)["open"] == 0, "the dead producer's queue to go")
    assert _stats(c) == {"open": 0, "records": 100, "dropped": 0}
    assert "dropped" not in d.read_log()


# A hostile producer: its own queue, mapped and written as raw bytes at the
# ABI's offsets, then faytd woken through the eventfd.  One case a line.
HOSTILE = """
import mmap
from libportal._abi import ffi, lib, QUEUE_OPEN, QUEUE_REPLY
c = lp.Connection(sys.argv[1])
H = "struct fayt_queue_header"
HEAD, STATE = ffi.offsetof(H, "head"), ffi.offsetof(H, "state")
D = lib.FAYT_QUEUE_DATA_OFFSET
for line in sys.stdin:
    recs, head = json.loads(line)
    body, fds = c.call(lib.FAYT_SYS_QUEUE_OPEN, QUEUE_OPEN.pack(4096, 0))
    qid, size, length = QUEUE_REPLY.unpack(body)
    m = mmap.mmap(fds[0], length)
    for off, raw in recs:
        m[D + off:D + off + len(raw) // 2] = bytes.fromhex(raw)
    struct.pack_into("<I", m, HEAD, head)
    os.eventfd_write(fds[1], 1)
    end = time.monotonic() + 30
    while struct.unpack_from("<I", m, STATE)[0] == 0 and time.monotonic() < end:
        time.sleep(0.005)
    print(json.dumps(struct.unpack_from("<I", m, STATE)[0]), flush=True)
"""


def _rec(off, type_, length, payload=b""):
    return [off, (bytes(ffi.buffer(ffi.new("struct fayt_queue_record *",
                                            {"type": type_, "length": length})))
                  + payload).hex()]


HOSTILE_CASES = [
    ([_rec(0, 9, 0)], 8, "type: 9 is not a record type"),
    ([_rec(0, lib.FAYT_QREC_DATA, 300)], 8 + 304, "length: 300, more than"),
    ([_rec(0, lib.FAYT_QREC_DATA, 0)], 4096 + 8, "bytes ahead of faytd, more than the ring"),
    ([_rec(0, lib.FAYT_QREC_DATA, 0)], 4, "head: 4 bytes ahead, not a multiple of 8"),
    ([_rec(0, lib.FAYT_QREC_SCHED_PARK, 8)], 16, "length: 8, not the size of a decision"),
    ([_rec(0, lib.FAYT_QREC_PAD, 0)], 8, "PAD record at offset 0"),
    ([_rec(0, lib.FAYT_QREC_DATA, 64)], 16, "record of 72 bytes runs past head"),
    ([_rec(0, lib.FAYT_QREC_DATA, 8, b"12345678"), _rec(16, lib.FAYT_QREC_SCHED_CPUS, 16)],
     24, "record of 24 bytes runs past head"),
]


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a producer as uid 65534: needs root")
def test_queue_a_hostile_producer_loses_its_queue_and_nothing_else(world_faytd, spawn, as_user,
                                                                   conn_to):
    d = world_faytd()
    c = conn_to(d)
    good = libportal.queue_open(connection=c)
    user = spawn(HOSTILE, d.env(), as_user=as_user, uid=NOBODY, args=[d.socket])
    for i, (recs, head, why) in enumerate(HOSTILE_CASES):
        user.send(json.dumps([recs, head]))
        assert json.loads(user.expect()) == lib.FAYT_QUEUE_DROPPED, why
        assert wait_until(lambda: why in d.read_log(), "faytd to log %r" % why)
        assert _stats(c)["dropped"] == i + 1
        good.put(b"still here", timeout=WAIT)           # the others go on
    assert wait_until(lambda: good.stats()["records"] == len(HOSTILE_CASES), "the good queue")
    # The producer's next put on a dropped queue is EPROTO.
    user.kill()
    good.close()


def test_queue_a_dropped_queue_is_eproto_for_its_producer(lp):
    q = lp.queue_open(4096)
    h = ffi.cast("struct fayt_queue_header *", q._q)
    raw = ffi.cast("struct fayt_queue_record *", ffi.cast("char *", q._q)
                   + lib.FAYT_QUEUE_DATA_OFFSET)
    raw.type, raw.length = 77, 0
    h.head = 8
    q.put(b"wake")                          # wakes faytd: it finds the bad record
    assert wait_until(lambda: h.state == lib.FAYT_QUEUE_DROPPED, "faytd to drop the queue")
    with pytest.raises(libportal.ProtocolError) as e:
        q.put(b"x")
    assert "faytd dropped queue %d" % q.id in str(e.value)
    q.close()


def test_queue_bad_requests_as_raw_bytes(lp):
    c = lp.connection()
    cases = [
        (lib.FAYT_SYS_QUEUE_OPEN, b"", errno.EINVAL, "queue_open: expected 8 bytes, got 0"),
        (lib.FAYT_SYS_QUEUE_OPEN, QUEUE_OPEN.pack(3000, 0), errno.EINVAL,
         "size: 3000 is not a power of two in 4096..16777216"),
        (lib.FAYT_SYS_QUEUE_OPEN, QUEUE_OPEN.pack(1 << 25, 0), errno.EINVAL,
         "size: 33554432 is not a power of two"),
        (lib.FAYT_SYS_QUEUE_OPEN, QUEUE_OPEN.pack(2048, 0), errno.EINVAL, "size: 2048"),
        (lib.FAYT_SYS_QUEUE_OPEN, QUEUE_OPEN.pack(0, 1), errno.EINVAL, "flags: unknown bits 0x1"),
        (lib.FAYT_SYS_QUEUE_CLOSE, b"x", errno.EINVAL, "handle: expected 8 bytes, got 1"),
        (lib.FAYT_SYS_QUEUE_CLOSE, HANDLE_REQ.pack(999999), errno.ENOENT,
         "queue 999999: this context has no such queue"),
        (lib.FAYT_SYS_QUEUE_CLOSE, HANDLE_REQ.pack(1 << 40), errno.ENOENT, "no such queue"),
    ]
    for op, body, err, message in cases:
        with pytest.raises(OSError) as e:
            c.call(op, body)
        assert e.value.errno == err, (body, e.value)
        assert message in str(e.value), (body, str(e.value))
    other = libportal.Connection()
    try:
        q = libportal.queue_open(connection=other)
        with pytest.raises(libportal.NotFound):        # another context's queue
            c.call(lib.FAYT_SYS_QUEUE_CLOSE, HANDLE_REQ.pack(q.id))
        q.close()
    finally:
        other.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a producer as uid 65534: needs root")
def test_queue_the_limit_per_uid_as_uid_65534(world_faytd, spawn, as_user):
    d = world_faytd(max_queues_per_uid=2)
    user = spawn("""
        c = lp.Connection(sys.argv[1])
        qs = [lp.queue_open(connection=c) for _ in range(2)]
        try:
            lp.queue_open(connection=c)
        except OSError as e:
            print(json.dumps([errno.errorcode[e.errno], str(e)]))
        qs[0].close()
        lp.queue_open(connection=c)
        print("again")
        """, d.env(), as_user=as_user, uid=NOBODY, args=[d.socket])
    err, msg = json.loads(user.expect())
    assert err == "ENOSPC" and "uid 65534 holds 2 queues, its limit" in msg
    assert user.expect() == "again"
    user.finish()


def test_queue_closed_with_its_connection(fresh_faytd, conn_to):
    d = fresh_faytd()
    c = conn_to(d)
    other = libportal.Connection(d.socket)
    q = libportal.queue_open(connection=other)
    q.put_many([b"c" * 16] * 50)
    other.close()
    assert wait_until(lambda: _stats(c)["open"] == 0, "the queue to go with its connection")
    assert _stats(c)["records"] == 50                   # drained before it went
    with pytest.raises(BrokenPipeError):
        q.put(b"x", timeout=0)
    q.close()


def test_queue_a_buffer_of_wide_items_is_put_whole_on_every_path(fresh_faytd, conn_to):
    """A record is the payload's bytes, not its item count: an array of four
    uint32 is a 16-byte record whether put takes the fast path (no timeout),
    the waiting one (a timeout) or is a decision; a non-contiguous view is
    EINVAL, not a BufferError."""
    import array
    d = fresh_faytd()
    c = conn_to(d)
    q = libportal.queue_open(connection=c)
    try:
        wide = array.array("I", [1, 2, 3, 4])
        assert memoryview(wide).nbytes == 16
        q.put(wide)
        assert q.stats()["head"] == 8 + 16
        q.put(wide, timeout=5)
        assert q.stats()["head"] == 2 * (8 + 16), "the timeout path put len(payload) bytes"
        q.put(memoryview(wide), timeout=0)
        assert q.stats()["head"] == 3 * (8 + 16)
        with pytest.raises(OSError) as e:
            q.put(memoryview(b"abcdefgh")[::2])
        assert e.value.errno == errno.EINVAL and "payload" in str(e.value)
    finally:
        q.close()
