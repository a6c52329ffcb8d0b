"""Scheduling events (faytd/schedevents.py, libportal/sched.py subscribe,
docs/scheduling.md "Events"): created, died, blocked and woke, from the
context page's wait record, batched on faytd's timer; the rights (uid
65534); a context that scribbles on its own wait record."""
import json
import os
import time

import pytest

from libportal.sched import CREATED, DIED, BLOCKED, WOKE
from support.children import WAIT, wait_until

NOBODY = 65534

# A scheduler process: subscribes, prints every event as a JSON line.
SCHEDULER = """
c = lp.Connection(sys.argv[1]) if len(sys.argv) > 1 else lp.connection()
s = lp.Scheduler(connection=c)
def on(ev):
    print(json.dumps(ev._asdict()))
try:
    s.subscribe(on)
except OSError as e:
    print(json.dumps([errno.errorcode[e.errno], str(e)]))
    sys.exit(0)
print(json.dumps("ready"))
while True:
    lp.notification_wait(1.0, connection=c)
"""

# A target: prints its context id; "wait S" sleeps S seconds in
# notification_wait (a libportal wait), "lock"/"unlock" a share-point lock
# another target contends for, "scribble" writes nonsense in its wait record.
TARGET = """
from libportal._abi import ffi
c = lp.connection()
print(c.context_id)
page = ffi.cast("struct fayt_context_page *", c.context_page)
sp = None
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "wait":
        lp.notification_wait(float(cmd[1]))
        print("waited")
    elif cmd[0] == "lock":
        sp = lp.share_attach(cmd[1]) if len(cmd) > 2 else lp.share_create(cmd[1], 4096)
        print("locking")
        sp.lock()
        print("locked")
    elif cmd[0] == "unlock":
        sp.unlock()
        print("unlocked")
    elif cmd[0] == "scribble":
        page.waits.blocks = page.waits.wakes + 1000000
        print("scribbled")
"""


class Events:
    """The events a scheduler child printed, read as they come."""

    def __init__(self, child):
        self.child, self.seen = child, []

    def until(self, pred, what):
        for ev in self.seen:
            if pred(ev):
                return ev
        deadline = time.monotonic() + WAIT
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "no %s event within %.0fs; got %s" % (what, WAIT, self.seen[-20:])
            line = self.child.expect(timeout=left)
            ev = json.loads(line)
            self.seen.append(ev)
            if pred(ev):
                return ev

    def about(self, ctx):
        return [e for e in self.seen if e["context"] == ctx]


def _scheduler(spawn, env=None, **kw):
    """A scheduler child, its Events (the CREATED of the contexts there are
    may come before "ready": its handler runs during the subscribe call),
    and "ready" or [errno name, message]."""
    s = spawn(SCHEDULER, env, **kw)
    ev = Events(s)
    while True:
        first = json.loads(s.expect())
        if not isinstance(first, dict):
            return s, ev, first
        ev.seen.append(first)


def test_schedevents_created_blocked_woke_died(lp, spawn):
    s, ev, ready = _scheduler(spawn)
    assert ready == "ready"
    t = spawn(TARGET)
    ctx = int(t.expect())
    created = ev.until(lambda e: e["event"] == CREATED and e["context"] == ctx, "CREATED")
    assert created["pid"] == t.pid and created["uid"] == os.getuid()
    t.send("wait 0.5")
    b = ev.until(lambda e: e["event"] == BLOCKED and e["context"] == ctx, "BLOCKED")
    assert b["waiting"] == 1 and b["blocks"] >= 1 and b["pid"] == t.pid
    assert t.expect() == "waited"
    w = ev.until(lambda e: e["event"] == WOKE and e["context"] == ctx, "WOKE")
    assert w["waiting"] == 0 and w["wakes"] >= 1 and w["seen_ns"] > b["seen_ns"]
    t.kill()
    ev.until(lambda e: e["event"] == DIED and e["context"] == ctx, "DIED")
    # Never an event about the scheduler itself (its own waits).
    sched_ctx = {e["context"] for e in ev.seen if e["pid"] == s.pid}
    assert not sched_ctx
    s.kill()


def test_schedevents_a_contended_lock_is_a_block(lp, spawn):
    s, ev, ready = _scheduler(spawn)
    assert ready == "ready"
    holder = spawn(TARGET)
    int(holder.expect())
    waiter = spawn(TARGET)
    wctx = int(waiter.expect())
    holder.send("lock schedev.contend")
    assert holder.expect() == "locking" and holder.expect() == "locked"
    waiter.send("lock schedev.contend attach")
    assert waiter.expect() == "locking"
    b = ev.until(lambda e: e["event"] == BLOCKED and e["context"] == wctx, "BLOCKED")
    assert b["waiting"] == 1
    holder.send("unlock")
    assert holder.expect() == "unlocked"
    assert waiter.expect() == "locked"
    ev.until(lambda e: e["event"] == WOKE and e["context"] == wctx, "WOKE")
    waiter.send("unlock")
    assert waiter.expect() == "unlocked"
    for p in (holder, waiter, s):
        p.kill()


def test_schedevents_a_scribbled_wait_record_is_not_believed(lp, spawn):
    c = lp.connection()
    s, ev, ready = _scheduler(spawn)
    assert ready == "ready"
    t = spawn(TARGET)
    ctx = int(t.expect())
    ev.until(lambda e: e["event"] == CREATED and e["context"] == ctx, "CREATED")
    before = c.stats()["decisions"]["bad_wait_records"]
    t.send("scribble")
    assert t.expect() == "scribbled"
    # faytd counts the reading it did not believe, reports nothing of it,
    # and goes on: the next real wait is an event again.
    assert wait_until(lambda: c.stats()["decisions"]["bad_wait_records"] > before,
                      "faytd to refuse the record")
    t.send("wait 0.3")
    assert t.expect() == "waited"
    t.kill()
    ev.until(lambda e: e["event"] == DIED and e["context"] == ctx, "DIED")
    assert all(e["waiting"] <= 4096 for e in ev.about(ctx))
    s.kill()


