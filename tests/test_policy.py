"""Permissions: a policy maps a client's identity to a category, the category
to rights; a refused call is EPERM and creates nothing.

Identity is what the Linux kernel vouches for (SO_PEERCRED, /proc/<pid>/exe),
so these tests run their clients as processes that really have another uid:
the tests run as root and start the clients as uid/gid 65534 (nobody).  The
daemon's socket is made 0666 (config "socket_mode") inside a directory made
0755 under /tmp, so that such a client can reach it at all (the fixture
world_faytd; as_user runs the clients: support.daemon.AsUser).  How faytd
parses a policy file is test_config.py's.
"""
import errno
import json
import os
import subprocess
import uuid

import pytest

import libportal
from faytd.config import DEFAULT
from libportal._abi import lib
from support.daemon import NOBODY, keepers

OTHER_UID = 12345           # a uid with no passwd entry: the kernel does not care
ALL = lib.FAYT_PORTAL_CLASSES
ANON, SHARE, DIRECT = lib.FAYT_PORTAL_ANON, lib.FAYT_PORTAL_SHARE, lib.FAYT_PORTAL_DIRECT
COW, SPECIAL = lib.FAYT_PORTAL_COW, lib.FAYT_PORTAL_SPECIAL
PAGE = lib.FAYT_PAGE_SIZE
TIMEOUT = 60

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as "
                                                          "another uid")

ALL_CLASSES = ["SHARE", "DIRECT", "ANON", "COW", "SPECIAL"]


# -- the client ------------------------------------------------------------

CLIENT = r"""
import errno, json, os, sys
import libportal as lp
from libportal._abi import lib, HANDLE_REQ

sock, actions = sys.argv[1], json.loads(sys.argv[2])
out = {"uid": os.getuid(), "gid": os.getgid(), "euid": os.geteuid(), "pid": os.getpid(),
       "groups": os.getgroups(), "steps": []}
held = {}


def do(a, c):
    kind = a[0]
    if kind == "anon":
        p = lp.portal(lp.ANON, lp.PROT_RW, a[1], connection=c)
        p.buf[0:5] = b"hello"
        ok = bytes(p.buf[0:5]) == b"hello"
        p.unmap()
        return ok
    if kind == "portal":          # ["portal", type, prot, length, {kwargs}]
        p = lp.portal(a[1], a[2], a[3], connection=c, **a[4])
        if isinstance(p, lp.SharePoint) and p.created:
            p.destroy()
        else:
            p.unmap()
        return True
    if kind == "create":          # ["create", name, length, data]
        sp = held[a[1]] = lp.share_create(a[1], a[2], connection=c)
        sp.write(0, a[3].encode())
        return sp.created
    if kind == "attach":          # ["attach", name, nbytes]
        sp = held[a[1]] = lp.share_attach(a[1], lp.PROT_RW, connection=c)
        return sp.read(0, a[2]).decode()
    if kind == "destroy":
        held[a[1]].destroy()
        del held[a[1]]
        return True
    if kind == "share_destroy":   # the bare SHARE_DESTROY op on our handle
        c.call(lib.FAYT_SYS_SHARE_DESTROY, HANDLE_REQ.pack(held[a[1]].handle))
        return True
    if kind == "unmap":
        held.pop(a[1]).unmap()
        return True
    if kind == "stats":
        return c.stats()["sharepoints"]
    if kind == "me":
        me = [x for x in c.list_contexts()["contexts"] if x["id"] == c.context_id]
        return me[0] if me else None
    if kind == "pause":           # report so far, wait for a line on stdin
        print(json.dumps(out), flush=True)
        sys.stdin.readline()
        return True
    raise ValueError(kind)


try:
    c = lp.Connection(sock)
except lp.PortalError as e:
    out["hello"] = [e.errno, e.strerror]
else:
    out["hello"] = [0, {"category": c.category, "rights": c.rights, "context_id": c.context_id}]
    for a in actions:
        try:
            out["steps"].append([a[0], 0, do(a, c)])
        except lp.PortalError as e:
            out["steps"].append([a[0], e.errno, e.strerror])
print(json.dumps(out), flush=True)
"""


