"""The benchmark suite's own options (bench/run.py, bench/plot.py): --procs
for the contention case, --plot, and the smoke run's note.  No timing is
judged here: a row's figures only have to exist and be positive."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "bench"] + list(args), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_procs_runs_the_contention_case_for_each_count(tmp_path):
    out = tmp_path / "rows.json"
    r = _bench("--quick", "--procs", "1,3", "--json", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    got = sorted((x["procs"], x["peer"]) for x in rows)
    assert got == [(1, "multiprocessing.Lock"), (1, "posix_ipc.Semaphore"),
                   (3, "multiprocessing.Lock"), (3, "posix_ipc.Semaphore")]
    for x in rows:
        assert x["case"] == "contention" and x["ours"] > 0 and x["peer_value"] > 0, x
        assert x["ratio"] == x["ours"] / x["peer_value"]
    assert "3 processes, locked counter" in r.stdout
    assert 'A NO in the "met" column is not a failure' in r.stdout      # the smoke run says so


def test_bench_bad_procs_and_plot_arguments_are_usage_errors(tmp_path):
    for args, message in ((["--procs", "0"], "--procs: '0' is not a list of process counts"),
                          (["--procs", "two"], "--procs: 'two' is not a list"),
                          (["--plot", str(tmp_path / "p.txt")], "must end in .png, .svg, .pdf"),
                          (["--only", "nosuch"], "unknown cases: nosuch")):
        r = _bench("--quick", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr, (args, r.stderr)
    assert not os.path.exists(tmp_path / "p.txt")


def test_bench_plot_without_matplotlib_says_what_to_install(tmp_path):
    fake = tmp_path / "matplotlib"      # a matplotlib that cannot be imported
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('not here')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = _bench("--quick", "--procs", "1", "--plot", str(tmp_path / "p.png"), env=env)
    assert r.returncode == 2
    assert "--plot: matplotlib is not installed (pip install 'fayt-portals[plot]'" in r.stderr
    assert not os.path.exists(tmp_path / "p.png")


def test_bench_plot_draws_the_ratios_and_the_scaling(tmp_path):
    png = tmp_path / "bench.png"
    r = _bench("--quick", "--only", "lock,contention", "--procs", "1,2", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert "plot: %s" % png in r.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000
