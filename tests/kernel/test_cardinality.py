"""Outsiders cannot multiply series: traffic from many source addresses and ports, to open and closed
ports below and inside the ephemeral range, leaves every label of /metrics in a closed vocabulary
or under the --top-n cap, and no client address in any label."""

import re
import signal
import socket
import struct
import subprocess
from collections import defaultdict

import pytest

from monitor.kernel.tracefs import TRACEPOINTS
from monitor.tcp import STATE_NAMES

from . import traffic
from .netns import NetnsPair, ip, netns_path, socket_in
from .pace import seconds
from .test_daemon import TCPSTATE, free_port, get, wait_ready

TOP_N = 3
OPEN_PORTS = (8001, 8002, 40001, 40002)  # two below ip_local_port_range, two inside it
CLOSED_PORTS = tuple(range(9001, 9009))


@pytest.fixture(scope="module")
def setup():
    pair = NetnsPair("cd")
    pair.down()
    pair.up()
    clients = [f"198.18.0.{i}" for i in range(100, 140)]
    for addr in clients:
        ip("-n", pair.client, "addr", "add", f"{addr}/24", "dev", "tst0")
    port = free_port()
    proc = subprocess.Popen([TCPSTATE, "run", "--listen-address", f"127.0.0.1:{port}", "--include-cidr", "198.18.0.0/15",
                             "--top-n", str(TOP_N), "--state-interval", "0.5", "--events", "/dev/null",
                             "--netns", netns_path(pair.server), "--netns", netns_path(pair.client)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        yield pair, clients, base, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=seconds(15))
        pair.down()


def series(base: str) -> set:
    """(name, labels) of every sample; parsed by hand so that nothing is merged."""
    out = set()
    for line in get(base + "/metrics")[1].splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? ", line)
            labels = tuple(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out.add((m.group(1), labels))
    return out


def one_round(pair, clients, listeners) -> None:
    """From every client address: per open port a connection the client closes, one the server
    closes and one the client aborts; then a refused connect to every closed port."""
    for addr in clients:
        for lst in listeners:
            for how in ("client", "server", "abort"):
                c = socket_in(pair.client)
                c.settimeout(5)
                c.bind((addr, 0))
                c.connect((lst.addr, lst.port))
                s, _ = lst.sock.accept()
                s.settimeout(5)
                if how == "client":
                    c.close()
                    assert s.recv(1) == b""
                    s.close()
                elif how == "server":
                    s.close()
                    assert c.recv(1) == b""
                    c.close()
                else:
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    c.close()
                    traffic.expect_reset(s, "server")
                    s.close()
        for port in CLOSED_PORTS:
            c = socket_in(pair.client)
            c.settimeout(5)
            c.bind((addr, 0))
            with pytest.raises(ConnectionRefusedError):
                c.connect((pair.SERVER_ADDR, port))
            c.close()


def test_series_stay_bounded_and_carry_no_client_address(setup):
    pair, clients, base, proc = setup
    first, last = map(int, subprocess.run(["ip", "netns", "exec", pair.server, "sysctl", "-n",
                                           "net.ipv4.ip_local_port_range"], capture_output=True, text=True,
                                          check=True).stdout.split())
    assert OPEN_PORTS[0] < first <= OPEN_PORTS[2] <= last
    listeners = [traffic.Listener(pair.server, pair.SERVER_ADDR, p) for p in OPEN_PORTS]
    try:
        one_round(pair, clients[:2], listeners)
        subprocess.run(["sleep", "1.5"])  # three polls
        small = series(base)
        one_round(pair, clients, listeners)  # 20 times the peers, every one with new source ports
        subprocess.run(["sleep", "1.5"])
        large = series(base)
    finally:
        for lst in listeners:
            lst.close()

    client_addrs = set(clients) | {pair.CLIENT_ADDR}
    leaked = [s for s in large if any(a in v for _, v in s[1] for a in client_addrs)]
    assert leaked == [], leaked

    # Every label is either from a closed vocabulary or a capped one; a new label name fails
    # here until it is classified.
    states = set(STATE_NAMES.values()) | {"NONE", "UNKNOWN"}
    closed = {
        "from_state": states, "to_state": states, "state": states,
        "direction": {"sent", "received", "active", "passive"}, "role": {"client", "server"},
        "side": {"local", "remote"}, "tracepoint": {f"{g}:{n}" for g, n, _ in TRACEPOINTS},
        "kind": {"rst_storm", "time_wait_buildup", "connect_failures", "port_reuse", "reset_after_handshake"},
        "netns": {"", pair.server, pair.client},
        "le": None, "quantile": None,  # histogram buckets: fixed by the code
        "version": None, "kernel": None, "bcc_version": None, "send_reset_layout": None,  # build_info: one series
        "reason": None,  # the kernel's sk_rst_reason names, or the four connect-failure reasons
        "result": {"success", "failure", "sent", "failed", "dropped"},  # config reloads, webhook deliveries
    }
    capped = {"port", "remote"}
    per_group = defaultdict(set)
    for name, labels in large:
        for key, value in labels:
            assert key in closed or key in capped, f"unclassified label {key} on {name}"
            if closed.get(key) is not None:
                assert value in closed[key], (name, key, value)
            if key in capped:
                group = (name, tuple(kv for kv in labels if kv[0] not in capped))
                per_group[(group, key)].add(value)
    for (group, key), values in per_group.items():
        assert len(values) <= TOP_N + 1, (group, key, sorted(values))  # the top N and "other"
    assert any(len(v) == TOP_N + 1 for v in per_group.values()), "the traffic never reached the cap"

    # Twenty times the peers adds series only where a capped label filled up to its cap.
    grown = {s for s in large - small if not any(k in capped for k, _ in s[1])}
    assert grown == set(), sorted(grown)
    print(f"series: {len(small)} after 2 peers, {len(large)} after {len(clients)} peers")
