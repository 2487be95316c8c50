"""Every query of deploy/grafana/tcpstate.json, and every alert rule, run by a real Prometheus scraping a real
daemon while traffic of every kind flows: no query may error, and every panel must show data."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse

import pytest
import yaml

from ..unit.test_dashboard import ROOT, load, metric_names, queries, substitute
from . import traffic
from .netns import NetnsPair, netns_path
from .test_daemon import TCPSTATE, free_port, get, wait_ready

pytestmark = pytest.mark.host_only  # packaging or load: make test-kernels' guests skip it (README, "Tests")

RULES = ROOT / "deploy/prometheus/alerts.yml"
RATE_INTERVAL = "15s"  # Grafana's $__rate_interval at a 1 s scrape interval is at least 4 s; 15 s holds 15 scrapes
RANGE = "60s"  # $__range: the whole traffic fits in it
LOOKBACK = 60  # seconds of each range query: what a dashboard opened now would show
TRAFFIC_SECONDS = 50  # at most; stops once every panel has shown data
TICK = 0.5
# The client's ephemeral range: 100 ports, so that 80 connections in TIME_WAIT to one endpoint within the
# forecast window make the exhaustion forecast present without a connect ever running out of ports.
PORT_RANGE = (40000, 40099)
EXHAUSTING_CONNECTS = 80
FIXED_PORT = 20480  # outside PORT_RANGE: port reuse from one source port
# Panels that read 0 on a healthy daemon: they must return series, but need not be non-zero.
ZERO_IS_HEALTHY = {"Events lost and probe misses", "Read and poll errors", "In-kernel program CPU"}
# Documented as absent until it has a value (README, Metrics); the traffic makes it present.
ABSENT_UNTIL_SET = {"tcpstate_ephemeral_port_exhaustion_seconds"}


@pytest.fixture(scope="module")
def pair():
    p = NetnsPair("gd")
    p.down()
    p.up()
    sysctl = ["sysctl", "-qw"]
    subprocess.run(["ip", "netns", "exec", p.client, *sysctl, "net.ipv4.ip_local_port_range=%d %d" % PORT_RANGE],
                   check=True)
    # A small TIME_WAIT table on the server, so its closes overflow it (TCPTimeWaitOverflow shows).
    subprocess.run(["ip", "netns", "exec", p.server, *sysctl, "net.ipv4.tcp_max_tw_buckets=16"], check=True)
    yield p
    p.down()


class Traffic(threading.Thread):
    """Every kind of traffic the dashboard shows, every TICK, for at most TRAFFIC_SECONDS."""

    def __init__(self, pair: NetnsPair, listeners: dict):
        super().__init__(daemon=True)
        self.pair, self.listeners = pair, listeners
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.ticks = 0
        self.exhausting = 0

    def run(self):
        p, lst = self.pair, self.listeners
        end = time.monotonic() + TRAFFIC_SECONDS
        try:
            while not self.stop.is_set() and time.monotonic() < end:
                t = time.monotonic()
                if self.exhausting < EXHAUSTING_CONNECTS:  # client-side TIME_WAIT, all to one endpoint
                    traffic.client_closes_first(p.client, lst["exhaust"], 2)
                    self.exhausting += 2
                if self.ticks % 2 == 0:  # client-side TIME_WAIT to a second remote port
                    traffic.client_closes_first(p.client, lst["remote_tw"], 1)
                traffic.server_closes_first(p.client, lst["local_tw"], 2)  # server-side TIME_WAIT, then overflow
                traffic.refused(p.client, p.SERVER_ADDR, 9, 5)  # resets in NONE and SYN_SENT, failed connects
                traffic.linger_aborts(p.client, lst["local_tw"], 1)  # resets right after the handshake
                traffic.unread_data_aborts(p.client, lst["local_tw"], 1)  # the kernel's abort-on-close
                traffic.from_fixed_port(p.client, p.CLIENT_ADDR, lst["reuse"], 2, "abort", FIXED_PORT)  # reuse
                self.ticks += 1
                self.stop.wait(max(0.0, TICK - (time.monotonic() - t)))
        except BaseException as exc:  # the test reports it
            self.error = exc


class Prometheus:
    def __init__(self, tmp_path, target: str):
        binary = shutil.which("prometheus")
        assert binary, "prometheus missing: make setup installs Debian's prometheus package"
        port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{RULES}']\n"
            f"scrape_configs: [{{job_name: tcpstate, static_configs: [{{targets: ['{target}']}}]}}]\n")
        self.proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={tmp_path / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{port}"],
                                     stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
        self.log = tmp_path / "prometheus.log"
        self.api = f"http://127.0.0.1:{port}/api/v1"

    def call(self, path: str, **params) -> dict:
        status, body = get(f"{self.api}/{path}?{urllib.parse.urlencode(params, doseq=True)}")
        reply = json.loads(body)
        if status != 200 or reply.get("status") != "success":
            raise AssertionError(f"{path} {params}: HTTP {status}: {reply.get('errorType')}: {reply.get('error')}")
        return reply["data"]

    def query_range(self, expr: str) -> list:
        now = time.time()
        return self.call("query_range", query=expr, start=now - LOOKBACK, end=now, step=1)["result"]

    def wait_up(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if self.call("query", query='up{job="tcpstate"} == 1')["result"]:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError("Prometheus never scraped tcpstate")

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)


def nonzero(result: list) -> bool:
    return any(float(v) != 0 and v.lower() != "nan" for series in result for _, v in series["values"])


def grafana_values(dash: dict) -> dict:
    """What Grafana puts in for each variable with "All" selected, and its built-ins."""
    values = {"__rate_interval": RATE_INTERVAL, "__range": RANGE}
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            values[var["name"]] = var["allValue"]
    return values


def test_every_panel_and_alert_query_works_on_real_data(pair, tmp_path):
    dash = load()
    values = grafana_values(dash)
    panel_of = {}  # where -> panel title, for the zero allowance
    for p in dash["panels"]:
        for t in p.get("targets", []):
            panel_of[f"panel {p['id']} '{p['title']}' target {t['refId']}"] = p["title"]
    exprs = {where: substitute(expr, values) for where, expr in queries(dash)}
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    alert_metrics = set().union(*(metric_names(r["expr"]) for r in rules))

    port = free_port()
    target = f"127.0.0.1:{port}"
    daemon = subprocess.Popen(
        [TCPSTATE, "run", "--listen-address", target, "--include-cidr", "198.18.0.0/15", "--state-interval", "0.5",
         "--netns", netns_path(pair.client), "--netns", netns_path(pair.server), "--forecast-window", "10",
         "--set", "time_wait_buildup.count=5"],  # fires once five sockets sit in TIME_WAIT anywhere
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # logs: a few lines
    prom = flow = None
    listeners = {}
    try:
        wait_ready(f"http://{target}", daemon)
        prom = Prometheus(tmp_path, target)
        prom.wait_up()
        for name in ("exhaust", "remote_tw", "local_tw", "reuse"):
            listeners[name] = traffic.Listener(pair.server, pair.SERVER_ADDR)
        flow = Traffic(pair, listeners)
        flow.start()

        # Retry while the traffic runs: rates need two scrapes in their window, the forecast a few polls.
        # Every target must return series; every panel must show a value other than 0 in one of them.
        empty = dict(exprs)  # where -> expr that returned no series yet
        flat = {panel_of.get(w, w) for w in exprs} - ZERO_IS_HEALTHY  # panels with nothing but 0 so far
        missing = set(alert_metrics)  # metrics the alert rules read, not seen yet
        t0 = time.monotonic()
        while flow.is_alive() and (empty or flat or missing):
            for where, expr in exprs.items():
                if where not in empty and panel_of.get(where, where) not in flat:
                    continue
                try:
                    result = prom.query_range(expr)
                except AssertionError as exc:
                    raise AssertionError(f"{where}: {exc}") from None
                if result:
                    empty.pop(where, None)
                if nonzero(result):
                    flat.discard(panel_of.get(where, where))
            for name in list(missing):
                if prom.query_range(f'count({{__name__="{name}"}})'):
                    missing.discard(name)
            time.sleep(1.0)
        assert flow.error is None, repr(flow.error)
        assert not empty, "no series within the traffic's %d s (%d ticks) for:\n%s" % (
            TRAFFIC_SECONDS, flow.ticks, "\n".join(f"{w}: {e}" for w, e in empty.items()))
        assert not flat, f"panels that showed only 0 during the traffic: {sorted(flat)}"
        assert not missing, f"metrics the alert rules read never appeared: {sorted(missing)}"
        assert ABSENT_UNTIL_SET <= alert_metrics  # the rule that needs the forecast present is still there
        print(f"every panel showed data {time.monotonic() - t0:.1f} s into the traffic ({flow.ticks} ticks)")

        # Every alert expression, as written, evaluates without error (it may well be empty).
        for rule in rules:
            try:
                prom.call("query", query=rule["expr"])
            except AssertionError as exc:
                raise AssertionError(f"alert {rule['alert']}: {exc}") from None
        # And Prometheus' own evaluation of the rule file found no error either.
        deadline = time.monotonic() + 10
        while True:
            evaluated = [r for g in prom.call("rules")["groups"] for r in g["rules"]]
            if len(evaluated) == len(rules) and all(not r["lastEvaluation"].startswith("0001") for r in evaluated):
                break
            assert time.monotonic() < deadline, "the rules were never evaluated"
            time.sleep(0.5)
        assert [(r["name"], r["health"], r.get("lastError", "")) for r in evaluated] == \
            [(r["alert"], "ok", "") for r in rules]

        # The variables' queries, as Grafana's label_values runs them, list exactly this target and the
        # two namespaces passed with --netns (the daemon's own, netns="", is matched by All's ".*").
        assert prom.call("label/instance/values", **{"match[]": "tcpstate_build_info"}) == [target]
        assert sorted(prom.call("label/netns/values", **{"match[]": 'tcpstate_sockets{instance=~".*"}'})) == \
            sorted([pair.client, pair.server])
    finally:
        if flow is not None:
            flow.stop.set()
            flow.join(timeout=20)
        for lst in listeners.values():
            lst.close()
        if prom is not None:
            prom.close()
        daemon.terminate()
        daemon.wait(timeout=10)
    assert daemon.returncode == 0, daemon.stderr.read()
