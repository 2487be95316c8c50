"""Anomaly detectors on synthetic counter series: fire once, stay quiet below threshold, resolve after hold-down, learn a baseline."""

import json

import pytest

from monitor.detect.config import load_detector_config
from monitor.detect.detectors import (
    DETECTORS,
    ConnectFailures,
    PortReuse,
    ResetAfterHandshake,
    RstStorm,
    TimeWaitBuildup,
    build,
)
from monitor.detect.engine import Engine
from monitor.detect.event import Event, Sample
from monitor.detect.window import Window
from monitor.kernel.counters import Counts
from monitor.sockets.forecast import forecast
from monitor.sockets.kstats import Limits
from monitor.sockets.poller import EndpointStat, NamespaceState

T0 = 1_800_000_000.0


def cfg(kind, **over):
    c = load_detector_config()[kind]
    c.update(over)
    return c


def counts(sent=0, received=0, failures=None, attempts=0):
    c = Counts()
    if sent:
        c.resets[("sent", "NONE", "NO_SOCKET")] = sent
    if received:
        c.resets[("received", "SYN_SENT", "UNKNOWN")] = received
    c.failures = dict(failures or {"refused": 0, "timeout": 0, "reset": 0, "other": 0})
    c.transitions[("CLOSE", "SYN_SENT")] = attempts
    return c


def run_series(detector, rates, start=0, step=1.0, sent0=0):
    """Feed per-tick reset increments (sent) one second apart; return [(t, event)]."""
    out, total = [], sent0
    for i, inc in enumerate(rates):
        total += inc
        t = T0 + (start + i) * step
        e = detector.step(Sample(t, counts(sent=total)))
        if e:
            out.append((t - T0, e))
    return out


# --- Window ---------------------------------------------------------------------------------------

def test_window_rate_covers_the_window():
    w = Window(10)
    for i in range(30):
        w.add(T0 + i, {"n": 5 * i})
    assert w.span() == 10 and w.rate("n") == 5.0 and w.delta("n") == 50


def test_window_of_a_gauge_keeps_going_when_it_falls():
    w = Window(10, counters=False)
    for i, v in enumerate((100, 110, 90, 70)):
        w.add(T0 + i, {"tw": v})
    assert w.rate("tw") == -10.0 and len(w.samples) == 4


def test_window_restarts_when_a_counter_goes_back():
    w = Window(10)
    w.add(T0, {"n": 100})
    w.add(T0 + 1, {"n": 110})
    w.add(T0 + 2, {"n": 3})
    assert w.rate("n") is None
    w.add(T0 + 3, {"n": 5})
    assert w.rate("n") == 2.0


# --- rst_storm ------------------------------------------------------------------------------------

def test_rst_storm_fires_once_and_resolves_after_hold_down():
    d = RstStorm(cfg("rst_storm", window_seconds=5.0, rate=100.0, hold_down_seconds=10.0, baseline_factor=0.0))
    # 20 s quiet (1/s), 10 s storm (500/s), then quiet: the 5 s window last holds the
    # storm's final second at t=33, so the condition is clear from t=34 and resolves 10 s later.
    events = run_series(d, [1] * 20 + [500] * 10 + [1] * 40)
    assert [(e.status, t) for t, e in events] == [("firing", 20.0), ("resolved", 34.0 + 10.0)]
    firing = events[0][1]
    assert firing.kind == "rst_storm" and firing.severity == "critical" and firing.threshold == 100.0
    assert firing.value >= 100 and firing.window_seconds == 5.0
    assert firing.details["top_causes"][0] == {"direction": "sent", "state": "NONE", "reason": "NO_SOCKET",
                                               "resets": firing.details["top_causes"][0]["resets"]}
    assert "sent in NONE (NO_SOCKET)" in firing.summary
    resolved = events[1][1]
    assert resolved.details["peak"] == 500.0 and resolved.summary.startswith("Resolved: ")
    assert d.fired == 1 and not d.active


