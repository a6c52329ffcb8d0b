"""The journal: faytd's share-point table and context pages on disk, so that
a faytd that was killed can be restarted without losing share-points.

What a restarted faytd needs is small: which objects of the keeper
(frames.py: /proc/<keeper pid>/fd/<n>) are share-points (identifier, object
name, frames, prot, owner), and which are the context pages of processes
that may still hold share-point locks (their robust records are in those
pages).  Everything else (ANON portals, rings, notification stacks, SPECIAL
regions, the pool) is not journaled: the keeper closes their objects at the
restart; processes that map them keep their memory but faytd no longer
knows them.

Format: <state_dir>/faytd.journal, one line per change (the share-point
lines S, D and A written by the C core, faytd/core/journal.c, which owns
share-points; C and G by this module), appended with one
write(2) on an O_APPEND descriptor, so a faytd killed at any instant leaves
at worst a last line cut short (ignored when read).  The first line names
the format: "V <FORMAT>".  Format 1 (faytds before versions) had no V line;
format 2 had one; both had S records without the namespace, when names were
global.  They are read as such and migrated in place, since the journal is
rewritten at every start: such a share-point takes the namespace its
creator would name it in now (sharepoint.py: SharePoints.adopt).  A journal
of a format this faytd does not know (a newer faytd's) is refused: faytd
does not start, and neither the journal nor the keeper it names is touched
(UnknownFormat).  Records (format 3):
    S <id> <owner pid> <owner start> <owner uid> <prot> <length> <object> <frames,..> <identifier hex> <namespace>
                                            <namespace>: the uid whose namespace holds the
                                            identifier, or 4294967295 (shared: docs/names.md)
    D <id>                                  share-point destroyed
    C <id> <pid> <start> <uid> <gid> <object>   context page made (HELLO)
    A <context id> <share-point id>         the context mapped a share-point it
                                            did not create (its first mapping)
    G <id>                                  context forgotten
    P <pid> <start>                         faytd parked (SIGSTOPped) that process
                                            (docs/scheduling.md); a faytd before parks
                                            ignores the line (logged)
    U <pid> <start>                         ...and continued it, or let it go
    N <next share-point id> <next context id>   after V in a rewritten journal
<start> is the process's start time (/proc/<pid>/stat field 22), so that a
pid reused by another process is not taken for the one that registered.
No fsync: the journal must survive faytd's death, not the machine's (the
keeper and its objects do not survive a reboot either).  A clean stop (SIGTERM)
destroys everything and removes the journal.  At start the journal is read,
then rewritten with only what is live (a new file renamed over it).
An exclusive flock(2) keeps two faytds off one state directory.
"""
import errno
import fcntl
import logging
import os
import re

from .frames import shared_field, start_time
from .native import core, ffi as cffi, lib as clib

log = logging.getLogger("faytd")

NAME = "faytd.journal"
FORMAT = 3          # what this faytd writes (the V line); it reads 1, 2 and 3
_READS = (1, 2, 3)


class UnknownFormat(ValueError):
    """The journal names a format this faytd does not read (a newer faytd's)."""


def alive(pid, start):
    """Whether pid is still the process that started at `start`."""
    return start is not None and start_time(pid) == start


# What faytd names its objects (frames.py): /proc/<keeper pid>/fd/<n>, and
# "<page 0>+<the rest>" for a split share-point; a journal naming anything
# else is not trusted.
_OBJECT = re.compile(r"/proc/[0-9]{1,10}/fd/[0-9]{1,10}(\+/proc/[0-9]{1,10}/fd/[0-9]{1,10})?")
_U32 = 1 << 32


def _object(name):
    if not _OBJECT.fullmatch(name):
        raise ValueError("not a faytd object name")
    return name


