"""faytd's socket and state directories (faytd/dirs.py): another uid that
made the directory first, or may write it, could put its own socket where
faytd's clients connect or plant a link that faytd's journal follows.  faytd
refuses such a directory, and never follows a link for its own files.

The other uid is real: uid 65534 makes the directories and links."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

NOBODY = 65534
WAIT = 20


@pytest.fixture
def top():
    """A fresh directory under /tmp (sticky, others may write: like the
    default /tmp/fayt-<uid>'s parent); removed after the test."""
    made = []

    def make():
        d = "/tmp/fayt-dirs-%s" % uuid.uuid4().hex[:10]
        made.append(d)
        return d

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def as_nobody(*steps):
    """Run steps (callables) in a child that is uid 65534 (a real other uid)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            for step in steps:
                step()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "uid %d's steps failed" % NOBODY


def faytd(socket, *extra):
    """Start faytd on socket: (Popen, its stderr as an open file)."""
    log = open("/tmp/fayt-dirs-log-%s" % uuid.uuid4().hex[:8], "w+")
    p = subprocess.Popen([sys.executable, "-m", "faytd", "--socket", socket, "--ram", "16MiB",
                          *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=log)
    return p, log


def refused(socket, *extra):
    """faytd's exit status and its stderr, for a faytd that must refuse to start."""
    p, log = faytd(socket, *extra)
    try:
        p.wait(WAIT)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(WAIT)
        raise AssertionError("faytd served instead of refusing")
    finally:
        log.seek(0)
        text = log.read()
        log.close()
        os.unlink(log.name)
    return p.returncode, text


def test_dirs_a_socket_directory_another_uid_made_first_is_refused(top):
    d = top()
    as_nobody(lambda: os.mkdir(d, 0o755))
    code, err = refused(os.path.join(d, "faytd.sock"))
    assert code != 0
    assert "refusing socket directory %s" % d in err and "owned by uid %d" % NOBODY in err, err
    assert os.listdir(d) == []              # nothing bound, nothing written there


def test_dirs_a_planted_journal_link_is_never_followed(top, tmp_path):
    """The issue's attack: uid 65534 makes faytd's directory and a link named
    like faytd's journal to a root-only file; root's faytd must neither
    truncate nor write that file."""
    victim = tmp_path / "root-only"
    victim.write_bytes(b"precious\n")
    victim.chmod(0o600)
    d = top()
    as_nobody(lambda: os.mkdir(d), lambda: os.chmod(d, 0o777),
              lambda: os.symlink(victim, os.path.join(d, "faytd.journal")))
    code, err = refused(os.path.join(d, "faytd.sock"))
    assert code != 0 and "refusing" in err, err
    assert victim.read_bytes() == b"precious\n"


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o757])
def test_dirs_a_directory_group_or_others_may_write_is_refused(tmp_path, mode):
    d = tmp_path / "sock"
    d.mkdir()
    d.chmod(mode)
    code, err = refused(str(d / "faytd.sock"))
    assert code != 0 and "group or others may write it (mode %04o)" % mode in err, err


def test_dirs_a_symbolic_link_as_state_directory_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "state"
    link.symlink_to(real)
    code, err = refused(str(tmp_path / "faytd.sock"), "--state-dir", str(link))
    assert code != 0 and "refusing state directory %s" % link in err \
        and "symbolic link" in err, err


def test_dirs_an_ancestor_others_may_replace_is_refused(tmp_path):
    """Others may write the parent (no sticky bit): they could rename faytd's
    directory away and put their own in its place."""
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)
    d = parent / "fayt"
    d.mkdir(mode=0o700)
    code, err = refused(str(d / "faytd.sock"))
    assert code != 0 and "its ancestor %s" % parent in err and "no sticky bit" in err, err


