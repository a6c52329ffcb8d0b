"""Fault injection (faytd/injection.py, libportal/src/inject.c, docs/testing.md):
each kind against real processes and a real faytd; determinism (the same
seed and workload fire at the same events); the rights, as uid 65534;
and the reference uses: servers/metadata.py killed inside its lock loses
no job, the notify pair loses nothing under dropped doorbells."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import libportal
from faytd import testing as T
from faytd.injection import fires
from libportal._abi import _fastpath, lib
from support.children import wait_until

NOBODY = 65534
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TARGET = """
lp.install_handler(3, lambda p, i, s: len(p))
print(lp.connection().context_id, flush=True)
_end = time.monotonic() + 60
while time.monotonic() < _end and not select.select([sys.stdin], [], [], 0)[0]:
    lp.notification_wait(0.1)
"""

LOCKER = """
sp = lp.share_create(sys.argv[1], 4096)
print(lp.connection().context_id, flush=True)
sys.stdin.readline()
for i in range(10):
    sp.lock()
    sp.unlock()
    print(i, flush=True)
sp.destroy()
print("done", flush=True)
"""

CHAIN = """
srv = lp.chain_join(sys.argv[1])
print("joined", flush=True)
srv.serve(lambda req: req.supply(b"x" * 4096),
          stop=lambda: select.select([sys.stdin], [], [], 0)[0])
"""

CLIENT = """
import faulthandler
faulthandler.disable()              # a SIGBUS is what the test waits for
sp = lp.portal(lp.SPECIAL, lp.PROT_READ, 65536, chain=sys.argv[1], message=b"m")
assert sp.read(0, 1) == b"x"
print("read", flush=True)
sys.stdin.readline()
sp.read(8192, 1)
print("read again", flush=True)
sys.stdin.read()
"""


def exit_status(child, timeout=30):
    """child's exit status, once it exited by itself (bounded)."""
    wait_until(lambda: child.proc.poll() is not None, "the child to exit", timeout)
    return child.kill()


@pytest.fixture
def conn(faytd):
    c = libportal.Connection(faytd.socket)
    yield c
    try:
        T.remove_faults(connection=c)
    finally:
        c.close()


# -- system calls -------------------------------------------------------------------------

def test_inject_fail_call_fails_the_chosen_calls_with_the_errno(conn):
    me = conn.context_id
    f = T.fail_call(me, "list_share", errno="EACCES", connection=conn, after=1, count=2)
    got = []
    for _ in range(4):
        try:
            conn.list_sharepoints()
            got.append(0)
        except OSError as e:
            got.append(e.errno)
            assert "a fault injected by rule %d" % f.id in str(e)
    assert got == [0, errno.EACCES, errno.EACCES, 0]
    info = f.info()
    assert (info["events"], info["fired"], info["op"], info["errno"]) == (4, 2, "list_share",
                                                                          "EACCES")


def test_inject_fail_call_reaches_the_calls_faytds_c_serves(conn):
    """PORTAL(SHARE|ANON) is served by faytd's C fast path: a context a rule
    names has its calls go to Python, so the rule sees them; nothing is made."""
    before = conn.stats()["calls"]["portal"]
    with T.fail_call(conn.context_id, "portal", errno=errno.ENOSPC, connection=conn):
        with pytest.raises(OSError) as e:
            libportal.share_create("inject.fast", 4096, connection=conn)
        assert e.value.errno == errno.ENOSPC
        assert "inject.fast" not in [s["identifier"] for s in conn.list_sharepoints()]
    after = conn.stats()["calls"]["portal"]
    assert after["python"] == before["python"] + 1 and after["fast"] == before["fast"]
    for _ in range(2):      # the rule gone, C serves them again (the first may teach it the tid)
        libportal.share_create("inject.fast", 4096, connection=conn).destroy()
    assert conn.stats()["calls"]["portal"]["fast"] > after["fast"]


