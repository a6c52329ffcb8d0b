"""Notifications between real processes, against a real faytd.

Targets and senders are `python -c` children (support.children.Child): a
target installs handlers and prints its context id; the test (or another
child) notifies it.  Every wait is bounded (WAIT, or the timeout= of notify
and notification_wait), so a lost notification fails a test, never hangs it.
"""
import errno
import json
import os
import textwrap
import time

import pytest

import libportal
from libportal._abi import lib

from support.children import WAIT, Child
from support.daemon import SERVER_GID, SERVER_GID_CONFIG, fayt_objects

pytestmark = pytest.mark.usefixtures("faytd")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _serve(until):
    """Target code: dispatch until the expression `until` is true (bounded)."""
    return """
        _end = time.monotonic() + %f
        while not (%s) and time.monotonic() < _end:
            lp.notification_wait(0.5)
        """ % (WAIT, until)


def test_notification_64_slots_are_distinct(spawn):
    target = spawn("""
        got = []
        for i in range(64):
            lp.install_handler(i, (lambda k: lambda p, idx, s: got.append([k, idx, bytes(p).hex()]) or 1000 + k)(i))
        print(lp.connection().context_id)
        """ + _serve("len(got) == 64") + """
        print(json.dumps(got))
        """)
    tid = int(target.expect())
    results = [libportal.notify(tid, i, bytes([i]) * (i % 49), wait_return=True, timeout=WAIT)
               for i in range(64)]
    assert results == [1000 + i for i in range(64)]
    got = json.loads(target.expect())
    assert got == [[i, i, (bytes([i]) * (i % 49)).hex()] for i in range(64)]
    target.finish()


def test_notification_deferred_waits_for_a_dispatch_point_immediate_interrupts(spawn):
    target = spawn("""
        ran = []
        lp.install_handler(1, lambda p, i, s: ran.append(bytes(p).decode()))
        print(lp.connection().context_id)
        sys.stdin.readline()
        t = time.monotonic()
        while time.monotonic() - t < 1.0:      # pure Python: no dispatch point
            pass
        print(json.dumps(ran))
        lp.notification_poll()
        print(json.dumps(ran))
        sys.stdin.readline()
        t = time.monotonic()
        while len(ran) < 2 and time.monotonic() - t < %f:   # pure Python again
            pass
        print(json.dumps(ran))
        """ % WAIT)
    tid = int(target.expect())
    libportal.notification_channel(tid)   # faytd rings it once to fetch the new ring
    time.sleep(0.3)
    libportal.notify(tid, 1, b"deferred")
    target.send("go")
    assert json.loads(target.expect()) == []              # not delivered while it ran
    assert json.loads(target.expect()) == ["deferred"]    # the poll delivered it
    target.send("go")
    time.sleep(0.2)
    libportal.notify(tid, 1, b"immediate", immediate=True)
    assert json.loads(target.expect()) == ["deferred", "immediate"]   # interrupted the loop
    target.finish()


def test_notification_a_raising_handlers_traceback_goes_through_logging(spawn):
    """The target's program chose where its log goes (here: stdout, one
    marked line per record): the traceback is in the record, not on stderr."""
    target = spawn("""
        import logging
        logging.basicConfig(stream=sys.stdout, format="LOG %(name)s %(levelname)s %(message)s")
        def boom(p, i, s):
            raise ValueError("boom in the handler")
        lp.install_handler(2, boom)
        print(lp.connection().context_id)
        """ + _serve("sys.stdin in select.select([sys.stdin], [], [], 0)[0]") + """
        print("alive")
        """)
    tid = int(target.expect())
    with pytest.raises(libportal.HandlerFailed):
        libportal.notify(tid, 2, b"", wait_return=True, timeout=WAIT)
    me = libportal.connection().context_id
    assert target.expect() == ("LOG libportal.notify ERROR notification handler for index 2 "
                               "(from context %d) raised" % me)
    assert target.expect() == "Traceback (most recent call last):"
    target.send("stop")
    rest = []
    while not rest or rest[-1] != "alive":
        rest.append(target.expect())
    assert "ValueError: boom in the handler" in rest
    assert "Traceback" not in target.stderr(), target.stderr()