def test_rst_storm_quiet_below_threshold():
    d = RstStorm(cfg("rst_storm", window_seconds=5.0, rate=100.0, baseline_factor=0.0))
    assert run_series(d, [99] * 60) == []


def test_rst_storm_stays_firing_through_a_short_lull():
    d = RstStorm(cfg("rst_storm", window_seconds=2.0, rate=100.0, hold_down_seconds=10.0, baseline_factor=0.0))
    events = run_series(d, [500] * 10 + [0] * 5 + [500] * 10 + [0] * 30)
    assert [e.status for _, e in events] == ["firing", "resolved"]


def test_rst_storm_per_direction_threshold():
    d = RstStorm(cfg("rst_storm", window_seconds=5.0, rate=0.0, received_rate=10.0, baseline_factor=0.0))
    total_r = 0
    fired = []
    for i in range(20):
        total_r += 20 if i >= 10 else 0
        e = d.step(Sample(T0 + i, counts(sent=1000 * i, received=total_r)))  # sent is not watched
        if e:
            fired.append((i, e))
    # 20 received/s: the 5 s window averages 4/s at i=10, 8/s at 11, 12/s at 12
    assert [(i, e.status) for i, e in fired] == [(12, "firing")]
    assert fired[0][1].summary.startswith("Received resets at ")


def test_rst_storm_learns_a_baseline_then_fires_on_a_multiple():
    c = cfg("rst_storm", window_seconds=5.0, rate=0.0, baseline_factor=5.0, baseline_min_rate=10.0,
            baseline_warmup_seconds=60.0, hold_down_seconds=5.0)
    d = RstStorm(c)
    # 120 s at 20/s: learned.
    assert run_series(d, [20] * 120) == [] and d.baseline == pytest.approx(20)
    # 60/s (3x) is quiet, though the baseline drifts up toward it (to ~26 after 10 s).
    assert run_series(d, [60] * 10, start=120, sent0=20 * 120) == []
    assert 20 < d.baseline < 30
    # 250/s (about 9x) fires once the window's average passes 5x, and resolves after.
    events = run_series(d, [250] * 10 + [20] * 30, start=130, sent0=20 * 120 + 600)
    assert [e.status for _, e in events] == ["firing", "resolved"]
    firing = events[0][1]
    assert firing.threshold == pytest.approx(5 * firing.details["baseline_per_second"], rel=0.01)
    assert "baseline" in firing.summary


def test_rst_storm_baseline_not_used_during_warm_up():
    d = RstStorm(cfg("rst_storm", window_seconds=5.0, rate=0.0, baseline_factor=5.0, baseline_min_rate=1.0,
                     baseline_warmup_seconds=300.0))
    assert run_series(d, [1] * 30 + [100] * 10) == []  # 100x, but not learned yet


def test_rst_storm_baseline_min_rate_guards_a_tiny_baseline():
    d = RstStorm(cfg("rst_storm", window_seconds=5.0, rate=0.0, baseline_factor=5.0, baseline_min_rate=50.0,
                     baseline_warmup_seconds=10.0))
    assert run_series(d, [0] * 60 + [20] * 20) == []  # infinitely many times 0, but under 50/s


def test_rst_storm_needs_counts():
    d = RstStorm(cfg("rst_storm"))
    assert d.step(Sample(T0, None)) is None and d.step(Sample(T0 + 1, None)) is None


# --- connect_failures -----------------------------------------------------------------------------

def fail_counts(refused, attempts):
    return counts(failures={"refused": refused, "timeout": 0, "reset": 0, "other": 0}, attempts=attempts)