def test_inject_delay_call_performs_the_call_late(conn):
    with T.delay_call(conn.context_id, "stats", 300, connection=conn, count=1) as f:
        t = time.monotonic()
        s = conn.stats()
        assert time.monotonic() - t >= 0.3
        assert s["injected"]["by_kind"]["delay"] >= 1
        assert f.fired == 1


def test_inject_bad_rules_get_einval_naming_the_field(conn):
    me = conn.context_id
    cases = [
        ({"kind": "explode", "context": me}, "kind: 'explode' is not one of"),
        ({"kind": "fail", "context": me, "op": "nosuchcall"}, "op: 'nosuchcall'"),
        ({"kind": "fail", "context": me, "op": "stats", "errno": "ENOTANERRNO"},
         "errno: 'ENOTANERRNO'"),
        ({"kind": "fail", "context": me, "op": "stats", "probability": 2},
         "probability: 2"),
        ({"kind": "fail", "context": me, "pid": 1, "op": "stats"},
         "give exactly one of context, pid and name"),
        ({"kind": "fail", "context": me, "op": "stats", "when": 1}, "unknown field"),
        ({"kind": "delay", "context": me, "op": "unmap", "delay_ms": 5},
         "op: unmap may be sent without waiting"),
        ({"kind": "kill-handler", "context": me, "slot": 64}, "slot: 64 is outside"),
    ]
    for spec, message in cases:
        with pytest.raises(OSError) as e:
            conn.call(lib.FAYT_SYS_INJECT_ADD, json.dumps(spec).encode())
        assert e.value.errno == errno.EINVAL and message in str(e.value), (spec, e.value)
    for raw in (b"", b"\xff\xfe", b"[1, 2]", b"{\"kind\": ", b"[" * 30000):
        with pytest.raises(OSError) as e:
            conn.call(lib.FAYT_SYS_INJECT_ADD, raw)
        assert e.value.errno == errno.EINVAL and "the body is not a JSON object" \
            in str(e.value)
    with pytest.raises(OSError) as e:
        T.fail_call(0x7ffffff0, "stats", connection=conn)
    assert e.value.errno == errno.ESRCH
    with pytest.raises(OSError) as e:
        T.kill_at_lock(me, "inject.none", connection=conn)
    assert e.value.errno == errno.ENOENT and "no share-point 'inject.none'" in str(e.value)
    with pytest.raises(OSError) as e:
        conn.call(lib.FAYT_SYS_INJECT_REMOVE, b"\x01")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        conn.call(lib.FAYT_SYS_INJECT_LIST, b"x")
    assert e.value.errno == errno.EINVAL and "takes no body" in str(e.value)
    with pytest.raises(OSError) as e:
        T.Fault(12345, {}, conn).remove()
    assert e.value.errno == errno.ENOENT
    assert T.injected(connection=conn)["rules"] == []


# -- determinism -----------------------------------------------------------------------

def _outcomes(conn, seed, n=40):
    f = T.fail_call(conn.context_id, "list_contexts", connection=conn, probability=0.5,
                    seed=seed)
    got = []
    for _ in range(n):
        try:
            conn.call(lib.FAYT_SYS_LIST_CONTEXTS)
            got.append(0)
        except OSError:
            got.append(1)
    f.remove()
    return got


def test_inject_the_same_seed_fires_at_the_same_events(conn):
    a, b, c = _outcomes(conn, 7), _outcomes(conn, 7), _outcomes(conn, 8)
    assert a == b
    assert a != c
    assert 0 < sum(a) < len(a)
    # The rule, written down: event n fires iff splitmix64(seed + n) % 10**6 < p * 10**6.
    assert a == [int(fires(n, 0, 0, 0, 500000, 7)) for n in range(len(a))]


