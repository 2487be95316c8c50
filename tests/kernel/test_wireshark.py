"""tcpstate against Wireshark on the same packets: each scenario runs between namespaces the test makes, is captured at both ends with tcpdump, and every counter delta equals what tshark's TCP analysis counts in the captures (README, "Wireshark equivalents")."""

from __future__ import annotations

import json
import os
import platform
import select
import socket
import threading
import time

import pytest

from monitor.kernel.abi import HIST_BOUNDS_SECONDS
from monitor.sockets import kstats

from . import traffic, wire
from .conftest import Meter
from .netns import in_netns, socket_in
from .routed import RoutedPair

CONNECT_TIME_SLACK = 0.05  # s per connection: capture timestamps vs tracepoint times, under emulation too


@pytest.fixture(scope="module")
def path():
    p = RoutedPair()
    p.down()
    p.up()
    yield p
    p.down()


@pytest.fixture(autouse=True)
def open_path(path):
    yield
    path.clear()


class Observed:
    """Captures at both ends and tcpstate's counters over the same traffic: start, run the traffic,
    then finish() once both ends are quiet."""

    def __init__(self, path: RoutedPair, probes, layout, tmp_path, record, name: str):
        self.path, self.probes, self.layout = path, probes, layout
        self.record, self.name = record, name
        self.client = wire.Capture(path.client, path.CLIENT_ADDR, tmp_path / "client.pcap")
        self.server = wire.Capture(path.server, path.SERVER_ADDR, tmp_path / "server.pcap")

    def __enter__(self):
        self.client.start()
        self.server.start()
        self.meter = Meter(self.probes, self.layout)
        self.out_rsts = self._out_rsts()
        return self

    def __exit__(self, *exc):
        self.client.stop(check=False)  # after a failure: the failure is the news
        self.server.stop(check=False)

    def _out_rsts(self) -> int:
        with in_netns(self.path.server):
            return kstats.read_kernel_counters()["out_rsts"]

    def finish(self, quiet: bool = True):
        """(client trace, server trace, tcpstate's delta, resets the server's stack counted itself).
        quiet: wait for both ends to be done with every connection first."""
        if quiet:
            self.path.quiet()
        time.sleep(0.3)  # a close pending its reset or destruction is settled microseconds later
        delta = self.meter.delta()
        out_rsts = self._out_rsts() - self.out_rsts
        self.client.stop()
        self.server.stop()
        client, server = wire.analyze(self.client, self.server)
        return client, server, delta, out_rsts

    def report(self, tshark: dict, tcpstate: dict, **notes) -> None:
        """The scenario's row of the closing table: a property of junit.xml's test suite
        (make test-kernels keeps it per kernel) and a line on stdout. notes: what else the captures
        showed, compared with nothing."""
        row = {"kernel": platform.release(), "scenario": self.name, "tshark": tshark, "tcpstate": tcpstate, **notes}
        self.record(f"wireshark: {self.name}", json.dumps(row))
        print(f"\nwireshark {json.dumps(row)}")


@pytest.fixture
def observed(path, probes, layout, tmp_path, record_testsuite_property, request):
    def make(name: str | None = None) -> Observed:
        return Observed(path, probes, layout, tmp_path, record_testsuite_property, name or request.node.name)
    return make


def resets(d, direction: str) -> int:
    return sum(n for (dr, _s, _r), n in d.resets.items() if dr == direction)


def connect_all(client_ns: str, listener: traffic.Listener, n: int, timeout: float = 30.0) -> None:
    """n connects at once (non-blocking), each accepted and closed client first once all are up:
    one second for a lost handshake segment, not n."""
    socks = []
    try:
        for _ in range(n):
            c = socket_in(client_ns)
            c.setblocking(False)
            assert c.connect_ex((listener.addr, listener.port)) == 115  # EINPROGRESS
            socks.append(c)
        pending, deadline = list(socks), time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            assert left > 0, f"{len(pending)} of {n} connects still pending after {timeout} s"
            _, writable, _ = select.select([], pending, [], left)
            for c in writable:
                assert c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                pending.remove(c)
        accepted = [listener.sock.accept()[0] for _ in range(n)]
    finally:
        for c in socks:
            c.close()
    for s in accepted:
        assert s.recv(1) == b""
        s.close()


# --- resets, by who sent them -----------------------------------------------------------------------

