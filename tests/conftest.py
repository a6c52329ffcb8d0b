"""The suite's configuration is the harness's plugin (tests/support/plugin.py):
its fixtures, the fork guard and the session's leak check; and pytest's own
pytester, with which tests/test_pytest_plugin.py runs the user plugin's
example (faytd/pytest_plugin.py, loaded through its entry point)."""
pytest_plugins = ["support.plugin", "pytester"]