def test_inject_libportal_draws_as_faytd_does(conn):
    """libportal's decision (inject.c) and faytd's (injection.py) are the same
    function of (after, count, probability, seed, event), so a page rule is
    as deterministic as a system-call rule."""
    with T.drop_doorbells(conn.context_id, connection=conn, probability=0.3, seed=99,
                          after=5, count=6) as f:
        page, kind = conn.context_page, lib.FAYT_INJECT_DOORBELL_DROP
        got = [_fastpath.inject_fires(page, kind, 0, False) for _ in range(60)]
        want, fired = [], 0
        for n in range(60):
            x = fires(n, 5, 6, fired, 300000, 99)
            fired += x
            want.append(x)
        assert got == want and sum(got) == 6
        assert f.info()["fired"] == 6          # faytd read the counts back


LOOPER = """
sp = lp.share_create(sys.argv[1], 4096)
print(lp.connection().context_id, flush=True)
sys.stdin.readline()
for i in range(300):
    sp.lock()
    print(i, flush=True)
    sp.unlock()
print("done", flush=True)
sp.destroy()
"""


def _killed_at(spawn, conn, seed):
    """The lock take (0, 1, ...) at which a kill-lock rule with
    probability 0.05 and `seed` kills a process taking the lock 300 times."""
    name = "inject.det.%d.%d" % (os.getpid(), seed)
    c = spawn(LOOPER, args=[name])
    cid = int(c.expect())
    T.kill_at_lock(cid, name, connection=conn, probability=0.05, seed=seed)
    c.send("go")
    last = None
    while True:
        try:
            line = c.expect()
        except AssertionError:          # it exited (killed) before the next line
            break
        if line == "done":
            break
        last = int(line)
    assert exit_status(c) == -signal.SIGKILL
    return 0 if last is None else last + 1     # it died at the take after its last line


def test_inject_a_kill_lands_on_the_same_lock_take_for_the_same_seed(spawn, conn):
    """End to end, in another process: the kill lands on the lock take the
    rule's draw names, run after run (events, not time)."""
    want = next(n for n in range(300) if fires(n, 0, 1, 0, 50000, 11))
    assert _killed_at(spawn, conn, 11) == want
    assert _killed_at(spawn, conn, 11) == want
    other = next(n for n in range(300) if fires(n, 0, 1, 0, 50000, 12))
    assert other != want
    assert _killed_at(spawn, conn, 12) == other


# -- kills at named points ---------------------------------------------------------------

def test_inject_kill_at_lock_dies_holding_it_and_the_next_locker_is_told(conn, spawn,
                                                                         faytd):
    name = "inject.lock.%d" % os.getpid()
    c = spawn(LOCKER, args=[name])
    cid = int(c.expect())
    sp = libportal.share_attach(name, connection=conn)   # it outlives its owner
    try:
        f = T.kill_at_lock(cid, name, connection=conn, after=3)
        c.send("go")
        assert [c.expect() for _ in range(3)] == ["0", "1", "2"]
        assert exit_status(c) == -signal.SIGKILL
        assert sp.lock(timeout=10) == errno.EOWNERDEAD     # faytd released it, owner died
        sp.mark_consistent()
        sp.unlock()
    finally:
        sp.destroy()
    info = f.info()
    assert info["fired"] == 1 and not info["active"] and "gone" in info["ended"]
    log = T.injected(connection=conn)["log"]
    assert any(e["rule"] == f.id and "killed holding share-point" in e["what"] for e in log)


