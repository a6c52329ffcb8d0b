"""`fayt gc`: what faytds that are gone left behind, found and (with --yes)
removed.  It needs no faytd: it looks at /proc, the state directories and
/dev/shm.

A state directory (faytd's --state-dir, by default its socket's directory)
whose faytd is gone holds, after a SIGKILL or a crash:
- its object keeper (faytd/core/keeper.c), a process named fayt-keeper that
  holds every share-point's and portal's memory, waiting for a restarted
  faytd to take it over.  Ended (SIGKILL through a pidfd), the memory is
  freed;
- the keeper's socket faytd.keeper, faytd's socket faytd.sock (nobody
  listens) and the journal's lock file faytd.journal.lock (nobody holds
  it): removed.
The journal itself (faytd.journal) is kept: it is what a restart reads
(docs/restart.md); a faytd started there later finds the objects the
ended keeper held gone.  A faytd is gone when no process holds the
journal's lock (flock(2), seen in /proc/locks: nothing is locked or
connected to in order to find out).

Which directories: those named with --dir (only those), else the default
socket's directory and that of every fayt-keeper process found in /proc,
and then also the objects in /dev/shm whose names start with "fayt" that
no process holds open or mapped (faytd itself makes none: its objects are
memfds in its keeper; earlier versions, or a program built on libportal,
may leave such objects).

Rights: fayt gc acts with its own privileges and only on its own uid's
leftovers (directories, files, keepers, /dev/shm objects that uid owns),
unless it runs as root, which sees and acts on every uid's.  Another uid's
are neither shown nor touched.  Dry run by default: it says what it would
do; --yes does it.
"""
import json
import os
import signal
import stat
import sys

from libportal.syscall import default_socket_path

from .launch import keepers

KEEPER = "faytd.keeper"
SOCKET = "faytd.sock"
LOCK = "faytd.journal.lock"
SHM = "/dev/shm"


def _mine(st, uid):
    return uid == 0 or st.st_uid == uid


def _keepers():
    """{pid: (uid, state dir or None)} of the live fayt-keeper processes."""
    out = {}
    for pid, path in keepers().items():
        try:
            uid = os.stat("/proc/%d" % pid).st_uid
        except OSError:
            continue
        out[pid] = (uid, os.path.realpath(os.path.dirname(path)) if path else None)
    return out


def _locked_inodes():
    """{(major, minor, inode)} that a flock or POSIX lock holds now."""
    out = set()
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6 or parts[1] == "->":
                    continue
                try:
                    mj, mn, ino = parts[5].split(":")
                    out.add((int(mj, 16), int(mn, 16), int(ino)))
                except ValueError:
                    continue
    except OSError:
        pass
    return out


def _alive(d, locked):
    """Whether a faytd holds the journal lock of state directory d."""
    try:
        st = os.stat(os.path.join(d, LOCK), follow_symlinks=False)
    except OSError:
        return False
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in locked


def _objects(pid):
    """(count, bytes) of the memfds keeper pid holds."""
    base = "/proc/%d/fd/" % pid
    n = size = 0
    try:
        names = os.listdir(base)
    except OSError:
        return None, None
    for fd in names:
        try:
            if not os.readlink(base + fd).startswith("/memfd:fayt"):
                continue
            size += os.stat(base + fd).st_size
            n += 1
        except OSError:
            continue
    return n, size


def _held_shm():
    """Names under /dev/shm that a process we can see holds open or mapped."""
    held = set()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        base = "/proc/%s/" % p
        try:
            for fd in os.listdir(base + "fd"):
                try:
                    link = os.readlink(base + "fd/" + fd)
                except OSError:
                    continue
                if link.startswith(SHM + "/"):
                    held.add(link[len(SHM) + 1:].split(" (deleted)")[0])
            with open(base + "maps") as f:
                for line in f:
                    i = line.find(SHM + "/")
                    if i >= 0:
                        held.add(line[i + len(SHM) + 1:].strip().split(" (deleted)")[0])
        except OSError:
            continue
    return held


