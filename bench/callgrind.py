"""Instructions per uncontended lock+unlock pair, counted by callgrind.

    .venv/bin/python -m bench.callgrind [--runs N]

The clock is noisy on a shared machine; an instruction count is not.  This
runs bench's lock loop (case_lock's `ours`) under valgrind's callgrind
twice, with 20,000 and with 120,000 pairs, in a fresh Python each time
against a private faytd, and prints the difference of the two totals over
100,000: what one pair costs, start-up and teardown cancelled out.  The
figure depends on the Python (3.11 is the one issue 11 measured), on the
compiler and on the machine's libc; compare two builds on one machine.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

from faytd.launch import Faytd

LOOP = """
import sys
import libportal as lp
n = int(sys.argv[1])
sp = lp.share_create("callgrind-%d-%d" % (n, __import__("os").getpid()), 4096)
def ours(k):
    lock, unlock = sp.lock, sp.unlock
    for _ in range(k):
        lock()
        unlock()
ours(n)
sp.destroy()
"""
SHORT, LONG = 20000, 120000


def instructions(n, env, tmp):
    """Instructions callgrind collected in a Python that runs n pairs."""
    out = os.path.join(tmp, "callgrind.%d" % n)
    r = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out,
                        sys.executable, "-c", LOOP, str(n)],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        raise SystemExit("callgrind failed:\n" + r.stderr[-2000:])
    m = re.search(r"Collected : (\d+)", r.stderr)
    if not m:
        raise SystemExit("callgrind printed no total:\n" + r.stderr[-2000:])
    return int(m.group(1))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.callgrind", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1, help="measurements to make (default 1)")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("bench.callgrind needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="fayt-callgrind-") as tmp:
        d = Faytd(os.path.join(tmp, "faytd"), ram="256MiB")
        try:
            env = d.env()
            for _ in range(args.runs):
                per_pair = (instructions(LONG, env, tmp) - instructions(SHORT, env, tmp)) \
                    / (LONG - SHORT)
                print("lock+unlock: %.1f instructions per pair (Python %s)"
                      % (per_pair, sys.version.split()[0]))
        finally:
            d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
