"""The scheduling interface (faytd/sched.py, libportal/sched.py,
docs/scheduling.md): decisions through a queue enforced on real processes,
parking outside a critical section, a SIGCONT behind faytd's back, the
rights (uid 65534, a faytd without privileges), a scheduler that dies."""
import errno
import json
import os
import signal

import pytest

import libportal
from libportal.sched import PARK
from support.children import WAIT, wait_until

NOBODY = 65534

# A target context: prints its context id, then obeys lines: "lock NAME"
# takes a share-point's lock and holds it, "unlock" gives it back, "thread"
# starts a thread that sleeps, "ping" answers "pong".
TARGET = """
c = lp.connection()
print(c.context_id)
sp = None
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "lock":
        sp = lp.share_create(cmd[1], 4096)
        sp.lock()
        print("locked")
    elif cmd[0] == "unlock":
        sp.unlock()
        sp.destroy()
        print("unlocked")
    elif cmd[0] == "thread":
        threading.Thread(target=time.sleep, args=(120,), daemon=True).start()
        print(threading.active_count())
    elif cmd[0] == "ping":
        print("pong")
"""


def _state(pid):
    with open("/proc/%d/stat" % pid, "rb") as f:
        s = f.read()
    return chr(s[s.rindex(b")") + 2])


def _stopped(pid):
    return _state(pid) in "Tt"


def _tids(pid):
    return [int(t) for t in os.listdir("/proc/%d/task" % pid)]


def _target(spawn, env=None, **kw):
    t = spawn(TARGET, env, **kw)
    return t, int(t.expect())


def test_sched_run_on_and_set_nice_reach_every_thread(lp, spawn):
    t, ctx = _target(spawn)
    t.send("thread")
    assert t.expect() == "2"
    cpu = min(os.sched_getaffinity(0))
    with lp.Scheduler() as s:
        s.run_on(ctx, {cpu})
        s.set_nice(ctx, 7)
        tids = _tids(t.pid)
        assert len(tids) == 2
        for tid in tids:
            assert os.sched_getaffinity(tid) == {cpu}
            assert os.getpriority(os.PRIO_PROCESS, tid) == 7
        with pytest.raises(libportal.InvalidArgument) as e:
            s.set_nice(ctx, 20)
        assert str(e.value) == "[Errno 22] nice: 20 is not in -20..19"
        with pytest.raises(libportal.InvalidArgument):
            s.run_on(ctx, [])
        with pytest.raises(libportal.InvalidArgument) as e:
            s.run_on(ctx, {63})                     # no such CPU: Linux's EINVAL
        assert "run_on of context %d: faytd answered EINVAL" % ctx in str(e.value)
        with pytest.raises(libportal.NoSuchContext) as e:
            s.park(999999)
        assert "park of context 999999: faytd answered ESRCH" in str(e.value)
        with pytest.raises(libportal.InvalidArgument):
            s.wake(ctx)                             # not parked
    t.kill()


def test_sched_park_and_wake(lp, spawn):
    t, ctx = _target(spawn)
    s = lp.Scheduler()
    try:
        s.park(ctx)
        assert _stopped(t.pid)
        s.park(ctx)                                 # parked already: nothing changes
        s.wake(ctx)
        t.send("ping")
        assert t.expect() == "pong"
        assert not _stopped(t.pid)
    finally:
        s.close()
        t.kill()


def test_sched_a_context_holding_a_lock_is_parked_when_it_lets_go(lp, spawn):
    t, ctx = _target(spawn)
    t.send("lock sched.park")
    assert t.expect() == "locked"
    s = lp.Scheduler()
    try:
        seq = s.put(PARK, ctx)
        with pytest.raises(libportal.TimedOut):
            s.result(seq, timeout=0.2)              # not while it holds the lock
        t.send("unlock")
        # Parked once it let go: possibly before it said so (the park may
        # land between its unlock and its answer), so the answer is read
        # after the wake.
        s.result(seq, timeout=WAIT)
        assert _stopped(t.pid)
        s.wake(ctx)
        assert t.expect() == "unlocked"
        t.send("ping")
        assert t.expect() == "pong"
    finally:
        s.close()
        t.kill()