def test_notification_return_values_and_a_raising_handler(spawn):
    target = spawn("""
        def boom(p, i, s):
            raise ValueError("no")
        def early(p, i, s):
            lp.notification_ret(int.from_bytes(p, "little") * 2)
            return -1
        lp.install_handler(1, lambda p, i, s: -int.from_bytes(p, "little"))
        lp.install_handler(2, boom)
        lp.install_handler(3, early)
        lp.install_handler(4, lambda p, i, s: s)
        print(lp.connection().context_id)
        """ + _serve("sys.stdin in select.select([sys.stdin], [], [], 0)[0]") + """
        print("alive")
        """)
    tid = int(target.expect())
    assert libportal.notify(tid, 1, (7).to_bytes(8, "little"), wait_return=True,
                            timeout=WAIT) == -7
    with pytest.raises(libportal.HandlerFailed) as e:
        libportal.notify(tid, 2, b"", wait_return=True, timeout=WAIT)
    assert e.value.errno == errno.EREMOTEIO and e.value.status == errno.EREMOTEIO
    assert "the handler for index 2 of context %d failed" % tid in str(e.value)
    assert libportal.notify(tid, 3, (21).to_bytes(2, "little"), wait_return=True,
                            timeout=WAIT) == 42
    assert libportal.notify(tid, 4, wait_return=True, timeout=WAIT) == \
        libportal.connection().context_id
    with pytest.raises(libportal.NotFound) as e:            # nothing installed at 9
        libportal.notify(tid, 9, wait_return=True, timeout=WAIT)
    assert e.value.errno == errno.ENOENT
    assert "context %d has no handler for index 9" % tid in str(e.value)
    with pytest.raises(libportal.InvalidArgument):
        libportal.notify(tid, 64, b"")
    with pytest.raises(libportal.InvalidArgument):
        libportal.notify(tid, 1, b"x" * 49)
    target.send("stop")
    assert target.expect() == "alive"
    target.finish()
    assert "ValueError: no" in target.stderr()


def test_notification_nests_three_deep_on_distinct_stacks(spawn):
    target = spawn("""
        seen, done = [], []
        def h(p, i, s):
            seen.append(lp.current_notification())
            if i == 3:
                done.append(1)
                return lp.notification_depth()
            t = time.monotonic()
            while not done and time.monotonic() - t < %f:
                time.sleep(0.005)        # interruptible: the doorbell nests here
            return lp.notification_depth()
        for i in (1, 2, 3):
            lp.install_handler(i, h)
        print(lp.connection().context_id)
        """ % WAIT + _serve("len(seen) == 3 and lp.notification_depth() == 0") + """
        print(json.dumps(seen))
        """)
    tid = int(target.expect())
    libportal.notify(tid, 1, immediate=True)
    time.sleep(0.3)
    libportal.notify(tid, 2, immediate=True)
    time.sleep(0.3)
    assert libportal.notify(tid, 3, immediate=True, wait_return=True, timeout=WAIT) == 3
    seen = json.loads(target.expect())
    assert [s["depth"] for s in seen] == [1, 2, 3]
    assert [s["index"] for s in seen] == [1, 2, 3]
    assert [s["interrupted_index"] for s in seen] == [lib.FAYT_NOTIFICATION_SLOTS, 1, 2]
    assert len({s["stack"] for s in seen}) == 3
    target.finish()


_STARVE = """
        order = []
        lp.install_handler(10, lambda p, i, s: None, stacks=1)
        if PROVIDER:
            lp.install_handler(63, lambda p, i, s: lp.notification_stack_alloc())
            lp.set_stack_provider(63)
        release = []
        def slow(p, i, s):
            order.append(("start", i, lp.notification_depth()))
            t = time.monotonic()
            while not release and time.monotonic() - t < 3.0:
                time.sleep(0.005)
            order.append(("end", i))
        def quick(p, i, s):
            order.append(("quick", i, lp.notification_depth()))
            release.append(1)
        lp.install_handler(1, slow)
        lp.install_handler(2, quick)
        print(lp.connection().context_id)
"""


