"""The socket-table gauges: statepoll.summarize on hand-made tallies, exported by SocketCollector."""

import shutil
import socket
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from monitor.serve.collectors.sockets import SocketCollector
from monitor.sockets.forecast import PortForecast, forecast
from monitor.sockets.kstats import KERNEL_COUNTERS, Limits
from monitor.sockets.poller import REPORTED_STATES, Target, summarize, top_ports
from monitor.tcp import NUMBERS

from .tally_reference import Reference

AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
NOW = 1_700_000_100.0


def v4(text):
    return socket.inet_pton(AF_INET, text)


V6 = socket.inet_pton(AF_INET6, "2001:db8::1")
WEB = (AF_INET, v4("198.18.0.2"), 80)
WEB6 = (AF_INET6, V6, 443)
WEB3 = (AF_INET, v4("198.18.0.3"), 80)
DB = (AF_INET, v4("198.18.0.9"), 5432)
CACHE = (AF_INET, v4("10.1.0.5"), 6379)
CACHE2 = (AF_INET, v4("10.1.0.6"), 6379)

LIMITS = Limits(131072, 32768, 60999)  # P = 28232, none reserved
# 100 ports in the range, 20 of them reserved: the forecast has P = 80, the gauge says 100.
BLUE_LIMITS = Limits(4096, 40000, 40099, reserved=20)
KERNEL = {m: i * 10 for i, (*_, m, _doc) in enumerate(KERNEL_COUNTERS)}
WINDOW = 30.0  # seconds: a rate is remote_recent / 30

# Own namespace, as a client of WEB, WEB6, WEB3 and DB and a server on 80/443/8080:
#   endpoint  TIME_WAIT W  recent R  other O   rate R/30
#   WEB           18000     15000       50      500/s
#   WEB6             40        30        0        1/s
#   WEB3              5         0        0        0/s  (all entered before the window)
#   DB                0         0       50        0/s
CLIENT_TW = {WEB: 18000, WEB6: 40, WEB3: 5}
SERVER_TW = 220  # local ports 80/443/8080, remote ports 33000..33003
OWN_TW = SERVER_TW + sum(CLIENT_TW.values())  # 18265


def own_tally():
    # Every TIME_WAIT socket has one local and one remote port: each side adds up to OWN_TW.
    t = Reference(recent_ms=30_000)
    t.states.update({NUMBERS["ESTABLISHED"]: 55, NUMBERS["TIME_WAIT"]: OWN_TW, NUMBERS["LISTEN"]: 3,
                     NUMBERS["NEW_SYN_RECV"]: 1, NUMBERS["CLOSE_WAIT"]: 25})
    t.tw_local.update({80: 150, 443: 50, 8080: 20})
    t.tw_local.update({32768 + i: 1 for i in range(sum(CLIENT_TW.values()))})  # one ephemeral port each
    t.tw_remote.update({80: 18005, 443: 40, 33000: 100, 33001: 60, 33002: 40, 33003: 20})
    t.remote_time_wait.update(CLIENT_TW)
    t.remote_recent.update({WEB: 15000, WEB6: 30})
    t.remote_other.update({WEB: 50, DB: 50})
    return t


def blue_tally():
    # CACHE: W = 20, R = 15 (0.5/s), O = 50; CACHE2: W = 5, none recent.
    t = Reference(recent_ms=30_000)
    t.states.update({NUMBERS["ESTABLISHED"]: 70, NUMBERS["TIME_WAIT"]: 25})
    t.tw_local.update({40000 + i: 1 for i in range(25)})  # all tied
    t.tw_remote.update({6379: 25})
    t.remote_time_wait.update({CACHE: 20, CACHE2: 5})
    t.remote_recent.update({CACHE: 15})
    t.remote_other.update({CACHE: 50})
    return t


def own_state(top_n=2):
    return summarize(Target.own(), own_tally(), LIMITS, KERNEL, WINDOW, top_n,
                     duration=0.004, cpu=0.003, finished=NOW - 9.5)


