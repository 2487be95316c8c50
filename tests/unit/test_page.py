"""The state-machine page: the server-rendered snapshot, its routes and headers, and page.js in headless Chromium redrawing it to the same DOM."""

import json
import re
import urllib.error
import urllib.request
from html.parser import HTMLParser

import pytest
from prometheus_client import CollectorRegistry

from monitor.serve import page, summary
from monitor.serve.http import HttpServer
from monitor.settings import ListenAddress
from monitor.sockets.poller import REPORTED_STATES

from ..browser import Browser
from .summary_data import inputs


class Elements(HTMLParser):
    """Every element's attributes and own text, by id."""

    def __init__(self, html):
        super().__init__()
        self.by_id, self.stack, self.scripts, self.styles = {}, [], [], []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts.append(attrs)
        assert "style" not in attrs, f"<{tag}> has a style attribute: the CSP forbids it"
        assert not any(k.startswith("on") for k in attrs), f"<{tag}> has an inline handler"
        node = {"tag": tag, "attrs": attrs, "text": ""}
        if "id" in attrs:
            self.by_id[attrs["id"]] = node
        if tag not in ("br", "meta", "link", "rect", "path"):
            self.stack.append(node)

    def handle_endtag(self, tag):
        if self.stack and self.stack[-1]["tag"] == tag:
            self.stack.pop()

    def handle_data(self, data):
        for node in self.stack:
            node["text"] += data


def snapshot(netns=""):
    return page.render(summary.build(**inputs()), netns)


def test_every_state_is_drawn_with_its_sockets_and_resets():
    html = snapshot()
    states = re.findall(r'<g class="node" id="n-(\w+)" data-state="\1">', html)
    assert sorted(states) == sorted(REPORTED_STATES)
    els = Elements(html).by_id
    assert "41 sockets" in els["n-TIME_WAIT"]["text"] and "limit 262144 (0.0%)" in els["n-TIME_WAIT"]["text"]
    assert "top ports l:80×40 r:5432×1" in els["n-TIME_WAIT"]["text"]
    assert "2 sockets" in els["n-LISTEN"]["text"] and "1 socket\n" not in els["n-LISTEN"]["text"]
    assert "RST sent 0.00 · rcvd 2.00 /s" in els["n-SYN_SENT"]["text"]
    assert "RST sent 6.00 · rcvd 0.00 /s" in els["n-ESTABLISHED"]["text"]
    assert "RST sent 2.00 · rcvd 0.00 /s" in els["n-CLOSE"]["text"]  # NONE: no socket
    assert "RST sent 0.00 · rcvd 0.00 /s" in els["n-FIN_WAIT2"]["text"]
    assert "sent in ESTABLISHED, TCP_STATE: 90 (6.00/s)" in els["n-ESTABLISHED"]["text"]  # the hover title
    # The other namespace's sockets when it is picked.
    assert "1 socket" in Elements(snapshot("blue")).by_id["n-LISTEN"]["text"]


def test_edges_carry_rates_widths_and_classes():
    els = Elements(snapshot()).by_id
    edges = {k: v for k, v in els.items() if k.startswith("e-")}
    assert sorted(edges) == sorted(f"e-{a}-{b}" for a, b in summary.FIGURE_TRANSITIONS)
    close_syn = edges["e-CLOSE-SYN_SENT"]
    assert close_syn["attrs"]["class"] == "edge busy" and "8.00/s" in close_syn["text"]
    assert "80 in the window, 120 since start" in close_syn["text"]
    assert edges["e-CLOSING-TIME_WAIT"]["attrs"]["class"] == "edge idle"
    assert "0.00/s" in edges["e-CLOSING-TIME_WAIT"]["text"]
    assert re.search(r'id="e-CLOSE-SYN_SENT".*?stroke-width="5.32"', snapshot())  # 1.5 + 2 log10(81)
    assert re.search(r'id="e-CLOSING-TIME_WAIT".*?stroke-width="1.5"', snapshot())
    assert page.edge_class(10.0) == "hot" and page.edge_class(9.99) == "busy" and page.edge_class(None) == "idle"


def test_side_panels_banner_and_links():
    html = snapshot()
    els = Elements(html)
    assert "WARNING connect_failures: 40% of 20 connects failed over 8 s" in els.by_id["banner"]["text"]
    assert "top offenders: 198.18.0.2:9 (10 connect failure)" in els.by_id["banner"]["text"]
    assert "SYN_RECV → FIN_WAIT10.00/s1" in els.by_id["other-transitions"]["text"]
    assert "DEGRADED" in els.by_id["signals"]["text"] and "received resets are not counted" in html
    assert els.by_id["filters"]["text"] == "include 198.18.0.0/15; ports 80,443"
    assert '<a href="?netns=" data-netns="" aria-current="page">host</a>' in html
    assert '<a href="?netns=blue" data-netns="blue">blue</a>' in html
    assert els.scripts == [{"src": "/static/page.js", "defer": None}]  # no inline script
    for link in ("/metrics", "/-/healthy", "/-/ready", "/api/v1/summary"):
        assert f'href="{link}"' in html
    no_netns = dict(summary.build(**inputs()), namespaces=[])
    assert 'id="netns"' not in page.render(no_netns) and "sockets: no poll yet" in page.render(no_netns)