def test_connect_failures_rate():
    d = ConnectFailures(cfg("connect_failures", window_seconds=5.0, rate=10.0, fraction=0.0, hold_down_seconds=3.0))
    events, refused = [], 0
    for i in range(40):
        refused += 50 if 10 <= i < 20 else 0
        e = d.step(Sample(T0 + i, fail_counts(refused, 1000 + 10 * i + refused)))
        if e:
            events.append((i, e))
    # the 5 s window last holds a failure at i=23: clear from 24, resolved 3 s later
    assert [(i, e.status) for i, e in events] == [(10, "firing"), (27, "resolved")]
    e = events[0][1]
    assert e.details["by_reason"] == {"refused": 50} and "50 refused" in e.summary


def test_connect_failures_say_how_many_syns_went_out():
    """Connects timing out after 6 SYNs each (a silent drop), beside refused ones after one."""
    d = ConnectFailures(cfg("connect_failures", window_seconds=5.0, rate=1.0, fraction=0.0))
    fired = []
    for i in range(6):
        c = counts(failures={"refused": 2 * i, "timeout": 3 * i, "reset": 0, "other": 0}, attempts=10 * i)
        c.failed_connect_syns = 2 * i + 18 * i
        c.syn_retransmits = {"client": 15 * i + 4 * i, "server": 7}  # 4 more re-sent by connects that worked
        fired += [e for e in [d.step(Sample(T0 + i, c))] if e]
    (e,) = fired
    assert e.details["by_reason"] == {"timeout": 3, "refused": 2}
    assert (e.details["syns_sent"], e.details["syn_retransmits"]) == (20, 19)
    assert e.summary.endswith("3 timeout, 2 refused after 20 SYNs")


def test_connect_failures_without_syn_counts():
    """A kernel that cannot count the SYNs says null, not 0."""
    d = ConnectFailures(cfg("connect_failures", window_seconds=5.0, rate=1.0, fraction=0.0))
    fired = [e for i in range(6) if (e := d.step(Sample(T0 + i, fail_counts(5 * i, 5 * i))))]
    assert fired[0].details["syns_sent"] is None and fired[0].details["syn_retransmits"] is None
    assert "SYNs" not in fired[0].summary


def test_connect_failures_fraction_needs_min_attempts():
    d = ConnectFailures(cfg("connect_failures", window_seconds=10.0, rate=0.0, fraction=0.5, min_attempts=10))
    # 6 attempts, all failed: a fraction of 1, but too few to judge
    assert all(d.step(Sample(T0 + i, fail_counts(i, i))) is None for i in range(7))
    d = ConnectFailures(cfg("connect_failures", window_seconds=10.0, rate=0.0, fraction=0.5, min_attempts=10))
    fired = [e for i in range(20) if (e := d.step(Sample(T0 + i, fail_counts(i, 2 * i))))]
    assert [e.status for e in fired] == ["firing"] and fired[0].value == 0.5


def test_connect_failures_quiet_below():
    d = ConnectFailures(cfg("connect_failures", window_seconds=5.0, rate=10.0, fraction=0.5))
    assert all(d.step(Sample(T0 + i, fail_counts(9 * i, 100 * i))) is None for i in range(30))


# --- time_wait_buildup ----------------------------------------------------------------------------

LIMITS = Limits(time_wait_max=1000, port_first=40000, port_last=40999)


def ns_state(tw, finished, endpoints=(), ports=()):
    sockets = {"TIME_WAIT": tw, "ESTABLISHED": 3}
    return NamespaceState("", sockets, tuple(ports), LIMITS, {}, tuple(endpoints), 0.01, 0.01, finished)


def test_time_wait_fraction_of_the_limit():
    d = TimeWaitBuildup(cfg("time_wait_buildup", fraction=0.5, utilization=0.0, hold_down_seconds=10.0))
    series = [100, 300, 499, 500, 700, 600, 400, 400, 400, 400]
    events = []
    for i, tw in enumerate(series):
        for k in range(5):  # the detector ticks 5 times per poll
            t = T0 + 5 * i + k
            e = d.step(Sample(t, None, {"": ns_state(tw, T0 + 5 * i)}))
            if e:
                events.append((t - T0, e))
    assert [(t, e.status) for t, e in events] == [(15.0, "firing"), (40.0, "resolved")]
    e = events[0][1]
    assert e.value == 0.5 and e.threshold == 0.5 and e.details["netns"] == ""
    assert "500 TIME_WAIT sockets in the host's namespace, 50% of tcp_max_tw_buckets (1000)" in e.summary


