"""The gRPC edge, outermost first: metrics (+ access log), errors (+ request id), auth (principal), decoding
(``service.api.decoding``: size limits, corrupt messages, memory budget, request rate).

``Edge`` wraps each method's handler once, for all four handler kinds (unary/streaming request x unary/streaming
response): the stages run inline around the call, which sees the request (unary requests only, as ``Undecoded``
bytes that name their model once decoded), the context, and any exception the call raises. Domain errors
(``service.errors``) become gRPC status codes here and nowhere else (``STATUS_CODES``).

The wrapping happens when a handler is registered (``EdgedServer``), not per call: a ``grpc.aio`` server
interceptor would run on every RPC (a coroutine and the handler lookup through it), which cost ~40 µs of server CPU
per unary call here (docs/architecture.md, "the edge at registration").
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import functools
import hmac
import inspect
import logging
import os
import re
import time
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from service import errors
from service.api.decoding import (
    PUBLIC_PREFIXES,
    Decoding,
    MethodDecoder,
    Undecoded,
    drive,
    keep_bytes,
    model_label,
    release,
)
from service.api.principals import GATEWAY_SUBJECT, GATEWAY_TOKEN, KeyTable, load_keys, subject_of
from service.core.context import call_scope, principal, set_principal
from service.logs import ACCESS_LOGGER, CALL
from service.metrics import Metrics
from service.settings import Settings
from service.tracing import TRACEPARENT, parse_traceparent

log = logging.getLogger(__name__)
access_log = logging.getLogger(ACCESS_LOGGER)

ERROR_DOMAIN = "seqserve"
REQUEST_ID_KEY = "x-request-id"
# A caller's x-request-id is used (and echoed) only when it looks like an id; anything else gets a fresh one.
REQUEST_ID_FORM = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

# The ONE table from domain errors to gRPC status codes (most specific class first wins via the MRO walk).
STATUS_CODES: dict[type[errors.SeqServeError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.SessionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.RegionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.NotOffered: grpc.StatusCode.UNIMPLEMENTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ReplicaBehind: grpc.StatusCode.UNAVAILABLE,
    errors.SessionConflict: grpc.StatusCode.ABORTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code_for(exc: errors.SeqServeError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


def error_reason(exc: errors.SeqServeError) -> str:
    """ModelNotFound -> MODEL_NOT_FOUND (the google.rpc.ErrorInfo reason)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).upper()


def split_method(full: str) -> tuple[str, str]:
    """'/seqserve.v1.Sentiment/Classify' -> ('seqserve.v1.Sentiment', 'Classify')."""
    service, _, method = full.lstrip("/").partition("/")
    return service, method


def metadata_values(context: grpc.aio.ServicerContext, key: str) -> list[str]:
    """Every value the call sent under ``key``, in order, as text."""
    return [_text(v) for k, v in context.invocation_metadata() or () if k == key]


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    values = metadata_values(context, key)
    return values[0] if values else None


def _code_name(context: grpc.aio.ServicerContext, default: str) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):  # some grpc versions keep the raw integer
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), default)
    return default


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_./:-]+")  # a model name shown as it is in a text access line

# How close to its deadline a call the client cancelled counts as one whose deadline passed: the client cancels at
# its deadline, which it counted from before it sent the call, and the server's deadline (counted from when the
# headers arrived) is a few milliseconds later, so a cancel at the client's deadline still found time left here
# (7 ms, --workers 2, the engine stalled): counted CANCELLED, which the error-ratio alerts leave out. At most half
# the call's whole deadline (less time left than passed): a client that cancelled 10 ms into an 80 ms deadline,
# 70 ms before it, was counted DEADLINE_EXCEEDED; a 20 ms deadline that passed with 7 ms left here still counts.
DEADLINE_SLACK_SECONDS = 0.1
DEADLINE_SLACK_SHARE = 0.5


def _deadline_passed(context: grpc.aio.ServicerContext, start: float) -> bool:
    left = context.time_remaining()
    if left is None:
        return False
    remaining = float(left)
    whole = remaining + (time.perf_counter() - start)  # (the deadline as the server counts it, from the call's start)
    return remaining <= min(DEADLINE_SLACK_SECONDS, DEADLINE_SLACK_SHARE * whole)


