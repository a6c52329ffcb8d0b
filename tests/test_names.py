"""Share-point names no one can squat (docs/names.md): a name lives in the
namespace of the uid that names it, unless the policy shares it.

Each test runs a root faytd whose socket uid 65534 (nobody) can reach (mode
0666 in a 0755 directory under /tmp) and clients that really run as 65534:
they start as root, import what they need (the venv's interpreter may sit
under a 0700 home), then drop to 65534 with setgid/setuid before they
connect, so faytd's SO_PEERCRED sees uid 65534.
"""
import copy
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

import libportal
from faytd.config import DEFAULT
from faytd.launch import Faytd

NOBODY = 65534
SHARED = 0xffffffff
TIMEOUT = 60
PAGE = 4096
REPO = os.path.dirname(os.path.dirname(os.path.abspath(libportal.__file__)))

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as "
                                                          "uid 65534")

# -- a client as uid 65534 -------------------------------------------------

_PRELUDE = r"""
import errno, json, os, sys, time, io, contextlib
import libportal as lp
import faytd.cli, faytd.policy
import argparse, gettext, locale
faytd.cli.parser()                  # argparse's lazy imports, made before the drop
os.setgroups([])
os.setgid(%(uid)d)
os.setuid(%(uid)d)
c = lp.Connection(sys.argv[1])


def say(*obj):
    print(json.dumps(obj), flush=True)


def wait():
    sys.stdin.readline()


def attempt(f, *a, **kw):
    try:
        return [0, f(*a, **kw)]
    except OSError as e:
        return [e.errno, e.strerror]
"""


class Nobody:
    """Python code run as uid 65534 against faytd `d` (`c`: its connection;
    say() prints a JSON line for expect(); wait() waits for send())."""

    def __init__(self, d, code, uid=NOBODY):
        src = _PRELUDE % {"uid": uid} + textwrap.dedent(code)
        self.p = subprocess.Popen([sys.executable, "-c", src, d.socket], cwd="/",
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, PYTHONPATH=REPO))

    def expect(self):
        line = self.p.stdout.readline()
        if not line:
            self.p.wait(TIMEOUT)
            raise AssertionError("the uid %d client ended: %s" % (NOBODY, self.p.stderr.read()))
        return json.loads(line)

    def send(self, line="go"):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def finish(self):
        """Let it run to its end; its exit status must be 0."""
        out, err = self.p.communicate(timeout=TIMEOUT)
        assert self.p.returncode == 0, err
        return out

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.communicate(timeout=TIMEOUT)


@pytest.fixture
def nobody():
    made = []

    def run(d, code, uid=NOBODY):
        n = Nobody(d, code, uid)
        made.append(n)
        return n

    yield run
    for n in made:
        n.kill()


# -- a root faytd uid 65534 can reach --------------------------------------

def policy(server_shared=None, core_shared=None):
    """The embedded default policy, with shared names for its server and
    core categories."""
    p = copy.deepcopy(DEFAULT["policy"])
    if server_shared is not None:
        p["categories"]["server"]["shared_names"] = server_shared
    if core_shared is not None:
        p["categories"]["core"]["shared_names"] = core_shared
    return p


