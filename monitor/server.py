"""server.py: the HTTP endpoints: / (landing page), /metrics, /-/healthy and /-/ready."""

from __future__ import annotations

import html
import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from . import __version__
from .config import ListenAddress

log = logging.getLogger(__name__)

LANDING = """<!doctype html>
<html><head><meta charset="utf-8"><title>tcpstate</title></head>
<body>
<h1>tcpstate {version}</h1>
<p>Live TCP connection states, resets and failed connects, counted in the kernel.</p>
<ul>
<li><a href="/metrics">/metrics</a>: Prometheus metrics</li>
<li><a href="/-/healthy">/-/healthy</a>: 200 while the process serves</li>
<li><a href="/-/ready">/-/ready</a>: 200 once every probe is attached ({ready})</li>
</ul>
<p>Filters: {filters}</p>
</body></html>
"""


class ServerError(RuntimeError):
    """The listen address could not be bound."""


class _Handler(BaseHTTPRequestHandler):
    server_version = f"tcpstate/{__version__}"

    def do_GET(self):  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        app: Exporter = self.server.app
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            try:
                body = encoder(app.registry)
            except Exception:
                log.exception("scrape failed")
                self._send(500, b"scrape failed\n", "text/plain")
                return
            self._send(200, body, content_type)
        elif path == "/-/healthy":
            self._send(200, b"OK\n", "text/plain")
        elif path == "/-/ready":
            if app.ready.is_set():
                self._send(200, b"OK\n", "text/plain")
            else:
                self._send(503, b"probes not attached yet\n", "text/plain")
        elif path == "/":
            page = LANDING.format(version=__version__, ready="ready" if app.ready.is_set() else "not ready",
                                  filters=html.escape(app.filters_text))
            self._send(200, page.encode(), "text/html; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):  # scrapes would flood stderr
        log.debug("%s %s", self.address_string(), fmt % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    dual_stack = False

    def server_bind(self):
        if self.dual_stack:  # ":PORT" serves IPv4 and IPv6, like node_exporter
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class Exporter:
    """Owns the registry and the HTTP server thread."""

    def __init__(self, listen: ListenAddress, registry: CollectorRegistry, filters_text: str = "none"):
        self.listen = listen
        self.registry = registry
        self.filters_text = filters_text
        self.ready = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        host = self.listen.host
        dual = host == "" and socket.has_ipv6 and os.path.exists("/proc/net/if_inet6")
        if host == "":
            host = "::" if dual else "0.0.0.0"
        server_cls = type("Server", (_Server,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET, "dual_stack": dual})
        try:
            self._server = server_cls((host, self.listen.port), _Handler)
        except OSError as exc:
            raise ServerError(f"cannot listen on {self.listen}: {exc.strerror or exc}"
                              + (" (another process holds the port; pick one with --listen-address)"
                                 if exc.errno == 98 else "")) from None
        self._server.app = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
