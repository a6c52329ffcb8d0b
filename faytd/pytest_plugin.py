"""fayt-portals' pytest plugin: a private faytd for a test session, and the
server processes a test starts against it.  Registered as the pytest11 entry
point "fayt", so it is active wherever fayt-portals is installed
(`-p no:fayt` turns it off).  docs/testing.md has an example.

Fixtures
  fayt_daemon          the session's faytd (faytd.launch.Faytd: .socket,
                       .log, .env()); while it runs, FAYT_SOCKET names it for
                       this process's libportal and every process the tests
                       start.
  fayt_connection      a libportal.Connection to it, closed after the test.
  fayt_server          fayt_server(module=None, *, argv=None, code=None,
                       args=(), env=None, ready="registered") -> a
                       faytd.testing.Server started against the session's
                       faytd and ready; stopped (SIGTERM, then SIGKILL) after
                       the test.
  fayt_inject          fault injection against the session's faytd: the
                       functions of faytd.testing (fail_call, kill_at_lock,
                       drop_doorbells, ...) as methods, through a
                       connection of its own; every rule it added is
                       removed after the test.
  fayt_daemon_factory  fayt_daemon_factory(config=None, ram=None, extra=())
                       -> a private faytd in a directory of its own under
                       /tmp (a socket's path must fit in 107 bytes), stopped
                       after the test (its servers: faytd.testing.start_server).
"""
import shutil
import tempfile
from typing import TYPE_CHECKING, Callable, Iterator

import pytest

from . import testing

if TYPE_CHECKING:      # imported when a fixture runs: loading the plugin stays cheap
    import libportal


def _short_dir():
    """A new directory under /tmp: a socket's path must fit in 107 bytes,
    which a tmp_path (nested, with the test's name) may not."""
    return tempfile.mkdtemp(prefix="fayt-pytest-")


@pytest.fixture(scope="session")
def fayt_daemon() -> "Iterator[testing.Faytd]":
    """The session's faytd; FAYT_SOCKET names it while it runs."""
    top = _short_dir()
    try:
        s = testing.SessionDaemon(top)
        yield s.daemon
        s.stop()
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def fayt_connection(fayt_daemon: testing.Faytd) -> "Iterator[libportal.Connection]":
    """A libportal.Connection to the session's faytd, closed after the test."""
    import libportal
    conn = libportal.Connection(fayt_daemon.socket)
    yield conn
    conn.close()


@pytest.fixture
def fayt_server(fayt_daemon: testing.Faytd) -> "Iterator[Callable[..., testing.Server]]":
    """fayt_server(module=None, *, argv=None, code=None, args=(), env=None,
    ready="registered", timeout=30) -> a faytd.testing.Server, ready; every
    one is stopped after the test."""
    started = []

    def start(module=None, **kw):
        srv = testing.start_server(fayt_daemon, module, **kw)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def fayt_daemon_factory() -> "Iterator[Callable[..., testing.Faytd]]":
    """fayt_daemon_factory(config=None, ram=None, extra=()) -> a private faytd
    (faytd.launch.Faytd) in a directory of its own; every one is stopped (and
    its directory removed) after the test."""
    started = []

    def start(config=None, ram=None, extra=()):
        top = _short_dir()
        started.append((top, None))
        d = testing.Faytd(top, config, ram, extra)
        started[-1] = (top, d)
        return d

    yield start
    for top, d in started:
        try:
            if d is not None:
                d.stop()
        finally:
            shutil.rmtree(top, ignore_errors=True)


class Injector:
    """fayt_inject: faytd.testing's fault injection through one connection
    (inject, fail_call, delay_call, kill_at_lock, kill_in_handler,
    kill_after, drop_doorbells, delay_doorbells, fail_pages, slow_chain,
    injected); remove_all() removes what it added."""

    def __init__(self, connection: "libportal.Connection") -> None:
        self.connection = connection
        self.faults: "list[testing.Fault]" = []

    def __getattr__(self, name: str) -> Callable[..., object]:
        if name not in ("inject", "fail_call", "delay_call", "kill_at_lock", "kill_in_handler",
                        "kill_after", "drop_doorbells", "delay_doorbells", "fail_pages",
                        "slow_chain"):
            raise AttributeError(name)
        fn = getattr(testing, name)

        def add(*args: object, **kw: object) -> testing.Fault:
            f = fn(*args, connection=self.connection, **kw)
            self.faults.append(f)
            return f
        add.__name__ = name
        add.__doc__ = fn.__doc__
        return add

    def injected(self) -> "dict[str, object]":
        """faytd's rules and what they injected (faytd.testing.injected)."""
        return testing.injected(connection=self.connection)

    def remove_all(self) -> None:
        """Remove every rule this injector added (those still there)."""
        import libportal
        for f in self.faults:
            try:
                f.remove()
            except libportal.NotFound:
                pass
        self.faults.clear()


@pytest.fixture
def fayt_inject(fayt_daemon: testing.Faytd) -> "Iterator[Injector]":
    """Fault injection against the session's faytd (an Injector): e.g.
    fayt_inject.kill_at_lock(server, "jobs"); its rules go after the test."""
    import libportal
    conn = libportal.Connection(fayt_daemon.socket)
    inj = Injector(conn)
    try:
        yield inj
    finally:
        try:
            inj.remove_all()
        finally:
            conn.close()
