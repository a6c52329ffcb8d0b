"""`fayt ls` and `fayt ps` (faytd/cli.py), run as real commands against the
session's faytd, looking at a share-point a live child process created."""
import json
import os
import subprocess
import sys
import time
import uuid

import pytest

HOLDER = """
import sys
import libportal as lp
sp = lp.share_create(sys.argv[1], 8192)
print("ok", flush=True)
sys.stdin.read()          # stay alive, and mapped, until the test closes stdin
"""


def fayt(*args, env=None):
    return subprocess.run([sys.executable, "-m", "faytd.cli"] + list(args), env=env,
                          capture_output=True, text=True, timeout=60)


def list_share(faytd):
    r = fayt("ls", "--json", env=faytd.env())
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def holder(faytd):
    """A child process holding share-point `name`; gone (and so is the
    share-point, its owner being dead and unmapped) after the test."""
    name = "cli-%s" % uuid.uuid4().hex[:8]
    p = subprocess.Popen([sys.executable, "-c", HOLDER, name], env=faytd.env(),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ok"
        yield p, name
    finally:
        p.stdin.close()
        p.wait(timeout=30)
        p.stdout.close()
        deadline = time.monotonic() + 10
        while any(s["identifier"] == name for s in list_share(faytd)):
            assert time.monotonic() < deadline, "share-point %s outlived its owner" % name
            time.sleep(0.05)


def test_cli_ls_shows_sharepoint_with_owner_and_captured_thread(faytd, holder):
    p, name = holder
    r = fayt("ls", env=faytd.env())
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split()[:6] == ["ID", "IDENTIFIER", "SIZE", "MAPPED", "PROT", "OWNER"]
    row = [line for line in rows if name in line.split()]
    assert len(row) == 1, r.stdout
    cols = row[0].split()
    assert cols[1] == name
    assert cols[4] == "rw-"
    assert cols[5] == str(p.pid)
    assert "%d,%d" % (p.pid, p.pid) in cols        # captured thread (pid, tid): main thread
    assert "2:" in cols and "0x" in row[0]         # two frames, physical addresses in hex
    # the columns are aligned under their headers
    assert row[0][header.index("IDENTIFIER"):].startswith(name + " ")
    assert row[0][header.index("PROT"):].startswith("rw- ")
    assert row[0][header.index("OWNER"):].startswith("%d " % p.pid)

def test_cli_ls_json_is_faytd_reply(faytd, holder):
    p, name = holder
    (sp,) = [s for s in list_share(faytd) if s["identifier"] == name]
    assert sp["owner"] == p.pid and sp["owner_alive"] is True
    assert sp["captured"] == [[p.pid, p.pid]]
    assert sp["mapped_bytes"] == 8192 and len(sp["frames"]) == 2
    assert sp["prot"] == 3


def test_cli_ps_shows_context_of_child_and_ram_frames(faytd, holder):
    p, name = holder
    r = fayt("ps", env=faytd.env())
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ID", "PID", "CATEGORY", "MAPPINGS", "MAPPED", "RSS", "EXE"]
    rows = {int(line.split()[1]): line.split() for line in lines[1:-1]}
    assert p.pid in rows, r.stdout
    cid, pid, category, mappings, mapped, rss = rows[p.pid][:6]
    assert category == "core"                      # the default policy: faytd's own user
    assert int(mappings) == 1 and mapped == "8.0K"
    assert rss.endswith("M")                       # a live Python process: megabytes
    assert any("(this fayt)" in line for line in lines)
    assert lines[-1].startswith("RAM frames: ") and " free of " in lines[-1]


def test_cli_ps_json_counts_frames(faytd, holder):
    r = fayt("ps", "--json", env=faytd.env())
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert 0 <= info["free_frames"] <= info["ram_frames"] - 2
    assert holder[0].pid in [c["pid"] for c in info["contexts"]]


def test_cli_stats_json_and_its_table(fresh_faytd):
    """`fayt stats --json` is faytd's FAYT_SYS_STATS reply; `fayt stats` the
    same counts as a table and lines (docs/cli.md, "fayt stats")."""
    d = fresh_faytd()
    r = fayt("stats", "--json", env=d.env())
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["version"] == 1
    assert set(s) == {"version", "calls", "fast_path", "faults", "contexts", "sharepoints",
                      "frames", "journal", "limits", "fairness", "notifications", "chains",
                      "cow", "queues", "decisions", "injected"}
    assert s["cow"] == {"snapshot_spare_bytes": 0}
    assert s["calls"]["hello"] == {"fast": 0, "python": 1}      # this fayt's own
    assert s["calls"]["stats"] == {"fast": 0, "python": 1}
    assert set(s["calls"]) >= {"portal", "unmap", "unmap_destroy", "list_share",
                               "notify_open", "chain_join"}
    assert s["fast_path"] == {"enabled": True, "sharepoints_created": 0,
                              "sharepoints_destroyed": 0, "anon_mapped": 0, "anon_unmapped": 0,
                              "sharepoints_attached": 0, "sharepoints_unmapped": 0}
    assert s["faults"] == {"total": 0, "in_one_call": 0, "by_loop": 0, "fetched": 0,
                           "mapped": 0, "failed": 0, "write_reports": 0, "events_in_c": 0,
                           "events_in_python": 0}
    assert s["contexts"] == {"total": 1, "connected": 1}
    assert s["sharepoints"] == {"scope": "all", "count": 0}
    assert s["frames"]["free"] == s["frames"]["total"] > 0
    assert s["journal"] == {"enabled": True, "errors": 0}
    assert s["notifications"] == {"rings": 0, "drops": 0}
    assert s["chains"] == {"count": 0, "servers": 0, "regions": 0}
    assert s["injected"]["total"] == 0 and s["injected"]["rules"] == 0
    r = fayt("stats", env=d.env())
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["CALL", "C", "FAST", "PATH", "PYTHON"]
    assert lines[1].split() == ["hello", "0", "2"]          # both fayts' own
    assert lines[2].split() == ["stats", "0", "2"]
    assert "fast path: on" in lines
    assert "SPECIAL faults: 0 (0 answered in one call, 0 by the loop)" in lines
    assert any(ln.startswith("contexts: ") for ln in lines)     # the first fayt may linger
    assert "share-points: 0" in lines
    assert "faults injected: 0 (0 rules in force; fayt inject ls)" in lines
    assert "journal: 0 write errors" in lines
    assert "notification rings: 0 (0 dropped as corrupt)" in lines
    assert "chains: 0 (0 servers, 0 regions)" in lines


def test_cli_socket_option_before_or_after_command(faytd):
    env = dict(os.environ)
    env.pop("FAYT_SOCKET", None)
    for args in (["--socket", faytd.socket, "ls"], ["ls", "--socket", faytd.socket]):
        r = fayt(*args, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[:2] == ["ID", "IDENTIFIER"]


@pytest.mark.parametrize("command", ["ls", "ps", "stats"])
def test_cli_without_faytd_fails_clearly_with_status_1(tmp_path, command):
    sock = str(tmp_path / "nobody.sock")
    r = fayt("--socket", sock, command)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.startswith("fayt: cannot reach faytd at %s (No such file or directory)" % sock)
    assert "it is not running there" in r.stderr
    assert r.stderr.count("running") == 1 and r.stderr.count("\n") == 1, r.stderr  # said once
    assert "Traceback" not in r.stderr


def test_cli_without_command_is_a_usage_error():
    r = fayt()
    assert r.returncode == 2
    assert "usage: fayt" in r.stderr


def test_cli_console_script_fayt_is_installed(faytd):
    exe = os.path.join(os.path.dirname(sys.executable), "fayt")
    if not os.path.exists(exe):
        pytest.skip("no `fayt` console script beside %s (not pip-installed)" % sys.executable)
    r = subprocess.run([exe, "ps"], env=faytd.env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == ["ID", "PID"]


def test_cli_rm_destroys_share_points_and_says_what_it_could_not(faytd):
    import libportal as lp
    c = lp.Connection(faytd.socket)
    try:
        names = ["cli-rm-%s-%d" % (uuid.uuid4().hex[:6], i) for i in range(2)]
        for n in names:
            lp.share_create(n, 4096, connection=c).unmap()      # left in the table, owner alive
        r = fayt("rm", names[0], names[1], "cli-rm-none", env=faytd.env())
        assert r.returncode == 1
        assert r.stderr == "fayt: rm cli-rm-none: share.identifier: no share-point 'cli-rm-none'\n"
        left = {s["identifier"] for s in list_share(faytd)}
        assert not left & set(names)
    finally:
        c.close()


def test_cli_kill_signals_a_contexts_process(faytd, holder):
    p, name = holder
    ctx = [c for c in json.loads(fayt("ps", "--json", env=faytd.env()).stdout)["contexts"]
           if c["pid"] == p.pid][0]["id"]
    r = fayt("kill", "-s", "KILL", str(ctx), env=faytd.env())
    assert r.returncode == 0, r.stderr
    assert p.wait(timeout=30) == -9
    r = fayt("kill", "999999", env=faytd.env())
    assert r.returncode == 1
    assert r.stderr == "fayt: kill 999999: no context 999999 with a live process\n"
    r = fayt("kill", "-s", "NOSUCH", "1", env=faytd.env())
    assert r.returncode == 2 and "NOSUCH is not a signal" in r.stderr
