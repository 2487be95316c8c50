"""Kernel-test fixtures: root, a namespace pair, probes attached to the running kernel, counter deltas."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from monitor.kernel.counters import aggregate
from monitor.kernel.tracefs import detect_layout, ensure_tracefs
from monitor.settings import Filters

from .netns import NetnsPair
from .pace import seconds

TEST_NET = ipaddress.ip_network("198.18.0.0/15")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/kernel/" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session", autouse=True)
def require_root():
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("kernel tests need root; CI runs them as root")
        pytest.skip("kernel tests need root (sudo make test)")


KERNEL_LOCK = "/tmp/tcpstate-kernel.lock"  # also taken by tests/load/bench.py, per round


@pytest.fixture(scope="session", autouse=True)
def kernel_lock(require_root):
    """One kernel-test session at a time on a host: the probes count every namespace, so another
    checkout's traffic in 198.18.0.0/15 would land in this one's exact counts."""
    fd = os.open(KERNEL_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@pytest.fixture(scope="session")
def layout():
    return detect_layout(ensure_tracefs())


@pytest.fixture(scope="session")
def churn(tmp_path_factory):
    """tests/load/churn.c, built for this run: the load generator of the churn, storm and watch tests."""
    exe = tmp_path_factory.mktemp("churn") / "churn"
    src = Path(__file__).resolve().parent.parent / "load" / "churn.c"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(src)], check=True)
    return str(exe)


@pytest.fixture(scope="session")
def netns():
    pair = NetnsPair()
    pair.down()
    pair.up()
    yield pair
    pair.down()


def nosock_resets(layout, n: int) -> dict:
    """The resets a host sends for n segments that matched no socket (connects to a closed port),
    as counted on this kernel: none where it has no signal for them (5.10; README, "Kernel support")."""
    return {("sent", "NONE", "NO_SOCKET"): n} if layout.nosock_resets_source else {}


def attach(layout, filters: Filters, **kwargs):
    from monitor.kernel.probes import Probes

    p = Probes(layout, filters, **kwargs)
    p.attach()
    return p


@pytest.fixture(scope="module")
def probes(layout):
    """Probes that count only the test network, so other traffic on the host cannot leak in."""
    p = attach(layout, Filters(include_cidrs=(TEST_NET,)))
    yield p
    p.close()


@dataclass
class Delta:
    transitions: dict
    resets: dict
    opened: dict
    failures: dict
    handshakes: int
    lifetimes: int
    misses: dict  # tracepoint -> runs the kernel skipped meanwhile
    port_reuse: dict  # client|server -> n, non-zero only
    resets_after_handshake: dict  # sent|received -> n, non-zero only
    retransmits: dict  # state -> n, non-zero only
    syn_retransmits: dict  # client|server -> n, non-zero only
    failed_connect_syns: int
    handshake_buckets: dict  # upper bound in seconds -> handshakes in that bucket alone, non-zero only
    handshake_seconds: float  # their sum


def _diff(after: dict, before: dict) -> dict:
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in out.items() if v}


def _bucket_deltas(after: tuple, before: tuple) -> dict:
    """Per bucket of a cumulative histogram, the observations that landed in it alone."""
    grown = [(bound, a - b) for (bound, a), (_, b) in zip(after, before)]
    return _diff({bound: n - (grown[i - 1][1] if i else 0) for i, (bound, n) in enumerate(grown)}, {})


class Meter:
    """Counter deltas since creation, read from the maps."""

    def __init__(self, probes, layout):
        self.probes = probes
        self.reasons = layout.reason_names
        self.before = self._read()

    def _read(self):
        return aggregate(self.probes.read(), self.reasons, self.probes.program_stats())

    def delta(self) -> Delta:
        a, b = self._read(), self.before
        return Delta(
            transitions=_diff(a.transitions, b.transitions),
            resets=_diff(a.resets, b.resets),
            opened=_diff(a.opened, b.opened),
            failures=_diff(a.failures, b.failures),
            handshakes=a.handshake.count - b.handshake.count,
            lifetimes=a.lifetime.count - b.lifetime.count,
            misses={tp: st[2] - b.programs[tp][2] for tp, st in a.programs.items()},
            port_reuse=_diff(a.port_reuse, b.port_reuse),
            resets_after_handshake=_diff(a.resets_after_handshake, b.resets_after_handshake),
            retransmits=_diff(a.retransmits, b.retransmits),
            syn_retransmits=_diff(a.syn_retransmits or {}, b.syn_retransmits or {}),
            failed_connect_syns=a.failed_connect_syns - b.failed_connect_syns,
            handshake_buckets=_bucket_deltas(a.handshake.buckets, b.handshake.buckets),
            handshake_seconds=a.handshake.sum_seconds - b.handshake.sum_seconds,
        )

    def settle(self, expected_transitions: dict, timeout: float = 10.0) -> Delta:
        """Wait until the transitions reach what is expected (the last ACKs are asynchronous),
        then a little longer so that any excess would show too. Each poll reads the maps, which
        holds the per-CPU guard tracepoint programs share: transitions fired from a kernel timer
        meanwhile are skipped, so wait for those on the kernel's own count first (tcp_ext)."""
        deadline = time.monotonic() + seconds(timeout)
        while time.monotonic() < deadline:
            if self.delta().transitions == expected_transitions:
                break
            time.sleep(0.05)
        time.sleep(0.3)
        return self.delta()


@pytest.fixture
def meter(probes, layout):
    return Meter(probes, layout)


@pytest.fixture
def on_path_rejecter():
    """nftables in a server namespace, before its TCP stack: the first data segment to a port is
    answered with a reset the server's socket never sees, as a firewall or IPS on the path would
    do. Yields arm(namespace, port); the table goes when the test ends."""
    table = f"tcpst{os.getpid()}"
    armed = []

    def arm(ns: str, port: int) -> None:
        rules = (f"table inet {table} {{\n chain input {{\n type filter hook input priority 0; policy accept;\n"
                 f" tcp dport {port} tcp flags & psh == psh reject with tcp reset\n }}\n}}\n")
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True, check=True,
                       capture_output=True)
        armed.append(ns)

    yield arm
    for ns in armed:
        subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", table], capture_output=True)