@pytest.mark.parametrize("provider", [False, True])
def test_notification_stack_exhaustion_waits_or_calls_the_provider(spawn, provider):
    target = spawn("        PROVIDER = %s\n" % provider + _STARVE
                   + _serve("len(order) == 3") + "\n        print(json.dumps(order))\n")
    tid = int(target.expect())
    libportal.notify(tid, 1, immediate=True)
    time.sleep(0.3)
    libportal.notify(tid, 2, immediate=True)
    order = [tuple(x) for x in json.loads(target.expect())]
    if provider:
        # A stack was made on demand: the second ran nested, during the first.
        assert order == [("start", 1, 1), ("quick", 2, 2), ("end", 1)]
    else:
        # No stack: the second waited in its ring until the first returned.
        assert order == [("start", 1, 1), ("end", 1), ("quick", 2, 1)]
    target.finish()


def test_notification_install_by_a_non_core_server_is_refused(fresh_faytd, conn_to, spawn):
    d = fresh_faytd(config=SERVER_GID_CONFIG)
    core = conn_to(d)
    other = spawn("""
        os.setgroups([]); os.setgid(%d)
        c = lp.Connection()
        print(c.category)
        try:
            lp.install_handler(1, lambda p, i, s: 0, connection=c, stacks=0)
            print("installed")
        except lp.PermissionDenied as e:
            print("refused", e.errno, str(e))
        print(c.context_id)
        sys.stdin.readline()
        """ % SERVER_GID, env=d.env())
    assert other.expect() == str(lib.FAYT_CATEGORY_SERVER)
    assert other.expect() == ("refused %d [Errno %d] notify_install: category server may "
                              "not install notification handlers" % (errno.EPERM, errno.EPERM))
    other_id = int(other.expect())
    # A server may still be notified by its own user's core servers (it has no handler:
    # the notification waits in its ring).
    libportal.notify(other_id, 1, b"x", connection=core)
    other.send("")
    other.finish()


def test_notification_the_notify_right_is_checked_when_the_ring_is_made(fresh_faytd, conn_to,
                                                                         spawn):
    # Whom a category may notify is a policy right: target categories, "*"
    # or "$uid".  All the children run as the test's uid; their gid picks
    # the category.
    policy = {"policy": {
        "categories": {"core": {"classes": ["SHARE", "ANON"], "notify_handlers": True},
                       "server": {"classes": ["SHARE", "ANON"], "notify": []},
                       "peer": {"classes": ["ANON"], "notify": ["core"]},
                       "mate": {"classes": ["ANON"], "notify": ["$uid"]}},
        "rules": [{"gid": SERVER_GID, "category": "server"},
                  {"gid": SERVER_GID + 1, "category": "peer"},
                  {"gid": SERVER_GID + 2, "category": "mate"},
                  {"uid": "$owner", "category": "core"}],
        "default": "server"}}
    d = fresh_faytd(config=policy)
    core = conn_to(d)
    target = spawn("""
        lp.install_handler(1, lambda p, i, s: 7)
        print(lp.connection().context_id)
        """ + _serve("sys.stdin in select.select([sys.stdin], [], [], 0)[0]"), env=d.env())
    tid = int(target.expect())
    sender = """
        os.setgroups([]); os.setgid(%d)
        print(lp.connection().context_id)
        try:
            print(lp.notify(int(sys.stdin.readline()), 1, b"x", wait_return=True, timeout=30))
        except lp.PermissionDenied as e:
            print("refused", e.errno, str(e))
        sys.stdin.readline()
        """
    server, peer, mate = (spawn(sender % (SERVER_GID + k), env=d.env()) for k in range(3))
    server_id = int(server.expect())
    for c in (server, peer, mate):
        if c is not server:
            c.expect()
        c.send(str(tid))
    assert server.expect() == (
        "refused %d [Errno %d] target: category server may not notify context %d (category "
        "core, uid %d); its notify right allows no one" % (errno.EPERM, errno.EPERM, tid,
                                                          os.getuid()))
    assert peer.expect() == "7"         # "core" names the target's category
    assert mate.expect() == "7"         # "$uid": the same uid
    # core's right is "*" when the policy does not say (as before the right existed):
    # it may notify the server, whose own right is empty.
    libportal.notify(server_id, 1, b"x", connection=core)
    for c in (server, peer, mate, target):
        c.send("")
        c.finish()


