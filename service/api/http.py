"""The HTTP side of the server: ``/metrics`` (Prometheus), ``/healthz`` (liveness), ``/readyz`` (readiness).

A stdlib ``ThreadingHTTPServer`` on a daemon thread, so scrapes never wait on the asyncio loop that runs gRPC.
It binds to the configured host only (127.0.0.1 by default, 0.0.0.0 inside a container).

Hostile clients cannot pin it: at most ``max_connections`` connections are served at once (more are closed at
once), a connection that sends nothing for ``idle_timeout`` seconds is closed, and one request may take at most
``REQUEST_SECONDS_PER_IDLE`` idle timeouts in all (a client dripping one byte at a time is cut off too). A
client that goes away mid-response is logged at DEBUG, never as a traceback. With ``tls`` (``TlsFiles``: the
context of the moment, so a rotated certificate reaches new connections) the
handshake runs on the connection's own thread, under the same limits; when it checks client certificates
(mTLS), ``/metrics`` answers 403 to a connection without one, while ``/healthz`` and ``/readyz`` stay open.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hmac
import json
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric

from service.metrics import Metrics

if TYPE_CHECKING:
    from service.api.tls import TlsFiles

log = logging.getLogger(__name__)


REQUEST_SECONDS_PER_IDLE = 3  # a whole request (headers, TLS handshake) gets at most this many idle timeouts
LINGER_SECONDS = 2.0  # after our side closed: how long what the client still sends is read and dropped
LINGER_BYTES = 32 << 20  # ... and how much of it at most


def linger(connection: socket.socket) -> None:
    """A lingering close (as nginx's ``lingering_close``): our side is shut, then what the client still sends (the
    body of a request answered without reading it) is read and dropped until it closes too, for
    ``LINGER_SECONDS`` at most. Closing with unread bytes would make the kernel reset the connection, and a client
    still sending would get that reset instead of the answer already on its way."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_WR)
        deadline, drained = time.monotonic() + LINGER_SECONDS, 0
        while drained < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
            connection.settimeout(left)
            chunk = connection.recv(65536)
            if not chunk:
                break
            drained += len(chunk)


class _Only:
    """A registry's samples whose names are in ``names`` (``/metrics?name[]=...``), every collector's: those that do
    not say their names up front (the process collector) too, which ``restricted_registry`` would leave out."""

    def __init__(self, registry: Any, names: list[str]) -> None:
        self.registry, self.names = registry, set(names)

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            samples = [s for s in family.samples if s.name in self.names]
            if samples:
                kept = Metric(family.name, family.documentation, family.type, family.unit)
                kept.samples = samples
                yield kept


# What a private metrics port (one with a token: a frontend's, another engine's) answers its engine when asked for
# it (Accept): the samples as JSON, not as OpenMetrics text (``samples_document``).
SAMPLES_TYPE = "application/vnd.seqserve.samples+json"


def sample_rows(families: Iterable[Metric]) -> list[list[Any]]:
    """Metric families' samples as ``samples_document`` lays them out: ``[[family, [[sample, labels, value, exemplar
    or null], ...]], ...]``, an exemplar as ``[labels, value, timestamp]``, ``_created`` samples left out (they do
    not add up). The engine reads any other endpoint's parsed OpenMetrics through it too."""
    return [
        [
            family.name,
            [
                [s.name, s.labels, s.value, None if s.exemplar is None else list(s.exemplar)]
                for s in family.samples
                if not s.name.endswith("_created")
            ],
        ]
        for family in families
    ]


def samples_document(registry: Any) -> bytes:
    """A registry's samples for the engine that sums them (``service.engine.metrics.SummedFamilies``), as
    ``sample_rows``: the same samples as the OpenMetrics text, without the text, which the engine parsed in Python at
    every scrape (``python -m bench.scrape``: a fifth of the engine's CPU per scrape since, docs/architecture.md);
    ``json.loads`` reads these in C."""
    return json.dumps(sample_rows(registry.collect()), separators=(",", ":")).encode()