def test_resets_for_connects_to_a_closed_port(path, observed, layout):
    n = 10
    with observed() as o:
        traffic.refused(path.client, path.SERVER_ADDR, 9, n)
        client, server, d, out_rsts = o.finish()
    tshark = {"resets sent": server.resets_sent() + client.resets_sent(),
              "resets received": client.resets_received() + server.resets_received(),
              "SYNs of failed connects": client.syns_of_failed_connects(),
              "reused ports": client.reused_syns_sent() + server.reused_syns_received()}
    tcpstate = {"resets sent": resets(d, "sent"), "resets received": resets(d, "received"),
                "SYNs of failed connects": d.failed_connect_syns, "reused ports": sum(d.port_reuse.values())}
    o.report(tshark, tcpstate)
    assert tshark["resets sent"] == tshark["resets received"] == n and tshark["SYNs of failed connects"] == n
    assert d.resets.get(("received", "SYN_SENT", "UNKNOWN")) == n and d.failures == {"refused": n}
    if layout.nosock_resets_source:
        assert tcpstate == tshark
    else:  # 5.10: no signal for resets sent for no socket (README, "Kernel support")
        assert tcpstate == {**tshark, "resets sent": 0}
        assert out_rsts == tshark["resets sent"]  # what the host says instead: tcpstate_kernel_tcp_out_rsts_total


def test_resets_an_on_path_device_injects(path, observed):
    """The router rejects each request with a reset in the server's name: the client receives it,
    and neither end's capture shows it sent by either end's stack."""
    n = 5
    with traffic.Listener(path.server, path.SERVER_ADDR) as lst:
        path.path(f"tcp dport {lst.port} tcp flags & psh == psh reject with tcp reset")
        with observed() as o:
            accepted = traffic.requests_reset_on_path(path.client, lst, n)
            try:
                client, server, d, _ = o.finish(quiet=False)  # the server's ends stay open, unaware
            finally:
                for s in accepted:  # their FINs meet no socket at the client: after the scenario
                    s.close()
        path.quiet()
    injected = client.resets_received() - server.resets_sent()
    tshark = {"resets sent": client.resets_sent() + server.resets_sent(),
              "resets received": client.resets_received() + server.resets_received(), "injected": injected}
    tcpstate = {"resets sent": resets(d, "sent"), "resets received": resets(d, "received"),
                "injected": resets(d, "received") - resets(d, "sent")}
    o.report(tshark, tcpstate)
    assert tshark == {"resets sent": 0, "resets received": n, "injected": n}
    assert tcpstate == tshark
    assert d.resets == {("received", "ESTABLISHED", "UNKNOWN"): n}


# --- port reuse as Wireshark flags it ---------------------------------------------------------------

def reconnect_refused(path, n: int) -> None:
    """n connects from one fixed port to a closed one (seed 001's example)."""
    port = 0
    for _ in range(n):
        c = socket_in(path.client)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        c.bind((path.CLIENT_ADDR, port))
        port = c.getsockname()[1]
        assert c.connect_ex((path.SERVER_ADDR, 9)) == 111  # ECONNREFUSED
        c.close()


def reconnect_after_timeout(path, lst: traffic.Listener) -> None:
    """A connect whose SYNs the path drops (it times out after one retransmission), then a connect
    from the same port that works."""
    c = socket_in(path.client)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 1)
    c.bind((path.CLIENT_ADDR, 0))
    port = c.getsockname()[1]
    path.path(f"tcp sport {port} drop")
    c.settimeout(30)
    with pytest.raises(TimeoutError):
        c.connect((path.SERVER_ADDR, lst.port))
    c.close()
    path.clear()
    traffic.from_fixed_port(path.client, path.CLIENT_ADDR, lst, 1, "server_first", port=port)


@pytest.mark.parametrize("ended", ["refused", "fin", "reset", "timeout"])
def test_port_reuse_is_what_wireshark_flags(path, observed, layout, ended):
    """Each SYN after the first on one 4-tuple whose previous connection ended: refused by a closed
    port, closed with FINs, aborted with a reset, or timed out."""
    n = 12 if ended == "refused" else 6
    with traffic.Listener(path.server, path.SERVER_ADDR) as lst, observed(f"port reuse after {ended}") as o:
        if ended == "refused":
            reconnect_refused(path, n)
        elif ended == "timeout":
            reconnect_after_timeout(path, lst)
        else:
            traffic.from_fixed_port(path.client, path.CLIENT_ADDR, lst, n, "server_first" if ended == "fin" else "abort")
        client, server, d, _ = o.finish()
    tshark = {"client": client.reused_syns_sent(), "server": server.reused_syns_received(),
              "SYNs of failed connects": client.syns_of_failed_connects(),
              "SYN retransmissions": client.syn_retransmissions_sent()}
    tcpstate = {"client": d.port_reuse.get("client", 0), "server": d.port_reuse.get("server", 0),
                "SYNs of failed connects": d.failed_connect_syns,
                "SYN retransmissions": d.syn_retransmits.get("client", 0)}
    o.report(tshark, tcpstate)
    expected = {"refused": (n - 1, n - 1), "fin": (n - 1, n - 1), "reset": (n - 1, n - 1), "timeout": (1, 0)}[ended]
    assert (tshark["client"], tshark["server"]) == expected  # the server never saw the SYNs the path dropped
    assert client.reused_other() == server.reused_other() == 0  # no SYN-ACK was flagged
    if ended == "refused" and not layout.refused_syn_source:
        # 5.10: a reset for no socket is not seen, so neither is the refused SYN (README, "Kernel support")
        assert tcpstate == {**tshark, "server": 0}
    else:
        assert tcpstate == tshark
    if ended == "timeout":  # the dropped SYN and its retransmissions, all with one ISN: no reuse among them
        assert d.failures == {"timeout": 1} and tshark["SYN retransmissions"] >= 1


