"""The socket-table gauges: statepoll.summarize on hand-made tallies, exported by StateCollector."""

import shutil
import socket
import subprocess
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from monitor.collector import StateCollector
from monitor.kstats import KERNEL_COUNTERS, Limits
from monitor.sockdiag import Tally
from monitor.statepoll import REPORTED_STATES, Target, summarize, top_ports
from monitor.states import NUMBERS

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

LIMITS = Limits(131072, 32768, 60999)  # P = 28232
BLUE_LIMITS = Limits(4096, 40000, 40099)  # P = 100
KERNEL = {m: i * 10 for i, (*_, m, _doc) in enumerate(KERNEL_COUNTERS)}


def own_tally():
    # 220 TIME_WAIT sockets: each side's port counts add up to them.
    t = Tally()
    t.states.update({NUMBERS["ESTABLISHED"]: 55, NUMBERS["TIME_WAIT"]: 220, NUMBERS["LISTEN"]: 3,
                     NUMBERS["NEW_SYN_RECV"]: 1, NUMBERS["CLOSE_WAIT"]: 25})
    t.tw_local.update({80: 150, 443: 50, 8080: 20})
    t.tw_remote.update({33000: 100, 33001: 60, 33002: 40, 33003: 20})
    t.remote_time_wait.update({WEB: 200, WEB6: 10, WEB3: 5})
    t.remote_other.update({WEB: 50, DB: 30})
    return t


def blue_tally():
    t = Tally()
    t.states.update({NUMBERS["ESTABLISHED"]: 70, NUMBERS["TIME_WAIT"]: 25})
    t.tw_local.update({40000 + i: 1 for i in range(25)})  # all tied
    t.tw_remote.update({6379: 25})
    t.remote_time_wait.update({CACHE: 20, CACHE2: 5})
    t.remote_other.update({CACHE: 70})
    return t


# TIME_WAIT entries per second: WEB3 and DB are missing, so they count as 0/s.
RATES = {WEB: 500.0, WEB6: 1.0}


def own_state(top_n=2):
    return summarize(Target.own(), own_tally(), LIMITS, KERNEL, RATES, top_n,
                     duration=0.004, cpu=0.003, finished=NOW - 9.5)


def blue_state():
    kernel = {k: v for k, v in KERNEL.items() if k != "time_wait_reused"}  # an older kernel
    return summarize(Target("blue", "/run/netns/blue"), blue_tally(), BLUE_LIMITS, kernel, None, 2,
                     duration=0.002, cpu=0.001, finished=NOW - 1.0)


ERRORS = {"": 0, "blue": 3, "gone": 2}


def registry(results=None):
    results = {"": own_state(), "blue": blue_state()} if results is None else results
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StateCollector(results=lambda: results, errors=lambda: dict(ERRORS), clock=lambda: NOW))
    return reg


# --- top_ports ----------------------------------------------------------------------------------

def test_top_ports_then_other():
    got = top_ports("local", Counter({80: 150, 443: 50, 8080: 20}), 2)
    assert got == [("local", "80", 150), ("local", "443", 50), ("local", "other", 20)]


def test_top_ports_ties():
    # Which of the tied ports makes the cut is not specified; the counts and the total are.
    got = top_ports("remote", Counter({1: 5, 2: 5, 3: 5, 4: 1}), 2)
    assert [c for _, _, c in got] == [5, 5, 6]
    assert {p for _, p, _ in got[:2]} < {"1", "2", "3"}
    assert got[-1][:2] == ("remote", "other")


def test_top_ports_fewer_than_n():
    assert top_ports("local", Counter({80: 3}), 5) == [("local", "80", 3), ("local", "other", 0)]
    assert top_ports("local", Counter(), 5) == [("local", "other", 0)]


# --- summarize ----------------------------------------------------------------------------------

def test_summarize_reports_every_state():
    s = own_state()
    assert list(s.sockets) == list(REPORTED_STATES)
    assert len(s.sockets) == 12 and "BOUND_INACTIVE" not in s.sockets
    assert s.sockets["TIME_WAIT"] == 220 and s.sockets["NEW_SYN_RECV"] == 1 and s.sockets["SYN_SENT"] == 0


def test_summarize_ranks_endpoints_by_in_use_or_demand():
    # In use (W + O) and demand (r*60 + O) per endpoint:
    #   WEB   250, 500*60 + 50 = 30050
    #   WEB6   10,   1*60 +  0 =    60   <- fewer in use than DB, but more demand
    #   DB     30,   0*60 + 30 =    30
    #   WEB3    5,   0*60 +  0 =     0
    s = own_state(top_n=10)
    assert [e.remote for e in s.endpoints] == ["198.18.0.2:80", "[2001:db8::1]:443", "198.18.0.9:5432",
                                               "198.18.0.3:80"]
    assert [e.entry_rate for e in s.endpoints] == [500.0, 1.0, 0.0, 0.0]
    assert [e.remote for e in own_state(top_n=2).endpoints] == ["198.18.0.2:80", "[2001:db8::1]:443"]


def test_summarize_without_rates_ranks_by_in_use_and_breaks_ties_by_label():
    t = Tally()
    t.remote_time_wait.update({CACHE2: 5, WEB3: 5, CACHE: 1})
    s = summarize(Target.own(), t, LIMITS, {}, None, 2, 0.0, 0.0, NOW)
    assert [(e.remote, e.time_wait, e.entry_rate, e.forecast) for e in s.endpoints] == [
        ("10.1.0.6:6379", 5, None, None), ("198.18.0.3:80", 5, None, None)]


