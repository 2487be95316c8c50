"""tracefs.py: mount tracefs when needed, read tracepoint formats, and detect the layouts this kernel has."""

from __future__ import annotations

import ctypes
import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

TRACEFS_MOUNTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

# (group, name, required): what tcpstate attaches to, in the order `check` reports it.
TRACEPOINTS = (
    ("sock", "inet_sock_set_state", True),
    ("tcp", "tcp_send_reset", False),
    ("tcp", "tcp_receive_reset", False),
    ("sock", "inet_sk_error_report", False),
    ("tcp", "tcp_destroy_sock", False),
)

# What each tracepoint's code reads; a format without these fields is a layout we do not know.
_ADDR_FIELDS = {"sport", "dport", "family", "saddr", "daddr", "saddr_v6", "daddr_v6"}
REQUIRED_FIELDS = {
    "inet_sock_set_state": {"skaddr", "oldstate", "newstate", "protocol"} | _ADDR_FIELDS,
    "tcp_receive_reset": {"skaddr"} | _ADDR_FIELDS,
    "inet_sk_error_report": {"error", "sport", "dport", "protocol"},
    "tcp_destroy_sock": {"skaddr"},
}

# What each missing signal costs, for logs and `check`.
MISSING_EFFECT = {
    "tcp_send_reset": "sent resets are not counted",
    "tcp_receive_reset": "received resets are not counted and resets do not stop TIME_WAIT inference",
    "inet_sk_error_report": "failed connects are all classified as 'other'",
    "tcp_destroy_sock": "socket-table slots are freed by LRU eviction only",
}


class TracefsError(RuntimeError):
    """tracefs is not mounted and could not be mounted."""


@dataclass(frozen=True)
class Field:
    ctype: str
    name: str
    offset: int
    size: int
    array_len: int | None


@dataclass(frozen=True)
class TracepointFormat:
    name: str
    fields: dict[str, Field]
    print_fmt: str


_FIELD = re.compile(r"field:(?P<decl>[^;]+);\s*offset:(?P<off>\d+);\s*size:(?P<size>\d+);")
_DECL = re.compile(r"^(?P<type>.*?)\s*(?P<name>\w+)\s*(?:\[(?P<len>\d*)\])?$")


def parse_format(text: str) -> TracepointFormat:
    """Parse the text of events/<group>/<name>/format."""
    name = ""
    fields: dict[str, Field] = {}
    print_fmt = ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("name:"):
            name = s.split(":", 1)[1].strip()
        elif s.startswith("print fmt:"):
            print_fmt = s.split(":", 1)[1].strip()
        else:
            m = _FIELD.search(s)
            if not m:
                continue
            d = _DECL.match(m.group("decl").strip())
            if not d or d.group("name").startswith("common_"):
                continue
            length = d.group("len")
            fields[d.group("name")] = Field(
                ctype=d.group("type"),
                name=d.group("name"),
                offset=int(m.group("off")),
                size=int(m.group("size")),
                array_len=int(length) if length else None,
            )
    return TracepointFormat(name=name, fields=fields, print_fmt=print_fmt)


_SYMBOLIC = re.compile(r"__print_symbolic\(REC->reason,(?P<body>.*?)\)\s*(?:,|$)")
_PAIR = re.compile(r"\{\s*(\d+)\s*,\s*\"([^\"]+)\"\s*\}")


def parse_reason_names(print_fmt: str) -> dict[int, str]:
    """Reset-reason names from tcp_send_reset's print fmt ({ 1, "NO_SOCKET" }, ...)."""
    m = _SYMBOLIC.search(print_fmt)
    if not m:
        return {}
    return {int(num): name for num, name in _PAIR.findall(m.group("body"))}


def find_tracefs() -> str | None:
    for root in TRACEFS_MOUNTS:
        if os.path.isdir(os.path.join(root, "events")):
            return root
    return None


