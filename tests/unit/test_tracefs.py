"""Tracepoint format parsing and layout detection on the formats captured from each kernel of the matrix.

tests/unit/data/kernels/KERNEL/ holds the formats `make test-kernels` saw in Debian's 5.10, 6.1 and
6.12 (tests/vm/kernels.py --save-formats) and this machine's 6.18; refresh them with that command.
"""

import shutil
from pathlib import Path

import pytest

from monitor.kernel.tracefs import (
    BTF_OFFSETS,
    detect_layout,
    parse_format,
    parse_reason_names,
)

DATA = Path(__file__).parent / "data" / "kernels"
KERNELS = ("5.10", "6.1", "6.12", "6.18")
GROUPS = {"inet_sock_set_state": "sock", "inet_sk_error_report": "sock", "kfree_skb": "skb"}
# What a kernel's BTF gives (6.18's values).
FAKE_OFFSETS = dict(zip(BTF_OFFSETS, (284, 192, 180, 178, 1536, 18, 532, 0, 12, 16, 56, 72, 808, 814), strict=True))


def kernel_tracefs(tmp_path: Path, kernel: str, skip: tuple = ()) -> str:
    """A fake tracefs root holding one kernel's captured formats."""
    for f in sorted((DATA / kernel).glob("*.format")):
        name = f.stem
        if name in skip:
            continue
        d = tmp_path / "events" / GROUPS.get(name, "tcp") / name
        d.mkdir(parents=True)
        shutil.copy(f, d / "format")
    return str(tmp_path)


def layout_of(tmp_path, kernel, btf=True, skip=()):
    """Every kernel of the matrix has BTF; btf=False is what a kernel without it gets."""
    return detect_layout(kernel_tracefs(tmp_path, kernel, skip), btf_path=None, offsets=FAKE_OFFSETS if btf else None)


def test_every_kernel_has_its_fixtures():
    for kernel in KERNELS:
        names = {f.stem for f in (DATA / kernel).glob("*.format")}
        assert {"inet_sock_set_state", "tcp_send_reset", "tcp_receive_reset", "tcp_destroy_sock",
                "kfree_skb", "tcp_retransmit_skb", "tcp_retransmit_synack"} <= names, kernel


def test_parse_fields_and_arrays():
    fmt = parse_format((DATA / "6.18" / "tcp_send_reset.format").read_text())
    assert fmt.name == "tcp_send_reset"
    assert list(fmt.fields) == ["skbaddr", "skaddr", "state", "reason", "saddr", "daddr"]
    assert fmt.fields["saddr"].array_len == 28 and fmt.fields["saddr"].offset == 32
    assert fmt.fields["reason"].ctype == "enum sk_rst_reason"


def test_reason_names_from_print_fmt():
    names = parse_reason_names(parse_format((DATA / "6.18" / "tcp_send_reset.format").read_text()).print_fmt)
    assert names[0] == "NOT_SPECIFIED"
    assert names[1] == "NO_SOCKET"
    assert names[14] == "TCP_STATE"
    assert names[11] == "TCP_ABORT_ON_CLOSE"
    assert len(names) == 26


# kernel -> (tcp_send_reset layout, which layouts carry family, where resets sent for no socket and
# failed-connect causes come from with BTF, and without it)
FAMILY = {"tcp_receive_reset", "tcp_destroy_sock", "tcp_retransmit_skb", "tcp_retransmit_synack"}
EXPECTED = {
    "5.10": ("legacy-nofamily", set(), None, "sock.sk_err", None),
    "6.1": ("legacy", FAMILY, "skb:kfree_skb", "sock.sk_err", "sock:inet_sk_error_report"),
    "6.12": ("sockaddr", FAMILY, "tcp:tcp_send_reset", "sock.sk_err", "sock:inet_sk_error_report"),
    "6.18": ("sockaddr", FAMILY, "tcp:tcp_send_reset", "sock.sk_err", "sock:inet_sk_error_report"),
}
# Signals no kernel of the matrix lacks with BTF, and those a kernel without BTF loses.
ALWAYS = ("transitions", "resets sent", "resets received", "failed-connect causes", "socket-table frees",
          "retransmissions", "SYN-ACK retransmissions", "SYNs of failed connects")


def source(layout, name):
    (sig,) = [s for s in layout.signals() if s.name == name]
    return sig.source and sig.source.split(" ")[0]


