"""`fayt rings`, `fayt chains`, `fayt top`, `fayt gc` and `fayt stats --json`'s
new sections (faytd/tools.py, faytd/gc.py, faytd/syscalls/info.py;
docs/cli.md), run as real commands against a real faytd with real
notification pairs and chain servers; the rights as uid 65534; INFO's bad
requests as raw bytes."""
import errno
import json
import os
import subprocess
import sys

import pytest

import libportal
from libportal._abi import lib, INFO_REQ
from support.children import wait_until
from support.daemon import keepers

NOBODY = 65534

TARGET = """
lp.install_handler(3, lambda p, i, s: len(p))
lp.install_handler(5, lambda p, i, s: 0)
lp.subscribe(lp.PEER_DIED, 5, 0)        # faytd's own ring into it
print(lp.connection().context_id, flush=True)
_end = time.monotonic() + 60
while time.monotonic() < _end and not select.select([sys.stdin], [], [], 0)[0]:
    lp.notification_wait(0.1)
"""

SENDER = """
t, n = int(sys.argv[1]), int(sys.argv[2])
for _ in range(n):
    assert lp.notify(t, 3, b"ping", wait_return=True, timeout=30) == 4
print(lp.connection().context_id, flush=True)
sys.stdin.read()
"""

CHAIN = """
srv = lp.chain_join(sys.argv[1])
print("joined", flush=True)
srv.serve(lambda req: req.supply(b"x" * 4096),
          stop=lambda: select.select([sys.stdin], [], [], 0)[0])
"""

CLIENT = """
sp = lp.portal(lp.SPECIAL, lp.PROT_READ, 65536, chain=sys.argv[1], message=b"m")
assert sp.read(0, 1) == b"x" and sp.read(8192, 1) == b"x"    # two faults, two pages
print("read", flush=True)
sys.stdin.read()
"""

# fayt run as another user (support.daemon.AsUser: argv[1:] are fayt's).
AS_FAYT = ("import sys, runpy; sys.argv = ['fayt'] + sys.argv[1:]; "
           "runpy.run_module('faytd.cli', run_name='__main__')")


def fayt(*args, env):
    return subprocess.run([sys.executable, "-m", "faytd.cli"] + list(args), env=env,
                          capture_output=True, text=True, timeout=60)