def read(path):
    """(share-point records, context records) live at the end of the journal,
    (next share-point id, next context id): above every id it ever named,
    destroyed ones too (a dead process's lock record may name one), its
    format (None: no journal), and the (pid, start) of the processes parked
    at the end.  UnknownFormat if this faytd cannot read it."""
    sps, ctxs, ids, parks = {}, {}, [1, 1], {}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return [], [], (1, 1), None, []
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnknownFormat("journal %s is a symbolic link: not followed" % path) from None
        raise
    with open(fd, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    version = format_of(path, lines)
    first = 2 if lines[0].startswith(b"V ") else 1      # the records' first line
    if lines and lines[-1] != b"":
        log.warning("journal %s: last line cut short (faytd died while writing it): ignored",
                    path)
    for n, line in enumerate(lines[first - 1:-1], first):
        try:
            f = line.decode("ascii").split(" ")
            if f[0] in ("P", "U") and len(f) == 3:
                key = (_u32(f[1]), int(f[2]))
                if f[0] == "P":
                    parks[key] = True
                else:
                    parks.pop(key, None)
                continue
            _apply(f, sps, ctxs, ids)
        except (ValueError, IndexError, UnicodeDecodeError):
            log.warning("journal %s: line %d is not a journal record: ignored", path, n)
    return list(sps.values()), list(ctxs.values()), tuple(ids), version, list(parks)


def format_of(path, lines):
    """The format the journal's first line names; 1 without a V line."""
    if not lines[0].startswith(b"V "):
        return 1
    try:
        version = int(lines[0][2:].decode("ascii"), 10)
    except (UnicodeDecodeError, ValueError):
        version = None
    if version not in _READS:
        raise UnknownFormat(
            "journal %s: format %s; this faytd reads formats %s and writes %d. A newer "
            "faytd wrote it: run that one on this state directory (or move the journal "
            "away, and its share-points are lost). Nothing was changed."
            % (path, lines[0][2:].decode("ascii", "replace") if version is None else version,
               ", ".join(map(str, _READS[:-1])) + " and %d" % _READS[-1], FORMAT))
    return version


def _u32(v):
    v = int(v)
    if not 0 <= v < _U32:
        raise ValueError("out of range")
    return v


def _apply(f, sps, ctxs, ids):
    kind = f[0]
    if kind == "S" and len(f) in (10, 11):
        r = Record()
        r.kind, r.id, r.pid, r.start, r.uid = "S", _u32(f[1]), int(f[2]), int(f[3]), int(f[4])
        r.prot, r.length, r.object = int(f[5]), int(f[6]), _object(f[7])
        r.frames = [_u32(x) for x in f[8].split(",")]
        r.identifier = bytes.fromhex(f[9])
        r.namespace = _u32(f[10]) if len(f) == 11 else None     # None: before namespaces
        if not r.identifier:
            raise ValueError("bad share-point record")
        sps[r.id] = r
        ids[0] = max(ids[0], r.id + 1)
    elif kind == "D" and len(f) == 2:
        sps.pop(int(f[1]), None)
    elif kind == "C" and len(f) == 7:
        r = Record()
        r.kind, r.id, r.pid, r.start = "C", _u32(f[1]), int(f[2]), int(f[3])
        r.uid, r.gid, r.object = int(f[4]), int(f[5]), _object(f[6])
        r.mapped = set()
        ctxs[r.id] = r
        ids[1] = max(ids[1], r.id + 1)
    elif kind == "A" and len(f) == 3:
        c = ctxs.get(_u32(f[1]))
        if c is not None:
            c.mapped.add(_u32(f[2]))
    elif kind == "G" and len(f) == 2:
        ctxs.pop(int(f[1]), None)
    elif kind == "N" and len(f) == 3:
        ids[0], ids[1] = max(ids[0], _u32(f[1])), max(ids[1], _u32(f[2]))
    else:
        raise ValueError("unknown record")


def _attached(ctx):
    """Ids of the share-points ctx mapped and did not create (the core
    knows; a share-point's creator gets it back at a restart from its S
    record, without an A record)."""
    n = clib.fayt_core_conn_attached(core, ctx.fast, cffi.NULL, 0)
    out = cffi.new("uint32_t[]", max(1, n))
    got = clib.fayt_core_conn_attached(core, ctx.fast, out, n)
    return list(out[0:min(n, got)])


class Record:
    __slots__ = ("kind", "id", "pid", "start", "uid", "gid", "prot", "length", "object",
                 "frames", "identifier", "namespace", "mapped")


class Journal:
    """The journal file.  Its descriptor and line counts are shared with the
    C core (`fast`, faytd/core/journal.c), which appends its records
    to the same O_APPEND descriptor in the same order as Python's."""

    def __init__(self, state_dir, fast):
        self.fast = fast
        os.makedirs(state_dir, mode=0o700, exist_ok=True)   # (main.py checked it: dirs.py)
        self.path = os.path.join(state_dir, NAME)
        self._lockfd = self._take_lock(state_dir)
        self._fd = -1
        self.errors = 0                 # writes of Python's that failed (the C path's: fast)
        self.lines = self.live_lines = 0
        self.next_ids = (1, 1)
        self.parks = []                 # (pid, start) parked when the journal ended
        self.state_dir = os.path.abspath(state_dir)

    @staticmethod
    def _take_lock(state_dir):
        """The state directory's lock: faytd.journal.lock, flock(2)ed.  A
        faytd that does not start after all removes it while it holds it
        (abandon()), so a lock taken on a file that is no longer at the path
        is let go and taken again on the new one."""
        path = os.path.join(state_dir, NAME + ".lock")
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise SystemExit("faytd: %s: %s%s" % (
                    path, e.strerror,
                    " (a symbolic link: not followed)" if e.errno == errno.ELOOP else "")) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise SystemExit("faytd: another faytd keeps its journal in %s (--state-dir)"
                                 % state_dir) from None
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)                # removed by a faytd that gave up: take the new one

    _fd = shared_field("journal_fd")
    lines = shared_field("journal_lines")
    live_lines = shared_field("journal_live")

    # -- reading ----------------------------------------------------------
    def load(self):
        """(share-point records, context records) live at the end of the
        journal; the next ids to hand out are left in self.next_ids.  A
        journal this faytd cannot read stops it (SystemExit), untouched."""
        try:
            sps, ctxs, self.next_ids, version, self.parks = read(self.path)
        except UnknownFormat as e:
            raise SystemExit("faytd: %s" % e) from None
        if version is not None and version != FORMAT:
            log.info("journal %s: format %d (%s); read as such, and migrated in place to "
                     "format %d when faytd rewrites it at start", self.path, version,
                     "before versions: no V line" if version == 1 else
                     "before namespaces: names were global", FORMAT)
        return sps, ctxs

    # -- writing ----------------------------------------------------------
    def open(self, sharepoints, contexts, next_ids, parks=()):
        """Rewrite the journal with what is live now (and the next ids, the
        processes parked: (pid, start)), then append from here."""
        tmp = self.path + ".new"
        try:
            os.unlink(tmp)              # a rewrite that faytd's death cut short
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            live = {sp.id for sp in sharepoints}
            attaches = [b"A %d %d\n" % (c.id, i) for c in contexts for i in _attached(c)
                        if i in live]
            os.write(fd, b"".join([b"V %d\n" % FORMAT, b"N %d %d\n" % next_ids] +
                                  [self._sp_line(sp) for sp in sharepoints] +
                                  [self._ctx_line(c) for c in contexts] + attaches +
                                  [b"P %d %d\n" % k for k in parks]))
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.live_lines = len(sharepoints) + len(contexts) + len(attaches) + len(parks)
        self.lines = self.live_lines

    def wants_compaction(self):
        """Whether the journal has grown well past what is live (then the
        kernel rewrites it when idle: open() again)."""
        return self._fd >= 0 and self.lines > 4 * self.live_lines + 4096

    def _write(self, line, live):
        if self._fd < 0:
            return
        self.lines += 1
        self.live_lines += live
        try:
            os.write(self._fd, line)
        except OSError as e:            # a full disk must not take faytd down
            self.errors += 1
            log.error("journal: cannot write (%s); a restart will not see this change", e)

    @staticmethod
    def _sp_line(sp):
        """The S record of a share-point (a view: sharepoint.py), written by
        the core's one writer of it (journal.c)."""
        frames = sp.frames
        room = 160 + 2 * len(sp.object) + 11 * len(frames) + 2 * len(sp.identifier)
        out = cffi.new("char[]", room)
        n = clib.fayt_journal_sp_line(sp.id, sp.owner_pid, sp.owner_start or 0, sp.owner_uid,
                                      sp.prot, sp.length + sp.data_offset, sp.object.encode(),
                                      cffi.from_buffer("uint32_t[]", frames) if len(frames)
                                      else cffi.NULL, len(frames), sp.namespace,
                                      sp.identifier, len(sp.identifier), out, room)
        return cffi.buffer(out, n)[:]

    @staticmethod
    def _ctx_line(ctx):
        return ("C %d %d %d %d %d %s\n" % (ctx.id, ctx.pid, ctx.start or 0, ctx.uid, ctx.gid,
                                           ctx.page.name)).encode()

    def context_registered(self, ctx):
        self._write(self._ctx_line(ctx), 1)

    def context_gone(self, ctx):
        if ctx.page is not None:
            # Its A records die with it (about as many as the core still knows).
            attached = clib.fayt_core_conn_attached(core, ctx.fast, cffi.NULL, 0)
            self._write(b"G %d\n" % ctx.id, -1 - attached)

    def parked(self, pid, start):
        """faytd is about to stop pid (a park): a restart continues it."""
        self._write(b"P %d %d\n" % (pid, start or 0), 1)

    def unparked(self, pid, start):
        self._write(b"U %d %d\n" % (pid, start or 0), -1)

    def abandon(self):
        """faytd did not start after all: the journal stays as it was (a
        later start on this directory reads it); the lock file goes, removed
        while it is held (_take_lock)."""
        try:
            os.unlink(self.path + ".lock")
        except FileNotFoundError:
            pass
        self.close(remove=False)

    def close(self, remove):
        """Stop writing; remove the journal after a clean shutdown."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if remove:
            for p in (self.path, self.path + ".new", self.path + ".lock"):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        os.close(self._lockfd)
