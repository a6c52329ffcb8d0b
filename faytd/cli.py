"""fayt: look into a running faytd from the shell.

    fayt [--socket PATH] ls [--json]    the share-point table (a core server's: all of
                                        it; anyone else's: its uid's names and the
                                        shared ones, docs/names.md)
    fayt [--socket PATH] ps [--json]    the contexts, and faytd's RAM frames
    fayt [--socket PATH] stats [--json] which path served each call, and more counts
    fayt [--socket PATH] rm NAME...     destroy share-points (their owner's or a core
                                        server's right, as faytd checks it)
    fayt [--socket PATH] kill [-s SIG] CONTEXT...
                                        signal the processes of contexts (fayt's own
                                        uid's, unless it runs as root)
    fayt [--socket PATH] rings|chains [--json]
                                        notification rings; chains (faytd/tools.py)
    fayt [--socket PATH] top [-d SECONDS] [-n N | --once] [--json]
                                        refreshing view of the above (faytd/tools.py)
    fayt gc [--dir DIR]... [--yes] [--json]
                                        leftovers of faytds that are gone (faytd/gc.py)
    fayt [--socket PATH] inject KIND ... | ls | rm
                                        fault injection (faytd/inject_cli.py)

It is an ordinary client: it connects like a server does (so it shows up in
`fayt ps` itself, as "this fayt") and asks with the FAYT_SYS_LIST_SHARE,
FAYT_SYS_LIST_CONTEXTS and FAYT_SYS_STATS system calls, whose replies are JSON.  `--json` prints
that reply as faytd sent it.  RSS comes from /proc (psutil), not from faytd:
faytd knows what it granted, the Linux kernel knows what is resident.
Exit status: 0, 1 if faytd cannot be reached or refuses, 2 for bad usage.
"""
import argparse
import json
import os
import sys

import libportal
from libportal._abi import lib

FRAMES_SHOWN = 3        # first physical addresses printed per share-point


def prot_string(prot):
    """FAYT_PROT_* bits as ls(1) would write them: rw-, r--, rwx."""
    return "".join(c if prot & bit else "-"
                   for c, bit in (("r", lib.FAYT_PROT_READ), ("w", lib.FAYT_PROT_WRITE),
                                  ("x", lib.FAYT_PROT_EXEC)))