def blue_state():
    kernel = {k: v for k, v in KERNEL.items() if k != "time_wait_reused"}  # an older kernel
    return summarize(Target("blue", "/run/netns/blue"), blue_tally(), BLUE_LIMITS, kernel, WINDOW, 2,
                     duration=0.002, cpu=0.001, finished=NOW - 1.0)


ERRORS = {"": 0, "blue": 3, "gone": 2}


def registry(results=None):
    results = {"": own_state(), "blue": blue_state()} if results is None else results
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SocketCollector(results=lambda: results, errors=lambda: dict(ERRORS), clock=lambda: NOW))
    return reg


# --- top_ports ----------------------------------------------------------------------------------

def tally_with_ports(local=(), remote=()):
    t = Reference()
    t.tw_local.update(dict(local))
    t.tw_remote.update(dict(remote))
    return t


def test_top_ports_then_other():
    got = top_ports("local", tally_with_ports(local={80: 150, 443: 50, 8080: 20}), 2)
    assert got == [("local", "80", 150), ("local", "443", 50), ("local", "other", 20)]


def test_top_ports_ties():
    # Tied ports make the cut lowest port first, so the series do not flap between polls.
    got = top_ports("remote", tally_with_ports(remote={3: 5, 2: 5, 1: 5, 4: 1}), 2)
    assert got == [("remote", "1", 5), ("remote", "2", 5), ("remote", "other", 6)]


def test_top_ports_fewer_than_n():
    assert top_ports("local", tally_with_ports(local={80: 3}), 5) == [("local", "80", 3), ("local", "other", 0)]
    assert top_ports("local", tally_with_ports(), 5) == [("local", "other", 0)]


# --- summarize ----------------------------------------------------------------------------------

def test_summarize_reports_every_state():
    s = own_state()
    assert list(s.sockets) == list(REPORTED_STATES)
    assert len(s.sockets) == 12 and "BOUND_INACTIVE" not in s.sockets
    assert s.sockets["TIME_WAIT"] == 18265 and s.sockets["NEW_SYN_RECV"] == 1 and s.sockets["SYN_SENT"] == 0


def test_summarize_ranks_endpoints_by_in_use_or_demand():
    # In use (W + O) and demand (r*60 + O) per endpoint:
    #   WEB   18050, 500*60 + 50 = 30050
    #   WEB6     40,   1*60 +  0 =    60   <- fewer in use than DB, but more demand
    #   DB       50,   0*60 + 50 =    50
    #   WEB3      5,   0*60 +  0 =     0
    s = own_state(top_n=10)
    assert [e.remote for e in s.endpoints] == ["198.18.0.2:80", "[2001:db8::1]:443", "198.18.0.9:5432",
                                               "198.18.0.3:80"]
    assert [(e.time_wait, e.other) for e in s.endpoints] == [(18000, 50), (40, 0), (0, 50), (5, 0)]
    assert [e.entry_rate for e in s.endpoints] == [500.0, 1.0, 0.0, 0.0]
    assert [e.forecast.demand for e in s.endpoints] == [30050.0, 60.0, 50.0, 0.0]
    assert [e.remote for e in own_state(top_n=2).endpoints] == ["198.18.0.2:80", "[2001:db8::1]:443"]


def test_summarize_rate_is_recent_entries_over_the_window():
    # The same 15000 recent entries are 1500/s over 10 s and 250/s over 60 s.
    for window, rate in ((10.0, 1500.0), (30.0, 500.0), (60.0, 250.0)):
        s = summarize(Target.own(), own_tally(), LIMITS, {}, window, 1, 0.0, 0.0, NOW)
        (web,) = s.endpoints
        assert web.remote == "198.18.0.2:80" and web.entry_rate == rate
        assert web.forecast == forecast(28232, 18000, 50, rate)


