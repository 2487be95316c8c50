"""Build bpf/tcpstate_logic.h with gcc and check the decisions the kernel program makes, and the header's layout."""

import collections
import ctypes
import struct
import subprocess
import textwrap

import pytest

from monitor.kernel import abi
from monitor.kernel.abi import (
    OFFENDER_KINDS,
    ROLES,
    C,
    Event,
    Offender,
    OffenderKey,
    SockInfo,
    bpf_dir,
)

HARNESS = textwrap.dedent("""
    #include <stddef.h>
    #include <stdio.h>
    #include "tcpstate_logic.h"

    int counted_newstate(int o, int n, int flags) { return tcpstate_counted_newstate(o, n, flags); }
    int reset_state(int has_sk, int tp_state, int tracked, int cur, int prev)
    { return tcpstate_reset_state(has_sk, tp_state, tracked, cur, prev); }
    int failure_class(int err) { return tcpstate_failure_class(err); }
    int hist_bucket(unsigned long long us) { return tcpstate_hist_bucket(us); }
    int clamp_reason(unsigned int r) { return tcpstate_clamp_reason(r); }
    int records_close(int o, int n) { return tcpstate_records_close(o, n); }
    int new_syn(int flags) { return tcpstate_new_syn(flags); }
    unsigned long long syn_time(unsigned long long syn, unsigned long long now) { return tcpstate_syn_time(syn, now); }
    int opening_role(int o) { return tcpstate_opening_role(o); }
    unsigned long long flow_hash(const unsigned long long *w) { return tcpstate_flow_hash(w); }
    unsigned int close_tick(unsigned long long ns) { return tcpstate_close_tick(ns); }
    unsigned int close_window(unsigned long long ns) { return tcpstate_close_window(ns); }
    void close_put(struct tcpstate_close_set *set, unsigned int tag, unsigned int tick)
    { tcpstate_close_put(set, tag, tick); }
    int close_take(struct tcpstate_close_set *set, unsigned int tag, unsigned int tick, unsigned int window)
    { return tcpstate_close_take(set, tag, tick, window); }
    int early_reset(unsigned long long est, unsigned long long now, unsigned long long within, int flags)
    { return tcpstate_early_reset(est, now, within, flags); }
    int sock_role(int flags) { return tcpstate_sock_role(flags); }
    int unmap(unsigned char *s, unsigned char *d) { return tcpstate_unmap(s, d); }
    int offender_keep(int kind, int has_sk, int tracked, int flags, int state)
    { return tcpstate_offender_keep(kind, has_sk, tracked, flags, state); }

    #define O(s, f) printf(#s "." #f " %zu %zu\\n", offsetof(struct s, f), sizeof(((struct s *)0)->f))
    void layout(void)
    {
        printf("sizeof.tcpstate_event %zu\\n", sizeof(struct tcpstate_event));
        printf("sizeof.tcpstate_sock %zu\\n", sizeof(struct tcpstate_sock));
        printf("sizeof.tcpstate_offender_key %zu\\n", sizeof(struct tcpstate_offender_key));
        printf("sizeof.tcpstate_offender %zu\\n", sizeof(struct tcpstate_offender));
        O(tcpstate_offender_key, raddr); O(tcpstate_offender_key, family); O(tcpstate_offender_key, rport);
        O(tcpstate_offender_key, lport); O(tcpstate_offender_key, kind);
        O(tcpstate_offender, count); O(tcpstate_offender, first_ns); O(tcpstate_offender, last_ns);
        O(tcpstate_offender, pid); O(tcpstate_offender, comm);
        O(tcpstate_event, ts_ns); O(tcpstate_event, skaddr); O(tcpstate_event, delta_us);
        O(tcpstate_event, pid); O(tcpstate_event, family); O(tcpstate_event, sport);
        O(tcpstate_event, dport); O(tcpstate_event, kind); O(tcpstate_event, oldstate);
        O(tcpstate_event, newstate); O(tcpstate_event, reason); O(tcpstate_event, saddr);
        O(tcpstate_event, daddr); O(tcpstate_event, comm);
        O(tcpstate_sock, state_ts_ns); O(tcpstate_sock, syn_ts_ns); O(tcpstate_sock, est_ts_ns);
        O(tcpstate_sock, close_delta_us);
        O(tcpstate_sock, pid); O(tcpstate_sock, state); O(tcpstate_sock, prev_state);
        O(tcpstate_sock, flags); O(tcpstate_sock, comm);
        printf("const.TCPSTATE_NRESETS %d\\n", TCPSTATE_NRESETS);
        printf("const.TCPSTATE_NTRANSITIONS %d\\n", TCPSTATE_NTRANSITIONS);
        printf("const.TCPSTATE_HIST_STRIDE %d\\n", TCPSTATE_HIST_STRIDE);
        printf("const.TCPSTATE_REASON_UNKNOWN %d\\n", TCPSTATE_REASON_UNKNOWN);
        printf("const.TCPSTATE_STATE_UNKNOWN %d\\n", TCPSTATE_STATE_UNKNOWN);
        printf("const.TCPSTATE_NOFFKINDS %d\\n", TCPSTATE_NOFFKINDS);
        printf("const.TCPSTATE_NROLES %d\\n", TCPSTATE_NROLES);
        printf("const.TCPSTATE_NRESETS_AFTER_HS %d\\n", TCPSTATE_NRESETS_AFTER_HS);
    }
""")

ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, LISTEN, CLOSING = range(1, 12)
RESET_SEEN = C["TCPSTATE_SOCK_RESET_SEEN"]


