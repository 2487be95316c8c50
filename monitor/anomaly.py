"""anomaly.py: detectors that turn counter series into firing/resolved events (RST storms, TIME_WAIT buildup, connect failures, port reuse, resets after the handshake)."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from . import offenders

STATUSES = ("firing", "resolved")
log = logging.getLogger(__name__)


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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


class Window:
    """Samples of values (dicts of name -> number) over the last `seconds`; delta() and rate()
    cover the span from the oldest kept sample to the newest. counters: the values only grow,
    so one that went back means the source restarted (a gauge may go either way)."""

    def __init__(self, seconds: float, counters: bool = True):
        self.seconds = seconds
        self.counters = counters
        self.samples: deque = deque()

    def add(self, now: float, values: dict) -> None:
        if self.counters and self.samples and any(values.get(k, 0) < v for k, v in self.samples[-1][1].items()):
            self.samples.clear()  # a counter went backwards (probes reloaded): start again
        self.samples.append((now, dict(values)))
        # Keep one sample at or before the window's start so the span is the whole window.
        while len(self.samples) >= 2 and self.samples[1][0] <= now - self.seconds:
            self.samples.popleft()

    def span(self) -> float:
        return self.samples[-1][0] - self.samples[0][0] if len(self.samples) >= 2 else 0.0

    def delta(self, key) -> float:
        if len(self.samples) < 2:
            return 0.0
        return self.samples[-1][1].get(key, 0) - self.samples[0][1].get(key, 0)

    def rate(self, key) -> float | None:
        span = self.span()
        return self.delta(key) / span if span > 0 else None

    def deltas(self) -> dict:
        """Every key's growth over the window, non-zero only."""
        if len(self.samples) < 2:
            return {}
        first, last = self.samples[0][1], self.samples[-1][1]
        return {k: v - first.get(k, 0) for k, v in last.items() if v - first.get(k, 0) > 0}


class Detector:
    """Fires when evaluate() first breaches; resolves once it has been clear for hold_down_seconds."""

    kind = ""
    offender_kinds: tuple = ()  # kinds of the in-kernel offenders table that are this detector's evidence

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.window_seconds = float(cfg["window_seconds"])
        self.hold_down = float(cfg["hold_down_seconds"])
        self.active = False
        self.fired = 0
        self.started: float | None = None  # when the current (or last) firing began
        self._clear_since: float | None = None
        self._peak: Verdict | None = None

    def evaluate(self, sample: Sample) -> Verdict | None:
        raise NotImplementedError

    def adopt(self, old: "Detector") -> None:
        """Take over what the detector this one replaces (same kind, other thresholds) has seen,
        where that does not depend on the thresholds."""

    def step(self, sample: Sample) -> Event | None:
        verdict = self.evaluate(sample)
        if verdict is None:
            return None
        now = sample.time
        if verdict.breach:
            self._clear_since = None
            if not self.active:
                self.active = True
                self.fired += 1
                self.started = now
                self._peak = verdict
                return self._event(now, "firing", verdict, verdict.summary, verdict.details)
            if verdict.value > self._peak.value:
                self._peak = verdict
            return None
        if self.active:
            if self._clear_since is None:
                self._clear_since = now
            if now - self._clear_since >= self.hold_down:
                self.active = False
                peak = self._peak
                summary = (f"Resolved: {verdict.summary} (clear for {self.hold_down:g} s; "
                           f"peak {_round(peak.value)})")
                return self._event(now, "resolved", verdict, summary, dict(verdict.details, peak=_round(peak.value)))
        return None

    def end(self, now: float, why: str) -> Event:
        """The resolved event of a firing anomaly whose detector a config reload replaced or
        disabled (why: "reconfigured" or "disabled"); the detector is inactive afterwards."""
        self.active = False
        peak = self._peak
        return Event(now, self.kind, "resolved", self.cfg["severity"],
                     f"Resolved: the detector was {why} by a config reload (peak {_round(peak.value)})",
                     peak.value, peak.threshold, self.window_seconds,
                     dict(peak.details, peak=_round(peak.value), reason=f"config_{why}"))

    def _event(self, now, status, verdict, summary, details) -> Event:
        return Event(now, self.kind, status, self.cfg["severity"], summary, verdict.value, verdict.threshold,
                     self.window_seconds, details)


def _top(counts: dict, n: int = 5) -> list:
    return sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))[:n]


