"""The reference servers in servers/: the metadata server's instances, the
key-value server over channels with several client processes, the
reference scheduler, and the demo (its own faytd, three instances, one
SIGKILLed inside the lock, ..., the scheduler's decisions measured)."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_servers_demo_recovers_owner_died_and_leaves_nothing():
    env = dict(os.environ)
    env.pop("FAYT_SOCKET", None)            # the demo starts and uses its own faytd
    r = subprocess.run([sys.executable, "-m", "servers.demo"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)      # a hang guard only
    out = r.stdout
    assert r.returncode == 0, out + r.stderr

    assert re.search(r"faytd is up \(pid (\d+)\)", out)
    for text in [
        "created share-point 'demo.jobs'",
        "share-point 'demo.jobs' exists (EEXIST): attached it",
        "$ fayt ls", "demo.jobs", "$ fayt ps", "RAM frames:",
        "holding the lock in the middle of a commit",
        "died holding the lock of share-point 'demo.jobs': released, owner-died set",
        "sp.lock() returned EOWNERDEAD",
        "is dead: retiring its",
        "mark_consistent(): the lock is clean again",
        "[D pid", "registered in slot",
        "no job lost or counted twice",
        "listening on 'demo.kv'", "[kv] stopping: 3 clients served",
        "destroyed share-point 'demo.jobs'",
        "(no share-points)",
        "it subscribes to faytd's scheduling events",
        "to itself", ": nice 10", "parked context",
        "its decisions took effect: the favourite alone on CPU",
        "faytd undoes the decisions", "the idle context runs again",
        "faytd exited with status 0",
        "nothing left (no object keeper, no objects)",
        "no child processes left (no zombies)",
        "demo finished in",
    ]:
        assert text in out, "missing %r in the demo's output:\n%s" % (text, out)
    assert "INCONSISTENT" not in out and "MISMATCH" not in out and "FAILED" not in out
    # Every report after the repair is consistent; the killed instance B is
    # out of the table and its jobs are counted as retired.
    after_repair = out[out.index("mark_consistent(): the lock is clean again"):]
    reports = [line for line in after_repair.splitlines() if "| table:" in line]
    assert reports and all("| consistent" in line and " B=" not in line for line in reports)
    assert all("(+" in line and "retired)" in line for line in reports)

def test_servers_metadata_instances_share_one_table(faytd):
    share = "meta-%s" % uuid.uuid4().hex[:8]
    args = [sys.executable, "-m", "servers.metadata", "--share", share,
            "--interval", "0.01", "--report", "0.3"]
    a = subprocess.Popen(args + ["--name", "one"], cwd=ROOT, env=faytd.env(),
                         stdout=subprocess.PIPE, text=True)
    assert "created share-point %r" % share in a.stdout.readline()
    b = subprocess.Popen(args + ["--name", "two"], cwd=ROOT, env=faytd.env(),
                         stdout=subprocess.PIPE, text=True)
    first_b = b.stdout.readline()       # it attached (and has its SIGTERM handler)
    time.sleep(1.0)
    for p in (a, b):
        p.send_signal(signal.SIGTERM)
    out_a, _ = a.communicate(timeout=30)
    out_b, _ = b.communicate(timeout=30)
    out_b = first_b + out_b
    assert a.returncode == 0 and b.returncode == 0
    assert "share-point %r exists (EEXIST): attached it" % share in out_b
    both = out_a + out_b
    assert re.search(r"table: (one=\d+ two=\d+|two=\d+ one=\d+) \| total \d+ \| consistent",
                     both), both
    assert both.count("deregistered from slot") == 2
    m = re.search(r"last one out: tickets issued (\d+), jobs done (\d+), recoveries 0: "
                  r"no job lost or counted twice", both)
    assert m and int(m.group(1)) == int(m.group(2)) > 0, both
    assert "destroyed share-point %r" % share in both


def test_servers_metadata_without_faytd_fails_clearly(tmp_path):
    env = dict(os.environ, FAYT_SOCKET=str(tmp_path / "none.sock"))
    r = subprocess.run([sys.executable, "-m", "servers.metadata", "--name", "x"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "cannot reach faytd" in r.stderr and "Traceback" not in r.stderr


# A kv client process: its own keys, a key every client writes, a bad
# request (the connection stays up), then it prints what it saw.
KV_CLIENT = r"""
import json, os, sys
sys.path.insert(0, sys.argv[2])
import libportal as lp
from servers import kv
me = "c%d" % os.getpid()
with kv.KVClient(sys.argv[1], timeout=60) as c:
    for i in range(50):
        c.put("%s/%d" % (me, i), b"%s:%d" % (me.encode(), i))
    c.put("shared", me.encode())
    got = [c.get("%s/%d" % (me, i)) for i in range(50)]
    assert got == [b"%s:%d" % (me.encode(), i) for i in range(50)], got
    assert c.delete("%s/49" % me) and not c.delete("%s/49" % me)
    assert c.get("%s/49" % me) is None
    try:
        c._ask(9, b"k")
    except kv.KVError as e:
        assert "op 9 is not GET" in str(e), e
    else:
        raise AssertionError("op 9 was answered")
    c.end.send(b"\x01\x05\x00ab")            # key_len 5, 2 bytes follow
    assert c.end.recv(timeout=60).startswith(b"\x02key_len 5, but 2 bytes follow")
    print(json.dumps({"me": me, "keys": len(c.list(me + "/")), "peer": list(c.end.peer)}))