def test_text_from_the_outside_is_escaped():
    s = summary.build(**inputs())
    s["anomalies"][0]["summary"] = "<script>x</script>"
    s["namespaces"][1]["netns"] = '"><b>'
    html = page.render(s)
    assert "<script>x" not in html and "&lt;script&gt;x" in html and '"><b>' not in html


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


@pytest.fixture
def served():
    exp = HttpServer(ListenAddress("127.0.0.1", 0), CollectorRegistry(), filters_text="include 198.18.0.0/15")
    exp.start()
    yield exp, f"http://127.0.0.1:{exp.port}"
    exp.stop()


def test_routes_and_headers(served):
    exp, base = served
    status, _, body = get(base + "/")  # before the probes are attached: links and filters
    assert status == 200 and "/metrics" in body and "198.18.0.0/15" in body and "<svg" not in body
    assert get(base + "/api/v1/summary")[0] == 503
    exp.summary = lambda: summary.build(**inputs())
    status, headers, body = get(base + "/?netns=blue")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Content-Security-Policy"] == page.CSP and headers["X-Content-Type-Options"] == "nosniff"
    assert body == page.render(summary.build(**inputs()), "blue", ready=False)
    status, headers, body = get(base + "/api/v1/summary")
    assert status == 200 and headers["Content-Type"] == "application/json" and headers["Cache-Control"] == "no-store"
    assert json.loads(body) == json.loads(json.dumps(summary.build(**inputs())))
    for path, ctype in (("/static/page.js", "text/javascript"), ("/static/page.css", "text/css")):
        status, headers, body = get(base + path)
        assert status == 200 and headers["Content-Type"].startswith(ctype) and len(body) > 1000
        assert headers["Content-Security-Policy"] == page.CSP
    assert get(base + "/static/page.py")[0] == 404


def test_a_summary_that_fails_is_a_500_not_a_dead_connection(served):
    exp, base = served
    exp.summary = lambda: 1 / 0
    assert get(base + "/api/v1/summary")[0] == 500


# --- page.js in a real browser ---------------------------------------------------------------------

# The figure and side panel as the server rendered them, parsed by the browser like the page.
SERVED = """fetch(location.href).then(r => r.text()).then(t => {
  const d = new DOMParser().parseFromString(t, "text/html");
  return {figure: d.getElementById("figure").outerHTML, side: d.getElementById("side").outerHTML,
          banner: d.getElementById("banner").outerHTML};
})"""
LIVE = """({figure: document.getElementById("figure").outerHTML, side: document.getElementById("side").outerHTML,
          banner: document.getElementById("banner").outerHTML})"""


def test_page_js_draws_what_the_server_rendered(served, tmp_path):
    """Without JavaScript the snapshot; with it, the same DOM from the JSON: the two renderings
    cannot drift apart. Then with other numbers, and in the other namespace."""
    exp, base = served
    data = {"summary": summary.build(**inputs())}
    exp.summary = lambda: data["summary"]
    exp.ready.set()
    with Browser(tmp_path) as b:
        b.open(base + "/")
        b.wait_for("document.body.dataset.updated", 20, "page.js drew the summary")
        assert b.eval(LIVE) == b.eval(SERVED)
        later = inputs(syn_retransmits=True)
        later["span"] = (later["span"][0], (later["span"][1][0] + 5, later["span"][1][1]))
        later["anomalies"] = []
        data["summary"] = summary.build(**later)
        b.wait_for("document.querySelector('#counter-syn_retransmits') !== null", 20, "the next poll drawn")
        assert b.eval("document.querySelector('#e-CLOSE-SYN_SENT text').textContent") == "5.33/s"
        assert b.eval(LIVE) == b.eval(SERVED)
        b.eval("document.querySelector('#netns a[data-netns=blue]').click()")
        assert b.eval("location.search") == "?netns=blue"
        assert b.eval("document.querySelector('#n-LISTEN .sockets').textContent") == "1 socket"
        assert b.eval(LIVE) == b.eval(SERVED)  # SERVED fetches ?netns=blue now
        assert b.errors == [] and b.csp_violations() == []
        # The recorders work: an inline script is refused, and both see it.
        b.eval("document.body.appendChild(Object.assign(document.createElement('script'), {textContent: '1'}))")
        b.wait_for("window.__csp.length", 10, "the CSP violation recorded")
        assert b.csp_violations() == ["script-src-elem inline"]
        assert any("Content Security Policy" in e for e in b.errors), b.errors