def test_time_wait_event_names_the_busiest_ports():
    d = TimeWaitBuildup(cfg("time_wait_buildup", fraction=0.5, utilization=0.0))
    # As statepoll.top_ports lists them: busiest first, ties by lower port, then "other".
    ports = [("local", "8080", 400), ("local", "443", 90), ("local", "other", 10),
             ("remote", "80", 250), ("remote", "5432", 250), ("remote", "other", 0)]
    e = d.step(Sample(T0, None, {"": ns_state(500, T0, ports=ports)}))
    assert e.status == "firing"
    assert e.details["namespaces"][""]["top_time_wait_ports"] == [
        {"side": "local", "port": 8080, "time_wait": 400}, {"side": "local", "port": 443, "time_wait": 90},
        {"side": "remote", "port": 80, "time_wait": 250}, {"side": "remote", "port": 5432, "time_wait": 250}]


def test_time_wait_count_and_growth():
    d = TimeWaitBuildup(cfg("time_wait_buildup", count=0, fraction=0.0, utilization=0.0, growth_rate=20.0,
                            window_seconds=10.0))
    fired = []
    for i in range(12):
        tw = 10 * i if i < 6 else 60 + 50 * (i - 5)  # 10/s, then 50/s
        e = d.step(Sample(T0 + i, None, {"blue": ns_state(tw, T0 + i)}))
        if e:
            fired.append((i, e))
    assert [(i, e.status) for i, e in fired] == [(7, "firing")]
    assert fired[0][1].details["netns"] == "blue" and "namespace 'blue' growing" in fired[0][1].summary
    d = TimeWaitBuildup(cfg("time_wait_buildup", count=800, fraction=0.0, utilization=0.0))
    assert d.step(Sample(T0, None, {"": ns_state(799, T0)})) is None
    assert d.step(Sample(T0 + 1, None, {"": ns_state(800, T0 + 1)})).status == "firing"


def test_time_wait_forecast_utilization():
    fc = forecast(1000, 200, 50, 15.0)  # demand 950: utilization 0.95
    ep = EndpointStat("198.18.0.2:80", 200, 50, 15.0, fc)
    d = TimeWaitBuildup(cfg("time_wait_buildup", fraction=0.0, utilization=0.9))
    e = d.step(Sample(T0, None, {"": ns_state(250, T0, [ep])}))
    assert e.status == "firing" and e.value == pytest.approx(0.95) and e.details["remote"] == "198.18.0.2:80"
    assert "ephemeral ports to 198.18.0.2:80" in e.summary


# --- events and the engine ------------------------------------------------------------------------

def test_event_json_schema():
    e = Event(T0 + 0.25, "rst_storm", "firing", "critical", "Resets at 500/s", 500.123456, 100.0, 10.0,
              {"top_causes": []})
    obj = json.loads(e.to_json())
    assert list(obj) == ["time", "kind", "status", "severity", "summary", "value", "threshold", "window_seconds",
                         "details"]
    assert obj["time"] == "2027-01-15T08:00:00.250Z" and obj["value"] == 500.123
    assert "\n" not in e.to_json()


