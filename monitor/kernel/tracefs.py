"""tracefs.py: mount tracefs when needed, read tracepoint formats, and decide how each count is read on this kernel."""

from __future__ import annotations

import ctypes
import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from monitor.kernel.btf import BTF, VMLINUX, BTFError

TRACEFS_MOUNTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

# (group, name, required): what tcpstate may attach to, in the order `check` reports it.
TRACEPOINTS = (
    ("sock", "inet_sock_set_state", True),
    ("tcp", "tcp_send_reset", False),
    ("tcp", "tcp_receive_reset", False),
    ("sock", "inet_sk_error_report", False),
    ("tcp", "tcp_destroy_sock", False),
    ("skb", "kfree_skb", False),
    ("tcp", "tcp_retransmit_skb", False),
    ("tcp", "tcp_retransmit_synack", False),
)

# What each tracepoint's code reads; a format without these fields is a layout we do not know.
# family is optional where the v4-mapped v6 fields tell it (5.10's tcp_receive_reset, tcp_destroy_sock,
# and both retransmit tracepoints).
_PORTS_AND_V6 = {"sport", "dport", "saddr_v6", "daddr_v6"}
REQUIRED_FIELDS = {
    "inet_sock_set_state": {"skaddr", "oldstate", "newstate", "protocol", "family", "saddr", "daddr"} | _PORTS_AND_V6,
    "tcp_receive_reset": {"skaddr"} | _PORTS_AND_V6,
    "inet_sk_error_report": {"error", "sport", "dport", "protocol"},
    "tcp_destroy_sock": {"skaddr"} | _PORTS_AND_V6,
    "kfree_skb": {"skbaddr", "reason"},
    "tcp_retransmit_skb": {"skaddr", "state"} | _PORTS_AND_V6,
    "tcp_retransmit_synack": _PORTS_AND_V6,
}
# Layouts whose family field is optional (the addresses are v4-mapped without it): -D..._HAS_FAMILY.
_FAMILY_OPTIONAL = ("tcp_receive_reset", "tcp_destroy_sock", "tcp_retransmit_skb", "tcp_retransmit_synack")

# Kernel struct members read at offsets from the running kernel's BTF: -D name=offset.
BTF_OFFSETS = {
    "TCPSTATE_SK_ERR_AT": "sock.sk_err",
    "TCPSTATE_SKB_HEAD_AT": "sk_buff.head",
    "TCPSTATE_SKB_NETWORK_HEADER_AT": "sk_buff.network_header",
    "TCPSTATE_SKB_TRANSPORT_HEADER_AT": "sk_buff.transport_header",
    "TCPSTATE_SEGS_OUT_AT": "tcp_sock.segs_out",
    "TCPSTATE_SKC_STATE_AT": "sock_common.skc_state",
    # What inet_sock_set_state's and tcp_destroy_sock's records hold, for the raw tracepoints
    # (bpf/sockread.h). sock_common opens struct sock, and struct sock opens inet_sock.
    "TCPSTATE_SK_PROTOCOL_AT": "sock.sk_protocol",
    "TCPSTATE_SKC_DADDR_AT": "sock.__sk_common.skc_daddr",
    "TCPSTATE_SKC_DPORT_AT": "sock.__sk_common.skc_dport",
    "TCPSTATE_SKC_FAMILY_AT": "sock.__sk_common.skc_family",
    "TCPSTATE_SKC_V6_DADDR_AT": "sock.__sk_common.skc_v6_daddr",
    "TCPSTATE_SKC_V6_RCV_SADDR_AT": "sock.__sk_common.skc_v6_rcv_saddr",
    "TCPSTATE_INET_SADDR_AT": "inet_sock.inet_saddr",
    "TCPSTATE_INET_SPORT_AT": "inet_sock.inet_sport",
}
_SKB_OFFSETS = ("TCPSTATE_SKB_HEAD_AT", "TCPSTATE_SKB_NETWORK_HEADER_AT", "TCPSTATE_SKB_TRANSPORT_HEADER_AT")
# What is attached as a raw tracepoint where BTF gives the socket's fields (Layout.raw_tracepoints).
RAW_TRACEPOINTS = ("inet_sock_set_state", "tcp_destroy_sock")
# The raw tracepoints' socket fields by size in bytes, in the two blocks sockread.h reads: the start of
# the socket (sock_common's fields), and the part of inet_sock around its local address and port.
_SOCK_HEAD_FIELDS = {"TCPSTATE_SKC_DADDR_AT": 4, "TCPSTATE_SKC_DPORT_AT": 2, "TCPSTATE_SKC_FAMILY_AT": 2,
                     "TCPSTATE_SKC_V6_DADDR_AT": 16, "TCPSTATE_SKC_V6_RCV_SADDR_AT": 16}
