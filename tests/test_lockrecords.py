"""Robust-lock records are bytes their process can write: faytd acts on a
dead context's records only for share-points it was granted a mapping of,
and a live context's records count as a possible holder only for
share-points it mapped (faytd/kernel.py, recover_locks).

The attackers here ignore libportal's lock calls: they write forged records
into their own context page, at the header's layout, and the cross-uid ones
run as uid 65534 (nobody) against a root-owned faytd whose socket is
reachable by all (the fixtures world_faytd and as_user).
"""
import errno
import os
import subprocess
import uuid

import libportal
from libportal._abi import ffi, lib

from support.children import WAIT, Child, sleeping_on_futex, wait_until
from support.daemon import NOBODY, TIMEOUT
from support.layout import lock_state

# Writes forged records into this process's own context page, raw: the page
# is the one faytd made for the connection; its address is where libportal
# mapped it (its layout from the header, through cffi).  argv: socket, then
# (sp_id, state) pairs.
FORGER = r"""
import os, sys, time
import libportal as lp
from libportal._abi import ffi
c = lp.Connection(sys.argv[1])
page = ffi.cast("struct fayt_context_page *", c.context_page)
pairs = [int(x) for x in sys.argv[2:]]
for k in range(0, len(pairs), 2):
    rec = page.held[k // 2 + 10]                         # slots 10, 11, ...
    rec.sp_id = pairs[k]
    rec.state = pairs[k + 1]
print("forged", c.context_id, flush=True)
sys.stdin.readline()
os.kill(os.getpid(), 9)         # dies with the forged records in place
"""

# The records a libportal holder leaves when it dies between taking the lock
# and marking it HELD: its own record rewritten PENDING (raw), then it waits.
PENDING_HOLDER = r"""
import sys, time
import libportal as lp
from libportal._abi import ffi, lib
c = lp.Connection(sys.argv[1]) if len(sys.argv) > 2 else lp.connection()
sp = lp.share_attach(sys.argv[-1], connection=c)
assert sp.lock() == 0
page = ffi.cast("struct fayt_context_page *", c.context_page)
for k in range(lib.FAYT_HELD_LOCKS_MAX):
    if page.held[k].sp_id == sp.sp_id:
        page.held[k].state = lib.FAYT_HELD_PENDING
print("locked", flush=True)
time.sleep(120)
"""