@pytest.fixture
def world_dir():
    d = tempfile.mkdtemp(prefix="fayt-names-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start(world_dir):
    """start(policy=None, name="d") -> a root Faytd in world_dir/name (again
    on the same name: a restart on its state directory); kill(d) SIGKILLs it."""
    started = []

    def go(pol=None, name="d"):
        sub = os.path.join(world_dir, name)
        os.makedirs(sub, mode=0o755, exist_ok=True)
        os.chmod(sub, 0o755)
        cfg = {"socket_mode": "0666"}
        if pol is not None:
            cfg["policy"] = pol
        d = Faytd(sub, config=cfg, ram="64MiB")
        started.append(d)
        return d

    def kill(d):
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(TIMEOUT)
        d.stop(check=False)

    go.kill = kill
    yield go
    for d in started:
        log = d.stop()
        assert "Traceback" not in log, log[-3000:]


def listing(d):
    c = libportal.Connection(d.socket)
    try:
        return sorted((s["namespace"], s["identifier"]) for s in c.list_sharepoints())
    finally:
        c.close()


def root_conn(d):
    return libportal.Connection(d.socket)


def check_users(c, name, sp_id, data):
    """As root (connection c): `name` bare is none of root's; as
    "uid:65534/<name>" it is uid 65534's share-point sp_id, holding data."""
    with pytest.raises(libportal.NotFound):
        libportal.share_attach(name, connection=c)
    sp = libportal.share_attach("uid:%d/%s" % (NOBODY, name), connection=c)
    assert sp.sp_id == sp_id and sp.read(0, len(data)) == data
    sp.unmap()


# -- the tests -------------------------------------------------------------

def test_names_squatter_does_not_take_roots_metadata_jobs(start, nobody):
    """uid 65534 made `metadata.jobs` first: root's servers/metadata.py makes
    its own (in uid 0's namespace) and counts its jobs there; the squatter's
    share-point and data are untouched."""
    d = start()
    squatter = nobody(d, """
        sp = lp.share_create("metadata.jobs", 8 * 4096, connection=c)
        sp.write(0, b"squatted")
        say(sp.sp_id)
        wait()
        say(sp.read(0, 8).decode(), [s["namespace"] for s in c.list_sharepoints()])
        sp.destroy()
        """)
    (squat_id,) = squatter.expect()
    r = subprocess.run([sys.executable, "-m", "servers.metadata", "--name", "root",
                        "--interval", "0.001", "--duration", "0.5", "--report", "10"],
                       cwd=REPO, env=dict(os.environ, FAYT_SOCKET=d.socket),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert "created share-point 'metadata.jobs'" in r.stdout, r.stdout
    assert "exists (EEXIST)" not in r.stdout, r.stdout
    assert "no job lost or counted twice" in r.stdout, r.stdout
    assert "destroyed share-point 'metadata.jobs'" in r.stdout, r.stdout
    assert listing(d) == [("uid:%d" % NOBODY, "metadata.jobs")]
    squatter.send()
    assert squatter.expect() == ["squatted", ["uid:%d" % NOBODY]]
    squatter.finish()
    assert listing(d) == []


def test_names_another_uid_cannot_attach_or_take_a_private_name(start, nobody):
    d = start()
    c = root_conn(d)
    try:
        mine = libportal.share_create("names-private", PAGE, connection=c)
        mine.write(0, b"root's")
        other = nobody(d, """
            say(attempt(lambda: lp.share_attach("names-private", connection=c).read(0, 6)
                        .decode()))
            say(attempt(lambda: lp.share_attach("uid:0/names-private", connection=c)))
            say(attempt(lambda: lp.share_create("uid:0/names-taken", 4096, connection=c)))
            sp = lp.share_create("names-private", 4096, connection=c)   # its own
            say(sp.sp_id, sp.read(0, 6).decode("latin-1"))
            sp.write(0, b"nobody")
            own = lp.share_attach("uid:%d/names-private" % os.getuid(), connection=c)
            say(own.sp_id, own.read(0, 6).decode())
            own.unmap()
            sp.destroy()
            """)
        assert other.expect() == [[errno.ENOENT, "share.identifier: no share-point "
                                                 "'names-private'"]]
        assert other.expect() == [[errno.EPERM, "share.identifier: 'uid:0/names-private' "
                                  "names uid 0's namespace; only a core server may name "
                                  "another uid's"]]
        assert other.expect() == [[errno.EPERM, "share.identifier: 'uid:0/names-taken' names "
                                  "uid 0's namespace; only a core server may name another "
                                  "uid's"]]
        theirs, data = other.expect()
        assert theirs != mine.sp_id and data == "\0" * 6
        assert other.expect() == [theirs, "nobody"]
        other.finish()
        assert mine.read(0, 6) == b"root's"
        assert listing(d) == [("uid:0", "names-private")]
        mine.destroy()
    finally:
        c.close()


def test_names_core_addresses_a_users_namespace_explicitly(start, nobody):
    """A core server finds a user's share-point as "uid:<uid>/<name>"; the bare
    name is its own namespace's; a malformed "uid:" form is EINVAL."""
    d = start()
    owner = nobody(d, """
        sp = lp.share_create("names-users", 4096, connection=c)
        sp.write(0, b"nobody's")
        say(sp.sp_id)
        wait()
        """)
    (sp_id,) = owner.expect()
    c = root_conn(d)
    try:
        check_users(c, "names-users", sp_id, b"nobody's")
        for bad in ("uid:/x", "uid:65534", "uid:65534/", "uid:0065534/x", "uid:x/y",
                    "uid:4294967295/x", "uid:1/uid:2/x"):
            with pytest.raises(libportal.InvalidArgument) as e:
                libportal.share_create(bad, PAGE, connection=c)
            assert e.value.strerror == (
                "share.identifier: %r: a name that starts with \"uid:\" is uid:<uid>/<name>, "
                "<uid> in decimal, <name> not empty nor itself starting with \"uid:\"" % bad)
        owner.send()
        owner.finish()
    finally:
        c.close()


def test_names_policy_shared_prefixes_work_across_uids_as_configured(start, nobody):
    """pub.*: the server category may attach (core creates); drop.*: it may
    create and attach.  A shared name is one name for every uid; a category
    the policy does not let create one gets EPERM, not a private copy."""
    d = start(policy(server_shared={"create": ["drop.*"], "attach": ["pub.*"]},
                     core_shared=["pub.*"]))
    c = root_conn(d)
    try:
        board = libportal.share_create("pub.board", PAGE, connection=c)
        board.write(0, b"from root")
        user = nobody(d, """
            b = lp.share_attach("pub.board", connection=c)
            seen = b.read(0, 9).decode()
            b.write(0, b"from user")
            b.unmap()
            say(b.sp_id, seen)
            say(attempt(lp.share_create, "pub.fake", 4096, connection=c))
            box = lp.share_create("drop.box", 4096, connection=c)
            box.write(0, b"dropped")
            say(box.sp_id)
            wait()
            say(sorted((s["namespace"], s["identifier"], s["owner_uid"])
                       for s in c.list_sharepoints()))
            box.destroy()
            """)
        assert user.expect() == [board.sp_id, "from root"]
        assert board.read(0, 9) == b"from user"
        assert user.expect() == [[errno.EPERM, "share.identifier: 'pub.fake' is a shared name "
                                  "(policy pattern 'pub.*'), which this context's category "
                                  "may not create"]]
        (box_id,) = user.expect()
        box = libportal.share_attach("drop.box", connection=c)      # the bare name: shared
        assert box.sp_id == box_id and box.read(0, 7) == b"dropped"
        box.unmap()
        with pytest.raises(libportal.AlreadyExists):
            libportal.share_create("drop.box", PAGE, connection=c)
        private = libportal.share_create("names-root-only", PAGE, connection=c)
        assert listing(d) == [("shared", "drop.box"), ("shared", "pub.board"),
                              ("uid:0", "names-root-only")]
        user.send()         # it lists the shared names, not root's own
        assert user.expect() == [[["shared", "drop.box", NOBODY], ["shared", "pub.board", 0]]]
        user.finish()
        private.destroy()
        board.destroy()
    finally:
        c.close()


def test_names_fayt_ls_as_another_uid_shows_only_its_own_names(start, nobody):
    d = start()
    c = root_conn(d)
    try:
        secret = libportal.share_create("names-root-secret", PAGE, connection=c)
        user = nobody(d, """
            own = lp.share_create("names-nobody-own", 4096, connection=c)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                rc = faytd.cli.main(["--socket", sys.argv[1], "ls", "--json"])
            listed = json.loads(out.getvalue())
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                rc2 = faytd.cli.main(["--socket", sys.argv[1], "ls"])
            say(rc, sorted((s.get("namespace"), s["identifier"], s.get("owner_uid"))
                           for s in listed),
                rc2, out.getvalue())
            own.destroy()
            """)
        rc, listed, rc2, table = user.expect()
        user.finish()
        assert rc == 0 and rc2 == 0
        assert listed == [["uid:%d" % NOBODY, "names-nobody-own", NOBODY]]
        assert "names-root-secret" not in table
        assert "names-nobody-own" in table
        assert table.splitlines()[0].split()[:7] == ["ID", "IDENTIFIER", "SIZE", "MAPPED",
                                                     "PROT", "OWNER", "NAMESPACE"]
        # Core sees every namespace.
        r = subprocess.run([sys.executable, "-m", "faytd.cli", "--socket", d.socket, "ls"],
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        assert "names-root-secret" in r.stdout
        secret.destroy()
    finally:
        c.close()


def test_names_namespaces_survive_a_faytd_restart(start, nobody):
    """Two share-points named alike in two namespaces come back from the
    journal each in its own; the journal's S records name the namespace."""
    d = start()
    owner = nobody(d, """
        sp = lp.share_create("names-kept", 4096, connection=c)
        sp.write(0, b"nobody's")
        say(sp.sp_id)
        wait()
        c2 = lp.Connection(sys.argv[1])         # the restarted faytd
        again = lp.share_attach("names-kept", connection=c2)
        say(again.sp_id, again.read(0, 8).decode(), sp.read(0, 8).decode())
        again.unmap()
        wait()
        """)
    (theirs,) = owner.expect()
    c = root_conn(d)
    mine = libportal.share_create("names-kept", PAGE, connection=c)
    mine.write(0, b"root's")
    mine_id = mine.sp_id
    journal = os.path.join(os.path.dirname(d.socket), "faytd.journal")
    with open(journal) as f:
        lines = f.read().splitlines()
    assert lines[0] == "V 3"
    s_lines = sorted((ln.split()[-1], bytes.fromhex(ln.split()[9])) for ln in lines
                     if ln.startswith("S "))
    assert s_lines == [("0", b"names-kept"), (str(NOBODY), b"names-kept")]
    start.kill(d)
    c.close()
    d = start()
    assert "restored 2 share-points" in open(d.log).read()
    assert listing(d) == [("uid:0", "names-kept"), ("uid:%d" % NOBODY, "names-kept")]
    owner.send()
    assert owner.expect() == [theirs, "nobody's", "nobody's"]
    c = root_conn(d)
    try:
        back = libportal.share_attach("names-kept", connection=c)
        assert back.sp_id == mine_id and back.read(0, 6) == b"root's"
        back.destroy()
        other = libportal.share_attach("uid:%d/names-kept" % NOBODY, connection=c)
        assert other.sp_id == theirs and other.read(0, 8) == b"nobody's"
        other.unmap()
    finally:
        c.close()
    owner.send()
    owner.finish()


def test_names_journal_of_format_2_is_migrated_into_namespaces(start, nobody):
    """A journal written when names were global (format 2: S records with no
    namespace) comes back with each name where its creator would name it
    now: a name the policy shares in the shared namespace, any other in its
    owner's uid's; the journal is rewritten in format 3."""
    pol = policy(server_shared=["pub.*"])
    d = start(pol)
    owner = nobody(d, """
        a = lp.share_create("names-old", 4096, connection=c)
        a.write(0, b"private")
        b = lp.share_create("pub.old", 4096, connection=c)
        b.write(0, b"shared")
        say(a.sp_id, b.sp_id)
        wait()
        """)
    private_id, shared_id = owner.expect()
    journal = os.path.join(os.path.dirname(d.socket), "faytd.journal")
    start.kill(d)
    with open(journal) as f:
        lines = f.read().splitlines()
    old = ["V 2"] + [" ".join(ln.split()[:10]) if ln.startswith("S ") else ln
                     for ln in lines[1:]]
    with open(journal, "w") as f:
        f.write("\n".join(old) + "\n")
    d = start(pol)
    log = open(d.log).read()
    assert ("journal %s: format 2 (before namespaces: names were global); read as such, and "
            "migrated in place to format 3 when faytd rewrites it at start" % journal) in log
    assert "restored 2 share-points" in log
    assert listing(d) == [("shared", "pub.old"), ("uid:%d" % NOBODY, "names-old")]
    with open(journal) as f:
        assert f.readline() == "V 3\n"
    c = root_conn(d)
    try:
        check_users(c, "names-old", private_id, b"private")
        sp = libportal.share_attach("pub.old", connection=c)
        assert sp.sp_id == shared_id and sp.read(0, 6) == b"shared"
        sp.unmap()
    finally:
        c.close()
    owner.send()
    owner.finish()


def test_names_metadata_does_not_adopt_a_share_point_another_uid_made(start, nobody):
    """With metadata.* shared by the policy, uid 65534 may make
    metadata.jobs first: root's servers/metadata.py attaches it (EEXIST),
    sees that another uid made it, and refuses it, untouched."""
    d = start(policy(server_shared=["metadata.*"], core_shared=["metadata.*"]))
    squatter = nobody(d, """
        sp = lp.share_create("metadata.jobs", 8 * 4096, connection=c)
        sp.write(0, b"squatted")
        say(sp.sp_id)
        wait()
        say(sp.read(0, 4096).rstrip(b"\\0").decode())
        sp.destroy()
        """)
    squatter.expect()
    r = subprocess.run([sys.executable, "-m", "servers.metadata", "--name", "root",
                        "--duration", "0.5"], cwd=REPO, env=dict(os.environ, FAYT_SOCKET=d.socket),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode != 0, r.stdout
    assert ("share-point 'metadata.jobs' exists but uid %d made it, not an instance of this "
            "server (uid 0): not adopted" % NOBODY) in r.stderr, (r.stdout, r.stderr)
    squatter.send()
    assert squatter.expect() == ["squatted"]
    squatter.finish()


@pytest.mark.parametrize("shared, message", [
    (["pub.*.x"], "policy: category server: shared_names: 'pub.*.x': a pattern is a name, or "
                  "a prefix followed by one '*' at its end"),
    (["pub.?"], "policy: category server: shared_names: 'pub.?': a pattern is a name"),
    (["uid:0/x"], "policy: category server: shared_names: 'uid:0/x': \"uid:\" starts a uid's "
                  "namespace, never a shared name"),
    ([""], "policy: category server: shared_names: '' is not a name or a prefix followed "
           "by '*'"),
    ({"create": ["a.*"], "read": ["b.*"]},
     "policy: category server: shared_names: unknown keys ['read'] (create, attach)"),
    ("pub.*", "policy: category server: shared_names must be a list or dict"),
    (["p%d.*" % i for i in range(65)], "policy: 65 shared_names patterns; at most 64"),
])
def test_names_bad_shared_names_policy_faytd_exits(world_dir, shared, message):
    sub = tempfile.mkdtemp(dir=world_dir)
    cfg = os.path.join(sub, "faytd.json")
    with open(cfg, "w") as f:
        json.dump({"policy": policy(server_shared=shared)}, f)
    sock = os.path.join(sub, "faytd.sock")
    r = subprocess.run([sys.executable, "-m", "faytd", "--socket", sock, "--config", cfg],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists(sock)
