"""The journal: a faytd killed with SIGKILL and started again on the same
state directory takes its share-points back, data, locks and owners as they
were (DESIGN section 7).  Real faytds, real processes, real SIGKILLs."""
import errno
import os

import pytest

import libportal
from libportal._abi import lib
from support.children import WAIT, share_owner, wait_until
from support.daemon import Faytd, fayt_objects, faytd_refuses, keepers
from support.layout import lock_state


def test_journal_restart_keeps_share_points_their_data_and_names(restartable, spawn):
    d = restartable.start()
    owner = spawn("""
        keep = lp.share_create("j-keep", 3 * 4096)
        keep.write(100, b"survives a faytd SIGKILL")
        gone = lp.share_create("j-gone", 4096)
        gone.destroy()                   # sent without a reply (FAYT_REQ_NOREPLY):
        lp.connection().list_sharepoints()   # a reply says faytd performed it
        print("made")
        sys.stdin.readline()
        print(keep.read(100, 24).decode())           # its own mapping never needed faytd
        keep.write(0, b"still writable")
        print("written")
        sys.stdin.readline()
        """, d.env())
    assert owner.expect() == "made"
    journal = os.path.join(restartable.dir, "faytd.journal")
    assert os.path.exists(journal)
    restartable.kill()
    d = restartable.start()
    assert "restored 1 share-points" in d.read_log()
    conn = libportal.Connection(d.socket)
    try:
        names = {s["identifier"]: s for s in conn.list_sharepoints()}
        assert set(names) == {"j-keep"}                 # the destroyed one stays destroyed
        assert names["j-keep"]["owner"] == owner.pid and names["j-keep"]["owner_alive"]
        sp = libportal.share_attach("j-keep", connection=conn)
        assert sp.read(100, 24) == b"survives a faytd SIGKILL"
        with pytest.raises(libportal.AlreadyExists):
            libportal.share_create("j-keep", 4096, connection=conn)
        fresh = libportal.share_create("j-gone", 4096, connection=conn)   # the name is free
        assert fresh.read(0, 8) == bytes(8)
        fresh.destroy()
        owner.send("go")
        assert owner.expect() == "survives a faytd SIGKILL"
        assert owner.expect() == "written"
        assert sp.read(0, 14) == b"still writable"
        # The owner's death is still seen: an unmapped, ownerless share-point goes.
        owner.kill()
        sp.unmap()
        wait_until(lambda: conn.list_sharepoints() == [], "the orphan to be reclaimed")
    finally:
        conn.close()


def test_journal_destroy_of_a_share_point_mapped_before_the_restart(restartable):
    """Through a connection the killed faytd had: destroy() finds the
    share-point again by identifier (same id) and destroys it; unmap() only
    unmaps here."""
    d = restartable.start()
    old = libportal.Connection(d.socket)
    sp = libportal.share_create("j-destroy-after", 4096, connection=old)
    other = libportal.share_create("j-unmap-after", 4096, connection=old)
    restartable.kill()
    d = restartable.start()
    conn = libportal.Connection(d.socket)
    try:
        assert {s["identifier"] for s in conn.list_sharepoints()} == {"j-destroy-after",
                                                                      "j-unmap-after"}
        sp.destroy()
        assert not sp.mapped
        other.unmap()
        assert not other.mapped
        assert {s["identifier"] for s in conn.list_sharepoints()} == {"j-unmap-after"}
        libportal.share_attach("j-unmap-after", connection=conn).destroy()
    finally:
        conn.close()


def test_journal_lock_holder_that_died_while_faytd_was_down_is_recovered(restartable, spawn):
    d = restartable.start()
    conn = libportal.Connection(d.socket)
    sp = libportal.share_create("j-lock", 4096, connection=conn)
    holder = spawn("""
        sp = lp.share_attach("j-lock")
        assert sp.lock() == 0
        print("locked")
        time.sleep(120)
        """, d.env())
    assert holder.expect() == "locked"
    assert lock_state(sp) == lib.FAYT_LOCK_HELD
    restartable.kill()
    holder.kill()                                   # dies while no faytd runs
    d = restartable.start()
    assert "died while faytd was down" in d.read_log()
    assert sp.lock(WAIT) == errno.EOWNERDEAD        # through the old mapping
    sp.mark_consistent()
    sp.unlock()
    conn2 = libportal.Connection(d.socket)
    try:
        again = libportal.share_attach("j-lock", connection=conn2)
        assert again.lock(WAIT) == 0
        again.unlock()
        again.destroy()
    finally:
        conn2.close()


