"""unit_checks.py: tcpstate.service under the real systemd, run by make test-fresh inside its machine, as root, after make install.

Not collected by `make test` (no test_ prefix): it needs systemd as PID 1 and a unit that
`make install` started. The tests run in file order and share the unit: start, traffic, sandbox,
reload, kill and restart, stop, the security rating, then uninstall. FRESH_OUT names a directory
where the facts for the report go (systemd version, exposure score, timings); CLONE the checkout.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import count  # noqa: E402 (the same check as after make run)

UNIT = "tcpstate.service"
URL = "http://127.0.0.1:9966"
OUT = Path(os.environ.get("FRESH_OUT", "/tmp"))
CLONE = Path(os.environ.get("CLONE", Path(__file__).resolve().parents[2]))
CONFIG = Path("/etc/tcpstate/fresh-test.toml")
DROPIN = Path("/etc/systemd/system/tcpstate.service.d/fresh-test.conf")
N = 20

if not Path("/run/systemd/system").is_dir():
    pytest.exit("unit_checks.py needs systemd as PID 1: make test-fresh runs it inside its machine", returncode=2)


def fact(key: str, value) -> None:
    with open(OUT / "facts", "a") as f:
        f.write(f"{key} {value}\n")


def run(*cmd, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if check:
        assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}: {done.stderr}"
    return done


def show(prop: str) -> str:
    return run("systemctl", "show", "-p", prop, "--value", UNIT).stdout.strip()


def get(path: str) -> int:
    """The HTTP status, 0 when nothing answers."""
    try:
        return urllib.request.urlopen(URL + path, timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def metric(name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(URL + "/metrics", timeout=10).read().decode()
    m = re.search(rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$", text, re.M)
    assert m, f"{name}{{{labels}}} not in /metrics"
    return float(m.group(1))


def wait_for(what: str, predicate, timeout: float):
    """Polls an asynchronous outcome (a signal handled, a restart after RestartSec) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.2)


def programs_of(pid: int) -> set[int]:
    """IDs of the BPF programs that process pid holds open (fdinfo's prog_id: Debian's bpftool
    is built without the skeletons that would name the holders)."""
    ids = set()
    for fd in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            m = re.search(r"^prog_id:\s+(\d+)$", fd.read_text(), re.M)
        except OSError:  # closed meanwhile
            continue
        if m:
            ids.add(int(m.group(1)))
    return ids


def loaded() -> set[int]:
    """IDs of every BPF program in the kernel."""
    return {p["id"] for p in json.loads(run("bpftool", "-j", "prog", "show").stdout or "[]")}


def journal_since(since: float) -> str:
    return run("journalctl", "-u", UNIT, "-o", "cat", "--no-pager", f"--since=@{since:.0f}").stdout


def test_start_returns_only_once_ready():
    """Type=notify: `systemctl start` waits for READY=1, which the daemon sends once attached and
    serving, so /-/ready answers 200 the moment start returns, with no polling."""
    assert show("Type") == "notify"
    assert run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    run("systemctl", "stop", UNIT)
    assert get("/-/ready") == 0
    # The reload test's config goes in now, so that it costs no extra start (a BPF compile).
    CONFIG.parent.mkdir(exist_ok=True)
    CONFIG.write_text("[rst_storm]\nrate = 200\n")
    DROPIN.parent.mkdir(exist_ok=True)
    DROPIN.write_text(f"[Service]\nEnvironment=TCPSTATE_CONFIG={CONFIG}\n")
    run("systemctl", "daemon-reload")
    t0 = time.monotonic()
    run("systemctl", "start", UNIT)
    fact("unit_start_seconds", f"{time.monotonic() - t0:.1f}")
    assert get("/-/ready") == 200
    assert run("systemctl", "is-active", UNIT).stdout.strip() == "active"


def test_real_traffic_is_counted_exactly():
    assert count.check(URL, N) == 0


def test_the_sandbox_is_what_the_unit_says():
    pid = int(show("MainPID"))
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    status = {k: v.split() for k, v in status.items()}
    uid = pwd.getpwnam("tcpstate").pw_uid
    assert status["Uid"] == [str(uid)] * 4  # Environment=TCPSTATE_USER=tcpstate, after attaching
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[caps] == ["0000000000000000"], (caps, status[caps])
    assert status["NoNewPrivs"] == ["1"]
    assert status["Seccomp"] == ["2"]  # SystemCallFilter= and friends: a filter is loaded
    # ProtectSystem=strict: everything but the API file systems and LogsDirectory= is read-only in
    # the service's mount namespace, even for root (nsenter keeps our privileges, not its).
    for path in ("/usr", "/etc", "/opt/tcpstate", "/boot", "/var/lib", "/"):
        probe = f"{path.rstrip('/')}/.fresh-test-probe"
        done = run("nsenter", "-t", pid, "-m", "touch", probe, check=False)
        assert done.returncode != 0 and "Read-only file system" in done.stderr, (path, done.stderr)
    run("nsenter", "-t", pid, "-m", "touch", "/var/log/tcpstate/.fresh-test-probe")  # LogsDirectory=
    Path("/var/log/tcpstate/.fresh-test-probe").unlink()
    # ProtectHome=yes: the user's home is not there.
    assert run("nsenter", "-t", pid, "-m", "ls", "-A", "/home").stdout.strip() == ""


