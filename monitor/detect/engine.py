"""engine.py: ticks the detectors over the counters and socket polls, adds the top offenders to their events, hands them to the sinks."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

from monitor.detect.detectors import DETECTORS, Detector
from monitor.detect.event import Event, Sample
from monitor.kernel import offenders
from monitor.timing import Periodic

log = logging.getLogger(__name__)


class Engine:
    """Ticks every interval in its own thread: one Sample from the sources, every detector
    stepped, each event handed to every sink. Its counters feed tcpstate_anomal*."""

    def __init__(self, detectors: list[Detector], read_counts, read_namespaces, sinks: list, interval: float,
                 clock=None, read_offenders=None, top_offenders: int = 5):
        self.detectors = detectors
        self._read_counts = read_counts
        self._read_namespaces = read_namespaces
        self._read_offenders = read_offenders  # -> [offenders.Peer]; read only when an event is written
        self.top_offenders = top_offenders
        self.sinks = sinks
        self._clock = clock or time.time
        self._loop = Periodic("anomaly tick", self.tick, interval)
        self._lock = threading.Lock()  # a reload swaps detectors between ticks, never during one
        self._fired_before: dict = {}  # kind -> firings of detectors a reload replaced
        self._published = self._snapshot()

    def tick(self) -> list[Event]:
        try:
            counts = self._read_counts()
        except Exception:  # a failed map read skips the counter detectors for one tick
            log.exception("anomaly detectors: reading the in-kernel counters failed")
            counts = None
        sample = Sample(self._clock(), counts, dict(self._read_namespaces()))
        with self._lock:
            stepped = [(d, e) for d in self.detectors if (e := d.step(sample)) is not None]
        return self._emit(stepped)

    def _emit(self, stepped: list) -> list[Event]:
        """Each (detector, event) with its top offenders, handed to every sink."""
        peers, read = None, False
        events = []
        for d, event in stepped:
            if d.offender_kinds:
                if self._read_offenders is None or self.top_offenders == 0:
                    event = replace(event, details=dict(event.details, top_offenders=[]))
                else:
                    if not read:  # once per tick, however many events
                        peers, read = self._peers(), True
                    event = self._with_offenders(d, event, peers)
            events.append(event)
        for event in events:
            for sink in self.sinks:
                try:
                    sink(event)
                except Exception:
                    log.exception("anomaly event output failed")
        # Published once the events are out: a scrape never sees an anomaly active (or fired)
        # whose event has not been written yet.
        self._published = self._snapshot()
        return events

    def _peers(self) -> list | None:
        try:
            return self._read_offenders()
        except Exception:  # the event still goes out, with top_offenders null
            log.exception("anomaly detectors: reading the offenders table failed")
            return None

    def _with_offenders(self, d: Detector, event: Event, peers: list | None) -> Event:
        """The peers of the detector's kinds seen during its window (for a resolved event: since
        the window before it fired), in the details and, the first one, in the summary."""
        if peers is None:
            return replace(event, details=dict(event.details, top_offenders=None))
        since = (d.started if event.status == "resolved" and d.started is not None else event.time) - d.window_seconds
        chosen = offenders.top(peers, d.offender_kinds, since, self.top_offenders)
        summary = event.summary + (f"; top peer: {chosen[0].describe()}" if chosen else "")
        return replace(event, summary=summary, details=dict(event.details, top_offenders=[p.as_dict() for p in chosen]))

    def _snapshot(self) -> tuple[dict, dict]:
        with self._lock:
            fired = dict(self._fired_before)
            for d in self.detectors:
                fired[d.kind] = fired.get(d.kind, 0) + d.fired
            return fired, {d.kind: d.active for d in self.detectors}

    def fired(self) -> dict:
        """kind -> anomalies that started firing, as of the last events written."""
        return dict(self._published[0])

    def active(self) -> dict:
        """kind -> firing now, as of the last events written."""
        return dict(self._published[1])

    def reconfigure(self, cfg: dict) -> list[str]:
        """Apply a reloaded config (config.load_detector_config) between two ticks. A detector
        whose section is unchanged keeps its state; a changed one starts over with the new
        thresholds, and one that was firing (or is now disabled) first resolves, with the reason
        in its details, so that no firing event is left without its end. Returns the names of
        the sections that changed."""
        now = self._clock()
        anomaly_cfg = cfg["anomaly"]
        with self._lock:
            old = {d.kind: d for d in self.detectors}
            detectors, stepped, changed = [], [], []
            for kind, cls in DETECTORS.items():
                before = old.get(kind)
                if before is not None and before.cfg == cfg[kind]:
                    detectors.append(before)
                    continue
                if before is not None or cfg[kind]["enabled"]:
                    changed.append(kind)
                if before is not None:
                    self._fired_before[kind] = self._fired_before.get(kind, 0) + before.fired
                    if before.active:
                        stepped.append((before, before.end(now, "disabled" if not cfg[kind]["enabled"]
                                                           else "reconfigured")))
                if cfg[kind]["enabled"]:
                    fresh = cls(cfg[kind])
                    if before is not None:
                        fresh.adopt(before)
                    detectors.append(fresh)
            self.detectors = detectors
            if (anomaly_cfg["interval_seconds"], anomaly_cfg["top_offenders"]) != (self.interval, self.top_offenders):
                changed.append("anomaly")
            self._loop.interval = anomaly_cfg["interval_seconds"]
            self.top_offenders = anomaly_cfg["top_offenders"]
        self._emit(stepped)
        return changed

    @property
    def interval(self) -> float:
        return self._loop.interval

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
