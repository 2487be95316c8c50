"""The HTTP endpoints, served on an ephemeral port with a registry fed by recorded data."""

import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Gauge

from monitor.config import ListenAddress
from monitor.server import Exporter, ServerError


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read().decode()


@pytest.fixture
def exporter():
    reg = CollectorRegistry()
    Gauge("tcpstate_test_value", "A test value.", registry=reg).set(7)
    exp = Exporter(ListenAddress("127.0.0.1", 0), reg, filters_text="include <10.0.0.0/8>")
    exp.start()
    yield exp
    exp.stop()


def test_endpoints(exporter):
    base = f"http://127.0.0.1:{exporter.port}"
    assert get(base + "/-/healthy")[0] == 200
    assert get(base + "/-/ready")[0] == 503
    exporter.ready.set()
    assert get(base + "/-/ready")[0] == 200
    status, ctype, body = get(base + "/metrics")
    assert status == 200 and ctype.startswith("text/plain") and "tcpstate_test_value 7.0" in body
    status, ctype, page = get(base + "/")
    assert status == 200 and "text/html" in ctype and "/metrics" in page
    assert "include &lt;10.0.0.0/8&gt;" in page  # escaped
    assert get(base + "/missing")[0] == 404


def test_openmetrics_on_request(exporter):
    req = urllib.request.Request(f"http://127.0.0.1:{exporter.port}/metrics",
                                 headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        assert r.read().decode().endswith("# EOF\n")


def test_all_addresses_serves_ipv4_and_ipv6():
    exp = Exporter(ListenAddress("", 0), CollectorRegistry())
    exp.start()
    try:
        for host in ("127.0.0.1", "[::1]"):
            assert get(f"http://{host}:{exp.port}/-/healthy")[0] == 200
    finally:
        exp.stop()


def test_port_in_use():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        exp = Exporter(ListenAddress("127.0.0.1", holder.getsockname()[1]), CollectorRegistry())
        with pytest.raises(ServerError, match="in use"):
            exp.start()
