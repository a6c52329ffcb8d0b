"""The test harness of fayt-portals (tests/support): one way to start faytd,
children started the way a libportal user should start them, layouts read
from the ABI, and a session that must leave nothing behind.

    daemon.py    Faytd (the one way a test runs faytd), AsUser (Python as
                 another uid), parse_config (faytd's checks, in process)
    children.py  Child (python -c CODE, line by line, bounded waits),
                 wait_until, wait_child_exit
    procs.py     CTX (multiprocessing, forkserver), call_in_child
    layout.py    what tests read of shared memory, at the ABI's offsets
    leaks.py     what the session must not leave behind
    plugin.py    the fixtures, the fork guard and the leak check (pytest)

tests/conftest.py loads plugin.py; a test module imports what it needs
from here, never from another test module.
"""
