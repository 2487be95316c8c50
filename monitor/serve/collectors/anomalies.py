"""anomalies.py: the detectors' firings and whether each is active, and the webhook's deliveries."""

from __future__ import annotations

from typing import Callable, NamedTuple

from prometheus_client.registry import Collector

from monitor.serve.collectors import Family, families


class Detectors(NamedTuple):
    kinds: list
    fired: dict  # kind -> anomalies that started firing
    active: dict  # kind -> firing now


TABLE = (
    Family("tcpstate_anomalies", "counter", "Anomalies that started firing, by detector.", ("kind",),
           lambda d: [((kind,), d.fired.get(kind, 0)) for kind in d.kinds]),
    Family("tcpstate_anomaly_active", "gauge", "1 while the detector's anomaly is firing.", ("kind",),
           lambda d: [((kind,), 1 if d.active.get(kind) else 0) for kind in d.kinds]),
)
WEBHOOK = Family("tcpstate_anomaly_webhook_events", "counter", "Anomaly events for the webhook: sent, failed after "
                 "retries, or dropped because its queue was full.", ("result",),
                 lambda hook: [((result,), getattr(hook, result)) for result in ("sent", "failed", "dropped")])


class AnomalyCollector(Collector):
    """fired / active: kind -> count / bool (detect.engine.Engine). webhook: detect.sinks.Webhook or None."""

    def __init__(self, kinds: list, fired: Callable[[], dict], active: Callable[[], dict], webhook=None):
        self._kinds = list(kinds)
        self._fired = fired
        self._active = active
        self._webhook = webhook

    def collect(self):
        yield from families(TABLE, Detectors(self._kinds, self._fired(), self._active()))
        if self._webhook is not None:
            yield WEBHOOK.build(self._webhook)
