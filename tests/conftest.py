"""The suite's configuration is the harness's plugin (tests/support/plugin.py):
its fixtures, the fork guard and the session's leak check."""
pytest_plugins = ["support.plugin"]