@pytest.fixture(scope="module")
def logic(tmp_path_factory):
    d = tmp_path_factory.mktemp("logic")
    (d / "harness.c").write_text(HARNESS)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", f"-I{bpf_dir()}", "-o", str(d / "logic.so"), str(d / "harness.c")],
                   check=True)
    lib = ctypes.CDLL(str(d / "logic.so"))
    lib.hist_bucket.argtypes = [ctypes.c_ulonglong]
    lib.clamp_reason.argtypes = [ctypes.c_uint]
    lib.flow_hash.restype = ctypes.c_ulonglong
    lib.close_tick.argtypes = [ctypes.c_ulonglong]
    lib.close_tick.restype = ctypes.c_uint
    lib.close_window.argtypes = [ctypes.c_ulonglong]
    lib.close_window.restype = ctypes.c_uint
    lib.early_reset.argtypes = [ctypes.c_ulonglong] * 3 + [ctypes.c_int]
    lib.syn_time.argtypes = [ctypes.c_ulonglong] * 2
    lib.syn_time.restype = ctypes.c_ulonglong
    return lib


@pytest.fixture(scope="module")
def c_layout(logic, tmp_path_factory):
    d = tmp_path_factory.mktemp("layout")
    (d / "main.c").write_text(HARNESS + "int main(void) { layout(); return 0; }\n")
    subprocess.run(["gcc", f"-I{bpf_dir()}", "-o", str(d / "layout"), str(d / "main.c")], check=True)
    out = subprocess.run([str(d / "layout")], check=True, capture_output=True, text=True).stdout
    return {k: tuple(int(x) for x in v.split()) for k, v in (line.split(" ", 1) for line in out.splitlines())}


def test_event_struct_matches_header(c_layout):
    assert ctypes.sizeof(Event) == c_layout["sizeof.tcpstate_event"][0]
    for name, *_ in Event._fields_:
        if name == "pad":
            continue
        off, size = c_layout[f"tcpstate_event.{name}"]
        assert (getattr(Event, name).offset, getattr(Event, name).size) == (off, size), name


def test_sock_struct_matches_header(c_layout):
    assert ctypes.sizeof(SockInfo) == c_layout["sizeof.tcpstate_sock"][0]
    for name, *_ in SockInfo._fields_:
        if name == "pad":
            continue
        assert (getattr(SockInfo, name).offset, getattr(SockInfo, name).size) == c_layout[f"tcpstate_sock.{name}"], name


@pytest.mark.parametrize("struct", [OffenderKey, Offender])
def test_offender_structs_match_header(c_layout, struct):
    cname = {"OffenderKey": "tcpstate_offender_key", "Offender": "tcpstate_offender"}[struct.__name__]
    assert ctypes.sizeof(struct) == c_layout[f"sizeof.{cname}"][0]
    for name, *_ in struct._fields_:
        if name == "pad":
            continue
        assert (getattr(struct, name).offset, getattr(struct, name).size) == c_layout[f"{cname}.{name}"], name


def test_python_reads_the_same_constants(c_layout):
    for key, (value,) in ((k, v) for k, v in c_layout.items() if k.startswith("const.")):
        assert C[key.split(".", 1)[1]] == value


def test_time_wait_inferred_from_fin_wait2_and_closing(logic):
    assert logic.counted_newstate(FIN_WAIT2, CLOSE, 0) == TIME_WAIT
    assert logic.counted_newstate(CLOSING, CLOSE, 0) == TIME_WAIT


def test_no_time_wait_after_a_reset(logic):
    assert logic.counted_newstate(FIN_WAIT2, CLOSE, RESET_SEEN) == CLOSE
    assert logic.counted_newstate(CLOSING, CLOSE, RESET_SEEN) == CLOSE