def test_engine_sends_events_to_every_sink_and_survives_a_bad_one():
    got = []

    def bad(_event):
        raise RuntimeError("sink down")

    det = RstStorm(cfg("rst_storm", window_seconds=2.0, rate=10.0, baseline_factor=0.0))
    series = iter([counts(sent=n) for n in (0, 100, 200, 300)])
    clock = iter([T0, T0 + 1, T0 + 2, T0 + 3])
    eng = Engine([det], lambda: next(series), lambda: {}, [bad, got.append], 1.0, clock=lambda: next(clock))
    assert eng.tick() == []
    fired = eng.tick()
    assert [e.status for e in fired] == ["firing"] and got == fired
    assert eng.fired() == {"rst_storm": 1} and eng.active() == {"rst_storm": True}


def test_engine_counts_unreadable():
    det = RstStorm(cfg("rst_storm"))

    def broken():
        raise OSError("map gone")

    eng = Engine([det], broken, lambda: {}, [], 1.0, clock=lambda: T0)
    assert eng.tick() == []


def firing_engine(config):
    """An engine on a real config whose rst_storm fires at once: 100 resets/s against rate 10."""
    got, clock = [], [T0]
    total = [0]

    def read():
        total[0] += 100
        return counts(sent=total[0])

    eng = Engine(build(config), read, lambda: {}, [got.append], 1.0, clock=lambda: clock[0])
    for _ in range(3):
        eng.tick()
        clock[0] += 1
    assert eng.active()["rst_storm"] and [e.status for e in got] == ["firing"]
    return eng, got, clock


def test_reload_keeps_the_state_of_unchanged_detectors():
    base = load_detector_config(overrides=("rst_storm.rate=10", "rst_storm.baseline_factor=0"))
    eng, got, _ = firing_engine(base)
    kept = {d.kind: d for d in eng.detectors}
    changed = eng.reconfigure(load_detector_config(overrides=("rst_storm.rate=10", "rst_storm.baseline_factor=0",
                                                              "connect_failures.rate=99")))
    assert changed == ["connect_failures"]
    assert eng.active()["rst_storm"] and got[1:] == []  # still firing: no event, same object
    assert next(d for d in eng.detectors if d.kind == "rst_storm") is kept["rst_storm"]
    assert next(d for d in eng.detectors if d.kind == "connect_failures").cfg["rate"] == 99


def test_reload_resolves_a_firing_detector_it_replaces_and_keeps_its_count():
    base = load_detector_config(overrides=("rst_storm.rate=10", "rst_storm.baseline_factor=0"))
    eng, got, clock = firing_engine(base)
    changed = eng.reconfigure(load_detector_config(overrides=("rst_storm.rate=1000", "rst_storm.baseline_factor=0",
                                                              "anomaly.top_offenders=2")))
    assert changed == ["rst_storm", "anomaly"] and eng.top_offenders == 2
    ended = got[1]
    assert (ended.kind, ended.status, ended.details["reason"]) == ("rst_storm", "resolved", "config_reconfigured")
    assert eng.active()["rst_storm"] is False
    assert eng.fired()["rst_storm"] == 1  # a counter: the replaced detector's firing stays counted
    eng.tick()  # 100/s is under the new rate: no new firing
    assert got[2:] == [] and eng.fired()["rst_storm"] == 1


def test_a_reloaded_detector_keeps_the_counts_seen_so_far():
    """A burst between a reload and the next tick still counts: the window is carried over."""
    series = iter([counts(sent=0), counts(sent=500)])
    clock = [T0]
    got = []
    quiet = load_detector_config(overrides=("rst_storm.rate=100000", "rst_storm.baseline_factor=0"))
    eng = Engine(build(quiet), lambda: next(series), lambda: {}, [got.append], 1.0, clock=lambda: clock[0])
    eng.tick()
    eng.reconfigure(load_detector_config(overrides=("rst_storm.rate=5", "rst_storm.baseline_factor=0")))
    clock[0] += 1
    eng.tick()
    assert [(e.kind, e.status) for e in got] == [("rst_storm", "firing")]


