"""event.py: what a detector sees at a tick (Sample), decides (Verdict) and emits (Event, one JSON line of the event stream)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from monitor.timing import rfc3339


@dataclass(frozen=True)
class Event:
    """One line of the event stream (schema in the README, "Anomaly events")."""

    time: float  # Unix seconds
    kind: str
    status: str  # firing | resolved
    severity: str
    summary: str  # one human sentence
    value: float
    threshold: float
    window_seconds: float
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"time": rfc3339(self.time), "kind": self.kind, "status": self.status, "severity": self.severity,
                "summary": self.summary, "value": _round(self.value), "threshold": _round(self.threshold),
                "window_seconds": self.window_seconds, "details": self.details}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":"), allow_nan=False)


def _round(x: float) -> float:
    return round(x, 3) if isinstance(x, float) and math.isfinite(x) else x


@dataclass(frozen=True)
class Sample:
    """What a detector sees at one tick: the in-kernel counters (aggregator.Counts, None when
    they could not be read) and the last socket-table poll per namespace (statepoll.NamespaceState)."""

    time: float
    counts: object = None
    namespaces: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    breach: bool
    value: float  # the measured value of the condition that breached (or of the main one)
    threshold: float
    summary: str
    details: dict