def test_summarize_time_wait_ports():
    assert own_state().time_wait_ports == (
        ("local", "80", 150), ("local", "443", 50), ("local", "other", 20),
        ("remote", "33000", 100), ("remote", "33001", 60), ("remote", "other", 60))


# --- the collector ------------------------------------------------------------------------------

def test_sockets_by_state_with_zeros():
    v = registry().get_sample_value
    for ns, tally in (("", own_tally()), ("blue", blue_tally())):
        for num in range(1, 13):
            name = REPORTED_STATES[num - 1]
            assert v("tcpstate_sockets", {"netns": ns, "state": name}) == tally.states[num], (ns, name)
    assert v("tcpstate_sockets", {"netns": "", "state": "BOUND_INACTIVE"}) is None


@pytest.mark.parametrize("ns, total", [("", 220), ("blue", 25)])
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
        assert v("tcpstate_time_wait_sockets", {"netns": "", "side": "remote", "port": "other"}) == 60
    else:  # one remote port: "other" is there and 0
        assert v("tcpstate_time_wait_sockets", {"netns": "blue", "side": "remote", "port": "6379"}) == 25
        assert v("tcpstate_time_wait_sockets", {"netns": "blue", "side": "remote", "port": "other"}) == 0
        assert v("tcpstate_time_wait_sockets", {"netns": "blue", "side": "local", "port": "other"}) == 23


def test_limits_and_ports():
    v = registry().get_sample_value
    assert v("tcpstate_time_wait_limit", {"netns": ""}) == 131072
    assert v("tcpstate_time_wait_limit", {"netns": "blue"}) == 4096
    assert v("tcpstate_ephemeral_ports", {"netns": ""}) == 28232
    assert v("tcpstate_ephemeral_ports", {"netns": "blue"}) == 100


def test_endpoint_gauges():
    v = registry().get_sample_value

    def ep(ns, remote):
        return {"netns": ns, "remote": remote}

    assert v("tcpstate_ephemeral_ports_in_use", ep("", "198.18.0.2:80")) == 250
    assert v("tcpstate_ephemeral_ports_in_use", ep("", "[2001:db8::1]:443")) == 10
    assert v("tcpstate_ephemeral_ports_in_use", ep("", "198.18.0.9:5432")) is None  # below the top 2
    # WEB: demand 500*60 + 50 = 30050 >= 28232 -> utilization 1;
    #      seconds = (28232 - 250) / (500 - 200/60) = 27982 / 496.67 = 56.34
    assert v("tcpstate_ephemeral_port_utilization", ep("", "198.18.0.2:80")) == 1.0
    assert v("tcpstate_ephemeral_port_exhaustion_seconds", ep("", "198.18.0.2:80")) == pytest.approx(
        (28232 - 250) / (500 - 200 / 60))
    assert v("tcpstate_ephemeral_port_exhaustion_seconds", ep("", "198.18.0.2:80")) == pytest.approx(56.3396, abs=1e-4)
    # WEB6: demand 60 of 28232 ports, never runs out: no exhaustion series at all
    assert v("tcpstate_ephemeral_port_utilization", ep("", "[2001:db8::1]:443")) == pytest.approx(60 / 28232)
    assert v("tcpstate_ephemeral_port_exhaustion_seconds", ep("", "[2001:db8::1]:443")) is None
    # blue has no rates yet: in use only, no forecast
    assert v("tcpstate_ephemeral_ports_in_use", ep("blue", "10.1.0.5:6379")) == 90
    assert v("tcpstate_ephemeral_ports_in_use", ep("blue", "10.1.0.6:6379")) == 5
    assert v("tcpstate_ephemeral_port_utilization", ep("blue", "10.1.0.5:6379")) is None
    assert v("tcpstate_ephemeral_port_exhaustion_seconds", ep("blue", "10.1.0.5:6379")) is None


def test_exhausted_endpoint_exports_zero_seconds():
    t = Tally()
    t.remote_time_wait.update({CACHE: 60})
    t.remote_other.update({CACHE: 40})  # 100 in use of 100 ports
    state = summarize(Target("blue", "/run/netns/blue"), t, BLUE_LIMITS, {}, {CACHE: 0.0}, 5, 0.0, 0.0, NOW)
    v = registry({"blue": state}).get_sample_value
    assert v("tcpstate_ephemeral_port_exhaustion_seconds", {"netns": "blue", "remote": "10.1.0.5:6379"}) == 0.0
    assert v("tcpstate_ephemeral_port_utilization", {"netns": "blue", "remote": "10.1.0.5:6379"}) == 0.4


def test_poll_age_duration_cpu():
    v = registry().get_sample_value
    assert v("tcpstate_state_poll_age_seconds", {"netns": ""}) == 9.5
    assert v("tcpstate_state_poll_age_seconds", {"netns": "blue"}) == 1.0
    assert v("tcpstate_state_poll_duration_seconds", {"netns": ""}) == 0.004
    assert v("tcpstate_state_poll_cpu_seconds", {"netns": "blue"}) == 0.001


def test_poll_age_never_negative():
    # A poll that finished "after" the scrape (wall clock stepped back) is 0 s old, not -5.
    state = summarize(Target.own(), Tally(), LIMITS, {}, None, 1, 0.0, 0.0, NOW + 5)
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
