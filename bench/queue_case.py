"""The queue case: records a second from this process to its consumer,
16 B and 64 B payloads, one record a call and batches of 256.

- ours: libportal's queue (docs/queue.md); the consumer is faytd, which
  drains in C; a round ends when the queue's header says faytd drained
  every record (read from shared memory: no call).
- posix_ipc.MessageQueue: a consumer process receive()s; a round ends
  when it has received the round's end marker and said so on a pipe.
  It has no batched send: its one-a-call figure stands for both rows.
- faster_fifo.Queue (optional: pip install 'fayt-portals[bench]'): the
  same, put and put_many against get_many.  Absent, its rows are skipped
  with the reason printed.

Each round runs every side once, in turn (peers interleaved); the figure
is the median of the rounds.
"""
import multiprocessing
import os
import sys
import time

import posix_ipc

import libportal as lp

try:
    import faster_fifo
except ImportError as e:                    # optional: the [bench] extra
    faster_fifo = None
    FASTER_FIFO_WHY = "faster-fifo is not installed (%s): pip install 'fayt-portals[bench]'" % e

BATCH = 256
END = b"\xff" * 8


def _mq_consumer(name, done):
    mq = posix_ipc.MessageQueue(name)
    recv = mq.receive
    while True:
        m = recv()[0]
        if m[:8] == END:
            done.send_bytes(b"x")
            if m[8:9] == b"q":
                return


def _ff_consumer(q, done):
    while True:
        for m in q.get_many(block=True, timeout=1e9, max_messages_to_get=1024):
            if m[:8] == END:
                done.send_bytes(b"x")
                if m[8:9] == b"q":
                    return


def _wait_pipe(conn):
    if not conn.poll(300):
        raise RuntimeError("queue bench: a consumer said nothing for 300 s")
    conn.recv_bytes()


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def case_queue(d, scale):
    n = max(2000, int(200000 * scale)) // BATCH * BATCH
    rounds = 5 if scale >= 1 else 2
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for size in (16, 64):
        payload = b"p" * size
        batch = [payload] * BATCH
        q = lp.queue_open(1 << 20)
        stats_h = q.stats

        def drained(target):
            while stats_h()["records"] < target:
                time.sleep(0.0002)

        sent = [0]

        def ours_one(k):
            put = q.put
            for _ in range(k):
                put(payload)
            sent[0] += k
            drained(sent[0])

        def ours_many(k):
            pm = q.put_many
            for _ in range(k // BATCH):
                pm(batch)
            sent[0] += k
            drained(sent[0])

        mq_name = "/fayt-bench-q-%d" % os.getpid()
        mq = posix_ipc.MessageQueue(mq_name, posix_ipc.O_CREX, max_message_size=max(size, 16))
        r_fd, w_fd = ctx.Pipe(duplex=False)
        mqc = ctx.Process(target=_mq_consumer, args=(mq_name, w_fd))
        mqc.start()
        end = END + b"e" * (size - 8)

        def mq_one(k):
            send = mq.send
            for _ in range(k):
                send(payload)
            send(end)
            _wait_pipe(r_fd)

        fns = [ours_one, ours_many, mq_one]
        ff = ffc = None
        if faster_fifo is not None:
            ff = faster_fifo.Queue(max_size_bytes=1 << 20)
            fr, fw = ctx.Pipe(duplex=False)
            ffc = ctx.Process(target=_ff_consumer, args=(ff, fw))
            ffc.start()

            def ff_one(k):
                put = ff.put
                for _ in range(k):
                    put(payload)
                put(end)
                _wait_pipe(fr)

            def ff_many(k):
                pm = ff.put_many
                for _ in range(k // BATCH):
                    pm(batch)
                ff.put(end)
                _wait_pipe(fr)
            fns += [ff_one, ff_many]
        try:
            times = [[] for _ in fns]
            for _ in range(rounds):
                for i, fn in enumerate(fns):
                    t = time.perf_counter()
                    fn(n)
                    times[i].append(n / (time.perf_counter() - t))
        finally:
            q.close()
            mq.send(END + b"q" + b"e" * (size - 9))
            mqc.join(30)
            mq.close()
            mq.unlink()
            r_fd.close()
            w_fd.close()
            if ffc is not None:
                ff.put(END + b"q" + b"e" * (size - 9))
                ffc.join(30)
                fr.close()
                fw.close()
        med = [_median(x) for x in times]
        spread = [(min(x), max(x)) for x in times]
        one, many, mqv = med[0], med[1], med[2]
        best_one = mqv
        best_many = mqv
        rows.append({"name": "queue put, %d B records" % size, "ours": one, "unit": "ops/s",
                     "peer": "posix_ipc.MessageQueue", "peer_value": mqv, "ratio": one / mqv,
                     "range": spread[0], "peer_range": spread[2], "target": None})
        if faster_fifo is not None:
            ffv, ffm = med[3], med[4]
            best_one = max(mqv, ffv)
            best_many = max(mqv, ffm)
            rows.append({"name": "queue put, %d B records" % size, "ours": one,
                         "unit": "ops/s", "peer": "faster_fifo put", "peer_value": ffv,
                         "ratio": one / ffv, "range": spread[0], "peer_range": spread[3],
                         "target": None})
            rows.append({"name": "queue put_many(%d), %d B records" % (BATCH, size),
                         "ours": many, "unit": "ops/s", "peer": "faster_fifo put_many",
                         "peer_value": ffm, "ratio": many / ffm, "range": spread[1],
                         "peer_range": spread[4], "target": None})
        rows.append({"name": "queue put_many(%d), %d B records" % (BATCH, size), "ours": many,
                     "unit": "ops/s", "peer": "best of posix_ipc / faster_fifo batched",
                     "peer_value": best_many, "ratio": many / best_many, "range": spread[1],
                     "target": (">=", 2.0)})
        rows.append({"name": "queue put, %d B records" % size, "ours": one, "unit": "ops/s",
                     "peer": "best of posix_ipc / faster_fifo one a call",
                     "peer_value": best_one, "ratio": one / best_one, "range": spread[0],
                     "target": (">=", 2.0)})
    if faster_fifo is None:
        print("  queue: faster_fifo rows skipped: %s" % FASTER_FIFO_WHY, file=sys.stderr)
    return rows
