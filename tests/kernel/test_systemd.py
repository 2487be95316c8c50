"""`make install` / `make uninstall` into a scratch tree, the unit checked by systemd-analyze, and the
installed daemon run under the unit's own sandbox (tests/kernel/unit_sandbox.py applies it as
systemd does) with real traffic: READY=1 on the notify socket, exact counts, privileges gone."""

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from . import traffic
from .netns import NetnsPair
from .test_daemon import free_port, get, samples, wait_ready

pytestmark = pytest.mark.host_only  # packaging or load: make test-kernels' guests skip it (README, "Tests")

ROOT = Path(__file__).resolve().parents[2]
N = 20


@pytest.fixture(scope="module")
def install(tmp_path_factory):
    """The install, with every path variable pointed into scratch space; the prefix stays out of
    /tmp, /home and /root, which the unit's sandbox hides. ACCOUNT=nobody: no user is added."""
    stage = tmp_path_factory.mktemp("stage")
    prefix = Path(f"/opt/tcpstate-test-{os.getpid()}")
    make = ["make", "-C", str(ROOT), f"PREFIX={prefix}", f"BINDIR={stage}/bin", f"UNITDIR={stage}/etc/systemd/system",
            f"SYSCONFDIR={stage}/etc", "ACCOUNT=nobody", f"SYSTEMCTL=systemctl --root={stage}", "SYSTEMD_RUNNING="]
    done = subprocess.run(make + ["install"], capture_output=True, text=True)
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        yield {"make": make, "stage": stage, "prefix": prefix, "unit": stage / "etc/systemd/system/tcpstate.service",
               "defaults": stage / "etc/default/tcpstate", "output": done.stdout}
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def test_install_puts_the_daemon_unit_and_defaults_in_place(install):
    prefix, stage, unit = install["prefix"], install["stage"], install["unit"]
    text = unit.read_text()
    assert not re.findall(r"@[A-Z]+@", text), "a placeholder was left"
    assert f"ExecStart={prefix}/bin/tcpstate run\n" in text
    assert "Environment=TCPSTATE_USER=nobody\n" in text
    assert f"EnvironmentFile=-{stage}/etc/default/tcpstate\n" in text
    assert (stage / "etc/systemd/system/multi-user.target.wants/tcpstate.service").is_symlink()  # enabled
    assert "enabled for the next boot, not started" in install["output"]
    assert os.readlink(stage / "bin/tcpstate") == f"{prefix}/bin/tcpstate"
    assert install["defaults"].read_text() == (ROOT / "deploy/systemd/tcpstate.default").read_text()
    assert (prefix / "share/doc/tcpstate/README.md").is_file()
    # The installed copy runs on its own: its package and BPF sources, not this checkout's.
    where = subprocess.run([prefix / "bin/python", "-c", "import monitor.kernel.abi as e; print(e.__file__, e.bpf_dir())"],
                           cwd="/", capture_output=True, text=True, check=True).stdout.split()
    assert where[0].startswith(f"{prefix}/lib/") and where[1].startswith(f"{prefix}/lib/")
    assert (Path(where[1]) / "tcpstate.c").read_text() == (ROOT / "bpf/tcpstate.c").read_text()
    for src in (ROOT / "bpf").iterdir():  # and the headers it includes
        assert (Path(where[1]) / src.name).read_text() == src.read_text(), src.name
    version = subprocess.run([prefix / "bin/tcpstate", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("tcpstate, version ")


def test_systemd_analyze_accepts_the_unit_and_rates_its_sandbox(install):
    verify = subprocess.run(["systemd-analyze", "verify", install["unit"]], capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", install["unit"]],
                              capture_output=True, text=True)
    assert security.returncode == 0, security.stderr
    exposure = float(re.search(r"Overall exposure level for tcpstate.service: ([\d.]+)", security.stdout).group(1))
    # 0 is best, 10 worst; systemd calls up to 3.9 "OK". 2.8 until CAP_SYS_ADMIN joined the
    # bounding set (Debian's kernels open perf events only with it; dropped once attached), 3.1
    # since; a higher number means another setting was loosened.
    assert exposure <= 3.1, security.stdout


@pytest.fixture
def pair():
    p = NetnsPair("sd")
    p.down()
    p.up()
    yield p
    p.down()


def test_the_installed_daemon_runs_under_the_units_sandbox(install, pair, tmp_path):
    port = free_port()
    with open(install["defaults"], "a") as f:  # the documented way to set options
        f.write(f"TCPSTATE_LISTEN_ADDRESS=127.0.0.1:{port}\nTCPSTATE_INCLUDE_CIDR=198.18.0.0/15\n")
    notify_dir = Path(f"/run/tcpstate-test-{os.getpid()}")  # not /tmp: PrivateTmp= hides it
    notify_dir.mkdir(exist_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_dir / "notify"))
    notify.settimeout(90)
    proc = subprocess.Popen(["unshare", "--mount", "--uts", "--propagation", "private", "--",
                             "/usr/bin/python3", str(ROOT / "tests/kernel/unit_sandbox.py"), str(install["unit"])],
                            env={"PATH": os.environ["PATH"], "NOTIFY_SOCKET": str(notify_dir / "notify")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        message = notify.recv(4096).decode()  # systemd's Type=notify waits for exactly this
        assert message.splitlines()[0] == "READY=1", message
        assert re.search(rf"^STATUS=serving http://127.0.0.1:{port}/metrics; (\d+) of \1 tracepoints attached$", message, re.M)
        assert get(base + "/-/ready")[0] == 200  # ready is never announced before it is true
        wait_ready(base, proc)

        st = {k: v.split() for k, v in (line.split(":", 1) for line in open(f"/proc/{proc.pid}/status"))}
        assert st["Uid"] == ["65534"] * 4 and st["Gid"] == ["65534"] * 4  # Environment=TCPSTATE_USER=nobody
        assert st["CapEff"] == st["CapPrm"] == st["CapBnd"] == ["0000000000000000"]
        assert st["NoNewPrivs"] == ["1"] and st["Seccomp"] == ["2"]

        before = samples(get(base + "/metrics")[1])
        with traffic.Listener(pair.server, pair.SERVER_ADDR) as listener:
            traffic.client_closes_first(pair.client, listener, N)
        key = ("tcpstate_connections_opened_total", (("direction", "active"),))
        passive = ("tcpstate_connections_opened_total", (("direction", "passive"),))
        for _ in range(100):
            after = samples(get(base + "/metrics")[1])
            if after[key] - before[key] == N and after[passive] - before[passive] == N:
                break
            subprocess.run(["sleep", "0.1"])
        assert (after[key] - before[key], after[passive] - before[passive]) == (N, N)
        assert after[("tcpstate_map_read_errors_total", ())] == 0

        proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096).decode().splitlines()[0] == "STOPPING=1"
        assert proc.wait(timeout=15) == 0, proc.stderr.read()
        log = proc.stderr.read()
        assert "privileges dropped: running as user nobody (uid 65534, gid 65534) with capabilities: none" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        shutil.rmtree(notify_dir, ignore_errors=True)


def test_uninstall_removes_what_install_added_and_keeps_a_changed_defaults_file(install):
    prefix, stage = install["prefix"], install["stage"]
    with open(install["defaults"], "a") as f:
        f.write("TCPSTATE_LOG_LEVEL=debug\n")
    done = subprocess.run(install["make"] + ["uninstall"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not prefix.exists()
    assert not install["unit"].exists()
    assert not (stage / "etc/systemd/system/multi-user.target.wants/tcpstate.service").exists()
    assert not (stage / "bin/tcpstate").exists()
    assert install["defaults"].exists() and f"kept {install['defaults']} (changed)" in done.stdout
    install["defaults"].write_text((ROOT / "deploy/systemd/tcpstate.default").read_text())
    again = subprocess.run(install["make"] + ["uninstall"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr  # idempotent
    assert not install["defaults"].exists()  # unchanged: removed