def test_reload_that_disables_a_firing_detector_ends_it():
    base = load_detector_config(overrides=("rst_storm.rate=10", "rst_storm.baseline_factor=0"))
    eng, got, _ = firing_engine(base)
    eng.reconfigure(load_detector_config(overrides=("rst_storm.enabled=false",)))
    assert got[1].details["reason"] == "config_disabled"
    assert "rst_storm" not in eng.active() and eng.fired()["rst_storm"] == 1


def test_build_honours_enabled():
    c = load_detector_config(overrides=("rst_storm.enabled=false",))
    assert [d.kind for d in build(c)] == ["time_wait_buildup", "connect_failures", "port_reuse",
                                                  "reset_after_handshake"]


def test_anomaly_metrics():
    from prometheus_client import CollectorRegistry, generate_latest

    from monitor.serve.collectors.anomalies import AnomalyCollector

    class Hook:
        sent, failed, dropped = 4, 1, 2

    reg = CollectorRegistry(auto_describe=False)
    reg.register(AnomalyCollector(list(DETECTORS), lambda: {"rst_storm": 3}, lambda: {"rst_storm": True},
                                  Hook()))
    assert reg.get_sample_value("tcpstate_anomalies_total", {"kind": "rst_storm"}) == 3
    assert reg.get_sample_value("tcpstate_anomalies_total", {"kind": "connect_failures"}) == 0
    assert reg.get_sample_value("tcpstate_anomaly_active", {"kind": "rst_storm"}) == 1
    assert reg.get_sample_value("tcpstate_anomaly_active", {"kind": "time_wait_buildup"}) == 0
    assert reg.get_sample_value("tcpstate_anomaly_webhook_events_total", {"result": "dropped"}) == 2
    text = generate_latest(reg).decode()
    assert '# TYPE tcpstate_anomaly_active gauge\ntcpstate_anomaly_active{kind="rst_storm"} 1.0\n' in text


# --- port_reuse and reset_after_handshake ---------------------------------------------------------

def reuse_counts(client, server=0):
    c = Counts()
    c.port_reuse = {"client": client, "server": server}
    return c


def test_port_reuse_fires_once_and_resolves():
    d = PortReuse(cfg("port_reuse", window_seconds=10.0, hold_down_seconds=5.0, rate=2.0))
    total, out = 0, []
    for i, inc in enumerate([0] * 10 + [5] * 10 + [0] * 30):  # 5 reuses/s for 10 s
        total += inc
        e = d.step(Sample(T0 + i, reuse_counts(total, total)))
        if e:
            out.append((i, e))
    # 10 reuses per step (5 per role) from i=10: the 10 s window holds 20 of them (2/s) at i=11.
    # The last ones come at i=19; from i=28 the window holds only those (1/s): clear, and
    # resolved after the 5 s hold-down.
    assert [(i, e.status) for i, e in out] == [(11, "firing"), (28 + 5, "resolved")]
    fire = out[0][1]
    assert (fire.kind, fire.severity, fire.value, fire.threshold) == ("port_reuse", "warning", 2.0, 2.0)
    assert fire.details["by_role"] == {"client": 10, "server": 10}
    assert "less than 60 s before (10 as client, 10 as server)" in fire.summary
    assert out[1][1].details["peak"] == 10.0  # the window full of the burst


def test_port_reuse_quiet_below_the_rate():
    d = PortReuse(cfg("port_reuse", window_seconds=10.0, rate=2.0))
    assert all(d.step(Sample(T0 + i, reuse_counts(i))) is None for i in range(60))  # 1/s
    assert not d.active


def early_counts(received, opened, sent=0, received_by_server=0):
    c = Counts()
    c.resets_after_handshake = {("sent", "client"): sent, ("sent", "server"): 0,
                                ("received", "client"): received, ("received", "server"): received_by_server}
    c.opened = {"active": opened, "passive": 5 * opened}  # accepted connections are not the denominator
    return c


