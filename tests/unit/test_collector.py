"""Aggregation of raw map contents and the exact Prometheus exposition, fed with recorded data."""

import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from monitor.kernel.abi import C
from monitor.kernel.counters import RawCounters, SocketTable, aggregate, empty_raw
from monitor.serve.collectors.kernel import KernelCollector
from monitor.tcp import NUMBERS

NS, NR = C["TCPSTATE_NSTATES"], C["TCPSTATE_NREASONS"]
STRIDE, NB = C["TCPSTATE_HIST_STRIDE"], C["TCPSTATE_HIST_NBOUNDS"]
REASONS = {0: "NOT_SPECIFIED", 1: "NO_SOCKET", 14: "TCP_STATE"}


def t(old, new):
    return NUMBERS[old] * NS + NUMBERS[new]


def r(direction, state, reason):
    return (direction * NS + state) * NR + reason


def recorded():
    """What the maps held after 2 client-closes-first connections, 1 refused connect, 1 abort right
    after the handshake from the port of one of the closed connections; one of the connects needed
    a second SYN, and 2 data segments were sent again."""
    raw = empty_raw()
    tr = list(raw.transitions)
    for key, n in {("CLOSE", "SYN_SENT"): 4, ("SYN_SENT", "ESTABLISHED"): 3, ("ESTABLISHED", "FIN_WAIT1"): 2,
                   ("FIN_WAIT1", "FIN_WAIT2"): 2, ("FIN_WAIT2", "TIME_WAIT"): 2, ("SYN_SENT", "CLOSE"): 1,
                   ("ESTABLISHED", "CLOSE"): 2}.items():
        tr[t(*key)] = n
    rs = list(raw.resets)
    rs[r(0, 0, 1)] = 1  # sent, NONE, NO_SOCKET
    rs[r(1, NUMBERS["SYN_SENT"], C["TCPSTATE_REASON_UNKNOWN"])] = 1
    rs[r(0, NUMBERS["ESTABLISHED"], 14)] = 1
    fails = [1, 0, 0, 0, 1]  # refused, timeout, reset, other; the SYNs they sent
    durations = list(raw.durations)
    durations[0] = 3  # three handshakes <= 50us
    durations[NB + 1] = 90_000  # their sum in ns
    lifetime = STRIDE
    durations[lifetime + 1] = 2  # <= 100us
    durations[lifetime + 13] = 1  # <= 1s
    durations[lifetime + NB + 1] = 1_000_150_000
    stats = [0, 5, 0, 0]
    retransmits = [0] * NS
    retransmits[NUMBERS["SYN_SENT"]], retransmits[NUMBERS["ESTABLISHED"]] = 1, 2
    return RawCounters(tuple(tr), tuple(rs), tuple(fails), tuple(durations), tuple(stats), port_reuse=(1, 0),
                       resets_after_hs=(1, 0, 0, 0), retransmits=tuple(retransmits), syn_retrans=(1, 0))


PROGRAMS = {"sock:inet_sock_set_state": (2_500_000_000, 100, 3), "tcp:tcp_send_reset": (0, 0, 0)}


def recorded_counts():
    return aggregate(recorded(), REASONS, PROGRAMS, SocketTable(capacity=65536, entries=1200, evictions=7))


def registry_for(counts):
    reg = CollectorRegistry(auto_describe=False)
    build = {"version": "0.1.0", "kernel": "6.18.44", "bcc_version": "0.26.0", "send_reset_layout": "sockaddr"}
    attached = {"sock:inet_sock_set_state": True, "tcp:tcp_send_reset": True, "tcp:tcp_receive_reset": False}
    reg.register(KernelCollector(lambda: counts, lambda: attached, build))
    return reg