def _host(client_address: Any) -> str:
    """A connection's client address without its port (an AF_INET or AF_INET6 address is a tuple)."""
    return str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck scrape never blocks shutdown
    request_queue_size = 128  # listen backlog: a burst of connections is accepted (and refused) fast, not dropped

    def __init__(
        self,
        address: tuple[str, int],
        metrics: Metrics | None,
        is_ready: Callable[[], bool],
        tls: TlsFiles | None = None,
        idle_timeout: float = 10.0,
        max_connections: int = 64,
        token: str | None = None,
        handler: type[BaseHTTPRequestHandler] | None = None,
        port_name: str = "metrics",
        reuse_port: bool = False,
        per_client: int | None = None,
    ) -> None:
        """``handler``: the request handler class (default: /metrics, /healthz, /readyz; the REST gateway
        brings its own). ``metrics`` counts the connections the port closes on its own (label ``port_name``).
        ``per_client``: the most connections one client address may hold at once (None: no limit of its own)."""
        self.token = token
        self.port_name = port_name
        self.allow_reuse_port = reuse_port  # (read by server_bind: frontends share the REST port, SO_REUSEPORT)
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.metrics = metrics
        self.is_ready = is_ready
        self.tls = tls
        self.idle_timeout = idle_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self.per_client = per_client
        self._held: dict[str, int] = {}  # client address -> connections it holds (with per_client)
        self._deadlines: dict[socket.socket, float] = {}  # live connection -> when its current request must end
        self._lock = threading.Lock()
        self._watchdog_stop = threading.Event()
        super().__init__(address, handler or _Handler)
        if metrics is not None:  # (bound: this port serves) its closed-connection counts start at 0
            metrics.http_port_serving(port_name)
        self._watchdog = threading.Thread(target=self._watch, name="metrics-http-watchdog", daemon=True)
        self._watchdog.start()

    # --- connection limits ----------------------------------------------------------------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._take_slot(client_address):
            if self.metrics is not None:
                self.metrics.http_connection_closed(self.port_name, "busy")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._free_slot(client_address)
            raise

    def _take_slot(self, client_address: Any) -> bool:
        """A connection slot for the client, unless every slot is taken or (``per_client``) the client's address
        holds its most: one client that opened connection after connection and dripped a byte into each held every
        slot, and probes of /healthz failed (a liveness probe there restarts the pod)."""
        host = _host(client_address)
        with self._lock:
            if self.per_client is not None and self._held.get(host, 0) >= self.per_client:
                log.debug("%s http: %s refused, it holds %d connections", self.port_name, host, self.per_client)
                return False
            if not self._slots.acquire(blocking=False):
                log.debug("%s http: %s refused, all connection slots are busy", self.port_name, client_address)
                return False
            if self.per_client is not None:
                self._held[host] = self._held.get(host, 0) + 1
            return True

    def _free_slot(self, client_address: Any) -> None:
        host = _host(client_address)
        with self._lock:
            if self.per_client is not None:
                left = self._held.get(host, 1) - 1
                if left > 0:
                    self._held[host] = left
                else:
                    self._held.pop(host, None)
            self._slots.release()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """``ThreadingMixIn``'s, with the connection's slot freed before its socket closes: a client that saw its
        connection end and connects again at once found the slot still held, and was refused as busy."""
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            with self._lock:
                self._deadlines.pop(request, None)
            self._free_slot(client_address)
            self.shutdown_request(request)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(self.idle_timeout)
        self.restart_clock(request)
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        raw = request
        tls = self.tls.context().wrap_socket(raw, server_side=True)  # handshake here, bounded like a request
        with self._lock:
            self._deadlines.pop(raw, None)
        self.restart_clock(tls)
        try:
            super().finish_request(tls, client_address)
        finally:
            # wrap_socket took the connection over from ``raw``, which shutdown_request then closes in vain: the
            # TLS socket is closed here, or every connection would sit in CLOSE-WAIT until the watchdog's deadline.
            with self._lock:
                self._deadlines.pop(tls, None)
            with contextlib.suppress(OSError):
                tls.shutdown(socket.SHUT_WR)
            tls.close()

    def restart_clock(self, connection: Any) -> None:
        """A new request on ``connection``: it gets ``REQUEST_SECONDS_PER_IDLE`` idle timeouts from now."""
        with self._lock:
            self._deadlines[connection] = time.monotonic() + REQUEST_SECONDS_PER_IDLE * self.idle_timeout

    def _watch(self) -> None:
        step = min(0.5, self.idle_timeout / 4)
        while not self._watchdog_stop.wait(step):
            now = time.monotonic()
            with self._lock:
                late = [conn for conn, deadline in self._deadlines.items() if deadline <= now]
                for conn in late:
                    del self._deadlines[conn]
            for conn in late:
                log.debug("%s http: closing a connection that exceeded its request time", self.port_name)
                if self.metrics is not None:
                    self.metrics.http_connection_closed(self.port_name, "timeout")
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)  # wakes the blocked read: the connection's thread ends

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up, time out or fail the TLS handshake are routine: one DEBUG line, no traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # BrokenPipe, ConnectionReset, TimeoutError, ssl.SSLError
            log.debug("%s http: %s: %s", self.port_name, client_address, type(exc).__name__)
        else:
            log.exception("%s http: unexpected error serving %s", self.port_name, client_address)

    def server_close(self) -> None:
        self._watchdog_stop.set()
        super().server_close()


