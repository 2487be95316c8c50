"""config.py: validated settings (filters, listen address) and the click types that parse them."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import click

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


class CidrType(click.ParamType):
    name = "CIDR"

    def convert(self, value, param, ctx):
        if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            return value
        try:
            return normalize_cidr(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            self.fail(f"{value!r} is not an IPv4 or IPv6 CIDR (e.g. 10.0.0.0/8, 2001:db8::/32)", param, ctx)


_V4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def normalize_cidr(net):
    """A v4-mapped IPv6 CIDR (::ffff:a.b.c.d/N, N >= 96) becomes the IPv4 CIDR it denotes:
    the kernel side matches v4-mapped addresses against the IPv4 tables."""
    if net.version == 6 and net.prefixlen >= 96 and net.subnet_of(_V4_MAPPED):
        return ipaddress.ip_network((net.network_address.ipv4_mapped, net.prefixlen - 96))
    return net


class PortType(click.ParamType):
    name = "PORT"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
            return value
        text = str(value).strip()
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            self.fail(f"{value!r} is not a port number (1-65535)", param, ctx)
        return int(text)


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


class ListenAddressType(click.ParamType):
    name = "HOST:PORT"

    def convert(self, value, param, ctx):
        if isinstance(value, ListenAddress):
            return value
        try:
            return parse_listen_address(str(value))
        except ValueError as exc:
            self.fail(f"{value!r}: {exc}", param, ctx)


CIDR = CidrType()
PORT = PortType()
LISTEN_ADDRESS = ListenAddressType()


def make_filters(include_cidr=(), exclude_cidr=(), include_port=()) -> Filters:
    return Filters(
        include_cidrs=tuple(dict.fromkeys(include_cidr)),
        exclude_cidrs=tuple(dict.fromkeys(exclude_cidr)),
        include_ports=tuple(sorted(set(include_port))),
    )


# --- anomaly detectors: thresholds from defaults, then a TOML file (--config), then --set --------

SEVERITIES = ("info", "warning", "critical")
# section -> key -> default. Rates are per second; 0 turns a condition off; fractions are 0..1.
DETECTOR_DEFAULTS: dict[str, dict] = {
    "anomaly": {"interval_seconds": 1.0, "top_offenders": 5},
    "rst_storm": {
        "enabled": True, "severity": "critical", "window_seconds": 10.0, "hold_down_seconds": 30.0,
        "rate": 100.0, "sent_rate": 0.0, "received_rate": 0.0,
        "baseline_factor": 10.0, "baseline_min_rate": 10.0, "baseline_warmup_seconds": 300.0,
    },
    "time_wait_buildup": {
        "enabled": True, "severity": "warning", "window_seconds": 60.0, "hold_down_seconds": 60.0,
        "count": 0, "fraction": 0.5, "growth_rate": 0.0, "utilization": 0.8,
    },
    "connect_failures": {
        "enabled": True, "severity": "warning", "window_seconds": 30.0, "hold_down_seconds": 30.0,
        "rate": 10.0, "fraction": 0.5, "min_attempts": 10,
    },
    # reuse_within_seconds and within_seconds are what the kernel counts by (0 stops the counting);
    # `enabled` turns only the events off.
    "port_reuse": {
        "enabled": True, "severity": "warning", "window_seconds": 60.0, "hold_down_seconds": 60.0,
        "reuse_within_seconds": 60.0, "rate": 1.0,
    },
    "reset_after_handshake": {
        "enabled": True, "severity": "warning", "window_seconds": 30.0, "hold_down_seconds": 30.0,
        "within_seconds": 1.0, "rate": 1.0, "sent_rate": 0.0, "fraction": 0.2, "min_connections": 20,
    },
}
FRACTION_KEYS = {"fraction", "utilization"}
MAX_VALUES = {"reuse_within_seconds": 3600.0, "within_seconds": 3600.0}  # kernel windows: an hour at most
POSITIVE_KEYS = {"window_seconds", "interval_seconds"}


class ConfigError(ValueError):
    """One line: where (file:line when known), which key, what is wrong."""


def _line_of(text: str, section: str, key: str | None) -> int | None:
    """The line of `key` inside [section] (or of the section header when key is None)."""
    current = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("[") and not line.startswith("[["):
            current = line.strip("[] \t").split("#")[0].strip().strip('"')
            if key is None and current == section:
                return n
            continue
        if key is not None and current == section and line.split("=")[0].strip().strip('"') == key:
            return n
    return None


def check_value(section: str, key: str, value):
    """The value if valid for section.key, else raise ConfigError (without a location)."""
    default = DETECTOR_DEFAULTS[section][key]
    name = f"{section}.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: must be true or false, got {value!r}")
        return value
    if isinstance(default, str):
        if value not in SEVERITIES:
            raise ConfigError(f"{name}: must be one of {', '.join(SEVERITIES)}, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: must be a whole number, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: must be a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name}: must be a finite number, got {value!r}")
    if value < 0 or (key in POSITIVE_KEYS and value == 0):
        raise ConfigError(f"{name}: must be {'> 0' if key in POSITIVE_KEYS else '>= 0'}, got {value!r}")
    if key in FRACTION_KEYS and value > 1:
        raise ConfigError(f"{name}: must be a fraction from 0 to 1, got {value!r}")
    if key in MAX_VALUES and value > MAX_VALUES[key]:
        raise ConfigError(f"{name}: must be <= {MAX_VALUES[key]:g}, got {value!r}")
    return type(default)(value)


def load_detector_config(path: str | None = None, overrides: tuple = ()) -> dict:
    """Defaults, then the TOML file at path, then overrides ("section.key=value", TOML values)."""
    import tomllib

    cfg = {section: dict(keys) for section, keys in DETECTOR_DEFAULTS.items()}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        text = raw.decode("utf-8", errors="replace")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        for section, keys in data.items():
            if section not in cfg or not isinstance(keys, dict):
                line = _line_of(text, section, None)
                where = f"{path}:{line}" if line else path
                known = ", ".join(f"[{s}]" for s in DETECTOR_DEFAULTS)
                raise ConfigError(f"{where}: unknown section {section!r} (known: {known})")
            for key, value in keys.items():
                line = _line_of(text, section, key)
                where = f"{path}:{line}" if line else path
                if key not in cfg[section]:
                    raise ConfigError(f"{where}: {section}.{key}: unknown key (known: {', '.join(cfg[section])})")
                try:
                    cfg[section][key] = check_value(section, key, value)
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {exc}") from None
    for item in overrides:
        name, sep, text_value = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. rst_storm.rate=50")
        if section not in cfg or key not in cfg[section]:
            raise ConfigError(f"--set {item!r}: unknown key {name.strip()!r}")
        try:
            value = tomllib.loads(f"v = {text_value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text_value.strip()  # a bare word: let check_value say what it should be
        try:
            cfg[section][key] = check_value(section, key, value)
        except ConfigError as exc:
            raise ConfigError(f"--set {item!r}: {exc}") from None
    return cfg
