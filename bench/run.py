"""Run the benchmark cases and print the table."""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

from faytd.launch import Faytd

from . import cases


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short smoke run (CI)")
    ap.add_argument("--only", help="comma-separated case names: " + ", ".join(cases.CASES))
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--procs", help="process counts of the contention case, e.g. 1,2,4 "
                    "(the default); given alone, it runs that case only")
    ap.add_argument("--plot", metavar="FILE",
                    help="also draw the rows into FILE (PNG, SVG or PDF, by its suffix; "
                    "needs matplotlib: pip install 'fayt-portals[plot]')")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(cases.CASES)
    if args.procs and not args.only:
        names = ["contention"]
    unknown = [n for n in names if n not in cases.CASES]
    if unknown:
        ap.error("unknown cases: %s" % ", ".join(unknown))
    if args.procs:
        try:
            procs = tuple(int(x) for x in args.procs.split(","))
        except ValueError:
            procs = ()
        if not procs or any(not 1 <= k <= 64 for k in procs):
            ap.error("--procs: %r is not a list of process counts from 1 to 64 "
                     "(e.g. 1,2,4)" % args.procs)
        cases.PROCS = procs
    if args.plot:
        try:
            from . import plot
            plot.check(args.plot)
        except (ImportError, ValueError) as e:
            ap.error("--plot: %s" % e)
    scale = 0.05 if args.quick else 1.0
    rows = []
    with tempfile.TemporaryDirectory(prefix="fayt-bench-") as tmp:
        d = Faytd(os.path.join(tmp, "faytd"), ram="2GiB")
        os.environ["FAYT_SOCKET"] = d.socket
        try:
            for n in names:
                t0 = time.perf_counter()
                got = cases.CASES[n](d, scale)
                for r in got:
                    r.setdefault("case", n)
                rows.extend(got)
                print("  %s: %.1fs" % (n, time.perf_counter() - t0), file=sys.stderr)
        finally:
            d.stop()
    print_table(rows, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        plot.draw(rows, args.plot, quick=args.quick)
        print("plot: %s" % args.plot)
    return 0


def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "ns":
        return "%.0f ns" % v
    if unit == "us":
        return "%.1f us" % v
    if unit == "ops/s":
        return "%.0f/s" % v
    if unit == "B":
        return "%.0f B" % v
    return "%.3g %s" % (v, unit)


def print_table(rows, quick):
    print()
    print("fayt-portals benchmarks%s: %s, Python %s, %d cores" % (
        " (quick smoke run: numbers are rough)" if quick else "", platform.machine(),
        platform.python_version(), os.cpu_count()))
    head = ["benchmark", "libportal", "peer", "peer value", "ratio", "target", "met"]
    out = []
    for r in rows:
        ratio = r.get("ratio")
        tgt = r.get("target")
        met = "-"
        if ratio is not None and tgt is not None:
            op, val = tgt
            met = "yes" if (ratio <= val if op == "<=" else ratio >= val) else "NO"
        out.append([r["name"], fmt(r["ours"], r["unit"]), r.get("peer", "-"),
                    fmt(r.get("peer_value"), r["unit"]),
                    "-" if ratio is None else "%.2fx" % ratio,
                    "-" if tgt is None else "%s %sx" % (tgt[0], _figure(tgt[1])), met])
    widths = [max(len(str(x[i])) for x in out + [head]) for i in range(len(head))]
    for line in [head, ["-" * w for w in widths]] + out:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
    if quick:
        print()
        print(SMOKE_NOTE)


SMOKE_NOTE = """\
This was a smoke run (--quick): each case ran a few hundred iterations, to show
that it works, not how fast it is.  A NO in the "met" column is not a failure,
and this run fails nothing: on a shared machine a single short run swings by 2x.
Targets are judged on full runs (python -m bench), as the median and range of
several of them on a quiet machine (docs/performance.md)."""


def _figure(v):
    """A target as written: 1.0, 1.25, 0.7."""
    return "%.1f" % v if round(v, 1) == v else "%.2f" % v