def _counting_sender(spawn, n, index, returns_every=0):
    """A sender child: reads the target's context id on stdin, then sends
    0..n-1 (4 bytes each) to slot index, every returns_every-th one with the
    return flag (its handler must return the number), and prints "sent"."""
    return spawn("""
        t = int(sys.stdin.readline())
        for k in range(%d):
            back = %d and k %% %d == 0
            r = lp.notify(t, %d, k.to_bytes(4, "little"), wait_return=back, timeout=60)
            if back and r != k:
                print("bad return", k, r)
        print("sent")
        """ % (n, returns_every, returns_every or 1, index))


def test_notification_100000_from_one_sender_arrive_complete_and_in_order(spawn):
    n = 100000
    target = spawn("""
        state = {"next": 0, "bad": 0}
        def h(p, i, s):
            k = int.from_bytes(p, "little")
            if k != state["next"]:
                state["bad"] += 1
            state["next"] = k + 1
        lp.install_handler(7, h)
        print(lp.connection().context_id)
        _end = time.monotonic() + 120
        while state["next"] < %d and time.monotonic() < _end:
            lp.notification_wait(1.0)
        print(state["next"], state["bad"])
        """ % n)
    tid = int(target.expect())
    sender = _counting_sender(spawn, n, 7)
    sender.send(str(tid))
    assert sender.expect(timeout=120) == "sent"
    assert target.expect(timeout=120) == "%d 0" % n
    sender.finish()
    target.finish()


def test_notification_a_batch_keeps_the_order_when_an_immediate_one_nests(spawn):
    # Deferred notifications are taken out of the ring in batches; one that
    # comes with the immediate flag while the first handler of a batch runs
    # still starts after the rest of that batch (posting order), all nested.
    target = spawn("""
        order = []
        def h(p, i, s):
            k = int.from_bytes(p, "little")
            order.append([k, lp.notification_depth(), len(lp.current_notification() or {})])
            if k == 0:
                t = time.monotonic()
                while len(order) < 7 and time.monotonic() - t < %f:
                    time.sleep(0.005)        # interruptible: the doorbell nests here
            return k
        lp.install_handler(1, h)
        print(lp.connection().context_id)
        sys.stdin.readline()
        lp.notification_poll()
        print(len(order))
        """ % WAIT + _serve("len(order) == 7") + """
        print(json.dumps(order))
        """)
    tid = int(target.expect())
    ch = libportal.notification_channel(tid)   # faytd rings it once to fetch the new ring
    time.sleep(0.3)
    for k in range(6):
        ch.send(1, k.to_bytes(2, "little"))
    target.send("go")
    time.sleep(0.3)
    assert ch.call(1, (6).to_bytes(2, "little"), immediate=True, timeout=WAIT) == 6
    assert target.expect() == "7"
    order = json.loads(target.expect())
    assert [o[0] for o in order] == list(range(7))
    assert [o[1] for o in order] == [1] + [2] * 6
    assert all(o[2] == 7 for o in order)     # current_notification() for every one
    target.finish()


def test_notification_target_killed_releases_a_waiting_sender_at_once(spawn):
    target = spawn("""
        lp.install_handler(1, lambda p, i, s: time.sleep(600))
        print(lp.connection().context_id)
        """ + _serve("False"))
    tid = int(target.expect())
    sender = spawn("""
        t = int(sys.stdin.readline())
        lp.notify(t, 1, b"x", immediate=True)    # opens the ring, starts the handler
        print("waiting", flush=True)
        t0 = time.monotonic()
        try:
            lp.notify(t, 1, b"y", wait_return=True, timeout=60)
            print("returned")
        except lp.NoSuchContext as e:
            print("ESRCH", e.errno, round(time.monotonic() - t0))
        """)
    sender.send(str(tid))
    assert sender.expect() == "waiting"
    time.sleep(0.5)
    target.kill()
    line = sender.expect(timeout=10)
    assert line.startswith("ESRCH %d " % errno.ESRCH)
    assert int(line.split()[-1]) < 5
    sender.finish()
    with pytest.raises(libportal.NoSuchContext):
        libportal.notify(tid, 1, b"z")


