"""The live page of a real `tcpstate run` in headless Chromium under real traffic: rates against /metrics deltas, resets on their states, no console errors or CSP violations, a screenshot."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from monitor.serve.summary import FIGURE_TRANSITIONS
from monitor.sockets.poller import REPORTED_STATES

from ..browser import CHROMIUM, Browser
from . import traffic
from .daemon import Daemon
from .netns import fresh_pair, netns_path

# A browser under make test-kernels' TCG emulation would miss the 10 s window; what the page
# counts is the same on every kernel (test_counts), so the guests skip it.
pytestmark = [pytest.mark.host_only,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make setup installs it)")]

N_CLIENT, N_SERVER, N_REFUSED, N_ABORT = 12, 12, 8, 8
CLOSED_PORT = 9
# Where `make screenshot` wants the PNG (README's picture); the test's tmp dir always gets one.
SCREENSHOT_ENV = "TCPSTATE_SCREENSHOT"


def expected_transitions() -> dict:
    """What the traffic below makes, at both ends, the listener included."""
    out = {edge: N_CLIENT + N_SERVER for edge in traffic.CHURN_TRANSITIONS}
    out[("CLOSE", "LISTEN")] = 1
    out[("CLOSE", "SYN_SENT")] += N_REFUSED + N_ABORT
    out[("SYN_SENT", "CLOSE")] = N_REFUSED
    for edge in (("SYN_SENT", "ESTABLISHED"), ("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED")):
        out[edge] += N_ABORT
    out[("ESTABLISHED", "CLOSE")] = 2 * N_ABORT
    return out


# Everything the checks need, read in one evaluation so that no redraw falls in between.
READ_PAGE = """(() => {
  const asof = document.getElementById("asof").dataset;
  const edges = {};
  for (const g of document.querySelectorAll("g.edge[id]")) {
    edges[g.dataset.from + ">" + g.dataset.to] = {label: g.querySelector("text.rate").textContent,
      cls: g.getAttribute("class"), title: g.querySelector("title").textContent};
  }
  const nodes = {};
  for (const g of document.querySelectorAll("g.node")) {
    nodes[g.dataset.state] = {sockets: g.querySelector("text.sockets").textContent,
      rst: g.querySelector("text.rst").textContent, title: g.querySelector("title").textContent};
  }
  return {start: Number(asof.start), end: Number(asof.end), edges, nodes,
          banner: document.getElementById("banner").textContent,
          resets: document.getElementById("resets").textContent};
})()"""


@pytest.fixture(scope="module")
def pair():
    """Namespaces of this test alone: the TIME_WAIT count it checks is exact in them."""
    with fresh_pair("pg") as p:
        yield p


def metric_deltas(after: dict, before: dict, name: str) -> dict:
    """labels (as a dict's items) -> growth, non-zero only."""
    deltas = {labels: value - before.get((metric, labels), 0) for (metric, labels), value in after.items()
              if metric == name}
    return {labels: d for labels, d in deltas.items() if d}


def transition_deltas(after: dict, before: dict) -> dict:
    d = metric_deltas(after, before, "tcpstate_transitions_total")
    return {(dict(k)["from_state"], dict(k)["to_state"]): int(v) for k, v in d.items()}


def reset_deltas(after: dict, before: dict) -> dict:
    """(direction, state) -> resets, over every reason."""
    out: dict = {}
    for k, v in metric_deltas(after, before, "tcpstate_resets_total").items():
        key = (dict(k)["direction"], dict(k)["state"])
        out[key] = out.get(key, 0) + int(v)
    return out


# A label rounds to 0.01 the JSON's rate, itself rounded to 0.001.
ROUNDING = 0.005 + 0.0005 + 1e-9


def rate_of(label: str) -> float:
    m = re.fullmatch(r"(\d+\.\d\d)/s", label)
    assert m, f"edge label {label!r} is not a rate"
    return float(m.group(1))


def test_page_draws_the_traffic_live(pair, tmp_path):
    expected = expected_transitions()
    with Daemon(tmp_path, "--state-interval", "1", "--netns", netns_path(pair.client), "--netns",
                netns_path(pair.server), "--set", "connect_failures.fraction=0.1") as daemon, \
            Browser(tmp_path) as browser:
        browser.open(daemon.base + "/")
        # The full window, as on a daemon that has run a while; it starts before the traffic.
        browser.wait_for("document.getElementById('asof').dataset.end - document.getElementById('asof').dataset.start"
                         " >= 10", 40, "the page's window at its full 10 s")
        t0 = time.time()
        before = daemon.metrics()
        with traffic.Listener(pair.server, pair.SERVER_ADDR) as listener:
            traffic.client_closes_first(pair.client, listener, N_CLIENT)
            traffic.server_closes_first(pair.client, listener, N_SERVER)
            traffic.refused(pair.client, pair.SERVER_ADDR, CLOSED_PORT, N_REFUSED)
            traffic.linger_aborts(pair.client, listener, N_ABORT)
            deadline = time.monotonic() + 15
            while transition_deltas(daemon.metrics(), before) != expected and time.monotonic() < deadline:
                time.sleep(0.1)  # the last ACKs and the TIME_WAIT decisions are asynchronous
            after = daemon.metrics()
            t1 = time.time()
            assert transition_deltas(after, before) == expected
            # The page's window must hold all of the traffic and nothing else: from a read before
            # t0 to one after t1 (10 s or a little more: the traffic has to be quicker).
            assert t1 - t0 < 8, f"the traffic took {t1 - t0:.1f} s: too long for the page's 10 s window"
            browser.wait_for(f"Number(document.getElementById('asof').dataset.end) >= {t1} && "
                             f"Number(document.getElementById('asof').dataset.start) <= {t0}", 20,
                             "a redraw whose window holds the traffic")
            shown = browser.eval(READ_PAGE)
            seconds = shown["end"] - shown["start"]

            # Every state is drawn, and every edge with the rate /metrics gives over the same window.
            assert sorted(shown["nodes"]) == sorted(REPORTED_STATES)
            assert sorted(shown["edges"]) == sorted(f"{a}>{b}" for a, b in FIGURE_TRANSITIONS)
            for a, b in FIGURE_TRANSITIONS:
                edge, delta = shown["edges"][f"{a}>{b}"], expected.get((a, b), 0)
                assert f"/s, {delta} in the window" in edge["title"], (a, b, edge)
                assert abs(rate_of(edge["label"]) - delta / seconds) <= ROUNDING, (a, b, edge, seconds)
                assert (edge["cls"] == "edge idle") == (delta == 0), (a, b, edge)

            # Resets on the states they happened in, at the rates /metrics gives.
            resets = reset_deltas(after, before)
            assert set(resets) == {("sent", "NONE"), ("received", "SYN_SENT"), ("sent", "ESTABLISHED"),
                                   ("received", "ESTABLISHED")}
            for state in REPORTED_STATES:
                if state == "NEW_SYN_RECV":
                    continue
                on = ("CLOSE", "NONE") if state == "CLOSE" else (state,)
                sent = sum(n for (d, s), n in resets.items() if d == "sent" and s in on) / seconds
                received = sum(n for (d, s), n in resets.items() if d == "received" and s in on) / seconds
                m = re.fullmatch(r"RST sent (\d+\.\d\d) · rcvd (\d+\.\d\d) /s", shown["nodes"][state]["rst"])
                assert m, shown["nodes"][state]
                assert abs(float(m.group(1)) - sent) <= ROUNDING, (state, shown["nodes"][state])
                assert abs(float(m.group(2)) - received) <= ROUNDING, (state, shown["nodes"][state])
            assert "NO_SOCKET" in shown["nodes"]["CLOSE"]["title"]
            assert f"received in SYN_SENT, UNKNOWN: {N_REFUSED}" in shown["nodes"]["SYN_SENT"]["title"]

            # The refused connects are a fifth of the attempts: over the 0.1 set above.
            assert "connect_failures" in shown["banner"] and f"{pair.SERVER_ADDR}:{CLOSED_PORT}" in shown["banner"]

            # Sockets of the picked namespace: the server's has the one listener, the client's
            # the TIME_WAIT of the connections it closed first.
            browser.eval(f"document.querySelector('#netns a[data-netns=\"{pair.server}\"]').click()")
            assert browser.eval("document.querySelector('#n-LISTEN .sockets').textContent") == "1 socket"
            browser.eval(f"document.querySelector('#netns a[data-netns=\"{pair.client}\"]').click()")
            browser.wait_for(f"document.querySelector('#n-TIME_WAIT .sockets').textContent == '{N_CLIENT} sockets'",
                             10, "the client's TIME_WAIT sockets")
            # The README's picture: the host's view is empty (traffic is in the namespaces).
            browser.eval(f"document.querySelector('#netns a[data-netns=\"{pair.server}\"]').click()")
            png = browser.screenshot(tmp_path / "tcpstate-page.png")
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            if os.environ.get(SCREENSHOT_ENV):
                shutil.copy(png, Path(os.environ[SCREENSHOT_ENV]))
            assert browser.errors == [] and browser.csp_violations() == []
