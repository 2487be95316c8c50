"""settings.py: what the daemon is told to do, as validated values (filters, listen address) and the one source of every default."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

DEFAULT_PORT = 9966
DEFAULT_LISTEN_ADDRESS = f":{DEFAULT_PORT}"
DEFAULT_MAX_SOCKETS = 65536
DEFAULT_RECENT_CLOSES = 65536  # 4-tuples remembered for port-reuse counting
DEFAULT_MAX_OFFENDERS = 4096  # peers remembered as evidence for anomaly events
DEFAULT_STATE_INTERVAL = 5.0  # seconds between socket-table polls
DEFAULT_TOP_N = 10  # ports and remote endpoints exported by name
DEFAULT_FORECAST_WINDOW = 30.0  # seconds of TIME_WAIT entries behind the rate


@dataclass(frozen=True)
class Filters:
    """In-kernel filters. A connection matches when either endpoint address is in an
    include CIDR (if any are given), neither is in an exclude CIDR, and either port is an
    include port (if any are given)."""

    include_cidrs: tuple = ()
    exclude_cidrs: tuple = ()
    include_ports: tuple = ()

    def describe(self) -> str:
        parts = []
        if self.include_cidrs:
            parts.append("include " + ",".join(map(str, self.include_cidrs)))
        if self.exclude_cidrs:
            parts.append("exclude " + ",".join(map(str, self.exclude_cidrs)))
        if self.include_ports:
            parts.append("ports " + ",".join(map(str, self.include_ports)))
        return "; ".join(parts) or "none"


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:  # host "" means every address
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_V4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def normalize_cidr(net):
    """A v4-mapped IPv6 CIDR (::ffff:a.b.c.d/N, N >= 96) becomes the IPv4 CIDR it denotes:
    the kernel side matches v4-mapped addresses against the IPv4 tables."""
    if net.version == 6 and net.prefixlen >= 96 and net.subnet_of(_V4_MAPPED):
        return ipaddress.ip_network((net.network_address.ipv4_mapped, net.prefixlen - 96))
    return net


def parse_listen_address(text: str) -> ListenAddress:
    """HOST:PORT, [V6]:PORT or :PORT (every address, IPv4 and IPv6). Raises ValueError with the reason."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("an IPv6 address is written [ADDR]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError("expected HOST:PORT, e.g. :9966 or 127.0.0.1:9966")
        if ":" in host:
            raise ValueError("an IPv6 address is written [ADDR]:PORT")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{port!r} is not a port number (0-65535)")
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not all(part.isalnum() or part == "-" for part in host.replace(".", " ").split()) or " " in host:
                raise ValueError(f"{host!r} is not an IP address or host name") from None
    return ListenAddress(host=host, port=int(port))


def make_filters(include_cidr=(), exclude_cidr=(), include_port=()) -> Filters:
    return Filters(
        include_cidrs=tuple(dict.fromkeys(include_cidr)),
        exclude_cidrs=tuple(dict.fromkeys(exclude_cidr)),
        include_ports=tuple(sorted(set(include_port))),
    )
