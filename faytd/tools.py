"""`fayt rings`, `fayt chains` and `fayt top`: what faytd's INFO call
(faytd/syscalls/info.py) and its lists say, for a person or a script.

    fayt rings [--json]      notification rings: sender, target, depth, drops
    fayt chains [--json]     chain servers, the regions they serve, faults answered
    fayt top [-d SECONDS] [-n N | --once] [--json]
                             refreshing: contexts and their RAM, notifications/s
                             per pair, faults/s per chain

Rates are differences of faytd's counters between two samples `-d`
seconds apart (the first refresh waits that long): a ring's `posted` (its
sender's count) per pair, the fault engine's `faults` per chain.  Lock
contention per share-point is not shown: lock waits never pass through
faytd (a share-point's lock is a futex in memory the processes share), so
faytd cannot know it, and `top` says so rather than guess.  RAM per
context: what faytd granted it (MAPPED) and what Linux has resident (RSS,
from /proc).
"""
import json
import os
import sys
import time

import libportal
from libportal._abi import lib, INFO_REQ

LOCKS_UNKNOWN = ("lock contention: not known to faytd (lock waits never pass through it: "
                 "docs/cli.md, \"fayt top\")")


def info(conn, what):
    """The whole list (paged INFO calls) through `conn`: what is "rings" or
    "chains".  {"scope": "all" or "uid", what: [...]}."""
    code = {"rings": lib.FAYT_INFO_RINGS, "chains": lib.FAYT_INFO_CHAINS}[what]
    out, after, scope = [], 0, None
    while True:
        page = json.loads(conn.call(lib.FAYT_SYS_INFO, INFO_REQ.pack(code, 0, after))[0])
        scope = page["scope"]
        items = page[what]
        if not items:
            break
        out.extend(items)
        after = items[-1]["id"]
    return {"scope": scope, what: out}


def _ask(args, what):
    conn = libportal.Connection(args.socket)
    try:
        return info(conn, what)
    finally:
        conn.close()


def _name(c):
    """A context as a column: id/pid, or faytd for its own rings."""
    if c == "faytd":
        return "faytd"
    return "%d/%d" % (c["id"], c["pid"])


def _scope_note(scope, what):
    return "" if scope == "all" else "(%s of your uid's contexts only: not core)" % what


def _print(headers, rows, scope, what):
    """The table, "(no WHAT)" if it is empty, and whose rows it holds."""
    from .cli import table
    print(table(headers, rows) if rows else "(no %s)" % what)
    note = _scope_note(scope, what)
    if note:
        print(note)
    return 0


def _ring_row(g):
    depth = "corrupt" if g["corrupt"] else "-" if g["depth"] is None else \
        "%d/%d" % (g["depth"], g["size"])
    return [g["id"], _name(g["sender"]), _name(g["target"]), g["state"], depth,
            "-" if g["posted"] is None else g["posted"], g["drops"], g.get("lost", "-")]


def _chain_row(c):
    n = c["counts"]
    servers = " ".join("%d/%d" % (s["context"], s["pid"]) for s in c["servers"])
    if c["servers_total"] > len(c["servers"]):
        servers += " +%d" % (c["servers_total"] - len(c["servers"]))
    return [c["id"], c["name"], servers or "-", c["regions_total"],
            n["faults"], n["fetched"], n["mapped"], n["failed"], n["write_reports"]]


# what: (the table's headers, a row from an entry of INFO's reply)
_LISTS = {
    "rings": (["RING", "SENDER (id/pid)", "TARGET (id/pid)", "STATE", "DEPTH", "POSTED",
               "DROPS", "LOST"], _ring_row),
    "chains": (["CHAIN", "NAME", "SERVERS (id/pid, in order)", "REGIONS", "FAULTS",
                "FETCHED", "MAPPED", "FAILED", "WRITE REPORTS"], _chain_row),
}


def cmd_list(args):
    """fayt rings, fayt chains: INFO's reply as a table, or as sent (--json)."""
    r = _ask(args, args.what)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    headers, row = _LISTS[args.what]
    return _print(headers, [row(x) for x in r[args.what]], r["scope"], args.what)


def _sample(conn):
    return {"time": time.monotonic(), "contexts": conn.list_contexts(),
            "rings": info(conn, "rings"), "chains": info(conn, "chains")}


def _rate(now, before, dt):
    if now is None or before is None or now < before or dt <= 0:
        return None
    return (now - before) / dt