@pytest.mark.parametrize("old,new", [(LAST_ACK, CLOSE), (ESTABLISHED, CLOSE), (SYN_SENT, CLOSE), (LISTEN, CLOSE),
                                     (FIN_WAIT1, FIN_WAIT2), (CLOSE_WAIT, LAST_ACK), (FIN_WAIT1, CLOSING)])
def test_other_transitions_are_reported_as_the_kernel_says(logic, old, new):
    assert logic.counted_newstate(old, new, 0) == new


def test_reset_sent_without_socket_is_state_none(logic):
    assert logic.reset_state(0, 0, 0, 0, 0) == 0  # e.g. SYN to a closed port


def test_abort_reset_reports_the_state_left(logic):
    # SO_LINGER {1,0}: the kernel sets CLOSE, then sends the reset with state CLOSE.
    assert logic.reset_state(1, CLOSE, 1, CLOSE, ESTABLISHED) == ESTABLISHED
    assert logic.reset_state(1, CLOSE, 1, CLOSE, CLOSE_WAIT) == CLOSE_WAIT


def test_reset_state_from_tracepoint_when_socket_is_live(logic):
    assert logic.reset_state(1, ESTABLISHED, 1, ESTABLISHED, 0) == ESTABLISHED
    assert logic.reset_state(1, SYN_RECV, 0, 0, 0) == SYN_RECV


def test_reset_in_close_of_unknown_socket_stays_close(logic):
    assert logic.reset_state(1, CLOSE, 0, 0, 0) == CLOSE


def test_reset_state_without_state_field_uses_our_table(logic):
    assert logic.reset_state(1, -1, 1, FIN_WAIT2, 0) == FIN_WAIT2
    assert logic.reset_state(1, -1, 0, 0, 0) == C["TCPSTATE_STATE_UNKNOWN"]


@pytest.mark.parametrize("err,cls", [(111, "refused"), (110, "timeout"), (104, "reset"), (113, "other"), (0, "other")])
def test_failure_classification(logic, err, cls):
    assert abi.FAILURE_REASONS[logic.failure_class(err)] == cls


def test_histogram_buckets_separate_1ms_1s_and_3s_handshakes(logic):
    bounds = C["TCPSTATE_HIST_BOUNDS_US"]
    one_ms, one_s, three_s = logic.hist_bucket(1000), logic.hist_bucket(1_003_000), logic.hist_bucket(3_004_000)
    assert len({one_ms, one_s, three_s}) == 3
    assert bounds[one_ms] == 1000 and bounds[one_s - 1] < 1_003_000 <= bounds[one_s]
    assert logic.hist_bucket(0) == 0
    assert logic.hist_bucket(bounds[-1]) == len(bounds) - 1
    assert logic.hist_bucket(bounds[-1] + 1) == len(bounds)  # +Inf


def test_reason_clamped_to_unknown(logic):
    assert logic.clamp_reason(1) == 1
    assert logic.clamp_reason(500) == C["TCPSTATE_REASON_UNKNOWN"]


def test_python_names_every_offender_kind_and_role(c_layout):
    assert len(OFFENDER_KINDS) == c_layout["const.TCPSTATE_NOFFKINDS"][0]
    assert len(ROLES) == c_layout["const.TCPSTATE_NROLES"][0]
    assert OFFENDER_KINDS[C["TCPSTATE_OFF_PORT_REUSE"]] == "port_reuse"
    assert ROLES[C["TCPSTATE_ROLE_SERVER"]] == "server"


@pytest.mark.parametrize("old", [ESTABLISHED, FIN_WAIT2, CLOSING, LAST_ACK, CLOSE_WAIT, SYN_RECV, FIN_WAIT1, SYN_SENT])
def test_a_connection_or_connect_ending_is_remembered(logic, old):
    """Wireshark flags a SYN on the 4-tuple of any earlier conversation: one that ended with FINs,
    a reset, or SYNs that were refused or never answered (SYN_SENT->CLOSE)."""
    assert logic.records_close(old, CLOSE) == 1


@pytest.mark.parametrize("old,new", [(LISTEN, CLOSE), (ESTABLISHED, FIN_WAIT1), (CLOSE, SYN_SENT), (CLOSE, CLOSE)])
def test_listeners_and_other_transitions_are_not(logic, old, new):
    assert logic.records_close(old, new) == 0


TH_FIN, TH_SYN, TH_RST, TH_PSH, TH_ACK = 1, 2, 4, 8, 16


