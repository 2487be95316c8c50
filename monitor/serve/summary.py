"""summary.py: the live state machine's data (/api/v1/summary): counter rates over a short window, sockets by state, resets, anomalies, kernel."""

from __future__ import annotations

import threading
import time
from collections import deque

from monitor.detect.detectors import top_time_wait_ports
from monitor.tcp import STATE_NAMES

SCHEMA = 1
WINDOW_SECONDS = 10.0  # rates cover at least this much of the recent past once the daemon has run that long

# The transitions of the classic state-machine figure as this kernel reports them (README, "The
# live page"), in the figure's order. Always in the JSON, zero or not, so a reader can tell
# "no traffic on this edge" from "not counted".
FIGURE_TRANSITIONS = (
    ("CLOSE", "SYN_SENT"), ("CLOSE", "LISTEN"), ("SYN_SENT", "ESTABLISHED"), ("SYN_SENT", "CLOSE"),
    ("SYN_SENT", "SYN_RECV"), ("LISTEN", "SYN_RECV"), ("LISTEN", "CLOSE"), ("SYN_RECV", "ESTABLISHED"),
    ("SYN_RECV", "CLOSE"), ("ESTABLISHED", "FIN_WAIT1"), ("ESTABLISHED", "CLOSE_WAIT"), ("ESTABLISHED", "CLOSE"),
    ("FIN_WAIT1", "FIN_WAIT2"), ("FIN_WAIT1", "CLOSING"), ("FIN_WAIT1", "CLOSE"), ("FIN_WAIT2", "TIME_WAIT"),
    ("FIN_WAIT2", "CLOSE"), ("CLOSING", "TIME_WAIT"), ("CLOSING", "CLOSE"), ("CLOSE_WAIT", "LAST_ACK"),
    ("CLOSE_WAIT", "CLOSE"), ("LAST_ACK", "CLOSE"),
)

# Counters shown beside the figure: JSON name -> how to read {label: total} from aggregator.Counts.
# A group read as None (syn_retransmits on a kernel without the retransmit tracepoint) is left out
# of the JSON rather than showing zeros that were never measured.
COUNTER_GROUPS = {
    "connect_failures": lambda c: c.failures,
    "port_reuse": lambda c: c.port_reuse,
    "resets_after_handshake": lambda c: {f"{d}/{r}": n for (d, r), n in c.resets_after_handshake.items()},
    "syn_retransmits": lambda c: c.syn_retransmits,
}


class Sampler:
    """(time, Counts) of the anomaly engine's reads, one per tick: the page rates against them and
    so adds no read of the kernel's maps. Keeps the newest and enough older ones that the oldest is
    at or before newest - window."""

    def __init__(self, window: float = WINDOW_SECONDS, clock=time.time):
        self.window = window
        self._clock = clock
        self._samples: deque = deque()
        self._lock = threading.Lock()

    def observe(self, counts):
        """Record counts (read just now) and hand them on: wraps the engine's reader."""
        now = self._clock()
        with self._lock:
            self._samples.append((now, counts))
            while len(self._samples) >= 2 and self._samples[1][0] <= now - self.window:
                self._samples.popleft()
        return counts

    def span(self) -> tuple | None:
        """((t_old, counts_old), (t_new, counts_new)), or None before the first read."""
        with self._lock:
            return (self._samples[0], self._samples[-1]) if self._samples else None


class ActiveEvents:
    """An anomaly event sink: the firing event of each detector that is firing now."""

    def __init__(self):
        self._events: dict = {}
        self._lock = threading.Lock()

    def __call__(self, event) -> None:
        with self._lock:
            if event.status == "firing":
                self._events[event.kind] = event
            else:
                self._events.pop(event.kind, None)

    def events(self) -> list:
        with self._lock:
            return [self._events[k] for k in sorted(self._events)]


def kernel_info(release: str, layout, attached: dict) -> dict:
    """What the page says about the kernel: the tracepoints it needs (attached or not) and, for each
    count, where it comes from here or, when nothing gives it, what is lost (Layout.signals())."""
    signals = [{"name": sig.name, "source": sig.source, "missing": None if sig.source else sig.missing}
               for sig in layout.signals()]
    return {"release": release, "send_reset_layout": layout.send_reset_variant or "none", "probes": dict(attached),
            "signals": signals}


def _rate(delta: int, seconds: float):
    return round(delta / seconds, 3) if seconds > 0 else None


def _series(key, new: dict, old: dict, seconds: float) -> dict:
    total = new.get(key, 0)
    delta = total - old.get(key, 0)
    return {"total": total, "delta": delta, "rate": _rate(delta, seconds)}


def build(span, namespaces: dict, anomalies: list, kernel: dict, filters, version: str) -> dict:
    """The summary as of the newest counter read. span: Sampler.span(); namespaces: label ->
    statepoll.NamespaceState; anomalies: firing anomaly.Event; kernel: kernel_info(); filters:
    config.Filters. Pure: the same inputs give the same dict (README, "/api/v1/summary")."""
    if span is None:
        (t_old, old), (t_new, new) = (None, None), (None, None)
    else:
        (t_old, old), (t_new, new) = span
    seconds = round(t_new - t_old, 3) if span is not None else 0.0
    old_tr = old.transitions if old is not None else {}
    new_tr = new.transitions if new is not None else {}
    counted = sorted(set(new_tr) - set(FIGURE_TRANSITIONS))
    transitions = [{"from": a, "to": b, **_series((a, b), new_tr, old_tr, seconds)}
                   for a, b in FIGURE_TRANSITIONS + tuple(counted)]
    old_rst = old.resets if old is not None else {}
    resets = [{"direction": d, "state": s, "reason": r, **_series((d, s, r), new.resets, old_rst, seconds)}
              for d, s, r in sorted(new.resets)] if new is not None else []
    counters = {}
    for group, read in COUNTER_GROUPS.items():
        values = read(new) if new is not None else None
        if values is None:
            continue
        before = read(old) or {}
        counters[group] = [{"label": label, **_series(label, values, before, seconds)} for label in values]
    return {
        "schema": SCHEMA,
        "version": version,
        "time": t_new,
        "window": {"start": t_old, "end": t_new, "seconds": seconds},
        "filters": {"text": filters.describe(), "include_cidrs": [str(c) for c in filters.include_cidrs],
                    "exclude_cidrs": [str(c) for c in filters.exclude_cidrs],
                    "include_ports": list(filters.include_ports)},
        "kernel": {"release": kernel["release"], "send_reset_layout": kernel["send_reset_layout"],
                   "probes": dict(sorted(kernel["probes"].items())), "signals": list(kernel["signals"])},
        "transitions": transitions,
        "resets": resets,
        "counters": counters,
        "namespaces": [_namespace(label, namespaces[label]) for label in sorted(namespaces)],
        "anomalies": [_anomaly(e) for e in anomalies],
    }


def _namespace(label: str, ns) -> dict:
    return {"netns": label, "polled": ns.finished,
            "sockets": {name: ns.sockets.get(name, 0) for name in STATE_NAMES.values() if name in ns.sockets},
            "time_wait": {"sockets": ns.sockets.get("TIME_WAIT", 0), "limit": ns.limits.time_wait_max,
                          "top_ports": top_time_wait_ports(ns.time_wait_ports)}}


def _anomaly(event) -> dict:
    as_event = event.as_dict()  # value and threshold rounded as in the event stream
    return {"kind": event.kind, "severity": event.severity, "since": event.time, "summary": event.summary,
            "value": as_event["value"], "threshold": as_event["threshold"],
            "top_offenders": event.details.get("top_offenders")}
