"""Bad arguments to the public wrappers (issue 9, point 10): a value out of
range is an InvalidArgument (EINVAL) whose message names the argument; a
value of the wrong type is a TypeError that names it.  Timeouts follow one
rule across the API (README "Errors"): None or a number of seconds >= 0
(past what the clock holds, inf included: for ever); negative or nan EINVAL.

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