def test_aggregate_names_and_derives():
    counts = aggregate(recorded(), REASONS)
    assert counts.transitions[("FIN_WAIT2", "TIME_WAIT")] == 2
    assert ("FIN_WAIT2", "CLOSE") not in counts.transitions
    assert counts.resets == {("sent", "NONE", "NO_SOCKET"): 1, ("received", "SYN_SENT", "UNKNOWN"): 1,
                             ("sent", "ESTABLISHED", "TCP_STATE"): 1}
    assert counts.opened == {"active": 3, "passive": 0}
    assert counts.failures == {"refused": 1, "timeout": 0, "reset": 0, "other": 0}
    assert counts.failed_connect_syns == 1
    assert counts.retransmits == {"SYN_SENT": 1, "ESTABLISHED": 2}
    assert counts.syn_retransmits == {"client": 1, "server": 0}
    assert counts.handshake.count == 3 and counts.handshake.sum_seconds == pytest.approx(90e-6)
    assert counts.lifetime.count == 3
    assert counts.untracked_transitions == 5
    assert counts.port_reuse == {"client": 1, "server": 0}
    assert counts.resets_after_handshake == {("sent", "client"): 1, ("sent", "server"): 0,
                                             ("received", "client"): 0, ("received", "server"): 0}
    assert aggregate(recorded(), REASONS, PROGRAMS).events_lost == 3


def test_syn_retransmits_are_absent_where_nothing_counts_them():
    raw = empty_raw()
    counts = aggregate(RawCounters(raw.transitions, raw.resets, raw.connect_fails, raw.durations, raw.stats), REASONS)
    assert counts.syn_retransmits is None and counts.retransmits == {}
    text = generate_latest(registry_for(counts)).decode()
    assert "tcpstate_syn_retransmits" not in text and "# TYPE tcpstate_retransmits_total counter" in text


def test_reason_missing_from_kernel_table_is_unknown():
    raw = empty_raw()
    rs = list(raw.resets)
    rs[r(0, NUMBERS["ESTABLISHED"], 40)] = 2
    counts = aggregate(RawCounters(raw.transitions, tuple(rs), raw.connect_fails, raw.durations, raw.stats), REASONS)
    assert counts.resets == {("sent", "ESTABLISHED", "UNKNOWN"): 2}


def test_sample_values():
    reg = registry_for(recorded_counts())
    v = reg.get_sample_value
    assert v("tcpstate_transitions_total", {"from_state": "SYN_SENT", "to_state": "ESTABLISHED"}) == 3
    assert v("tcpstate_resets_total", {"direction": "sent", "state": "NONE", "reason": "NO_SOCKET"}) == 1
    assert v("tcpstate_connect_failures_total", {"reason": "refused"}) == 1
    assert v("tcpstate_connect_failures_total", {"reason": "timeout"}) == 0
    assert v("tcpstate_connections_opened_total", {"direction": "active"}) == 3
    assert v("tcpstate_handshake_duration_seconds_bucket", {"le": "5e-05"}) == 3
    assert v("tcpstate_connection_duration_seconds_bucket", {"le": "0.0001"}) == 2
    assert v("tcpstate_connection_duration_seconds_bucket", {"le": "0.5"}) == 2
    assert v("tcpstate_connection_duration_seconds_bucket", {"le": "1.0"}) == 3
    assert v("tcpstate_connection_duration_seconds_count") == 3
    assert v("tcpstate_probe_attached", {"tracepoint": "tcp:tcp_receive_reset"}) == 0
    assert v("tcpstate_untracked_transitions_total") == 5
    assert v("tcpstate_retransmits_total", {"state": "ESTABLISHED"}) == 2
    assert v("tcpstate_syn_retransmits_total", {"role": "client"}) == 1
    assert v("tcpstate_socket_table_entries") == 1200
    assert v("tcpstate_socket_table_evictions_total") == 7


def test_no_socket_table_metrics_without_a_reading():
    text = generate_latest(registry_for(aggregate(recorded(), REASONS))).decode()
    assert "tcpstate_socket_table" not in text