def fayt_json(*args, env):
    r = fayt(*(args + ("--json",)), env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def fayt_as(as_user, uid, args, env):
    p = as_user.popen(AS_FAYT, list(args), uid=uid, gid=uid, env=env, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return json.loads(out)


@pytest.fixture
def pair(fresh_faytd, spawn):
    """A private faytd, a target and a sender that sent it 5 notifications:
    (faytd, target, its context id, sender, its context id)."""
    d = fresh_faytd()
    t = spawn(TARGET, d.env())
    tid = int(t.expect())
    s = spawn(SENDER, d.env(), args=[tid, 5])
    sid = int(s.expect())
    return d, t, tid, s, sid


def test_tools_rings_show_sender_target_depth_and_drops(pair):
    d, t, tid, s, sid = pair
    r = fayt_json("rings", env=d.env())
    assert r["scope"] == "all"
    (ring,) = [g for g in r["rings"] if g["sender"] != "faytd" and g["target"]["id"] == tid]
    assert ring["sender"]["id"] == sid and ring["sender"]["pid"] == s.pid
    assert ring["target"]["pid"] == t.pid
    assert (ring["state"], ring["depth"], ring["size"], ring["posted"], ring["drops"],
            ring["corrupt"]) == ("live", 0, lib.FAYT_RING_ENTRIES, 5, 0, False)
    (notices,) = [g for g in r["rings"] if g["sender"] == "faytd"]
    assert notices["target"]["id"] == tid
    assert (notices["backlog"], notices["lost"], notices["drops"]) == (0, 0, 0)
    text = fayt("rings", env=d.env())
    assert text.returncode == 0, text.stderr
    header, *rows = text.stdout.splitlines()
    assert header.split()[:2] == ["RING", "SENDER"]
    row = [x for x in rows if x.split()[1] == "%d/%d" % (sid, s.pid)]
    assert len(row) == 1 and row[0].split()[2:7] == ["%d/%d" % (tid, t.pid), "live",
                                                     "0/%d" % lib.FAYT_RING_ENTRIES, "5", "0"]
    st = fayt_json("stats", env=d.env())
    assert st["version"] == 1 and st["notifications"] == {"rings": 2, "drops": 0}
    assert st["chains"] == {"count": 0, "servers": 0, "regions": 0}


def test_tools_chains_show_servers_regions_and_faults_answered(fresh_faytd, spawn):
    d = fresh_faytd()
    srv = spawn(CHAIN, d.env(), args=["tools.pages"])
    assert srv.expect() == "joined"
    cl = spawn(CLIENT, d.env(), args=["tools.pages"])
    assert cl.expect() == "read"
    r = fayt_json("chains", env=d.env())
    assert r["scope"] == "all"
    (c,) = r["chains"]
    assert c["name"] == "tools.pages" and c["write_reports"] is False
    assert [(s["position"], s["pid"]) for s in c["servers"]] == [(0, srv.pid)]
    assert [(g["pid"], g["length"], g["faults"]) for g in c["regions"]] == [(cl.pid, 65536, 2)]
    assert (c["servers_total"], c["regions_total"], c["other_uids_servers"],
            c["other_uids_regions"]) == (1, 1, 0, 0)
    assert (c["counts"]["faults"], c["counts"]["fetched"], c["counts"]["failed"]) == (2, 2, 0)
    text = fayt("chains", env=d.env())
    assert text.returncode == 0, text.stderr
    row = [x for x in text.stdout.splitlines() if "tools.pages" in x.split()]
    assert len(row) == 1 and row[0].split()[2:6] == ["%d/%d" % (c["servers"][0]["context"],
                                                                srv.pid), "1", "2", "2"]
    assert fayt_json("stats", env=d.env())["chains"] == {"count": 1, "servers": 1,
                                                         "regions": 1}
    # The client goes: its region closes, the chain keeps the faults it answered.
    cl.kill()
    wait_until(lambda: not fayt_json("chains", env=d.env())["chains"][0]["regions"],
               "the client's region to close")
    (c,) = fayt_json("chains", env=d.env())["chains"]
    assert (c["counts"]["faults"], c["counts"]["fetched"]) == (2, 2)


def test_tools_top_once_json_and_text(pair):
    d, t, tid, s, sid = pair
    r = fayt("top", "--once", "--json", "-d", "0.2", env=d.env())
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    v = json.loads(line)
    assert v["interval"] > 0 and v["scope"] == "all"
    ids = {c["id"]: c for c in v["contexts"]}
    assert ids[tid]["pid"] == t.pid and ids[sid]["pid"] == s.pid
    assert ids[tid]["mapped_bytes"] > 0 and ids[tid]["rss"] > 0       # RAM per context
    assert [c for c in v["contexts"] if c["this_fayt"]]
    (p,) = [p for p in v["pairs"] if p["sender"] != "faytd"]
    assert (p["target"]["id"], p["depth"], p["drops"]) == (tid, 0, 0)
    assert p["per_second"] is not None and p["per_second"] >= 0
    assert v["lock_contention"] is None
    assert "lock waits never pass through" in v["lock_contention_why"]
    r = fayt("top", "-n", "2", "--json", "-d", "0.1", env=d.env())
    assert r.returncode == 0, r.stderr
    assert len([json.loads(x) for x in r.stdout.splitlines()]) == 2
    r = fayt("top", "--once", "-d", "0.1", env=d.env())
    assert r.returncode == 0, r.stderr
    for part in ("CONTEXTS", "NOTIFICATIONS", "CHAINS", "(this fayt)", "%d/%d" % (tid, t.pid),
                 "lock contention: not known to faytd"):
        assert part in r.stdout, r.stdout
    for bad in (["-d", "0"], ["-d", "nan"], ["-n", "0"]):
        r = fayt("top", *bad, env=d.env())
        assert r.returncode == 2 and "fayt: top:" in r.stderr, (bad, r.stderr)


@pytest.mark.parametrize("body, why", [
    (b"", "body of 0 bytes"),
    (INFO_REQ.pack(lib.FAYT_INFO_RINGS, 0, 0)[:-1], "body of 15 bytes"),
    (INFO_REQ.pack(lib.FAYT_INFO_RINGS, 0, 0) + b"\0", "body of 17 bytes"),
    (INFO_REQ.pack(9, 0, 0), "what: 9"),
    (INFO_REQ.pack(0, 0, 0), "what: 0"),
    (INFO_REQ.pack(lib.FAYT_INFO_CHAINS, 1, 0), "reserved"),
])
def test_tools_info_refuses_bad_requests_as_raw_bytes(lp, body, why):
    conn = lp.Connection()
    try:
        with pytest.raises(libportal.PortalError) as e:
            conn.call(lib.FAYT_SYS_INFO, body)
        assert e.value.errno == errno.EINVAL and "info" in str(e.value) and why in str(e.value)
        # the connection is still good: a page past every id is empty
        page = json.loads(conn.call(lib.FAYT_SYS_INFO,
                                    INFO_REQ.pack(lib.FAYT_INFO_RINGS, 0, 2 ** 64 - 1))[0])
        assert page["rings"] == []
    finally:
        conn.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="runs fayt as uid 65534: needs root")
def test_tools_rings_and_chains_of_another_uid_are_not_shown_as_uid_65534(world_faytd, spawn,
                                                                          as_user):
    d = world_faytd()
    t = spawn(TARGET, d.env())
    tid = int(t.expect())
    s = spawn(SENDER, d.env(), args=[tid, 1])
    s.expect()
    srv = spawn(CHAIN, d.env(), args=["tools.root"])
    assert srv.expect() == "joined"
    env = {"FAYT_SOCKET": d.socket}
    # root (core) sees them all
    assert len(fayt_json("rings", env=d.env())["rings"]) == 2
    assert [c["name"] for c in fayt_json("chains", env=d.env())["chains"]] == ["tools.root"]
    # uid 65534 (not core) sees none of root's
    assert fayt_as(as_user, NOBODY, ["rings", "--json"], env) == {"scope": "uid", "rings": []}
    assert fayt_as(as_user, NOBODY, ["chains", "--json"], env) == {"scope": "uid",
                                                                   "chains": []}
    v = fayt_as(as_user, NOBODY, ["top", "--once", "--json", "-d", "0.1"], env)
    assert v["scope"] == "uid" and v["pairs"] == [] and v["chains"] == []


def _dead_faytd_dir(d):
    """SIGKILL faytd d: its keeper, sockets and lock file stay in d.dir."""
    d.proc.kill()
    d.proc.wait(60)
    for name in ("faytd.sock", "faytd.keeper", "faytd.journal.lock"):
        assert os.path.exists(os.path.join(d.dir, name)), name
    assert keepers([d.dir])


def test_tools_gc_finds_a_dead_faytds_leftovers_and_removes_them_with_yes(fresh_faytd):
    live = fresh_faytd()
    d = fresh_faytd()
    conn = libportal.Connection(d.socket)
    try:
        libportal.share_create("tools.gc", 8192, connection=conn)
        _dead_faytd_dir(d)
    finally:
        conn.close()
    (kpid,) = keepers([d.dir])
    found = fayt_json("gc", "--dir", d.dir, "--dir", live.dir, env=d.env())
    assert found["dry_run"] is True
    got = {(x["kind"], x.get("path") or x.get("pid")) for x in found["leftovers"]}
    assert got == {("keeper", kpid)} | {("file", os.path.join(d.dir, n)) for n in
                                         ("faytd.sock", "faytd.keeper", "faytd.journal.lock")}
    (k,) = [x for x in found["leftovers"] if x["kind"] == "keeper"]
    assert k["objects"] >= 1 and k["bytes"] >= 8192
    assert keepers([d.dir]) and os.path.exists(os.path.join(d.dir, "faytd.sock"))  # dry run
    r = fayt("gc", "--dir", d.dir, env=d.env())
    assert r.returncode == 0 and "would remove keeper pid %d" % kpid in r.stdout, r.stdout
    assert "fayt gc --yes" in r.stdout
    r = fayt("gc", "--dir", d.dir, "--yes", env=d.env())
    assert r.returncode == 0, r.stderr
    assert "removed keeper pid %d" % kpid in r.stdout
    wait_until(lambda: not keepers([d.dir]), "the keeper to end")
    left = sorted(os.listdir(d.dir))
    assert "faytd.journal" in left and not {"faytd.sock", "faytd.keeper",
                                            "faytd.journal.lock"} & set(left), left
    assert fayt_json("gc", "--dir", d.dir, env=d.env())["leftovers"] == []
    assert live.proc.poll() is None         # (its directory was never a leftover)


@pytest.mark.skipif(os.geteuid() != 0, reason="runs fayt as uid 65534: needs root")
def test_tools_gc_as_uid_65534_leaves_another_uids_leftovers(world_faytd, as_user):
    d = world_faytd()
    _dead_faytd_dir(d)
    (kpid,) = keepers([d.dir])
    env = {"FAYT_SOCKET": d.socket}
    got = fayt_as(as_user, NOBODY, ["gc", "--dir", d.dir, "--yes", "--json"], env)
    assert got == {"dry_run": False, "leftovers": []}
    assert keepers([d.dir]) == {kpid: os.path.join(d.dir, "faytd.keeper")}
    assert os.path.exists(os.path.join(d.dir, "faytd.journal.lock"))
    # root's own gc takes them
    r = fayt("gc", "--dir", d.dir, "--yes", env=d.env())
    assert r.returncode == 0 and "removed keeper pid %d" % kpid in r.stdout, r.stdout
    wait_until(lambda: not keepers([d.dir]), "the keeper to end")
