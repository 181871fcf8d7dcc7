"""The REST port: ``RestGateway`` and its handler's HTTP side (methods, CORS preflights, bodies, refusals)."""

from __future__ import annotations

import logging
import re
import ssl
import time
import zlib
from typing import TYPE_CHECKING, Any

import grpc

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.gen.seqserve.v1 import autocomplete_pb2_grpc
from service.api.http import REQUEST_SECONDS_PER_IDLE, HttpPort, _Server
from service.api.principals import UnknownAttribute, subject_of_peercert
from service.api.rest.common import HttpError, Reply, error_json, route_of
from service.api.rest.endpoints import Endpoints
from service.errors import echo
from service.metrics import Metrics

if TYPE_CHECKING:
    from service.api.tls import TlsFiles

log = logging.getLogger(__name__)

METHODS = ("GET", "HEAD", "POST")  # and OPTIONS (what the server takes, and CORS preflights)
CORS_MAX_AGE = 600  # seconds a browser may reuse a preflight's answer
CORS_MAX_HEADERS = 64  # request headers a preflight may ask for (a browser asks for a few; each is echoed back)
GZIP_MEMBERS = 16  # members a gzip request body may have (RFC 1952 allows several; each is a decompressor)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}")  # a header name (RFC 9110's token)


class RestGateway(HttpPort):
    """The REST port (``HttpPort``: ``start()``, ``bound_port``, ``stop()``), forwarding to the gRPC server at
    ``target`` over one channel, open while the port is."""

    def __init__(
        self,
        host: str,
        port: int,
        target: str,
        *,
        max_body_bytes: int,
        idle_timeout: float = 10.0,
        max_connections: int = 64,
        cors_origins: list[str] | tuple[str, ...] = (),
        keyed: bool = False,
        metrics: Metrics | None = None,
        share_port: bool = False,
        tls: TlsFiles | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.tls = tls is not None  # this port speaks TLS only
        self.client_certificates = tls is not None and tls.client_certificates  # mTLS: each request needs one
        self.token = token  # vouches for a caller's subject to the server (over its Unix socket only)
        self.metrics = metrics  # seqserve_http_*: every answer, and the connections the port closes
        self.keyed = keyed  # API keys are on: the gateway's own refusals go to callers the server accepts only
        self.cors_origins = frozenset(cors_origins)  # lower case, or {"*"} (Settings checks them)
        self.max_body_bytes = max_body_bytes
        self.call_timeout = REQUEST_SECONDS_PER_IDLE * idle_timeout  # the connection's own bound on a request
        self._channel: grpc.Channel | None = None
        self.stub: Any = None
        self.autocomplete: Any = None  # (generate, generate_stream)

        def build(address: tuple[str, int]) -> _Server:
            server = _Server(
                address,
                metrics,
                lambda: True,
                tls,
                idle_timeout,
                max_connections,
                handler=_RestHandler,
                port_name="rest",
                reuse_port=share_port,
            )
            server.gateway = self  # type: ignore[attr-defined]  # (what its handlers forward through)
            return server

        super().__init__(host, port, build, "REST port", "--http-port or SEQSERVE_HTTP_PORT", "rest-http")

    def start(self) -> int:
        if self._channel is None:
            limit = self.max_body_bytes + 1024 * 1024  # (the server, not the channel, refuses an over-large request)
            options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", -1)]
            self._channel = grpc.insecure_channel(self.target, options=options)
            self.stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
            self.autocomplete = autocomplete_pb2_grpc.AutocompleteStub(self._channel)
            try:
                port = super().start()
            except RuntimeError:
                self.stop()
                raise
            tls = ", TLS" + (" + client certificates" if self.client_certificates else "") if self.tls else ""
            log.info("KServe v2 REST on %s:%d (to gRPC at %s%s)", self.host, port, self.target, tls)
        return self.bound_port

    def stop(self) -> None:
        super().stop()
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()


class _RestHandler(Endpoints):
    _status: int | None = None  # the answer's, once sent (send_response)
    _began = 0.0  # perf_counter() when the request's first line was in

    def handle_one_request(self) -> None:
        """One request and its answer, counted once answered (``seqserve_http_*``; a connection that closes
        before a request line is not a request)."""
        self._status = None
        try:
            super().handle_one_request()
        finally:
            metrics = self.gateway.metrics
            if self._status is not None and metrics is not None:
                method = self.command if self.command in (*METHODS, "OPTIONS") else "other"
                route = route_of(getattr(self, "path", "") or "")
                metrics.http_answered(method, route, self._status, time.perf_counter() - self._began)

    def parse_request(self) -> bool:
        self._began = time.perf_counter()
        return super().parse_request()

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def version_string(self) -> str:
        return "seqserve"  # (not the stdlib's "BaseHTTP/0.6 Python/3.11.x")

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_OPTIONS(self) -> None:
        """A CORS preflight (``Origin`` and ``Access-Control-Request-Method``): 204 with what the page may send when
        its origin is in ``cors_origins``, else 403/405/400 saying why; any other OPTIONS: 204 with ``Allow``. Never
        forwarded (a browser sends no API key with a preflight)."""
        self._request_id = None
        if self.headers.get("Content-Length", "0") not in ("", "0") or "Transfer-Encoding" in self.headers:
            self.unread_body()  # (a preflight has none: its connection stays open for the request it announces)
        origin, method = self.headers.get("Origin"), self.headers.get("Access-Control-Request-Method")
        if origin is None or method is None:
            self._no_content({"Allow": ", ".join((*METHODS, "OPTIONS"))})
            return
        listed = self.headers.get("Access-Control-Request-Headers", "")
        asked = [h.strip() for h in listed.split(",") if h.strip()]
        refusal = self._preflight_refusal(origin, method, asked)
        if refusal is None and listed.strip() and not asked:  # (",,,": a list, of no header)
            refusal = 400, f"Access-Control-Request-Headers {echo(listed, 40)} names no header"
        if refusal is not None:
            status, message = refusal
            self._send(status, self._error(status, message), {"Vary": "Origin"}, head=False)
            return
        answer = self._cors() | {"Access-Control-Allow-Methods": ", ".join(METHODS)}
        if asked:  # any header: those the API reads (Authorization, Content-Type, X-Request-Id, ...) and those an SDK
            answer["Access-Control-Allow-Headers"] = ", ".join(asked)  # adds and nothing reads (OpenAI's X-Stainless-*)
        self._no_content(answer | {"Access-Control-Max-Age": str(CORS_MAX_AGE)})

    def _preflight_refusal(self, origin: str, method: str, asked: list[str]) -> tuple[int, str] | None:
        allowed = self.gateway.cors_origins
        if not allowed:
            return 403, (
                f"cross-origin requests are off on this port: to let pages of {echo(origin, 200)} call it, "
                "set SEQSERVE_CORS_ORIGINS to that origin (comma-separated for several, * for any)"
            )
        if "*" not in allowed and origin.lower() not in allowed:
            return 403, f"origin {echo(origin, 200)} is not in SEQSERVE_CORS_ORIGINS: its pages may not call this port"
        if method not in METHODS:
            return 405, f"method {echo(method, 20)} is not served: the KServe v2 REST API takes GET, HEAD and POST"
        if len(asked) > CORS_MAX_HEADERS:
            return 400, f"Access-Control-Request-Headers names {len(asked)} headers; at most {CORS_MAX_HEADERS}"
        for header in asked:
            if not _TOKEN.fullmatch(header):
                return 400, f"Access-Control-Request-Headers names {echo(header, 100)}, which is no header name"
        return None

    def _no_content(self, headers: dict[str, str]) -> None:
        self.send_response(204)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("X-Request-Id", self._own_request_id())
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def __getattr__(self, name: str) -> Any:
        """Any other method (``do_PUT``, ``do_DELETE``, ...): 405 with the JSON error, not the stdlib's HTML 501."""
        if not name.startswith("do_"):
            raise AttributeError(name)
        return self._other_method

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own refusals (a request line over 64 KiB: 414, too many or too long headers: 431, a
        malformed request line: 400) with the JSON error body every other answer has, instead of its HTML page."""
        self._request_id = None
        reason = message or self.responses.get(code, ("refused",))[0]
        text = f"{reason}: {explain}" if explain and explain != reason else reason
        payload = error_json(f"{text} (KServe v2 REST: see docs/kserve.md)")
        self.close_connection = True  # (what the stdlib does: the rest of such a request is not read)
        self.send_response(code, reason)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if getattr(self, "headers", None) is not None:  # (none when the request line itself was refused)
            self.send_header("X-Request-Id", self._own_request_id())
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(payload)

    def _other_method(self) -> None:
        self._request_id = None
        self.unread_body()  # (its body, if any)
        message = f"method {echo(self.command, 20)} is not served: the KServe v2 REST API takes GET, HEAD and POST"
        refused = HttpError(405, message, {"Allow": ", ".join((*METHODS, "OPTIONS"))})
        self._send(*self._refusal(refused), head=False)

    def _serve(self, method: str) -> None:
        self._request_id, self._keys = None, None
        try:
            body = self._body()
            reply = self._uncertified() or self._route(method, self.path.split("?", 1)[0], body)
            if reply is None:  # a stream, answered as it went
                return
            status, payload, headers = reply
        except HttpError as err:
            status, payload, headers = self._refusal(err)
        except grpc.RpcError as err:
            status, payload, headers = self._from_rpc(err)
        except Exception:  # a bug here must not take the gateway down: say so (to callers the server answers)
            log.exception("REST %s %s failed", method, echo(self.path, 200))
            internal: Reply = 500, self._error(500, "internal error in the REST gateway (logged)"), {}
            status, payload, headers = self._uncertified() or self._unauthenticated() or internal
        self._send(status, payload, headers, head=method == "HEAD")

    def _refusal(self, err: HttpError) -> Reply:
        """The gateway's own refusal, or the 403 of a caller without a client certificate (mTLS) or the 401 of one
        without a valid key, who learns nothing from it."""
        return (
            self._uncertified()
            or self._unauthenticated()
            or (err.status, self._error(err.status, err.message, err.param), err.headers)
        )

    def _uncertified(self) -> Reply | None:
        """With mTLS, the 403 of a connection without a verified client certificate that names a principal."""
        if not self.gateway.client_certificates:
            return None
        if self._peer is None:
            self._peer = _principal(self.connection)
        if self._peer[0] is not None:
            return None
        return 403, self._error(403, self._peer[1]), {}  # (as the metrics port answers /metrics)

    def _unauthenticated(self) -> Reply | None:
        """With API keys, the server's refusal of a caller without a valid one (401), so that the gateway's own
        refusals (a malformed body, an unknown path, a body over the limit) answer only callers the gRPC port would
        answer: asked with the caller's headers over loopback (``ServerMetadata``, the smallest call that needs a
        key: liveness and readiness need none), as every forwarded call is."""
        if not self.gateway.keyed:
            return None
        request_id = self._request_id
        try:
            self._call("ServerMetadata", pb.ServerMetadataRequest())
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return self._from_rpc(err)
        self._request_id = request_id  # (the refusal is not the probe's answer)
        return None

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self.unread_body()  # (the chunks)
            raise HttpError(411, "send the body with a Content-Length (chunked transfer is not accepted)")
        size, limit = self._content_length(), self.gateway.max_body_bytes
        if size > limit:
            self.unread_body()
            raise HttpError(
                413, f"the request body has {size} bytes, the limit is {limit} (SEQSERVE_MAX_MESSAGE_BYTES)"
            )
        try:
            body = self.rfile.read(size) if size else b""
        except TimeoutError:  # (the connection's idle timeout: it stopped sending)
            self.close_connection = True
            raise HttpError(
                408, f"the request body stopped arriving before its {size} bytes (Content-Length) were in"
            ) from None
        if len(body) != size:
            self.close_connection = True
            raise HttpError(400, f"the body ended after {len(body)} of its {size} bytes")
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("", "identity"):
            return body
        if encoding not in ("gzip", "deflate"):
            raise HttpError(415, f"Content-Encoding {echo(encoding, 40)} is not accepted: send gzip, deflate or none")
        return _inflate(body, encoding, limit)

    def _content_length(self) -> int:
        """The body's size. A Content-Length that is not one number (digits; one value, or the same one repeated)
        leaves where this request ends unknown: 400, and the connection closes, so that nothing after it is read
        as a next request (RFC 9112, 6.3)."""
        values = self.headers.get_all("Content-Length") or ["0"]
        text = values[0].strip() or "0"
        if not (text.isascii() and text.isdigit()) or any(v.strip() != values[0].strip() for v in values[1:]):
            self.unread_body()
            shown = ", ".join(echo(v, 40) for v in values[:2])
            raise HttpError(400, f"Content-Length {shown} is not one number; send the body's size in bytes, once")
        return int(text)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("rest %s - " + format, self.address_string(), *args)


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip (RFC 1952: one member or several, as ``cat a.gz b.gz`` makes) or zlib (``deflate``) body, whole:
    each member checked to its end (its CRC and size), nothing after it, at most ``limit`` bytes in all and at most
    ``GZIP_MEMBERS`` members (each costs a decompressor: a body of empty members must not cost one per 20 bytes)."""
    out: list[bytes] = []
    size, rest = 0, body
    for member in range(GZIP_MEMBERS):
        inflate = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            data = inflate.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            if member and not rest.startswith(b"\x1f\x8b"):  # (zlib's "incorrect header check" named no place)
                raise HttpError(
                    400, f"the gzip body has {len(rest)} bytes after its compressed data that are no gzip member"
                ) from None
            why = str(exc).split(": ", 1)[-1]  # ("Error -3 while decompressing data: invalid ..."
            which = f"member {member + 1} of the gzip body" if member else f"the {encoding} body"
            raise HttpError(400, f"{which} is not {encoding} data ({why}); compress it again") from None
        size += len(data)
        if size > limit:
            raise HttpError(413, f"the request body decompresses past the limit of {limit} bytes")
        out.append(data)
        if not inflate.eof:
            raise HttpError(400, f"the {encoding} body ends before its compressed data does (cut short, or corrupt)")
        rest = inflate.unused_data
        if not rest:
            return b"".join(out)
        if encoding != "gzip":
            raise HttpError(400, f"the {encoding} body has {len(rest)} bytes after its compressed data")
    raise HttpError(400, f"the gzip body has more than {GZIP_MEMBERS} members; compress it as one")


def _principal(connection: Any) -> tuple[str | None, str]:
    """(principal, "") of a TLS connection's verified client certificate, or (None, why there is none)."""
    cert = connection.getpeercert() if isinstance(connection, ssl.SSLSocket) else None
    if not cert:
        return None, (
            "this port needs a client certificate signed by the server's client CA (mTLS, SEQSERVE_TLS_CLIENT_CA): "
            "curl --cert/--key, tritonclient.http ssl_options certfile/keyfile, requests cert="
        )
    try:
        subject = subject_of_peercert(cert)
    except UnknownAttribute as exc:
        return None, (
            f"the client certificate's subject holds attribute {echo(str(exc), 100)}, which this port cannot spell as "
            "the gRPC port does: use a certificate with standard subject attributes (CN, O, OU, ...), or gRPC"
        )
    if subject is None:
        return None, "the client certificate names nobody (an empty subject and no subject alternative name)"
    return subject, ""
