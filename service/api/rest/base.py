"""The gateway's handler, its half that forwards: the gRPC call with the caller's headers, and the answer (its
headers, CORS, compression, the error body)."""

from __future__ import annotations

import gzip
import logging
import math
import os
import zlib
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message

from service.api.completions import error_body
from service.api.generate import spelled_as
from service.api.http import KeptAliveHandler
from service.api.interceptors import REQUEST_ID_FORM
from service.api.principals import GATEWAY_SUBJECT, GATEWAY_TOKEN
from service.api.rest.common import HEADER_LENGTH, HTTP_STATUS, Reply, error_json
from service.tracing import TRACEPARENT, parse_traceparent

if TYPE_CHECKING:
    from service.api.rest.gateway import RestGateway

log = logging.getLogger(__name__)

COMPRESS_FROM = 1024  # bytes: smaller answers leave as they are, when the client accepts compression
CORS_EXPOSED = ", ".join(("X-Request-Id", "Retry-After", "WWW-Authenticate", HEADER_LENGTH))  # a page may read them


class GatewayHandler(KeptAliveHandler):
    """A request's way to the gRPC port and back: ``_call`` forwards with the caller's headers (and, with mTLS, the
    subject the gateway vouches for), ``_from_rpc`` turns a status into its HTTP answer, ``_send`` writes an
    answer with its CORS headers and, when it pays, compressed."""

    _request_id: str | None = None  # the gRPC call's, for the X-Request-Id header
    _peer: tuple[str | None, str] | None = None  # mTLS: (the connection's principal or None, why none), once read
    # The gRPC call's fields -> the keys this request spelt them as (generate's text_input for prompt), which its
    # refusals name instead (``_from_rpc``); set by the endpoint that made the call, reset per request.
    _keys: dict[str, str] | None = None

    @property
    def gateway(self) -> RestGateway:
        return self.server.gateway  # type: ignore[attr-defined,no-any-return]

    def _cors(self) -> dict[str, str]:
        """The CORS headers of this request's answer: with an allowed ``Origin``, that it may be read (and which of
        its headers); ``Vary: Origin`` whenever the answer depends on the origin (a list, not ``*``)."""
        allowed = self.gateway.cors_origins
        origin = self.headers.get("Origin")
        if not allowed:
            return {}
        headers = {} if "*" in allowed else {"Vary": "Origin"}
        if origin is not None and ("*" in allowed or origin.lower() in allowed):
            headers["Access-Control-Allow-Origin"] = "*" if "*" in allowed else origin
            headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
        return headers

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        # Every Authorization header goes on, so the server refuses two as it refuses two over gRPC (the first
        # alone authenticated the call, whatever the second held: a proxy's key in front of the client's won);
        # one it cannot carry (not printable ASCII) goes as a key no principal has, never dropped.
        # (two at most: enough for the server to refuse two, whatever they hold)
        sent = [("authorization", _credential(v)) for v in (self.headers.get_all("Authorization") or [])[:2]]
        # Only what the server would read: a longer X-Request-Id is not an id to it, nor a traceparent that does not
        # parse; sent on, a long one went over gRPC's metadata limit, which answered 429 (RESOURCE_EXHAUSTED), even
        # on a health probe.
        request_id, traceparent = self.headers.get("X-Request-Id"), self.headers.get(TRACEPARENT)
        if request_id is not None and REQUEST_ID_FORM.fullmatch(request_id):
            sent.append(("x-request-id", request_id))
        if traceparent is not None and parse_traceparent(traceparent):
            sent.append((TRACEPARENT, traceparent.strip(" \t")))
        if self.gateway.token is not None and self._peer is not None and self._peer[0] is not None:
            sent += [(GATEWAY_SUBJECT, self._peer[0]), (GATEWAY_TOKEN, self.gateway.token)]
        return tuple(sent)

    def _own_request_id(self) -> str:
        """A request id for an answer no server call gave one to (the gateway's own refusals; a stream's, set before
        its call): the caller's ``X-Request-Id`` when the server would take it as one, else a fresh one."""
        sent = self.headers.get("X-Request-Id")
        return sent if sent is not None and REQUEST_ID_FORM.fullmatch(sent) else os.urandom(16).hex()

    def _call(self, rpc: str, request: Message) -> Any:
        method = getattr(self.gateway.stub, rpc)
        response, call = method.with_call(request, metadata=self._metadata(), timeout=self.gateway.call_timeout)
        self._note_request_id(call.trailing_metadata())
        return response

    def _note_request_id(self, metadata: Any) -> bool:
        """Takes the server's request id from a call's trailing metadata; whether it had one (every answer of the
        server's does: a call without one never reached it)."""
        for key, value in metadata or ():
            if key == "x-request-id":
                self._request_id = str(value)
                return True
        return False

    def _from_rpc(self, err: grpc.RpcError) -> Reply:
        from service.client import ApiError

        answered = self._note_request_id(err.trailing_metadata())
        error = ApiError.from_rpc_error(err)
        headers: dict[str, str] = {}
        if error.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
        if error.code == grpc.StatusCode.UNAVAILABLE and not answered:
            # No answer of the server's: the gateway could not reach it.
            message = (
                "the server behind this REST port does not answer (it is shutting down, or its gRPC port is not "
                "up yet); retry, on another replica if it is shutting down"
            )
            return 503, self._error(503, message), {"Retry-After": "1"}
        if error.code == grpc.StatusCode.UNAUTHENTICATED:
            headers["WWW-Authenticate"] = 'Bearer realm="seqserve"'
        status = HTTP_STATUS.get(error.code, 500)
        message, param = error.message, None
        if error.code == grpc.StatusCode.UNAUTHENTICATED:  # (the gateway sent the caller's header as this metadata)
            message = message.replace("metadata 'authorization", "header 'Authorization")
        elif error.code == grpc.StatusCode.INVALID_ARGUMENT:
            message, param = spelled_as(message, self._keys or {})
        return status, self._error(status, message, param), headers

    def _error(self, status: int, message: str, param: str | None = None) -> bytes:
        """The error body: OpenAI's error object under /v1, else ``{"error": message}`` (KServe / Triton)."""
        if self.path.startswith("/v1/"):
            return error_body(status, message, param)
        return error_json(message)

    def _send(self, status: int, payload: bytes, headers: dict[str, str], head: bool) -> None:
        self.send_response(status)
        binary = HEADER_LENGTH in headers
        self.send_header("Content-Type", "application/octet-stream" if binary else "application/json")
        headers = self._cors() | headers
        encoding = _compression(self.headers.get("Accept-Encoding", "")) if len(payload) >= COMPRESS_FROM else None
        if encoding is not None:  # (the whole body: Inference-Header-Content-Length counts the JSON uncompressed)
            payload = gzip.compress(payload, 1) if encoding == "gzip" else zlib.compress(payload, 1)
            headers["Content-Encoding"] = encoding
            headers["Vary"] = ", ".join(v for v in (headers.get("Vary"), "Accept-Encoding") if v)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("X-Request-Id", self._request_id or self._own_request_id())
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(payload)


def _compression(accepted: str) -> str | None:
    """gzip or deflate when the client's ``Accept-Encoding`` takes it (tritonclient's
    ``response_compression_algorithm``), else None."""
    offered = set()
    for part in accepted.lower().split(","):
        name, _, quality = part.strip().partition(";")
        if quality.strip().replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
            offered.add(name.strip())
    return next((e for e in ("gzip", "deflate") if e in offered), None)


MAX_CREDENTIAL_CHARS = 4096  # far above any key ("Bearer " + a key), far below gRPC's 16 KiB metadata limit


def _credential(value: str) -> str:
    """An Authorization header as sent on: one the server cannot carry or no key can be (not printable ASCII,
    longer than any key) goes as a key no principal has, never dropped (the server then answers 401 for it)."""
    if not (value.isascii() and value.isprintable()):
        return "(not printable ASCII)"
    return value if len(value) <= MAX_CREDENTIAL_CHARS else "(too long to be a key)"
