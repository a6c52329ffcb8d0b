"""Bad arguments to the public wrappers (issue 9, point 10): a value out of
range is an InvalidArgument (EINVAL) whose message names the argument; a
value of the wrong type is a TypeError that names it.  Timeouts follow one
rule across the API (docs/errors.md, "Timeouts: one rule"): None or a
number of seconds >= 0 (past what the clock holds, inf included: for
ever); negative or nan EINVAL.

The messages are pinned: they are what a user reads."""
import errno
import math
import subprocess
import sys
import textwrap
import uuid

import pytest

import libportal
from libportal import errors

pytestmark = pytest.mark.usefixtures("faytd")


def _einval(fn, message):
    with pytest.raises(libportal.InvalidArgument) as ei:
        fn()
    assert ei.value.errno == errno.EINVAL
    assert str(ei.value.strerror) == message


def _typeerror(fn, message):
    with pytest.raises(TypeError) as ei:
        fn()
    assert not isinstance(ei.value, OSError)
    assert str(ei.value) == message


def _child(faytd, code):
    """Run `code` in a process of its own (its handlers and doorbell stay
    there); its stdout."""
    r = subprocess.run([sys.executable, "-c", "import libportal as lp\n" + textwrap.dedent(code)],
                       env=faytd.env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def sp(lp):
    s = lp.share_create("badargs-" + uuid.uuid4().hex[:8], 8192)
    yield s
    s.destroy()


# -- notify / notification_channel: the target ------------------------------------

@pytest.mark.parametrize("target", [-1, 2 ** 40])
def test_notify_target_out_of_range_is_einval_naming_target(lp, target):
    _einval(lambda: lp.notify(target, 1, b""), "target: %d is not a context id" % target)
    _einval(lambda: lp.notification_channel(target), "target: %d is not a context id" % target)


def test_notify_target_of_wrong_type_is_typeerror_naming_target(lp):
    _typeerror(lambda: lp.notify("x", 1, b""), "target: must be a context id (an int), not str")


def test_notify_payload_of_wrong_type_is_typeerror_naming_payload(faytd):
    out = _child(faytd, """
        me = lp.connection().context_id
        lp.install_handler(1, lambda p, i, s: 7)
        ch = lp.notification_channel(me)
        for call in (lambda p: lp.notify(me, 1, p), lambda p: lp.notify(me, 1, p, wait_return=True),
                     lambda p: ch.send(1, p), lambda p: ch.call(1, p)):
            for p in ("abc", None, 5):
                try:
                    call(p)
                except TypeError as e:
                    print(e)
        """)
    names = ["str", "NoneType", "int"] * 4
    assert out.splitlines() == ["notify: payload: a bytes-like object is required, not %s" % n
                                for n in names]


# -- notification stacks ----------------------------------------------------------

@pytest.mark.parametrize("size", [-4096, 2 ** 40])
def test_notification_stack_alloc_out_of_range_is_einval_naming_size(lp, size):
    _einval(lambda: lp.notification_stack_alloc(size),
            "size: %d; a notification stack is a multiple of 4096 bytes up to 1048576" % size)


# -- timeouts: one rule ------------------------------------------------------------

TIMEOUT_MSG = "timeout: %s is not a number of seconds >= 0 (None waits for ever)"


@pytest.mark.parametrize("bad", [-1, -5.0, float("nan"), -math.inf])
def test_timeout_negative_or_nan_is_einval_naming_timeout(lp, sp, bad):
    msg = TIMEOUT_MSG % repr(bad)
    _einval(lambda: sp.lock(bad), msg)
    _einval(lambda: sp.lock(timeout=bad), msg)
    _einval(lambda: lp.notify(lp.connection().context_id, 1, b"", wait_return=True,
                              timeout=bad), msg)
    _einval(lambda: lp.notification_wait(bad), msg)
    assert not sp.held


def test_timeout_negative_or_nan_is_einval_on_a_channel(faytd):
    out = _child(faytd, """
        me = lp.connection().context_id
        lp.install_handler(1, lambda p, i, s: 7)
        ch = lp.notification_channel(me)
        for t in (-5, float("nan")):
            for call in (lambda: ch.call(1, b"", timeout=t), lambda: ch.send(1, b"", timeout=t)):
                try:
                    call()
                except lp.InvalidArgument as e:
                    print(e.errno, e.strerror)
        print(lp.notification_stats()["delivered"])
        """)
    assert out.splitlines() == ["%d %s" % (errno.EINVAL, TIMEOUT_MSG % t)
                                for t in ("-5", "-5", "nan", "nan")] + ["0"]


@pytest.mark.parametrize("forever", [math.inf, 1e30, 1e300, 10 ** 400],
                         ids=["inf", "1e30", "1e300", "10**400"])
def test_timeout_past_the_clock_waits_for_ever(lp, sp, forever):
    assert errors.check_timeout(forever) is None
    assert sp.lock(forever) == 0
    sp.unlock()
    assert sp.lock(timeout=forever) == 0
    sp.unlock()


def test_timeout_past_the_clock_waits_for_ever_in_notify(faytd):
    out = _child(faytd, """
        me = lp.connection().context_id
        lp.install_handler(1, lambda p, i, s: 7)
        ch = lp.notification_channel(me)
        for t in (float("inf"), 1e30, 0, 0.5):
            print(lp.notify(me, 1, b"", wait_return=True, timeout=t), ch.call(1, b"", timeout=t))
        print(lp.notification_wait(0))
        """)
    assert out.splitlines() == ["7 7"] * 4 + ["0"]


def test_timeout_of_wrong_type_is_typeerror_naming_timeout(lp, sp):
    msg = "timeout: must be None or a number of seconds, not str"
    _typeerror(lambda: sp.lock("x"), msg)
    _typeerror(lambda: lp.notify(lp.connection().context_id, 1, b"", timeout="x"), msg)
    _typeerror(lambda: lp.notification_wait("x"), msg)

def test_chain_timeout_follows_the_rule(faytd):
    out = _child(faytd, """
        import uuid
        name = "badargs-" + uuid.uuid4().hex[:8]
        for t in (-1, float("nan")):
            try:
                lp.chain_join(name, timeout=t)
            except lp.InvalidArgument as e:
                print(e.errno, e.strerror)
        s = lp.chain_join(name, timeout=float("inf"))
        print(s.timeout_ms)
        for t in (-1, float("nan")):
            try:
                s.take(t)
            except lp.InvalidArgument as e:
                print(e.errno, e.strerror)
        print(s.take(0), s.take(1e-3))
        s.leave()
        """)
    assert out.splitlines() == ["%d %s" % (errno.EINVAL, TIMEOUT_MSG % t)
                                for t in ("-1", "nan")] + ["4294967295"] + \
        ["%d %s" % (errno.EINVAL, TIMEOUT_MSG % t) for t in ("-1", "nan")] + ["None None"]


# -- share-point fused calls: ints too large for C, wrong types ---------------------

def test_sharepoint_fused_int_out_of_range_is_einval_naming_it(sp):
    n = sp.length
    _einval(lambda: sp.read(2 ** 64, 1),
            "read: offset: %d is outside the share-point's %d bytes" % (2 ** 64, n))
    _einval(lambda: sp.read(0, 2 ** 63),
            "read: size: %d is outside the share-point's %d bytes" % (2 ** 63, n))
    _einval(lambda: sp.write(2 ** 64, b"x"),
            "write: offset: %d is outside the share-point's %d bytes" % (2 ** 64, n))
    _einval(lambda: sp.add(2 ** 64, 1),
            "add: offset: %d is outside the share-point's %d bytes" % (2 ** 64, n))
    _einval(lambda: sp.add(8, 2 ** 63), "add: delta: %d does not fit an int64" % 2 ** 63)
    _einval(lambda: sp.add(8, -2 ** 63 - 1), "add: delta: %d does not fit an int64"
            % (-2 ** 63 - 1))
    assert sp.add(8, 2 ** 63 - 1) == 2 ** 63 - 1 and not sp.held


def test_sharepoint_fused_wrong_type_is_typeerror_naming_it(sp):
    _typeerror(lambda: sp.read(1.5, 1), "read: offset: must be an int, not float")
    _typeerror(lambda: sp.read(0, "1"), "read: size: must be an int, not str")
    _typeerror(lambda: sp.write(0, "x"), "write: data: a bytes-like object is required, not str")
    _typeerror(lambda: sp.write(0, None),
               "write: data: a bytes-like object is required, not NoneType")
    _typeerror(lambda: sp.add(8, 1.5), "add: delta: must be an int, not float")
    assert not sp.held


# -- identifiers: no NUL byte (C would read only what comes before it) -------------

NUL_MSG = "%s: %r holds a NUL byte (a C string ends there)"


def test_share_identifier_with_nul_is_einval_naming_it(lp):
    base = "badargs-nul-" + uuid.uuid4().hex[:8]
    sp = lp.share_create(base, 4096)
    try:
        _einval(lambda: lp.share_create(base + "\0b", 4096), NUL_MSG % ("identifier", base + "\0b"))
        _einval(lambda: lp.share_attach(base + "\0zzz"), NUL_MSG % ("identifier", base + "\0zzz"))
        _einval(lambda: lp.portal(lp.SHARE | lp.ANON, lp.PROT_RW, 4096,
                                  identifier=(base + "\0").encode(), create=True),
                NUL_MSG % ("identifier", base + "\0"))
        names = [s["identifier"] for s in lp.connection().list_sharepoints()]
        assert names.count(base) == 1 and not [n for n in names if "\0" in n]
    finally:
        sp.destroy()


def test_share_identifier_of_wrong_type_is_typeerror_naming_it(lp):
    _typeerror(lambda: lp.share_create(5, 4096), "identifier: must be str or bytes, not int")


def test_special_chain_with_nul_is_einval_naming_it(lp):
    _einval(lambda: lp.portal(lp.SPECIAL, lp.PROT_READ, 4096, chain="files\0x"),
            NUL_MSG % ("chain", "files\0x"))
    _einval(lambda: lp.portal(lp.SPECIAL, lp.PROT_READ, 4096, chain="files", message="m\0"),
            NUL_MSG % ("message", "m\0"))
    _einval(lambda: lp.chain_join("files\0x"), NUL_MSG % ("name", "files\0x"))