def test_notification_faytd_reports_a_dead_peer_and_a_destroyed_share_point(spawn):
    watcher = spawn("""
        events = []
        lp.install_handler(5, lambda p, i, s: events.append([s, lp.decode_event(p)]))
        lp.subscribe(lp.PEER_DIED, 5)
        lp.subscribe(lp.SP_DESTROYED, 5)
        sp = lp.share_attach(sys.stdin.readline().strip())
        print(lp.connection().context_id)
        """ + _serve("len(events) == 2") + """
        print(json.dumps(events))
        """)
    name = "t-notify-sp-%d" % time.monotonic_ns()
    sp = libportal.share_create(name, 4096)
    watcher.send(name)
    watcher.expect()
    peer = spawn("""
        print(lp.connection().context_id, os.getpid())
        sys.stdin.readline()
        """)
    peer_id, peer_pid = map(int, peer.expect().split())
    peer.kill()
    time.sleep(0.3)
    sp_id = sp.sp_id if hasattr(sp, "sp_id") else None
    sp.destroy()
    events = json.loads(watcher.expect())
    assert [s for s, _ in events] == [0, 0]          # sender: faytd
    died, gone = events[0][1], events[1][1]
    assert died["event"] == libportal.PEER_DIED
    assert (died["context_id"], died["pid"]) == (peer_id, peer_pid)
    assert gone["event"] == libportal.SP_DESTROYED and gone["identifier"] == name[:31]
    if sp_id is not None:
        assert gone["sp_id"] == sp_id
    watcher.finish()


def test_notification_faytd_notices_behind_a_full_ring_arrive_once_it_drains(spawn, faytd):
    # faytd never waits on a full ring: its notices wait in a backlog that its
    # loop retries, so they arrive once the target makes room, with no call
    # from the target to faytd.
    n = lib.FAYT_RING_ENTRIES + 40
    watcher = spawn("""
        import signal
        seen = []
        lp.install_handler(5, lambda p, i, s: seen.append(lp.decode_event(p)["context_id"]))
        lp.subscribe(lp.PEER_DIED, 5)
        signal.pthread_sigmask(signal.SIG_BLOCK, [lp.notification.DOORBELL])
        print(lp.connection().context_id)
        sys.stdin.readline()          # no dispatch point until told: the ring fills
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [lp.notification.DOORBELL])
        _end = time.monotonic() + %f
        while len(seen) < %d and time.monotonic() < _end:
            lp.notification_wait(0.5)  # no system call: only the ring
        print(len(seen), len(set(seen)))
        """ % (WAIT, n))
    watcher.expect()
    for _ in range(n):      # n contexts come and go: a PEER_DIED notice each
        libportal.Connection(faytd.socket).close()
    time.sleep(0.3)
    watcher.send("go")
    assert watcher.expect() == "%d %d" % (n, n)
    watcher.finish()


def test_notification_rings_and_stacks_leave_nothing_behind(fresh_faytd, conn_to, spawn):
    d = fresh_faytd()
    probe = conn_to(d)

    def objects(kind):
        return [n for n in fayt_objects([d.proc.pid]) if ".%s." % kind in n]

    free0 = probe.list_contexts()["free_frames"]
    target = spawn("""
        lp.install_handler(1, lambda p, i, s: 5)
        lp.subscribe(lp.PEER_DIED, 1)
        print(lp.connection().context_id)
        """ + _serve("False"), env=d.env())
    tid = int(target.expect())
    sender = spawn("""
        t = int(sys.stdin.readline())
        print(lp.notify(t, 1, wait_return=True, timeout=30))
        sys.stdin.readline()
        """, env=d.env())
    sender.send(str(tid))
    assert sender.expect() == "5"
    assert len(objects("ring")) == 2                    # sender -> target, faytd -> target
    assert probe.list_contexts()["free_frames"] < free0   # the target's stacks
    sender.kill()
    end = time.monotonic() + WAIT
    while len(objects("ring")) > 1 and time.monotonic() < end:
        time.sleep(0.05)
    assert len(objects("ring")) == 1                    # the dead sender's ring is reclaimed
    target.kill()
    while (objects("ring") or len(objects("ctx")) > 1) and time.monotonic() < end:
        time.sleep(0.05)
    assert objects("ring") == [] and len(objects("ctx")) == 1     # the probe's page
    assert probe.list_contexts()["free_frames"] == free0


