"""faytd's configuration file and its policy, parsed in process
(faytd/config.py, faytd/policy.py, through support.daemon.parse_config: the
checks faytd makes before it serves): what it refuses, with which message.
How faytd itself reports a refusal (a non-zero exit, the message on stderr,
no Traceback, no socket) is checked once for each place a refusal comes
from, with a real faytd."""
import json

import pytest

from support.daemon import faytd_refuses, parse_config

ALL_CLASSES = ["SHARE", "DIRECT", "ANON", "COW", "SPECIAL"]


def _write(tmp_path, config):
    path = tmp_path / "faytd.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return str(path)


def _refused(tmp_path, config):
    """The message with which faytd refuses this configuration."""
    with pytest.raises(ValueError) as e:
        parse_config(_write(tmp_path, config))
    return str(e.value)


def test_config_the_embedded_default_and_a_file_that_tightens_it_are_taken(tmp_path):
    assert parse_config(None)["max_sharepoints"] == 100000
    cfg = parse_config(_write(tmp_path, {"max_sharepoints": 5, "ram": "16MiB", "policy": {
        "categories": {"core": {"classes": ["ANON"]}}, "rules": [{"uid": 0, "category": "core"}]}}))
    assert (cfg["max_sharepoints"], cfg["ram"]) == (5, 16 << 20)


@pytest.mark.parametrize("policy, message", [
    ({"categories": {"core": {"classes": ["ANON", "SHAER"]}},
      "rules": [{"uid": 0, "category": "core"}]},
     "policy: category core: unknown portal class 'SHAER'"),
    ({"categories": {"core": {"classes": ALL_CLASSES}},
      "rules": [{"uid": 0, "category": "kernel"}]},
     "policy: rule {'uid': 0, 'category': 'kernel'} names no known category"),
    ({"categories": {"core": {"classes": ALL_CLASSES}}, "default": "server"},
     "policy: default category 'server' is not defined"),
    ({"categories": {}, "rules": []}, "policy: no categories"),
    ({"categories": {"core": {"classes": ALL_CLASSES, "notify": ["core", "drivers"]}},
      "rules": [{"uid": 0, "category": "core"}]},
     "policy: category core: notify names no known category: drivers"),
    ({"categories": {"core": {"classes": ALL_CLASSES}},
      "rules": [{"uid": 0, "categroy": "core"}]},
     "unknown keys ['categroy']"),
])
def test_config_invalid_policy_is_refused(tmp_path, policy, message):
    assert message in _refused(tmp_path, {"policy": policy})


@pytest.mark.parametrize("config, message", [
    ({"max_sharepoints": 5000000000},
     "config: max_sharepoints: 5000000000 is not a whole number from 1 to 4294967295"),
    ({"max_sharepoints": 100000.0},
     "config: max_sharepoints: 100000.0 is not a whole number from 1 to 4294967295"),
    ({"max_mappings_per_context": -1},
     "config: max_mappings_per_context: -1 is not a whole number from 1 to 4294967295"),
    ({"max_mappings_per_context": True},
     "config: max_mappings_per_context: True is not a whole number from 1 to 4294967295"),
    ({"fast_syscalls": "yes"}, "config: fast_syscalls must be true or false"),
    ({"flood_nice": 0}, "config: flood_nice: 0 is not a nice value from 1 to 19 (or null)"),
    ({"flood_nice": 20}, "config: flood_nice: 20 is not a nice value from 1 to 19 (or null)"),
    ({"flood_nice": "10"}, "config: flood_nice: '10' is not a nice value from 1 to 19 (or null)"),
    ({"flood_calls_per_s": 0},
     "config: flood_calls_per_s: 0 is not a whole number from 1 to 4294967295"),
    ({"max_ram_per_context": "20000000000GiB"},
     "config: max_ram_per_context: '20000000000GiB' is more than 2^64 bytes"),
    ({"max_portal_length": "20000000000GiB"},
     "config: max_portal_length: '20000000000GiB' is more than 2^64 bytes"),
    ({"ram": "20000GiB"}, "config: ram: 21474836480000 bytes is 2^32 frames or more"),
    ({"ram": 3}, "config: ram: 3 bytes is less than one 4096-byte frame"),
])
def test_config_out_of_range_limits_are_refused(tmp_path, config, message):
    """A limit faytd's C keeps in 32 or 64 bits is refused with a message."""
    assert message in _refused(tmp_path, config)


def test_config_bad_json_is_refused(tmp_path):
    err = _refused(tmp_path, '{"policy": {"categories": {"core": }}')
    assert "config: " in err
    assert "faytd.json: Expecting value: line 1 column 36" in err
    assert "unknown keys ['polcy']" in _refused(tmp_path, '{"polcy": {}}')


@pytest.mark.parametrize("policy, what", [
    ({"categories": {"core": {"classes": ALL_CLASSES}},
      "rules": [{"uid": "0", "category": "core"}]}, "uid"),                 # a string
    ({"categories": {"core": {"classes": ALL_CLASSES}},
      "rules": [{"uid": 0, "gid": [0], "category": "core"}]}, "gid"),
    ({"categories": {"core": {"clases": ALL_CLASSES}},                        # typo
      "rules": [{"uid": 0, "category": "core"}]}, "clases"),
    ({"categories": {"core": {"classes": "ANON"}},                            # not a list
      "rules": [{"uid": 0, "category": "core"}]}, "category core"),
])
def test_config_ill_typed_policy_is_refused(tmp_path, policy, what):
    """Values of the wrong type or misspelt keys would silently grant nothing
    (a rule that never matches, a category with no class): refuse them at start."""
    assert what in _refused(tmp_path, {"policy": policy})


@pytest.mark.parametrize("config, message", [
    ('{"policy": {"categories": {"core": }}',                       # the JSON itself
     "faytd.json: Expecting value: line 1 column 36"),
    ({"max_sharepoints": 5000000000},                                # config.load
     "config: max_sharepoints: 5000000000 is not a whole number from 1 to 4294967295"),
    ({"policy": {"categories": {}, "rules": []}}, "policy: no categories"),     # the policy
])
def test_config_faytd_refuses_to_start_with_the_message(tmp_path, config, message):
    err = faytd_refuses(["--socket", str(tmp_path / "faytd.sock"),
                         "--config", _write(tmp_path, config)])
    assert message in err, err
