"""The fuzz script's short mode (bench/fuzz.py; the full run of a million
requests is not CI's: docs/security.md has its figures).

20,000 mutated requests with wrong-kind descriptors and the scribblers on
every shared structure, from root and uid 65534 when the tests run as root
(else from the test's own uid), against a faytd of the harness; the script
itself checks the honest client's answers and that faytd's descriptors,
the keeper's objects, /dev/shm, contexts, share-points and free frames are
back at their baseline, and exits 1 with its findings otherwise."""
import json
import os
import subprocess
import sys

from bench.fuzz import FUZZ_CONFIG
from support.daemon import NOBODY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 600          # a bound against a hang, never a measure


def _log_problems(state_dir):
    """faytd's warnings and errors (with their tracebacks), for the report."""
    try:
        with open(os.path.join(state_dir, "faytd.log"), errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        return "\n(faytd.log: %s)" % e
    keep = [ln for ln in lines if "WARNING" in ln or "ERROR" in ln or ln.startswith((" ", "Trace"))]
    return "\nfaytd.log, warnings and errors (last 80):\n" + "\n".join(keep[-80:])


def test_fuzz_short_run_ends_at_baseline(world_faytd, tmp_path):
    cfg = {k: v for k, v in FUZZ_CONFIG.items() if k not in ("socket_mode", "policy")}
    d = world_faytd(policy=FUZZ_CONFIG["policy"], ram="256MiB", **cfg)
    out = tmp_path / "fuzz.json"
    uids = "0,%d" % NOBODY if os.getuid() == 0 else str(os.getuid())
    if os.getuid() != 0:
        print("not root: the fuzz runs as uid %d only" % os.getuid())
    env = dict(os.environ)
    env.pop("FAYT_SOCKET", None)
    p = subprocess.run([sys.executable, "-m", "bench.fuzz", "--socket", d.socket,
                        "--state-dir", d.dir, "--requests", "20000", "--seed", "1",
                        "--uids", uids, "--settle", "30", "--json", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=WAIT)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:] + _log_problems(d.dir)
    rep = json.loads(out.read_text())
    assert rep["findings"] == []
    assert rep["requests"] >= 20000
    keys = ("faytd_fds", "keeper_objects", "dev_shm_fayt", "contexts", "sharepoints",
            "free_frames", "rings", "stacks")
    assert {k: rep["end"][k] for k in keys} == {k: rep["baseline"][k] for k in keys}
    honest = {w["kind"]: w for w in rep["workers"] if w.get("kind", "").startswith("honest")}
    assert honest["honest-sender"]["notifications"] > 0
    assert honest["honest-target"]["rounds"] > 0
    assert d.proc.poll() is None