def run_early(d, series):
    out = []
    for i, (received, opened, sent, *by_server) in enumerate(series):
        e = d.step(Sample(T0 + i, early_counts(received, opened, sent, *by_server)))
        if e:
            out.append((i, e))
    return out


def test_reset_after_handshake_rate():
    d = ResetAfterHandshake(cfg("reset_after_handshake", window_seconds=5.0, hold_down_seconds=3.0,
                                        rate=2.0, fraction=0.0))
    series = [(3 * i, 100 * i, 0) for i in range(10)] + [(27, 100 * i, 0) for i in range(10, 30)]
    out = run_early(d, series)
    # 3/s until i=9; at i=11 the 5 s window holds 9 (1.8/s): clear, resolved 3 s later.
    assert [(i, e.status) for i, e in out] == [(1, "firing"), (11 + 3, "resolved")]
    fire = out[0][1]
    assert fire.value == 3.0 and fire.threshold == 2.0
    assert fire.summary.startswith("Connections reset by the peer within 1 s of the handshake at 3.0/s")


def test_reset_after_handshake_fraction_needs_min_connections():
    c = cfg("reset_after_handshake", window_seconds=10.0, rate=0.0, fraction=0.5, min_connections=20)
    # Every connection reset, but only 1 per second: 10 in the window, under min_connections.
    d = ResetAfterHandshake(c)
    assert run_early(d, [(i, i, 0) for i in range(30)]) == []
    # Twice as many connections, 60% reset: fires once the window holds 20 of them.
    d = ResetAfterHandshake(c)
    out = run_early(d, [(int(1.2 * i), 2 * i, 0) for i in range(30)])
    (i, fire), = out
    assert i == 10 and fire.value == 0.6 and fire.threshold == 0.5
    assert fire.summary.startswith("60% of 20 connections made were reset by the peer within 1 s of the handshake")
    assert fire.details["connections_made"] == 20
    assert fire.details["by_direction_and_role"] == {"received:client": 12, "received:server": 0, "sent:client": 0,
                                                     "sent:server": 0}


def test_reset_after_handshake_ignores_clients_aborting_on_this_server():
    # Health checks connecting and resetting at once: received early, but by the server end.
    d = ResetAfterHandshake(cfg("reset_after_handshake", window_seconds=5.0))
    assert run_early(d, [(0, i, 0, 50 * i) for i in range(20)]) == []
    assert not d.active


def test_reset_after_handshake_sent_only_with_sent_rate():
    series = [(0, 10 * i, 5 * i) for i in range(20)]  # this host aborts 5 connections/s right away
    assert run_early(ResetAfterHandshake(cfg("reset_after_handshake")), series) == []
    out = run_early(ResetAfterHandshake(cfg("reset_after_handshake", sent_rate=4.0)), series)
    assert [e.status for _, e in out] == ["firing"]
    assert out[0][1].summary.startswith("Connections reset by this host within 1 s of the handshake at 5.0/s")


# --- top offenders in events ------------------------------------------------------------------------

from monitor.kernel.offenders import Peer  # noqa: E402


def peer(kind, remote, count, last, remote_port=None, local_port=None, pid=None, comm=None):
    return Peer(kind, remote, remote_port, local_port, count, T0 - 100, last, pid, comm)


PEERS = [
    peer("reset_sent", "198.18.0.1", 300, T0 + 2, local_port=9),
    peer("reset_received", "198.18.0.2", 300, T0 + 2, remote_port=9, pid=42, comm="curl"),
    peer("reset_sent", "198.18.0.7", 5000, T0 - 50, local_port=22),  # a big storm, long over
    peer("reset_sent", "198.18.0.5", 7, T0 + 1, local_port=80),
    peer("connect_failure", "198.18.0.2", 300, T0 + 2, remote_port=9, pid=42, comm="curl"),
]