def rich_status(
    code: grpc.StatusCode, message: str, reason: str, request_id: str, retry_after: float | None = None
) -> grpc.Status:
    """A status whose trailing metadata carries google.rpc.Status details (ErrorInfo, and RetryInfo when the
    request may simply be sent again after ``retry_after`` seconds) and the request id. The message is bounded
    (``errors.clip``): the core echoes with ``errors.echo``, this is the last resort."""
    message = errors.clip(message)
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata={"request_id": request_id}))
    details = [info]
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(datetime.timedelta(seconds=max(retry_after, 0.001)))
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=details))
    return _Status(code, message, (*status.trailing_metadata, (REQUEST_ID_KEY, request_id)))


class _Status(grpc.Status):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, Any], ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's x-request-id when it looks like one (at most 128 id characters), else a fresh one."""
    return call_ids(context)[0]


def call_ids(context: grpc.aio.ServicerContext) -> tuple[str, str]:
    """(request id, traceparent), from one pass over the call's metadata: the caller's x-request-id when it looks
    like one (at most 128 id characters), else a fresh one; its W3C ``traceparent`` when valid, else ""."""
    sent = trace = None
    for k, v in context.invocation_metadata() or ():
        if k == REQUEST_ID_KEY and sent is None:
            sent = _text(v)
        elif k == TRACEPARENT and trace is None:
            trace = _text(v)
    if sent is None or not REQUEST_ID_FORM.fullmatch(sent):
        sent = os.urandom(16).hex()  # 128 random bits
    return sent, parse_traceparent(trace)


