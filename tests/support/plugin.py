"""The pytest plugin of the harness: fixtures, the fork guard, the leak check.

Fixtures
  faytd         the session's faytd (the user plugin's fayt_daemon,
                faytd/pytest_plugin.py); FAYT_SOCKET names it for every process
                the tests start.  At its end no share-point may be left in it.
  lp            libportal, its default connection to the session's faytd.
  fresh_faytd   fresh_faytd(config=, ram=, extra=, clean=False) -> a private
                faytd in tmp_path, stopped after the test (clean=True: and it
                must not have died by itself nor logged a Traceback).
  world_faytd   world_faytd(policy=None, as_user=None, uid=None, **config) ->
                a faytd that other users reach: socket 0666 in a directory
                under /tmp that all may traverse, 64 MiB of RAM; as_user and
                uid run faytd itself as that user.  Its log may hold no
                Traceback when it stops.
  world_dir     that directory (one per test).
  as_user       support.daemon.AsUser: runs Python as another uid.
  conn_to       conn_to(faytd) -> a libportal.Connection, closed after the test.
  spawn         spawn(code, env=None, **kw) -> a support.children.Child
                (env None: the session faytd's), killed after the test.
  restartable   one state directory: .start() a faytd there, .kill() it
                (SIGKILL), .dir, .pids; what runs at the end is stopped.

The fork guard: on Python 3.12 and later, os.fork() in a process with more
than one thread warns (DeprecationWarning).  A filterwarnings "error" cannot
make that an error: CPython clears the exception the filter raises.  So each
phase of a test records the warning, and a test that forked with threads
fails, unless it is marked forks_with_threads (it does so on purpose).
Other warnings go on to pytest as they came.

The leak check: support.leaks, at the end of the session; what it finds
fails the session (exit status 1) with a LEAKS section in the summary.
"""
import gc
import os
import re
import shutil
import warnings

import pytest

from . import leaks
from .children import Child
from .daemon import AsUser, Faytd, world_dir as _make_world_dir

FORK_WARNING = re.compile(r"This process \(pid=\d+\) is multi-threaded, use of fork\(\)")

_LEAKS = pytest.StashKey()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "forks_with_threads: the test calls fork() while the process has other "
        "threads on purpose (that is what it tests); the fork guard lets it")
    config.stash[_LEAKS] = []
    leaks.name_session_semaphores()


# -- the fork guard -----------------------------------------------------------

