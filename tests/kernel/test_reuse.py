"""Port reuse, resets right after the handshake and the offenders table, on real connections
between the test's namespaces: exact counts, both ends of each connection on this host."""

import os
import socket
import struct
import time
from pathlib import Path

from monitor.kernel import offenders
from monitor.kernel.probes import DEFAULT_WINDOWS
from monitor.timing import WallClock

from . import traffic
from .pace import seconds

N = 10


def peers(probes):
    return offenders.decode(probes.read_offenders(), WallClock())


def one(found, **want):
    """The single peer whose fields equal `want`."""
    hits = [p for p in found if all(getattr(p, k) == v for k, v in want.items())]
    assert len(hits) == 1, (want, found)
    return hits[0]


MY_COMM = Path("/proc/self/comm").read_text().strip()


def test_fixed_source_port_reused_after_aborts(netns, probes, meter):
    with traffic.Listener(netns.server, netns.SERVER_ADDR) as lst:
        port = traffic.from_fixed_port(netns.client, netns.CLIENT_ADDR, lst, N, "abort")
        d = meter.settle({
            ("CLOSE", "SYN_SENT"): N, ("SYN_SENT", "ESTABLISHED"): N, ("LISTEN", "SYN_RECV"): N,
            ("SYN_RECV", "ESTABLISHED"): N, ("ESTABLISHED", "CLOSE"): 2 * N, ("CLOSE", "LISTEN"): 1})
        # Every connection after the first reopened the 4-tuple the one before it closed: both
        # ends of it count, the client's connect and the server's accept.
        assert d.port_reuse == {"client": N - 1, "server": N - 1}
        # Each abort came well within a second of the handshake: sent by the client, received by the server.
        assert d.resets_after_handshake == {("sent", "client"): N, ("received", "server"): N}
        found = peers(probes)
        server = one(found, kind="port_reuse", remote=netns.CLIENT_ADDR, remote_port=port, local_port=lst.port)
        client = one(found, kind="port_reuse", remote=netns.SERVER_ADDR, remote_port=lst.port, local_port=port)
        assert server.count == client.count == N - 1
        assert (client.pid, client.comm) == (os.getpid(), MY_COMM)  # the process that connected
        assert server.pid is None  # accepted sockets have no connect()/listen() to name a process by
        early = one(found, kind="reset_after_handshake", remote=netns.SERVER_ADDR, remote_port=lst.port)
        assert early.local_port is None and early.count == N and early.pid == os.getpid()


def test_fixed_source_port_reopening_a_time_wait(netns, probes, meter):
    """The server closes first and keeps TIME_WAIT; the client's next SYN from the same port
    reopens that 4-tuple (what Wireshark calls "TCP Port numbers reused")."""
    with traffic.Listener(netns.server, netns.SERVER_ADDR) as lst:
        traffic.from_fixed_port(netns.client, netns.CLIENT_ADDR, lst, N, "server_first")
        d = meter.settle({("CLOSE", "LISTEN"): 1, ("CLOSE", "SYN_SENT"): N, ("SYN_SENT", "ESTABLISHED"): N,
                          ("LISTEN", "SYN_RECV"): N, ("SYN_RECV", "ESTABLISHED"): N, ("ESTABLISHED", "FIN_WAIT1"): N,
                          ("FIN_WAIT1", "FIN_WAIT2"): N, ("FIN_WAIT2", "TIME_WAIT"): N,
                          ("ESTABLISHED", "CLOSE_WAIT"): N, ("CLOSE_WAIT", "LAST_ACK"): N, ("LAST_ACK", "CLOSE"): N})
    assert d.port_reuse == {"client": N - 1, "server": N - 1}
    assert d.resets == {} and d.resets_after_handshake == {}


def test_ephemeral_ports_are_no_reuse(netns, meter):
    with traffic.Listener(netns.server, netns.SERVER_ADDR) as lst:
        traffic.client_closes_first(netns.client, lst, N)
        traffic.server_closes_first(netns.client, lst, N)
        traffic.linger_aborts(netns.client, lst, N)
    time.sleep(0.3)
    d = meter.delta()
    assert d.opened == {"active": 3 * N, "passive": 3 * N}
    assert d.port_reuse == {}