class KeptAliveHandler(BaseHTTPRequestHandler):
    """What every handler on a ``_Server`` shares: HTTP/1.1 keep-alive, each request on the connection with its
    own time (``_Server.restart_clock``), and answers that leave at once."""

    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: Prometheus reuses its connection between scrapes
    # Headers and body leave as two writes: with Nagle on, the body of every answer on a kept-alive connection
    # waited for the client's delayed ACK of the headers (``python -m bench.rest`` times /healthz).
    disable_nagle_algorithm = True

    lingers = False  # the answer leaves before the request's body was read: see ``unread_body``

    def unread_body(self) -> None:
        """This request's body is not read: the connection closes after the answer, lingering (``linger``), so the
        rest of the body is neither taken for a next request nor answered with a reset."""
        self.close_connection = self.lingers = True

    def finish(self) -> None:
        super().finish()
        if self.lingers:
            linger(self.connection)

    def parse_request(self) -> bool:
        """The standard library's parse, and two refusals it lacks (400, the connection closes: where the request
        ends is unknown, so nothing after it may be read as a next request): a header line that is no header (no
        colon, or whitespace before it: RFC 9112 5.1), at which the library stopped reading headers, dropping
        ``Content-Length`` and those after it, so the body was read as the next request (request smuggling); and a
        ``Transfer-Encoding`` whose last coding is not chunked (RFC 9112 6.1), which it ignored for the
        ``Content-Length`` beside it."""
        if not super().parse_request():
            return False
        if self.headers.defects:
            self.send_error(
                400, "Bad request header", "a header line is not 'Name: value' (no colon, or space before the "
                "colon); fix the client or the proxy that sends it",
            )  # fmt: skip
            return False
        codings = ",".join(self.headers.get_all("Transfer-Encoding") or ())
        last = codings.rsplit(",", 1)[-1].strip().lower()
        if codings and last != "chunked":
            self.send_error(
                400, "Bad Transfer-Encoding", f"Transfer-Encoding {codings[:40]!r} does not end in chunked, so where "
                "the body ends is unknown; send the body with a Content-Length alone",
            )  # fmt: skip
            return False
        return True

    def send_response_only(self, code: int, message: str | None = None) -> None:
        if self.request_version == "HTTP/0.9":  # (a request line the library refused: its answer had no status line,
            self.request_version = self.protocol_version  # no headers, only the body; HTTP/0.9 is not served)
        super().send_response_only(code, message)

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection:
            self.server.restart_clock(self.request)  # keep-alive: the next request gets its own time
            self.handle_one_request()