def _fork_guard(item):
    seen, forks = [], []
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.filterwarnings("always", message=FORK_WARNING.pattern,
                                    category=DeprecationWarning)
            result = yield
    finally:
        for w in seen:
            if issubclass(w.category, DeprecationWarning) and \
                    FORK_WARNING.search(str(w.message)):
                forks.append(w)
            else:                           # pytest's own recorder reports the rest
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno,
                                       source=w.source)
    if forks and item.get_closest_marker("forks_with_threads") is None:
        pytest.fail("fork() in a multi-threaded process (%d times, first at %s:%d); start "
                    "children with support.procs (forkserver) or subprocess: see "
                    "docs/forking.md" % (len(forks), forks[0].filename, forks[0].lineno),
                    pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _fork_guard(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _fork_guard(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _fork_guard(item))


# -- the leak check -----------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def _fayt_leak_check(request):
    """Set up before every other fixture of the session, so torn down after
    them all: every faytd has stopped when it looks."""
    start = leaks.snapshot()
    yield
    request.config.stash[_LEAKS].extend(leaks.findings(start))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    found = session.config.stash.get(_LEAKS, [])
    if not found:
        return
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.line("")
        tr.section("LEAKS: the session left these behind", sep="!", red=True, bold=True)
        for line in found:
            tr.line(line, red=True)
    else:
        import sys
        sys.stderr.write("\nLEAKS:\n%s\n" % "\n".join(found))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- faytd ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def faytd(fayt_daemon, request):
    """The session's faytd (the user plugin's fayt_daemon, faytd/pytest_plugin.py);
    FAYT_SOCKET points at it for every process the tests start."""
    yield fayt_daemon
    # Every test destroyed what it made: nothing is left in the table.
    gc.collect()
    import libportal
    c = libportal.Connection(fayt_daemon.socket)
    try:
        left = [s["identifier"] for s in c.list_sharepoints()]
    finally:
        c.close()
    if left:
        request.config.stash[_LEAKS].append("share-points left in the session's faytd: %s"
                                            % left)


@pytest.fixture
def lp(faytd):
    """libportal, with a default connection to the session's faytd."""
    import libportal
    return libportal


class _Daemons:
    """Start faytds in numbered directories under `base`; stop them all.
    world: the directories are 0755 (others reach the socket), and a faytd
    run as another user owns its own (faytd/dirs.py refuses a directory
    that is not its uid's or that others may write)."""

    def __init__(self, base, world=False):
        self.base, self.world, self.started = base, world, []

    def start(self, check=None, **kw):
        sub = os.path.join(self.base, "faytd%d" % len(self.started))
        os.makedirs(sub)
        if self.world:
            os.chmod(sub, 0o755)
            if kw.get("uid") is not None:
                os.chown(sub, kw["uid"], kw["uid"])
        d = Faytd(sub, **kw)
        self.started.append((d, check))
        return d

    def stop_all(self):
        for d, check in self.started:
            if check == "clean":
                d.stop_clean()
            else:
                log = d.stop()
                if check == "no-traceback":
                    assert "Traceback" not in log, log[-3000:]


@pytest.fixture
def fresh_faytd(tmp_path):
    """A factory for private faytds (own config, RAM, directory); stopped after the test."""
    daemons = _Daemons(str(tmp_path))

    def start(config=None, ram=None, extra=(), clean=False):
        return daemons.start(config=config, ram=ram, extra=extra,
                             check="clean" if clean else None)

    yield start
    daemons.stop_all()


@pytest.fixture
def world_dir():
    """A directory under /tmp that every user may traverse (tmp_path's
    parents may be 0700)."""
    d = _make_world_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def world_faytd(world_dir):
    """world_faytd(policy=None, as_user=None, uid=None, **config) -> a faytd
    whose socket is 0666 in world_dir."""
    daemons = _Daemons(world_dir, world=True)

    def start(policy=None, as_user=None, uid=None, ram="64MiB", **config):
        cfg = {"socket_mode": "0666"}
        cfg.update(config)
        if policy is not None:
            cfg["policy"] = policy
        return daemons.start(config=cfg, ram=ram, as_user=as_user, uid=uid,
                             check="no-traceback")

    yield start
    daemons.stop_all()


@pytest.fixture(scope="session")
def as_user():
    return AsUser()


def _factory(make, end):
    """A fixture's factory: what make(...) returns, end() takes after the test."""
    made = []

    def factory(*args, **kw):
        x = make(*args, **kw)
        made.append(x)
        return x

    yield factory
    for x in made:
        end(x)


@pytest.fixture
def conn_to():
    """conn_to(faytd) -> a libportal.Connection to that daemon, closed after the test."""
    import libportal
    yield from _factory(lambda d: libportal.Connection(d.socket), lambda c: c.close())


@pytest.fixture
def spawn(request):
    """spawn(code, env=None, **kw) -> a Child (support.children); every child
    is killed after the test.  env None: the session faytd's."""
    def start(code, env=None, **kw):
        return Child(code, request.getfixturevalue("faytd").env() if env is None else env, **kw)

    yield from _factory(start, Child.kill)


@pytest.fixture
def restartable(tmp_path):
    """start() -> a faytd on one directory (socket, journal); kill() SIGKILLs
    the running one.  Whatever runs at the end is stopped cleanly."""
    state = {"d": None}
    directory = str(tmp_path / "faytd")

    class Restartable:
        dir = directory
        pids = []

        @staticmethod
        def start():
            state["d"] = Faytd(directory)
            Restartable.pids.append(state["d"].proc.pid)
            return state["d"]

        @staticmethod
        def kill():
            d = state["d"]
            d.proc.kill()
            d.proc.wait(60)
            d.stop(check=False)

    yield Restartable
    if state["d"] is not None:
        state["d"].stop()