def test_inject_kill_in_handler_and_after_n_notifications(conn, spawn):
    t = spawn(TARGET)
    tid = int(t.expect())
    T.kill_in_handler(tid, 3, connection=conn, after=2)
    for _ in range(2):
        assert libportal.notify(tid, 3, b"abc", wait_return=True, timeout=10,
                                connection=conn) == 3
    with pytest.raises(OSError) as e:
        libportal.notify(tid, 3, b"abc", wait_return=True, timeout=10, connection=conn)
    assert e.value.errno in (errno.ESRCH, errno.EPIPE, errno.ECONNRESET), e.value
    assert exit_status(t) == -signal.SIGKILL

    t2 = spawn(TARGET)
    tid2 = int(t2.expect())
    f = T.kill_after(tid2, 4, connection=conn)
    for _ in range(4):
        assert libportal.notify(tid2, 3, b"ab", wait_return=True, timeout=10,
                                connection=conn) == 2
    with pytest.raises(OSError):
        libportal.notify(tid2, 3, b"ab", wait_return=True, timeout=10, connection=conn)
    assert exit_status(t2) == -signal.SIGKILL
    assert f.info()["fired"] == 1
    whats = [e["what"] for e in T.injected(connection=conn)["log"]]
    assert "killed at the entry of its handler of slot 3" in whats
    assert "killed after 4 notifications" in whats


# -- chains --------------------------------------------------------------------------

def test_inject_fail_page_gives_the_client_sigbus_and_slow_chain_holds_it(conn, spawn):
    chain = "inject.chain.%d" % os.getpid()
    srv = spawn(CHAIN, args=[chain])
    assert srv.expect() == "joined"
    cl = spawn(CLIENT, args=[chain])
    assert cl.expect() == "read"
    f = T.fail_pages(chain, errno="EIO", connection=conn, count=1)
    cl.send("go")
    assert exit_status(cl) == -signal.SIGBUS
    assert f.info()["fired"] == 1
    f.remove()
    with T.slow_chain(chain, 300, connection=conn) as slow:
        cl2 = spawn(CLIENT, args=[chain])
        t = time.monotonic()
        assert cl2.expect() == "read"
        assert time.monotonic() - t >= 0.3
        assert slow.info()["fired"] == 1
    cl2.kill()
    srv.send("stop")
    srv.kill()
    assert T.injected(connection=conn)["counts"]["by_kind"]["fail-page"] >= 1


# -- doorbells and the notify pair --------------------------------------------------------

NOTIFY_CLIENT = """
sys.path.insert(0, sys.argv[2])
from servers import notify_pair
print(lp.connection().context_id, flush=True)
sys.stdin.readline()
sys.exit(notify_pair.client(int(sys.argv[1]), 20))
"""


def test_inject_notify_pair_loses_nothing_under_dropped_doorbells(conn, spawn, faytd):
    srv = spawn("sys.path.insert(0, %r)\nfrom servers import notify_pair\n"
                "sys.exit(notify_pair.serve(0))" % ROOT)
    m = re.match(r"\[server\] context (\d+) serving", srv.expect())
    assert m
    cl = spawn(NOTIFY_CLIENT, args=[m.group(1), ROOT])
    cid = int(cl.expect())
    f = T.drop_doorbells(cid, connection=conn, probability=0.5, seed=3)
    cl.send("go")
    out = cl.finish(timeout=60)         # exit 0: every ADD came back right
    assert any("20 ADD calls with the return flag: all right" in line for line in out), out
    assert out[-1] == "[client] done: ok", out
    drops = [e for e in T.injected(connection=conn)["log"] if e["rule"] == f.id]
    assert drops and all(e["what"] == "a doorbell dropped" for e in drops)
    assert f.info()["fired"] == len(drops) > 0
    srv.proc.send_signal(signal.SIGTERM)
    assert exit_status(srv) == 0


def test_inject_delay_doorbell_delays_the_post(conn, spawn):
    t = spawn(TARGET)
    tid = int(t.expect())
    with T.delay_doorbells(conn.context_id, 200, connection=conn, count=1) as f:
        start = time.monotonic()
        assert libportal.notify(tid, 3, b"x", wait_return=True, timeout=10,
                                connection=conn) == 1
        assert time.monotonic() - start >= 0.2
        assert f.fired == 1


# -- rights ------------------------------------------------------------------------------