"""


def test_servers_kv_serves_several_client_processes_and_survives_bad_ones(faytd):
    name = "kv-%s" % uuid.uuid4().hex[:8]
    srv = subprocess.Popen([sys.executable, "-m", "servers.kv", "serve", "--name", name],
                           cwd=ROOT, env=faytd.env(), stdout=subprocess.PIPE, text=True)
    try:
        first = srv.stdout.readline()
        assert "listening on %r" % name in first, first
        clients = [subprocess.Popen([sys.executable, "-c", KV_CLIENT, name, ROOT], cwd=ROOT,
                                    env=faytd.env(), stdout=subprocess.PIPE, text=True)
                   for _ in range(4)]
        # A client killed in the middle of its conversation: only its own task ends.
        doomed = subprocess.Popen([sys.executable, "-c", KV_CLIENT.replace(
            "c.put(\"shared\"", "os.kill(os.getpid(), 9)\n    c.put(\"shared\""), name, ROOT],
            cwd=ROOT, env=faytd.env(), stdout=subprocess.PIPE, text=True)
        outs = [c.communicate(timeout=120)[0] for c in clients]
        assert [c.returncode for c in clients] == [0] * 4, outs
        doomed.communicate(timeout=120)
        assert doomed.returncode == -signal.SIGKILL
        seen = [json.loads(o) for o in outs]
        assert all(s["keys"] == 49 for s in seen)
        assert all(s["peer"][1] == srv.pid for s in seen)     # faytd's record of the server
        sys.path.insert(0, ROOT)
        from servers import kv
        import libportal
        conn = libportal.Connection(faytd.socket)
        try:
            with kv.KVClient(name, connection=conn) as c:
                assert c.get("shared") in {s["me"].encode() for s in seen}
                everyone = c.list()
                for s in seen:
                    assert sum(k.startswith(s["me"].encode() + b"/") for k in everyone) == 49
                with pytest.raises(kv.KVError) as e:
                    c.get(b"k" * 256)
                assert e.value.errno == errno.EINVAL and "1 to 255" in str(e.value)
        finally:
            conn.close()
    finally:
        srv.send_signal(signal.SIGTERM)
        out, _ = srv.communicate(timeout=60)
    assert srv.returncode == 0, out
    assert re.search(r"stopping: 6 clients served, \d+ requests", out), out
    assert "went away without closing" in out       # the killed one


def _stat(pid):
    with open("/proc/%d/stat" % pid, "rb") as f:
        s = f.read()
    return chr(s[s.rindex(b")") + 2])


def test_servers_reference_scheduler_places_parks_and_is_undone(faytd):
    from support.children import wait_until

    def start(*args):
        p = subprocess.Popen([sys.executable, "-m", "servers.scheduler"] + list(args),
                             cwd=ROOT, env=dict(faytd.env(), PYTHONUNBUFFERED="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return p
    fav, idle = start("work", "busy"), start("work", "idle")
    procs = [fav, idle]
    try:
        for p in procs:
            assert "context" in p.stdout.readline()
        cpus = sorted(os.sched_getaffinity(0))
        sched = start("--favourite-pid", str(fav.pid), "--idle", "0.2",
                      "--pids", str(idle.pid))     # not the session's other contexts
        procs.append(sched)
        lines = []

        def said(text):
            while not any(text in x for x in lines):
                lines.append(sched.stdout.readline())
                assert lines[-1], "the scheduler exited:\n" + "".join(lines)
            return True
        assert said("(pid %d): CPU %d to itself" % (fav.pid, cpus[-1]))
        assert said("(pid %d): nice 10" % idle.pid)
        assert said("parked context") and wait_until(lambda: _stat(idle.pid) == "T",
                                                      "the idle context to be parked")
        assert os.sched_getaffinity(fav.pid) == {cpus[-1]}
        if len(cpus) > 1:
            assert os.sched_getaffinity(idle.pid) == set(cpus[:-1])
        assert os.getpriority(os.PRIO_PROCESS, idle.pid) == 10
        sched.send_signal(signal.SIGTERM)
        out, _ = sched.communicate(timeout=30)
        assert sched.returncode == 0 and "faytd undoes the decisions" in out, out
        # faytd undid them: continued, the affinity and nice value given back.
        assert wait_until(lambda: _stat(idle.pid) != "T", "the idle context to run again")
        assert wait_until(lambda: os.getpriority(os.PRIO_PROCESS, idle.pid) == 0,
                          "the nice value to be given back")
        assert os.sched_getaffinity(fav.pid) == set(cpus)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
