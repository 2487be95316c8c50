"""detectors.py: the anomaly detectors: RST storms, TIME_WAIT buildup, connect failures, port reuse, resets right after the handshake."""

from __future__ import annotations

from monitor.detect.event import Event, Sample, Verdict, _round
from monitor.detect.window import Window


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
