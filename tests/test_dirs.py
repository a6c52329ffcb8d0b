"""faytd's socket and state directories (faytd/dirs.py): another uid that
made the directory first, or may write it, could put its own socket where
faytd's clients connect or plant a link that faytd's journal follows.  faytd
refuses such a directory, and never follows a link for its own files.

The other uid is real: uid 65534 makes the directories and links, in a
child process (support.procs: this process does not fork)."""
import errno
import os
import shutil
import socket
import uuid

import pytest

from support.daemon import NOBODY, Faytd, faytd_refuses
from support.procs import CTX, call_in_child

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


def _as_nobody(steps):
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    for fn, *args in steps:
        fn(*args)


def as_nobody(*steps):
    """Run steps, (function, arguments...), in a child that is uid 65534
    (a real other uid)."""
    call_in_child(_as_nobody, steps)


def refused(socket, *extra):
    """The stderr of a faytd on socket that must refuse to start (it exits
    non-zero, without a Traceback, and serves nothing)."""
    return faytd_refuses(["--socket", socket, "--ram", "16MiB", *extra], timeout=WAIT)


def test_dirs_a_socket_directory_another_uid_made_first_is_refused(top):
    d = top()
    as_nobody((os.mkdir, d, 0o755))
    err = refused(os.path.join(d, "faytd.sock"))
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
    as_nobody((os.mkdir, d), (os.chmod, d, 0o777),
              (os.symlink, victim, os.path.join(d, "faytd.journal")))
    err = refused(os.path.join(d, "faytd.sock"))
    assert "refusing" in err, err
    assert victim.read_bytes() == b"precious\n"


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o757])
def test_dirs_a_directory_group_or_others_may_write_is_refused(tmp_path, mode):
    d = tmp_path / "sock"
    d.mkdir()
    d.chmod(mode)
    err = refused(str(d / "faytd.sock"))
    assert "group or others may write it (mode %04o)" % mode in err, err


def test_dirs_a_symbolic_link_as_state_directory_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "state"
    link.symlink_to(real)
    err = refused(str(tmp_path / "faytd.sock"), "--state-dir", str(link))
    assert "refusing state directory %s" % link in err \
        and "symbolic link" in err, err


def test_dirs_an_ancestor_others_may_replace_is_refused(tmp_path):
    """Others may write the parent (no sticky bit): they could rename faytd's
    directory away and put their own in its place."""
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)
    d = parent / "fayt"
    d.mkdir(mode=0o700)
    err = refused(str(d / "faytd.sock"))
    assert "its ancestor %s" % parent in err and "no sticky bit" in err, err


def test_dirs_a_journal_link_in_faytd_s_own_directory_is_not_followed(tmp_path):
    """Even in a directory faytd owns (0700), its journal is opened without
    following a link (O_NOFOLLOW)."""
    victim = tmp_path / "elsewhere"
    victim.write_bytes(b"keep\n")
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    (d / "faytd.journal").symlink_to(victim)
    err = refused(str(d / "faytd.sock"))
    assert "symbolic link" in err, err
    assert victim.read_bytes() == b"keep\n"


def test_dirs_a_missing_directory_is_made_0700_and_served(top, tmp_path):
    d = top()
    sock = os.path.join(d, "sub", "faytd.sock")
    f = Faytd(str(tmp_path / "log"), socket=sock, ram="16MiB")      # returns once it serves
    try:
        assert f.proc.poll() is None and os.path.exists(sock), "faytd did not serve"
        for path in (d, os.path.dirname(sock)):
            st = os.stat(path)
            assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o700), path
    finally:
        f.stop()


# -- the client's side: whom it takes for faytd ---------------------------------

def _impostor_run(path, make_dir, ready, out):
    _as_nobody([])
    if make_dir:
        os.mkdir(os.path.dirname(path), 0o755)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    os.chmod(path, 0o666)
    s.listen(1)
    ready.set()
    s.settimeout(3)
    try:
        c, _ = s.accept()
    except socket.timeout:
        out.put("none")
        return
    c.settimeout(3)
    try:
        out.put(str(len(c.recv(4096))))
    except OSError:
        out.put("0")


def _impostor(path, make_dir):
    """A uid-65534 process that listens on path (make_dir: it makes the
    directory first, 0755); result() is what one client sent it: "none" if
    nobody connected within a few seconds, else the byte count."""
    ready, out = CTX.Event(), CTX.Queue()
    p = CTX.Process(target=_impostor_run, args=(path, make_dir, ready, out))
    p.start()
    assert ready.wait(WAIT), "the impostor did not listen"

    def result():
        try:
            return out.get(timeout=WAIT)
        finally:
            p.join(WAIT)
            if p.is_alive():
                p.kill()
                p.join(WAIT)
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
    assert not isinstance(e.value, PermissionError), e.value
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