def test_reuse_after_the_window_is_not_counted(netns, probes, meter):
    # A window long enough that "at once" stays inside it on a slow machine too: with 0.3 s, the
    # reconnect in an emulated 5.10 guest (make test-kernels) fell outside it.
    window = seconds(1.5)
    probes.set_windows(DEFAULT_WINDOWS._replace(reuse=window))
    try:
        with traffic.Listener(netns.server, netns.SERVER_ADDR) as lst:
            port = traffic.from_fixed_port(netns.client, netns.CLIENT_ADDR, lst, 1, "abort")
            time.sleep(window + 0.5)
            traffic.from_fixed_port(netns.client, netns.CLIENT_ADDR, lst, 1, "abort", port=port)
            late = meter.delta()
            t0 = time.monotonic()
            traffic.from_fixed_port(netns.client, netns.CLIENT_ADDR, lst, 1, "abort", port=port)  # at once
            took = time.monotonic() - t0
            d = meter.delta()
    finally:
        probes.set_windows(DEFAULT_WINDOWS)
    assert late.opened == {"active": 2, "passive": 2} and late.port_reuse == {}
    assert took < window, f"the reconnect took {took:.2f} s, past the window: no test of 'within'"
    assert d.port_reuse == {"client": 1, "server": 1}


def test_reset_after_the_window_is_not_early(netns, probes, meter):
    probes.set_windows(DEFAULT_WINDOWS._replace(early_reset=0.3))
    try:
        with traffic.Listener(netns.server, netns.SERVER_ADDR) as lst:
            c, s = traffic._connect(netns.client, lst)
            time.sleep(0.6)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            traffic.expect_reset(s, "server")
            s.close()
            time.sleep(0.2)
    finally:
        probes.set_windows(DEFAULT_WINDOWS)
    d = meter.delta()
    assert sum(d.resets.values()) == 2 and d.resets_after_handshake == {}


def test_on_path_resets_after_the_handshake(netns, probes, meter, on_path_rejecter):
    """The mysterious reset: the client receives it right after the handshake, and no socket on
    either end sent it. Counted as received after the handshake, with the service as offender."""
    with traffic.Listener(netns.server, netns.SERVER_ADDR) as lst:
        on_path_rejecter(netns.server, lst.port)
        accepted = traffic.requests_reset_on_path(netns.client, lst, N)
        try:
            time.sleep(0.3)
            d = meter.delta()
        finally:
            time.sleep(1.2)  # past the 1 s window: closing the server ends now is not "early"
            for s in accepted:
                s.close()
    assert d.resets == {("received", "ESTABLISHED", "UNKNOWN"): N}  # nobody here sent them
    assert d.resets_after_handshake == {("received", "client"): N}
    found = peers(probes)
    early = one(found, kind="reset_after_handshake", remote=netns.SERVER_ADDR, remote_port=lst.port)
    assert early.count == N and early.local_port is None and early.pid == os.getpid()
    got = one(found, kind="reset_received", remote=netns.SERVER_ADDR, remote_port=lst.port)
    assert got.count == N


def test_offenders_of_refused_connects(netns, probes, layout):
    closed = 10  # nothing listens there
    traffic.refused(netns.client, netns.SERVER_ADDR, closed, N)
    time.sleep(0.3)
    found = peers(probes)
    # The server's kernel answered the client's SYNs to its closed port: the client's address and
    # our port, not the client's ephemeral ports (one entry, not N). 5.10 has no signal for them.
    if layout.nosock_resets_source:
        sent = one(found, kind="reset_sent", remote=netns.CLIENT_ADDR, local_port=closed)
        assert sent.remote_port is None and sent.count == N and sent.pid is None
    else:
        assert not [p for p in found if p.kind == "reset_sent" and p.local_port == closed]
    received = one(found, kind="reset_received", remote=netns.SERVER_ADDR, remote_port=closed)
    assert received.local_port is None and received.count == N and received.pid == os.getpid()
    failed = one(found, kind="connect_failure", remote=netns.SERVER_ADDR, remote_port=closed)
    assert failed.count == N and failed.comm == MY_COMM
    assert failed.first_seen <= failed.last_seen <= time.time()
    assert time.time() - failed.first_seen < 60


def test_an_offender_silent_for_the_idle_time_counts_again(netns, probes, layout):
    closed = 11
    probes.set_windows(DEFAULT_WINDOWS._replace(offender_idle=0.3))
    try:
        traffic.refused(netns.client, netns.SERVER_ADDR, closed, 3)
        t_gap = time.time()
        time.sleep(0.6)
        traffic.refused(netns.client, netns.SERVER_ADDR, closed, 2)
        time.sleep(0.2)
        found = peers(probes)
    finally:
        probes.set_windows(DEFAULT_WINDOWS)
    # The first 3 are an old run: the entry shows the 2 since the gap, from after it.
    failed = one(found, kind="connect_failure", remote=netns.SERVER_ADDR, remote_port=closed)
    assert failed.count == 2 and failed.first_seen > t_gap
    if layout.nosock_resets_source:
        sent = one(found, kind="reset_sent", remote=netns.CLIENT_ADDR, local_port=closed)
        assert sent.count == 2 and sent.first_seen > t_gap
