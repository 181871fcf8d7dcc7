"""KServe v2 REST (HTTP/JSON) on a port of its own, as Triton and KServe serve it beside gRPC: ``curl`` and
``tritonclient.http`` work (JSON tensors and Triton's binary tensor extension).

A gateway, as grpc-gateway and Envoy's JSON transcoder are: each HTTP request becomes the one KServe gRPC call
it means, sent to this server's own gRPC port over loopback, and the answer (or the gRPC status) comes back as
JSON. So a REST call gets exactly what a gRPC call gets: the same API-key check, quotas, limits, validation,
sessions and sequences (a sequence may mix REST and gRPC requests), and the same metrics. The caller's
``Authorization`` and ``x-request-id`` headers go along; the answer carries ``X-Request-Id``. A status maps to
HTTP as Google's API guide and grpc-gateway map it (INVALID_ARGUMENT 400, UNAUTHENTICATED 401, NOT_FOUND 404,
RESOURCE_EXHAUSTED 429 with ``Retry-After`` when the refusal says when, UNAVAILABLE 503, ...), with the body
``{"error": "<the message>"}`` that tritonclient reads.

It runs on the connection-limited HTTP server of ``service.api.http`` (a thread per connection, at most
``http_max_connections``, a request may take at most three idle timeouts from its first byte to its answer).
gRPC stays the fast path: REST costs one more hop per request. ModelStreamInfer has no REST form (Triton's
neither); a char LM's streamed completion has Triton's generate extension instead (``service.api.generate``:
``/generate``, and ``/generate_stream`` as Server-Sent Events), and OpenAI's completions API
(``service.api.completions``: ``/v1/completions``, ``/v1/models``). Web pages of the origins in ``cors_origins`` may
call it from a browser (CORS: preflights answered here, never forwarded).

With TLS (``SEQSERVE_TLS_CERT``) this port speaks TLS only, with the gRPC port's certificate, and the hop goes over
a Unix socket in a folder only the server's user can enter (the gRPC port takes TLS only). With a client CA
(mTLS) every request but a CORS preflight needs a verified client certificate (403 without one, saying so); without
API keys its subject is the caller's principal, spelled as the gRPC port spells it, so a caller is one principal
on both ports (``service.api.principals.subject_of_peercert``); the gateway vouches for it with a token that
exists only inside this process.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import math
import os
import re
import ssl
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from service.api.completions import (
    completion,
    completion_request,
    error_body,
    error_object,
    model_object,
    models_list,
    usage,
)
from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.gen.seqserve.v1 import autocomplete_pb2_grpc
from service.api.generate import RequestError, answer, complete_request, event, json_kind
from service.api.http import REQUEST_SECONDS_PER_IDLE, HttpPort, KeptAliveHandler, _Server
from service.api.interceptors import REQUEST_ID_FORM
from service.api.kserve.convert import fill_log_settings
from service.api.kserve.tensors import NUMERIC, deserialize_bytes, serialize_bytes
from service.api.principals import GATEWAY_SUBJECT, GATEWAY_TOKEN, UnknownAttribute, subject_of_peercert
from service.argtypes import INT64_MAX
from service.core.traces import NAMES as TRACE_SETTINGS
from service.errors import echo
from service.metrics import Metrics
from service.tracing import TRACEPARENT

if TYPE_CHECKING:
    from service.api.tls import TlsFiles

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor extension
COMPRESS_FROM = 1024  # bytes: smaller answers leave as they are, when the client accepts compression
REST_ONLY = ("binary_data", "binary_data_size", "binary_data_output")  # parameters the gRPC call does not carry
UINT64_MAX = 2**64 - 1
METHODS = ("GET", "HEAD", "POST")  # and OPTIONS (what the server takes, and CORS preflights)
CORS_EXPOSED = ", ".join(("X-Request-Id", "Retry-After", "WWW-Authenticate", HEADER_LENGTH))  # a page may read them
CORS_MAX_AGE = 600  # seconds a browser may reuse a preflight's answer
CORS_MAX_HEADERS = 64  # request headers a preflight may ask for (a browser asks for a few; each is echoed back)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}")  # a header name (RFC 9110's token)

# google.rpc.Code -> HTTP (https://cloud.google.com/apis/design/errors#handling_errors, as grpc-gateway maps it)
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

ROUTES = {"/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/stats", "/v2/logging", "/v2/repository/index"}
ROUTES |= {"/v2/trace/setting"}
ROUTES |= {"/v1/completions", "/v1/models"}
MODEL_ACTIONS = {"ready", "config", "stats", "infer", "generate", "generate_stream"}
_MODEL = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?:/(?P<action>[a-z_]+))?")
_MODEL_TRACE = re.compile(r"/v2/models/(?P<name>[^/]+)/trace/setting")
_REPOSITORY_MODEL = re.compile(r"/v2/repository/models/(?P<name>[^/]+)/(?P<action>load|unload)")


def route_of(path: str) -> str:
    """The metrics label of a request path: the path with model names as ``{model}`` (versions left out), or
    ``other`` for a path the API does not have, so the label has a few dozen values whatever clients send."""
    path = path.split("?", 1)[0]
    path = "/v2" if path == "/v2/" else path
    if path in ROUTES:
        return path
    if m := _REPOSITORY_MODEL.fullmatch(path):
        return f"/v2/repository/models/{{model}}/{m['action']}"
    if _MODEL_TRACE.fullmatch(path):
        return "/v2/models/{model}/trace/setting"
    if m := _MODEL.fullmatch(path):
        action = m["action"]
        if action is None:
            return "/v2/models/{model}"
        return f"/v2/models/{{model}}/{action}" if action in MODEL_ACTIONS else "other"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


Reply = tuple[int, bytes, dict[str, str]]  # HTTP status, body, headers; None from a route: answered (a stream)


class HttpError(Exception):
    """A request refused by the gateway itself, before any gRPC call: HTTP status and what to fix (``param``: the
    request key at fault, for OpenAI's error object)."""

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.param = status, message, headers or {}, param


# --- JSON <-> protobuf -----------------------------------------------------------------------------------------


def message_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's REST JSON: its proto field names, every field (zeros too), 64-bit integers
    as numbers (protobuf's own JSON writes them as strings), enums by name, bytes in base64."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        one: Any = field
        singular_message = one.type == FieldDescriptor.TYPE_MESSAGE and not one.is_repeated
        if (one.containing_oneof is not None or singular_message) and not message.HasField(one.name):
            continue
        value = getattr(message, one.name)
        if one.is_repeated and one.message_type is not None and one.message_type.GetOptions().map_entry:
            value_field = one.message_type.fields_by_name["value"]
            out[one.name] = {key: _scalar(value_field, v) for key, v in value.items()}
        elif one.is_repeated:
            out[one.name] = [_scalar(one, v) for v in value]
        else:
            out[one.name] = _scalar(one, value)
    return out


def _scalar(field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    return value


def parameter_value(param: Any) -> Any:
    """An InferParameter / SettingValue / ModelRepositoryParameter as its JSON value (None when unset)."""
    which = param.WhichOneof("parameter_choice")
    if which is None:
        return None
    value = getattr(param, which)
    return base64.b64encode(value).decode("ascii") if isinstance(value, bytes) else value


def fill_parameters(target: Any, params: object, where: str, skip: tuple[str, ...] = REST_ONLY) -> None:
    """JSON ``parameters`` (an object of bool, integer, number or string values) into a protobuf parameter map:
    bool -> bool_param, integer -> int64_param (uint64_param above int64), number -> double_param, string ->
    string_param."""
    if params is None:
        return
    if not isinstance(params, dict):
        raise HttpError(400, f"{where}: parameters must be a JSON object, got {json_kind(params)}")
    for key, value in params.items():
        if key in skip:
            continue
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            if not -INT64_MAX - 1 <= value <= UINT64_MAX:
                raise HttpError(400, f"{where}: parameter {echo(key)} = {value} does not fit in 64 bits")
            if value > INT64_MAX:
                slot.uint64_param = value
            else:
                slot.int64_param = value
        elif isinstance(value, float):
            slot.double_param = value
        elif isinstance(value, str):
            slot.string_param = value
        else:
            raise HttpError(
                400, f"{where}: parameter {echo(key)} must be a bool, a number or a string, got {json_kind(value)}"
            )


def _flatten(data: Any) -> list[Any]:
    """Nested JSON arrays, row-major, as one list (without recursion: nesting depth costs no stack)."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _json_elements(name: str, datatype: str, data: Any, count: int) -> bytes:
    """An input's JSON ``data`` (flat or nested, row-major) as raw tensor bytes, every element checked."""
    flat = _flatten(data)
    if len(flat) != count:
        raise HttpError(400, f"input {echo(name)}: data has {len(flat)} elements, its shape holds {count}")
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise HttpError(400, f"input {echo(name)}: BYTES data are JSON strings")
        return serialize_bytes([x.encode("utf-8", "surrogatepass") for x in flat])
    if datatype not in NUMERIC:
        raise HttpError(
            400,
            f"input {echo(name)}: datatype {echo(datatype, 16)} has no JSON form here; use one of "
            f"{', '.join([*NUMERIC, 'BYTES'])}",
        )
    dtype = NUMERIC[datatype][0]
    if datatype == "BOOL":
        ok = all(isinstance(x, bool) for x in flat)
    elif dtype.kind == "f":
        ok = all(isinstance(x, int | float) and not isinstance(x, bool) for x in flat)
    else:
        ok = all(isinstance(x, int) and not isinstance(x, bool) for x in flat)
    if not ok:
        wanted = {"BOOL": "true or false"}.get(datatype, "numbers" if dtype.kind == "f" else "integers")
        raise HttpError(400, f"input {echo(name)}: {datatype} data are JSON {wanted}")
    try:
        array = np.array(flat, dtype=dtype)
    except (OverflowError, ValueError):
        span = f" {np.iinfo(dtype).min}..{np.iinfo(dtype).max}" if dtype.kind in "iu" else ""
        raise HttpError(400, f"input {echo(name)}: a value is outside {datatype}'s range{span}") from None
    return array.tobytes()


def _shape(name: str, shape: object) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise HttpError(400, f"input {echo(name)}: shape must be an array of integers")
    if any(not 0 <= d <= INT64_MAX for d in shape):
        raise HttpError(400, f"input {echo(name)}: shape {shape[:8]} has a negative or too large dimension")
    return shape


def infer_request(model: str, version: str, header: object, binary: bytes) -> tuple[pb.ModelInferRequest, bool]:
    """A REST inference request (JSON header and the binary tail of Triton's extension) as the ModelInferRequest
    it means, every input in ``raw_input_contents``; and whether outputs are wanted in binary by default."""
    if not isinstance(header, dict):
        raise HttpError(400, f"the inference request must be a JSON object, got {json_kind(header)}")
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if "id" in header:
        if not isinstance(header["id"], str):
            raise HttpError(400, f"id must be a string, got {json_kind(header['id'])}")
        request.id = header["id"]
    params = header.get("parameters")
    fill_parameters(request.parameters, params, "the request")
    binary_default = isinstance(params, dict) and params.get("binary_data_output") is True
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise HttpError(400, "inputs must be a non-empty array of {name, shape, datatype, data} objects")
    offset = 0
    for i, item in enumerate(inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise HttpError(400, f"inputs[{i}] must be an object with a string name")
        name = item["name"]
        datatype = item.get("datatype")
        if not isinstance(datatype, str):
            raise HttpError(400, f"input {echo(name)}: datatype must be a string (FP32, BYTES, ...)")
        shape = _shape(name, item.get("shape"))
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        own = item.get("parameters")
        fill_parameters(tensor.parameters, own, f"input {echo(name)}")
        size = own.get("binary_data_size") if isinstance(own, dict) else None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise HttpError(400, f"input {echo(name)}: binary_data_size must be a non-negative integer")
            if "data" in item:
                raise HttpError(400, f"input {echo(name)}: give data or binary_data_size, not both")
            if offset + size > len(binary):
                raise HttpError(
                    400,
                    f"input {echo(name)}: binary_data_size {size} passes the end of the binary data "
                    f"({len(binary) - offset} bytes left after {HEADER_LENGTH})",
                )
            request.raw_input_contents.append(binary[offset : offset + size])
            offset += size
        elif "data" in item:
            count = math.prod(shape)
            request.raw_input_contents.append(_json_elements(name, datatype, item["data"], count))
        else:
            raise HttpError(400, f"input {echo(name)}: no data (give data, or binary_data_size with binary data)")
    if offset != len(binary):
        raise HttpError(400, f"{len(binary) - offset} bytes of binary data after the inputs' binary_data_size")
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list):
        raise HttpError(400, "outputs must be an array of {name, parameters} objects")
    for i, item in enumerate(outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise HttpError(400, f"outputs[{i}] must be an object with a string name")
        wanted = request.outputs.add(name=item["name"])
        fill_parameters(wanted.parameters, item.get("parameters"), f"output {echo(item['name'])}")
    return request, binary_default


def _binary_wanted(header: dict[str, Any], name: str, default: bool) -> bool:
    for item in header.get("outputs", []):
        if item.get("name") == name and isinstance(item.get("parameters"), dict):
            choice = item["parameters"].get("binary_data")
            if isinstance(choice, bool):
                return choice
    return default


def _output_raw(response: pb.ModelInferResponse, i: int) -> bytes:
    if i < len(response.raw_output_contents):
        return bytes(response.raw_output_contents[i])
    t = response.outputs[i]
    if t.datatype == "BYTES":
        return serialize_bytes(list(t.contents.bytes_contents))
    dtype, field = NUMERIC[t.datatype]
    return np.array(getattr(t.contents, field), dtype=dtype).tobytes()


def _output_data(datatype: str, name: str, raw: bytes, count: int) -> list[Any]:
    if datatype == "BYTES":
        return [b.decode("utf-8", "replace") for b in deserialize_bytes(name, raw, count)]
    return list(np.frombuffer(raw, dtype=NUMERIC[datatype][0]).tolist())


def infer_response(response: pb.ModelInferResponse, header: dict[str, Any], binary_default: bool) -> tuple[bytes, int]:
    """The REST answer: JSON body (then the binary outputs' bytes) and the JSON part's length, for the
    ``Inference-Header-Content-Length`` header when there is binary data."""
    body: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        body["id"] = response.id
    if response.parameters:
        body["parameters"] = {k: parameter_value(v) for k, v in response.parameters.items()}
    tail: list[bytes] = []
    body["outputs"] = []
    for i, t in enumerate(response.outputs):
        out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        params = {k: parameter_value(v) for k, v in t.parameters.items()}
        raw = _output_raw(response, i)
        if _binary_wanted(header, t.name, binary_default):
            params["binary_data_size"] = len(raw)
            tail.append(raw)
        else:
            out["data"] = _output_data(t.datatype, t.name, raw, math.prod(t.shape))
        if params:
            out["parameters"] = params
        body["outputs"].append(out)
    head = json.dumps(body, separators=(",", ":"), allow_nan=True).encode()
    return head + b"".join(tail), len(head)


# --- the gateway -------------------------------------------------------------------------------------------------


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


class _RestHandler(KeptAliveHandler):
    _request_id: str | None = None  # the gRPC call's, for the X-Request-Id header
    _status: int | None = None  # the answer's, once sent (send_response)
    _began = 0.0  # perf_counter() when the request's first line was in
    _peer: tuple[str | None, str] | None = None  # mTLS: (the connection's principal or None, why none), once read

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

    @property
    def gateway(self) -> RestGateway:
        return self.server.gateway  # type: ignore[attr-defined,no-any-return]

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
        asked = [h.strip() for h in self.headers.get("Access-Control-Request-Headers", "").split(",") if h.strip()]
        refusal = self._preflight_refusal(origin, method, asked)
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
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

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
        payload = _error(f"{text} (KServe v2 REST: see docs/kserve.md)")
        self.close_connection = True  # (what the stdlib does: the rest of such a request is not read)
        self.send_response(code, reason)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
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
        self._request_id = None
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
        except Exception:  # a bug here must not take the gateway down: say so, keep serving
            log.exception("REST %s %s failed", method, echo(self.path, 200))
            status, payload, headers = 500, self._error(500, "internal error in the REST gateway (logged)"), {}
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
        answer: asked with the caller's headers over loopback (``ServerLive``), as every forwarded call is."""
        if not self.gateway.keyed:
            return None
        request_id = self._request_id
        try:
            self._call("ServerLive", pb.ServerLiveRequest())
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return self._from_rpc(err)
        self._request_id = request_id  # (the refusal is not the probe's answer)
        return None

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self.unread_body()  # (the chunks)
            raise HttpError(411, "send the body with a Content-Length (chunked transfer is not accepted)")
        text = self.headers.get("Content-Length", "0") or "0"
        if not text.isdigit():
            raise HttpError(400, f"Content-Length {echo(text, 40)} is not a number")
        size, limit = int(text), self.gateway.max_body_bytes
        if size > limit:
            self.unread_body()
            raise HttpError(
                413, f"the request body has {size} bytes, the limit is {limit} (SEQSERVE_MAX_MESSAGE_BYTES)"
            )
        body = self.rfile.read(size) if size else b""
        if len(body) != size:
            self.close_connection = True
            raise HttpError(400, f"the body ended after {len(body)} of its {size} bytes")
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("", "identity"):
            return body
        if encoding not in ("gzip", "deflate"):
            raise HttpError(415, f"Content-Encoding {echo(encoding, 40)} is not accepted: send gzip, deflate or none")
        inflate = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            data = inflate.decompress(body, limit + 1)
        except zlib.error as exc:
            raise HttpError(400, f"the {encoding} body does not decompress: {exc}") from None
        if len(data) > limit:
            raise HttpError(413, f"the request body decompresses past the limit of {limit} bytes")
        return data

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        sent = []
        for header, key in (
            ("Authorization", "authorization"),
            ("X-Request-Id", "x-request-id"),
            (TRACEPARENT, TRACEPARENT),
        ):
            value = self.headers.get(header)
            if value is not None and value.isascii() and value.isprintable():
                sent.append((key, value))
        if self.gateway.token is not None and self._peer is not None and self._peer[0] is not None:
            sent += [(GATEWAY_SUBJECT, self._peer[0]), (GATEWAY_TOKEN, self.gateway.token)]
        return tuple(sent)

    def _call(self, rpc: str, request: Message) -> Any:
        method = getattr(self.gateway.stub, rpc)
        response, call = method.with_call(request, metadata=self._metadata(), timeout=self.gateway.call_timeout)
        self._note_request_id(call.trailing_metadata())
        return response

    def _note_request_id(self, metadata: Any) -> None:
        for key, value in metadata or ():
            if key == "x-request-id":
                self._request_id = str(value)

    def _route(self, method: str, path: str, body: bytes) -> Reply | None:
        get = method in ("GET", "HEAD")
        if path in ("/v2", "/v2/") and get:
            return _ok(message_json(self._call("ServerMetadata", pb.ServerMetadataRequest())))
        if path == "/v2/health/live" and get:
            return _flag(self._call("ServerLive", pb.ServerLiveRequest()).live)
        if path == "/v2/health/ready" and get:
            return _flag(self._call("ServerReady", pb.ServerReadyRequest()).ready)
        if path == "/v2/models/stats" and get:
            return _ok(message_json(self._call("ModelStatistics", pb.ModelStatisticsRequest())))
        if path == "/v2/logging":
            return self._logging(method, body)
        if path == "/v2/trace/setting":
            return self._trace(method, None, body)
        if m := _MODEL_TRACE.fullmatch(path):
            return self._trace(method, unquote(m["name"]), body)
        if path == "/v1/completions":
            if method != "POST":
                raise HttpError(405, "/v1/completions takes POST", {"Allow": "POST"})
            return self._completions(body)
        if path in ("/v1/models", "/v1/models/") or path.startswith("/v1/models/"):
            rest = path[len("/v1/models/") :].strip("/") if path.startswith("/v1/models/") else ""
            return self._models(method, unquote(rest) if rest else None)
        if path == "/v2/repository/index" and method == "POST":
            options = _json(body) if body else {}
            ready = options.get("ready", False) if isinstance(options, dict) else None
            if not isinstance(ready, bool):
                raise HttpError(400, 'the body is {"ready": true|false} or empty')
            index = self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready))
            return 200, json.dumps([message_json(m) for m in index.models]).encode(), {}
        if m := _REPOSITORY_MODEL.fullmatch(path):
            if method != "POST":
                raise HttpError(405, f"{path} takes POST", {"Allow": "POST"})
            return self._repository(unquote(m["name"]), m["action"], body)
        if m := _MODEL.fullmatch(path):
            return self._model(method, unquote(m["name"]), unquote(m["version"] or ""), m["action"], body)
        if path.startswith("/v2/"):
            raise HttpError(404, f"no such endpoint: {method} {echo(path, 200)} (KServe v2 REST: see docs/kserve.md)")
        if path.startswith("/v1/"):
            raise HttpError(
                404, f"no such endpoint: {method} {echo(path, 200)} (OpenAI's API here: /v1/completions, /v1/models)"
            )
        raise HttpError(404, f"not found: {echo(path, 200)}; the KServe v2 REST API is under /v2, OpenAI's under /v1")

    def _model(self, method: str, name: str, version: str, action: str | None, body: bytes) -> Reply | None:
        get = method in ("GET", "HEAD")
        if action in ("infer", "generate", "generate_stream"):
            if method != "POST":
                raise HttpError(405, f"{action} takes POST", {"Allow": "POST"})
            if action == "infer":
                return self._infer(name, version, body)
            return self._generate(name, version, body, stream=action == "generate_stream")
        if not get:
            raise HttpError(405, f"{action or 'model metadata'} takes GET", {"Allow": "GET, HEAD"})
        if action is None:
            meta = self._call("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version))
            return _ok(message_json(meta))
        if action == "ready":
            return _flag(self._call("ModelReady", pb.ModelReadyRequest(name=name, version=version)).ready)
        if action == "config":
            return _ok(
                message_json(self._call("ModelConfig", pb.ModelConfigRequest(name=name, version=version)).config)
            )
        if action == "stats":
            stats = self._call("ModelStatistics", pb.ModelStatisticsRequest(name=name, version=version))
            return _ok(message_json(stats))
        raise HttpError(
            404, f"no such endpoint: {echo(action, 40)} (ready, config, stats, infer, generate, generate_stream)"
        )

    def _infer(self, name: str, version: str, body: bytes) -> Reply:
        length = self.headers.get(HEADER_LENGTH)
        if length is None:
            split = len(body)
        elif length.isdigit() and int(length) <= len(body):
            split = int(length)
        else:
            raise HttpError(
                400, f"{HEADER_LENGTH} {echo(length, 40)} must be a number up to the body's {len(body)} bytes"
            )
        header = _json(body[:split])
        request, binary_default = infer_request(name, version, header, body[split:])
        response = self._call("ModelInfer", request)
        payload, head = infer_response(response, header, binary_default)
        headers = {HEADER_LENGTH: str(head)} if head != len(payload) else {}
        return 200, payload, headers

    def _generate(self, name: str, version: str, body: bytes, stream: bool) -> Reply | None:
        """Triton's generate extension: one ``Autocomplete.Complete`` call; its chunks as one answer, or as
        Server-Sent Events while they come (``_stream``). Refusals before the first chunk are plain JSON errors with
        their HTTP status; one after it is a last event ``{"error": ...}`` (as Triton's)."""
        try:
            request = complete_request(name, version, _json(body), stream=stream)
        except RequestError as err:
            raise HttpError(400, str(err)) from None
        call, first = self._complete(request)
        session, version_used = request.HasField("session_id"), first.model_version
        if stream:
            self._stream(call, first, lambda c: answer(name, version_used, c.text, c, session), _triton_error)
            return None
        chunks = [first, *call]
        text = "".join(chunk.text for chunk in chunks)
        return _ok(answer(name, version_used, text, chunks[-1], session))

    def _completions(self, body: bytes) -> Reply | None:
        """OpenAI's ``POST /v1/completions`` (``service.api.completions``): the same one call as generate, its
        chunks as one completion object, or as completion chunks ending in ``data: [DONE]``."""
        document = _json(body)
        try:
            request, stream, with_usage = completion_request(document)
        except RequestError as err:
            raise HttpError(400, str(err), param=err.param) from None
        call, first = self._complete(request)
        model, version_used, created = document["model"], first.model_version, int(time.time())
        ident = f"cmpl-{self._request_id}"
        if stream:
            generated = [0]

            def render(chunk: Any) -> dict[str, Any]:
                generated[0] += len(chunk.text)
                return completion(ident, created, model, version_used, chunk.text, chunk)

            def closing() -> list[dict[str, Any]]:
                if not with_usage:
                    return []
                last = completion(ident, created, model, version_used, "", None)
                return [{**last, "choices": [], "usage": usage(request.prompt, generated[0])}]

            self._stream(call, first, render, _openai_error, closing, b"data: [DONE]\n\n")
            return None
        chunks = [first, *call]
        text = "".join(chunk.text for chunk in chunks)
        document = completion(ident, created, model, version_used, text, chunks[-1])
        return _ok({**document, "usage": usage(request.prompt, len(text))})

    def _models(self, method: str, name: str | None) -> Reply:
        """OpenAI's ``GET /v1/models`` (the ready models of the repository, one entry per name) and
        ``GET /v1/models/{name}``."""
        if method not in ("GET", "HEAD"):
            raise HttpError(405, "/v1/models takes GET", {"Allow": "GET, HEAD"})
        index = self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=True))
        names = sorted({m.name for m in index.models if m.state == "READY"})
        if name is None:
            return _ok(models_list(names))
        if name not in names:
            raise HttpError(404, f"The model {echo(name)} does not exist; served models: {names}", param="model")
        return _ok(model_object(name))

    def _complete(self, request: Message) -> tuple[Any, Any]:
        """An ``Autocomplete.Complete`` call and its first chunk (a refusal raises here: an ordinary error answer).
        The request id must be known before a stream's headers leave: the caller's when the server takes it as
        one, else one made here and sent along (the server uses it, so its logs say the same)."""
        sent = self.headers.get("X-Request-Id")
        self._request_id = sent if sent is not None and REQUEST_ID_FORM.fullmatch(sent) else os.urandom(16).hex()
        metadata = (*(m for m in self._metadata() if m[0] != "x-request-id"), ("x-request-id", self._request_id))
        call = self.gateway.autocomplete.Complete(request, metadata=metadata, timeout=self.gateway.call_timeout)
        return call, next(call)

    def _stream(
        self,
        call: Any,
        first: Any,
        render: Callable[[Any], dict[str, Any]],
        error: Callable[[str], dict[str, Any]],
        closing: Callable[[], list[dict[str, Any]]] = list,
        done: bytes = b"",
    ) -> None:
        """``call``'s chunks as Server-Sent Events (``render``: a chunk's event) in a chunked HTTP body, then the
        ``closing`` events and ``done``; an error after the first event is the last event (``error``). A client
        that goes away cancels the call: the server stops generating."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Request-Id", str(self._request_id))
        for key, value in self._cors().items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

        def send(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

        try:
            send(event(render(first)))
            try:
                for chunk in call:
                    send(event(render(chunk)))
                for document in closing():
                    send(event(document))
                if done:
                    send(done)
            except grpc.RpcError as err:
                from service.client import ApiError

                send(event(error(ApiError.from_rpc_error(err).message)))
            self.wfile.write(b"0\r\n\r\n")
        except OSError as exc:  # the client went away (or the request ran out of time): stop the generation
            call.cancel()
            self.close_connection = True
            log.debug("rest stream: %s, call cancelled", type(exc).__name__)

    def _repository(self, name: str, action: str, body: bytes) -> Reply:
        options = _json(body) if body else {}
        if not isinstance(options, dict):
            raise HttpError(400, f"the body of {action} is a JSON object or empty")
        if action == "unload":
            request: Message = pb.RepositoryModelUnloadRequest(model_name=name)
            self._call("RepositoryModelUnload", request)
        else:
            load = pb.RepositoryModelLoadRequest(model_name=name)
            fill_parameters(load.parameters, options.get("parameters"), f"load {echo(name)}")
            self._call("RepositoryModelLoad", load)
        return 200, b"", {}

    def _logging(self, method: str, body: bytes) -> Reply:
        request = pb.LogSettingsRequest()
        if method == "POST":
            changes = _json(body)
            if not isinstance(changes, dict):
                raise HttpError(400, 'the body is a JSON object of log settings, e.g. {"log_verbose_level": 1}')
            for key, value in changes.items():  # (the values SettingValue holds; the server checks the rest)
                if not isinstance(value, bool | str) and not (isinstance(value, int) and 0 <= value < 2**32):
                    raise HttpError(
                        400, f"log setting {echo(key)} takes a bool, an unsigned 32-bit integer or a string"
                    )
            fill_log_settings(request.settings, changes)
        elif method not in ("GET", "HEAD"):
            raise HttpError(405, "/v2/logging takes GET or POST", {"Allow": "GET, HEAD, POST"})
        settings = self._call("LogSettings", request).settings
        return _ok({key: parameter_value(value) for key, value in settings.items()})

    def _trace(self, method: str, model: str | None, body: bytes) -> Reply:
        """Triton's trace extension: GET reads the settings (of a model, or the server's), POST changes those it
        names (null clears one; for a model, an empty object clears all of its own, as in Triton)."""
        request = pb.TraceSettingRequest(model_name=model or "")
        if method == "POST":
            changes = _json(body) if body else {}
            if not isinstance(changes, dict):
                raise HttpError(400, 'the body is a JSON object of trace settings, e.g. {"trace_rate": "100"}')
            if not changes and model is not None:
                changes = dict.fromkeys(TRACE_SETTINGS)
            for key, value in changes.items():
                values = [] if value is None else value if isinstance(value, list) else [value]
                if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in values):
                    raise HttpError(400, f"trace setting {echo(key)} takes a string, a list of strings or null")
                request.settings[key].value.extend(str(v) for v in values)
        elif method not in ("GET", "HEAD"):
            raise HttpError(405, "trace/setting takes GET or POST", {"Allow": "GET, HEAD, POST"})
        settings = self._call("TraceSetting", request).settings
        return _ok({k: list(v.value) if k == "trace_level" else "".join(v.value[:1]) for k, v in settings.items()})

    def _from_rpc(self, err: grpc.RpcError) -> Reply:
        from service.client import ApiError

        self._note_request_id(err.trailing_metadata())
        error = ApiError.from_rpc_error(err)
        headers: dict[str, str] = {}
        if error.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
        if error.code == grpc.StatusCode.UNAUTHENTICATED:
            headers["WWW-Authenticate"] = 'Bearer realm="seqserve"'
        status = HTTP_STATUS.get(error.code, 500)
        return status, self._error(status, error.message), headers

    def _error(self, status: int, message: str, param: str | None = None) -> bytes:
        """The error body: OpenAI's error object under /v1, else ``{"error": message}`` (KServe / Triton)."""
        if self.path.startswith("/v1/"):
            return error_body(status, message, param)
        return _error(message)

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
        if self._request_id is not None:
            self.send_header("X-Request-Id", self._request_id)
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("rest %s - " + format, self.address_string(), *args)


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