def ensure_tracefs() -> str:
    """Return a tracefs root, mounting tracefs at /sys/kernel/tracing if no mount exists."""
    root = find_tracefs()
    if root:
        return root
    target = TRACEFS_MOUNTS[0]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tracefs", target.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        hint = "run as root (CAP_SYS_ADMIN)" if err in (errno.EPERM, errno.EACCES) else "check that the kernel has CONFIG_TRACING"
        raise TracefsError(
            f"tracefs is not mounted and mounting it at {target} failed ({os.strerror(err)}): "
            f"{hint}, or mount it yourself: mount -t tracefs tracefs {target}"
        )
    if not os.path.isdir(os.path.join(target, "events")):
        raise TracefsError(f"mounted tracefs at {target} but it has no events/: the kernel lacks tracepoints")
    return target


def read_format(root: str, group: str, name: str) -> TracepointFormat | None:
    try:
        text = Path(root, "events", group, name, "format").read_text()
    except OSError:
        return None
    return parse_format(text)


@dataclass
class Layout:
    """Which tracepoints exist on this kernel, and in which layout."""

    formats: dict[str, TracepointFormat | None] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # tracepoint -> why it is unusable
    send_reset_variant: str | None = None  # "sockaddr" (>= 6.10) | "legacy" | "legacy-nofamily"
    reason_names: dict[int, str] = field(default_factory=dict)

    def usable(self, name: str) -> bool:
        return self.formats.get(name) is not None and name not in self.problems

    @property
    def send_reset_has_state(self) -> bool:
        fmt = self.formats.get("tcp_send_reset")
        return bool(fmt and "state" in fmt.fields)

    @property
    def send_reset_has_reason(self) -> bool:
        fmt = self.formats.get("tcp_send_reset")
        return bool(fmt and "reason" in fmt.fields)

    def describe(self, name: str) -> str:
        if self.formats.get(name) is None:
            return "missing on this kernel"
        if name in self.problems:
            return self.problems[name]
        if name == "tcp_send_reset":
            extra = []
            if self.send_reset_has_state:
                extra.append("state")
            if self.send_reset_has_reason:
                extra.append(f"reason ({len(self.reason_names)} names)")
            return f"layout {self.send_reset_variant}" + (f" with {', '.join(extra)}" if extra else "")
        return "ok"

    def cflags(self) -> list[str]:
        flags = []
        for _group, name, _req in TRACEPOINTS:
            if name != "inet_sock_set_state" and self.usable(name):
                flags.append(f"-DTCPSTATE_HAVE_{name.upper()}")
        if self.usable("tcp_send_reset"):
            if self.send_reset_variant == "sockaddr":
                flags.append("-DTCPSTATE_SEND_RESET_SOCKADDR")
            elif self.send_reset_variant == "legacy":
                flags.append("-DTCPSTATE_SEND_RESET_HAS_FAMILY")
            if self.send_reset_has_state:
                flags.append("-DTCPSTATE_SEND_RESET_HAS_STATE")
            if self.send_reset_has_reason:
                flags.append("-DTCPSTATE_SEND_RESET_HAS_REASON")
        return flags


def _send_reset_variant(fmt: TracepointFormat) -> tuple[str | None, str | None]:
    f = fmt.fields
    if "skaddr" not in f:
        return None, "layout not understood (no skaddr field)"
    saddr = f.get("saddr")
    if saddr and saddr.array_len in (28,) and "daddr" in f:
        return "sockaddr", None
    if {"sport", "dport", "saddr_v6", "daddr_v6"} <= set(f):
        return ("legacy" if "family" in f and "saddr" in f else "legacy-nofamily"), None
    return None, "layout not understood (neither sockaddr images nor sport/dport fields)"


def detect_layout(root: str) -> Layout:
    """Read every tracepoint format tcpstate uses from a tracefs root."""
    layout = Layout()
    for group, name, _required in TRACEPOINTS:
        fmt = read_format(root, group, name)
        layout.formats[name] = fmt
        if fmt is None:
            continue
        if name == "tcp_send_reset":
            variant, problem = _send_reset_variant(fmt)
            layout.send_reset_variant = variant
            if problem:
                layout.problems[name] = problem
            if "reason" in fmt.fields:
                layout.reason_names = parse_reason_names(fmt.print_fmt)
            continue
        missing = REQUIRED_FIELDS[name] - set(fmt.fields)
        if missing:
            layout.problems[name] = f"layout not understood (no field {', '.join(sorted(missing))})"
    return layout