def test_sched_a_context_that_keeps_its_lock_is_not_parked(lp, spawn):
    t, ctx = _target(spawn)
    t.send("lock sched.busy")
    assert t.expect() == "locked"
    s = lp.Scheduler()
    try:
        with pytest.raises(OSError) as e:
            s.park(ctx, timeout=WAIT)
        assert e.value.errno == errno.EBUSY
        assert not _stopped(t.pid)
        t.send("unlock")
        assert t.expect() == "unlocked"
    finally:
        s.close()
        t.kill()


def test_sched_a_sigcont_behind_faytds_back_is_parked_again(lp, spawn):
    t, ctx = _target(spawn)
    c = lp.connection()
    before = c.stats()["decisions"]["resumed_behind"]
    s = lp.Scheduler()
    try:
        s.park(ctx)
        os.kill(t.pid, signal.SIGCONT)              # same uid: Linux lets it
        assert wait_until(lambda: c.stats()["decisions"]["resumed_behind"] == before + 1,
                          "faytd to notice the SIGCONT")
        assert wait_until(lambda: _stopped(t.pid), "faytd to stop it again")
        s.wake(ctx)
        t.send("ping")
        assert t.expect() == "pong"
    finally:
        s.close()
        t.kill()


# A scheduler in a process of its own: obeys "park CTX", "nice CTX N",
# "cpus CTX CPU", answering "ok" or [errno name, message].
SCHEDULER = """
c = lp.Connection(sys.argv[1]) if len(sys.argv) > 1 else lp.connection()
s = lp.Scheduler(connection=c)
print("ready")
for line in sys.stdin:
    op, ctx, *rest = line.split()
    try:
        if op == "park":
            s.park(int(ctx))
        elif op == "nice":
            s.set_nice(int(ctx), int(rest[0]))
        elif op == "cpus":
            s.run_on(int(ctx), {int(rest[0])})
        print(json.dumps("ok"))
    except OSError as e:
        print(json.dumps([errno.errorcode[e.errno], str(e)]))
"""


def test_sched_a_scheduler_that_dies_has_its_decisions_undone(lp, spawn):
    t, ctx = _target(spawn)
    was_cpus = os.sched_getaffinity(t.pid)
    was_nice = os.getpriority(os.PRIO_PROCESS, t.pid)
    s = spawn(SCHEDULER)
    assert s.expect() == "ready"
    for line in ("nice %d 9" % ctx, "cpus %d %d" % (ctx, min(was_cpus)), "park %d" % ctx):
        s.send(line)
        assert json.loads(s.expect()) == "ok", line
    assert _stopped(t.pid)
    assert os.getpriority(os.PRIO_PROCESS, t.pid) == 9
    s.kill()
    assert wait_until(lambda: not _stopped(t.pid), "the park to be undone")
    assert wait_until(lambda: os.getpriority(os.PRIO_PROCESS, t.pid) == was_nice,
                      "the nice value to be undone")
    assert os.sched_getaffinity(t.pid) == was_cpus
    t.send("ping")
    assert t.expect() == "pong"
    t.kill()


POLICY = {
    "categories": {
        "core": {"classes": ["SHARE", "DIRECT", "ANON", "COW", "SPECIAL"],
                 "notify_handlers": True},
        "server": {"classes": ["SHARE", "ANON"]},
        "sched": {"classes": ["SHARE", "ANON"], "scheduler": ["$uid"]},
    },
    "rules": [{"uid": 0, "category": "core"}, {"gid": 1, "category": "sched"}],
    "default": "server",
}


@pytest.mark.skipif(os.geteuid() != 0, reason="runs schedulers as uid 65534: needs root")
def test_sched_the_scheduler_right_as_uid_65534(world_faytd, spawn, as_user):
    d = world_faytd(POLICY)
    root_t, root_ctx = _target(spawn, d.env())
    own_t, own_ctx = _target(spawn, d.env(), as_user=as_user, uid=NOBODY)
    plain = spawn(SCHEDULER, d.env(), as_user=as_user, uid=NOBODY, args=[d.socket])
    assert plain.expect() == "ready"
    plain.send("nice %d 3" % own_ctx)               # category server: no scheduler right
    err, msg = json.loads(plain.expect())
    assert err == "EPERM" and "set_nice of context %d: faytd answered EPERM" % own_ctx in msg
    sched = spawn(SCHEDULER, d.env(), as_user=as_user, uid=NOBODY, gid=1, args=[d.socket])
    assert sched.expect() == "ready"
    sched.send("nice %d 3" % own_ctx)               # "$uid": its own uid's context
    assert json.loads(sched.expect()) == "ok"
    assert os.getpriority(os.PRIO_PROCESS, own_t.pid) == 3
    sched.send("park %d" % root_ctx)                # another uid's: EPERM
    assert json.loads(sched.expect())[0] == "EPERM"
    assert not _stopped(root_t.pid)
    assert os.getpriority(os.PRIO_PROCESS, root_t.pid) == 0
    for p in (plain, sched, own_t, root_t):
        p.kill()