def test_summarize_forecasts_from_the_first_poll_without_recent_entries():
    # No entries in the window: rate 0 and a forecast of just the other sockets, not None.
    # Equal in use and demand: ties go by label.
    t = Reference(recent_ms=30_000)
    t.remote_time_wait.update({CACHE2: 5, WEB3: 5, CACHE: 1})
    t.remote_other.update({CACHE: 2})
    s = summarize(Target.own(), t, LIMITS, {}, WINDOW, 2, 0.0, 0.0, NOW)
    assert [(e.remote, e.time_wait, e.other, e.entry_rate) for e in s.endpoints] == [
        ("10.1.0.6:6379", 5, 0, 0.0), ("198.18.0.3:80", 5, 0, 0.0)]
    assert [e.forecast for e in s.endpoints] == [PortForecast(5, 0.0, 0.0, None)] * 2
    s = summarize(Target.own(), t, LIMITS, {}, WINDOW, 3, 0.0, 0.0, NOW)
    assert s.endpoints[2].remote == "10.1.0.5:6379"
    assert s.endpoints[2].forecast == PortForecast(3, 2.0, 2 / 28232, None)


def test_summarize_divides_by_the_usable_ports():
    # CACHE: W = 20, O = 50, r = 15/30 = 0.5/s: demand 0.5*60 + 50 = 80, in use 70.
    #   Over the whole range, P = 100: utilization 0.8, never runs out.
    #   With 20 of the 100 reserved, P = 80: demand reaches P, utilization 1, and
    #   seconds = (80 - 70) / (0.5 - 20/60) = 10 / (1/6) = 60.
    whole = summarize(Target.own(), blue_tally(), Limits(4096, 40000, 40099), {}, WINDOW, 1, 0.0, 0.0, NOW)
    assert whole.endpoints[0].forecast == PortForecast(70, 80.0, 0.8, None)
    reserved = summarize(Target.own(), blue_tally(), BLUE_LIMITS, {}, WINDOW, 1, 0.0, 0.0, NOW)
    fc = reserved.endpoints[0].forecast
    assert (fc.in_use, fc.demand, fc.utilization) == (70, 80.0, 1.0)
    assert fc.seconds_to_exhaustion == pytest.approx(60.0)
    assert reserved.limits.ephemeral_ports == 100 and reserved.limits.usable_ports == 80


@pytest.mark.parametrize("limits", [Limits(4096, 40000, 40099, reserved=100), Limits(4096, 40100, 40099)])
def test_summarize_without_usable_ports_has_no_forecast(limits):
    # Every port reserved, or an empty range: nothing to divide by, so in use and rate only.
    s = summarize(Target.own(), blue_tally(), limits, {}, WINDOW, 2, 0.0, 0.0, NOW)
    assert [(e.remote, e.time_wait + e.other, e.entry_rate, e.forecast) for e in s.endpoints] == [
        ("10.1.0.5:6379", 70, 0.5, None), ("10.1.0.6:6379", 5, 0.0, None)]


def test_summarize_time_wait_ports():
    assert own_state().time_wait_ports == (
        ("local", "80", 150), ("local", "443", 50), ("local", "other", 20 + 18045),
        ("remote", "80", 18005), ("remote", "33000", 100), ("remote", "other", 40 + 60 + 40 + 20))


# --- the collector ------------------------------------------------------------------------------

def test_sockets_by_state_with_zeros():
    v = registry().get_sample_value
    for ns, tally in (("", own_tally()), ("blue", blue_tally())):
        for num in range(1, 13):
            name = REPORTED_STATES[num - 1]
            assert v("tcpstate_sockets", {"netns": ns, "state": name}) == tally.states[num], (ns, name)
    assert v("tcpstate_sockets", {"netns": "", "state": "BOUND_INACTIVE"}) is None