@pytest.mark.parametrize("kernel", KERNELS)
def test_layout_of_each_kernel(tmp_path, kernel):
    variant, with_family, nosock, failures, failures_without_btf = EXPECTED[kernel]
    layout = layout_of(tmp_path / "btf", kernel)
    assert layout.send_reset_variant == variant
    assert {n for n in FAMILY if layout.has_field(n, "family")} == with_family
    assert all(layout.usable(n) for n in ("inet_sock_set_state", "tcp_send_reset", "tcp_receive_reset",
                                          "tcp_destroy_sock", "tcp_retransmit_skb", "tcp_retransmit_synack"))
    assert source(layout, "resets sent for no socket") == nosock
    assert source(layout, "failed-connect causes") == failures
    # A reconnect to a closed port is seen as a SYN where the reset for it is seen at all.
    assert source(layout, "port reuse of refused SYNs") == nosock
    assert all(source(layout, name) for name in ALWAYS)
    assert source(layout, "SYNs of failed connects") == "tcp_sock.segs_out"
    bare = layout_of(tmp_path / "nobtf", kernel, btf=False)
    assert source(bare, "failed-connect causes") == failures_without_btf
    assert source(bare, "resets sent for no socket") == (nosock if nosock == "tcp:tcp_send_reset" else None)
    assert source(bare, "SYNs of failed connects") is None and source(bare, "port reuse of refused SYNs") is None
    assert source(bare, "retransmissions") == "tcp:tcp_retransmit_skb"


# The raw tracepoints' flags from FAKE_OFFSETS: sock_common read from the socket's start to the end
# of skc_v6_rcv_saddr (72 + 16), inet_sock's saddr..sport in one 8-byte block.
RAW_FLAGS = ["-DTCPSTATE_RAW_TRACEPOINTS", "-DTCPSTATE_SKC_HEAD_LEN=88", "-DTCPSTATE_INET_BLOCK_AT=808",
             "-DTCPSTATE_INET_BLOCK_LEN=8", "-DTCPSTATE_SK_PROTOCOL_AT=532", "-DTCPSTATE_SKC_DADDR_AT=0",
             "-DTCPSTATE_SKC_DPORT_AT=12", "-DTCPSTATE_SKC_FAMILY_AT=16", "-DTCPSTATE_SKC_V6_DADDR_AT=56",
             "-DTCPSTATE_SKC_V6_RCV_SADDR_AT=72", "-DTCPSTATE_INET_SADDR_AT=808", "-DTCPSTATE_INET_SPORT_AT=814"]


def test_cflags_of_5_10(tmp_path):
    """The oldest layout: no family anywhere but set_state, no error report, no drop reasons."""
    layout = layout_of(tmp_path, "5.10")
    assert layout.cflags() == [
        "-DTCPSTATE_HAVE_TCP_SEND_RESET", "-DTCPSTATE_HAVE_TCP_RECEIVE_RESET", "-DTCPSTATE_HAVE_TCP_DESTROY_SOCK",
        "-DTCPSTATE_HAVE_TCP_RETRANSMIT_SKB", "-DTCPSTATE_HAVE_TCP_RETRANSMIT_SYNACK",
        "-DTCPSTATE_SEND_RESET_HAS_STATE", "-DTCPSTATE_SK_ERR_AT=284", "-DTCPSTATE_SEGS_OUT_AT=1536",
        "-DTCPSTATE_SKC_STATE_AT=18", *RAW_FLAGS,
    ]
    assert layout.probe_states() == {"sock:inet_sock_set_state": True, "tcp:tcp_send_reset": True,
                                     "tcp:tcp_receive_reset": True, "tcp:tcp_destroy_sock": True,
                                     "tcp:tcp_retransmit_skb": True, "tcp:tcp_retransmit_synack": True}
    assert layout.describe("tcp_retransmit_skb") == "ok (no family field: taken from the addresses)"
    assert layout.describe("kfree_skb") == "no drop reason (before 5.17)"
    (nosock,) = [s for s in layout.signals() if s.name == "resets sent for no socket"]
    assert "from 6.10" in nosock.missing and "before 5.17" in nosock.missing


