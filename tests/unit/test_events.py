"""Decoding of watch records and their table/JSON rendering."""

import ctypes
import json

import pytest

from monitor.kernel.abi import C, DecodeError, Event, decode_event
from monitor.kernel.watch import json_line, table_header, table_row
from monitor.timing import WallClock

REASONS = {1: "NO_SOCKET"}


def record(**fields):
    ev = Event()
    for k, v in fields.items():
        if k in ("saddr", "daddr"):
            for i, b in enumerate(v):
                getattr(ev, k)[i] = b
        else:
            setattr(ev, k, v)
    return bytes(ev)


def test_decode_v4_transition():
    raw = record(ts_ns=5, family=2, sport=40000, dport=80, kind=C["TCPSTATE_EV_TRANSITION"], oldstate=2,
                 newstate=1, saddr=bytes([198, 18, 0, 1]), daddr=bytes([198, 18, 0, 2]), delta_us=1500,
                 pid=42, comm=b"curl")
    ev = decode_event(raw, len(raw), REASONS)
    assert (ev.kind, ev.saddr, ev.sport, ev.daddr, ev.dport) == ("transition", "198.18.0.1", 40000, "198.18.0.2", 80)
    assert (ev.oldstate, ev.newstate, ev.reason, ev.pid, ev.comm) == ("SYN_SENT", "ESTABLISHED", "", 42, "curl")


def test_decode_v6_reset():
    raw = record(family=10, kind=C["TCPSTATE_EV_RESET_SENT"], oldstate=0, newstate=0, reason=1,
                 saddr=bytes(15) + b"\x01", daddr=bytes(15) + b"\x01")
    ev = decode_event(raw, len(raw), REASONS)
    assert (ev.kind, ev.saddr, ev.oldstate, ev.reason) == ("reset_sent", "::1", "NONE", "NO_SOCKET")


def test_size_checked_before_decoding():
    raw = record()
    with pytest.raises(DecodeError):
        decode_event(raw[:-8], len(raw) - 8, REASONS)


def test_json_and_table_rendering():
    raw = record(family=2, kind=C["TCPSTATE_EV_RESET_RECEIVED"], oldstate=1, reason=C["TCPSTATE_REASON_UNKNOWN"],
                 saddr=bytes([127, 0, 0, 1]), daddr=bytes([127, 0, 0, 1]), sport=1, dport=2)
    ev = decode_event(raw, len(raw), REASONS)
    obj = json.loads(json_line(ev, WallClock()))
    assert obj["kind"] == "reset_received" and obj["state"] == "ESTABLISHED" and obj["reason"] == "UNKNOWN"
    assert obj["time"].endswith("Z") and obj["pid"] is None
    row = table_row(ev, WallClock())
    assert "127.0.0.1:1" in row and "reset_received" in row
    assert table_header().split()[:3] == ["TIME", "KIND", "SOURCE"]
    assert ctypes.sizeof(Event) == len(raw)