def _compression(accepted: str) -> str | None:
    """gzip or deflate when the client's ``Accept-Encoding`` takes it (tritonclient's
    ``response_compression_algorithm``), else None."""
    offered = set()
    for part in accepted.lower().split(","):
        name, _, quality = part.strip().partition(";")
        if quality.strip().replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
            offered.add(name.strip())
    return next((e for e in ("gzip", "deflate") if e in offered), None)


# JSON may escape a lone UTF-16 surrogate ("\ud800"): valid JSON, but no Unicode text, so no protobuf string and
# no UTF-8 either. Only such an escape can put one in a string (raw UTF-8 bytes cannot encode one).
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")


def _json(body: bytes) -> Any:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HttpError(400, f"the body is not JSON: {echo(str(exc), 200)}") from None
    except RecursionError:
        raise HttpError(400, "the body is not JSON we read: its arrays or objects nest too deeply") from None
    if _ESCAPED_SURROGATE.search(body):  # (pairs are fine: they are one character; look for a lone one)
        try:
            json.dumps(document, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            lone = exc.object[exc.start : exc.end]
            raise HttpError(
                400, f"the body is not JSON we read: a string holds the lone surrogate {lone!r}, which is not text"
            ) from None
    return document


def _ok(document: object) -> Reply:
    return 200, json.dumps(document, separators=(",", ":")).encode(), {}


def _flag(up: bool) -> Reply:
    """Triton's health and readiness answers: 200 when true, otherwise 400 (tritonclient reads the status)."""
    return (200 if up else 400), b"", {}


def _triton_error(message: str) -> dict[str, Any]:
    return {"error": message}


def _openai_error(message: str) -> dict[str, Any]:
    return error_object(500, message)


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