@pytest.mark.skipif(os.geteuid() != 0, reason="runs faytd as uid 65534: needs root")
def test_sched_a_faytd_without_privileges_answers_eperm(world_faytd, spawn, as_user):
    # faytd runs as 65534; its owner's contexts are core (the default policy).
    d = world_faytd(as_user=as_user, uid=NOBODY)
    root_t, root_ctx = _target(spawn, dict(d.env(), FAYT_FAYTD_UID=str(NOBODY)))
    own_t, own_ctx = _target(spawn, d.env(), as_user=as_user, uid=NOBODY)
    s = spawn(SCHEDULER, d.env(), as_user=as_user, uid=NOBODY, args=[d.socket])
    assert s.expect() == "ready"
    s.send("nice %d 5" % own_ctx)                   # lowering the priority: allowed
    assert json.loads(s.expect()) == "ok"
    s.send("nice %d -5" % own_ctx)                  # raising it: needs CAP_SYS_NICE
    assert json.loads(s.expect())[0] == "EPERM"
    assert os.getpriority(os.PRIO_PROCESS, own_t.pid) == 5
    s.send("park %d" % root_ctx)                    # another uid's process: Linux says no
    assert json.loads(s.expect())[0] == "EPERM"
    s.send("cpus %d 0" % root_ctx)
    assert json.loads(s.expect())[0] == "EPERM"
    assert not _stopped(root_t.pid)
    for p in (s, own_t, root_t):
        p.kill()


def test_sched_faytd_killed_and_restarted_continues_what_it_parked(restartable, spawn):
    # What survives a killed faytd (docs/scheduling.md, Failure): Linux's
    # affinity and nice values stay; the queue and the scheduler's records
    # go; the parks are journaled, so the restarted faytd continues the
    # process the killed one had left stopped.
    d = restartable.start()
    t, ctx = _target(spawn, d.env())
    s = spawn(SCHEDULER, d.env(), args=[d.socket])
    assert s.expect() == "ready"
    for line in ("nice %d 6" % ctx, "park %d" % ctx):
        s.send(line)
        assert json.loads(s.expect()) == "ok", line
    assert _stopped(t.pid)
    with open(os.path.join(restartable.dir, "faytd.journal")) as f:
        assert "P %d " % t.pid in f.read()
    restartable.kill()
    assert _stopped(t.pid)                          # no one continued it meanwhile
    s.send("nice %d 7" % ctx)                       # the queue went with the old faytd
    assert json.loads(s.expect())[0] in ("EPIPE", "ECONNRESET", "EPROTO")
    d = restartable.start()
    assert wait_until(lambda: not _stopped(t.pid), "the restarted faytd to continue it")
    assert "continued pid %d, which the killed faytd had parked" % t.pid in d.read_log()
    c = libportal.Connection(d.socket)
    try:
        assert c.stats()["decisions"]["continued_at_restart"] == 1
    finally:
        c.close()
    assert os.getpriority(os.PRIO_PROCESS, t.pid) == 6     # Linux kept it
    t.send("ping")
    assert t.expect() == "pong"
    for p in (s, t):
        p.kill()


def test_sched_a_wake_is_journaled_and_not_replayed(restartable, spawn):
    d = restartable.start()
    t, ctx = _target(spawn, d.env())
    s = libportal.Connection(d.socket)
    try:
        sched = libportal.Scheduler(connection=s)
        sched.park(ctx)
        sched.wake(ctx)
        os.kill(t.pid, signal.SIGSTOP)              # stopped by someone else, not faytd
        sched.close()
    finally:
        s.close()
    restartable.kill()
    d = restartable.start()
    c = libportal.Connection(d.socket)
    try:
        assert c.stats()["decisions"]["continued_at_restart"] == 0
    finally:
        c.close()
    assert _stopped(t.pid)                          # not faytd's: left as it is
    os.kill(t.pid, signal.SIGCONT)
    t.send("ping")
    assert t.expect() == "pong"
    t.kill()
