"""events.py: the Python mirror of bpf/tcpstate.h (constants, ctypes structs) and event decoding."""

from __future__ import annotations

import ctypes
import ipaddress
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from monitor.tcp import state_name

AF_INET = 2
AF_INET6 = 10


def bpf_dir() -> Path:
    """Where the C sources live: $TCPSTATE_BPF_DIR, else monitor/bpf in an installed package
    (pyproject maps bpf/ there), else bpf/ beside the package in a source tree."""
    env = os.environ.get("TCPSTATE_BPF_DIR")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]  # monitor/
    installed = package / "bpf"
    return installed if (installed / "tcpstate.c").is_file() else package.parent / "bpf"


_DEFINE = re.compile(r"^#define\s+(TCPSTATE_\w+)\s+(.+?)\s*(?:/\*.*)?$")
_EXPR = re.compile(r"^[\s\d()+*/-]+$")


@lru_cache(maxsize=None)
def header_constants(path: str | None = None) -> dict:
    """The integer (and brace-list) #defines of tcpstate.h, so the header stays the one source."""
    text = Path(path or bpf_dir() / "tcpstate.h").read_text()
    consts: dict = {}
    for line in text.splitlines():
        m = _DEFINE.match(line.strip())
        if not m:
            continue
        name, value = m.groups()
        if value.startswith("{"):
            consts[name] = tuple(int(v) for v in value.strip("{} ").split(","))
            continue
        expr = re.sub(r"TCPSTATE_\w+", lambda n: str(consts.get(n.group(0), "x")), value)
        if not _EXPR.match(expr):
            raise ValueError(f"tcpstate.h: cannot evaluate #define {name} {value} (decimal integers, + - * / "
                             "and earlier TCPSTATE_ names only)")
        consts[name] = int(eval(expr, {"__builtins__": {}}))  # digits and operators only
    return consts


C = header_constants()

HIST_BOUNDS_SECONDS = tuple(us / 1e6 for us in C["TCPSTATE_HIST_BOUNDS_US"])
FAILURE_REASONS = ("refused", "timeout", "reset", "other")  # TCPSTATE_FAIL_* order
DIRECTIONS = ("sent", "received")  # TCPSTATE_DIR_* order
ROLES = ("client", "server")  # TCPSTATE_ROLE_* order
OFFENDER_KINDS = ("reset_sent", "reset_received", "connect_failure", "port_reuse", "reset_after_handshake")  # TCPSTATE_OFF_*
EVENT_KINDS = {
    C["TCPSTATE_EV_TRANSITION"]: "transition",
    C["TCPSTATE_EV_RESET_SENT"]: "reset_sent",
    C["TCPSTATE_EV_RESET_RECEIVED"]: "reset_received",
}


class Event(ctypes.Structure):
    """Mirror of struct tcpstate_event."""

    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("skaddr", ctypes.c_uint64),
        ("delta_us", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("family", ctypes.c_uint16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("kind", ctypes.c_uint8),
        ("oldstate", ctypes.c_uint8),
        ("newstate", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * C["TCPSTATE_COMM_LEN"]),
    ]


class SockInfo(ctypes.Structure):
    """Mirror of struct tcpstate_sock."""

    _fields_ = [
        ("state_ts_ns", ctypes.c_uint64),
        ("syn_ts_ns", ctypes.c_uint64),
        ("est_ts_ns", ctypes.c_uint64),
        ("close_delta_us", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("state", ctypes.c_uint8),
        ("prev_state", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("comm", ctypes.c_char * C["TCPSTATE_COMM_LEN"]),
    ]


class OffenderKey(ctypes.Structure):
    """Mirror of struct tcpstate_offender_key."""

    _fields_ = [
        ("raddr", ctypes.c_uint8 * 16),
        ("family", ctypes.c_uint16),
        ("rport", ctypes.c_uint16),
        ("lport", ctypes.c_uint16),
        ("kind", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class Offender(ctypes.Structure):
    """Mirror of struct tcpstate_offender."""

    _fields_ = [
        ("count", ctypes.c_uint64),
        ("first_ns", ctypes.c_uint64),
        ("last_ns", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("comm", ctypes.c_char * C["TCPSTATE_COMM_LEN"]),
    ]


class DecodeError(ValueError):
    """A record whose size does not match struct tcpstate_event."""


def format_addr(family: int, raw: bytes) -> str:
    if family == AF_INET:
        return str(ipaddress.IPv4Address(bytes(raw[:4])))
    if family == AF_INET6:
        return str(ipaddress.IPv6Address(bytes(raw[:16])))
    return "?"


def reason_name(reasons: dict[int, str], num: int) -> str:
    if num == C["TCPSTATE_REASON_UNKNOWN"]:
        return "UNKNOWN"
    return reasons.get(num, "UNKNOWN")


@dataclass(frozen=True)
class DecodedEvent:
    """One watch record, named and formatted."""

    ts_ns: int
    kind: str
    family: str
    saddr: str
    sport: int
    daddr: str
    dport: int
    oldstate: str
    newstate: str
    reason: str
    delta_us: int
    pid: int
    comm: str
    skaddr: int


def decode_event(data: bytes | ctypes.Array, size: int, reasons: dict[int, str]) -> DecodedEvent:
    """Decode one ring-buffer record; the size is checked before the bytes are read."""
    if size != ctypes.sizeof(Event):
        raise DecodeError(f"event of {size} bytes, expected {ctypes.sizeof(Event)}")
    ev = Event.from_buffer_copy(bytes(data[:size]) if isinstance(data, (bytes, bytearray)) else ctypes.string_at(data, size))
    kind = EVENT_KINDS.get(ev.kind, "unknown")
    is_reset = kind != "transition"
    return DecodedEvent(
        ts_ns=ev.ts_ns,
        kind=kind,
        family="ipv4" if ev.family == AF_INET else "ipv6" if ev.family == AF_INET6 else str(ev.family),
        saddr=format_addr(ev.family, bytes(ev.saddr)),
        sport=ev.sport,
        daddr=format_addr(ev.family, bytes(ev.daddr)),
        dport=ev.dport,
        oldstate=state_name(ev.oldstate),
        newstate=state_name(ev.newstate),
        reason=reason_name(reasons, ev.reason) if is_reset else "",
        delta_us=ev.delta_us,
        pid=ev.pid,
        comm=ev.comm.decode(errors="replace"),
        skaddr=ev.skaddr,
    )
