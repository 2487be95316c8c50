"""Detector thresholds: defaults, TOML file, --set overrides, and one-line errors with file, line and key."""

import pytest
from click.testing import CliRunner

from monitor.cli import cli
from monitor.detect.config import DETECTOR_DEFAULTS, ConfigError, load_detector_config


def write(tmp_path, text):
    p = tmp_path / "tcpstate.toml"
    p.write_text(text)
    return str(p)


def test_defaults():
    c = load_detector_config()
    assert c == DETECTOR_DEFAULTS and c is not DETECTOR_DEFAULTS
    assert c["rst_storm"]["rate"] == 100.0 and c["anomaly"]["interval_seconds"] == 1.0


def test_file_then_overrides(tmp_path):
    path = write(tmp_path, "[rst_storm]\nrate = 50  # resets/s\nseverity = \"warning\"\n\n"
                           "[time_wait_buildup]\ncount = 20000\nfraction = 0\n")
    c = load_detector_config(path, ("rst_storm.rate=75", "connect_failures.min_attempts=3"))
    assert c["rst_storm"]["rate"] == 75.0 and c["rst_storm"]["severity"] == "warning"
    assert c["time_wait_buildup"]["count"] == 20000 and c["time_wait_buildup"]["fraction"] == 0.0
    assert c["connect_failures"]["min_attempts"] == 3
    assert isinstance(c["time_wait_buildup"]["fraction"], float)  # an int in TOML is fine for a float key


def test_kernel_windows_and_offenders_settable(tmp_path):
    path = write(tmp_path, "[anomaly]\ntop_offenders = 0\n\n[port_reuse]\nreuse_within_seconds = 0\nrate = 5\n\n"
                           "[reset_after_handshake]\nwithin_seconds = 0.25\nsent_rate = 3\n")
    c = load_detector_config(path, ("reset_after_handshake.min_connections=50",))
    assert c["anomaly"]["top_offenders"] == 0 and c["port_reuse"]["reuse_within_seconds"] == 0.0
    assert c["port_reuse"]["rate"] == 5.0
    assert c["reset_after_handshake"] == dict(DETECTOR_DEFAULTS["reset_after_handshake"], within_seconds=0.25,
                                              sent_rate=3.0, min_connections=50)


@pytest.mark.parametrize("text, message", [
    ("[rst_storm]\nrate = 5\nbogus = 1\n", ":3: rst_storm.bogus: unknown key (known: enabled, "),
    ("[rst_storms]\nrate = 5\n", ":1: unknown section 'rst_storms' (known: [anomaly], [rst_storm], "),
    ("[rst_storm]\n\nrate = \"fast\"\n", ":3: rst_storm.rate: must be a number, got 'fast'"),
    ("[rst_storm]\nrate = true\n", ":2: rst_storm.rate: must be a number, got True"),
    ("[rst_storm]\nrate = -1\n", ":2: rst_storm.rate: must be >= 0, got -1"),
    ("[rst_storm]\nwindow_seconds = 0\n", ":2: rst_storm.window_seconds: must be > 0, got 0"),
    ("[rst_storm]\nrate = nan\n", ":2: rst_storm.rate: must be a finite number, got nan"),
    ("[time_wait_buildup]\nfraction = 1.5\n", ":2: time_wait_buildup.fraction: must be a fraction from 0 to 1"),
    ("[time_wait_buildup]\ncount = 10.5\n", ":2: time_wait_buildup.count: must be a whole number, got 10.5"),
    ("[connect_failures]\nenabled = 1\n", ":2: connect_failures.enabled: must be true or false, got 1"),
    ("[connect_failures]\nseverity = \"page\"\n", ":2: connect_failures.severity: must be one of info, warning, "
                                                  "critical, got 'page'"),
    ("[rst_storm]\nrate = = 5\n", ": not valid TOML: Invalid value (at line 2, column 8)"),
    ("[port_reuse]\nreuse_within_seconds = 7200\n", ":2: port_reuse.reuse_within_seconds: must be <= 3600, got 7200"),
    ("[reset_after_handshake]\nwithin_seconds = -0.5\n", ":2: reset_after_handshake.within_seconds: must be >= 0"),
    ("[reset_after_handshake]\nmin_connections = 2.5\n", ":2: reset_after_handshake.min_connections: must be a "
                                                         "whole number"),
    ("[anomaly]\ntop_offenders = -1\n", ":2: anomaly.top_offenders: must be >= 0, got -1"),
    ("rate = 5\n", ": unknown section 'rate'"),
])
def test_file_errors_say_where(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_detector_config(path)
    assert str(exc.value).startswith(path) and message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("item, message", [
    ("rst_storm.rate", "expected SECTION.KEY=VALUE"),
    ("rate=5", "expected SECTION.KEY=VALUE"),
    ("rst_storm.speed=5", "unknown key 'rst_storm.speed'"),
    ("rst_storm.rate=-3", "rst_storm.rate: must be >= 0, got -3"),
    ("rst_storm.rate=fast", "rst_storm.rate: must be a number, got 'fast'"),
])
def test_override_errors(item, message):
    with pytest.raises(ConfigError) as exc:
        load_detector_config(None, (item,))
    assert str(exc.value).startswith(f"--set {item!r}: ") and message in str(exc.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_detector_config(str(tmp_path / "missing.toml"))
    assert str(exc.value) == f"{tmp_path / 'missing.toml'}: cannot read: No such file or directory"


def test_config_check_prints_a_valid_config_that_reads_back(tmp_path):
    path = write(tmp_path, "[rst_storm]\nrate = 50\n")
    res = CliRunner().invoke(cli, ["config-check", path, "--set", "time_wait_buildup.severity=info"])
    assert res.exit_code == 0, res.output
    again = write(tmp_path, res.stdout)
    c = load_detector_config(again)
    assert c["rst_storm"]["rate"] == 50.0 and c["time_wait_buildup"]["severity"] == "info"


def test_bad_config_exits_2_with_one_line(tmp_path):
    path = write(tmp_path, "[rst_storm]\nrate = -5\n")
    for args in (["config-check", path], ["run", "--config", path]):
        res = CliRunner().invoke(cli, args, standalone_mode=True)
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{path}:2: rst_storm.rate: must be >= 0, got -5" in lines[0]


def test_set_from_the_environment_is_space_separated(tmp_path):
    res = CliRunner().invoke(cli, ["run"], env={"TCPSTATE_SET": "rst_storm.rate=5 rst_storm.window_seconds=-1"})
    assert res.exit_code == 2 and "rst_storm.window_seconds: must be > 0, got -1" in res.stderr


def test_events_file_unopenable_exits_2(tmp_path):
    res = CliRunner().invoke(cli, ["run", "--events", str(tmp_path / "no" / "such" / "dir.jsonl")])
    assert res.exit_code == 2 and "cannot open: No such file or directory" in res.stderr


def test_webhook_must_be_http():
    res = CliRunner().invoke(cli, ["run", "--events-webhook", "ftp://example.invalid/x"])
    assert res.exit_code == 2 and "is not an http:// or https:// URL" in res.stderr
