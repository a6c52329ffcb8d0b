"""faytd's and fayt's command lines: --version, the log (timestamps, levels,
--log-level, --log-format json), --print-config into a pipe closed early,
and what a start that fails leaves behind (docs/configuration.md)."""
import json
import os
import re
import subprocess
import sys

import libportal

from support.daemon import Faytd, faytd_refuses

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z faytd(\.\w+)* "
                       r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S")


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m"] + list(args), capture_output=True, text=True,
                          timeout=60, **kw)


def _one_client(d):
    c = libportal.Connection(d.socket)
    c.close()


def test_command_version_of_faytd_and_fayt():
    for module, name in (("faytd", "faytd"), ("faytd.cli", "fayt")):
        r = _run(module, "--version")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "%s %s\n" % (name, libportal.__version__)


def test_command_log_lines_have_a_utc_timestamp_and_a_level(fresh_faytd):
    d = fresh_faytd()                       # -v: every context is logged (DEBUG)
    _one_client(d)
    lines = d.stop().splitlines()
    assert lines, "faytd logged nothing"
    bad = [ln for ln in lines if not TEXT_LINE.match(ln)]
    assert not bad, bad
    levels = {ln.split()[2] for ln in lines}
    assert {"INFO", "DEBUG"} <= levels, levels


def test_command_log_format_json_is_one_object_per_line(fresh_faytd):
    d = fresh_faytd(extra=["--log-format", "json"])
    _one_client(d)
    lines = d.stop().splitlines()
    assert lines, "faytd logged nothing"
    records = [json.loads(ln) for ln in lines]          # every line alone is one object
    for r in records:
        assert set(r) >= {"time", "level", "logger", "message"}, r
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"]), r
        assert r["logger"].split(".")[0] == "faytd", r
    assert {"INFO", "DEBUG"} <= {r["level"] for r in records}


def test_command_log_level_warning_leaves_out_info_and_debug(fresh_faytd):
    d = fresh_faytd(extra=["--log-level", "warning"])   # after -v: the level given wins
    _one_client(d)
    log = d.stop()
    assert not [ln for ln in log.splitlines() if re.search(r" (INFO|DEBUG) ", ln)], log


def test_command_log_level_must_be_a_known_one(tmp_path):
    r = _run("faytd", "--socket", str(tmp_path / "s.sock"), "--log-level", "loud")
    assert r.returncode == 2
    assert "--log-level: invalid choice: 'loud'" in r.stderr
    assert not os.path.exists(tmp_path / "s.sock")


def test_command_print_config_writes_modes_as_the_docs_do(tmp_path):
    r = _run("faytd", "--print-config")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["socket_mode"] == "0600"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"socket_mode": "0660"}))
    r = _run("faytd", "--config", str(cfg), "--print-config")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["socket_mode"] == "0660"
    assert '"socket_mode": "0660"' in r.stdout


def test_command_print_config_into_a_pipe_closed_before_it_writes():
    """faytd --print-config | head -0: the reader is gone before faytd
    writes (EPIPE); faytd ends quietly, with status 0."""
    rfd, wfd = os.pipe()
    os.close(rfd)
    try:
        p = subprocess.run([sys.executable, "-m", "faytd", "--print-config"], stdout=wfd,
                           stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(wfd)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""


def test_command_ram_below_one_frame_is_refused_when_the_config_is_read(tmp_path):
    r = _run("faytd", "--ram", "3", "--print-config")     # refused before anything else
    assert r.returncode == 2
    assert "config: ram: 3 bytes is less than one 4096-byte frame" in r.stderr
    err = faytd_refuses(["--socket", str(tmp_path / "faytd.sock"), "--ram", "4095"])
    assert "config: ram: 4095 bytes is less than one 4096-byte frame" in err
    assert os.listdir(tmp_path) == []                    # not even its directory's lock


def test_command_a_start_that_fails_after_taking_its_lock_leaves_no_lock_file(tmp_path):
    """Another faytd serves the socket: the second one took the lock of its
    own state directory, then found the socket taken; it exits with a
    message and removes its lock file.  The first one serves on."""
    first = Faytd(str(tmp_path / "first"))
    try:
        state = tmp_path / "second"
        r = _run("faytd", "--socket", first.socket, "--state-dir", str(state))
        assert r.returncode != 0
        assert "Traceback" not in r.stderr, r.stderr
        assert not os.path.exists(state / "faytd.journal.lock"), os.listdir(state)
        _one_client(first)
        assert os.path.exists(os.path.join(first.dir, "faytd.journal.lock"))
    finally:
        first.stop()


def test_command_a_socket_path_too_long_for_unix_sockets_is_refused(tmp_path):
    sock = str(tmp_path / ("s" * 120 + ".sock"))
    err = faytd_refuses(["--socket", sock])
    assert "socket: %s is %d bytes long; a Unix socket's path has at most 107" \
        % (sock, len(sock)) in err, err
    assert os.listdir(tmp_path) == []