@pytest.mark.parametrize("ns, total", [("", OWN_TW), ("blue", 25)])
def test_time_wait_ports_add_up(ns, total):
    reg = registry()
    samples = [s for m in reg.collect() if m.name == "tcpstate_time_wait_sockets" for s in m.samples
               if s.labels["netns"] == ns]
    for side in ("local", "remote"):
        mine = [s for s in samples if s.labels["side"] == side]
        assert len(mine) == 3 or (ns, side) == ("blue", "remote")
        assert sum(s.value for s in mine) == total, side
        assert [s.labels["port"] for s in mine][-1] == "other"
    v = reg.get_sample_value
    if ns == "":
        assert v("tcpstate_time_wait_sockets", {"netns": "", "side": "local", "port": "80"}) == 150
        assert v("tcpstate_time_wait_sockets", {"netns": "", "side": "local", "port": "other"}) == 18065
        assert v("tcpstate_time_wait_sockets", {"netns": "", "side": "remote", "port": "80"}) == 18005
        assert v("tcpstate_time_wait_sockets", {"netns": "", "side": "remote", "port": "other"}) == 160
    else:  # one remote port: "other" is there and 0
        assert v("tcpstate_time_wait_sockets", {"netns": "blue", "side": "remote", "port": "6379"}) == 25
        assert v("tcpstate_time_wait_sockets", {"netns": "blue", "side": "remote", "port": "other"}) == 0
        assert v("tcpstate_time_wait_sockets", {"netns": "blue", "side": "local", "port": "other"}) == 23


def test_limits_and_ports():
    v = registry().get_sample_value
    assert v("tcpstate_time_wait_limit", {"netns": ""}) == 131072
    assert v("tcpstate_time_wait_limit", {"netns": "blue"}) == 4096
    assert v("tcpstate_ephemeral_ports", {"netns": ""}) == 28232
    # The range's size, reserved ports included (the forecast uses the 80 usable ones).
    assert v("tcpstate_ephemeral_ports", {"netns": "blue"}) == 100


def test_endpoint_gauges():
    v = registry().get_sample_value

    def ep(ns, remote):
        return {"netns": ns, "remote": remote}

    assert v("tcpstate_ephemeral_ports_in_use", ep("", "198.18.0.2:80")) == 18050
    assert v("tcpstate_ephemeral_ports_in_use", ep("", "[2001:db8::1]:443")) == 40
    assert v("tcpstate_ephemeral_ports_in_use", ep("", "198.18.0.9:5432")) is None  # below the top 2
    # WEB: r = 15000/30 = 500/s; demand 500*60 + 50 = 30050 >= 28232 -> utilization 1;
    #      seconds = (28232 - 18050) / (500 - 18000/60) = 10182 / 200 = 50.91
    assert v("tcpstate_ephemeral_port_utilization", ep("", "198.18.0.2:80")) == 1.0
    assert v("tcpstate_ephemeral_port_exhaustion_seconds", ep("", "198.18.0.2:80")) == pytest.approx(50.91)
    # WEB6: r = 30/30 = 1/s; demand 60 of 28232 ports, never runs out: no exhaustion series at all
    assert v("tcpstate_ephemeral_port_utilization", ep("", "[2001:db8::1]:443")) == pytest.approx(60 / 28232)
    assert v("tcpstate_ephemeral_port_exhaustion_seconds", ep("", "[2001:db8::1]:443")) is None
    # blue, 80 usable ports: CACHE r = 15/30 = 0.5/s, demand 0.5*60 + 50 = 80 -> utilization 1,
    #      seconds = (80 - 70) / (0.5 - 20/60) = 60; CACHE2: nothing recent, demand 0
    assert v("tcpstate_ephemeral_ports_in_use", ep("blue", "10.1.0.5:6379")) == 70
    assert v("tcpstate_ephemeral_ports_in_use", ep("blue", "10.1.0.6:6379")) == 5
    assert v("tcpstate_ephemeral_port_utilization", ep("blue", "10.1.0.5:6379")) == 1.0
    assert v("tcpstate_ephemeral_port_exhaustion_seconds", ep("blue", "10.1.0.5:6379")) == pytest.approx(60.0)
    assert v("tcpstate_ephemeral_port_utilization", ep("blue", "10.1.0.6:6379")) == 0.0
    assert v("tcpstate_ephemeral_port_exhaustion_seconds", ep("blue", "10.1.0.6:6379")) is None