def test_journal_lock_holder_that_dies_after_the_restart_is_recovered(restartable, spawn):
    d = restartable.start()
    holder = spawn("""
        sp = lp.share_create("j-later", 4096)
        assert sp.lock() == 0
        print("locked")
        time.sleep(120)
        """, d.env())
    assert holder.expect() == "locked"
    restartable.kill()
    d = restartable.start()
    conn = libportal.Connection(d.socket)
    try:
        ps = {c["pid"]: c for c in conn.list_contexts()["contexts"]}
        assert holder.pid in ps and not ps[holder.pid]["connected"]   # watched, no connection
        sp = libportal.share_attach("j-later", connection=conn)
        assert sp.try_lock() == errno.EBUSY
        holder.kill()
        assert sp.lock(WAIT) == errno.EOWNERDEAD     # the new faytd saw it die
        sp.mark_consistent()
        sp.unlock()
        # Its owner is dead and this is the last mapping: unmap reclaims it.
        sp.unmap()
        wait_until(lambda: conn.list_sharepoints() == [], "the orphan to be reclaimed")
        wait_until(lambda: holder.pid not in {c["pid"] for c in
                                              conn.list_contexts()["contexts"]},
                   "the dead holder's context to go")
    finally:
        conn.close()


def test_journal_share_points_of_an_owner_dead_at_restart_are_reclaimed(restartable, spawn):
    d = restartable.start()
    owner = spawn("""
        sp = lp.share_create("j-orphan", 4096)
        print("made")
        time.sleep(120)
        """, d.env())
    assert owner.expect() == "made"
    restartable.kill()
    owner.kill()
    d = restartable.start()
    conn = libportal.Connection(d.socket)
    try:
        assert conn.list_sharepoints() == []
        with pytest.raises(libportal.NotFound):
            libportal.share_attach("j-orphan", connection=conn)
    finally:
        conn.close()
    d.stop()
    assert fayt_objects(restartable.pids) == []


def test_journal_a_clean_stop_leaves_no_journal_and_nothing_to_adopt(restartable):
    d = restartable.start()
    conn = libportal.Connection(d.socket)
    libportal.share_create("j-clean", 4096, connection=conn)
    conn.close()
    d.stop()
    assert not [n for n in os.listdir(restartable.dir) if n.startswith("faytd.journal")]
    assert fayt_objects(restartable.pids) == []
    d = restartable.start()
    assert "restored 0 share-points" in d.read_log()


def test_journal_one_faytd_per_state_directory(restartable, tmp_path):
    restartable.start()
    err = faytd_refuses(["--socket", str(tmp_path / "other.sock"),
                         "--state-dir", restartable.dir], timeout=WAIT)
    assert "another faytd keeps its journal in %s" % restartable.dir in err


def test_journal_a_damaged_journal_is_read_as_far_as_it_goes(restartable, spawn):
    """Garbage lines, a record naming an object that is gone, and a last line
    cut short (faytd killed inside write(2)) are each logged and skipped."""
    d = restartable.start()
    owner = share_owner(spawn, d, "j-whole", b"intact")
    restartable.kill()
    with open(os.path.join(restartable.dir, "faytd.journal"), "ab") as f:
        f.write(b"this is not a record\n")
        (kpid,) = keepers([restartable.dir])
        f.write(b"S 77 %d 1 0 3 4096 /proc/%d/fd/99999 9 6a2d6e6f6e65\n" % (owner.pid, kpid))
        f.write(b"S 78 %d 1 0 3 40")
    d = restartable.start()
    log = d.read_log()
    assert "line" in log and "is not a journal record" in log
    assert "/proc/%d/fd/99999 is gone" % kpid in log
    assert "cut short" in log
    conn = libportal.Connection(d.socket)
    try:
        assert [s["identifier"] for s in conn.list_sharepoints()] == ["j-whole"]
        assert libportal.share_attach("j-whole", connection=conn).read(0, 6) == b"intact"
    finally:
        conn.close()


def test_journal_is_compacted_when_it_grows(restartable):
    """Each change appends a line; when the journal holds far more lines
    than live records, faytd rewrites it while idle (and it still restores)."""
    d = restartable.start()
    path = os.path.join(restartable.dir, "faytd.journal")
    conn = libportal.Connection(d.socket)
    try:
        kept = libportal.share_create("j-kept", 4096, connection=conn)
        kept.write(0, b"kept")
        for i in range(3000):
            libportal.share_create("j-churn-%d" % i, 4096, connection=conn).destroy()

        def lines():
            with open(path, "rb") as f:
                return f.read().count(b"\n")
        assert conn.list_sharepoints()                  # the last destroy was performed
        # 6,002 lines were appended (2 + 3,000 creates and destroys); the live
        # records are 2, so the rewrite at 4 x live + 4,096 lines dropped ~4,100.
        wait_until(lambda: lines() < 2000, "the journal to be compacted")
        assert kept.read(0, 4) == b"kept"
    finally:
        conn.close()
    restartable.kill()
    d = restartable.start()
    conn = libportal.Connection(d.socket)
    try:
        # Its owner (this process) still runs: it is back, with its data.
        assert [s["identifier"] for s in conn.list_sharepoints()] == ["j-kept"]
        sp = libportal.share_attach("j-kept", connection=conn)
        assert sp.read(0, 4) == b"kept"
        sp.destroy()
    finally:
        conn.close()


def test_journal_another_faytd_in_between_does_not_sweep_what_the_journal_names(
        restartable, spawn, tmp_path):
    d = restartable.start()
    share_owner(spawn, d, "j-between", b"not swept")
    restartable.kill()
    other = Faytd(str(tmp_path / "elsewhere"))      # sweeps dead faytds' objects at start
    other.stop()
    d = restartable.start()
    conn = libportal.Connection(d.socket)
    try:
        assert libportal.share_attach("j-between", connection=conn).read(0, 9) == b"not swept"
    finally:
        conn.close()