# --- retransmissions --------------------------------------------------------------------------------

def retransmissions(client: wire.Trace, server: wire.Trace) -> dict:
    return {"SYN (client)": client.syn_retransmissions_sent(), "SYN-ACK (server)": server.syn_ack_retransmissions_sent(),
            "all": client.retransmissions_sent() + server.retransmissions_sent()}


def counted_retransmissions(d) -> dict:
    return {"SYN (client)": d.syn_retransmits.get("client", 0), "SYN-ACK (server)": d.syn_retransmits.get("server", 0),
            "all": sum(d.retransmits.values())}


def bucket(seconds: float) -> float:
    return next((b for b in HIST_BOUNDS_SECONDS if seconds <= b), float("inf"))


@pytest.mark.parametrize("lost", ["SYN", "SYN-ACK"])
def test_handshake_retransmissions_and_connect_time(path, observed, lost):
    """The path drops the first SYN (or SYN-ACK) of each connection: the same retransmissions in
    the captures and the counters, and connect times from the first SYN, retransmission included
    (Wireshark's iRTT starts at the last SYN and leaves it out)."""
    n = 3
    with traffic.Listener(path.server, path.SERVER_ADDR) as lst:
        if lost == "SYN":
            path.drop_first_syns()
        else:
            path.drop_first_syn_acks()
        with observed(f"{lost} lost") as o:
            connect_all(path.client, lst, n)
            client, server, d, _ = o.finish()
    tshark, tcpstate = retransmissions(client, server), counted_retransmissions(d)
    times = client.connect_times()
    tshark["connect seconds"] = round(sum(times), 3)
    tcpstate["connect seconds"] = round(d.handshake_seconds, 3)
    o.report(tshark, tcpstate)
    assert tshark["SYN (client)" if lost == "SYN" else "SYN-ACK (server)"] >= n
    assert {k: v for k, v in tcpstate.items() if k != "connect seconds"} == \
        {k: v for k, v in tshark.items() if k != "connect seconds"}
    assert d.retransmits.get("SYN_SENT", 0) == tshark["SYN (client)"]
    assert d.retransmits.get("SYN_RECV", 0) == tshark["SYN-ACK (server)"]
    # Connect time: the same connections in the same histogram buckets (about 1 s: one
    # retransmission timeout), and the same total within the clocks' slack.
    assert len(times) == n and all(t > 1.0 for t in times)
    buckets = {}
    for t in times:
        buckets[bucket(t)] = buckets.get(bucket(t), 0) + 1
    assert d.handshake_buckets == buckets
    assert abs(d.handshake_seconds - sum(times)) <= n * CONNECT_TIME_SLACK, (d.handshake_seconds, times)
    if lost == "SYN":
        assert all(rtt < 0.5 for rtt in client.initial_rtts()), client.initial_rtts()


def test_retransmissions_of_a_lossy_transfer(path, observed):
    """The path drops every 10th segment it forwards, both ways (the kernel has no netem): every
    retransmission either end sent is in its own capture, and in the counters."""
    size = 4 << 20
    with traffic.Listener(path.server, path.SERVER_ADDR) as lst:
        path.path("meta l4proto tcp numgen inc mod 10 == 0 drop")
        with observed("lossy transfer") as o:
            got = []
            c = socket_in(path.client)
            c.settimeout(60)

            def receive():
                s, _ = lst.sock.accept()
                s.settimeout(60)
                n = 0
                while chunk := s.recv(1 << 16):
                    n += len(chunk)
                got.append(n)
                s.close()

            server = threading.Thread(target=receive)
            server.start()
            c.connect((path.SERVER_ADDR, lst.port))
            c.sendall(os.urandom(size))
            c.shutdown(socket.SHUT_WR)
            assert c.recv(1) == b""
            c.close()
            server.join(60)
            assert got == [size]
            client, server_trace, d, _ = o.finish()
    tshark, tcpstate = retransmissions(client, server_trace), counted_retransmissions(d)
    ooo = client.count(lambda f: f.out_of_order and f.src == client.host) + \
        server_trace.count(lambda f: f.out_of_order and f.src == server_trace.host)
    o.report(tshark, tcpstate, out_of_order_at_the_sender=ooo, by_state=d.retransmits)
    assert tshark["all"] > 0, "no segment was retransmitted: no test of agreement"
    assert tcpstate == tshark
