"""What the REST gateway's parts share: the routes (and their metrics label), the gateway's own refusals, JSON
bodies."""

from __future__ import annotations

import json
import re
from typing import Any

import grpc

from service.api.completions import error_object
from service.errors import echo

HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor extension

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
MODEL_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?:/(?P<action>[a-z_]+))?")
MODEL_TRACE_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)/trace/setting")
REPOSITORY_MODEL_PATH = re.compile(r"/v2/repository/models/(?P<name>[^/]+)/(?P<action>load|unload)")
SHM_PATH = re.compile(
    r"/v2/(?P<kind>system|cuda)sharedmemory(?:/region/(?P<name>[^/]+))?/(?P<action>status|register|unregister)"
)


def route_of(path: str) -> str:
    """The metrics label of a request path: the path with model names as ``{model}`` (versions left out), or
    ``other`` for a path the API does not have, so the label has a few dozen values whatever clients send."""
    path = path.split("?", 1)[0]
    path = "/v2" if path == "/v2/" else path
    if path in ROUTES:
        return path
    if m := REPOSITORY_MODEL_PATH.fullmatch(path):
        return f"/v2/repository/models/{{model}}/{m['action']}"
    if MODEL_TRACE_PATH.fullmatch(path):
        return "/v2/models/{model}/trace/setting"
    if m := SHM_PATH.fullmatch(path):
        return f"/v2/{m['kind']}sharedmemory{'/region/{region}' if m['name'] else ''}/{m['action']}"
    if m := MODEL_PATH.fullmatch(path):
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


# JSON may escape a lone UTF-16 surrogate ("\ud800"): valid JSON, but no Unicode text, so no protobuf string and
# no UTF-8 either. Only such an escape can put one in a string: the body is decoded as strict UTF-8 first, which
# refuses a surrogate's raw bytes (ED A0 80; ``json.loads`` of bytes would let them through, "surrogatepass").
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")


class _TwiceError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members, refusing a name given twice: Python's parser keeps the last and Triton's the
    first, so a proxy and this server could read one request two ways."""
    document = dict(pairs)
    if len(document) < len(pairs):
        seen: set[str] = set()  # the first name met again, in one pass (a scan per member took a 430 KB body 9 s)
        for key, _ in pairs:
            if key in seen:
                raise _TwiceError(f"the body is not JSON we read: an object names {echo(key, 60)} twice; name it once")
            seen.add(key)
    return document


def read_json(body: bytes) -> Any:
    try:
        document = json.loads(body.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as exc:
        raise HttpError(400, f"the body is not UTF-8 (at byte {exc.start}); send JSON as UTF-8 text") from None
    except _TwiceError as exc:
        raise HttpError(400, str(exc)) from None
    except ValueError as exc:
        if "int_max_str_digits" in str(exc):  # (its message advises a Python call to the client)
            raise HttpError(400, "the body is not JSON we read: a number has more than 4,300 digits") from None
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


def ok(document: object) -> Reply:
    return 200, json.dumps(document, separators=(",", ":")).encode(), {}


def flag(up: bool) -> Reply:
    """Triton's health and readiness answers: 200 when true, otherwise 400 (tritonclient reads the status)."""
    return (200 if up else 400), b"", {}


def triton_error(message: str) -> dict[str, Any]:
    return {"error": message}


def openai_error(message: str) -> dict[str, Any]:
    return error_object(500, message)


def error_json(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