def test_no_usable_ports_exports_in_use_only():
    # Every port of the range reserved: no forecast, so neither utilization nor exhaustion.
    state = summarize(Target("blue", "/run/netns/blue"), blue_tally(), Limits(4096, 40000, 40099, reserved=100),
                      {}, WINDOW, 2, 0.0, 0.0, NOW)
    v = registry({"blue": state}).get_sample_value
    assert v("tcpstate_ephemeral_ports", {"netns": "blue"}) == 100
    assert v("tcpstate_ephemeral_ports_in_use", {"netns": "blue", "remote": "10.1.0.5:6379"}) == 70
    assert v("tcpstate_ephemeral_port_utilization", {"netns": "blue", "remote": "10.1.0.5:6379"}) is None
    assert v("tcpstate_ephemeral_port_exhaustion_seconds", {"netns": "blue", "remote": "10.1.0.5:6379"}) is None


def test_exhausted_endpoint_exports_zero_seconds():
    # 80 in use: every usable port (the 20 reserved ones cannot be had), though 20 of the
    # range are free. Nothing recent: r = 0, demand = O = 30, utilization 30/80.
    t = Reference(recent_ms=30_000)
    t.remote_time_wait.update({CACHE: 50})
    t.remote_other.update({CACHE: 30})
    state = summarize(Target("blue", "/run/netns/blue"), t, BLUE_LIMITS, {}, WINDOW, 5, 0.0, 0.0, NOW)
    v = registry({"blue": state}).get_sample_value
    assert v("tcpstate_ephemeral_port_exhaustion_seconds", {"netns": "blue", "remote": "10.1.0.5:6379"}) == 0.0
    assert v("tcpstate_ephemeral_port_utilization", {"netns": "blue", "remote": "10.1.0.5:6379"}) == 0.375


def test_poll_age_duration_cpu():
    v = registry().get_sample_value
    assert v("tcpstate_state_poll_age_seconds", {"netns": ""}) == 9.5
    assert v("tcpstate_state_poll_age_seconds", {"netns": "blue"}) == 1.0
    assert v("tcpstate_state_poll_duration_seconds", {"netns": ""}) == 0.004
    assert v("tcpstate_state_poll_cpu_seconds", {"netns": "blue"}) == 0.001


def test_poll_age_never_negative():
    # A poll that finished "after" the scrape (wall clock stepped back) is 0 s old, not -5.
    state = summarize(Target.own(), Reference(), LIMITS, {}, WINDOW, 1, 0.0, 0.0, NOW + 5)
    assert registry({"": state}).get_sample_value("tcpstate_state_poll_age_seconds", {"netns": ""}) == 0.0


def test_kernel_counters_and_errors():
    v = registry().get_sample_value
    for _f, _g, _k, metric, _doc in KERNEL_COUNTERS:
        assert v(f"tcpstate_kernel_tcp_{metric}_total", {"netns": ""}) == KERNEL[metric]
    assert v("tcpstate_kernel_tcp_time_wait_reused_total", {"netns": "blue"}) is None  # missing, not 0
    assert v("tcpstate_kernel_tcp_active_opens_total", {"netns": "blue"}) == KERNEL["active_opens"]
    assert v("tcpstate_state_poll_errors_total", {"netns": ""}) == 0
    assert v("tcpstate_state_poll_errors_total", {"netns": "blue"}) == 3
    # a namespace that never polled still has its errors, and nothing else
    assert v("tcpstate_state_poll_errors_total", {"netns": "gone"}) == 2
    assert v("tcpstate_sockets", {"netns": "gone", "state": "ESTABLISHED"}) is None


def promtool_check(text):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: make setup installs Debian's prometheus package"
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


def test_promtool_accepts_the_exposition():
    text = generate_latest(registry())
    assert b'tcpstate_ephemeral_port_exhaustion_seconds{netns="",remote="198.18.0.2:80"}' in text
    promtool_check(text)


def test_promtool_accepts_an_empty_exposition():
    promtool_check(generate_latest(registry({})))