def test_reload_rereads_the_config_and_a_bad_file_keeps_the_old_one():
    pid = show("MainPID")
    ok = metric("tcpstate_config_reloads_total", 'result="success"')
    bad = metric("tcpstate_config_reloads_total", 'result="failure"')
    since = time.time() - 1
    CONFIG.write_text("[rst_storm]\nrate = 300\n")
    try:
        reload_and_refuse(since, ok, bad, pid)
    finally:
        # The next test's restart reads the file afresh, and a bad one stops a start (exit 2).
        CONFIG.write_text("[rst_storm]\nrate = 300\n")


def reload_and_refuse(since: float, ok: float, bad: float, pid: str) -> None:
    run("systemctl", "reload", UNIT)
    wait_for("a successful reload", lambda: metric("tcpstate_config_reloads_total", 'result="success"') == ok + 1, 10)
    wait_for("the reload in the journal",
             lambda: f"config reloaded from {CONFIG}: changed rst_storm" in journal_since(since), 10)

    CONFIG.write_text('[rst_storm]\nrate = "lots"\n')
    run("systemctl", "reload", UNIT)
    wait_for("a refused reload", lambda: metric("tcpstate_config_reloads_total", 'result="failure"') == bad + 1, 10)
    assert metric("tcpstate_config_last_reload_successful") == 0
    line = wait_for("the refusal in the journal", lambda: re.search(
        r"^.*config reload failed, keeping the previous config: .*$", journal_since(since), re.M), 10)
    assert str(CONFIG) in line.group(0) and "rst_storm" in line.group(0), line.group(0)
    fact("reload_refused", line.group(0))
    assert show("MainPID") == pid and run("systemctl", "is-active", UNIT).stdout.strip() == "active"
    assert get("/-/ready") == 200


def test_a_killed_daemon_is_restarted_and_leaves_no_program():
    old = int(show("MainPID"))
    restarts = int(show("NRestarts"))
    held = programs_of(old)
    assert held and held <= loaded(), f"the daemon holds programs {held}, bpftool lists {loaded()}"
    t0 = time.monotonic()
    run("systemctl", "kill", "-s", "KILL", UNIT)
    wait_for("a restart after the SIGKILL (Restart=on-failure, RestartSec=5s)",
             lambda: int(show("NRestarts")) == restarts + 1 and show("ActiveState") == "active", 180)
    fact("restart_seconds", f"{time.monotonic() - t0:.1f}")
    new = int(show("MainPID"))
    assert new != old and not Path(f"/proc/{old}").exists()
    left = held & loaded()
    assert not left, f"programs of the killed daemon still loaded: {sorted(left)}"
    assert programs_of(new)
    assert get("/-/ready") == 200


def test_stop_exits_0_within_2_seconds():
    held = programs_of(int(show("MainPID")))
    assert held
    t0 = time.monotonic()
    run("systemctl", "stop", UNIT)
    took = time.monotonic() - t0
    fact("stop_seconds", f"{took:.2f}")
    assert (show("ExecMainCode"), show("ExecMainStatus"), show("Result")) == ("1", "0", "success")  # 1: exited
    assert took < 2, f"systemctl stop took {took:.2f} s"
    assert not held & loaded()
    assert get("/-/ready") == 0


def test_systemd_analyze_security():
    version = run("systemctl", "--version").stdout.splitlines()[0]
    fact("systemd", version)
    done = run("systemd-analyze", "security", "--no-pager", UNIT)
    (OUT / "systemd-analyze-security.txt").write_text(done.stdout)
    exposure = float(re.search(r"Overall exposure level for tcpstate.service: ([\d.]+)", done.stdout).group(1))
    fact("exposure", exposure)
    # 0 best, 10 worst; higher means a setting was loosened. test_systemd's bound, offline on the
    # host: 2.8 until CAP_SYS_ADMIN joined the bounding set (Debian's kernels attach tracepoints
    # only with it), 3.1 since; Debian 12's systemd 252 rates the same unit 2.9 here.
    assert exposure <= 3.1, done.stdout


def test_uninstall_leaves_nothing_behind():
    DROPIN.unlink()  # this test's own files go first: uninstall keeps an admin's drop-ins
    DROPIN.parent.rmdir()
    CONFIG.unlink()
    CONFIG.parent.rmdir()
    run("systemctl", "daemon-reload")  # else systemd still starts it with the drop-in's --config
    run("systemctl", "start", UNIT)  # uninstall has to stop a running unit
    pid = int(show("MainPID"))
    held = programs_of(pid)
    assert held
    done = run("make", "-C", CLONE, "uninstall")
    (OUT / "uninstall.log").write_text(done.stdout + done.stderr)
    for path in ("/opt/tcpstate", "/etc/systemd/system/tcpstate.service", "/usr/local/bin/tcpstate",
                 "/etc/default/tcpstate", "/etc/systemd/system/multi-user.target.wants/tcpstate.service",
                 "/etc/systemd/system/tcpstate.service.d"):
        assert not os.path.lexists(path), f"{path} is left"
    assert show("LoadState") == "not-found"
    assert not Path(f"/proc/{pid}").exists()
    assert not held & loaded()
    assert get("/-/ready") == 0