class LogBudget:
    """How many refused-request lines a process logs: ``rate`` per second, in bursts of up to five seconds'
    worth, two lines at least (a token bucket); 0 = all. Lines over it are counted, and the next line it allows is
    preceded by one WARNING saying how many were not logged (the two take two of the rate: it held lines to the
    rate, and a sustained flood got a WARNING before each, twice the rate in all), so a caller sending bad requests
    as fast as it can (with no key, or past its quota) cannot fill the disk or drown the server's real errors."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, max(2.0, 5 * rate), clock  # (2: a line after drops costs two)
        self.tokens, self.at, self.dropped, self.since = self.burst, clock(), 0, 0.0

    def allow(self) -> bool:
        if not self.rate:
            return True
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        cost = 2 if self.dropped else 1  # (the WARNING counts too: lines and warnings together keep to the rate)
        if self.tokens < cost:
            if not self.dropped:
                self.since = now
            self.dropped += 1
            return False
        self.tokens -= cost
        if self.dropped:  # (in a context of its own: the line is no request's, not the one whose line follows)
            contextvars.Context().run(
                log.warning,
                "%d refused-request lines were not logged in the last %.3g s (log_errors_per_second=%g); the RPC "
                "metrics count every refusal",
                self.dropped, now - self.since, self.rate,
            )  # fmt: skip
            self.dropped = 0
        return True


_BUDGETS: list[tuple[Settings, LogBudget]] = []


def log_budget(settings: Settings) -> LogBudget:
    """The budget of the server these settings belong to (the same object): its edge and its KServe streams
    share it, so a process logs ``log_errors_per_second`` refusals, not twice that."""
    for owner, budget in _BUDGETS:
        if owner is settings:
            return budget
    budget = LogBudget(settings.log_errors_per_second)
    _BUDGETS.append((settings, budget))
    return budget


class Edge:
    """The whole edge: metrics (+ access log), errors (+ request id), auth (principal) and decoding
    (``service.api.decoding``), in that order, outermost first.

    For each method it builds one wrapped handler, once (``wrap``; each stage depends only on the method and the
    inner handler). Per call the stages run inline in one coroutine or async generator: no context manager
    objects, and a streamed message passes through one wrapper, not one per stage."""

    def __init__(
        self, metrics: Metrics, settings: Settings, keys: KeyTable, mtls: bool, gateway_token: str | None = None
    ) -> None:
        self.metrics = metrics
        self.access = settings.access_log
        self.budget = log_budget(settings)
        self.keys = keys
        self.auth = bool(keys) or mtls
        self.gateway_token = gateway_token  # the REST gateway's, on a TLS server (``service.api.rest``)
        self.decoding = Decoding(settings)
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` of ``method`` (``/package.Service/Method``) with the edge around it; built once per method
        and inner handler (a service registered both ways hands the same handler twice)."""
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _EdgeMethod(self, method, handler).handler()
        self._cache[method] = (handler, wrapped)
        return wrapped

    # --- auth -------------------------------------------------------------------------------------------
    def authenticate(self, context: grpc.aio.ServicerContext) -> None:
        """Every RPC but health and reflection needs credentials; the caller's principal goes into the core's
        request context (``service.core.context.set_principal``). With API keys: metadata ``authorization:
        Bearer <key>``, the key's name is the principal. Without API keys but with mTLS: the verified client
        certificate's subject is the principal; for a call the REST gateway forwards (over its Unix socket, no
        certificate there), the subject of the certificate its caller presented, when the gateway's token
        vouches for it."""
        if self.keys:
            set_principal(self._by_key(context))
        else:
            subject = subject_of(context.auth_context() or {})
            if subject is None and self.gateway_token is not None:
                subject = self._vouched(context)
            if subject is None:
                raise errors.Unauthenticated(
                    "this server needs a client certificate (mTLS) signed by its client CA that names its holder "
                    "(a subject or a subject alternative name)"
                )
            set_principal(subject)

    def _vouched(self, context: grpc.aio.ServicerContext) -> str | None:
        token = metadata_value(context, GATEWAY_TOKEN)
        if token is None or not hmac.compare_digest(token.encode(), (self.gateway_token or "").encode()):
            return None
        return metadata_value(context, GATEWAY_SUBJECT) or None

    def _by_key(self, context: grpc.aio.ServicerContext) -> str:
        values = metadata_values(context, "authorization")
        if len(values) != 1:
            raise errors.Unauthenticated(
                "missing credentials: this server needs metadata 'authorization: Bearer <api key>'"
                if not values
                else f"metadata 'authorization' appears {len(values)} times: send one API key"
            )
        scheme, _, key = values[0].partition(" ")
        name = self.keys.principal(key.strip()) if scheme.lower() == "bearer" else None
        if name is None:
            raise errors.Unauthenticated("wrong API key in metadata 'authorization' (expected 'Bearer <api key>')")
        return name

    # --- errors -----------------------------------------------------------------------------------------
    async def fail(self, method: str, exc: Exception, request_id: str, context: grpc.aio.ServicerContext) -> None:
        """Domain error -> status code; anything unexpected -> INTERNAL with the request id (the traceback goes
        to the log, never to the caller). Always raises."""
        if isinstance(exc, errors.SeqServeError):
            code = status_code_for(exc)
            message = errors.clip(exc.message)
            if self.budget.allow():
                log.info("%s -> %s: %s (request id %s)", method, code.name, message, request_id,
                         extra={"code": code.name})  # fmt: skip
            status = rich_status(code, message, error_reason(exc), request_id, exc.retry_after)
            await context.abort_with_status(status)
        elif isinstance(exc, grpc.aio.AbortError):
            raise exc  # the servicer already chose a status
        elif isinstance(exc, NotImplementedError) and _from_generated_base(exc):  # a method this server lacks
            if self.budget.allow():
                log.info("%s -> UNIMPLEMENTED (request id %s)", method, request_id, extra={"code": "UNIMPLEMENTED"})
            status = rich_status(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server",
                                 "UNIMPLEMENTED", request_id)  # fmt: skip
            await context.abort_with_status(status)
        else:
            log.error("internal error in %s (request id %s)", method, request_id, extra={"code": "INTERNAL"},
                      exc_info=exc)  # fmt: skip
            message = f"internal error (request id {request_id})"
            await context.abort_with_status(rich_status(grpc.StatusCode.INTERNAL, message, "INTERNAL", request_id))
        raise exc  # abort_with_status raises; this is never reached