class _Handler(KeptAliveHandler):
    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def _not_allowed(self) -> None:
        """Any other method: 405 naming the two this port takes (not the standard library's 501 HTML page)."""
        body = f"{self.command} is not served here: /metrics, /healthz and /readyz take GET (or HEAD)\n".encode()
        self.close_connection = True  # (its body, if any, is left unread)
        headers = {"Allow": "GET, HEAD", "Connection": "close"}
        self._send(405, body, "text/plain; charset=utf-8", head=False, headers=headers)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _respond(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        token = self.server.token
        sent = self.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if token is not None and not hmac.compare_digest(sent, f"Bearer {token}".encode()):  # (bytes: any header)
            self._send(403, b"a private port: only its engine reads it\n", "text/plain; charset=utf-8", head)
        elif path == "/metrics" and not self._certified():
            self._send(403, b"client certificate required for /metrics (mTLS)\n", "text/plain; charset=utf-8", head)
        elif path == "/metrics":
            # text/plain 0.0.4 by default; OpenMetrics when the scraper asks for it (Accept header); on a private
            # port, the samples as JSON when its engine asks for them.
            accept = self.headers.get("Accept", "")
            encoder, content_type = choose_encoder(accept)
            if token is not None and SAMPLES_TYPE in (kind.split(";")[0].strip() for kind in accept.split(",")):
                encoder, content_type = samples_document, SAMPLES_TYPE
            registry: Any = self.server.metrics.registry  # type: ignore[union-attr]  # (set for this handler)
            names = parse_qs(self.path.partition("?")[2]).get("name[]")
            if names:  # only these samples, as prometheus_client's own handler answers ?name[]=...
                registry = _Only(registry, names)
            try:
                body = encoder(registry)
            except Exception:  # a broken collector must not kill the endpoint; say so and log the cause
                log.exception("collecting metrics failed")
                self._send(500, b"collecting metrics failed\n", "text/plain; charset=utf-8", head)
                return
            # Compressed when the scraper accepts it (Prometheus does): a multi-worker scrape is tens of KB.
            gzipped = gzip_accepted(self.headers.get("Accept-Encoding", ""))
            self._send(200, gzip.compress(body) if gzipped else body, content_type, head, gzipped)
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

    def _certified(self) -> bool:
        """False only when the port checks client certificates (mTLS) and this connection has none."""
        tls = self.server.tls
        if tls is None or not tls.client_certificates:
            return True
        return isinstance(self.connection, ssl.SSLSocket) and bool(self.connection.getpeercert())

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        head: bool,
        gzipped: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s - " + format, self.address_string(), *args)


class HttpPort:
    """A ``_Server`` on a daemon thread. ``start()`` binds (port 0 = a free one) and returns the bound port;
    ``stop()`` shuts it down and closes the socket. Both are idempotent. ``build`` makes the server for an
    address; ``what`` and ``setting`` name the port in the error a taken port gives; ``thread`` names the thread
    that serves it."""

    def __init__(
        self, host: str, port: int, build: Callable[[tuple[str, int]], _Server], what: str, setting: str, thread: str
    ) -> None:
        self.host, self.port = host, port
        self._build, self._what, self._setting, self._thread_name = build, what, setting, thread
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _fix(self, exc: OSError) -> str:
        """What to change after a failed bind: the host when it is no address of this machine, else the port."""
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            return f"{self.host!r} is not an address of this machine: set --host (SEQSERVE_HOST) to one it has"
        if exc.errno == errno.EACCES:
            return f"a port below 1024 needs privileges: choose another port: {self._setting}"
        return f"another process listens there? choose another port: {self._setting}"

    def start(self) -> int:
        if self._server is None:
            try:
                self._server = self._build((self.host, self.port))
            except OSError as exc:
                raise RuntimeError(
                    f"cannot bind the {self._what} {self.host}:{self.port}: {exc.strerror or exc} ({self._fix(exc)})"
                ) from None
            self._thread = threading.Thread(target=self._server.serve_forever, name=self._thread_name, daemon=True)
            self._thread.start()
        return self.bound_port

    @property
    def bound_port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"the {self._what} is not started")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is not None:
            server.shutdown()  # waits for serve_forever to return
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)


class MetricsHttpServer(HttpPort):
    """/metrics, /healthz and /readyz (``HttpPort``: ``start()``, ``bound_port``, ``stop()``)."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        is_ready: Callable[[], bool],
        *,
        tls: TlsFiles | None = None,
        idle_timeout: float = 10.0,
        max_connections: int = 64,
        token: str | None = None,
    ) -> None:
        """``token``: every request must carry ``authorization: Bearer <token>`` (a frontend's private port,
        which only its engine reads)."""
        self.token = token

        def build(address: tuple[str, int]) -> _Server:
            # One client address holds a quarter of the slots at most (two at least): Prometheus and the probes each
            # need one or two, and none of them can be crowded out by one client.
            per_client = max(2, max_connections // 4)
            return _Server(address, metrics, is_ready, tls, idle_timeout, max_connections, token, per_client=per_client)

        super().__init__(host, port, build, "metrics port", "--metrics-port or SEQSERVE_METRICS_PORT", "metrics-http")

    def start(self) -> int:
        started = self._server is None
        port = super().start()
        if started and self.token is None:
            log.info("metrics/health HTTP on %s:%d", self.host, port)
        elif started:
            log.debug("private metrics for the engine on %s:%d", self.host, port)
        return port
