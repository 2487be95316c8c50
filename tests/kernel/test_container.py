"""The container entrypoint for real on this host: the host's headers, the image's generic fallback with /lib/modules hidden, no headers at all, and tracefs missing with and without CAP_SYS_ADMIN (private mount namespaces; the host's mounts are never touched)."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_daemon import NOT_READY, free_port, get

pytestmark = pytest.mark.host_only  # packaging or load: make test-kernels' guests skip it (README, "Tests")

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = str(ROOT / "deploy" / "container" / "entrypoint.sh")
BAKE = str(ROOT / "deploy" / "container" / "bake-headers.sh")
KVER = platform.release()
MODULES = Path("/lib/modules", KVER)
PREFIX = "tcpstate-entrypoint: "

# Run in a private mount namespace: whatever the script mounts or unmounts there stays there.
PRIVATE = ["unshare", "--mount", "--propagation", "private", "bash", "-euc"]
HIDE_MODULES = "mount -t tmpfs -o size=1m tcpstate-empty /lib/modules"
# Both places tracefs may be; -l because the daemon's own attach may have left users of it.
UNMOUNT_TRACEFS = ("for m in /sys/kernel/debug/tracing /sys/kernel/tracing; do "
                   "if mountpoint -q $m; then umount -l $m; fi; done; "
                   "test ! -d /sys/kernel/tracing/events && test ! -d /sys/kernel/debug/tracing/events")


def env(**extra) -> dict:
    """The venv's tcpstate first on PATH, as the image puts its venv first."""
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}:{e['PATH']}"
    e.pop("BCC_KERNEL_SOURCE", None)
    e.update(extra)
    return e


def in_namespace(setup: str, args: list[str]) -> list[str]:
    """A command line: a private mount namespace, `setup` there, then exec args (same pid)."""
    return PRIVATE + [f'{setup}; exec "$@"', "bash"] + args


def serve(cmd: list[str], port: int, environ: dict) -> tuple[list[str], str]:
    """Start cmd (which ends in `tcpstate run` on port), wait for /-/ready, read /metrics, SIGTERM
    it; return its stderr lines from the entrypoint and /metrics. Asserts it exits 0."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environ)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"exited {proc.returncode}: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "never became ready"
            try:
                if get(base + "/-/ready")[0] == 200:
                    break
            except NOT_READY:
                pass
            time.sleep(0.1)
        status, metrics = get(base + "/metrics")
        assert status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return [line for line in stderr.splitlines() if line.startswith(PREFIX)], metrics


def refused(cmd: list[str], environ: dict) -> tuple[int, str]:
    result = subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=60)
    return result.returncode, result.stderr


def run_args(port: int) -> list[str]:
    return [ENTRYPOINT, "run", "--listen-address", f"127.0.0.1:{port}"]


def host_headers() -> str:
    """The directory bcc will compile in (its rule: source/ when build/ and source/ both exist)."""
    kpath = MODULES / "build"
    if (MODULES / "build").is_dir() and (MODULES / "source").is_dir():
        kpath = MODULES / "source"
    if not (kpath / "include/linux/kconfig.h").is_file():
        pytest.fail(f"this host has no kernel headers at {kpath}: make setup links them")
    return os.path.realpath(kpath)


def modules_state() -> list:
    """What the host's /lib/modules/$kver holds, to show that the tests leave it as it was."""
    return sorted((p.name, os.readlink(p) if p.is_symlink() else None) for p in MODULES.iterdir())


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    """The image's fallback, made the image's way: bake-headers.sh over this host's /usr/src."""
    dest = tmp_path_factory.mktemp("image") / "headers"
    result = subprocess.run([BAKE, "/usr/src", str(dest)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (f"{result.stderr.strip()}: these tests need Debian's generic headers in /usr/src "
                                    "(apt-get install linux-headers-$(dpkg --print-architecture))")
    return dest


@pytest.fixture(autouse=True)
def host_untouched():
    before = modules_state()
    tracefs = os.path.isdir("/sys/kernel/tracing/events")
    yield
    assert modules_state() == before
    assert os.path.isdir("/sys/kernel/tracing/events") == tracefs


def test_host_headers_as_they_are():
    port = free_port()
    lines, metrics = serve(run_args(port), port, env())
    assert lines == [f"{PREFIX}using the host's kernel headers for {KVER} ({host_headers()})"]
    assert 'tcpstate_probe_attached{tracepoint="sock:inet_sock_set_state"} 1.0' in metrics


def test_generic_fallback_with_lib_modules_hidden(baked):
    """No headers under /lib/modules (an empty tmpfs over it, in the namespace only): the
    entrypoint hands the baked tree to bcc through BCC_KERNEL_SOURCE and the daemon compiles,
    attaches and gets ready."""
    port = free_port()
    origin = (baked / ".origin").read_text().strip()
    lines, metrics = serve(in_namespace(HIDE_MODULES, run_args(port)), port,
                           env(TCPSTATE_FALLBACK_HEADERS=str(baked)))
    assert lines == [f"{PREFIX}no kernel headers for {KVER} at {MODULES}/build; using the image's {origin} "
                     "(exact ones: mount the host's /lib/modules and /usr/src)"]
    assert 'tcpstate_probe_attached{tracepoint="sock:inet_sock_set_state"} 1.0' in metrics


def test_no_headers_anywhere_exits_with_one_line(tmp_path):
    absent = tmp_path / "no-headers"
    code, stderr = refused(in_namespace(HIDE_MODULES, run_args(free_port())), env(TCPSTATE_FALLBACK_HEADERS=str(absent)))
    assert (code, stderr) == (1, f"{PREFIX}no kernel headers for {KVER}: none at {MODULES}/build and no fallback at "
                                 f"{absent}; mount the host's /lib/modules and /usr/src read-only (with "
                                 f"linux-headers-{KVER} installed on the host)\n")


def test_tracefs_missing_is_mounted():
    port = free_port()
    lines, _ = serve(in_namespace(UNMOUNT_TRACEFS, run_args(port)), port, env())
    assert lines == [f"{PREFIX}using the host's kernel headers for {KVER} ({host_headers()})",
                     f"{PREFIX}mounted tracefs at /sys/kernel/tracing"]


def test_tracefs_missing_without_cap_sys_admin_exits_with_one_line():
    """Root with only CAP_BPF and CAP_PERFMON, as the image is meant to run: mounting fails."""
    cmd = in_namespace(UNMOUNT_TRACEFS, ["setpriv", "--bounding-set=-all,+bpf,+perfmon", *run_args(free_port())])
    code, stderr = refused(cmd, env())
    lines = stderr.splitlines()
    assert code == 1
    assert lines[0] == f"{PREFIX}using the host's kernel headers for {KVER} ({host_headers()})"
    assert len(lines) == 2
    assert lines[1].startswith(f"{PREFIX}tracefs is not mounted at /sys/kernel/tracing and mounting it failed (mount: ")
    assert lines[1].endswith("): mount the host's /sys/kernel/tracing into the container, or grant CAP_SYS_ADMIN")