def _forger(as_user, d, pairs, uid=NOBODY):
    args = [d.socket] + [x for p in pairs for x in p]
    p = as_user.popen(FORGER, args, uid=uid, gid=uid, stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = p.stdout.readline()
    assert line.startswith("forged"), p.stderr.read() if p.poll() is not None else line
    return p, int(line.split()[1])


def _context_gone(d, cid):
    c = libportal.Connection(d.socket)
    try:
        return all(x["id"] != cid for x in c.list_contexts()["contexts"])
    finally:
        c.close()


def _end(p):
    if p.poll() is None:
        p.kill()
    p.wait(timeout=TIMEOUT)
    for f in (p.stdin, p.stdout, p.stderr):
        if f:
            f.close()


def test_lockrecord_of_a_context_that_never_mapped_the_share_point_is_ignored(as_user, world_faytd):
    """nobody never maps root's share-points, forges HELD records naming
    them and dies: faytd releases nothing and marks nothing owner-died
    (before: the held lock was released under its holder, and the free one
    marked owner-died)."""
    d = world_faytd()
    conn = libportal.Connection(d.socket)
    held = libportal.share_create("held-" + uuid.uuid4().hex[:8], 4096, connection=conn)
    free = libportal.share_create("free-" + uuid.uuid4().hex[:8], 4096, connection=conn)
    try:
        assert held.lock() == 0
        p, cid = _forger(as_user, d, [(held.sp_id, lib.FAYT_HELD_HELD),
                                      (free.sp_id, lib.FAYT_HELD_HELD)])
        try:
            p.stdin.write("die\n")
            p.stdin.flush()
            p.wait(timeout=TIMEOUT)
            wait_until(lambda: _context_gone(d, cid), "faytd to see the forger die")
        finally:
            _end(p)
        assert held.lock_state == lib.FAYT_LOCK_HELD        # still ours, not marked
        assert held.held and not held.owner_died
        assert free.lock_state == lib.FAYT_LOCK_FREE and not free.owner_died
        held.unlock()
        assert free.try_lock() == 0                          # not EOWNERDEAD
        free.unlock()
        assert "never mapped" in d.read_log()
    finally:
        held.destroy()
        free.destroy()
        conn.close()


def test_lockrecord_forged_by_a_live_context_does_not_block_recovery(as_user, world_faytd):
    """A holder dies between taking the lock and marking its record HELD
    (PENDING).  A live nobody that never mapped the share-point forges a
    PENDING record naming it: the lock is recovered all the same (before:
    the forged record made faytd take it for a possible holder, and the
    lock stayed held for ever)."""
    d = world_faytd()
    conn = libportal.Connection(d.socket)
    name = "pend-" + uuid.uuid4().hex[:8]
    sp = libportal.share_create(name, 4096, connection=conn)
    env = dict(os.environ, FAYT_SOCKET=d.socket)
    holder = Child(PENDING_HOLDER.replace("sys.argv[-1]", repr(name)), env)
    p = None
    try:
        assert holder.expect() == "locked"
        assert lock_state(sp) == lib.FAYT_LOCK_HELD
        p, _ = _forger(as_user, d, [(sp.sp_id, lib.FAYT_HELD_PENDING)])
        holder.kill()
        assert sp.lock(WAIT) == errno.EOWNERDEAD
        sp.mark_consistent()
        sp.unlock()
    finally:
        holder.kill()
        if p is not None:
            _end(p)
        sp.destroy()
        conn.close()


def test_lockrecord_sleeping_waiter_does_not_block_recovery(lp, spawn):
    """The legitimate race: a holder dies between taking the lock and
    marking it HELD while another process sleeps in lock().  The sleeper's
    record says WAITING, not PENDING, so faytd recovers the lock and the
    sleeper gets it with EOWNERDEAD (before: the sleeper's PENDING record
    made faytd skip the recovery, and it slept until its timeout)."""
    name = "t-sp-wait-" + uuid.uuid4().hex[:10]
    sp = lp.share_create(name, 4096)
    try:
        holder = spawn(PENDING_HOLDER.replace("sys.argv[-1]", repr(name)))
        assert holder.expect() == "locked"
        waiter = spawn("""
            sp = lp.share_attach(%r)
            print("waiting")
            try:
                print(sp.lock(%r))
            except lp.TimedOut:
                print("timed out")
                raise SystemExit(0)
            sp.mark_consistent()
            sp.unlock()
            """ % (name, WAIT))
        assert waiter.expect() == "waiting"
        wait_until(lambda: lock_state(sp) == lib.FAYT_LOCK_CONTENDED and
                   sleeping_on_futex(waiter.pid), "the waiter to sleep on the futex")
        holder.kill()
        assert waiter.expect() == str(errno.EOWNERDEAD)
        waiter.finish()
        assert sp.lock(WAIT) == 0
        sp.unlock()
    finally:
        sp.destroy()


def test_lockrecord_waiting_state_while_asleep_in_lock(lp):
    """A thread asleep in lock() records WAITING; PENDING again while it
    tries, HELD once it has the lock."""
    import threading
    name = "t-sp-state-" + uuid.uuid4().hex[:10]
    sp = lp.share_create(name, 4096)
    other = lp.share_attach(name)
    page = ffi.cast("struct fayt_context_page *", sp.connection.context_page)

    def states():
        return sorted(page.held[i].state for i in range(lib.FAYT_HELD_LOCKS_MAX)
                      if page.held[i].sp_id == sp.sp_id)
    try:
        assert other.lock() == 0
        got, done = [], threading.Event()

        def locker():
            got.append(sp.lock(WAIT))
            done.wait(WAIT)
            sp.unlock()
        t = threading.Thread(target=locker)
        t.start()
        wait_until(lambda: states() == [lib.FAYT_HELD_HELD, lib.FAYT_HELD_WAITING],
                   "the sleeper's record to say WAITING")
        other.unlock()
        wait_until(lambda: got, "the sleeper to take the lock")
        assert got == [0] and states() == [lib.FAYT_HELD_HELD]
        done.set()
        t.join(WAIT)
        assert states() == []
    finally:
        other.unmap()
        sp.destroy()


# A live context that mapped the share-point, with a PENDING record for it
# (raw), until told to clear it.
PENDING_MAPPER = r"""
import sys
import libportal as lp
from libportal._abi import ffi
sp = lp.share_attach(%r)
rec = ffi.cast("struct fayt_context_page *", sp.connection.context_page).held[20]
rec.sp_id = sp.sp_id
rec.state = %d
print("pending", flush=True)
sys.stdin.readline()
rec.state = 0
rec.sp_id = 0
print("cleared", flush=True)
sys.stdin.readline()
"""


def test_lockrecord_live_pending_record_defers_recovery_until_it_clears(lp, spawn):
    """A holder dies between taking the lock and marking it HELD while a
    live context that maps the share-point is PENDING (inside its own try:
    it may be the holder).  faytd does not give up: once that record is
    no longer PENDING and nobody alive records the lock, it recovers it
    (before: skipped for good, the lock held for ever)."""
    name = "t-sp-defer-" + uuid.uuid4().hex[:10]
    sp = lp.share_create(name, 4096)
    try:
        holder = spawn(PENDING_HOLDER.replace("sys.argv[-1]", repr(name)))
        assert holder.expect() == "locked"
        mapper = spawn(PENDING_MAPPER % (name, lib.FAYT_HELD_PENDING))
        assert mapper.expect() == "pending"
        holder.kill()
        assert sp.try_lock() == errno.EBUSY         # not yet: the live PENDING record
        mapper.send("clear")
        assert mapper.expect() == "cleared"
        assert sp.lock(WAIT) == errno.EOWNERDEAD
        sp.mark_consistent()
        sp.unlock()
        mapper.finish()
    finally:
        sp.destroy()


# Connects, writes a full page of HELD records naming share-points it never
# mapped, and closes, again and again, staying alive: the churn that, when
# such records kept a context after its connection closed, held a pidfd and
# a context page in faytd for each until the process died (faytd ran out of
# descriptors and refused everyone: issue 9's hostile review).
CHURNER = r"""
import sys
import libportal as lp
from libportal._abi import ffi, lib
rounds = int(sys.argv[2])
for r in range(rounds):
    c = lp.Connection(sys.argv[1])
    page = ffi.cast("struct fayt_context_page *", c.context_page)
    for k in range(64):
        page.held[k].sp_id = 1000000 + k
        page.held[k].state = lib.FAYT_HELD_HELD
    c.close()
print("done", flush=True)
sys.stdin.readline()
"""


def test_lockrecord_naming_unmapped_share_points_keeps_no_context(as_user, world_faytd):
    """A context whose connection closes is kept (watched until its process
    dies) only for records naming share-points it mapped; forged ones keep
    nothing, however many connections the forger makes."""
    d = world_faytd()
    rounds = 200
    p = as_user.popen(CHURNER, [d.socket, rounds], uid=NOBODY, gid=NOBODY,
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = p.stdout.readline()
        assert line.strip() == "done", p.stderr.read() if p.poll() is not None else line
        c = libportal.Connection(d.socket)
        try:
            kept = [x for x in c.list_contexts()["contexts"] if x["pid"] == p.pid]
        finally:
            c.close()
        assert kept == [], "%d contexts of the forger kept" % len(kept)
    finally:
        _end(p)


def _die_holding_a_lock(path):
    """Create a share-point, take its lock and die (SIGKILL) holding it."""
    c = libportal.Connection(path)
    sp = libportal.share_create("lockrec-die-%s" % uuid.uuid4().hex[:12], 4096, connection=c)
    assert sp.lock() == 0
    os.kill(os.getpid(), 9)


def _no_sharepoints(path):
    c = libportal.Connection(path)
    try:
        return not c.list_sharepoints()
    finally:
        c.close()


def test_lockrecord_recovery_keeps_no_descriptor(fresh_faytd):
    """faytd maps a dead holder's share-point meta page to recover its lock;
    that mapping (a descriptor: Python's mmap keeps one) goes with the
    recovery, although the share-point is destroyed by its owner's death
    afterwards.  Found by bench/fuzz.py: each death left one descriptor."""
    from faytd.launch import lasting_fds
    from support.procs import exit_code_of
    d = fresh_faytd()
    assert exit_code_of(_die_holding_a_lock, d.socket) == -9       # warm-up
    wait_until(lambda: _no_sharepoints(d.socket), "the dead owner's share-point to go")
    before = lasting_fds(d.proc.pid)
    for _ in range(20):
        assert exit_code_of(_die_holding_a_lock, d.socket) == -9
    wait_until(lambda: _no_sharepoints(d.socket), "the dead owners' share-points to go")
    wait_until(lambda: lasting_fds(d.proc.pid) <= before,
               "faytd's descriptors back to %d (20 holders died)" % before)
