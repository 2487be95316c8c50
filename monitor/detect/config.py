"""config.py: the anomaly detectors' thresholds: defaults, then a TOML file (--config), then --set overrides, each checked."""

from __future__ import annotations

import tomllib

SEVERITIES = ("info", "warning", "critical")
# section -> key -> default. Rates are per second; 0 turns a condition off; fractions are 0..1.
DETECTOR_DEFAULTS: dict[str, dict] = {
    # offender_idle_seconds: a peer silent this long starts a new count in the kernel's table.
    "anomaly": {"interval_seconds": 1.0, "top_offenders": 5, "offender_idle_seconds": 60.0},
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
MAX_VALUES = {"reuse_within_seconds": 3600.0, "within_seconds": 3600.0,  # kernel windows: an hour at most
              "offender_idle_seconds": 3600.0}
POSITIVE_KEYS = {"window_seconds", "interval_seconds", "offender_idle_seconds"}


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


def split_overrides(items) -> tuple[str, ...]:
    """--set values as given: repeated options, each of which may hold several (TCPSTATE_SET is
    space-separated)."""
    return tuple(x for item in items for x in item.split())


def load_detector_config(path: str | None = None, overrides: tuple = ()) -> dict:
    """Defaults, then the TOML file at path, then overrides ("section.key=value", TOML values)."""


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