def test_cflags_of_6_1(tmp_path):
    """Resets for no socket from kfree_skb, read at the format's offsets; the drop reason's number
    from its print fmt (it differs between kernels)."""
    layout = layout_of(tmp_path, "6.1")
    kfree = layout.formats["kfree_skb"].fields
    no_socket = layout.drop_reasons["NO_SOCKET"]
    assert layout.cflags() == [
        "-DTCPSTATE_HAVE_TCP_SEND_RESET", "-DTCPSTATE_HAVE_TCP_RECEIVE_RESET", "-DTCPSTATE_HAVE_TCP_DESTROY_SOCK",
        "-DTCPSTATE_HAVE_TCP_RETRANSMIT_SKB", "-DTCPSTATE_HAVE_TCP_RETRANSMIT_SYNACK",
        "-DTCPSTATE_SEND_RESET_HAS_FAMILY", "-DTCPSTATE_SEND_RESET_HAS_STATE",
        "-DTCPSTATE_RECEIVE_RESET_HAS_FAMILY", "-DTCPSTATE_DESTROY_SOCK_HAS_FAMILY",
        "-DTCPSTATE_RETRANSMIT_SKB_HAS_FAMILY", "-DTCPSTATE_RETRANSMIT_SYNACK_HAS_FAMILY", "-DTCPSTATE_SK_ERR_AT=284",
        "-DTCPSTATE_SEGS_OUT_AT=1536", "-DTCPSTATE_SKC_STATE_AT=18", *RAW_FLAGS,
        "-DTCPSTATE_NOSOCK_RESETS_FROM_KFREE_SKB", f"-DTCPSTATE_KFREE_SKB_SKBADDR_AT={kfree['skbaddr'].offset}",
        f"-DTCPSTATE_KFREE_SKB_REASON_AT={kfree['reason'].offset}", f"-DTCPSTATE_DROP_NO_SOCKET={no_socket}",
        "-DTCPSTATE_SKB_HEAD_AT=192", "-DTCPSTATE_SKB_NETWORK_HEADER_AT=180", "-DTCPSTATE_SKB_TRANSPORT_HEADER_AT=178",
    ]
    assert layout.probe_states()["skb:kfree_skb"] is True and "sock:inet_sk_error_report" not in layout.probe_states()
    assert layout.reason_names == {1: "NO_SOCKET"}  # the label 6.10+ kernels give such resets


def test_cflags_of_6_18(tmp_path):
    """tcp_retransmit_skb reports failed retransmissions too (err); a reset for no socket comes with
    the segment it answers, whose flags tell a refused SYN."""
    layout = layout_of(tmp_path, "6.18")
    assert layout.cflags() == [
        "-DTCPSTATE_HAVE_TCP_SEND_RESET", "-DTCPSTATE_HAVE_TCP_RECEIVE_RESET", "-DTCPSTATE_HAVE_TCP_DESTROY_SOCK",
        "-DTCPSTATE_HAVE_TCP_RETRANSMIT_SKB", "-DTCPSTATE_HAVE_TCP_RETRANSMIT_SYNACK",
        "-DTCPSTATE_SEND_RESET_SOCKADDR", "-DTCPSTATE_SEND_RESET_HAS_STATE", "-DTCPSTATE_SEND_RESET_HAS_REASON",
        "-DTCPSTATE_RECEIVE_RESET_HAS_FAMILY", "-DTCPSTATE_DESTROY_SOCK_HAS_FAMILY",
        "-DTCPSTATE_RETRANSMIT_SKB_HAS_FAMILY", "-DTCPSTATE_RETRANSMIT_SYNACK_HAS_FAMILY",
        "-DTCPSTATE_RETRANSMIT_SKB_HAS_ERR", "-DTCPSTATE_SK_ERR_AT=284", "-DTCPSTATE_SEGS_OUT_AT=1536",
        "-DTCPSTATE_SKC_STATE_AT=18", *RAW_FLAGS, "-DTCPSTATE_SEND_RESET_SKB_FLAGS", "-DTCPSTATE_SKB_HEAD_AT=192",
        "-DTCPSTATE_SKB_NETWORK_HEADER_AT=180",
        "-DTCPSTATE_SKB_TRANSPORT_HEADER_AT=178",
    ]
    assert "skb:kfree_skb" not in layout.probe_states()  # tcp_send_reset reports resets for no socket itself
    bare = layout_of(tmp_path / "bare", "6.18", btf=False)
    assert "-DTCPSTATE_HAVE_INET_SK_ERROR_REPORT" in bare.cflags()
    assert bare.probe_states()["sock:inet_sk_error_report"] is True


def test_a_missing_tracepoint_is_named_with_what_it_costs(tmp_path):
    layout = layout_of(tmp_path, "6.1", skip=("tcp_receive_reset",))
    assert layout.probe_states()["tcp:tcp_receive_reset"] is False
    assert layout.describe("tcp_receive_reset") == "missing on this kernel"
    assert "-DTCPSTATE_HAVE_TCP_RECEIVE_RESET" not in layout.cflags()
    (received,) = [s for s in layout.signals() if s.name == "resets received"]
    assert received.source is None and "not counted" in received.missing


