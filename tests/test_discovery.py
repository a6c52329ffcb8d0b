"""Discovery by name (PUBLISH, LOOKUP; faytd/discovery.py, docs/discovery.md):
servers published and found by name, a restarted server found again, the
namespaces of names.md as uid 65534, the limit per uid, bad requests as raw
bytes."""
import errno
import json
import os
import time

import pytest

import libportal
from libportal._abi import lib, PUBLISH_REQ
from support.children import WAIT, wait_until

NOBODY = 65534

SERVER = """
lp.install_handler(1, lambda p, i, s: 1000 + int.from_bytes(p, "little"))
lp.publish(sys.argv[1])
print("published")
_end = time.monotonic() + 60
while time.monotonic() < _end and not select.select([sys.stdin], [], [], 0)[0]:
    lp.notification_wait(0.2)
"""

# A client of another uid: one request per line, answers as JSON.
CLIENT = """
c = lp.Connection(sys.argv[1])
print(json.dumps(c.context_id), flush=True)
for line in sys.stdin:
    op, name = line.split()
    try:
        if op == "publish":
            lp.publish(name, connection=c)
            print(json.dumps("ok"))
        elif op == "lookup":
            print(json.dumps(list(lp.lookup(name, connection=c))))
    except OSError as e:
        print(json.dumps([errno.errorcode[e.errno], str(e)]))
"""


def _gone(name, conn):
    try:
        libportal.lookup(name, connection=conn)
        return False
    except libportal.NotFound:
        return True


def test_discovery_a_server_found_by_name_and_notified(lp, spawn):
    srv = spawn(SERVER, args=["disc.kv"])
    assert srv.expect() == "published"
    found = lp.lookup("disc.kv")
    assert found.pid == srv.pid and found.uid == os.getuid()
    assert (found.category, found.name, found.namespace) == ("core", "disc.kv",
                                                            "uid:%d" % os.getuid())
    assert lp.notify(found.context, 1, (5).to_bytes(8, "little"), wait_return=True,
                     timeout=WAIT) == 1005
    srv.send("stop")
    srv.finish()
    assert wait_until(lambda: _gone("disc.kv", lp.connection()), "the name to go")


def test_discovery_a_restarted_server_is_found_again_under_its_name(lp, spawn):
    first = spawn(SERVER, args=["disc.again"])
    assert first.expect() == "published"
    was = lp.lookup("disc.again")
    second = spawn(SERVER + "\nprint('never')", args=["disc.again"])   # the name is taken
    second.proc.stdin.close()
    second.proc.wait(timeout=WAIT)
    assert second.proc.returncode != 0
    assert "AlreadyExists: [Errno 17] name: 'disc.again' is published by context %d (pid %d)" \
        % (was.context, first.pid) in second.stderr()
    first.kill()                                    # died: its name is free
    third = spawn(SERVER, args=["disc.again"])
    assert third.expect() == "published"
    now = lp.lookup("disc.again")
    assert now.pid == third.pid and now.context != was.context
    assert lp.notify(now.context, 1, (1).to_bytes(8, "little"), wait_return=True,
                     timeout=WAIT) == 1001
    third.send("stop")
    third.finish()


def test_discovery_lookup_waits_for_a_server_that_publishes_later(lp, spawn):
    with pytest.raises(libportal.NotFound) as e:
        lp.lookup("disc.later")                     # timeout 0: asked once
    assert str(e.value) == "[Errno 2] name: nothing is published as 'disc.later'"
    srv = spawn("time.sleep(0.5)\n" + SERVER, args=["disc.later"])
    t = time.monotonic()
    found = lp.lookup("disc.later", timeout=WAIT)
    assert found.pid == srv.pid and time.monotonic() - t < WAIT
    with pytest.raises(libportal.NotFound):
        lp.lookup("disc.never", timeout=0.2)
    with pytest.raises(libportal.InvalidArgument):
        lp.lookup("disc.later", timeout=-1)
    srv.send("stop")
    srv.finish()


def test_discovery_names_go_with_a_withdraw_and_a_closed_connection(lp):
    c = libportal.Connection()
    try:
        lp.publish("disc.w", connection=c)
        lp.publish("disc.w", connection=c)          # its own already: nothing changes
        assert lp.lookup("disc.w").context == c.context_id
        lp.unpublish("disc.w", connection=c)
        assert _gone("disc.w", lp.connection())
        with pytest.raises(libportal.NotFound) as e:
            lp.unpublish("disc.w", connection=c)
        assert "name: 'disc.w' is not published by this context" in str(e.value)
        lp.publish("disc.w", connection=c)
        with pytest.raises(libportal.NotFound):
            lp.unpublish("disc.w")                  # another context's: not its to withdraw
        assert lp.lookup("disc.w").context == c.context_id
    finally:
        c.close()
    assert wait_until(lambda: _gone("disc.w", lp.connection()), "the name to go with close")