def test_journal_owner_that_died_holding_its_lock_while_faytd_was_down(restartable, spawn):
    """The owner holds its share-point's lock, faytd is killed, the owner
    dies: the restart recovers the lock (owner-died) before it reclaims the
    owner's share-points, so another mapper is told, not left waiting."""
    d = restartable.start()
    owner = spawn("""
        sp = lp.share_create("j-owner-lock", 4096)
        assert sp.lock() == 0
        print("locked")
        time.sleep(120)
        """, d.env())
    assert owner.expect() == "locked"
    conn = libportal.Connection(d.socket)
    sp = libportal.share_attach("j-owner-lock", connection=conn)
    assert lock_state(sp) == lib.FAYT_LOCK_HELD
    restartable.kill()
    owner.kill()
    restartable.start()
    assert sp.lock(WAIT) == errno.EOWNERDEAD
    sp.unlock()


def test_journal_ids_are_not_reused_after_a_restart(restartable, spawn):
    """A share-point destroyed before the restart may still be locked by a
    live process whose lock record names its id: a new share-point must not
    get that id, or the holder's death would release the new one's lock."""
    d = restartable.start()
    conn = libportal.Connection(d.socket)
    libportal.share_create("j-ids-a", 4096, connection=conn)
    b = libportal.share_create("j-ids-b", 4096, connection=conn)
    holder = spawn("""
        sp = lp.share_attach("j-ids-b")
        assert sp.lock() == 0
        print("locked")
        sys.stdin.readline()
        """, d.env())
    assert holder.expect() == "locked"
    old_id = b.sp_id
    b.destroy()
    assert "j-ids-b" not in {s["identifier"] for s in conn.list_sharepoints()}
    restartable.kill()
    d = restartable.start()
    conn2 = libportal.Connection(d.socket)
    try:
        c = libportal.share_create("j-ids-c", 4096, connection=conn2)
        assert c.sp_id > old_id
        assert c.lock(WAIT) == 0
        holder.kill()
        wait_until(lambda: holder.pid not in {x["pid"] for x in
                                              conn2.list_contexts()["contexts"]},
                   "the holder's death to be seen")
        assert lock_state(c) == lib.FAYT_LOCK_HELD and not c.owner_died
        c.unlock()
        c.destroy()
        libportal.share_attach("j-ids-a", connection=conn2).destroy()
    finally:
        conn2.close()


def test_journal_names_outside_faytd_s_objects_are_not_trusted(restartable):
    d = restartable.start()
    restartable.kill()
    with open(os.path.join(restartable.dir, "faytd.journal"), "ab") as f:
        f.write(b"C 1 1 5 0 0 /fayt.a/b\n")
        f.write(b"S 9 1 5 0 3 4096 /fayt.1.x 4294967296 6a\n")
        f.write(b"S 10 1 5 0 3 4096 /etc/passwd 0 6a\n")
    d = restartable.start()
    log = d.read_log()
    assert log.count("is not a journal record") == 3, log


def test_journal_lock_records_of_a_context_that_never_mapped_are_ignored_at_restart(
        restartable, spawn):
    """A process that never mapped a share-point forges a HELD record naming
    it, and dies while no faytd runs: the restart releases nothing (before:
    the lock was released under its live holder).  What a context had
    mapped comes from the journal (the share-point's owner, A records)."""
    d = restartable.start()
    conn = libportal.Connection(d.socket)
    sp = libportal.share_create("j-forged", 4096, connection=conn)
    assert sp.lock() == 0
    forger = spawn("""
        from libportal._abi import ffi
        c = lp.connection()
        rec = ffi.cast("struct fayt_context_page *", c.context_page).held[0]
        rec.sp_id = %d
        rec.state = %d
        print("forged")
        time.sleep(120)
        """ % (sp.sp_id, lib.FAYT_HELD_HELD), d.env())
    assert forger.expect() == "forged"
    restartable.kill()
    forger.kill()
    d = restartable.start()
    assert sp.lock_state == lib.FAYT_LOCK_HELD and not sp.owner_died
    assert "never mapped" in d.read_log()
    sp.unlock()


def test_journal_an_attacher_s_lock_is_recovered_after_two_restarts(restartable, spawn):
    """The journal's A record (an attach) survives the rewrite a restart
    makes: the holder dies after the second restart, and its lock is
    recovered."""
    d = restartable.start()
    conn = libportal.Connection(d.socket)
    sp = libportal.share_create("j-twice", 4096, connection=conn)
    holder = spawn("""
        sp = lp.share_attach("j-twice")
        assert sp.lock() == 0
        print("locked")
        time.sleep(120)
        """, d.env())
    assert holder.expect() == "locked"
    restartable.kill()
    d = restartable.start()
    restartable.kill()
    d = restartable.start()
    holder.kill()
    assert sp.lock(WAIT) == errno.EOWNERDEAD
    sp.mark_consistent()
    sp.unlock()
