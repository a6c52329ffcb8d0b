"""Fixtures: one real faytd for the session, fresh ones on demand, and the
check that nothing of the project is left: no object keeper, no object."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from faytd_proc import Faytd, fayt_objects, running_faytd  # noqa: E402


@pytest.fixture(scope="session")
def faytd(tmp_path_factory):
    """The session's faytd; FAYT_SOCKET points at it for every process the tests start."""
    d = Faytd(str(tmp_path_factory.mktemp("faytd")))
    old = os.environ.get("FAYT_SOCKET")
    os.environ["FAYT_SOCKET"] = d.socket
    import libportal
    libportal.set_default(None)
    yield d
    libportal.set_default(None)
    if old is None:
        os.environ.pop("FAYT_SOCKET", None)
    else:
        os.environ["FAYT_SOCKET"] = old
    d.stop()


@pytest.fixture
def lp(faytd):
    """libportal, with a default connection to the session's faytd."""
    import libportal
    return libportal


@pytest.fixture
def fresh_faytd(tmp_path):
    """A factory for a private faytd (own config/RAM); stopped after the test."""
    started = []

    def start(**kw):
        d = Faytd(str(tmp_path / ("faytd%d" % len(started))), **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture
def conn_to():
    """conn_to(faytd) -> a libportal.Connection to that daemon, closed after the test."""
    import libportal
    made = []

    def make(d):
        c = libportal.Connection(d.socket)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


__all__ = ["running_faytd", "fayt_objects"]


def pytest_sessionfinish(session, exitstatus):
    """After every faytd of the session stopped, no object keeper of theirs
    may run: a clean stop ends it (a killed faytd's keeper waits for a
    restart: those are ended here), so no object of theirs is held
    (keepers that other runs started are not ours to judge)."""
    from faytd.launch import LAST, leftover_keepers
    left = leftover_keepers()
    objects = fayt_objects(dirs=set(LAST), pooled=True)
    if left or objects:
        sys.stderr.write("\nLEAK: object keepers left running: %s, holding %s\n"
                         % (left, objects))
        session.exitstatus = 1