_INET_FIELDS = {"TCPSTATE_INET_SADDR_AT": 4, "TCPSTATE_INET_SPORT_AT": 2}
_RAW_FIELDS = ("TCPSTATE_SK_PROTOCOL_AT", *_SOCK_HEAD_FIELDS, *_INET_FIELDS)
_MAX_BLOCK = 128  # bytes of the program's stack one block may take
NO_SOCKET_REASON = 1  # TCPSTATE_REASON_NO_SOCKET


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


@dataclass(frozen=True)
class Signal:
    """One kind of count and where it comes from on this kernel (source None: not counted)."""

    name: str
    source: str | None
    missing: str = ""  # what is lost, and why, when source is None


@dataclass
class Layout:
    """Which tracepoints exist on this kernel, in which layout, and which kernel struct offsets
    its BTF gave: together, how each count is read here."""

    formats: dict[str, TracepointFormat | None] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # tracepoint -> why it is unusable
    send_reset_variant: str | None = None  # "sockaddr" (>= 6.10) | "legacy" | "legacy-nofamily"
    reason_names: dict[int, str] = field(default_factory=dict)
    drop_reasons: dict[str, int] = field(default_factory=dict)  # kfree_skb's reason names -> numbers
    offsets: dict[str, int] = field(default_factory=dict)  # BTF_OFFSETS names found
    btf_problem: str | None = "not read"
    raw_off: str | None = None  # why the raw tracepoints are not used though this kernel allows them

    def raw_blocks(self) -> tuple[int, int, int] | None:
        """(bytes read from the socket's start, inet block's offset, its length) for the raw
        tracepoints, or None where BTF lacks a field or a block would not fit the stack."""
        if not all(k in self.offsets for k in _RAW_FIELDS):
            return None
        head = -(-max(self.offsets[k] + n for k, n in _SOCK_HEAD_FIELDS.items()) // 8) * 8
        inet_at = min(self.offsets[k] for k in _INET_FIELDS)
        inet_len = max(self.offsets[k] + n for k, n in _INET_FIELDS.items()) - inet_at
        if head > _MAX_BLOCK or inet_len > _MAX_BLOCK:
            return None
        return head, inet_at, inet_len

    @property
    def raw_tracepoints(self) -> bool:
        """inet_sock_set_state and tcp_destroy_sock are attached as raw tracepoints, reading the
        socket at BTF offsets instead of the record the kernel fills for each event, and are not
        held back while another tool's BPF program, or a map read from user space, holds the CPU."""
        return self.raw_off is None and self.raw_blocks() is not None

    @property
    def raw_problem(self) -> str:
        """Why the raw tracepoints are not used (empty when they are)."""
        if self.raw_off:
            return self.raw_off
        missing = [k for k in _RAW_FIELDS if k not in self.offsets]
        if missing:
            names = ", ".join(BTF_OFFSETS[k] for k in missing)
            return f"no struct sock offsets ({names}: {self.btf_problem or 'not given'})"
        if self.raw_blocks() is None:
            return f"the socket's fields lie more than {_MAX_BLOCK} bytes apart"
        return ""

    def usable(self, name: str) -> bool:
        return self.formats.get(name) is not None and name not in self.problems

    def has_field(self, name: str, field_name: str) -> bool:
        fmt = self.formats.get(name)
        return bool(fmt and field_name in fmt.fields)

    @property
    def send_reset_has_state(self) -> bool:
        return self.has_field("tcp_send_reset", "state")

    @property
    def send_reset_has_reason(self) -> bool:
        return self.has_field("tcp_send_reset", "reason")

    @property
    def failure_reasons_from_sk_err(self) -> bool:
        """A failed connect's cause read from the socket itself (tcp_destroy_sock settles those
        that get theirs late); else from sock:inet_sk_error_report."""
        return "TCPSTATE_SK_ERR_AT" in self.offsets and self.usable("tcp_destroy_sock")

    @property
    def lean_socket_table(self) -> bool:
        """The socket table is touched only where a count needs the socket's record (opens,
        ESTABLISHED, CLOSE, resets, destruction): a reset's state is read from the socket itself.
        The watch stream, which reports the time spent in every state, still tracks every
        transition."""
        return "TCPSTATE_SKC_STATE_AT" in self.offsets

    @property
    def nosock_resets_from_kfree_skb(self) -> bool:
        """Before 6.10 tcp_send_reset does not report a reset sent where no socket matched; the
        segment that caused it is then freed with drop reason NO_SOCKET (>= 5.17)."""
        return (self.send_reset_variant != "sockaddr" and self.usable("kfree_skb")
                and "NO_SOCKET" in self.drop_reasons and all(k in self.offsets for k in _SKB_OFFSETS))

    @property
    def refused_syn_flags_from_send_reset(self) -> bool:
        """From 6.10 tcp_send_reset reports a reset for no socket with the segment it answers; its
        TCP flags (read through sk_buff offsets from BTF) tell a refused SYN from a stray segment."""
        return (self.send_reset_variant == "sockaddr" and self.usable("tcp_send_reset")
                and all(k in self.offsets for k in _SKB_OFFSETS))

    @property
    def refused_syn_source(self) -> str | None:
        """Where a SYN answered with a reset for no socket is seen as a SYN: what port reuse needs to
        count a reconnect to a closed port on the refusing host (role server)."""
        if self.refused_syn_flags_from_send_reset:
            return "tcp:tcp_send_reset (the segment's TCP flags; sk_buff offsets from BTF)"
        if self.nosock_resets_from_kfree_skb:
            return "skb:kfree_skb (drop reason NO_SOCKET, the segment's TCP flags)"
        return None

    @property
    def nosock_resets_source(self) -> str | None:
        """Where resets sent for no socket are counted from on this kernel, if anywhere."""
        if self.send_reset_variant == "sockaddr" and self.usable("tcp_send_reset"):
            return "tcp:tcp_send_reset"
        if self.nosock_resets_from_kfree_skb:
            return "skb:kfree_skb (drop reason NO_SOCKET; sk_buff offsets from BTF)"
        return None

    def used(self, name: str) -> bool:
        """Whether tcpstate attaches to this tracepoint on this kernel."""
        if name == "inet_sk_error_report":
            return self.usable(name) and not self.failure_reasons_from_sk_err
        if name == "kfree_skb":
            return self.nosock_resets_from_kfree_skb
        return self.usable(name)

    def probe_states(self) -> dict[str, bool]:
        """group:name -> attachable, for the tracepoints this kernel needs: those used, and the
        missing ones whose count nothing else gives (a replaced or unneeded one is left out)."""
        out = {}
        for group, name, _required in TRACEPOINTS:
            if self.used(name):
                out[f"{group}:{name}"] = True
            elif name == "inet_sk_error_report" and not self.failure_reasons_from_sk_err:
                out[f"{group}:{name}"] = False
            elif name not in ("inet_sk_error_report", "kfree_skb"):
                out[f"{group}:{name}"] = False
        return out

    def describe(self, name: str) -> str:
        if self.formats.get(name) is None:
            return "missing on this kernel"
        if name in self.problems:
            return self.problems[name]
        if name in RAW_TRACEPOINTS and self.raw_tracepoints:
            return "ok (raw tracepoint: reads the socket at offsets from BTF)"
        if name == "tcp_send_reset":
            extra = []
            if self.send_reset_has_state:
                extra.append("state")
            if self.send_reset_has_reason:
                extra.append(f"reason ({len(self.reason_names)} names)")
            return f"layout {self.send_reset_variant}" + (f" with {', '.join(extra)}" if extra else "")
        if name in _FAMILY_OPTIONAL and not self.has_field(name, "family"):
            return "ok (no family field: taken from the addresses)"
        return "ok"

    def signals(self) -> list[Signal]:
        """How each count is read on this kernel, for `check`, the log and README's table."""
        sent = "tcp:tcp_send_reset" if self.usable("tcp_send_reset") else None
        nosock, why = self.nosock_resets_source, ""
        if nosock is None:
            if not self.usable("kfree_skb") and self.formats.get("kfree_skb") is not None:
                cause = "skb:kfree_skb has no drop reason (before 5.17)"
            elif "NO_SOCKET" not in self.drop_reasons:
                cause = "skb:kfree_skb has no NO_SOCKET drop reason"
            else:
                cause = f"no sk_buff offsets ({self.btf_problem})"
            why = ("resets sent where no socket matched (a connect to a closed port) are not counted: "
                   f"tcp_send_reset reports them from 6.10, and {cause}")
        if self.failure_reasons_from_sk_err:
            failures, fwhy = f"sock.sk_err (offset {self.offsets['TCPSTATE_SK_ERR_AT']} from BTF)", ""
        elif self.usable("inet_sk_error_report") and self.usable("tcp_destroy_sock"):
            failures, fwhy = "sock:inet_sk_error_report", ""
        else:
            failures = None
            fwhy = (f"every failed connect is 'other': no sock.sk_err offset ({self.btf_problem or 'no tcp_destroy_sock'}) "
                    "and no sock:inet_sk_error_report")
        if "TCPSTATE_SEGS_OUT_AT" in self.offsets:
            syns = f"tcp_sock.segs_out (offset {self.offsets['TCPSTATE_SEGS_OUT_AT']} from BTF)"
        else:
            syns = None
        refused, rwhy = self.refused_syn_source, ""
        if refused is None:
            rwhy = ("a reconnect to a closed port is counted as port reuse on the connecting host only: "
                    + (f"no sk_buff offsets ({self.btf_problem})" if self.send_reset_variant == "sockaddr"
                       else "resets sent for no socket are not seen here"))
        retransmit = None
        if self.usable("tcp_retransmit_skb"):
            retransmit = "tcp:tcp_retransmit_skb (state" + (
                "; err: failed ones left out)" if self.has_field("tcp_retransmit_skb", "err") else ")")
        return [
            Signal("transitions", self.usable("inet_sock_set_state") and (
                "sock:inet_sock_set_state (raw tracepoint: struct sock fields at offsets from BTF)"
                if self.raw_tracepoints else f"sock:inet_sock_set_state (its record: {self.raw_problem})") or None,
                   "nothing is counted: tcpstate needs it (Linux >= 4.16)"),
            Signal("resets sent", sent and f"{sent} (layout {self.send_reset_variant})", "sent resets are not counted"),
            Signal("resets sent for no socket", nosock, why),
            Signal("resets received", "tcp:tcp_receive_reset" if self.usable("tcp_receive_reset") else None,
                   "received resets are not counted and resets do not stop TIME_WAIT inference"),
            Signal("failed-connect causes", failures, fwhy),
            Signal("socket-table frees", self.usable("tcp_destroy_sock") and (
                "tcp:tcp_destroy_sock (raw tracepoint)" if self.raw_tracepoints else "tcp:tcp_destroy_sock") or None,
                   "socket-table slots are freed by LRU eviction only; an abort from FIN_WAIT2/CLOSING counts "
                   "as TIME_WAIT"),
            Signal("reset states",
                   f"sock_common.skc_state (offset {self.offsets['TCPSTATE_SKC_STATE_AT']} from BTF)"
                   if self.lean_socket_table else None,
                   "counted from the state tcpstate last saw the socket enter (UNKNOWN for a socket opened before "
                   f"it started), so the socket table is looked up at every transition ({self.btf_problem})"),
            Signal("retransmissions", retransmit,
                   "retransmitted segments are not counted, SYNs (syn_retransmits, role client) included"),
            Signal("SYN-ACK retransmissions",
                   "tcp:tcp_retransmit_synack" if self.usable("tcp_retransmit_synack") else None,
                   "re-sent SYN-ACKs are not counted (syn_retransmits, role server)"),
            Signal("SYNs of failed connects", syns,
                   f"connect_failures events carry no SYN count, and a connect() that failed before its SYN "
                   f"went out (EADDRNOTAVAIL) counts for port reuse as if it had sent one ({self.btf_problem})"),
            Signal("port reuse of refused SYNs", refused, rwhy),
        ]

    def cflags(self) -> list[str]:
        flags = []
        for _group, name, _req in TRACEPOINTS:
            if name not in ("inet_sock_set_state", "kfree_skb") and self.used(name):
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
        for name in _FAMILY_OPTIONAL:
            if self.usable(name) and self.has_field(name, "family"):
                flags.append(f"-DTCPSTATE_{name.upper()[4:]}_HAS_FAMILY")
        if self.usable("tcp_retransmit_skb") and self.has_field("tcp_retransmit_skb", "err"):
            flags.append("-DTCPSTATE_RETRANSMIT_SKB_HAS_ERR")
        if self.failure_reasons_from_sk_err:
            flags.append(f"-DTCPSTATE_SK_ERR_AT={self.offsets['TCPSTATE_SK_ERR_AT']}")
        if "TCPSTATE_SEGS_OUT_AT" in self.offsets:
            flags.append(f"-DTCPSTATE_SEGS_OUT_AT={self.offsets['TCPSTATE_SEGS_OUT_AT']}")
        if self.lean_socket_table:
            flags.append(f"-DTCPSTATE_SKC_STATE_AT={self.offsets['TCPSTATE_SKC_STATE_AT']}")
        if self.raw_tracepoints:
            head, inet_at, inet_len = self.raw_blocks()
            flags += ["-DTCPSTATE_RAW_TRACEPOINTS", f"-DTCPSTATE_SKC_HEAD_LEN={head}",
                      f"-DTCPSTATE_INET_BLOCK_AT={inet_at}", f"-DTCPSTATE_INET_BLOCK_LEN={inet_len}"]
            flags += [f"-D{k}={self.offsets[k]}" for k in _RAW_FIELDS]
        if self.refused_syn_flags_from_send_reset:
            flags.append("-DTCPSTATE_SEND_RESET_SKB_FLAGS")
            flags += [f"-D{k}={self.offsets[k]}" for k in _SKB_OFFSETS]
        if self.nosock_resets_from_kfree_skb:
            fields = self.formats["kfree_skb"].fields
            flags += ["-DTCPSTATE_NOSOCK_RESETS_FROM_KFREE_SKB",
                      f"-DTCPSTATE_KFREE_SKB_SKBADDR_AT={fields['skbaddr'].offset}",
                      f"-DTCPSTATE_KFREE_SKB_REASON_AT={fields['reason'].offset}",
                      f"-DTCPSTATE_DROP_NO_SOCKET={self.drop_reasons['NO_SOCKET']}"]
            flags += [f"-D{k}={self.offsets[k]}" for k in _SKB_OFFSETS]
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


def read_offsets(layout: Layout, btf_path: str | None) -> None:
    """The BTF_OFFSETS this kernel's BTF has; layout.btf_problem says why none, if so."""
    if btf_path is None:
        layout.btf_problem = "BTF not read"
        return
    try:
        btf = BTF.load(btf_path)
    except BTFError as exc:
        layout.btf_problem = str(exc)
        return
    missing = []
    for name, member in BTF_OFFSETS.items():
        try:
            layout.offsets[name] = btf.offset(member)
        except BTFError as exc:
            missing.append(str(exc))
    layout.btf_problem = "; ".join(missing) or None


def detect_layout(root: str, btf_path: str | None = VMLINUX, offsets: dict[str, int] | None = None) -> Layout:
    """Read every tracepoint format tcpstate may use from a tracefs root, and the struct offsets
    it reads from the kernel's BTF (btf_path None: none, as on a kernel without BTF; offsets: these
    instead, as tests do for kernels that are not running)."""
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
        if name == "kfree_skb" and missing == {"reason"}:
            layout.problems[name] = "no drop reason (before 5.17)"
        elif missing:
            layout.problems[name] = f"layout not understood (no field {', '.join(sorted(missing))})"
        if name == "kfree_skb":
            layout.drop_reasons = {v: k for k, v in parse_reason_names(fmt.print_fmt).items()}
    if offsets is not None:
        layout.offsets, layout.btf_problem = dict(offsets), None
    else:
        read_offsets(layout, btf_path)
    if layout.nosock_resets_from_kfree_skb:
        layout.reason_names.setdefault(NO_SOCKET_REASON, "NO_SOCKET")
    return layout