def test_unknown_layout_is_not_used(tmp_path):
    root = kernel_tracefs(tmp_path, "6.18", skip=("tcp_receive_reset",))
    d = Path(root, "events", "tcp", "tcp_receive_reset")
    d.mkdir(parents=True)
    (d / "format").write_text("name: tcp_receive_reset\nformat:\n\tfield:int foo;\toffset:8;\tsize:4;\tsigned:1;\n")
    layout = detect_layout(root, btf_path=None)
    assert not layout.usable("tcp_receive_reset")
    assert "layout not understood" in layout.describe("tcp_receive_reset")


def test_missing_set_state_is_reported(tmp_path):
    layout = detect_layout(kernel_tracefs(tmp_path, "6.18", skip=("inet_sock_set_state",)), btf_path=None)
    assert not layout.usable("inet_sock_set_state")
    (transitions,) = [s for s in layout.signals() if s.name == "transitions"]
    assert transitions.source is None


def test_btf_missing_is_said(tmp_path):
    layout = detect_layout(kernel_tracefs(tmp_path, "6.18"), btf_path=str(tmp_path / "no-vmlinux"))
    assert layout.offsets == {} and "cannot read" in layout.btf_problem


def test_raw_tracepoints_need_every_socket_field_their_records_hold(tmp_path):
    """5.10's destroy record has no family, but its raw tracepoint reads the socket's own; without
    one of the fields, or with fields too far apart for one read, the records are used again."""
    layout = layout_of(tmp_path, "5.10")
    assert layout.raw_tracepoints and layout.raw_blocks() == (88, 808, 8)
    assert layout.describe("tcp_destroy_sock") == "ok (raw tracepoint: reads the socket at offsets from BTF)"
    assert source(layout, "transitions") == "sock:inet_sock_set_state"
    for lost in ("TCPSTATE_SK_PROTOCOL_AT", "TCPSTATE_SKC_V6_DADDR_AT", "TCPSTATE_INET_SPORT_AT"):
        offsets = {k: v for k, v in FAKE_OFFSETS.items() if k != lost}
        partial = detect_layout(kernel_tracefs(tmp_path / lost, "5.10"), btf_path=None, offsets=offsets)
        assert not partial.raw_tracepoints and "-DTCPSTATE_RAW_TRACEPOINTS" not in partial.cflags()
        assert partial.describe("tcp_destroy_sock") == "ok (no family field: taken from the addresses)"
        (transitions,) = [s for s in partial.signals() if s.name == "transitions"]
        assert "its record: no struct sock offsets" in transitions.source
    apart = detect_layout(kernel_tracefs(tmp_path / "apart", "6.1"), btf_path=None,
                          offsets={**FAKE_OFFSETS, "TCPSTATE_INET_SADDR_AT": 600})
    assert apart.raw_blocks() is None and not apart.raw_tracepoints
    assert not layout_of(tmp_path / "bare", "6.1", btf=False).raw_tracepoints


def test_raw_tracepoints_turned_off_are_said(tmp_path):
    layout = layout_of(tmp_path, "6.18")
    layout.raw_off = "turned off (--no-raw-tracepoints)"
    assert "-DTCPSTATE_RAW_TRACEPOINTS" not in layout.cflags()
    (transitions,) = [s for s in layout.signals() if s.name == "transitions"]
    assert transitions.source == "sock:inet_sock_set_state (its record: turned off (--no-raw-tracepoints))"
    assert layout.describe("inet_sock_set_state") == "ok"


def test_raw_programs_are_found_by_their_names():
    from monitor.kernel.probes import program_name

    assert program_name("sock", "inet_sock_set_state", raw=True) == "raw_tracepoint__inet_sock_set_state"
    assert program_name("tcp", "tcp_destroy_sock", raw=True) == "raw_tracepoint__tcp_destroy_sock"
    assert program_name("tcp", "tcp_send_reset", raw=True) == "tracepoint__tcp__tcp_send_reset"
    assert program_name("sock", "inet_sock_set_state") == "tracepoint__sock__inet_sock_set_state"
    assert program_name("skb", "kfree_skb", raw=True) == "tcpstate_kfree_skb"


def test_the_programs_skips_are_indexed_as_the_tracepoints_are_listed():
    """bpf/guard.h counts a skipped run at TCPSTATE_PROG_<NAME>; Probes.program_stats reads it by
    the tracepoint's place in TRACEPOINTS."""
    from monitor.kernel.abi import C
    from monitor.kernel.tracefs import TRACEPOINTS

    assert [C[f"TCPSTATE_PROG_{name.upper()}"] for _, name, _ in TRACEPOINTS] == list(range(len(TRACEPOINTS)))
    assert C["TCPSTATE_NPROGS"] == len(TRACEPOINTS)