class CounterDetector(Detector):
    """A detector on the in-kernel counters: each tick adds values(counts) to a window of
    window_seconds, and judge() decides once the window spans some time."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.window = Window(self.window_seconds)

    def values(self, counts) -> dict:
        raise NotImplementedError

    def adopt(self, old: Detector) -> None:
        # Counter snapshots: without them a burst right after a reload would be the new window's start.
        if isinstance(old, CounterDetector):
            self.window.samples = old.window.samples

    def judge(self, sample: Sample) -> Verdict:
        raise NotImplementedError

    def evaluate(self, sample: Sample) -> Verdict | None:
        if sample.counts is None:
            return None
        self.window.add(sample.time, self.values(sample.counts))
        return self.judge(sample) if self.window.span() > 0 else None


class RstStorm(CounterDetector):
    """Resets per second (sent + received, and per direction) over the window above an absolute
    rate, or above baseline_factor x the rate learned while quiet (after the warm-up)."""

    kind = "rst_storm"
    offender_kinds = ("reset_sent", "reset_received")

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.baseline: float | None = None
        self._learned_for = 0.0
        self._last: float | None = None

    def values(self, counts) -> dict:
        resets = counts.resets  # (direction, state, reason) -> n
        values = dict(resets, total=sum(resets.values()))
        for direction in ("sent", "received"):
            values[direction] = sum(n for (d, _, _), n in resets.items() if d == direction)
        return values

    def judge(self, sample: Sample) -> Verdict:
        total = self.window.rate("total")
        sent, received = self.window.rate("sent"), self.window.rate("received")
        c = self.cfg
        checks = [("resets", total, c["rate"]), ("sent resets", sent, c["sent_rate"]),
                  ("received resets", received, c["received_rate"])]
        breach = next(((what, v, thr) for what, v, thr in checks if thr > 0 and v >= thr), None)
        learned = self.baseline is not None and self._learned_for >= c["baseline_warmup_seconds"]
        if breach is None and learned and c["baseline_factor"] > 0:
            thr = max(c["baseline_factor"] * self.baseline, c["baseline_min_rate"])
            if total >= thr:
                breach = (f"resets ({c['baseline_factor']:g}x the baseline of {self.baseline:.2f}/s)", total, thr)
        if breach is None and not self.active:
            self._learn(sample.time, total)
        what, value, threshold = breach or ("resets", total, c["rate"])
        top = [{"direction": d, "state": s, "reason": r, "resets": int(n)}
               for (d, s, r), n in _top({k: v for k, v in self.window.deltas().items() if isinstance(k, tuple)})]
        details = {"rate_per_second": {"total": _round(total), "sent": _round(sent), "received": _round(received)},
                   "top_causes": top, "baseline_per_second": _round(self.baseline) if learned else None}
        summary = (f"{what.capitalize()} at {value:.1f}/s over {self.window.span():.0f} s"
                   f" ({'over' if breach else 'under'} {threshold:g}/s)")
        if top:
            t = top[0]
            summary += f"; most {t['direction']} in {t['state']} ({t['reason']})"
        return Verdict(breach is not None, value, threshold, summary, details)

    def _learn(self, now: float, rate: float) -> None:
        # An exponentially weighted mean with a time constant of the warm-up period.
        dt = 0.0 if self._last is None else max(0.0, now - self._last)
        self._last = now
        if self.baseline is None:
            self.baseline = rate
            return
        tau = max(self.cfg["baseline_warmup_seconds"], 1.0)
        alpha = min(1.0, dt / tau)
        self.baseline += alpha * (rate - self.baseline)
        self._learned_for += dt


class TimeWaitBuildup(Detector):
    """TIME_WAIT sockets in a namespace above a count, a fraction of tcp_max_tw_buckets, or
    growing faster than a rate; or an endpoint's port-exhaustion forecast above a utilization."""

    kind = "time_wait_buildup"

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.windows: dict[str, Window] = {}
        self._seen: dict[str, float] = {}

    def evaluate(self, sample: Sample) -> Verdict | None:
        if not sample.namespaces:
            return None
        c = self.cfg
        findings = []  # (score relative to its threshold, what, value, threshold, netns, extra)
        for label, ns in sorted(sample.namespaces.items()):
            tw = ns.sockets.get("TIME_WAIT", 0)
            window = self.windows.setdefault(label, Window(self.window_seconds, counters=False))
            if self._seen.get(label) != ns.finished:  # a new poll: one sample per poll
                self._seen[label] = ns.finished
                window.add(ns.finished, {"tw": tw})
            growth = window.rate("tw")
            limit = ns.limits.time_wait_max
            name = f"namespace {label!r}" if label else "the host's namespace"
            if c["count"] > 0:
                findings.append((tw / c["count"], f"{tw} TIME_WAIT sockets in {name}", tw, c["count"], label, {}))
            if c["fraction"] > 0 and limit > 0:
                findings.append((tw / limit / c["fraction"],
                                 f"{tw} TIME_WAIT sockets in {name}, {tw / limit:.0%} of tcp_max_tw_buckets ({limit})",
                                 tw / limit, c["fraction"], label, {}))
            if c["growth_rate"] > 0 and growth is not None:
                findings.append((growth / c["growth_rate"], f"TIME_WAIT in {name} growing by {growth:.0f}/s",
                                 growth, c["growth_rate"], label, {}))
            if c["utilization"] > 0:
                for e in ns.endpoints:
                    if e.forecast is None:
                        continue
                    u = e.forecast.utilization
                    when = (f", exhausted in {e.forecast.seconds_to_exhaustion:.0f} s"
                            if e.forecast.seconds_to_exhaustion is not None else "")
                    findings.append((u / c["utilization"],
                                     f"ephemeral ports to {e.remote} from {name} at {u:.0%} of the range{when}",
                                     u, c["utilization"], label, {"remote": e.remote}))
        if not findings:
            return None
        score, what, value, threshold, label, extra = max(findings, key=lambda f: f[0])
        details = {"netns": label, **extra, "namespaces": {
            lbl: {"time_wait": ns.sockets.get("TIME_WAIT", 0), "time_wait_limit": ns.limits.time_wait_max,
                  "top_time_wait_ports": top_time_wait_ports(ns.time_wait_ports),
                  "top_remote_endpoints": [{"remote": e.remote, "time_wait": e.time_wait, "other": e.other,
                                            "utilization": _round(e.forecast.utilization) if e.forecast else None}
                                           for e in ns.endpoints[:5]]}
            for lbl, ns in sorted(sample.namespaces.items())}}
        breach = score >= 1
        return Verdict(breach, float(value), float(threshold),
                       f"{what} ({'over' if breach else 'under'} the threshold {threshold:g})", details)