def test_a_new_syn_is_a_syn_without_ack(logic):
    assert logic.new_syn(TH_SYN) == 1
    assert logic.new_syn(TH_SYN | 0x40 | 0x80) == 1  # ECE and CWR: an ECN-setup SYN
    assert [logic.new_syn(f) for f in (TH_SYN | TH_ACK, TH_ACK, TH_ACK | TH_PSH, TH_FIN | TH_ACK, TH_SYN | TH_RST, 0)] \
        == [0] * 6


def test_the_reuse_window_runs_to_the_clients_first_syn(logic):
    # A connect whose SYN went out at 5 s and whose handshake ended at 70 s: the window is measured
    # from the SYN. An accepted connection (no SYN_SENT time) is measured at the handshake's end.
    assert logic.syn_time(5_000_000_000, 70_000_000_000) == 5_000_000_000
    assert logic.syn_time(0, 70_000_000_000) == 70_000_000_000


def test_the_4_tuple_is_looked_up_on_leaving_syn_sent_or_syn_recv(logic):
    assert logic.opening_role(SYN_SENT) == C["TCPSTATE_ROLE_CLIENT"]
    assert logic.opening_role(SYN_RECV) == C["TCPSTATE_ROLE_SERVER"]
    # LISTEN->SYN_RECV: the child's peer address is not set yet when the kernel reports it.
    assert [logic.opening_role(s) for s in (LISTEN, CLOSE, ESTABLISHED)] == [-1, -1, -1]


WAYS = C["TCPSTATE_CLOSE_WAYS"]


def close_set():
    return (ctypes.c_ulonglong * WAYS)()


def test_reuse_window(logic):
    s = close_set()
    logic.close_put(s, 7, 1000)
    assert logic.close_take(s, 7, 1061, 60) == 0  # past the window
    assert logic.close_take(s, 7, 1060, 60) == 1  # at the edge
    assert logic.close_take(s, 7, 1001, 60) == 0  # one close, one reuse
    logic.close_put(s, 7, 1000)
    assert logic.close_take(s, 7, 1001, 0) == 0  # window 0: off
    assert logic.close_take(s, 7, 999, 60) == 0  # a stamp from the future is no reuse
    assert logic.close_take(s, 8, 1001, 60) == 0  # another 4-tuple
    assert logic.close_take(s, 7, 1001, 60) == 1


def test_reuse_window_across_the_tick_wrap(logic):
    s = close_set()
    logic.close_put(s, 3, 0xFFFFFFF0)
    assert logic.close_take(s, 3, 0x10, 0x20) == 1


def test_a_close_again_replaces_the_4_tuples_slot(logic):
    s = close_set()
    logic.close_put(s, 5, 100)
    logic.close_put(s, 5, 200)
    assert sum(1 for v in s if v >> 32 == 5) == 1
    assert logic.close_take(s, 5, 201, 10) == 1  # the newer close counts


def test_a_full_set_forgets_its_oldest_close(logic):
    s = close_set()
    for tag in range(1, WAYS + 1):
        logic.close_put(s, tag, 100 + tag)  # tag 1 is the oldest
    logic.close_take(s, 4, 150, 1000)  # frees a slot: the next close takes it, not the oldest's
    logic.close_put(s, 100, 300)
    logic.close_put(s, 101, 301)  # now the set is full again: tag 1 goes
    kept = {v >> 32 for v in s}
    assert kept == {2, 3, 5, 6, 7, 8, 100, 101}


def test_close_ticks_are_never_zero_and_windows_round_up(logic):
    shift = C["TCPSTATE_CLOSE_TICK_SHIFT"]
    assert logic.close_tick(0) == 1 and logic.close_tick(5 << shift) == 5
    assert logic.close_tick((1 << (32 + shift)) + (9 << shift)) == 9  # wraps with 32 bits
    assert logic.close_window(0) == 0
    assert logic.close_window(1) == 1
    assert logic.close_window(60 * 10**9) == -(-60 * 10**9 // (1 << shift))


def flow_words(saddr: bytes, daddr: bytes, family: int, sport: int, dport: int):
    raw = saddr.ljust(16, b"\0") + daddr.ljust(16, b"\0") + struct.pack("<HHHH", family, sport, dport, 0)
    return (ctypes.c_ulonglong * 5)(*struct.unpack("<5Q", raw))


def test_flow_hash_spreads_one_clients_ports_over_the_sets(logic):
    """Under churn the 4-tuples differ only in the client port: their sets must still spread."""
    sets = 8192
    per_set = collections.Counter()
    tags = set()
    for port in range(10000, 60000):
        h = logic.flow_hash(flow_words(bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]), 2, port, 5001))
        per_set[(h & 0xFFFFFFFF) % sets] += 1
        tags.add(h >> 32)
    # 50,000 keys into 8192 sets: about 6.1 each; a poor hash piles them into a few sets.
    assert len(per_set) > 0.99 * sets
    assert max(per_set.values()) <= 25
    assert len(tags) > 49900  # tags tell apart the 4-tuples that share a set