def test_discovery_bad_requests_as_raw_bytes(lp):
    c = lp.connection()
    cases = [
        (lib.FAYT_SYS_PUBLISH, b"", errno.EINVAL, "publish: expected 8 bytes and the name"),
        (lib.FAYT_SYS_PUBLISH, PUBLISH_REQ.pack(0, 0), errno.EINVAL, "name: empty"),
        (lib.FAYT_SYS_PUBLISH, PUBLISH_REQ.pack(4, 0) + b"x", errno.EINVAL,
         "flags: unknown bits 0x4"),
        (lib.FAYT_SYS_PUBLISH, PUBLISH_REQ.pack(0, 7) + b"x", errno.EINVAL, "reserved: 7"),
        (lib.FAYT_SYS_PUBLISH, PUBLISH_REQ.pack(0, 0) + b"a\0b", errno.EINVAL,
         "name: holds a NUL byte"),
        (lib.FAYT_SYS_PUBLISH, PUBLISH_REQ.pack(0, 0) + b"\xff\xfe", errno.EINVAL,
         "name: not valid UTF-8"),
        (lib.FAYT_SYS_PUBLISH, PUBLISH_REQ.pack(0, 0) + b"n" * 256, errno.ENAMETOOLONG,
         "name: 256 bytes; at most 255"),
        (lib.FAYT_SYS_LOOKUP, b"", errno.EINVAL, "name: empty"),
        (lib.FAYT_SYS_LOOKUP, b"uid:x/y", errno.EINVAL, "name: 'uid:x/y'"),
    ]
    for op, body, err, message in cases:
        with pytest.raises(OSError) as e:
            c.call(op, body)
        assert e.value.errno == err, (body, e.value)
        assert message in str(e.value), (body, str(e.value))
    with pytest.raises(TypeError):
        lp.publish(5)


POLICY = {
    "categories": {
        "core": {"classes": ["SHARE", "DIRECT", "ANON", "COW", "SPECIAL"],
                 "notify_handlers": True, "notify": ["*"], "chains": ["*"], "mmio": ["*"],
                 "shared_names": {"create": ["pub.*"]}},
        "server": {"classes": ["SHARE", "ANON"], "notify": ["$uid"],
                   "shared_names": {"attach": ["pub.*"]}},
    },
    "rules": [{"uid": 0, "category": "core"}],
    "default": "server",
}


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a client as uid 65534: needs root")
def test_discovery_namespaces_and_the_limit_per_uid_as_uid_65534(world_faytd, spawn,
                                                                 as_user):
    d = world_faytd(POLICY, max_published_per_uid=2)
    root = libportal.Connection(d.socket)
    try:
        libportal.publish("kv", connection=root)
        libportal.publish("pub.kv", connection=root)
        user = spawn(CLIENT, d.env(), as_user=as_user, uid=NOBODY, args=[d.socket])
        uctx = json.loads(user.expect())

        def ask(line):
            user.send(line)
            return json.loads(user.expect())
        # Its own "kv" is another name than root's: no squatting either way.
        assert ask("lookup kv")[0] == "ENOENT"
        assert ask("publish kv") == "ok"
        assert ask("lookup kv")[:3] == [uctx, user.pid, NOBODY]
        assert libportal.lookup("kv", connection=root).context == root.context_id
        assert libportal.lookup("uid:%d/kv" % NOBODY, connection=root).context == uctx
        got = ask("lookup uid:0/kv")
        assert got[0] == "EPERM" and "only a core server may name another uid's" in got[1]
        # The shared name: root's category may create it, the user's only find it.
        assert ask("lookup pub.kv")[:5] == [root.context_id, os.getpid(), 0, "core", "pub.kv"]
        assert ask("lookup pub.kv")[5] == "shared"
        got = ask("publish pub.mine")
        assert got[0] == "EPERM", got
        # Two names per uid (core is not bound): a third is ENOSPC.
        assert ask("publish kv2") == "ok"
        got = ask("publish kv3")
        assert got[0] == "ENOSPC" and "uid 65534 has published 2 names, its limit" in got[1]
        libportal.publish("root3", connection=root)
        user.kill()
        assert wait_until(lambda: _gone("uid:%d/kv" % NOBODY, root), "its names to go")
    finally:
        root.close()