def test_notification_reference_pair_talks(spawn, faytd):
    import subprocess
    import sys
    srv = subprocess.Popen([sys.executable, "-m", "servers.notify_pair", "serve", "--idle", "5"],
                           env=faytd.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, cwd=ROOT)
    try:
        line = srv.stdout.readline()
        assert "serving notifications" in line, line + srv.stderr.read()
        cid = line.split("context ")[1].split()[0]
        cli = subprocess.run([sys.executable, "-m", "servers.notify_pair", "client", cid,
                              "-n", "200"], env=faytd.env(), cwd=ROOT, capture_output=True,
                             text=True, timeout=WAIT)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert "200 ADD calls with the return flag: all right" in cli.stdout
        assert "FAIL: HandlerFailed" in cli.stdout
        srv.terminate()
        out, err = srv.communicate(timeout=WAIT)
        assert "log from context" in out and "hello through the ring" in out
        assert "stopping: 201 ADD, 2 LOG handled" in out
        assert "ValueError: FAIL asked for" in err
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()


# -- share-point calls are dispatch points (the pending hint) --------------------

def _spin_target(body):
    """Target code with a share-point of its own (`sp`, `sp2`) and a handler at
    slot 1 that records the payload as an int; `body` runs after "go"."""
    return textwrap.dedent("""
        import uuid
        from libportal import _fastpath
        names = ["t-hint-%s" % uuid.uuid4().hex[:10] for _ in range(2)]
        sp, sp2 = lp.share_create(names[0], 4096), lp.share_create(names[1], 4096)
        got = []
        def h(p, i, s):
            got.append(int.from_bytes(p, "little"))
            sp.add(8, 1)            # the handler's own use of the share-point
        lp.install_handler(1, h)
        print(lp.connection().context_id)
        sys.stdin.readline()
        """) + textwrap.dedent(body) + "sp.destroy(); sp2.destroy()\n"


def test_notification_a_target_spinning_on_share_point_add_takes_deferred_ones(spawn):
    """No faytd call, no poll, no doorbell: only sp.add(); every deferred
    notification arrives, in order, none lost (more than a ring holds: the
    sender waits for space that only the add loop's dispatch makes)."""
    first, rest = 100, 3000
    target = spawn(_spin_target("""
        t = time.monotonic()
        while time.monotonic() - t < 0.3:          # pure Python: no dispatch point
            pass
        print(len(got))
        _end = time.monotonic() + %f
        adds = 0
        while len(got) < %d and time.monotonic() < _end:
            sp2.add(0, 1)                          # the share-point fast path only
            adds += 1
        print(json.dumps({"got": got, "adds": adds, "sp": sp.read(8, 8).hex(),
                          "hint": _fastpath.hint_state()}))
        """ % (WAIT, first + rest)))
    tid = int(target.expect())
    ch = libportal.notification_channel(tid)   # faytd rings it once to fetch the new ring
    time.sleep(0.3)
    for k in range(first):
        ch.send(1, k.to_bytes(4, "little"))
    target.send("go")
    assert target.expect() == "0"                  # deferred: not taken by pure Python
    for k in range(first, first + rest):
        ch.send(1, k.to_bytes(4, "little"), timeout=WAIT)
    out = json.loads(target.expect())
    assert out["got"] == list(range(first + rest))
    assert int.from_bytes(bytes.fromhex(out["sp"]), "little") == first + rest
    assert out["hint"] == [1, 0]                   # one word registered, no lock held
    target.finish()