def human(n):
    """Bytes as 8.0K, 1.5M; exact below 1 KiB."""
    if n is None:
        return "-"
    for unit in ("", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return "%d" % n if unit == "" else "%.1f%s" % (n, unit)
        n /= 1024.0
    return str(n)


def table(headers, rows):
    """Left-aligned columns, two spaces apart; the last column is not padded."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = []
    for r in [list(headers)] + rows:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1])] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def ask(path, op):
    """The whole list (paged calls) or the counters from faytd, decoded."""
    conn = libportal.Connection(path)
    try:
        if op == lib.FAYT_SYS_LIST_SHARE:
            return conn.list_sharepoints()
        if op == lib.FAYT_SYS_STATS:
            return conn.stats()
        return conn.list_contexts()
    finally:
        conn.close()


def format_frames(frames, total):
    shown = " ".join("%#x" % p for p in frames[:FRAMES_SHOWN])
    more = " ..." if total > FRAMES_SHOWN else ""
    return "%d: %s%s" % (total, shown, more) if total else "0"


def cmd_ls(args):
    shares = ask(args.socket, lib.FAYT_SYS_LIST_SHARE)
    if args.json:
        print(json.dumps(shares, indent=2))
        return 0
    rows = []
    for s in sorted(shares, key=lambda s: s["id"]):
        owner = str(s["owner"]) + ("" if s["owner_alive"] else " (dead)")
        captured = " ".join("%d,%d" % (pid, tid) for pid, tid in s["captured"]) or "-"
        rows.append([s["id"], s["identifier"], s["size"], human(s["mapped_bytes"]),
                     prot_string(s["prot"]), owner, s["namespace"], captured,
                     format_frames(s["frames"], s["nframes"])])
    print(table(["ID", "IDENTIFIER", "SIZE", "MAPPED", "PROT", "OWNER", "NAMESPACE",
                 "CAPTURED (pid,tid)", "FRAMES"], rows))
    if not rows:
        print("(no share-points)")
    return 0


def rss_of(pid):
    import psutil
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def cmd_ps(args):
    info = ask(args.socket, lib.FAYT_SYS_LIST_CONTEXTS)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    me = os.getpid()
    rows = []
    for c in sorted(info["contexts"], key=lambda c: c["id"]):
        exe = c["exe"] or "?"
        if c["pid"] == me:
            exe += " (this fayt)"
        elif not c["connected"]:
            exe += " (disconnected)"
        rows.append([c["id"], c["pid"], c["category"] or "-", c["mappings"],
                     human(c["mapped_bytes"]), human(rss_of(c["pid"])), exe])
    print(table(["ID", "PID", "CATEGORY", "MAPPINGS", "MAPPED", "RSS", "EXE"], rows))
    total, free = info["ram_frames"], info["free_frames"]
    print("RAM frames: %d free of %d (%s free of %s, 4 KiB frames)"
          % (free, total, human(free * lib.FAYT_PAGE_SIZE), human(total * lib.FAYT_PAGE_SIZE)))
    return 0


def cmd_stats(args):
    s = ask(args.socket, lib.FAYT_SYS_STATS)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    rows = [[op, c["fast"], c["python"]] for op, c in s["calls"].items()
            if c["fast"] or c["python"]]
    print(table(["CALL", "C FAST PATH", "PYTHON"], rows))
    fp, fl, cx, sp = s["fast_path"], s["faults"], s["contexts"], s["sharepoints"]
    print("fast path: %s" % ("on" if fp["enabled"] else "off (fast_syscalls: false)"))
    print("SPECIAL faults: %d (%d answered in one call, %d by the loop)"
          % (fl["total"], fl["in_one_call"], fl["by_loop"]))
    print("contexts: %d (%d connected)" % (cx["total"], cx["connected"]))
    print("share-points: %d%s" % (sp["count"], "" if sp["scope"] == "all" else " (your uid's)"))
    print("RAM frames: %d free of %d" % (s["frames"]["free"], s["frames"]["total"]))
    j = s["journal"]
    print("journal: %s" % ("%d write errors" % j["errors"] if j["enabled"] else "none"))
    nt, ch = s["notifications"], s["chains"]
    print("notification rings: %d (%d dropped as corrupt)" % (nt["rings"], nt["drops"]))
    print("chains: %d (%d servers, %d regions)" % (ch["count"], ch["servers"], ch["regions"]))
    inj = s.get("injected")
    if inj is not None:
        print("faults injected: %d (%d rules in force; fayt inject ls)" % (inj["total"],
                                                                         inj["rules"]))
    return 0


def cmd_rm(args):
    """Each share-point by identifier: attached (PROT_NONE), then destroyed;
    faytd decides whether this caller may (the owner, or a core server)."""
    conn = libportal.Connection(args.socket)
    failed = 0
    try:
        for name in args.names:
            try:
                sp = libportal.portal(libportal.SHARE | libportal.ANON, libportal.PROT_NONE,
                                      identifier=name, connection=conn)
                try:
                    sp.destroy()
                except BaseException:
                    if sp.mapped:
                        sp.unmap()
                    raise
            except libportal.PortalError as e:
                sys.stderr.write("fayt: rm %s: %s\n" % (name, e.strerror or e))
                failed = 1
    finally:
        conn.close()
    return failed


def cmd_kill(args):
    """Signal each context's process, found by faytd's record of its pid.
    The pid is pinned with a pidfd and checked again against faytd's list,
    so a pid reused since is not signalled; the signal goes with fayt's own
    privileges (os.kill's rules: its own uid's processes, or any as root)."""
    import signal as _signal
    try:
        sig = int(args.signal) if args.signal.isdigit() else \
            _signal.Signals["SIG" + args.signal.upper().removeprefix("SIG")]
    except KeyError:
        sys.stderr.write("fayt: kill: %s is not a signal\n" % args.signal)
        return 2
    conn = libportal.Connection(args.socket)
    failed = 0
    try:
        for cid in args.contexts:
            pid = _live_pid(conn, cid)
            if pid is None:
                sys.stderr.write("fayt: kill %d: no context %d with a live process\n"
                                 % (cid, cid))
                failed = 1
                continue
            if pid == os.getpid():
                sys.stderr.write("fayt: kill %d: that is this fayt\n" % cid)
                failed = 1
                continue
            try:
                fd = os.pidfd_open(pid)
            except OSError as e:
                sys.stderr.write("fayt: kill %d: pid %d: %s\n" % (cid, pid, e.strerror))
                failed = 1
                continue
            try:
                if _live_pid(conn, cid) != pid:     # gone (and its pid maybe reused) meanwhile
                    sys.stderr.write("fayt: kill %d: its process exited\n" % cid)
                    failed = 1
                    continue
                _signal.pidfd_send_signal(fd, sig)
            except OSError as e:
                sys.stderr.write("fayt: kill %d: pid %d: %s\n" % (cid, pid, e.strerror))
                failed = 1
            finally:
                os.close(fd)
    finally:
        conn.close()
    return failed


def _live_pid(conn, cid):
    for c in conn.list_contexts()["contexts"]:
        if c["id"] == cid:
            return c["pid"] if c.get("alive", True) else None
    return None


def parser():
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: --socket given before the command is not reset by the subparser.
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                        help="faytd's socket (default: $FAYT_SOCKET, else %s)"
                        % libportal.default_socket_path())
    ap = argparse.ArgumentParser(prog="fayt", parents=[common],
                                 description="Look into a running faytd.")
    ap.add_argument("--version", action="version", version="fayt %s" % libportal.__version__)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    ls = sub.add_parser("ls", parents=[common], help="list the share-points")
    ls.add_argument("--json", action="store_true", help="print faytd's JSON reply")
    ls.set_defaults(func=cmd_ls)
    ps = sub.add_parser("ps", parents=[common], help="list the contexts and RAM frames")
    ps.add_argument("--json", action="store_true", help="print faytd's JSON reply")
    ps.set_defaults(func=cmd_ps)
    st = sub.add_parser("stats", parents=[common],
                        help="which path served each call; faults, contexts, frames")
    st.add_argument("--json", action="store_true", help="print faytd's JSON reply")
    st.set_defaults(func=cmd_stats)
    rm = sub.add_parser("rm", parents=[common], help="destroy share-points by identifier")
    rm.add_argument("names", nargs="+", metavar="NAME",
                    help="an identifier as fayt ls shows it (uid:<uid>/<name> for another "
                    "uid's, core only)")
    rm.set_defaults(func=cmd_rm)
    kl = sub.add_parser("kill", parents=[common], help="signal the processes of contexts")
    kl.add_argument("-s", "--signal", default="TERM",
                    help="signal name or number (default TERM)")
    kl.add_argument("contexts", nargs="+", type=int, metavar="CONTEXT",
                    help="a context id as fayt ps shows it")
    kl.set_defaults(func=cmd_kill)
    from . import gc, inject_cli, tools, trace_cli     # rings, chains, top; gc; inject; trace
    tools.add_commands(sub, common)
    gc.add_command(sub, common)
    inject_cli.add_command(sub, common)
    trace_cli.add_command(sub, common)
    return ap


def main(argv: "list[str] | None" = None) -> int:
    """The `fayt` command (argv: its arguments, default sys.argv[1:]); its exit status."""
    args = parser().parse_args(argv)
    args.socket = getattr(args, "socket", None) or libportal.default_socket_path()
    try:
        return args.func(args)
    except libportal.DaemonUnavailable as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        sys.stderr.write("fayt: cannot reach faytd at %s (%s): it is not running there; start "
                         "it with `faytd --socket %s`, or point --socket or FAYT_SOCKET at the "
                         "one that runs\n" % (args.socket, why, args.socket))
        return 1
    except libportal.PortalError as e:
        sys.stderr.write("fayt: %s: %s\n" % (args.command, e.strerror or e))
        return 1
    except BrokenPipeError:                     # fayt ls | head
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