RIGHTS = """
from faytd import testing as T
me = lp.connection().context_id
out = {}
for what, call in (("root", lambda: T.fail_call(int(sys.argv[1]), "stats")),
                   ("own", lambda: T.fail_call(me, "stats", count=1)),
                   ("chain", lambda: T.fail_pages("nosuch"))):
    try:
        call()
        out[what] = 0
    except OSError as e:
        out[what] = e.errno
try:
    lp.connection().stats()
    out["own_fired"] = 0
except OSError as e:
    out["own_fired"] = e.errno
out["seen"] = [r["context"] for r in T.injected()["rules"]]
print(json.dumps(out), flush=True)
sys.stdin.readline()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a client as uid 65534: needs root")
def test_inject_uid_65534_may_break_only_its_own_contexts(world_faytd, spawn, as_user,
                                                         conn_to):
    d = world_faytd()
    root = conn_to(d)
    rule = T.fail_call(root.context_id, "lookup", connection=root)    # root's own rule
    c = spawn(RIGHTS, {"FAYT_SOCKET": d.socket}, as_user=as_user, uid=NOBODY,
              args=[root.context_id])
    out = json.loads(c.expect())
    assert out["root"] == errno.EPERM
    assert out["own"] == 0 and out["own_fired"] == errno.EIO
    assert out["chain"] == errno.EPERM
    assert root.context_id not in out["seen"]       # root's rule is not shown to it
    c.send("")
    c.finish()
    rule.remove()


# -- the metadata server killed inside its lock ------------------------------------------

METADATA = """
sys.path.insert(0, sys.argv[1])
from servers import metadata
print(lp.connection().context_id, flush=True)
sys.stdin.readline()
sys.exit(metadata.main(sys.argv[2:]))
"""


def _metadata_run(spawn, conn, share, after):
    """Instance A runs on; instance B is killed at its lock take number
    `after` (0: registering, then one per job: the commit that takes its
    ticket); A then repairs and deregisters last.  (A's output, B's
    exit status.)"""
    args = ["--share", share, "--interval", "0.01", "--report", "1000"]
    a = subprocess.Popen([sys.executable, "-m", "servers.metadata", "--name", "A"] + args,
                         cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ))
    try:
        assert "created share-point %r" % share in a.stdout.readline()
        b = spawn(METADATA, args=[ROOT, "--name", "B"] + args)
        bid = int(b.expect())
        f = T.kill_at_lock(bid, share, connection=conn, after=after)
        b.send("go")
        status = exit_status(b)
        assert f.info()["fired"] == 1
        time.sleep(0.3)         # A takes the lock again: EOWNERDEAD, repair
        a.send_signal(signal.SIGTERM)
        out, _ = a.communicate(timeout=30)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert a.returncode == 0, out
    return out, status


def test_inject_metadata_killed_inside_its_lock_loses_no_job(spawn, conn):
    """B dies holding the lock it took for its third job (its lock take 3:
    register, commit 1, commit 2, commit 3): A gets EOWNERDEAD, repairs,
    and at the end every ticket issued is a job done."""
    share = "inject.meta.%d" % os.getpid()
    out, status = _metadata_run(spawn, conn, share, after=3)
    assert status == -signal.SIGKILL
    assert "EOWNERDEAD" in out or "OwnerDied" in out, out
    assert "is dead: retiring its 2 jobs" in out, out
    m = re.search(r"last one out: tickets issued (\d+), jobs done (\d+), recoveries 1: "
                  r"no job lost or counted twice", out)
    assert m and int(m.group(1)) == int(m.group(2)), out


def test_inject_metadata_killed_at_a_commits_lock_take_loses_no_ticket(spawn, conn):
    """This injection's finding: metadata.py took a job's ticket with the
    fused sp.add() before the commit's lock, so an instance killed at that
    lock take left a ticket no job records (tickets issued N+1, jobs done
    N).  The ticket is taken inside the commit now, and the repair takes a
    half-done commit's ticket back."""
    share = "inject.meta.c.%d" % os.getpid()
    out, status = _metadata_run(spawn, conn, share, after=2)
    assert status == -signal.SIGKILL
    assert "is dead: retiring its 1 jobs" in out, out
    assert "no job lost or counted twice" in out, out