def test_notification_share_point_dispatch_waits_for_the_main_threads_locks(spawn):
    """Never dispatched while the main thread holds a share-point lock (the
    handler takes that lock itself): at the unlock, or `with`'s exit, instead."""
    target = spawn(_spin_target("""
        out = []
        for hold in ("lock", "with"):
            if hold == "lock":
                sp.lock()
            else:
                ctx = sp.__enter__()
            print("held")
            t = time.monotonic()
            while time.monotonic() - t < 0.6:
                sp2.add(0, 1)                      # a dispatch point, but sp is held
            out.append(len(got))
            if hold == "lock":
                sp.unlock()                        # dispatches after the release
            else:
                sp.__exit__(None, None, None)
            out.append(len(got))
            print(json.dumps(out))
            sys.stdin.readline()
        print(json.dumps([got, sp.read(8, 8).hex(), _fastpath.hint_state()]))
        """))
    tid = int(target.expect())
    ch = libportal.notification_channel(tid)
    time.sleep(0.3)
    target.send("go")
    assert target.expect() == "held"
    ch.send(1, (5).to_bytes(4, "little"))          # while the lock is held
    assert json.loads(target.expect()) == [0, 1]
    target.send("go")
    assert target.expect() == "held"
    ch.send(1, (6).to_bytes(4, "little"))          # inside `with sp`
    assert json.loads(target.expect()) == [0, 1, 1, 2]
    target.send("go")
    got, count, hint = json.loads(target.expect())
    assert got == [5, 6] and int.from_bytes(bytes.fromhex(count), "little") == 2
    assert hint == [1, 0]
    target.finish()


def test_notification_a_target_without_handlers_registers_no_hint(spawn):
    """No handler, no subscription: the share-point calls check nothing but a
    count of 0, whatever senders post into the context."""
    target = spawn("""
        import uuid
        from libportal import _fastpath
        sp = lp.share_create("t-hint-%s" % uuid.uuid4().hex[:10], 4096)
        print(lp.connection().context_id)
        sys.stdin.readline()
        states = {tuple(_fastpath.hint_state())}
        with sp:
            states.add(tuple(_fastpath.hint_state()))
        for _ in range(10000):
            sp.add(0, 1)
        states.add(tuple(_fastpath.hint_state()))
        print(json.dumps([sorted(states), sp.read(0, 8).hex()]))
        sp.destroy()
        """)
    tid = int(target.expect())
    ch = libportal.notification_channel(tid)
    for k in range(10):
        ch.send(1, b"x")
    target.send("go")
    states, count = json.loads(target.expect())
    assert states == [[0, 0]]                      # no word registered, nothing looked at
    assert int.from_bytes(bytes.fromhex(count), "little") == 10000
    target.finish()


def test_notification_doorbell_after_faytd_stopped_raises_nothing_into_the_program(
        fresh_faytd):
    """faytd stops (SIGTERM) while a doorbell for this context is pending:
    its handler, run in the middle of unrelated code (subprocess.wait,
    time.sleep), must not raise DaemonUnavailable there.  The lost
    connection is reported once on stderr and by the next libportal call."""
    d = fresh_faytd()
    target = Child("""
        import signal, subprocess
        from libportal.notification import DOORBELL
        lp.install_handler(1, lambda p, i, s: 0)
        signal.pthread_sigmask(signal.SIG_BLOCK, [DOORBELL])
        print(lp.connection().context_id)
        sys.stdin.readline()            # a ring was made (doorbell pending); faytd stopped
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [DOORBELL])   # the handler runs now
            subprocess.Popen(["sleep", "0.2"]).wait()
            time.sleep(0.2)
            print("survived")
        except BaseException as e:
            print("raised %s: %s" % (type(e).__name__, e))
        try:
            lp.notify(lp.connection().context_id, 1, b"")
            print("next call: no error")
        except lp.DaemonUnavailable as e:
            print("next call: DaemonUnavailable")
        """, d.env())
    try:
        tid = int(target.expect())
        sender = libportal.Connection(d.socket)
        libportal.notification_channel(tid, connection=sender)     # faytd rings the target
        sender.close()
        d.stop()
        target.send("go")
        assert target.expect() == "survived"
        assert target.expect() == "next call: DaemonUnavailable"
        target.finish()
        err = target.stderr()
        assert err.count("notifications: the doorbell could not be served") == 1, err
        assert "Traceback" not in err, err
    finally:
        target.proc.kill()
        target.proc.wait()