def find(dirs=None, uid=None):
    """What gc would remove, as a list of dicts (kind, path or pid, why)."""
    uid = os.geteuid() if uid is None else uid
    live_keepers = _keepers()
    shm_too = dirs is None
    if dirs is None:
        dirs = [os.path.dirname(default_socket_path())]
        dirs += [d for (kuid, d) in live_keepers.values() if d and (uid == 0 or kuid == uid)]
    locked = _locked_inodes()
    found = []
    for d in dict.fromkeys(os.path.realpath(x) for x in dirs):
        try:
            st = os.stat(d, follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or not _mine(st, uid) or _alive(d, locked):
            continue
        for pid, (kuid, kd) in sorted(live_keepers.items()):
            if kd == d and (uid == 0 or kuid == uid):
                n, size = _objects(pid)
                found.append({"kind": "keeper", "pid": pid, "dir": d, "objects": n,
                              "bytes": size, "why": "the object keeper of a faytd that is gone"})
        for name, why in ((KEEPER, "the socket of that keeper"),
                          (SOCKET, "the socket of a faytd that is gone"),
                          (LOCK, "the journal lock of a faytd that is gone")):
            p = os.path.join(d, name)
            try:
                fst = os.stat(p, follow_symlinks=False)
            except OSError:
                continue
            want = stat.S_ISSOCK if name != LOCK else stat.S_ISREG
            if want(fst.st_mode) and _mine(fst, uid):
                if name == KEEPER and any(f["kind"] == "keeper" and f["dir"] == d
                                          for f in found):
                    why = "the socket of that keeper"
                elif name == KEEPER:
                    why = "the socket of a keeper that is gone"
                found.append({"kind": "file", "path": p, "dir": d, "why": why})
    try:
        shm = sorted(n for n in os.listdir(SHM) if n.startswith(("fayt", "sem.fayt"))) \
            if shm_too else []
    except OSError:
        shm = []
    if shm:
        held = _held_shm()
        for name in shm:
            p = os.path.join(SHM, name)
            try:
                fst = os.stat(p, follow_symlinks=False)
            except OSError:
                continue
            if name not in held and _mine(fst, uid):
                found.append({"kind": "shm", "path": p, "bytes": fst.st_size,
                              "why": "a fayt object in /dev/shm no process holds"})
    return found


def remove(item):
    """Do what `item` says; None, or why it could not be done."""
    try:
        if item["kind"] == "keeper":
            fd = os.pidfd_open(item["pid"])
            try:
                with open("/proc/%d/stat" % item["pid"], "rb") as f:
                    if b"(fayt-keeper)" not in f.read():
                        return "pid %d is no longer a keeper" % item["pid"]
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            finally:
                os.close(fd)
        else:
            os.unlink(item["path"])
    except OSError as e:
        return e.strerror or str(e)
    return None


def _what(item):
    if item["kind"] == "keeper":
        return "keeper pid %d of %s (%s objects, %s bytes)" % (
            item["pid"], item["dir"], "?" if item["objects"] is None else item["objects"],
            "?" if item["bytes"] is None else item["bytes"])
    return item["path"]


def cmd_gc(args):
    found = find(args.dirs or None)
    failed = 0
    for item in found:
        item["done"] = False
        if args.yes:
            why = remove(item)
            item["done"] = why is None
            if why is not None:
                item["error"] = why
                failed = 1
    if args.json:
        print(json.dumps({"dry_run": not args.yes, "leftovers": found}, indent=2))
        return failed
    for item in found:
        if not args.yes:
            print("would remove %s: %s" % (_what(item), item["why"]))
        elif item["done"]:
            print("removed %s" % _what(item))
        else:
            sys.stderr.write("fayt: gc: %s: %s\n" % (_what(item), item["error"]))
    if not found:
        print("nothing left over")
    elif not args.yes:
        print("(a dry run: fayt gc --yes removes them)")
    return failed


def add_command(sub, common):
    gc = sub.add_parser("gc", parents=[common],
                        help="find (and with --yes remove) what faytds that are gone left")
    gc.add_argument("--dir", dest="dirs", action="append", metavar="DIR",
                    help="a state directory to look at (repeatable; default: the default "
                    "socket's directory and every fayt-keeper's)")
    gc.add_argument("--yes", action="store_true", help="remove them (default: a dry run)")
    gc.add_argument("--json", action="store_true", help="print what was found as JSON")
    gc.set_defaults(func=cmd_gc)