def view(a, b):
    """What one refresh shows, from samples a then b (a dict, as --json prints it)."""
    from .cli import rss_of
    dt = b["time"] - a["time"]
    me = os.getpid()
    contexts = []
    for c in sorted(b["contexts"]["contexts"], key=lambda c: c["id"]):
        contexts.append({"id": c["id"], "pid": c["pid"], "category": c["category"],
                         "exe": c["exe"], "this_fayt": c["pid"] == me,
                         "connected": c["connected"], "mappings": c["mappings"],
                         "mapped_bytes": c["mapped_bytes"], "rss": rss_of(c["pid"])})
    before = {g["id"]: g for g in a["rings"]["rings"]}
    pairs = []
    for g in b["rings"]["rings"]:
        old = before.get(g["id"])
        base = old["posted"] if old is not None else 0
        pairs.append({"ring": g["id"], "sender": g["sender"], "target": g["target"],
                      "per_second": _rate(g["posted"], base, dt), "depth": g["depth"],
                      "drops": g["drops"], "state": g["state"]})
    before = {c["id"]: c for c in a["chains"]["chains"]}
    chains = []
    for c in b["chains"]["chains"]:
        old = before.get(c["id"])
        base = old["counts"]["faults"] if old is not None else 0
        chains.append({"chain": c["id"], "name": c["name"],
                       "servers": c["servers_total"], "regions": c["regions_total"],
                       "faults_per_second": _rate(c["counts"]["faults"], base, dt),
                       "faults": c["counts"]["faults"], "failed": c["counts"]["failed"]})
    return {"interval": dt, "scope": b["rings"]["scope"], "contexts": contexts,
            "ram_frames": b["contexts"]["ram_frames"],
            "free_frames": b["contexts"]["free_frames"], "pairs": pairs, "chains": chains,
            "lock_contention": None, "lock_contention_why": LOCKS_UNKNOWN}


def _fmt_rate(r):
    return "-" if r is None else "%.1f" % r


def show(v, socket, k, n):
    from .cli import human, table
    lines = ["fayt top: faytd at %s, %.1f s between samples%s" % (
        socket, v["interval"], "" if n is None else " (refresh %d of %d)" % (k, n))]
    rows = []
    for c in v["contexts"]:
        exe = (c["exe"] or "?") + (" (this fayt)" if c["this_fayt"] else
                                   "" if c["connected"] else " (disconnected)")
        rows.append([c["id"], c["pid"], c["category"] or "-", c["mappings"],
                     human(c["mapped_bytes"]), human(c["rss"]), exe])
    lines += ["", "CONTEXTS", table(["ID", "PID", "CATEGORY", "MAPPINGS", "MAPPED", "RSS",
                                     "EXE"], rows)]
    lines.append("RAM frames: %d free of %d" % (v["free_frames"], v["ram_frames"]))
    rows = [[p["ring"], _name(p["sender"]), _name(p["target"]), _fmt_rate(p["per_second"]),
             "-" if p["depth"] is None else p["depth"], p["drops"], p["state"]]
            for p in v["pairs"]]
    lines += ["", "NOTIFICATIONS", table(["RING", "SENDER (id/pid)", "TARGET (id/pid)",
                                          "PER S", "DEPTH", "DROPS", "STATE"], rows)
              if rows else "(no rings)"]
    rows = [[c["chain"], c["name"], c["servers"], c["regions"],
             _fmt_rate(c["faults_per_second"]), c["faults"], c["failed"]] for c in v["chains"]]
    lines += ["", "CHAINS", table(["CHAIN", "NAME", "SERVERS", "REGIONS", "FAULTS/S", "FAULTS",
                                   "FAILED"], rows) if rows else "(no chains)"]
    lines += ["", LOCKS_UNKNOWN]
    if v["scope"] != "all":
        lines.append("(rings and chains of your uid's contexts only: not core)")
    return "\n".join(lines)


def cmd_top(args):
    n = 1 if args.once else args.n
    if args.delay is None or not args.delay > 0 or args.delay == float("inf"):
        sys.stderr.write("fayt: top: -d: %r is not a number of seconds above 0\n" % args.delay)
        return 2
    if n is not None and n < 1:
        sys.stderr.write("fayt: top: -n: %d refreshes: give 1 or more\n" % n)
        return 2
    clear = sys.stdout.isatty() and not args.json
    conn = libportal.Connection(args.socket)
    try:
        a = _sample(conn)
        k = 0
        while n is None or k < n:
            time.sleep(args.delay)
            b = _sample(conn)
            k += 1
            v = view(a, b)
            if args.json:
                print(json.dumps(v), flush=True)
            else:
                text = show(v, args.socket, k, n)
                sys.stdout.write(("\033[H\033[2J" if clear else ("\n" if k > 1 else ""))
                                 + text + "\n")
                sys.stdout.flush()
            a = b
    except KeyboardInterrupt:
        return 0
    finally:
        conn.close()
    return 0


def add_commands(sub, common):
    """The subcommands of this module, on cli.parser()'s subparsers."""
    for what, why in (("rings", "notification rings: sender, target, depth, drops"),
                      ("chains", "chain servers, the regions they serve, faults answered")):
        p = sub.add_parser(what, parents=[common], help=why)
        p.add_argument("--json", action="store_true", help="print faytd's JSON reply")
        p.set_defaults(func=cmd_list, what=what)
    tp = sub.add_parser("top", parents=[common], help="refreshing: contexts, notifications/s "
                        "per pair, faults/s per chain, RAM per context")
    tp.add_argument("-d", "--delay", type=float, default=1.0, metavar="SECONDS",
                    help="seconds between samples (default 1)")
    once = tp.add_mutually_exclusive_group()
    once.add_argument("-n", type=int, default=None, metavar="N",
                      help="refresh N times, then exit (default: until interrupted)")
    once.add_argument("--once", action="store_true", help="one refresh (-n 1)")
    tp.add_argument("--json", action="store_true",
                    help="one JSON object per refresh, one line each")
    tp.set_defaults(func=cmd_top)
