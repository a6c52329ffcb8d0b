"""The timeline trace (faytd/trace.py, docs/tracing.md): a trace of the
demo, start and stop through the CLI and `faytd --trace`, the rights as
uid 65534, bad requests, an injected fault, and a client that scribbles
raw bytes over its own trace area while an honest pair is traced."""
import errno
import json
import os
import subprocess
import sys

import pytest

import libportal
from faytd import testing as T
from faytd.tools import info
from libportal._abi import lib
from support.daemon import faytd_refuses

NOBODY = 65534
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALLS = 40


def fayt(*args, env):
    return subprocess.run([sys.executable, "-m", "faytd.cli"] + list(args), env=env,
                          capture_output=True, text=True, timeout=60)


def start(conn, path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        conn.call(lib.FAYT_SYS_TRACE_START, b"", send_fds=[fd])
    finally:
        os.close(fd)


def stop(conn):
    return json.loads(conn.call(lib.FAYT_SYS_TRACE_STOP)[0])


def load(path):
    with open(path) as f:
        return json.load(f)["traceEvents"]


def tracks(events):
    """pid -> the names its track was given, " | "-joined (a track is
    renamed when its context publishes or listens under a name)."""
    out = {}
    for e in events:
        if e["ph"] == "M" and e["name"] == "process_name":
            out[e["pid"]] = out[e["pid"]] + " | " + e["args"]["name"] if e["pid"] in out \
                else e["args"]["name"]
    return out


def pid_of(events, label):
    got = [pid for pid, name in tracks(events).items() if label in name]
    assert got, (label, tracks(events))
    return got[0]


def flows(events, prefix):
    """id -> {"s": event, "f": event} of the flows whose id starts with prefix."""
    out = {}
    for e in events:
        if e["ph"] in "sf" and str(e.get("id", "")).startswith(prefix):
            out.setdefault(e["id"], {})[e["ph"]] = e
    return out


def returned_calls(events, sender_pid, target_pid):
    """The notifications posted by sender_pid, handled in target_pid and
    returned to sender_pid: each with its post flow and return flow whole."""
    posts, rets = flows(events, "n."), flows(events, "r.")
    out = []
    for fid, f in posts.items():
        if f.get("s", {}).get("pid") != sender_pid or f.get("f", {}).get("pid") != target_pid:
            continue
        r = rets.get("r." + fid[2:], {})
        if r.get("s", {}).get("pid") == target_pid and r.get("f", {}).get("pid") == sender_pid:
            out.append(fid)
    return out


# -- the demo, traced ----------------------------------------------------------

def test_trace_of_the_demo_holds_flows_a_chain_answer_and_a_recovery(tmp_path):
    path = str(tmp_path / "demo.json")
    env = dict(os.environ)
    env.pop("FAYT_SOCKET", None)
    r = subprocess.run([sys.executable, "-m", "servers.demo", "--trace", path], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    with open(path) as f:
        doc = json.load(f)          # completed when the demo's faytd stopped
    assert doc["displayTimeUnit"] == "ns"
    ev = doc["traceEvents"]
    names = tracks(ev)
    assert any(n == "faytd" for n in names.values())
    assert any("servers.metadata" in n for n in names.values()), names
    assert any("demo.kv (servers.kv" in n for n in names.values()), names  # a listener's name
    # A notification with the return flag: post -> handler -> return, as flows.
    client, server = pid_of(ev, "servers.notify_pair"), None
    pair = [pid for pid, n in names.items() if "servers.notify_pair" in n]
    assert len(pair) == 2
    for a, b in (pair, pair[::-1]):
        if returned_calls(ev, a, b):
            client, server = a, b
    assert server is not None, "no notification flow with its return"
    handlers = [e for e in ev if e["ph"] == "X" and e["pid"] == server
                and e["name"].startswith("handler slot") and e["args"]["return"]]
    assert handlers and all(e["args"]["depth"] >= 1 and e["dur"] >= 0 for e in handlers)
    assert any(e["ph"] == "X" and e["pid"] == client and e["name"].startswith("call ->")
               for e in ev)
    # A SPECIAL fault answered by a chain server (another process's track).
    faults = [e for e in ev if e["ph"] == "X" and e.get("cat") == "fault"
              and e["name"].startswith("page fault") and e["args"]["answers"]]
    assert faults, "no fault with a chain server's answer"
    assert all(e["args"].get("chain") for e in faults), faults[:2]
    verdicts = {a["verdict"] for e in faults for a in e["args"]["answers"]}
    assert verdicts & {"DATA", "MAPPED"}, verdicts
    answers = [e for e in ev if e["ph"] == "X" and e["name"].startswith("page answer")]
    assert any(e["pid"] != e["args"]["client_pid"] for e in answers)
    assert flows(ev, "fault.") and all(len(f) == 2 for f in flows(ev, "fault.").values())
    # The metadata instance killed holding its lock: faytd's recovery.
    rec = [e for e in ev if e["name"] == "owner-died recovery: demo.jobs"]
    assert rec and rec[0]["args"]["dead_pid"] > 0
    # Share-point create, attach (EEXIST first: a call with its errno) and destroy.
    sp = {e["args"]["what"] for e in ev if e.get("cat") == "sharepoint"
          and e["args"]["share_point"] == "demo.jobs"}
    assert sp == {"create", "attach", "destroy"}, sp
    assert any(e.get("cat") == "syscall" and e["name"] == "portal"
               and e["args"].get("error") == "EEXIST" for e in ev)


# -- start and stop: the CLI, faytd --trace ------------------------------------------

PAIR_TARGET = """
lp.install_handler(5, lambda p, i, s: int.from_bytes(p[:8], "little") + 1)
print(lp.connection().context_id, flush=True)
_end = time.monotonic() + 60
while time.monotonic() < _end and not select.select([sys.stdin], [], [], 0)[0]:
    lp.notification_wait(0.05)
"""

PAIR_SENDER = """
ch = lp.notification_channel(int(sys.argv[1]))
for i in range(int(sys.argv[2])):
    assert ch.call(5, i.to_bytes(8, "little"), timeout=10) == i + 1
print("done", flush=True)
sys.stdin.readline()
"""

HOLDER = """
sp = lp.share_create(sys.argv[1], 4096)
sp.lock()
print("held", flush=True)
sys.stdin.readline()
time.sleep(0.05)
sp.unlock()
sys.stdin.readline()
sp.destroy()
"""

WAITER = """
sp = lp.share_attach(sys.argv[1])
print("waiting", flush=True)
sp.lock()
sp.unlock()
print("took", flush=True)
sys.stdin.readline()
"""


def _pair(spawn, env, calls=CALLS):
    t = spawn(PAIR_TARGET, env)
    tid = int(t.expect())
    s = spawn(PAIR_SENDER, env, args=[tid, calls])
    assert s.expect() == "done"
    return t, s


def _contend(spawn, env, share):
    h = spawn(HOLDER, env, args=[share])
    assert h.expect() == "held"
    w = spawn(WAITER, env, args=[share])
    assert w.expect() == "waiting"
    h.send("")                  # unlocks 50 ms later: the waiter sleeps in the lock
    assert w.expect() == "took"
    return h, w


def test_trace_cli_start_stop_records_calls_notifications_and_lock_waits(fresh_faytd, spawn,
                                                                         tmp_path):
    d = fresh_faytd(clean=True)
    env = d.env()
    path = str(tmp_path / "cli.json")
    r = fayt("trace", "start", path, env=env)
    assert r.returncode == 0 and "tracing into %s" % path in r.stdout, r.stderr
    r = fayt("trace", "start", path, env=env)               # one at a time
    assert r.returncode == 1 and "already runs" in r.stderr, r.stderr
    t, s = _pair(spawn, env)
    h, w = _contend(spawn, env, "trace.cli.%d" % os.getpid())
    r = fayt("trace", "stop", "--json", env=env)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["dropped"] == 0 and summary["lost"] == 0, summary
    ev = load(path)
    assert len(returned_calls(ev, s.proc.pid, t.proc.pid)) == CALLS
    waits = [e for e in ev if e.get("cat") == "lock" and e["pid"] == w.proc.pid]
    assert waits and waits[0]["args"]["outcome"] == "taken" and waits[0]["args"]["waited_ns"] > 0
    calls = [e for e in ev if e.get("cat") == "syscall"]
    assert any(e["name"] == "notify_open" and e["pid"] == s.proc.pid for e in calls)
    starts = sorted(e["args"]["errno"] for e in calls if e["name"] == "trace_start")
    assert starts == [errno.EBUSY], starts          # the second start, refused
    r = fayt("trace", "stop", env=env)
    assert r.returncode == 1 and "none runs" in r.stderr, r.stderr
    for c in (h, h, w, t, s):
        c.send("")
    for c in (t, s, w, h):
        c.finish()


def test_trace_faytd_option_is_completed_when_faytd_stops(fresh_faytd, spawn, tmp_path):
    path = str(tmp_path / "opt.json")
    d = fresh_faytd(extra=["--trace", path])
    t, s = _pair(spawn, d.env(), calls=3)
    t.send("")
    s.send("")
    t.finish()
    s.finish()
    log = d.stop()                  # SIGTERM: a clean stop completes the file
    assert "Traceback" not in log, log
    assert "trace: started by faytd --trace" in log and "trace: stopped" in log
    ev = load(path)
    assert len(returned_calls(ev, s.proc.pid, t.proc.pid)) == 3
    assert any(e["name"] == "context ends" and e["pid"] == t.proc.pid for e in ev)


def test_trace_faytd_option_refuses_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    link = tmp_path / "trace.json"
    link.symlink_to(target)
    err = faytd_refuses(["--socket", str(tmp_path / "s.sock"), "--trace", str(link)])
    assert "--trace" in err and "Too many levels of symbolic links" in err, err
    assert target.read_text() == "keep"


# -- bad requests and rights ------------------------------------------------------

def test_trace_start_refuses_what_is_not_a_writable_regular_file(fresh_faytd, conn_to,
                                                                 tmp_path):
    d = fresh_faytd(clean=True)
    c = conn_to(d)
    with pytest.raises(libportal.InvalidArgument, match="takes one file descriptor"):
        c.call(lib.FAYT_SYS_TRACE_START)
    r, w = os.pipe()
    try:
        with pytest.raises(libportal.InvalidArgument, match="must be a regular file"):
            c.call(lib.FAYT_SYS_TRACE_START, b"", send_fds=[w])
    finally:
        os.close(r)
        os.close(w)
    p = tmp_path / "ro.json"
    p.write_text("")
    fd = os.open(str(p), os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            c.call(lib.FAYT_SYS_TRACE_START, b"", send_fds=[fd])
        assert e.value.errno == errno.EBADF and "not open for writing" in str(e.value)
        with pytest.raises(libportal.InvalidArgument, match="takes no body"):
            c.call(lib.FAYT_SYS_TRACE_START, b"x", send_fds=[fd])
    finally:
        os.close(fd)
    with pytest.raises(OSError) as e:
        c.call(lib.FAYT_SYS_TRACE_STOP)
    assert e.value.errno == errno.ENOENT and "none runs" in str(e.value)
    start(c, str(tmp_path / "t.json"))
    with pytest.raises(OSError) as e:
        start(c, str(tmp_path / "u.json"))
    assert e.value.errno == errno.EBUSY
    fault = T.fail_call(c.context_id, "stats", count=1, connection=c)    # injected: traced
    with pytest.raises(OSError) as e:
        c.stats()
    assert e.value.errno == errno.EIO
    fault.remove()
    stop(c)
    ev = load(str(tmp_path / "t.json"))
    assert os.path.getsize(str(tmp_path / "u.json")) == 0     # never written
    inj = [e for e in ev if e["name"] == "injected: fail"]
    assert inj and inj[0]["pid"] == os.getpid() and inj[0]["args"]["rule"] == fault.id
    assert any(e["name"] == "stats" and e["args"].get("error") == "EIO" for e in ev)


RIGHTS = """
fd = os.memfd_create("trace")
out = {}
for what, op, fds in (("start", lp._abi.lib.FAYT_SYS_TRACE_START, [fd]),
                      ("stop", lp._abi.lib.FAYT_SYS_TRACE_STOP, [])):
    try:
        lp.connection().call(op, b"", send_fds=fds)
        out[what] = 0
    except OSError as e:
        out[what] = [e.errno, str(e)]
print(json.dumps(out), flush=True)
sys.stdin.readline()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a client as uid 65534: needs root")
def test_trace_is_core_only_uid_65534_gets_eperm(world_faytd, spawn, as_user, conn_to,
                                                 world_dir):
    d = world_faytd()
    root = conn_to(d)
    path = os.path.join(world_dir, "root.json")
    start(root, path)                   # root's trace runs; nobody may not stop it
    c = spawn(RIGHTS, {"FAYT_SOCKET": d.socket}, as_user=as_user, uid=NOBODY)
    out = json.loads(c.expect())
    assert out["start"][0] == errno.EPERM and "only a core context" in out["start"][1]
    assert out["stop"][0] == errno.EPERM
    c.send("")
    c.finish()
    summary = stop(root)                # still root's, still running
    assert summary["by"].startswith("context %d " % root.context_id)
    ev = load(path)
    calls = [e for e in ev if e.get("cat") == "syscall" and e["args"]["errno"] == errno.EPERM]
    assert {e["name"] for e in calls} >= {"trace_start", "trace_stop"}


# -- a client that scribbles its own trace area ------------------------------------

SCRIBBLER = """
import random
from libportal._abi import ffi, lib
conn = lp.connection()
page = ffi.cast("struct fayt_context_page *", conn.context_page)
area = ffi.cast("uint8_t *", conn.context_page) + lib.FAYT_PAGE_SIZE
recs = ffi.cast("struct fayt_trace_record *", area)
size = lib.FAYT_TRACE_RECORDS * ffi.sizeof("struct fayt_trace_record")
victim_ring, victim_target = int(sys.argv[1]), int(sys.argv[2])
rnd = random.Random(7)
print("ready", flush=True)
n = 0
while not select.select([sys.stdin], [], [], 0)[0]:
    # raw bytes over the whole area, the head anywhere
    ffi.memmove(area, bytes(rnd.getrandbits(8) for _ in range(4096)) * (size // 4096), size)
    page.trace.head = rnd.getrandbits(32)
    # well-formed records that lie: another context's ring, a far future,
    # no thread, an unknown kind, a share-point faytd never made
    h = page.trace.head
    lies = [(lib.FAYT_TRACE_NOTIFY_BEGIN, victim_ring, 1, time.monotonic_ns()),
            (lib.FAYT_TRACE_NOTIFY_SEND, victim_target, 1, time.monotonic_ns() + 10**15),
            (lib.FAYT_TRACE_NOTIFY_END, victim_ring, 0, time.monotonic_ns()),
            (99, 1, 1, time.monotonic_ns()),
            (lib.FAYT_TRACE_LOCK_WAIT, 0xfffffff0, 1, time.monotonic_ns())]
    for k, (kind, ident, tid, ts) in enumerate(lies):
        r = recs[(h + k) % lib.FAYT_TRACE_RECORDS]
        r.kind, r.id, r.tid, r.ts = kind, ident, tid * os.getpid(), ts
        r.slot, r.aux, r.value = 5, 1, -1
        r.seq = (h + k + 1) & 0xffffffff
    page.trace.head = (h + len(lies)) & 0xffffffff
    page.trace.on = rnd.getrandbits(32)
    n += 1
    time.sleep(0.005)
print(n, flush=True)
"""


def test_trace_survives_a_client_scribbling_its_trace_area(fresh_faytd, spawn, conn_to,
                                                           tmp_path):
    d = fresh_faytd(clean=True)
    env = d.env()
    c = conn_to(d)
    path = str(tmp_path / "hostile.json")
    start(c, path)
    t = spawn(PAIR_TARGET, env)
    tid = int(t.expect())
    s = spawn(PAIR_SENDER, env, args=[tid, 1])          # its ring exists: the victim
    assert s.expect() == "done"
    ring = [g["id"] for g in info(c, "rings")["rings"]
            if g["sender"] != "faytd" and g["sender"]["pid"] == s.proc.pid][0]
    bad = spawn(SCRIBBLER, env, args=[ring, tid])
    assert bad.expect() == "ready"
    s2 = spawn(PAIR_SENDER, env, args=[tid, CALLS])     # an honest pair meanwhile
    assert s2.expect() == "done"
    bad.send("")
    assert int(bad.expect()) > 0
    summary = stop(c)
    assert summary["dropped"] > 0, summary              # the lies were counted, not believed
    ev = load(path)
    assert len(returned_calls(ev, s2.proc.pid, t.proc.pid)) == CALLS
    mine = [e for e in ev if e["pid"] == bad.proc.pid and e.get("cat") in ("notify", "lock")]
    assert mine == [], mine[:3]
    handled = [e for e in ev if e["pid"] == t.proc.pid and e["ph"] == "X"
               and e["name"].startswith("handler")]
    assert len([e for e in handled if e["args"]["ring"] == ring]) == 1     # s's one call
    for p in (t, s, s2):
        p.send("")
    for p in (bad, s, s2, t):
        p.finish()
