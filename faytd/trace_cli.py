"""`fayt trace start FILE` and `fayt trace stop`: the timeline trace of a
running faytd (faytd/trace.py, docs/tracing.md).

`start` opens FILE itself, as the user who runs `fayt` (created 0644,
never through a symlink; faytd truncates it once the trace starts), and
passes the descriptor to faytd (FAYT_SYS_TRACE_START, SCM_RIGHTS): faytd
writes where this user may write, and nowhere else.  `stop` ends the trace and completes the JSON;
Perfetto's UI (ui.perfetto.dev) opens the file.  Both are core only.
"""
import json
import os
import sys

import libportal
from libportal._abi import lib


def cmd_start(args):
    try:
        # Not truncated here: faytd truncates it once the trace may start
        # (a refused start, e.g. one already runs into this file, leaves it).
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
    except OSError as e:
        sys.stderr.write("fayt: trace start: %s: %s\n" % (args.file, e.strerror))
        return 1
    try:
        conn = libportal.Connection(args.socket)
        try:
            conn.call(lib.FAYT_SYS_TRACE_START, b"", send_fds=[fd])
        finally:
            conn.close()
    finally:
        os.close(fd)
    print("tracing into %s; `fayt trace stop` ends it" % args.file)
    return 0


def cmd_stop(args):
    conn = libportal.Connection(args.socket)
    try:
        body, _ = conn.call(lib.FAYT_SYS_TRACE_STOP)
    finally:
        conn.close()
    summary = json.loads(body)
    if args.json:
        print(json.dumps(summary))
    else:
        print("trace stopped: %d events; client records dropped (failed a check) %d, lost "
              "(overwritten before faytd read them) %d"
              % (summary["events"], summary["dropped"], summary["lost"]))
    return 0


def add_command(sub, common):
    """`fayt trace`, on cli.parser()'s subparsers."""
    tp = sub.add_parser("trace", parents=[common], help="a timeline trace for the Perfetto UI "
                        "(docs/tracing.md)")
    tsub = tp.add_subparsers(dest="trace_command", metavar="COMMAND")
    tsub.required = True
    st = tsub.add_parser("start", parents=[common], help="start writing the trace to FILE")
    st.add_argument("file", metavar="FILE", help="the trace file (Chrome trace-event JSON)")
    st.set_defaults(func=cmd_start)
    sp = tsub.add_parser("stop", parents=[common], help="stop it and complete the file")
    sp.add_argument("--json", action="store_true", help="print faytd's JSON summary")
    sp.set_defaults(func=cmd_stop)
