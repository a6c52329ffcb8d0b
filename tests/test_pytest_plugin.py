"""The user plugin (faytd/pytest_plugin.py, entry point pytest11 "fayt"): the
example of docs/testing.md runs as written, in a pytest of its own (pytester,
a subprocess: the plugin is loaded through its entry point, as a user's
pytest loads it); and a server that fails to start fails its test with what
it wrote on stderr, within the bound."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(name):
    """The code block of docs/testing.md whose first line is `# name`."""
    with open(os.path.join(ROOT, "docs", "testing.md")) as f:
        text = f.read()
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        if block.startswith("# %s\n" % name):
            return block
    raise AssertionError("docs/testing.md has no block starting with # %s" % name)


def _run(pytester, *args):
    # -p no:cacheprovider: nothing written next to the files; the inner
    # session's faytd runs in its own basetemp and stops with it.
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=240)


def test_pytest_plugin_runs_the_docs_example(pytester):
    pytester.makepyfile(myserver=_example("myserver.py"),
                        test_myserver=_example("test_myserver.py"))
    r = _run(pytester)
    r.assert_outcomes(passed=3)


def test_pytest_plugin_is_off_with_no_fayt(pytester):
    pytester.makepyfile(test_off="def test_uses(fayt_daemon):\n    pass\n")
    r = _run(pytester, "-p", "no:fayt")
    r.assert_outcomes(errors=1)
    r.stdout.fnmatch_lines(["*fixture 'fayt_daemon' not found*"])


def test_pytest_plugin_a_server_that_dies_before_it_is_ready_fails_its_test(pytester):
    pytester.makepyfile(test_dies='''
import sys

def test_dies(fayt_server):
    fayt_server(code="import sys; sys.stderr.write('no config here\\\\n'); sys.exit(3)",
                ready="ready", timeout=20)
''')
    r = _run(pytester)
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*exited (3) early*", "*no config here*"])


def test_pytest_plugin_servers_and_connections_are_closed_after_the_test(pytester):
    """After a test, its servers are stopped and its connection closed: the
    next test sees no context of theirs left in the session's faytd."""
    pytester.makepyfile(test_clean='''
import libportal as lp

seen = {}

def test_first(fayt_server, fayt_connection):
    srv = fayt_server(code="import libportal as lp, time; lp.connection(); time.sleep(60)")
    seen["pid"] = srv.pid
    seen["ctx"] = fayt_connection.context_id
    assert srv.context > 0

def test_second(fayt_connection):
    import time
    deadline = time.monotonic() + 20
    while True:
        ctxs = fayt_connection.list_contexts()["contexts"]
        left = [c for c in ctxs if c["connected"] and (c["pid"] == seen["pid"]
                                                       or c["id"] == seen["ctx"])]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == []
''')
    r = _run(pytester)
    r.assert_outcomes(passed=2)


def test_pytest_plugin_runs_the_fault_injection_example(pytester):
    pytester.makepyfile(myserver=_example("myserver.py"),
                        test_myserver_faults=_example("test_myserver_faults.py"))
    r = _run(pytester)
    r.assert_outcomes(passed=2)
