"""Limits per uid and per process, the core's reserves, fairness, paged lists
(docs/limits.md; issue 12, parts 1 and 2).

Every attacker here is a process of uid 65534 (nobody) against a root-owned
faytd whose socket is reachable by all.  The helpers that run Python as
another uid and start such a faytd are copied from test_policy.py (tests/
is being reorganised: this file depends on no other test module).
"""
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

import libportal
from faytd.launch import LAST, RUNS, STARTED
from faytd.sched import _state      # a process's state letter from /proc
from libportal._abi import lib, NOTIFY_OPEN, STACK_REQ

from bench.cases import FLOODER     # the bench's flood, as in its "fair" rows

NOBODY = 65534
OTHER_UID = 12345
TIMEOUT = 120

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as "
                                                          "another uid")


# Clients run as another uid through the harness's as_user fixture
# (support.daemon.AsUser).


class Daemon:
    """python -m faytd as root with a config, its socket 0666 in a directory
    all may traverse; nofile: its RLIMIT_NOFILE (soft and hard)."""

    def __init__(self, directory, config, ram, nofile=None):
        self.socket = os.path.join(directory, "faytd.sock")
        self.log = os.path.join(directory, "faytd.log")
        cfg = os.path.join(directory, "faytd.json")
        with open(cfg, "w") as f:
            json.dump(config, f)
        args = [sys.executable, "-m", "faytd", "--socket", self.socket, "--config", cfg,
                "--ram", ram, "-v"]

        def limit():
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with open(self.log, "w") as logf:
            self.proc = subprocess.Popen(args, stderr=logf, preexec_fn=limit)
        STARTED.append(self.proc.pid)
        RUNS[self.proc.pid] = os.path.realpath(directory)
        LAST[RUNS[self.proc.pid]] = self.proc
        deadline = time.monotonic() + 20
        while not self._accepts():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("faytd did not listen:\n" + self.read_log())
            time.sleep(0.02)

    def _accepts(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(self.socket)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def read_log(self):
        with open(self.log) as f:
            return f.read()

    def descriptors(self):
        return len(os.listdir("/proc/%d/fd" % self.proc.pid))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.read_log()


@pytest.fixture
def start():
    """start(ram="64MiB", nofile=None, **config) -> a running Daemon (socket 0666)."""
    top = tempfile.mkdtemp(prefix="fayt-limits-")
    os.chmod(top, 0o755)
    started = []

    def go(ram="64MiB", nofile=None, **config):
        cfg = {"socket_mode": "0666"}
        cfg.update(config)
        sub = os.path.join(top, "d%d" % len(started))
        os.makedirs(sub)
        os.chmod(sub, 0o755)
        d = Daemon(sub, cfg, ram, nofile)
        started.append(d)
        return d

    yield go
    for d in started:
        log = d.stop()
        assert "Traceback" not in log, log[-3000:]
    shutil.rmtree(top, ignore_errors=True)


class Attacker:
    """A process of uid 65534 running `code`: it prints one JSON line when it
    has done its part, then waits for a line on stdin (or its end)."""

    def __init__(self, as_user, code, args, uid=NOBODY):
        self.p = as_user.popen(code, args, uid=uid, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def report(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        line = ""
        while not line and time.monotonic() < deadline:
            line = self.p.stdout.readline()
            if not line and self.p.poll() is not None:
                break
        assert line, "attacker gave no report: %s" % self.p.stderr.read()
        return json.loads(line)

    def end(self):
        if self.p.poll() is None:
            try:
                self.p.stdin.write("\n")
                self.p.stdin.flush()
            except OSError:
                pass
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            f.close()


@pytest.fixture
def attackers(as_user):
    made = []

    def go(code, *args, uid=NOBODY):
        a = Attacker(as_user, code, args, uid)
        made.append(a)
        return a

    yield go
    for a in made:
        a.end()


# What root does when it must be served: in a process of its own, so that a
# faytd that never answers costs the test a timeout, not a hang.
OWNER = r"""
import json, sys
import libportal as lp
c = lp.Connection(sys.argv[1])
sp = lp.share_create(sys.argv[2], 4096, connection=c)
sp.write(0, b"owner")
ok = sp.read(0, 5) == b"owner"
sp.destroy()
p = lp.portal(lp.ANON, lp.PROT_RW, int(sys.argv[3]), connection=c)
p.unmap()
c.close()
print(json.dumps({"ok": ok}))
"""


def owner_is_served(d, anon=4096, timeout=30):
    p = subprocess.Popen([sys.executable, "-c", OWNER, d.socket, "owner-" + uuid.uuid4().hex,
                          str(anon)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return "no answer in %d s" % timeout
    if p.returncode != 0:
        return err.strip().splitlines()[-1]
    return json.loads(out)["ok"]


def wait_until(pred, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.05)


def contexts_of(d, uid):
    c = libportal.Connection(d.socket)
    try:
        return [x for x in c.list_contexts()["contexts"] if x["uid"] == uid]
    finally:
        c.close()


# -- connections and contexts -----------------------------------------------

# Attacker code that connects: hello(socket) -> (Connection, None), or
# (None, [errno, message]) if faytd refused it or did not answer in 5 s.
HELLO = r"""
import signal
import libportal as lp


def _stalled(*a):
    raise TimeoutError("faytd did not answer a HELLO in 5 s")


def hello(sock):
    signal.signal(signal.SIGALRM, _stalled)
    signal.alarm(5)
    try:
        return lp.Connection(sock), None
    except lp.PortalError as e:
        return None, [e.errno, e.strerror]
    except TimeoutError as e:
        return None, [0, str(e)]
    finally:
        signal.alarm(0)
"""

# Loops connect / HELLO / attach / write a HELD lock record / close: every
# such context is kept while its process lives (its records name a
# share-point it mapped).  A HELLO that does not come back in 5 s ends it.
KEEP_LOOP = HELLO + r"""
import ctypes, json, sys
import libportal as lp
from libportal._abi import ffi, lib
sock, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
held = ffi.offsetof("struct fayt_context_page", "held")

mine = lp.Connection(sock)
sp = lp.share_create(name, 4096, connection=mine)
done, why = 0, None
while done < n:
    c, why = hello(sock)
    if c is None:
        break
    a = lp.share_attach(name, connection=c)
    ctypes.c_uint32.from_address(c.context_page + held).value = a.sp_id
    ctypes.c_uint32.from_address(c.context_page + held + 4).value = lib.FAYT_HELD_HELD
    c.close()
    done += 1
print(json.dumps({"done": done, "why": why}), flush=True)
sys.stdin.readline()
"""


def test_limits_closed_contexts_hold_no_descriptor_and_cannot_lock_root_out(start,
                                                                            attackers):
    """A process that loops connect/HELLO/lock record/close keeps every such
    context while it lives.  faytd keeps them without a descriptor, stops
    the process at max_contexts_per_process (EAGAIN, naming the key), and
    root still connects; when the process dies, its contexts go (found
    without a pidfd).  (On a faytd that kept a pidfd and the page's
    descriptor for each, 10,000 of them took it to its RLIMIT_NOFILE.)"""
    d = start()
    assert owner_is_served(d) is True
    before = d.descriptors()
    a = attackers(KEEP_LOOP, d.socket, "kept-" + uuid.uuid4().hex, 12000)
    rep = a.report()
    assert rep["why"] is not None and rep["why"][0] == 11, rep      # EAGAIN
    assert "max_contexts_per_process" in rep["why"][1], rep
    assert owner_is_served(d) is True
    wait_until(lambda: len(contexts_of(d, NOBODY)) == 256, "the refused context to go")
    kept = contexts_of(d, NOBODY)
    assert kept[0]["connected"] and not any(x["connected"] for x in kept[1:])
    assert d.descriptors() < before + 48, "faytd holds descriptors for closed contexts"
    a.end()
    wait_until(lambda: contexts_of(d, NOBODY) == [], "the dead process's contexts to go")


# Opens connections (HELLO each) until faytd refuses one; reports how many.
CONNECT = HELLO + r"""
import json, sys
import libportal as lp
sock, most = sys.argv[1], int(sys.argv[2])

conns, why = [], None
while len(conns) < most:
    c, why = hello(sock)
    if c is None:
        break
    conns.append(c)
print(json.dumps({"open": len(conns), "why": why}), flush=True)
sys.stdin.readline()
"""


def test_limits_connections_per_process_and_the_core_reserve(start, attackers):
    """With 512 descriptors faytd can hold (512 - 288) / 2 = 112 connections,
    64 of them for core contexts: a process of uid 65534 gets 48, and EAGAIN
    naming reserved_connections; a second process of another uid gets none;
    root still connects 60 times over."""
    d = start(nofile=512)
    a = attackers(CONNECT, d.socket, 100)
    rep = a.report()
    assert rep["open"] == 48 and rep["why"][0] == 11, rep
    assert "reserved_connections" in rep["why"][1], rep
    b = attackers(CONNECT, d.socket, 10, uid=OTHER_UID)
    assert b.report()["open"] == 0
    mine = [libportal.Connection(d.socket) for _ in range(60)]
    try:
        assert owner_is_served(d) is True
    finally:
        for c in mine:
            c.close()


# -- share-points, RAM, rings, stacks ---------------------------------------

# Fills what one uid may have: connections of this process, share-points,
# RAM; reports each count and the error that ended it.
FILL = r"""
import json, sys
import libportal as lp
sock, tag, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {}
conns = []
try:
    while len(conns) < 100:
        conns.append(lp.Connection(sock))
except lp.PortalError as e:
    out["connections"] = [len(conns), e.errno, e.strerror]
c = conns[0]
sps = []
try:
    while len(sps) < 20000:
        sps.append(lp.share_create("%s-%d" % (tag, len(sps)), 4096, connection=c))
except lp.PortalError as e:
    out["sharepoints"] = [len(sps), e.errno, e.strerror]
maps = []
try:
    for cc in conns:
        while True:
            maps.append(lp.portal(lp.ANON, lp.PROT_RW, chunk, connection=cc))
except lp.PortalError as e:
    out["ram"] = [len(maps) * chunk, e.errno, e.strerror]
print(json.dumps(out), flush=True)
sys.stdin.readline()
"""


def test_limits_owner_creates_while_others_are_at_their_limits(start, attackers):
    """One process of uid 65534 takes all it may: 64 connections
    (max_connections_per_process), 10,000 share-points
    (max_sharepoints_per_uid), half of faytd's RAM (max_ram_per_uid); each
    refusal names its key.  Root connects, creates and maps all the same."""
    d = start(ram="256MiB")
    rep = attackers(FILL, d.socket, "fill-" + uuid.uuid4().hex[:8], 1 << 20).report()
    n, err, msg = rep["connections"]
    assert (n, err) == (64, 11) and "max_connections_per_process" in msg, rep
    n, err, msg = rep["sharepoints"]
    assert (n, err) == (10000, 28) and "max_sharepoints_per_uid" in msg, rep   # ENOSPC
    n, err, msg = rep["ram"]
    assert (err, "max_ram_per_uid" in msg) == (12, True), rep                   # ENOMEM
    assert (128 << 20) - (1 << 20) < n + 10000 * 4096 <= 128 << 20, rep
    assert owner_is_served(d, anon=100 << 20) is True


# 16 contexts of one process each take what their context's quota allows.
RAM_HOG = r"""
import json, sys
import libportal as lp
sock, n, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns = [lp.Connection(sock) for _ in range(n)]
held, err = [], None
for c in conns:
    try:
        while True:
            held.append(lp.portal(lp.ANON, lp.PROT_RW, chunk, connection=c))
    except lp.PortalError as e:
        err = [e.errno, e.strerror]
print(json.dumps({"bytes": len(held) * chunk, "why": err}), flush=True)
sys.stdin.readline()
"""


def test_limits_sixteen_contexts_of_one_uid_cannot_take_all_ram(start, attackers):
    """max_ram_per_context 4 MiB, 16 contexts of uid 65534, 64 MiB of RAM:
    the uid stops at max_ram_per_uid (half), a second uid at the RAM
    reserved for core contexts (10%), and root still maps its 4 MiB."""
    d = start(ram="64MiB", max_ram_per_context="4MiB")
    rep = attackers(RAM_HOG, d.socket, 16, 1 << 20).report()
    assert rep["bytes"] == 32 << 20, rep
    assert rep["why"][0] == 12 and "max_ram_per_uid" in rep["why"][1], rep
    rep = attackers(RAM_HOG, d.socket, 16, 1 << 20, uid=OTHER_UID).report()
    assert rep["why"][0] == 12 and "reserved_ram" in rep["why"][1], rep
    assert rep["bytes"] == 25 << 20, rep            # 64 MiB less 10% (6.4) less 32: 25.6
    assert owner_is_served(d, anon=4 << 20) is True


def test_limits_one_uid_cannot_fill_the_sharepoint_table(start, attackers):
    """max_sharepoints 2000: uid 65534 creates 1900 and is refused ENOSPC
    naming reserved_sharepoints (5%); root still creates."""
    d = start(max_sharepoints=2000)
    rep = attackers(FILL, d.socket, "table-" + uuid.uuid4().hex[:8], 1 << 20).report()
    n, err, msg = rep["sharepoints"]
    assert (n, err) == (1900, 28) and "reserved_sharepoints" in msg, rep
    assert owner_is_served(d) is True


# Contexts of uid 65534 (two processes: one holds targets, the other
# senders) open rings until faytd refuses one.
RING_TARGETS = r"""
import json, sys
import libportal as lp
conns = [lp.Connection(sys.argv[1]) for _ in range(int(sys.argv[2]))]
print(json.dumps({"ids": [c.context_id for c in conns]}), flush=True)
sys.stdin.readline()
"""

# n contexts each make the call `op` once with each body (hex) in turn,
# closing the descriptors it grants, until faytd refuses one.
CALLS = r"""
import json, os, sys
import libportal as lp
from libportal._abi import lib
sock, n, op = sys.argv[1], int(sys.argv[2]), getattr(lib, sys.argv[3])
bodies = [bytes.fromhex(b) for b in json.loads(sys.argv[4])]
conns = [lp.Connection(sock) for _ in range(n)]
granted, why = 0, None
try:
    for c in conns:
        for body in bodies:
            for fd in c.call(op, body)[1]:
                os.close(fd)
            granted += 1
except lp.PortalError as e:
    why = [e.errno, e.strerror]
print(json.dumps({"granted": granted, "why": why}), flush=True)
sys.stdin.readline()
"""


def test_limits_rings_per_uid(start, attackers):
    """33 senders x 32 targets of uid 65534: the 1025th ring is ENOSPC
    naming max_rings_per_uid."""
    d = start()
    targets = attackers(RING_TARGETS, d.socket, 32).report()["ids"]
    opens = json.dumps([NOTIFY_OPEN.pack(t, 0).hex() for t in targets])
    rep = attackers(CALLS, d.socket, 33, "FAYT_SYS_NOTIFY_OPEN", opens).report()
    assert rep["granted"] == 1024 and rep["why"][0] == 28, rep
    assert "max_rings_per_uid" in rep["why"][1], rep


def test_limits_stacks_per_uid(start, attackers):
    """Two processes of uid 65534, 40 contexts each, 16 stacks a context:
    the uid's 1025th stack is ENOMEM naming max_stacks_per_uid."""
    d = start()
    allocs = json.dumps([STACK_REQ.pack(0, 0).hex()] * lib.FAYT_STACKS_MAX)
    first = attackers(CALLS, d.socket, 40, "FAYT_SYS_NOTIFY_STACK_ALLOC", allocs).report()
    assert first == {"granted": 640, "why": None}
    rep = attackers(CALLS, d.socket, 40, "FAYT_SYS_NOTIFY_STACK_ALLOC", allocs).report()
    assert rep["granted"] == 384 and rep["why"][0] == 12, rep
    assert "max_stacks_per_uid" in rep["why"][1], rep


# -- lists ---------------------------------------------------------------------

LISTS = r"""
import json, sys
import libportal as lp
from libportal._abi import lib, LIST_REQ
sock, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = lp.Connection(sock)
sps = [lp.share_create("%s-%d" % (tag, i), 4096, connection=c) for i in range(n)]
more = [lp.Connection(sock) for _ in range(63)]
page = json.loads(c.call(lib.FAYT_SYS_LIST_SHARE, LIST_REQ.pack(0))[0])
after = json.loads(c.call(lib.FAYT_SYS_LIST_SHARE, LIST_REQ.pack(page[-1]["id"]))[0])
ctx_page = json.loads(c.call(lib.FAYT_SYS_LIST_CONTEXTS, LIST_REQ.pack(0))[0])
out = {"page": [s["id"] for s in page], "next": [s["id"] for s in after],
       "all": sorted(s["identifier"] for s in c.list_sharepoints()),
       "ctx_page": [x["id"] for x in ctx_page["contexts"]],
       "contexts": [x["id"] for x in c.list_contexts()["contexts"]],
       "mine": sorted([c.context_id] + [m.context_id for m in more])}
print(json.dumps(out), flush=True)
sys.stdin.readline()
"""


def test_limits_lists_come_in_pages(start, attackers):
    """LIST_SHARE and LIST_CONTEXTS answer at most 32 entries a call, in
    id order, from after the id the request names; libportal's
    list_sharepoints and list_contexts fetch every page."""
    d = start()
    tag = "page-" + uuid.uuid4().hex[:8]
    mine = [libportal.Connection(d.socket) for _ in range(8)]
    try:
        rep = attackers(LISTS, d.socket, tag, 150).report()
    finally:
        for c in mine:
            c.close()
    assert len(rep["page"]) == 32 and rep["page"] == sorted(rep["page"])
    assert len(rep["next"]) == 32 and rep["next"][0] > rep["page"][-1]
    assert rep["all"] == sorted("%s-%d" % (tag, i) for i in range(150))
    assert len(rep["ctx_page"]) == 32 and rep["ctx_page"] == sorted(rep["ctx_page"])
    assert set(rep["mine"]) <= set(rep["contexts"]) and len(rep["contexts"]) >= 72


# -- fairness -------------------------------------------------------------------

OWNER_LOOP = r"""
import json, sys
import libportal as lp
c = lp.Connection(sys.argv[1])
for i in range(int(sys.argv[3])):
    lp.share_create("%s-%d" % (sys.argv[2], i), 4096, connection=c).destroy()
print(json.dumps(c.stats()["fairness"]))
"""


def test_limits_owner_waits_behind_one_request_per_round_of_a_flooding_uid(start, as_user):
    """Three processes of uid 65534 flood faytd (create, attach, unmap,
    destroy, a bad request); root's 300 share-point create+destroy each wait
    behind at most the round's one request of that uid and the calls sent
    without waiting for their reply (unmap, destroy: at most two queued on
    each other flooding connection) that a catch-up performs ahead of it
    (Server.catch_up): faytd's own counter (fayt stats: fairness) says so.
    Per connection instead of per uid, a round would hold three."""
    d = start()
    floods = [Attacker(as_user, FLOODER, [d.socket, "mix", "flood%d-" % i + uuid.uuid4().hex])
              for i in range(3)]
    try:
        for f in floods:
            assert f.p.stdout.readline().strip() == "ready", f.p.stderr.read()
        time.sleep(0.2)
        p = subprocess.run([sys.executable, "-c", OWNER_LOOP, d.socket,
                            "fair-" + uuid.uuid4().hex[:8], "300"],
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert p.returncode == 0, p.stderr
        fair = json.loads(p.stdout)
    finally:
        for f in floods:
            f.end()
    assert fair["owner_requests"] >= 301
    assert fair["others_requests"] > 0
    assert fair["deferred"] > 0, fair             # the budget put requests of uid 65534 off
    assert fair["owner_waited_behind_max"] <= 1 + 2 * 2, fair


OWNER_UNTIL_STDIN = r"""
import select, sys
import libportal as lp
c = lp.Connection(sys.argv[1])
print("calling", flush=True)
i = 0
while not (i & 15 == 0 and select.select([sys.stdin], [], [], 0)[0]):
    lp.share_create("%s-%d" % (sys.argv[2], i), 4096, connection=c).destroy()
    i += 1
"""


def _nice_until(pids, want, timeout=TIMEOUT):
    """Wait (bounded) until every pid's nice value is `want`; their values."""
    deadline = time.monotonic() + timeout
    while True:
        got = [os.getpriority(os.PRIO_PROCESS, p) for p in pids]
        if got == [want] * len(pids) or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def test_limits_a_flooding_uid_runs_nicer_while_the_owner_calls(start, as_user):
    """Three processes of uid 65534 flood faytd while root's process makes
    calls: faytd gives the flooders nice 19 (flood_nice), fayt stats says
    which uid; once root stops calling they get their nice value back while
    they still flood, and a faytd with flood_nice null renices nobody."""
    for cfg, want in (({}, 19), ({"flood_nice": None}, 0)):
        d = start(**cfg)
        floods = [Attacker(as_user, FLOODER, [d.socket, "mix", "nice%d-" % i + uuid.uuid4().hex])
                  for i in range(3)]
        owner = subprocess.Popen([sys.executable, "-c", OWNER_UNTIL_STDIN, d.socket,
                                  "owner-" + uuid.uuid4().hex[:8]], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            for f in floods:
                assert f.p.stdout.readline().strip() == "ready", f.p.stderr.read()
            assert owner.stdout.readline().strip() == "calling"
            pids = [f.p.pid for f in floods]
            if want:
                assert _nice_until(pids, 19) == [19, 19, 19]
                c = libportal.Connection(d.socket)
                fair = c.stats()["fairness"]
                c.close()
                assert fair["demoted_uids"] == [NOBODY] and fair["demotions"] >= 1, fair
                assert fair["flood_nice"] == 19
            else:
                # While the floods and the owner have made calls for a while
                # (more than a hundred of faytd's 20 ms windows), nobody moved.
                c = libportal.Connection(d.socket)
                before = c.stats()["fairness"]["others_requests"]
                time.sleep(2)
                fair = c.stats()["fairness"]
                c.close()
                assert fair["others_requests"] - before > 10000, fair
                assert fair["demoted_uids"] == [] and fair["demotions"] == 0, fair
                assert [os.getpriority(os.PRIO_PROCESS, p) for p in pids] == [0, 0, 0]
            owner.stdin.close()
            assert owner.wait(timeout=TIMEOUT) == 0
            assert _nice_until(pids, 0) == [0, 0, 0]   # still flooding, nobody to protect
        finally:
            if owner.poll() is None:
                owner.kill()
                owner.wait()
            owner.stdout.close()
            if owner.stdin and not owner.stdin.closed:
                owner.stdin.close()
            for f in floods:
                f.end()


# A connection whose connecting process is gone before faytd accepts it,
# kept open by the child it forked: SO_PEERCRED still names the dead pid.
ORPHANED_CONNECTION = r"""
import os, select, socket, sys
import libportal as lp
import libportal.syscall as lsys
from libportal._abi import lib
path, tag = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(path)                 # faytd (stopped) has not accepted it yet
if os.fork():
    os._exit(0)                 # the pid SO_PEERCRED names is free once reaped
print(os.getpid(), flush=True)
sys.stdin.readline()            # faytd runs again and has accepted it


class Connected(socket.socket):
    def connect(self, path):
        pass


real = lsys.socket.socket
lsys.socket.socket = lambda *a: Connected(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, s.detach())
c = lp.Connection(path)
lsys.socket.socket = real
print("ready", flush=True)
n = 0
while not (n & 15 == 0 and select.select([sys.stdin], [], [], 0)[0]):
    try:                        # any request counts; this context's tids are
        c.call(lib.FAYT_SYS_UNMAP, b"bad")     # not its recorded pid's
    except lp.PortalError:
        pass
    n += 1
"""


def _spawn_at_pid(pid, argv, tries=50):
    """A root process started with pid `pid` (through ns_last_pid), or None."""
    for _ in range(tries):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
        except OSError:
            return None
        p = subprocess.Popen(argv)
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    return None


def test_limits_flood_guard_renices_no_process_that_reused_a_flooders_pid(start, as_user):
    """A process of uid 65534 connects while faytd is busy (here: stopped),
    forks and exits before faytd accepts: faytd's record names its pid, and
    a root process now has that pid.  The child floods on the connection
    while root's owner calls: faytd must not renice the root process that
    merely reused the pid (only threads of the flooding uid, ever)."""
    d = start()
    os.kill(d.proc.pid, signal.SIGSTOP)
    a = victim = b_pid = None
    owner = None
    try:
        a = as_user.popen(ORPHANED_CONNECTION, [d.socket, "orph-" + uuid.uuid4().hex[:8]],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = a.stdout.readline()
        assert line.strip().isdigit(), a.stderr.read()
        b_pid = int(line)
        assert a.wait(timeout=TIMEOUT) == 0
        victim = _spawn_at_pid(a.pid, ["sleep", "600"])
        if victim is None:
            pytest.skip("could not start a process with pid %d (ns_last_pid)" % a.pid)
        assert os.getpriority(os.PRIO_PROCESS, victim.pid) == 0
        os.kill(d.proc.pid, signal.SIGCONT)
        a.stdin.write("go\n")
        a.stdin.flush()
        assert a.stdout.readline().strip() == "ready", a.stderr.read()
        owner = subprocess.Popen([sys.executable, "-c", OWNER_UNTIL_STDIN, d.socket,
                                  "owner-" + uuid.uuid4().hex[:8]], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        assert owner.stdout.readline().strip() == "calling"
        # While the flood and the owner call for more than a hundred of
        # faytd's 20 ms windows, root's process keeps its nice value.
        c = libportal.Connection(d.socket)
        try:
            before = c.stats()["fairness"]["others_requests"]
            deadline = time.monotonic() + TIMEOUT
            while os.getpriority(os.PRIO_PROCESS, victim.pid) == 0:
                fair = c.stats()["fairness"]
                if fair["others_requests"] - before > 10000 and time.monotonic() > \
                        deadline - TIMEOUT + 2:
                    break
                assert time.monotonic() < deadline, (fair, a.stderr.read() if not process_exists(b_pid) else "")
                time.sleep(0.02)
        finally:
            c.close()
        assert os.getpriority(os.PRIO_PROCESS, victim.pid) == 0, \
            "faytd reniced root's process %d, which reused a flooder's pid" % victim.pid
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
        if owner is not None:
            owner.stdin.close()
            owner.wait(timeout=TIMEOUT)
            owner.stdout.close()
        if a is not None:
            try:
                a.stdin.write("\n")
                a.stdin.flush()
            except OSError:
                pass
            for f in (a.stdin, a.stdout, a.stderr):
                f.close()
        if b_pid is not None:
            deadline = time.monotonic() + TIMEOUT
            while process_exists(b_pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if process_exists(b_pid):
                os.kill(b_pid, signal.SIGKILL)
        if victim is not None:
            victim.kill()
            victim.wait()


def process_exists(pid):
    return _state(pid) not in (None, "Z", "X")