class _EdgeMethod:
    """One method's handler with the edge around it (see ``Edge``)."""

    def __init__(self, edge: Edge, method: str, handler: grpc.RpcMethodHandler) -> None:
        self.edge, self.method, self.h = edge, method, handler
        self.service, self.name = split_method(method)
        self.auth = edge.auth and not method.startswith(PUBLIC_PREFIXES)
        # Decoding applies to every handler that decodes its requests (all generated ones do).
        self.decode = (
            MethodDecoder(edge.decoding, method, handler) if handler.request_deserializer is not None else None
        )

    # --- metrics and errors: the two ends of every call ------------------------------------------------
    def begin(self, context: grpc.aio.ServicerContext) -> tuple[list[str], float, str]:
        """In-flight gauge, the core's call scope, the request id (trailing metadata, log context); then auth."""
        self.edge.metrics.rpc_started(self.service, self.name)
        resolved = call_scope()  # the core notes the model it served (session calls, default model)
        start = time.perf_counter()
        request_id, trace = call_ids(context)
        CALL.set((request_id, self.method, trace))
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        return resolved, start, request_id

    def end(self, request: Any, context: grpc.aio.ServicerContext, resolved: list[str], start: float,
            code: str) -> None:  # fmt: skip
        model = _model_label(request) or (resolved[0] if resolved else "")
        seconds = time.perf_counter() - start
        self.edge.metrics.rpc_finished(self.service, self.name, model, code, seconds, CALL.get()[2])
        if code == "DEADLINE_EXCEEDED" and self.edge.budget.allow():  # (a cancel is the client's own doing)
            log.info("%s -> DEADLINE_EXCEEDED after %.1f ms (request id %s)", self.method, seconds * 1e3,
                     CALL.get()[0], extra={"code": code})  # fmt: skip
        if self.edge.access:
            # A name the caller sent: bounded, and in the text line quoted unless it is a plain name (one with
            # spaces or brackets read as other fields: a model "sentiment OK 0.2ms [request ...]")
            bounded = errors.short(model) if model else ""
            shown = bounded if _PLAIN_NAME.fullmatch(model) else errors.echo(model) if model else "-"
            fields = {"model": bounded, "code": code, "duration_ms": round(seconds * 1e3, 3)}
            access_log.info("%s %s %s %.1fms", self.method, shown, code, seconds * 1e3,
                            extra={**fields, "principal": principal()})  # fmt: skip

    @staticmethod
    def ended(context: grpc.aio.ServicerContext, exc: BaseException, start: float) -> str:
        """The status code of a call that raised ``exc``. A cancel (the client went away, or its deadline passed:
        grpc cancels the handler, or stops iterating a streaming response and closes it) is never UNKNOWN."""
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            return "DEADLINE_EXCEEDED" if _deadline_passed(context, start) else "CANCELLED"
        return _code_name(context, "UNKNOWN")

    # --- the four handler kinds ---------------------------------------------------------------------------
    def handler(self) -> grpc.RpcMethodHandler:
        h = self.h
        kw = {
            "request_deserializer": keep_bytes if self.decode is not None else h.request_deserializer,
            "response_serializer": h.response_serializer,
        }
        if h.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary_unary(h.unary_unary), **kw)
        if h.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._unary_stream(h.unary_stream), **kw)
        if h.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._stream_unary(h.stream_unary), **kw)
        return grpc.stream_stream_rpc_method_handler(self._stream_stream(h.stream_stream), **kw)

    def _unary_unary(self, uu: Callable[..., Any]) -> Callable[..., Any]:
        edge, method, decode, auth = self.edge, self.method, self.decode, self.auth
        large = edge.decoding.settings.large_request_bytes

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            resolved, start, request_id = self.begin(context)
            try:
                try:
                    if auth:
                        edge.authenticate(context)
                    if decode is None:
                        result = uu(request, context)
                        result = await result if inspect.isawaitable(result) else result
                    else:
                        edge.decoding.charge(method)
                        size = decode.size(request)
                        if size < large:  # the common case, without the budget's bookkeeping
                            try:
                                result = uu(decode.decode(request), context)
                                result = await result if inspect.isawaitable(result) else result
                            except BaseException as exc:
                                traceback.clear_frames(exc.__traceback__)  # see Decoding.admit
                                raise
                        else:
                            async with edge.decoding.admit(size):
                                result = uu(decode.decode(request), context)
                                result = await result if inspect.isawaitable(result) else result
                except Exception as exc:
                    await edge.fail(method, exc, request_id, context)
            except BaseException as exc:
                release(request)  # the call's frames outlive it; its undecoded bytes must not
                self.end(request, context, resolved, start, self.ended(context, exc, start))
                raise
            self.end(request, context, resolved, start, _code_name(context, "OK"))
            return result

        return unary_unary

    def _stream_unary(self, su: Callable[..., Any]) -> Callable[..., Any]:
        edge, method, decode, auth = self.edge, self.method, self.decode, self.auth

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            resolved, start, request_id = self.begin(context)
            try:
                try:
                    if auth:
                        edge.authenticate(context)
                    if decode is None:
                        result = su(requests, context)
                        result = await result if inspect.isawaitable(result) else result
                    else:
                        async with aclosing(decode.messages(requests)) as decoded:
                            result = su(decoded, context)
                            result = await result if inspect.isawaitable(result) else result
                except Exception as exc:
                    await edge.fail(method, exc, request_id, context)
            except BaseException as exc:
                self.end(None, context, resolved, start, self.ended(context, exc, start))
                raise
            self.end(None, context, resolved, start, _code_name(context, "OK"))
            return result

        return stream_unary

    def _unary_stream(self, us: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        edge, method, decode, auth = self.edge, self.method, self.decode, self.auth

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            resolved, start, request_id = self.begin(context)
            try:
                try:
                    if auth:
                        edge.authenticate(context)
                    if decode is None:
                        async for item in drive(us(request, context)):
                            yield item
                    else:
                        edge.decoding.charge(method)
                        async with edge.decoding.admit(decode.size(request)):
                            async for item in drive(us(decode.decode(request), context)):
                                yield item
                except Exception as exc:
                    await edge.fail(method, exc, request_id, context)
            except BaseException as exc:
                release(request)  # the call's frames outlive it; its undecoded bytes must not
                self.end(request, context, resolved, start, self.ended(context, exc, start))
                raise
            self.end(request, context, resolved, start, _code_name(context, "OK"))

        return unary_stream

    def _stream_stream(self, ss: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        edge, method, decode, auth = self.edge, self.method, self.decode, self.auth

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            resolved, start, request_id = self.begin(context)
            try:
                try:
                    if auth:
                        edge.authenticate(context)
                    if decode is None:
                        async for item in drive(ss(requests, context)):
                            yield item
                    else:
                        async with aclosing(decode.messages(requests)) as decoded:
                            async for item in drive(ss(decoded, context)):
                                yield item
                except Exception as exc:
                    await edge.fail(method, exc, request_id, context)
            except BaseException as exc:
                self.end(None, context, resolved, start, self.ended(context, exc, start))
                raise
            self.end(None, context, resolved, start, _code_name(context, "OK"))

        return stream_stream


def _model_label(request: Any) -> str:
    """The model a request names ("" for streams, and for a request that could not be decoded)."""
    if request is None:
        return ""
    return request.model if isinstance(request, Undecoded) else model_label(request)


async def _no_such_method(method: str, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
    """Any method no service here has, whatever its shape: UNIMPLEMENTED with what to do instead. Outside the
    edge: it touches no model or session, so it needs no credentials, and it adds no metrics label per name."""
    message = f"no method {method[:200]!r} on this server; gRPC reflection lists its services and their methods"
    request_id = request_id_of(context)  # like every other answer: to quote when asking the operators
    await context.abort_with_status(rich_status(grpc.StatusCode.UNIMPLEMENTED, message, "UNIMPLEMENTED", request_id))


def build_edge(metrics: Metrics, settings: Settings | None = None, gateway_token: str | None = None) -> Edge:
    """The edge (``Edge``): metrics sees the final status of everything, errors maps what auth and decoding raise,
    auth names the principal before decoding spends anything on the request. ``gateway_token``: the REST
    gateway's on a TLS server, which vouches for its mTLS callers' subjects."""
    s = settings if settings is not None else Settings()
    return Edge(metrics, s, KeyTable(load_keys(s)), s.tls_client_ca is not None, gateway_token)


class EdgedServer:
    """What services register on: it hands ``server`` every handler with the edge around it (``Edge.wrap``), at
    registration, so nothing of the edge runs per call outside the wrapped handler itself. The generated
    ``add_*Servicer_to_server`` functions call the two methods below; grpc finds a registered method's handler
    itself. ``close`` (after every service) adds the generic handlers, for anything registered only that way, then
    the answer to a method no service has (``_no_such_method``; grpc's own would be a bare "Method not found!")."""

    def __init__(self, server: grpc.aio.Server, edge: Edge) -> None:
        self.server, self.edge = server, edge
        self._generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(_EdgedHandler(h, self.edge) for h in handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        wrapped = {name: self.edge.wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        self.server.add_registered_method_handlers(service, wrapped)

    def close(self) -> None:
        self.server.add_generic_rpc_handlers((*self._generic, _UnknownMethods()))


class _EdgedHandler(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A generic handler whose methods come with the edge around them."""

    def __init__(self, inner: grpc.GenericRpcHandler, edge: Edge) -> None:
        self.inner, self.edge = inner, edge

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self.inner.service(details)
        return None if handler is None else self.edge.wrap(details.method, handler)


class _UnknownMethods(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Registered last: every method no service has, whatever its shape (``_no_such_method``)."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return grpc.stream_stream_rpc_method_handler(functools.partial(_no_such_method, details.method))


def _from_generated_base(exc: BaseException) -> bool:
    """Whether ``exc`` came from a generated servicer base (``*_pb2_grpc.py``: a method this server lacks), not
    from code that raised NotImplementedError for a reason of its own (a plugin's task: INTERNAL, logged)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith("_pb2_grpc.py")
