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
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(cases.CASES)
    unknown = [n for n in names if n not in cases.CASES]
    if unknown:
        ap.error("unknown cases: %s" % ", ".join(unknown))
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


def _figure(v):
    """A target as written: 1.0, 1.25, 0.7."""
    return "%.1f" % v if round(v, 1) == v else "%.2f" % v