def test_flow_hash_sees_every_field(logic):
    base = (bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]), 2, 40000, 5001)
    h0 = logic.flow_hash(flow_words(*base))
    for i in range(5):
        changed = list(base)
        changed[i] = changed[i][:3] + bytes([changed[i][3] ^ 1]) if isinstance(changed[i], bytes) else changed[i] ^ 1
        assert logic.flow_hash(flow_words(*changed)) != h0, i


def test_reset_after_handshake_once_and_within(logic):
    ms = 10**6
    early = C["TCPSTATE_SOCK_EARLY_RESET"]
    assert logic.early_reset(100 * ms, 1100 * ms, 1000 * ms, 0) == 1
    assert logic.early_reset(100 * ms, 1100 * ms + 1, 1000 * ms, 0) == 0
    assert logic.early_reset(100 * ms, 200 * ms, 1000 * ms, early) == 0  # counted once per connection
    assert logic.early_reset(0, 200 * ms, 1000 * ms, 0) == 0  # never ESTABLISHED (e.g. refused)
    assert logic.early_reset(100 * ms, 200 * ms, 0, 0) == 0  # off


LOCAL, REMOTE = 1, 2
PASSIVE = C["TCPSTATE_SOCK_PASSIVE"]
K = {name: C[f"TCPSTATE_OFF_{name}"] for name in ("RESET_SENT", "RESET_RECEIVED", "CONNECT_FAIL", "PORT_REUSE",
                                                  "EARLY_RESET")}


def test_offenders_keep_the_service_port_not_the_ephemeral_one(logic):
    # A reset for no socket: a peer knocked on our port.
    assert logic.offender_keep(K["RESET_SENT"], 0, 0, 0, 0) == LOCAL
    # On a socket we accepted, or a listener: ours is the service port.
    assert logic.offender_keep(K["RESET_RECEIVED"], 1, 1, PASSIVE, ESTABLISHED) == LOCAL
    assert logic.offender_keep(K["RESET_SENT"], 1, 1, 0, LISTEN) == LOCAL
    # On a socket we connected: the peer's is.
    assert logic.offender_keep(K["RESET_RECEIVED"], 1, 1, 0, ESTABLISHED) == REMOTE
    assert logic.offender_keep(K["EARLY_RESET"], 1, 1, 0, CLOSE) == REMOTE
    assert logic.offender_keep(K["CONNECT_FAIL"], 1, 1, 0, SYN_SENT) == REMOTE
    # An untracked socket cannot tell; a reuse is about the reused port: both.
    assert logic.offender_keep(K["RESET_RECEIVED"], 1, 0, 0, 0) == LOCAL | REMOTE
    assert logic.offender_keep(K["PORT_REUSE"], 1, 1, PASSIVE, SYN_RECV) == LOCAL | REMOTE


def test_role_of_a_socket(logic):
    assert ROLES[logic.sock_role(PASSIVE)] == "server"
    assert ROLES[logic.sock_role(PASSIVE | RESET_SEEN)] == "server"
    assert ROLES[logic.sock_role(0)] == ROLES[logic.sock_role(RESET_SEEN)] == "client"


def v6(text):
    import ipaddress

    return (ctypes.c_uint8 * 16)(*ipaddress.IPv6Address(text).packed)


def test_addresses_without_a_family_field(logic):
    """5.10's tcp_receive_reset and tcp_destroy_sock: an IPv4 socket's addresses come v4-mapped."""
    s, d = v6("::ffff:198.18.0.1"), v6("::ffff:198.18.0.2")
    assert logic.unmap(s, d) == 2
    assert bytes(s) == bytes([198, 18, 0, 1]) + bytes(12) and bytes(d) == bytes([198, 18, 0, 2]) + bytes(12)
    s, d = v6("::1"), v6("::1")
    assert logic.unmap(s, d) == 10 and bytes(s) == bytes(v6("::1"))
    s, d = v6("::ffff:198.18.0.1"), v6("2001:db8::1")  # only one side mapped: a real IPv6 pair
    assert logic.unmap(s, d) == 10 and bytes(s) == bytes(v6("::ffff:198.18.0.1"))