def test_schedevents_subscribe_needs_the_rights(lp, spawn):
    # The session faytd's default policy: a core context may; the call's
    # arguments are checked.
    sched = lp.Scheduler()
    try:
        with pytest.raises(lp.InvalidArgument) as e:
            sched.subscribe(lambda ev: None, index=64)
        assert "index: 64 is not a notification slot" in str(e.value)
    finally:
        sched.close()


POLICY = {
    "categories": {
        "core": {"classes": ["SHARE", "DIRECT", "ANON", "COW", "SPECIAL"],
                 "notify_handlers": True},
        "server": {"classes": ["SHARE", "ANON"]},
        "sched": {"classes": ["SHARE", "ANON"], "scheduler": ["$uid"],
                  "notify_handlers": True},
    },
    "rules": [{"uid": 0, "category": "core"}, {"gid": 1, "category": "sched"}],
    "default": "server",
}


@pytest.mark.skipif(os.geteuid() != 0, reason="runs schedulers as uid 65534: needs root")
def test_schedevents_a_uid_65534_scheduler_sees_only_what_its_right_names(
        world_faytd, spawn, as_user):
    d = world_faytd(POLICY)
    plain, _, first = _scheduler(spawn, d.env(), as_user=as_user, uid=NOBODY, args=[d.socket])
    assert first[0] == "EPERM"                  # category server: neither right
    s, ev, ready = _scheduler(spawn, d.env(), as_user=as_user, uid=NOBODY, gid=1,
                              args=[d.socket])
    assert ready == "ready"
    root_t = spawn(TARGET, d.env())
    root_ctx = int(root_t.expect())
    own_t = spawn(TARGET, d.env(), as_user=as_user, uid=NOBODY)
    own_ctx = int(own_t.expect())
    root_t.send("wait 0.3")
    assert root_t.expect() == "waited"
    own_t.send("wait 0.3")
    ev.until(lambda e: e["event"] == BLOCKED and e["context"] == own_ctx, "own BLOCKED")
    assert own_t.expect() == "waited"
    ev.until(lambda e: e["event"] == WOKE and e["context"] == own_ctx, "own WOKE")
    root_t.kill()
    own_t.kill()
    ev.until(lambda e: e["event"] == DIED and e["context"] == own_ctx, "own DIED")
    assert not ev.about(root_ctx), "events about another uid's context"
    for p in (plain, s):
        p.kill()


def test_schedevents_subscribe_bad_bodies_from_raw_bytes(lp):
    # SCHED_SUBSCRIBE (op 50) as an attacker sends it: every bad body is
    # EINVAL naming what was wrong, and nothing is subscribed.
    import errno
    import struct
    from libportal._abi import lib
    c = lp.Connection()
    try:
        before = c.stats()["decisions"]["subscribers"]
        for body, what in ((b"", "expected 8 bytes, got 0"),
                           (b"\0" * 9, "expected 8 bytes, got 9"),
                           (struct.pack("<iI", 1, 2), "flags: unknown bits 0x2"),
                           (struct.pack("<iI", 64, 0), "index: 64 is not a notification slot"),
                           (struct.pack("<iI", 1 << 30, 0), "is not a notification slot")):
            with pytest.raises(OSError) as e:
                c.call(lib.FAYT_SYS_SCHED_SUBSCRIBE, body)
            assert e.value.errno == errno.EINVAL and what in str(e.value), (body, e.value)
        assert c.stats()["decisions"]["subscribers"] == before
        c.call(lib.FAYT_SYS_SCHED_SUBSCRIBE, struct.pack("<iI", -1, 0))   # none: nothing to do
    finally:
        c.close()


def test_schedevents_close_unsubscribes(lp):
    c = lp.Connection()
    try:
        before = c.stats()["decisions"]["subscribers"]
        s = lp.Scheduler(connection=c)
        s.subscribe(lambda ev: None)
        assert c.stats()["decisions"]["subscribers"] == before + 1
        s.close()
        assert c.stats()["decisions"]["subscribers"] == before
    finally:
        c.close()


SLOW_HANDLER = """
def h(p, i, s):
    time.sleep(0.5)
    return 7
lp.install_handler(1, h)
print(lp.connection().context_id)
while True:
    lp.notification_wait(1.0)
"""

CALLER = """
target = int(sys.argv[1])
print(lp.connection().context_id)
sys.stdin.readline()
print(lp.notify(target, 1, b"x", wait_return=True, timeout=30))
sys.stdin.readline()
"""


def test_schedevents_a_sender_waiting_for_a_return_is_a_block(lp, spawn):
    s, ev, ready = _scheduler(spawn)
    assert ready == "ready"
    srv = spawn(SLOW_HANDLER)
    sid = int(srv.expect())
    caller = spawn(CALLER, args=[sid])
    cid = int(caller.expect())
    caller.send("go")
    b = ev.until(lambda e: e["event"] == BLOCKED and e["context"] == cid, "caller BLOCKED")
    assert b["waiting"] == 1
    assert caller.expect() == "7"
    ev.until(lambda e: e["event"] == WOKE and e["context"] == cid, "caller WOKE")
    for p in (caller, srv, s):
        p.kill()
