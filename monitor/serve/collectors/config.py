"""config.py: config reloads on SIGHUP, named as Prometheus names its own."""

from __future__ import annotations

from typing import Callable

from prometheus_client.registry import Collector

from monitor.serve.collectors import Family, families, one

TABLE = (  # the source: daemon.ReloadHistory.snapshot()
    Family("tcpstate_config_last_reload_successful", "gauge", "1 if the last config load (at start or on SIGHUP) "
           "succeeded.", (), lambda st: one(1 if st["last_ok"] else 0)),
    Family("tcpstate_config_last_reload_success_timestamp_seconds", "gauge", "When the config in use was loaded.", (),
           lambda st: one(st["last_success"])),
    Family("tcpstate_config_reloads", "counter", "Config reloads on SIGHUP, by result; a failed one keeps the "
           "previous config.", ("result",), lambda st: [((result,), st[result]) for result in ("success", "failure")]),
)


class ReloadCollector(Collector):
    """stats() -> dict with success and failure (counts), last_ok (bool) and last_success (Unix
    seconds of the last good load)."""

    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats

    def collect(self):
        yield from families(TABLE, self._stats())
