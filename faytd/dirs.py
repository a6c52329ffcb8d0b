"""faytd's directories: the socket's and the state's, safe from other uids.

A directory that another uid owns, or may write, lets that uid put its own
socket where faytd's clients connect, or plant a symbolic link that faytd's
journal would follow.  So faytd makes a missing directory itself (0700) and
refuses one that:
- is a symbolic link, or not a directory;
- is owned by another uid than faytd's;
- group or others may write;
- sits below a directory that another uid than faytd's or root's owns, or that
  group or others may write without the sticky bit (then they could rename
  the directory away and put their own in its place).
The files faytd makes there are opened with O_NOFOLLOW (and O_EXCL when new):
see journal.py.  The check is StrictModes' rule (OpenSSH) applied to faytd.
"""
import os
import stat


class UnsafeDirectory(SystemExit):
    """faytd refuses to start: the message says which directory and why."""


def _why_unsafe(st, uid, leaf):
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if leaf and st.st_uid != uid:
        return "it is owned by uid %d, not by faytd's uid %d" % (st.st_uid, uid)
    if not leaf and st.st_uid not in (0, uid):
        return "it is owned by uid %d, neither root nor faytd's uid %d" % (st.st_uid, uid)
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and (leaf or not st.st_mode & stat.S_ISVTX):
        return "group or others may write it (mode %04o%s)" % (
            stat.S_IMODE(st.st_mode), "" if leaf else ", no sticky bit")
    return None


def secure_dir(path, what):
    """Make `path` (mode 0700, parents too) unless it exists, then check it
    and its ancestors; `what` names it in the error (e.g. "socket
    directory").  Returns its absolute path; raises UnsafeDirectory."""
    path = os.path.abspath(path)
    uid = os.geteuid()
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = os.path.dirname(p)
    for p in reversed(missing):             # each level 0700, as faytd's own
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise UnsafeDirectory("faytd: %s %s: cannot make %s: %s" % (what, path, p,
                                                                        e.strerror))
    p, leaf = path, True
    while True:
        try:
            st = os.lstat(p) if leaf else os.stat(p)
        except OSError as e:
            raise UnsafeDirectory("faytd: %s %s: %s: %s" % (what, path, p, e.strerror))
        why = _why_unsafe(st, uid, leaf)
        if why:
            where = "" if leaf else " (its ancestor %s)" % p
            raise UnsafeDirectory("faytd: refusing %s %s%s: %s; another uid could put its own "
                                  "socket there or plant a symbolic link faytd would follow"
                                  % (what, path, where, why))
        parent = os.path.dirname(p)
        if parent == p:
            return path
        p, leaf = parent, False