def run_client(as_user, d, actions=(), uid=NOBODY, gid=None):
    """Run CLIENT as uid; return its report (JSON)."""
    env = {"FAYT_FAYTD_UID": str(d.uid)} if d.uid is not None else None
    p = as_user.popen(CLIENT, [d.socket, json.dumps(list(actions))], uid=uid,
                      gid=uid if gid is None else gid, env=env,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    rep = json.loads(out.strip().splitlines()[-1])
    want_gid = uid if gid is None else gid
    assert (rep["uid"], rep["euid"], rep["gid"], rep["groups"]) == (uid, uid, want_gid, [])
    return rep


def steps(rep):
    return [(name, errno.errorcode.get(err, err) if err else 0) for name, err, _ in rep["steps"]]


def _name(tag):
    return "policy-%s-%s" % (tag, uuid.uuid4().hex[:10])


def _core_only_policy(extra_rules=(), default=None, categories=None):
    cats = categories or {"core": {"classes": ALL_CLASSES, "notify_handlers": True}}
    p = {"categories": cats, "rules": [{"uid": 0, "category": "core"}] + list(extra_rules)}
    if default:
        p["default"] = default
    return p


# -- the tests -------------------------------------------------------------

def test_policy_runner_really_changes_uid(as_user, world_faytd):
    """The client is another user as the kernel sees it (SO_PEERCRED)."""
    d = world_faytd()
    rep = run_client(as_user, d, [["me"]])
    assert rep["hello"][0] == 0, rep
    me = rep["steps"][0][2]
    assert (me["uid"], me["pid"], me["category"]) == (NOBODY, rep["pid"], "server")
    assert me["exe"] == as_user.exe


def test_policy_a_uid_above_2_to_the_31_is_served(as_user, world_faytd):
    """uid_t is unsigned: a uid the kernel gives as 3000000000 is that uid
    (SO_PEERCRED read as signed made it negative, and faytd refused it)."""
    d = world_faytd()
    big = 3000000000
    rep = run_client(as_user, d, [["me"], ["anon", PAGE]], uid=big, gid=big)
    assert rep["hello"][0] == 0, rep
    me = rep["steps"][0][2]
    assert (me["uid"], me["category"]) == (big, "server")
    assert steps(rep)[1] == ("anon", 0)


def test_policy_server_category_anon_only(as_user, world_faytd):
    d = world_faytd(_core_only_policy(
        [{"uid": NOBODY, "category": "server"}],
        categories={"core": {"classes": ALL_CLASSES}, "server": {"classes": ["ANON"]}}))
    owned = libportal.Connection(d.socket)
    existing = _name("existing")
    sp = libportal.share_create(existing, 2 * PAGE, connection=owned)
    try:
        before = d.state()
        name = _name("refused")
        rep = run_client(as_user, d, [
            ["anon", 3 * PAGE],
            ["portal", SHARE | ANON, 3, 2 * PAGE, {"identifier": name, "create": True}],
            ["attach", existing, 4],
            ["portal", DIRECT, 3, PAGE, {"paddr": [0x100000]}],
            ["me"],
        ])
        assert rep["hello"] == [0, {"category": lib.FAYT_CATEGORY_SERVER, "rights": ANON,
                                    "context_id": rep["hello"][1]["context_id"]}]
        assert steps(rep) == [("anon", 0), ("portal", "EPERM"), ("attach", "EPERM"),
                              ("portal", "EPERM"), ("me", 0)]
        assert rep["steps"][0][2] is True
        assert "category server may not use SHARE" in rep["steps"][1][2]
        assert "category server may not use DIRECT" in rep["steps"][3][2]
        assert rep["steps"][4][2]["category"] == "server"
        assert rep["steps"][4][2]["uid"] == NOBODY
        assert d.wait_state(before) == before       # nothing created, nothing left
        assert name not in d.state()["shares"]
    finally:
        sp.destroy()
        owned.close()


def test_policy_no_rule_matches_hello_refused(as_user, world_faytd):
    d = world_faytd(_core_only_policy([{"uid": 4242, "category": "core"}]))
    before = d.state()
    rep = run_client(as_user, d, [["anon", PAGE]])
    assert rep["hello"][0] == errno.EPERM, rep
    assert "no policy rule admits uid %d gid %d" % (NOBODY, NOBODY) in rep["hello"][1]
    assert rep["steps"] == []
    assert d.wait_state(before) == before
    # root still matches its rule and is core
    c = libportal.Connection(d.socket)
    assert c.category == lib.FAYT_CATEGORY_CORE
    c.close()


def test_policy_rule_by_gid(as_user, world_faytd):
    d = world_faytd(_core_only_policy(
        [{"gid": 4321, "category": "server"}],
        categories={"core": {"classes": ALL_CLASSES}, "server": {"classes": ["ANON"]}}))
    rep = run_client(as_user, d, [["anon", PAGE]], gid=4321)
    assert rep["hello"][0] == 0 and rep["hello"][1]["category"] == lib.FAYT_CATEGORY_SERVER
    rep = run_client(as_user, d, [["anon", PAGE]], gid=NOBODY)
    assert rep["hello"][0] == errno.EPERM


def test_policy_rule_by_exe_glob(as_user, world_faytd):
    base = os.path.basename(as_user.exe)           # e.g. python3.11
    glob = "*/" + base[:len("python")] + "*"
    cats = {"core": {"classes": ALL_CLASSES},
            "driver": {"classes": ["SHARE", "DIRECT", "ANON"]},
            "server": {"classes": ["ANON"]}}
    rules = [{"exe": "/nonexistent/*", "category": "core"},       # never matches
             {"uid": NOBODY, "exe": glob, "category": "driver"},  # first match wins
             {"uid": NOBODY, "category": "server"}]
    d = world_faytd(_core_only_policy(rules, categories=cats))
    rep = run_client(as_user, d, [["me"]])
    assert rep["hello"][0] == 0, rep
    assert rep["hello"][1]["category"] == lib.FAYT_CATEGORY_DRIVER
    assert rep["hello"][1]["rights"] == SHARE | DIRECT | ANON
    assert rep["steps"][0][2]["exe"] == as_user.exe
    # The exact path matches too; a glob that misses falls through to the uid rule.
    rules[1]["exe"] = as_user.exe
    d2 = world_faytd(_core_only_policy(rules, categories=cats))
    assert run_client(as_user, d2)["hello"][1]["category"] == lib.FAYT_CATEGORY_DRIVER
    rules[1]["exe"] = as_user.exe + "-not"
    d3 = world_faytd(_core_only_policy(rules, categories=cats))
    assert run_client(as_user, d3)["hello"][1]["category"] == lib.FAYT_CATEGORY_SERVER
    # exe alone, no uid rule behind it: a miss is refused.
    d4 = world_faytd(_core_only_policy([{"exe": "/opt/fayt/servers/*", "category": "driver"}],
                                 categories=cats))
    assert run_client(as_user, d4)["hello"][0] == errno.EPERM


def test_policy_default_policy_owner_is_core(as_user, world_faytd):
    d = world_faytd()                      # embedded default policy, socket 0666
    c = libportal.Connection(d.socket)
    try:
        assert c.category == lib.FAYT_CATEGORY_CORE
        assert c.rights == ALL
    finally:
        c.close()
    rep = run_client(as_user, d, [["anon", PAGE], ["me"]])
    assert rep["hello"][1]["category"] == lib.FAYT_CATEGORY_SERVER
    assert rep["hello"][1]["rights"] == SHARE | ANON
    assert steps(rep) == [("anon", 0), ("me", 0)]


def test_policy_default_policy_owner_uid_is_core_when_faytd_runs_as_a_user(as_user, world_faytd):
    """"$owner" is the uid faytd runs as: run faytd as nobody, then nobody is
    core, root is core (uid 0), and any other uid gets the default, server."""
    world_faytd()     # a root faytd first: it sweeps stale objects nobody could not (see below)
    d = world_faytd(as_user=as_user, uid=NOBODY)
    assert os.stat(d.socket).st_uid == NOBODY
    rep = run_client(as_user, d, [["me"]], uid=NOBODY)
    assert rep["hello"][1]["category"] == lib.FAYT_CATEGORY_CORE
    rep = run_client(as_user, d, [["anon", PAGE], ["me"]], uid=OTHER_UID)
    assert rep["hello"][1]["category"] == lib.FAYT_CATEGORY_SERVER
    assert steps(rep) == [("anon", 0), ("me", 0)]
    c = libportal.Connection(d.socket, faytd_uid=NOBODY)     # root names the user's faytd
    assert c.category == lib.FAYT_CATEGORY_CORE
    c.close()


def test_policy_unprivileged_faytd_keeper_takes_its_whole_file_limit(as_user, world_faytd):
    """A faytd run by a user: its object keeper (one open file per live
    object) raises its RLIMIT_NOFILE to the hard limit, runs as that user,
    and its objects are that user's, mode 0600."""
    d = world_faytd(as_user=as_user, uid=NOBODY)
    rep = run_client(as_user, d, [["anon", PAGE]], uid=NOBODY)
    assert steps(rep) == [("anon", 0)]
    (kpid,) = keepers([os.path.dirname(d.socket)])
    assert os.stat("/proc/%d" % kpid).st_uid == NOBODY
    with open("/proc/%d/limits" % kpid) as f:
        soft, hard = next(ln for ln in f if ln.startswith("Max open files")).split()[3:5]
    assert soft == hard
    objs = [os.path.join("/proc/%d/fd" % kpid, n) for n in os.listdir("/proc/%d/fd" % kpid)
            if os.readlink("/proc/%d/fd/%s" % (kpid, n)).startswith("/memfd:fayt")]
    assert objs and all(os.stat(o).st_mode & 0o777 == 0o600 and os.stat(o).st_uid == NOBODY
                        for o in objs)


def test_policy_socket_mode_keeps_other_users_out(as_user, world_faytd):
    """The default socket mode (0600): another user cannot even connect."""
    d = world_faytd(socket_mode="0600")
    assert os.stat(d.socket).st_mode & 0o777 == 0o600
    rep = run_client(as_user, d, [])
    assert rep["hello"][0] == errno.EACCES, rep
    d2 = world_faytd()
    assert os.stat(d2.socket).st_mode & 0o777 == 0o666


@pytest.mark.parametrize("type_, kw", [
    (DIRECT, {"paddr": [0x100000]}),
    (SHARE | DIRECT, {"paddr": [0x100000], "identifier": "policy-direct", "create": True}),
    (COW, {"paddr": [0x100000]}),
    (SPECIAL, {"chain": "pager", "message": "page please"}),
    (SPECIAL | SHARE, {"chain": "pager", "identifier": "policy-special", "create": True}),
])
def test_policy_classes_checked_first_core_told_why_server_eperm(as_user, world_faytd, type_,
                                                                 kw):
    """The policy is checked before the class is looked at: a core client is
    told why the call fails (a free frame for DIRECT and COW, no chain
    server), a server client that it may not use it (EPERM);
    neither creates anything."""
    d = world_faytd()
    before = d.state()
    c = libportal.Connection(d.socket)
    try:
        with pytest.raises(libportal.PortalError) as ei:
            libportal.portal(type_, libportal.PROT_RW, PAGE, connection=c, **kw)
        # SPECIAL is built: with no server on the chain, core is told ENOENT.
        want = ((errno.ENOENT, "no server serves chain 'pager'") if type_ & SPECIAL
                else (errno.EFAULT, "morphology.paddr[0]: frame 0x100000 is free"))
        assert ei.value.errno == want[0] and want[1] in str(ei.value)
    finally:
        c.close()
    rep = run_client(as_user, d, [["portal", type_, 3, PAGE, kw]])
    assert rep["hello"][1]["category"] == lib.FAYT_CATEGORY_SERVER
    assert steps(rep) == [("portal", "EPERM")], rep
    assert "category server may not use" in rep["steps"][0][2]
    assert d.wait_state(before) == before


def test_policy_destroy_by_non_owner_non_core(as_user, world_faytd):
    shared = json.loads(json.dumps(DEFAULT["policy"]))     # root's name, shared (names.md)
    shared["categories"]["server"]["shared_names"] = {"attach": ["policy-victim-*"]}
    d = world_faytd(policy=shared)
    owner = libportal.Connection(d.socket)
    name = _name("victim")
    sp = libportal.share_create(name, 2 * PAGE, connection=owner)
    try:
        sp.write(0, b"survives")
        rep = run_client(as_user, d, [["attach", name, 8], ["destroy", name],
                                      ["share_destroy", name], ["unmap", name]])
        assert rep["hello"][1]["category"] == lib.FAYT_CATEGORY_SERVER
        assert steps(rep) == [("attach", 0), ("destroy", "EPERM"), ("share_destroy", "EPERM"),
                              ("unmap", 0)]
        assert rep["steps"][0][2] == "survives"
        assert "only its owner (pid %d) or a core server may destroy it" % os.getpid() \
            in rep["steps"][1][2]
        assert name in d.state()["shares"]
        assert sp.read(0, 8) == b"survives"
        again = libportal.share_attach(name, connection=owner)     # still attachable
        again.unmap()
    finally:
        sp.destroy()
    assert name not in d.state()["shares"]
    owner.close()


def test_policy_destroy_of_a_users_share_point(as_user, world_faytd):
    """A share-point that nobody's server owns: another server process (same
    uid, another pid) may not destroy it, a core process may, and the owner may."""
    d = world_faytd()
    before = d.state()
    name = _name("owned")
    owner = as_user.popen(CLIENT, [d.socket, json.dumps([["create", name, 2 * PAGE, "mine"],
                                                          ["pause"], ["destroy", name]])],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = json.loads(owner.stdout.readline())
        assert steps(first) == [("create", 0)], first
        rep = run_client(as_user, d, [["attach", name, 4], ["destroy", name], ["unmap", name]])
        assert steps(rep) == [("attach", 0), ("destroy", "EPERM"), ("unmap", 0)]
        assert rep["steps"][0][2] == "mine"
        assert name in d.state()["shares"]
        owner.stdin.write("go\n")
        owner.stdin.flush()
        last = json.loads(owner.stdout.readline())
        assert steps(last) == [("create", 0), ("pause", 0), ("destroy", 0)], last
        assert owner.wait(timeout=TIMEOUT) == 0
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    assert d.wait_state(before) == before
    # And a core process may destroy a server's share-point.
    owner = as_user.popen(CLIENT, [d.socket, json.dumps([["create", name, 2 * PAGE, "mine"],
                                                          ["pause"]])],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert steps(json.loads(owner.stdout.readline())) == [("create", 0)]
        core = libportal.Connection(d.socket)
        libportal.share_attach("uid:%d/%s" % (NOBODY, name), connection=core).destroy()
        assert name not in d.state()["shares"]
        core.close()
        owner.stdin.write("go\n")
        owner.stdin.flush()
        assert owner.wait(timeout=TIMEOUT) == 0
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    assert d.wait_state(before) == before


def test_policy_stats_count_only_the_callers_uid_share_points_unless_core(as_user, world_faytd):
    """FAYT_SYS_STATS is open to every context; its share-point count is
    the caller's uid's unless the caller is core (docs/cli.md, "fayt stats")."""
    d = world_faytd()
    owner = libportal.Connection(d.socket)
    mine = [libportal.share_create(_name("stats-root"), PAGE, connection=owner)
            for _ in range(2)]
    theirs = _name("stats-nobody")
    other = as_user.popen(CLIENT, [d.socket, json.dumps([["stats"], ["create", theirs, PAGE, "x"],
                                                         ["stats"], ["pause"]])],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        rep = json.loads(other.stdout.readline())
        assert rep["hello"][1]["category"] == lib.FAYT_CATEGORY_SERVER
        assert steps(rep) == [("stats", 0), ("create", 0), ("stats", 0)], rep
        assert rep["steps"][0][2] == {"scope": "uid", "count": 0}
        assert rep["steps"][2][2] == {"scope": "uid", "count": 1}
        assert owner.stats()["sharepoints"] == {"scope": "all", "count": 3}
        other.stdin.write("go\n")
        other.stdin.flush()
        assert other.wait(timeout=TIMEOUT) == 0
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
        for f in (other.stdin, other.stdout, other.stderr):
            f.close()
        for sp in mine:
            sp.destroy()
        owner.close()