def storm_engine(peers_fn, n=5):
    det = RstStorm(cfg("rst_storm", window_seconds=2.0, rate=10.0, baseline_factor=0.0, hold_down_seconds=1.0))
    series = iter([counts(sent=n) for n in (0, 300, 600, 600, 600, 600, 600)])
    clock = iter([T0 + i for i in range(7)])
    return Engine([det], lambda: next(series), lambda: {}, [], 1.0, clock=lambda: next(clock),
                  read_offenders=peers_fn, top_offenders=n)


def test_events_carry_the_top_offenders_of_their_window_and_kinds():
    eng = storm_engine(lambda: PEERS)
    eng.tick()
    (fire,) = eng.tick()
    top = fire.details["top_offenders"]
    # Reset peers only (not the failed connects), seen within the window, most counted first.
    assert [(p["kind"], p["remote"], p["count"]) for p in top] == [
        ("reset_sent", "198.18.0.1", 300), ("reset_received", "198.18.0.2", 300), ("reset_sent", "198.18.0.5", 7)]
    assert top[0] == {"kind": "reset_sent", "remote": "198.18.0.1", "remote_port": None, "local_port": 9,
                      "count": 300, "first_seen": "2027-01-15T07:58:20.000Z", "last_seen": "2027-01-15T08:00:02.000Z",
                      "pid": None, "comm": None}
    assert fire.summary.endswith("; top peer: 198.18.0.1 to local port 9 (300 reset sent)")
    json.loads(fire.to_json())


def test_resolved_event_names_the_offenders_since_it_fired():
    eng = storm_engine(lambda: PEERS, n=1)
    events = [e for _ in range(7) for e in eng.tick()]
    assert [e.status for e in events] == ["firing", "resolved"]
    assert [p["remote"] for p in events[1].details["top_offenders"]] == ["198.18.0.1"]


def test_offenders_unreadable_still_sends_the_event():
    def broken():
        raise OSError("map gone")

    eng = storm_engine(broken)
    eng.tick()
    (fire,) = eng.tick()
    assert fire.details["top_offenders"] is None and "top peer" not in fire.summary


def test_every_offender_kind_event_has_the_key():
    det = ConnectFailures(cfg("connect_failures", window_seconds=2.0, rate=1.0))
    series = iter([fail_counts(n, n) for n in (0, 50, 100)])
    eng = Engine([det], lambda: next(series), lambda: {}, [], 1.0, clock=iter([T0, T0 + 1, T0 + 2]).__next__,
                 read_offenders=lambda: PEERS, top_offenders=0)
    eng.tick()
    (fire,) = eng.tick()
    assert fire.details["top_offenders"] == []  # turned off: empty, not missing


def test_listener_resets_have_no_peer():
    from monitor.kernel.abi import Offender, OffenderKey
    from monitor.kernel.offenders import decode
    from monitor.timing import WallClock

    k, v = OffenderKey(family=2, lport=80, kind=0), Offender(count=7, first_ns=10**9, last_ns=2 * 10**9, pid=9,
                                                             comm=b"nginx")
    (p,) = decode([(k, v)], WallClock(wall_ns=round(T0 * 1e9), mono_ns=3 * 10**9))
    assert p.remote is None and p.as_dict()["remote"] is None
    assert p.last_seen == T0 - 1 and p.first_seen == T0 - 2
    assert p.describe() == "nginx (pid 9) to an unknown peer from local port 80 (7 reset sent)"


def test_offender_descriptions():
    assert PEERS[1].describe() == "curl (pid 42) to 198.18.0.2:9 (300 reset received)"
    p = peer("port_reuse", "2001:db8::1", 3, T0, remote_port=443, local_port=40000, pid=7, comm="app")
    assert p.describe() == "app (pid 7) to [2001:db8::1]:443 from local port 40000 (3 port reuse)"
    assert peer("port_reuse", "198.18.0.1", 2, T0, remote_port=40000, local_port=80).describe() == \
        "198.18.0.1:40000 to local port 80 (2 port reuse)"