def top_time_wait_ports(ports: tuple, n: int = 5) -> list:
    """The first n ports per side of the poll's TIME_WAIT ports (statepoll.top_ports: busiest
    first, ties by lower port), "other" left out."""
    out = []
    for side in ("local", "remote"):
        named = [(port, count) for s, port, count in ports if s == side and port != "other"]
        out += [{"side": side, "port": int(port), "time_wait": count} for port, count in named[:n]]
    return out


class ConnectFailures(CounterDetector):
    """Failed handshakes per second (by reason) over the window above a rate, or as a fraction
    of connect attempts once there are min_attempts of them."""

    kind = "connect_failures"
    offender_kinds = ("connect_failure",)

    def values(self, counts) -> dict:
        values = {f"fail:{r}": n for r, n in counts.failures.items()}
        values["failures"] = sum(counts.failures.values())
        values["attempts"] = counts.transitions.get(("CLOSE", "SYN_SENT"), 0)
        # How many SYNs went out: those of the failed connects, and every connect's retransmitted
        # ones (absent where the kernel does not count them).
        if counts.failed_connect_syns is not None:
            values["syns_sent"] = counts.failed_connect_syns
        if counts.syn_retransmits is not None:
            values["syn_retransmits"] = counts.syn_retransmits.get("client", 0)
        return values

    def _counted(self, key: str) -> int | None:
        return int(self.window.delta(key)) if self.window.samples and key in self.window.samples[-1][1] else None

    def judge(self, sample: Sample) -> Verdict:
        rate = self.window.rate("failures")
        c = self.cfg
        failures, attempts = self.window.delta("failures"), self.window.delta("attempts")
        fraction = failures / attempts if attempts else 0.0
        by_reason = {k[5:]: int(v) for k, v in self.window.deltas().items() if k.startswith("fail:")}
        syns = self._counted("syns_sent")
        details = {"rate_per_second": _round(rate), "failures": int(failures), "attempts": int(attempts),
                   "by_reason": dict(_top(by_reason, 4)), "syns_sent": syns,
                   "syn_retransmits": self._counted("syn_retransmits")}
        reasons = ", ".join(f"{n} {r}" for r, n in _top(by_reason, 4)) or "none"
        if syns is not None and failures:
            reasons += f" after {syns} SYNs"
        if c["rate"] > 0 and rate >= c["rate"]:
            return Verdict(True, rate, c["rate"], f"Connect failures at {rate:.1f}/s over {self.window.span():.0f} s "
                           f"(over {c['rate']:g}/s): {reasons}", details)
        if c["fraction"] > 0 and attempts >= c["min_attempts"] and fraction >= c["fraction"]:
            return Verdict(True, fraction, c["fraction"],
                           f"{fraction:.0%} of {int(attempts)} connects failed over {self.window.span():.0f} s "
                           f"(over {c['fraction']:.0%}): {reasons}", details)
        return Verdict(False, rate, c["rate"], f"Connect failures at {rate:.1f}/s (under {c['rate']:g}/s)", details)


