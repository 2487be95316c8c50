"""CLI argument handling with CliRunner: one-line errors, exit codes, help with examples."""

import socket

import pytest
from click.testing import CliRunner

from monitor.cli import cli
from monitor.system import privileges


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("args,needle", [
    (["run", "--include-cidr", "10.0.0.300/8"], "--include-cidr"),
    (["run", "--exclude-cidr", "not-a-cidr"], "--exclude-cidr"),
    (["run", "--include-port", "70000"], "--include-port"),
    (["run", "--include-port", "http"], "--include-port"),
    (["run", "--listen-address", "localhost"], "--listen-address"),
    (["run", "--listen-address", "::1:9966"], "--listen-address"),
    (["run", "--listen-address", "127.0.0.1:99999"], "--listen-address"),
    (["watch", "--include-cidr", "1.2.3.4/33"], "--include-cidr"),
    (["run", "--max-sockets", "10"], "--max-sockets"),
    (["run", "--recent-closes", "-1"], "--recent-closes"),
    (["run", "--max-offenders", "many"], "--max-offenders"),
    (["run", "--no-such-flag"], "--no-such-flag"),
])
def test_bad_flag_values_exit_2_with_one_line(args, needle):
    res = invoke(*args)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert needle in lines[0] and "error" in lines[0]
    assert res.stdout == ""


def test_env_var_sets_filters(monkeypatch):
    res = CliRunner().invoke(cli, ["run"], env={"TCPSTATE_INCLUDE_CIDR": "10.0.0.0/8 bogus"})
    assert res.exit_code == 2 and "bogus" in res.stderr


@pytest.mark.parametrize("command", ["run", "watch", "check"])
def test_help_has_examples(command):
    res = invoke(command, "--help")
    assert res.exit_code == 0
    assert "Example" in res.stdout and f"tcpstate {command}" in res.stdout


def test_group_help_lists_commands():
    res = invoke("--help")
    assert res.exit_code == 0
    for command in ("run", "watch", "check"):
        assert command in res.stdout


def test_not_privileged_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(privileges, "can_load_programs", lambda: (False, "not root and lacks CAP_BPF: run with sudo"))
    res = invoke("run", "--listen-address", "127.0.0.1:0")
    assert res.exit_code == 1
    assert res.stderr.strip() == "tcpstate: error: not root and lacks CAP_BPF: run with sudo"


def test_listen_port_in_use_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(privileges, "can_load_programs", lambda: (True, "ok"))
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        res = invoke("run", "--listen-address", f"127.0.0.1:{port}")
    finally:
        holder.close()
    assert res.exit_code == 1
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith(f"tcpstate: error: cannot listen on 127.0.0.1:{port}") and "in use" in line
    assert "Traceback" not in res.stderr


def test_two_netns_paths_with_one_label_exit_2():
    res = invoke("run", "--netns", "/run/netns/blue", "--netns", "/var/run/netns/blue")
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and "--netns" in res.stderr and "'blue' twice" in res.stderr


def test_netns_env_is_colon_separated():
    res = CliRunner().invoke(cli, ["run"], env={"TCPSTATE_NETNS": "/run/netns/blue:/var/run/netns/blue"})
    assert res.exit_code == 2 and "'blue' twice" in res.stderr  # split into two paths


@pytest.mark.parametrize("value", ["0", "61"])
def test_forecast_window_is_within_the_time_wait_lifetime(value):
    res = invoke("run", "--forecast-window", value)
    assert res.exit_code == 2 and "--forecast-window" in res.stderr