# -- fayt inject -------------------------------------------------------------------------

PUBLISHED = """
lp.publish(sys.argv[1])
print(lp.connection().context_id, flush=True)
for line in sys.stdin:
    try:
        lp.connection().stats()
        print("ok", flush=True)
    except OSError as e:
        print(errno.errorcode[e.errno], flush=True)
"""


def fayt(*args, env):
    return subprocess.run([sys.executable, "-m", "faytd.cli", "inject"] + list(args), env=env,
                          capture_output=True, text=True, timeout=60)


def test_inject_cli_adds_lists_and_removes_rules_by_published_name(spawn, faytd):
    name = "inject.cli.%d" % os.getpid()
    c = spawn(PUBLISHED, args=[name])
    cid = int(c.expect())
    r = fayt("fail", name, "stats", "--errno", "EPERM", "--after", "1", "--count", "1",
             env=faytd.env())
    assert r.returncode == 0, r.stderr
    rid = int(re.match(r"rule (\d+)$", r.stdout.strip()).group(1))
    got = []
    for _ in range(3):
        c.send("")
        got.append(c.expect())
    assert got == ["ok", "EPERM", "ok"]
    r = fayt("ls", "--json", env=faytd.env())
    (rule,) = [x for x in json.loads(r.stdout)["rules"] if x["id"] == rid]
    assert (rule["context"], rule["fired"], rule["events"]) == (cid, 1, 3)
    r = fayt("ls", env=faytd.env())
    assert "stats failed with EPERM" in r.stdout and "fail" in r.stdout, r.stdout
    assert fayt("rm", str(rid), env=faytd.env()).returncode == 0
    r = fayt("rm", str(rid), env=faytd.env())
    assert r.returncode == 1 and "rule %d: no such rule" % rid in r.stderr
    r = fayt("kill-handler", "pid:1", "3", env=faytd.env())
    assert r.returncode == 1 and "pid: no connected context with pid 1" in r.stderr
    r = fayt("delay", name, "stats", "soon", env=faytd.env())
    assert r.returncode == 2 and "DELAY_MS: 'soon' is not a number" in r.stderr
    c.kill()


def test_inject_a_context_scribbling_its_counts_misleads_only_itself(conn):
    """libportal's counts are the context's own words: a context that
    writes any value there gets bounded counts back, and faytd answers at
    once (nothing faytd does is proportional to what it read)."""
    from libportal._abi import ffi
    f = T.drop_doorbells(conn.context_id, connection=conn, count=5)
    page = ffi.cast("struct fayt_context_page *", conn.context_page)
    i = lib.FAYT_INJECT_DOORBELL_DROP.bit_length() - 1
    page.injected.seq = page.inject.seq
    page.injected.events[i] = 2 ** 64 - 1
    page.injected.fired[i] = 2 ** 64 - 1
    t = time.monotonic()
    info = f.info()
    assert time.monotonic() - t < 10        # a hang guard only
    assert info["fired"] == 5               # bounded by the rule's count
    f.remove()
    g = T.drop_doorbells(conn.context_id, connection=conn)        # no count: no bound
    page.injected.seq = page.inject.seq
    page.injected.events[i] = 2 ** 64 - 1
    page.injected.fired[i] = 2 ** 64 - 1
    r = T.injected(connection=conn)
    assert [x for x in r["rules"] if x["id"] == g.id][0]["fired"] == 2 ** 64 - 1
    assert len(r["log"]) <= 256
    assert conn.stats()["injected"]["total"] >= 2 ** 64 - 1
