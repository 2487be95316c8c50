"""server.py: the HTTP endpoints: / (the live state machine), /api/v1/summary, /metrics, /-/healthy and /-/ready; TLS and basic auth from a web config."""

from __future__ import annotations

import html
import json
import logging
import os
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from monitor import __version__
from monitor.serve import page
from monitor.serve.webconfig import WebConfig, WebConfigError
from monitor.settings import ListenAddress

log = logging.getLogger(__name__)

# Until the probes are attached there is no state machine to draw: / shows this instead.
LANDING = """<!doctype html>
<html><head><meta charset="utf-8"><title>tcpstate</title></head>
<body>
<h1>tcpstate {version}</h1>
<p>Live TCP connection states, resets and failed connects, counted in the kernel. The live state
machine appears here once the probes are attached.</p>
<ul>
<li><a href="/metrics">/metrics</a>: Prometheus metrics</li>
<li><a href="/-/healthy">/-/healthy</a>: 200 while the process serves</li>
<li><a href="/-/ready">/-/ready</a>: 200 once every probe is attached ({ready})</li>
</ul>
<p>Filters: {filters}</p>
</body></html>
"""


HANDSHAKE_TIMEOUT = 10.0  # seconds any one read or write of the TLS handshake may stall
PAUSE_GRACE = 2.0  # seconds pause() lets requests being answered finish before it cuts them
REQUEST_TIMEOUT = 30.0  # seconds any one read or write of a request may stall
# What Go's net/http answers on a TLS port to a plain-HTTP request (the toolkit's servers).
PLAIN_HTTP_REFUSAL = b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
PAGE_HEADERS = {"Content-Security-Policy": page.CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer"}


class ServerError(RuntimeError):
    """The listen address could not be bound."""


class _Handler(BaseHTTPRequestHandler):
    server_version = f"tcpstate/{__version__}"
    timeout = REQUEST_TIMEOUT  # a stalled client must not hold its thread for ever

    def do_GET(self):  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        app: HttpServer = self.server.app
        web = app.web_config
        if web is not None:
            try:
                web.refresh()
            except WebConfigError:  # logged once by refresh; fail closed, as the toolkit does
                self._send(500, b"Internal Server Error\n", "text/plain; charset=utf-8")
                return
            if not web.check_auth(self.headers.get("Authorization")):
                self._send(401, b"Unauthorized\n", "text/plain; charset=utf-8", {"WWW-Authenticate": "Basic"})
                return
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
            self._page(app, self.path.partition("?")[2])
        elif path == "/api/v1/summary":
            if app.summary is None:
                self._send(503, b'{"error": "probes not attached yet"}\n', "application/json")
                return
            try:
                body = json.dumps(app.summary(), separators=(",", ":"), allow_nan=False).encode()
            except Exception:
                log.exception("summary failed")
                self._send(500, b'{"error": "summary failed"}\n', "application/json")
                return
            self._send(200, body, "application/json", {"Cache-Control": "no-store"})
        elif (static := page.asset(path)) is not None:
            self._send(200, static[0], static[1], PAGE_HEADERS)
        else:
            self._send(404, b"not found\n", "text/plain")

    def _page(self, app: "HttpServer", query: str) -> None:
        ready = app.ready.is_set()
        if app.summary is None:
            body = LANDING.format(version=__version__, ready="ready" if ready else "not ready",
                                  filters=html.escape(app.filters_text))
        else:
            netns = parse_qs(query).get("netns", [""])[0]
            body = page.render(app.summary(), netns, ready)
        self._send(200, body.encode(), "text/html; charset=utf-8", dict(PAGE_HEADERS, **{"Cache-Control": "no-store"}))

    def _send(self, code: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def end_headers(self):
        # Here rather than in _send, so error pages of http.server (400, 501) carry them too.
        web = self.server.app.web_config
        if web is not None:
            for name, value in web.headers:
                self.send_header(name, value)
        super().end_headers()

    def log_message(self, fmt, *args):  # scrapes would flood stderr
        log.debug("%s %s", self.address_string(), fmt % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 overflows when many scrapers arrive at once
    allow_reuse_address = True
    dual_stack = False

    def __init__(self, *args, **kwargs):
        self._conns: set = set()  # connections being served, for end_connections()
        self._conns_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def _track(self, add=None, remove=None) -> None:
        with self._conns_lock:
            self._conns.discard(remove)
            if add is not None:
                self._conns.add(add)

    def process_request(self, request, client_address):
        self._track(add=request)
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._track(remove=request)

    def _shutdown_all(self, how: int) -> int:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(how)
            except OSError:  # already closed
                pass
        return len(conns)

    def end_connections(self, grace: float) -> None:
        """End every connection being served, so that its thread ends too, whatever the client
        does (a client trickling bytes would otherwise hold it for as long as it likes). The read
        side goes first: a handler waiting for a request sees its end, one answering still writes
        its whole response. What is left after grace seconds is cut."""
        if not self._shutdown_all(socket.SHUT_RD):
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._conns_lock:
                if not self._conns:
                    return
            time.sleep(0.01)
        self._shutdown_all(socket.SHUT_RDWR)

    def handle_error(self, request, client_address):
        # A client that went away, or a connection pause() cut, is no error of ours.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            log.debug("%s: connection ended early: %s", client_address[0], sys.exc_info()[1])
            return
        super().handle_error(request, client_address)

    def server_bind(self):
        if self.dual_stack:  # ":PORT" serves IPv4 and IPv6, like node_exporter
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def finish_request(self, request, client_address):
        # Runs in the connection's own thread, so a slow handshake never holds up accept().
        web = self.app.web_config
        if web is None or not web.tls:
            return super().finish_request(request, client_address)
        conn = _tls_accept(request, client_address, web)
        if conn is None:
            return None
        self._track(add=conn, remove=request)
        try:
            return super().finish_request(conn, client_address)
        finally:
            self._track(remove=conn)
            self.shutdown_request(conn)  # the plain socket was handed over to conn


def _tls_accept(sock: socket.socket, client_address, web: WebConfig) -> ssl.SSLSocket | None:
    """The handshake on an accepted socket, or None after refusing or failing it."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    try:
        first = sock.recv(1, socket.MSG_PEEK)
        if first and first != b"\x16" and first.isalpha():  # a request line, not a TLS record
            _refuse_plain_http(sock)
            log.debug("%s: plain HTTP on the TLS port refused", client_address[0])
            return None
        if not first:
            return None
        try:
            context = web.ssl_context()
        except WebConfigError:  # logged once by refresh
            return None
        conn = context.wrap_socket(sock, server_side=True)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; timeouts too
        log.debug("%s: TLS handshake failed: %s", client_address[0], exc)
        return None
    finally:
        if sock.fileno() != -1:  # still ours: not handed to an SSLSocket
            sock.close()
    if not web.peer_allowed(conn.getpeercert()):
        log.info("%s: client certificate names none of client_allowed_sans; connection closed", client_address[0])
        conn.close()
        return None
    conn.settimeout(REQUEST_TIMEOUT)
    return conn


def _refuse_plain_http(sock: socket.socket) -> None:
    # Read the request head first: closing with unread data would send a reset, and the
    # client would see that instead of the answer.
    deadline = time.monotonic() + 1.0
    seen = b""
    while b"\r\n\r\n" not in seen and len(seen) < 16384 and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    try:
        sock.settimeout(1.0)
        sock.sendall(PLAIN_HTTP_REFUSAL)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class HttpServer:
    """Owns the registry and the HTTP server thread."""

    def __init__(self, listen: ListenAddress, registry: CollectorRegistry, filters_text: str = "none",
                 web_config: WebConfig | None = None):
        self.listen = listen
        self.registry = registry
        self.filters_text = filters_text
        self.web_config = web_config
        # () -> the /api/v1/summary dict (summary.build); set once the probes are attached.
        self.summary: Callable[[], dict] | None = None
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

    def pause(self) -> None:
        """Stop accepting (the socket stays bound; new connections wait in its backlog) and end
        the connections being served, so that their threads end too: e.g. to drop privileges,
        which needs the process to have one thread. A request being answered gets its whole
        response if it takes less than PAUSE_GRACE."""
        if self._server is not None:
            self._server.shutdown()
            self._thread.join()
            self._server.end_connections(PAUSE_GRACE)

    def resume(self) -> None:
        if self._server is not None and not self._thread.is_alive():
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
