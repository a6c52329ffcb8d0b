"""faytd: the FAYT kernel daemon, in the foreground.

    faytd [--socket PATH] [--config FILE] [--state-dir DIR] [--ram SIZE]
          [-v] [--log-level LEVEL] [--log-format text|json] [--print-config] [--version]
"""
import argparse
import json
import os
import sys

import libportal

from libportal.syscall import default_socket_path

from . import config, logs
from .dirs import secure_dir
from .frames import KernelError
from .kernel import Kernel
from .native import lib as clib
from .server import Server


SUN_PATH_MAX = 107     # sockaddr_un.sun_path: 108 bytes with the final NUL


def main(argv: "list[str] | None" = None) -> int:
    """The `faytd` command (argv: its arguments, default sys.argv[1:]); its exit status."""
    ap = argparse.ArgumentParser(prog="faytd", description="The FAYT kernel daemon.")
    ap.add_argument("--socket", help="syscall socket (default: %s)" % default_socket_path())
    ap.add_argument("--config", help="JSON configuration file (default: embedded)")
    ap.add_argument("--state-dir", help="directory for faytd's state (default: the socket's)")
    ap.add_argument("--ram", help="emulated RAM, e.g. 256MiB (default: 1GiB)")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="log every context (--log-level debug; a --log-level given wins)")
    ap.add_argument("--log-level", choices=logs.LEVELS, default=None,
                    help="least level logged (default: info)")
    ap.add_argument("--log-format", choices=logs.FORMATS, default="text",
                    help="text lines, or one JSON object per line (default: text)")
    ap.add_argument("--print-config", action="store_true",
                    help="print the configuration in force and exit")
    ap.add_argument("--trace", metavar="FILE",
                    help="write a timeline trace (Chrome trace-event JSON, for the Perfetto "
                    "UI) to FILE from the start; completed when faytd stops or at `fayt trace "
                    "stop` (docs/tracing.md)")
    ap.add_argument("--version", action="version", version="faytd %s" % libportal.__version__)
    args = ap.parse_args(argv)
    logs.setup(args.log_level or ("debug" if args.verbose else "info"), args.log_format,
               sys.stderr)
    try:
        cfg = config.load(args.config, {"socket": args.socket, "state_dir": args.state_dir,
                                        "ram": args.ram})
    except (OSError, ValueError) as e:
        ap.error(str(e))
    cfg["socket"] = cfg["socket"] or default_socket_path()
    cfg["state_dir"] = cfg["state_dir"] or os.path.dirname(cfg["socket"])
    path_len = len(os.fsencode(cfg["socket"]))
    if path_len > SUN_PATH_MAX:
        ap.error("socket: %s is %d bytes long; a Unix socket's path has at most %d"
                 % (cfg["socket"], path_len, SUN_PATH_MAX))
    if args.print_config:
        return print_config(cfg)
    # Made 0700 if missing; refused if another uid owns or may write it.
    secure_dir(os.path.dirname(os.path.abspath(cfg["socket"])), "socket directory")
    cfg["state_dir"] = secure_dir(cfg["state_dir"], "state directory")
    # A client that truncates an object faytd maps must not kill faytd with
    # SIGBUS (faytd/core/sigbus.c); the restart's adoption maps too.
    err = clib.fayt_sigbus_guard()
    if err:
        raise SystemExit("faytd: cannot install its SIGBUS handler: %s" % os.strerror(err))
    try:
        kernel = Kernel(cfg, os.getuid())
    except ValueError as e:
        ap.error(str(e))
    try:
        if args.trace:
            kernel.tracing.start(open_trace(args.trace), "faytd --trace")
        server = Server(kernel, cfg["socket"], cfg["socket_mode"])
    except KernelError as e:
        kernel.abandon()
        ap.error("--trace: %s" % e.message)
    except BaseException:           # e.g. another faytd serves the socket: leave nothing
        kernel.abandon()
        raise
    server.serve_forever()
    return 0


def open_trace(path):
    """--trace FILE, opened as the one who started faytd asked: created
    0644 or truncated, never through a symlink (O_NOFOLLOW)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                       | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise KernelError(e.errno, "%s: %s" % (path, e.strerror))


def print_config(cfg):
    """The configuration in force, as JSON, modes written as the docs write
    them ("0600"); a reader that stops early (faytd --print-config | head)
    ends it quietly."""
    shown = dict(cfg, socket_mode="%04o" % cfg["socket_mode"])
    try:
        sys.stdout.write(json.dumps(shown, indent=2) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())   # the flush at exit must not fail again
        os.close(devnull)
    return 0


if __name__ == "__main__":
    sys.exit(main())