def test_notification_asyncio_takes_deferred_ones_without_blocking_its_loop(spawn):
    """An asyncio target waits with notification_wait_async: 20,000 deferred
    notifications (every tenth with the return flag) arrive complete and in
    order while another task keeps running on the same loop; with nothing
    sent, the wait times out and returns 0."""
    n = 20000
    target = spawn("""
        import asyncio
        state = {"next": 0, "bad": 0}
        def h(p, i, s):
            k = int.from_bytes(p, "little")
            if k != state["next"]:
                state["bad"] += 1
            state["next"] = k + 1
            return k
        lp.install_handler(7, h)
        print(lp.connection().context_id)
        async def ticker(ticks):
            while True:
                await asyncio.sleep(0.01)
                ticks[0] += 1
        async def main():
            ticks = [0]
            t = asyncio.ensure_future(ticker(ticks))
            idle = await lp.notification_wait_async(0.2)
            print("idle", idle, flush=True)
            end = time.monotonic() + 120
            while state["next"] < %d and time.monotonic() < end:
                await lp.notification_wait_async(1.0)
            t.cancel()
            print(state["next"], state["bad"], ticks[0] > 0, flush=True)
        asyncio.run(main())
        """ % n)
    tid = int(target.expect())
    assert target.expect() == "idle 0"
    sender = _counting_sender(spawn, n, 7, returns_every=10)
    sender.send(str(tid))
    assert sender.expect(timeout=120) == "sent"
    assert target.expect(timeout=120) == "%d 0 True" % n
    sender.finish()
    target.finish()


def test_notification_fd_in_a_selector_with_other_descriptors(spawn):
    """A target that sleeps in a selector over notification_fd() and a pipe
    of its own: deferred notifications wake it (none lost across 2,000
    sends in bursts), and so does its pipe; a thread that exists does not
    steal the wake-up."""
    target = spawn("""
        import selectors, threading
        got = []
        lp.install_handler(3, lambda p, i, s: got.append(int.from_bytes(p, "little")))
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        r, w = os.pipe()
        sel = selectors.DefaultSelector()
        sel.register(lp.notification_fd(), selectors.EVENT_READ, "notify")
        sel.register(r, selectors.EVENT_READ, "pipe")
        print(lp.connection().context_id, flush=True)
        end = time.monotonic() + 60
        pipe = 0
        while len(got) < 2000 and time.monotonic() < end:
            for key, _ in sel.select(1.0):
                if key.data == "notify":
                    lp.notification_ready()
                else:
                    os.read(r, 1)
                    pipe += 1
            if pipe == 0 and len(got) >= 1000:
                os.write(w, b"x")
        print(len(got), got == list(range(2000)), pipe, flush=True)
        """)
    tid = int(target.expect())
    sender = spawn("""
        t = int(sys.stdin.readline())
        for k in range(2000):
            lp.notify(t, 3, k.to_bytes(4, "little"), timeout=60)
            if k % 100 == 99:
                time.sleep(0.01)           # bursts: the target goes back to sleep between
        print("sent")
        """)
    sender.send(str(tid))
    assert sender.expect(timeout=120) == "sent"
    assert target.expect(timeout=120) == "2000 True 1"
    sender.finish()
    target.finish()


def test_notification_fd_is_the_wakeup_descriptor_until_the_connection_closes(spawn):
    """notification_fd() makes its pipe signal.set_wakeup_fd's when the
    program had none, keeps a program's own, and gives it back when the
    connection closes."""
    target = spawn("""
        import signal
        def probe():
            w = signal.set_wakeup_fd(-1)
            signal.set_wakeup_fd(w)
            return w
        lp.install_handler(1, lambda p, i, s: 0)
        fd = lp.notification_fd()
        print(probe() >= 0, probe() != fd, flush=True)
        lp.connection().close()
        print(probe(), flush=True)
        r, w = os.pipe2(os.O_NONBLOCK)
        signal.set_wakeup_fd(w)                 # the program's own
        c = lp.Connection()
        lp.install_handler(1, lambda p, i, s: 0, connection=c)
        lp.notification_fd(connection=c)
        print(probe() == w, flush=True)
        c.close()
        print(probe() == w, flush=True)
        """)
    assert target.expect() == "True True"
    assert target.expect() == "-1"
    assert target.expect() == "True"
    assert target.expect() == "True"
    target.finish()
