"""`fayt inject`: fault-injection rules from the shell (faytd/injection.py,
docs/testing.md, docs/cli.md).

    fayt inject fail TARGET OP [--errno E]      a system call fails (default EIO)
    fayt inject delay TARGET OP MS              a system call is performed MS late
    fayt inject kill-lock TARGET SHARE          killed holding SHARE's lock
    fayt inject kill-handler TARGET SLOT        killed at its handler's entry
    fayt inject kill-after TARGET N             killed after N notifications
    fayt inject drop-doorbell TARGET            its posts ring no doorbell
    fayt inject delay-doorbell TARGET MS        its posts ring MS late
    fayt inject fail-page CHAIN [--errno E]     the chain's page requests fail (SIGBUS)
    fayt inject slow-chain CHAIN MS             they reach its server MS late
    fayt inject ls [--json]                     the rules and the faults they injected
    fayt inject rm RULE... | --all              remove rules

with --after N, --count N, --probability P, --seed S on every rule.
TARGET is a context id, pid:PID, or a published name.  The rule stays in
faytd after fayt exits, until it is removed or its target goes.
"""
import json
import sys

import libportal

from . import testing

# kind: (positional arguments after the target, their help)
_KINDS = {
    "fail": (["op"], "a system call of TARGET fails with --errno (default EIO)"),
    "delay": (["op", "delay_ms"], "a system call of TARGET is performed DELAY_MS late"),
    "kill-lock": (["share"], "TARGET dies (SIGKILL) holding SHARE's lock (libportal)"),
    "kill-handler": (["slot"], "TARGET dies at the entry of its handler of SLOT (libportal)"),
    "kill-after": (["notifications"], "TARGET dies after NOTIFICATIONS handled (libportal)"),
    "drop-doorbell": ([], "TARGET's posts ring no doorbell (libportal)"),
    "delay-doorbell": (["delay_ms"], "TARGET's posts ring DELAY_MS late (libportal)"),
    "fail-page": ([], "CHAIN's page requests fail with --errno (the client gets SIGBUS)"),
    "slow-chain": (["delay_ms"], "CHAIN's page requests reach its server DELAY_MS late"),
}
_INTS = {"delay_ms", "slot", "notifications"}


def _target(text):
    """A context id, pid:PID, or a published name."""
    if text.isdigit():
        return {"target": int(text)}
    if text.startswith("pid:") and text[4:].isdigit():
        return {"pid": int(text[4:])}
    return {"target": text}


def cmd_add(args):
    params = {}
    for name in _KINDS[args.kind][0]:
        v = getattr(args, name)
        if name in _INTS:
            try:
                v = int(v)
            except ValueError:
                sys.stderr.write("fayt: inject %s: %s: %r is not a number\n"
                                 % (args.kind, name.upper(), v))
                return 2
        if name == "op" and v.isdigit():
            v = int(v)
        params[name] = v
    if args.kind in ("fail", "fail-page"):
        params["errno"] = int(args.errno) if args.errno.isdigit() else args.errno
    if args.kind in ("fail-page", "slow-chain"):
        params["chain"] = args.where
    else:
        params.update(_target(args.where))
    conn = libportal.Connection(args.socket)
    try:
        f = testing.inject(args.kind, connection=conn, after=args.after, count=args.count,
                           probability=args.probability, seed=args.seed, **params)
        print("rule %d" % f.id)
    finally:
        conn.close()
    return 0


def cmd_ls(args):
    conn = libportal.Connection(args.socket)
    try:
        r = testing.injected(connection=conn)
    finally:
        conn.close()
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    from .cli import table
    rows = []
    for x in r["rules"]:
        where = x.get("chain") or "%s/%s" % (x.get("context", "?"), x.get("pid", "?"))
        what = ", ".join("%s=%s" % (k, x[k]) for k in ("op", "errno", "delay_ms", "share",
                                                        "slot", "notifications") if k in x)
        when = "after %d, count %s, p %g, seed %d" % (x["after"], x["count"] or "-",
                                                       x["probability"], x["seed"])
        rows.append([x["id"], x["kind"], where, what or "-", when, x["events"], x["fired"],
                     "yes" if x["active"] else x.get("ended", "no")])
    print(table(["RULE", "KIND", "TARGET (id/pid or chain)", "WHAT", "WHEN", "EVENTS",
                 "FIRED", "ACTIVE"], rows) if rows else "(no rules)")
    c = r["counts"]
    print("faults injected: %d" % c["total"])
    for e in r["log"][-10:]:
        who = e.get("chain") or "context %s (pid %s)" % (e.get("context"), e.get("pid"))
        print("  #%d rule %d: %s: %s" % (e["seq"], e["rule"], who, e["what"]))
    return 0


def cmd_rm(args):
    from libportal._abi import HANDLE_REQ, lib
    if not args.all and not args.rules:
        sys.stderr.write("fayt: inject rm: give RULE numbers or --all\n")
        return 2
    conn = libportal.Connection(args.socket)
    failed = 0
    try:
        if args.all:
            print("removed %d rule(s)" % testing.remove_faults(connection=conn))
        for rid in args.rules:
            try:
                conn.call(lib.FAYT_SYS_INJECT_REMOVE, HANDLE_REQ.pack(rid))
            except libportal.PortalError as e:
                sys.stderr.write("fayt: inject rm %d: %s\n" % (rid, e.strerror or e))
                failed = 1
    finally:
        conn.close()
    return failed


def add_command(sub, common):
    """`fayt inject`, on cli.parser()'s subparsers."""
    ip = sub.add_parser("inject", parents=[common], help="inject faults on purpose: fail, "
                        "delay or kill (docs/testing.md)")
    isub = ip.add_subparsers(dest="inject_kind", metavar="KIND")
    isub.required = True
    when = __import__("argparse").ArgumentParser(add_help=False)
    when.add_argument("--after", type=int, default=0, metavar="N",
                      help="let N events pass first (default 0)")
    when.add_argument("--count", type=int, default=None, metavar="N",
                      help="inject at most N faults (default: 1 for kills, else no bound)")
    when.add_argument("--probability", type=float, default=1.0, metavar="P",
                      help="each event past --after fires with probability P (default 1)")
    when.add_argument("--seed", type=int, default=0, metavar="S",
                      help="the seed of the draws: the same seed, the same events (default 0)")
    for kind, (names, why) in _KINDS.items():
        p = isub.add_parser(kind, parents=[common, when], help=why)
        chain = kind in ("fail-page", "slow-chain")
        p.add_argument("where", metavar="CHAIN" if chain else "TARGET",
                       help="a chain's name" if chain else
                       "a context id, pid:PID, or a published name")
        for n in names:
            p.add_argument(n, metavar=n.upper())
        if kind in ("fail", "fail-page"):
            p.add_argument("--errno", default="EIO", help="an errno name or number (EIO)")
        p.set_defaults(func=cmd_add, kind=kind)
    ls = isub.add_parser("ls", parents=[common], help="the rules and what they injected")
    ls.add_argument("--json", action="store_true", help="print faytd's JSON reply")
    ls.set_defaults(func=cmd_ls)
    rm = isub.add_parser("rm", parents=[common], help="remove rules")
    rm.add_argument("rules", nargs="*", type=int, metavar="RULE")
    rm.add_argument("--all", action="store_true", help="every rule you may remove")
    rm.set_defaults(func=cmd_rm)
