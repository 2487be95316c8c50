"""Tracepoint format parsing and layout detection, from formats recorded on a 6.18 kernel and an older layout."""

import shutil
from pathlib import Path

from monitor.tracefs import detect_layout, parse_format, parse_reason_names

DATA = Path(__file__).parent / "data"


def make_tracefs(tmp_path, files):
    """A fake tracefs root holding the given (group, name, data file) formats."""
    for group, name, src in files:
        d = tmp_path / "events" / group / name
        d.mkdir(parents=True)
        shutil.copy(DATA / src, d / "format")
    return str(tmp_path)


ALL_618 = [
    ("sock", "inet_sock_set_state", "6.18-inet_sock_set_state.format"),
    ("tcp", "tcp_send_reset", "6.18-tcp_send_reset.format"),
    ("tcp", "tcp_receive_reset", "6.18-tcp_receive_reset.format"),
    ("sock", "inet_sk_error_report", "6.18-inet_sk_error_report.format"),
    ("tcp", "tcp_destroy_sock", "6.18-tcp_destroy_sock.format"),
]


def test_parse_fields_and_arrays():
    fmt = parse_format((DATA / "6.18-tcp_send_reset.format").read_text())
    assert fmt.name == "tcp_send_reset"
    assert list(fmt.fields) == ["skbaddr", "skaddr", "state", "reason", "saddr", "daddr"]
    assert fmt.fields["saddr"].array_len == 28 and fmt.fields["saddr"].offset == 32
    assert fmt.fields["reason"].ctype == "enum sk_rst_reason"


def test_reason_names_from_print_fmt():
    names = parse_reason_names(parse_format((DATA / "6.18-tcp_send_reset.format").read_text()).print_fmt)
    assert names[0] == "NOT_SPECIFIED"
    assert names[1] == "NO_SOCKET"
    assert names[14] == "TCP_STATE"
    assert names[11] == "TCP_ABORT_ON_CLOSE"
    assert len(names) == 26


def test_detect_618_layout(tmp_path):
    layout = detect_layout(make_tracefs(tmp_path, ALL_618))
    assert layout.send_reset_variant == "sockaddr"
    assert all(layout.usable(n) for n in ("inet_sock_set_state", "tcp_send_reset", "tcp_receive_reset",
                                          "inet_sk_error_report", "tcp_destroy_sock"))
    assert layout.cflags() == [
        "-DTCPSTATE_HAVE_TCP_SEND_RESET", "-DTCPSTATE_HAVE_TCP_RECEIVE_RESET",
        "-DTCPSTATE_HAVE_INET_SK_ERROR_REPORT", "-DTCPSTATE_HAVE_TCP_DESTROY_SOCK",
        "-DTCPSTATE_SEND_RESET_SOCKADDR", "-DTCPSTATE_SEND_RESET_HAS_STATE", "-DTCPSTATE_SEND_RESET_HAS_REASON",
    ]


def test_detect_legacy_send_reset(tmp_path):
    # Hand-written from the pre-6.10 layout (sport/dport/family fields, state, no reason).
    files = [ALL_618[0], ("tcp", "tcp_send_reset", "legacy-tcp_send_reset.format")]
    layout = detect_layout(make_tracefs(tmp_path, files))
    assert layout.send_reset_variant == "legacy"
    assert layout.reason_names == {}
    flags = layout.cflags()
    assert "-DTCPSTATE_SEND_RESET_HAS_FAMILY" in flags and "-DTCPSTATE_SEND_RESET_HAS_STATE" in flags
    assert "-DTCPSTATE_SEND_RESET_HAS_REASON" not in flags and "-DTCPSTATE_SEND_RESET_SOCKADDR" not in flags
    assert not layout.usable("tcp_receive_reset")
    assert "-DTCPSTATE_HAVE_TCP_RECEIVE_RESET" not in flags
    assert layout.describe("tcp_receive_reset") == "missing on this kernel"


def test_unknown_layout_is_not_used(tmp_path):
    root = make_tracefs(tmp_path, ALL_618[:1])
    d = Path(root, "events", "tcp", "tcp_receive_reset")
    d.mkdir(parents=True)
    (d / "format").write_text("name: tcp_receive_reset\nformat:\n\tfield:int foo;\toffset:8;\tsize:4;\tsigned:1;\n")
    layout = detect_layout(root)
    assert not layout.usable("tcp_receive_reset")
    assert "layout not understood" in layout.describe("tcp_receive_reset")


def test_missing_set_state_is_reported(tmp_path):
    layout = detect_layout(make_tracefs(tmp_path, ALL_618[1:]))
    assert not layout.usable("inet_sock_set_state")
