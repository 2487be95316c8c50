"""The HTTP endpoints, served on an ephemeral port with a registry fed by recorded data."""

import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily

from monitor.serve.http import PAUSE_GRACE, HttpServer, ServerError
from monitor.settings import ListenAddress


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
    exp = HttpServer(ListenAddress("127.0.0.1", 0), reg, filters_text="include <10.0.0.0/8>")
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
    exp = HttpServer(ListenAddress("", 0), CollectorRegistry())
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
        exp = HttpServer(ListenAddress("127.0.0.1", holder.getsockname()[1]), CollectorRegistry())
        with pytest.raises(ServerError, match="in use"):
            exp.start()


class _SlowCollector:
    """A scrape that waits until the test lets it finish."""

    def __init__(self):
        self.inside, self.release = threading.Event(), threading.Event()

    def collect(self):
        self.inside.set()
        assert self.release.wait(10)
        yield GaugeMetricFamily("tcpstate_test_slow", "A scrape that took its time.", value=1)


def test_pause_lets_a_response_being_written_finish():
    """pause() (before the privilege drop) used to cut every connection at once: a scrape or a
    readiness probe being answered got half a response (IncompleteRead) and the daemon printed a
    BrokenPipeError traceback. Now the request finishes whole and nothing is printed."""
    slow = _SlowCollector()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(slow)
    exp = HttpServer(ListenAddress("127.0.0.1", 0), reg)
    exp.start()
    try:
        result = {}
        client = threading.Thread(target=lambda: result.update(r=get(f"http://127.0.0.1:{exp.port}/metrics")))
        client.start()
        assert slow.inside.wait(5)
        pausing = threading.Thread(target=exp.pause)
        pausing.start()
        deadline = time.monotonic() + 5
        while exp._thread.is_alive() and time.monotonic() < deadline:  # accept loop stopped: the cut comes next
            time.sleep(0.01)
        time.sleep(0.2)
        slow.release.set()
        client.join(5)
        pausing.join(5)
        status, _, body = result["r"]
        assert status == 200 and "tcpstate_test_slow 1.0" in body
        exp.resume()
        assert get(f"http://127.0.0.1:{exp.port}/-/healthy")[0] == 200
    finally:
        slow.release.set()
        exp.stop()


def _request_threads():
    return [t for t in threading.enumerate() if "process_request" in t.name]


def test_pause_ends_a_client_that_never_finishes_its_request(capsys):
    exp = HttpServer(ListenAddress("127.0.0.1", 0), CollectorRegistry())
    exp.start()
    try:
        with socket.create_connection(("127.0.0.1", exp.port)) as trickler:
            trickler.sendall(b"GET /metr")
            time.sleep(0.2)  # its handler is reading
            t0 = time.monotonic()
            exp.pause()
            assert time.monotonic() - t0 < PAUSE_GRACE  # its read ended at once: no wait for the grace
            deadline = time.monotonic() + 5
            while _request_threads() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not _request_threads()  # the client still holds its end; the server let go
        exp.resume()
        assert get(f"http://127.0.0.1:{exp.port}/-/healthy")[0] == 200
    finally:
        exp.stop()
    assert "Traceback" not in capsys.readouterr().err
