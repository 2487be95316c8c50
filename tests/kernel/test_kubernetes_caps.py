"""The DaemonSet's capability set, taken from deploy/kubernetes/daemonset.yaml, runs the real daemon with its real args: it attaches, then ends as uid 65534 with nothing."""

import pwd
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.host_only  # packaging or load: make test-kernels' guests skip it (README, "Tests")

ROOT = Path(__file__).resolve().parents[2]
TCPSTATE = str(Path(sys.executable).with_name("tcpstate"))


def manifest_container() -> dict:
    (ds,) = yaml.safe_load_all((ROOT / "deploy/kubernetes/daemonset.yaml").read_text())
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    return c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_like(caps: list[str], args: list[str]) -> subprocess.Popen:
    """uid 0 whose bounding set is the pod's capabilities, no_new_privs (allowPrivilegeEscalation:
    false): what runc gives the container's process. The args are the manifest's, but serving on
    a free loopback port instead of every address's 9966."""
    args = list(args)
    i = args.index("--listen-address")
    port = free_port()
    args[i + 1] = f"127.0.0.1:{port}"
    bounding = "-all," + ",".join("+" + c.lower() for c in caps)
    proc = subprocess.Popen(["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs",
                             TCPSTATE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc.port = port
    return proc


def ready(proc, timeout=60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def status(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid"):
            out[key] = tuple(int(x) for x in value.split())
        elif key in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs"):
            out[key] = int(value.strip(), 16)
    return out


def stop(proc) -> tuple[int, str]:
    if proc.poll() is None:
        proc.terminate()
    try:
        rc = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait(timeout=5)
    return rc, proc.stderr.read()


def test_the_manifest_capabilities_attach_and_drop_to_the_user():
    c = manifest_container()
    sc = c["securityContext"]
    assert sc["runAsUser"] == 0 and sc["capabilities"]["drop"] == ["ALL"]
    proc = container_like(sc["capabilities"]["add"], c["args"])
    try:
        assert ready(proc), "not ready within 60 s"
        st = status(proc.pid)
        uid = int(c["args"][c["args"].index("--user") + 1])
        assert (st["Uid"], st["Gid"]) == ((uid,) * 4, (uid,) * 4)
        assert (st["CapEff"], st["CapPrm"], st["CapBnd"], st["CapAmb"], st["NoNewPrivs"]) == (0, 0, 0, 0, 1)
    finally:
        rc, log = stop(proc)
    assert rc == 0, log
    name = pwd.getpwuid(uid).pw_name
    assert f"privileges dropped: running as user {name} (uid {uid}, gid {uid}) with capabilities: none" in log


def test_without_the_switch_capabilities_the_user_flag_is_fatal():
    # Why SETUID, SETGID and SETPCAP are in the manifest: BPF and PERFMON alone attach, but the
    # switch to --user then fails, and the daemon exits rather than run as root.
    c = manifest_container()
    name = pwd.getpwuid(int(c["args"][c["args"].index("--user") + 1])).pw_name
    proc = container_like(["BPF", "PERFMON"], c["args"])
    try:
        proc.wait(timeout=60)
    finally:
        rc, log = stop(proc)
    assert rc == 1
    assert log.splitlines()[-1] == (f"tcpstate: error: cannot become user {name}: setgroups: Operation not permitted "
                                    "(switching users takes CAP_SETUID and CAP_SETGID, and a user namespace that "
                                    "allows setgroups)")