EXPECTED_HEAD = """\
# HELP tcpstate_build_info tcpstate version and the kernel it runs on; always 1.
# TYPE tcpstate_build_info gauge
tcpstate_build_info{bcc_version="0.26.0",kernel="6.18.44",send_reset_layout="sockaddr",version="0.1.0"} 1.0
# HELP tcpstate_probe_attached 1 if the tracepoint is attached, 0 if this kernel lacks it or it failed.
# TYPE tcpstate_probe_attached gauge
tcpstate_probe_attached{tracepoint="sock:inet_sock_set_state"} 1.0
tcpstate_probe_attached{tracepoint="tcp:tcp_receive_reset"} 0.0
tcpstate_probe_attached{tracepoint="tcp:tcp_send_reset"} 1.0
# HELP tcpstate_map_read_errors_total Scrapes whose in-kernel counter read failed.
# TYPE tcpstate_map_read_errors_total counter
tcpstate_map_read_errors_total 0.0
# HELP tcpstate_transitions_total TCP state transitions; FIN_WAIT2/CLOSING->CLOSE not caused by a reset is counted as ->TIME_WAIT.
# TYPE tcpstate_transitions_total counter
tcpstate_transitions_total{from_state="CLOSE",to_state="SYN_SENT"} 4.0
tcpstate_transitions_total{from_state="ESTABLISHED",to_state="CLOSE"} 2.0
tcpstate_transitions_total{from_state="ESTABLISHED",to_state="FIN_WAIT1"} 2.0
tcpstate_transitions_total{from_state="FIN_WAIT1",to_state="FIN_WAIT2"} 2.0
tcpstate_transitions_total{from_state="FIN_WAIT2",to_state="TIME_WAIT"} 2.0
tcpstate_transitions_total{from_state="SYN_SENT",to_state="CLOSE"} 1.0
tcpstate_transitions_total{from_state="SYN_SENT",to_state="ESTABLISHED"} 3.0
# HELP tcpstate_resets_total TCP resets by direction, the state the connection was in, and the kernel's reason.
# TYPE tcpstate_resets_total counter
tcpstate_resets_total{direction="received",reason="UNKNOWN",state="SYN_SENT"} 1.0
tcpstate_resets_total{direction="sent",reason="TCP_STATE",state="ESTABLISHED"} 1.0
tcpstate_resets_total{direction="sent",reason="NO_SOCKET",state="NONE"} 1.0
# HELP tcpstate_connections_opened_total Connections that reached ESTABLISHED: active (connect) or passive (accept).
# TYPE tcpstate_connections_opened_total counter
tcpstate_connections_opened_total{direction="active"} 3.0
tcpstate_connections_opened_total{direction="passive"} 0.0
# HELP tcpstate_connect_failures_total Connects that went SYN_SENT->CLOSE, by the socket error.
# TYPE tcpstate_connect_failures_total counter
tcpstate_connect_failures_total{reason="refused"} 1.0
tcpstate_connect_failures_total{reason="timeout"} 0.0
tcpstate_connect_failures_total{reason="reset"} 0.0
tcpstate_connect_failures_total{reason="other"} 0.0
# HELP tcpstate_port_reuse_total New SYNs on a 4-tuple (addresses and ports) whose previous connection ended (FIN, RST, refused or timed out) within the reuse window, as Wireshark flags "TCP Port numbers reused"; by this host's end: client (sent the SYN) or server (received it).
# TYPE tcpstate_port_reuse_total counter
tcpstate_port_reuse_total{role="client"} 1.0
tcpstate_port_reuse_total{role="server"} 0.0
# HELP tcpstate_resets_after_handshake_total Connections reset soon after ESTABLISHED (reset_after_handshake.within_seconds), by the reset's direction and this host's end; received by a client is what an on-path device rejecting requests looks like.
# TYPE tcpstate_resets_after_handshake_total counter
tcpstate_resets_after_handshake_total{direction="sent",role="client"} 1.0
tcpstate_resets_after_handshake_total{direction="sent",role="server"} 0.0
tcpstate_resets_after_handshake_total{direction="received",role="client"} 0.0
tcpstate_resets_after_handshake_total{direction="received",role="server"} 0.0
# HELP tcpstate_retransmits_total Segments sent again (SYN-ACKs included), by the state the connection was in: Wireshark's tcp.analysis.retransmission in a capture on this host.
# TYPE tcpstate_retransmits_total counter
tcpstate_retransmits_total{state="ESTABLISHED"} 2.0
tcpstate_retransmits_total{state="SYN_SENT"} 1.0
# HELP tcpstate_syn_retransmits_total SYNs re-sent from SYN_SENT (client) and SYN-ACKs re-sent from SYN_RECV (server): the first sign of loss, a full SYN queue or a silent firewall.
# TYPE tcpstate_syn_retransmits_total counter
tcpstate_syn_retransmits_total{role="client"} 1.0
tcpstate_syn_retransmits_total{role="server"} 0.0
# HELP tcpstate_handshake_duration_seconds Time from SYN_SENT to ESTABLISHED, one per active open.
# TYPE tcpstate_handshake_duration_seconds histogram
tcpstate_handshake_duration_seconds_bucket{le="5e-05"} 3.0
"""

