"""kstats.py: the kernel's own TCP counters (/proc/net/netstat, /proc/net/snmp) and the sysctls that bound sockets."""

from __future__ import annotations

from dataclasses import dataclass

# (file, group, kernel name, metric: tcpstate_kernel_tcp_<metric>_total, help). The kernel's
# names are kept in the help so `nstat`/`netstat -s` users can find them.
KERNEL_COUNTERS = (
    ("netstat", "TcpExt", "TCPTimeWaitOverflow", "time_wait_overflow",
     "Connections that closed without TIME_WAIT because tcp_max_tw_buckets was reached (TcpExt TCPTimeWaitOverflow)."),
    ("netstat", "TcpExt", "ListenOverflows", "listen_overflows",
     "Completed handshakes dropped because a listener's accept queue was full (TcpExt ListenOverflows)."),
    ("netstat", "TcpExt", "ListenDrops", "listen_drops",
     "SYNs and handshakes a listener dropped for any reason, overflows included (TcpExt ListenDrops)."),
    ("netstat", "TcpExt", "TCPAbortOnData", "abort_on_data",
     "Connections reset because data arrived after the application closed them (TcpExt TCPAbortOnData)."),
    ("netstat", "TcpExt", "TCPAbortOnClose", "abort_on_close",
     "Connections reset because the application closed them with unread data (TcpExt TCPAbortOnClose)."),
    ("netstat", "TcpExt", "TCPAbortOnTimeout", "abort_on_timeout",
     "Connections aborted after too many retransmissions or keepalive probes (TcpExt TCPAbortOnTimeout)."),
    ("netstat", "TcpExt", "TCPAbortOnLinger", "abort_on_linger",
     "Connections reset after close because the FIN_WAIT2 linger time ran out (TcpExt TCPAbortOnLinger)."),
    ("netstat", "TcpExt", "TCPAbortOnMemory", "abort_on_memory",
     "Connections reset because of memory pressure or too many orphans (TcpExt TCPAbortOnMemory)."),
    ("netstat", "TcpExt", "TW", "time_wait_expired",
     "TIME_WAIT sockets whose timer ran out (TcpExt TW)."),
    ("netstat", "TcpExt", "TWRecycled", "time_wait_reused",
     "TIME_WAIT sockets taken over by a new connect under tcp_tw_reuse (TcpExt TWRecycled)."),
    ("snmp", "Tcp", "OutRsts", "out_rsts", "Segments sent with the RST flag (Tcp OutRsts)."),
    ("snmp", "Tcp", "EstabResets", "estab_resets",
     "Connections reset from ESTABLISHED or CLOSE_WAIT (Tcp EstabResets)."),
    ("snmp", "Tcp", "AttemptFails", "attempt_fails",
     "Connections that failed from SYN_SENT or SYN_RECV (Tcp AttemptFails)."),
    ("snmp", "Tcp", "ActiveOpens", "active_opens", "Connections opened by connect(): CLOSE->SYN_SENT (Tcp ActiveOpens)."),
    ("snmp", "Tcp", "PassiveOpens", "passive_opens",
     "Connections opened by a listener: LISTEN->SYN_RECV (Tcp PassiveOpens)."),
)

PROC_NET = "/proc/thread-self/net"  # the calling thread's namespace, which may differ from the process's
PROC_SYS = "/proc/sys/net/ipv4"  # resolved in the namespace of the thread that opens it


def parse_snmp(text: str) -> dict[tuple[str, str], int]:
    """(group, name) -> value from /proc/net/netstat or /proc/net/snmp (header line, value line)."""
    out: dict[tuple[str, str], int] = {}
    lines = text.splitlines()
    for header, values in zip(lines[::2], lines[1::2]):
        group, _, names = header.partition(":")
        vgroup, _, nums = values.partition(":")
        if group != vgroup:
            raise ValueError(f"unpaired lines for {group!r} and {vgroup!r}")
        for name, num in zip(names.split(), nums.split()):
            out[(group, name)] = int(num)
    return out


def read_kernel_counters(proc_net: str = PROC_NET) -> dict[str, int]:
    """metric suffix -> value, for the counters this kernel has."""
    tables = {}
    for name in ("netstat", "snmp"):
        with open(f"{proc_net}/{name}") as f:
            tables[name] = parse_snmp(f.read())
    return {metric: tables[file][(group, field)] for file, group, field, metric, _ in KERNEL_COUNTERS
            if (group, field) in tables[file]}


def read_sockstat(proc_net: str = PROC_NET) -> str:
    """/proc/net/sockstat and sockstat6 of the calling thread's namespace, joined."""
    with open(f"{proc_net}/sockstat") as f:
        text = f.read()
    try:
        with open(f"{proc_net}/sockstat6") as f:
            text += f.read()
    except FileNotFoundError:  # no IPv6
        pass
    return text


@dataclass(frozen=True)
class Limits:
    time_wait_max: int  # net.ipv4.tcp_max_tw_buckets
    port_first: int  # net.ipv4.ip_local_port_range
    port_last: int
    reserved: int = 0  # ports of net.ipv4.ip_local_reserved_ports inside the range

    @property
    def ephemeral_ports(self) -> int:
        """The size of ip_local_port_range."""
        return max(0, self.port_last - self.port_first + 1)

    @property
    def usable_ports(self) -> int:
        """The ports connect() can pick: the range without the reserved ones."""
        return max(0, self.ephemeral_ports - self.reserved)


def parse_port_range(text: str) -> tuple[int, int]:
    first, last = (int(v) for v in text.split())
    return first, last


def reserved_in_range(text: str, first: int, last: int) -> int:
    """How many ports of ip_local_reserved_ports ("8080,9000-9010") lie in [first, last]."""
    ports = set()
    for part in text.replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        lo_port, hi_port = int(lo), int(hi or lo)
        ports.update(range(max(lo_port, first), min(hi_port, last) + 1))
    return len(ports)


def read_limits(proc_sys: str = PROC_SYS) -> Limits:
    with open(f"{proc_sys}/tcp_max_tw_buckets") as f:
        tw_max = int(f.read())
    with open(f"{proc_sys}/ip_local_port_range") as f:
        first, last = parse_port_range(f.read())
    try:
        with open(f"{proc_sys}/ip_local_reserved_ports") as f:
            reserved = reserved_in_range(f.read(), first, last)
    except FileNotFoundError:
        reserved = 0
    return Limits(tw_max, first, last, reserved)