def test_dirs_a_journal_link_in_faytd_s_own_directory_is_not_followed(tmp_path):
    """Even in a directory faytd owns (0700), its journal is opened without
    following a link (O_NOFOLLOW)."""
    victim = tmp_path / "elsewhere"
    victim.write_bytes(b"keep\n")
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    (d / "faytd.journal").symlink_to(victim)
    code, err = refused(str(d / "faytd.sock"))
    assert code != 0 and "symbolic link" in err, err
    assert victim.read_bytes() == b"keep\n"


def test_dirs_a_missing_directory_is_made_0700_and_served(top):
    d = top()
    sock = os.path.join(d, "sub", "faytd.sock")
    p, log = faytd(sock)
    try:
        deadline = time.monotonic() + WAIT
        while not os.path.exists(sock) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.poll() is None and os.path.exists(sock), "faytd did not serve"
        for path in (d, os.path.dirname(sock)):
            st = os.stat(path)
            assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o700), path
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(WAIT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(WAIT)
        log.close()
        os.unlink(log.name)


# -- the client's side: whom it takes for faytd ---------------------------------

def _impostor(path, make_dir):
    """A uid-65534 process that listens on path (make_dir: it makes the
    directory first, 0755) and reports on a pipe what one client sent it:
    "none" if nobody connected within a few seconds, else the byte count."""
    import socket as _socket
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.close(ready_r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            if make_dir:
                os.mkdir(os.path.dirname(path), 0o755)
            s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
            s.bind(path)
            os.chmod(path, 0o666)
            s.listen(1)
            os.write(ready_w, b"r")
            s.settimeout(3)
            try:
                c, _ = s.accept()
                c.settimeout(3)
                try:
                    got = len(c.recv(4096))
                except OSError:
                    got = 0
                os.write(w, str(got).encode())
            except _socket.timeout:
                os.write(w, b"none")
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"r", "the impostor did not listen"
    os.close(ready_r)

    def result():
        out = os.read(r, 64).decode()
        os.close(r)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        return out
    return result


def test_dirs_client_refuses_a_socket_in_another_uids_directory(top, lp):
    path = os.path.join(top(), "faytd.sock")
    result = _impostor(path, make_dir=True)
    with pytest.raises(PermissionError) as e:
        lp.Connection(path)
    assert "owned by uid %d" % NOBODY in str(e.value) and "FAYT_FAYTD_UID" in str(e.value)
    assert result() == "none"               # it did not even connect


def test_dirs_client_checks_faytd_s_uid_before_it_sends_anything(top, lp):
    """A root-owned sticky directory others may write (like /tmp): another
    uid's socket there is refused on its SO_PEERCRED, before HELLO."""
    d = top()
    os.mkdir(d)
    os.chmod(d, 0o1777)
    path = os.path.join(d, "faytd.sock")
    result = _impostor(path, make_dir=False)
    with pytest.raises(PermissionError) as e:
        lp.Connection(path)
    assert "runs as uid %d" % NOBODY in str(e.value) and "nothing was sent" in str(e.value)
    assert result() == "0"                  # connected, then closed: no byte


def test_dirs_client_talks_to_the_uid_it_names(top, lp):
    path = os.path.join(top(), "faytd.sock")
    result = _impostor(path, make_dir=True)
    with pytest.raises(OSError) as e:       # it sends HELLO; the impostor never answers
        lp.Connection(path, faytd_uid=NOBODY)
    assert not isinstance(e.value, PermissionError) or "uid" not in str(e.value)
    assert int(result()) > 0


@pytest.mark.parametrize("env, arg, name", [("abc", None, "FAYT_FAYTD_UID"),
                                            (None, -1, "faytd_uid"),
                                            (None, "0", "faytd_uid")])
def test_dirs_client_refuses_a_bad_faytd_uid(lp, monkeypatch, env, arg, name):
    if env is not None:
        monkeypatch.setenv("FAYT_FAYTD_UID", env)
    with pytest.raises(OSError) as e:
        lp.Connection("/nonexistent/faytd.sock", faytd_uid=arg)
    assert e.value.errno == errno.EINVAL and name in str(e.value)