EXPECTED_TAIL = """\
tcpstate_connection_duration_seconds_bucket{le="+Inf"} 3.0
tcpstate_connection_duration_seconds_count 3.0
tcpstate_connection_duration_seconds_sum 1.00015
# HELP tcpstate_events_lost_total Tracepoint hits known not to be counted: runs the kernel skipped and reported (tcpstate_probe_misses_total) plus watch records dropped by a full ring buffer.
# TYPE tcpstate_events_lost_total counter
tcpstate_events_lost_total 3.0
# HELP tcpstate_probe_misses_total Program runs the kernel skipped because another BPF program was running on the same CPU (a softirq interrupting it); their events are not counted.
# TYPE tcpstate_probe_misses_total counter
tcpstate_probe_misses_total{tracepoint="sock:inet_sock_set_state"} 3.0
tcpstate_probe_misses_total{tracepoint="tcp:tcp_send_reset"} 0.0
# HELP tcpstate_probe_run_seconds_total CPU time in the tracepoint program (0 unless kernel.bpf_stats_enabled=1).
# TYPE tcpstate_probe_run_seconds_total counter
tcpstate_probe_run_seconds_total{tracepoint="sock:inet_sock_set_state"} 2.5
tcpstate_probe_run_seconds_total{tracepoint="tcp:tcp_send_reset"} 0.0
# HELP tcpstate_probe_runs_total Runs of the tracepoint program (0 unless kernel.bpf_stats_enabled=1).
# TYPE tcpstate_probe_runs_total counter
tcpstate_probe_runs_total{tracepoint="sock:inet_sock_set_state"} 100.0
tcpstate_probe_runs_total{tracepoint="tcp:tcp_send_reset"} 0.0
# HELP tcpstate_untracked_transitions_total Transitions of sockets not in the socket table (opened before tcpstate started, or evicted) among those that look it up: every one, or where BTF gives the socket's state only those into SYN_SENT, SYN_RECV, LISTEN, ESTABLISHED and CLOSE; their durations are not observed.
# TYPE tcpstate_untracked_transitions_total counter
tcpstate_untracked_transitions_total 5.0
# HELP tcpstate_socket_table_capacity Sockets the in-kernel per-socket table holds (--max-sockets).
# TYPE tcpstate_socket_table_capacity gauge
tcpstate_socket_table_capacity 65536.0
# HELP tcpstate_socket_table_entries Sockets in the per-socket table now.
# TYPE tcpstate_socket_table_entries gauge
tcpstate_socket_table_entries 1200.0
# HELP tcpstate_socket_table_evictions_total Sockets pushed out of the full per-socket table (LRU) while still open; their later transitions count as untracked. Derived from inserts, frees and entries; under churn it errs low by the churn of one scrape.
# TYPE tcpstate_socket_table_evictions_total counter
tcpstate_socket_table_evictions_total 7.0
"""


def test_exact_exposition():
    text = generate_latest(registry_for(recorded_counts())).decode()
    assert text.startswith(EXPECTED_HEAD)
    assert text.endswith(EXPECTED_TAIL)
    # 25 buckets per histogram: 24 bounds and +Inf
    assert text.count("tcpstate_handshake_duration_seconds_bucket{") == 25


def test_promtool_accepts_the_exposition(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: make setup installs Debian's prometheus package"
    text = generate_latest(registry_for(recorded_counts()))
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


def test_failed_read_keeps_the_rest_of_the_scrape():
    def broken():
        raise OSError("map gone")

    reg = CollectorRegistry(auto_describe=False)
    reg.register(KernelCollector(broken, lambda: {"sock:inet_sock_set_state": True},
                                   {"version": "x", "kernel": "k", "bcc_version": "b", "send_reset_layout": "l"}))
    text = generate_latest(reg).decode()
    assert "tcpstate_map_read_errors_total 1.0" in text
    assert 'tcpstate_probe_attached{tracepoint="sock:inet_sock_set_state"} 1.0' in text
    assert "tcpstate_transitions_total" not in text
