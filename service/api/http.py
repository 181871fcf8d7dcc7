"""The HTTP side of the server: ``/metrics`` (Prometheus), ``/healthz`` (liveness), ``/readyz`` (readiness).

A stdlib ``ThreadingHTTPServer`` on a daemon thread, so scrapes never wait on the asyncio loop that runs gRPC.
It binds to the configured host only (127.0.0.1 by default, 0.0.0.0 inside a container).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import choose_encoder

from service.metrics import Metrics

log = logging.getLogger(__name__)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck scrape never blocks shutdown

    def __init__(self, address: tuple[str, int], metrics: Metrics, is_ready: Callable[[], bool]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.metrics = metrics
        self.is_ready = is_ready
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: Prometheus reuses its connection between scrapes

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def _respond(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            # text/plain 0.0.4 by default; OpenMetrics when the scraper asks for it (Accept header).
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            try:
                body = encoder(self.server.metrics.registry)
            except Exception:  # a broken collector must not kill the endpoint; say so and log the cause
                log.exception("collecting metrics failed")
                self._send(500, b"collecting metrics failed\n", "text/plain; charset=utf-8", head)
                return
            self._send(200, body, content_type, head)
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8", head)
        elif path == "/readyz":
            try:
                ready = bool(self.server.is_ready())
            except Exception:
                log.exception("readiness check failed")
                ready = False
            if ready:
                self._send(200, b"ready\n", "text/plain; charset=utf-8", head)
            else:
                self._send(503, b"not ready\n", "text/plain; charset=utf-8", head)
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8", head)

    def _send(self, status: int, body: bytes, content_type: str, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s - " + format, self.address_string(), *args)


class MetricsHttpServer:
    """``start()`` binds and serves on a daemon thread, returning the bound port (port 0 = a free one);
    ``stop()`` shuts it down and closes the socket. Both are idempotent."""

    def __init__(self, host: str, port: int, metrics: Metrics, is_ready: Callable[[], bool]) -> None:
        self.host = host
        self.port = port
        self.metrics = metrics
        self.is_ready = is_ready
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        if self._server is None:
            self._server = _Server((self.host, self.port), self.metrics, self.is_ready)
            self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
            self._thread.start()
            log.info("metrics/health HTTP on %s:%d", self.host, self.bound_port)
        return self.bound_port

    @property
    def bound_port(self) -> int:
        if self._server is None:
            raise RuntimeError("MetricsHttpServer is not started")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is not None:
            server.shutdown()  # waits for serve_forever to return
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