class PortReuse(CounterDetector):
    """New SYNs on a 4-tuple whose previous connection ended (FINs, a reset, refused or timed out)
    less than reuse_within_seconds before: Wireshark's "TCP Port numbers reused", counted in the
    kernel by this host's role (it sent the SYN or received it), per second over the window."""

    kind = "port_reuse"
    offender_kinds = ("port_reuse",)

    def values(self, counts) -> dict:
        return dict(counts.port_reuse, total=sum(counts.port_reuse.values()))

    def judge(self, sample: Sample) -> Verdict:
        rate = self.window.rate("total")
        c = self.cfg
        by_role = {role: int(self.window.delta(role)) for role in sample.counts.port_reuse}
        details = {"rate_per_second": _round(rate), "by_role": by_role,
                   "reuse_within_seconds": c["reuse_within_seconds"]}
        breach = c["rate"] > 0 and rate >= c["rate"]
        roles = ", ".join(f"{n} as {role}" for role, n in by_role.items())
        summary = (f"Port reuse at {rate:.1f}/s over {self.window.span():.0f} s "
                   f"({'over' if breach else 'under'} {c['rate']:g}/s): new SYNs on a 4-tuple whose last "
                   f"connection ended less than {c['reuse_within_seconds']:g} s before ({roles})")
        return Verdict(breach, rate, c["rate"], summary, details)


class ResetAfterHandshake(CounterDetector):
    """Connections reset within within_seconds of becoming ESTABLISHED (counted in the kernel, once
    per connection). The middlebox signature is a reset received on a connection this host made:
    those per second above rate, or as a fraction of the connections it made once there are
    min_connections. Resets this host sent (any role) above sent_rate. Resets received by a
    server (clients aborting, e.g. health checks) are reported, never fired on."""

    kind = "reset_after_handshake"
    offender_kinds = ("reset_after_handshake",)

    def values(self, counts) -> dict:
        early = counts.resets_after_handshake  # (direction, role) -> n
        values = {f"{d}:{r}": n for (d, r), n in early.items()}
        values["sent"] = sum(n for (d, _), n in early.items() if d == "sent")
        values["opened"] = counts.opened.get("active", 0)
        return values

    def judge(self, sample: Sample) -> Verdict:
        received, sent = self.window.rate("received:client"), self.window.rate("sent")
        c = self.cfg
        n_received, opened = self.window.delta("received:client"), self.window.delta("opened")
        fraction = n_received / opened if opened else 0.0
        span = self.window.span()
        within = f"within {c['within_seconds']:g} s of the handshake"
        details = {"rate_per_second": {"received": _round(received), "sent": _round(sent)},
                   "by_direction_and_role": {f"{d}:{r}": int(self.window.delta(f"{d}:{r}"))
                                             for d, r in sorted(sample.counts.resets_after_handshake)},
                   "connections_made": int(opened), "within_seconds": c["within_seconds"]}
        if c["rate"] > 0 and received >= c["rate"]:
            return Verdict(True, received, c["rate"], f"Connections reset by the peer {within} at {received:.1f}/s "
                           f"over {span:.0f} s (over {c['rate']:g}/s)", details)
        if c["fraction"] > 0 and opened >= c["min_connections"] and fraction >= c["fraction"]:
            return Verdict(True, fraction, c["fraction"], f"{fraction:.0%} of {int(opened)} connections made were reset "
                           f"by the peer {within} over {span:.0f} s (over {c['fraction']:.0%})", details)
        if c["sent_rate"] > 0 and sent >= c["sent_rate"]:
            return Verdict(True, sent, c["sent_rate"], f"Connections reset by this host {within} at {sent:.1f}/s "
                           f"over {span:.0f} s (over {c['sent_rate']:g}/s)", details)
        return Verdict(False, received, c["rate"], f"Connections reset by the peer {within} at {received:.1f}/s "
                       f"(under {c['rate']:g}/s)", details)


DETECTORS = {cls.kind: cls for cls in (RstStorm, TimeWaitBuildup, ConnectFailures, PortReuse, ResetAfterHandshake)}


def build(cfg: dict) -> list[Detector]:
    """The enabled detectors of a config from config.load_detector_config()."""
    return [cls(cfg[kind]) for kind, cls in DETECTORS.items() if cfg[kind]["enabled"]]


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
        self.interval = interval
        self._clock = clock or time.time
        self._thread = None
        self._stop = None
        self._lock = threading.Lock()  # a reload swaps detectors between ticks, never during one
        self._fired_before: dict = {}  # kind -> firings of detectors a reload replaced

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

    def fired(self) -> dict:
        with self._lock:
            out = dict(self._fired_before)
            for d in self.detectors:
                out[d.kind] = out.get(d.kind, 0) + d.fired
            return out

    def active(self) -> dict:
        with self._lock:
            return {d.kind: d.active for d in self.detectors}

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
            self.interval = anomaly_cfg["interval_seconds"]
            self.top_offenders = anomaly_cfg["top_offenders"]
        self._emit(stepped)
        return changed

    def start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="anomaly", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except Exception:  # a bug must not silently end detection
                log.exception("anomaly tick failed")
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=5)
