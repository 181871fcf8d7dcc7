"""The gRPC edge: one server interceptor that does, outermost first, metrics, errors (+ request id) and auth.

It wraps each method's handler once (cached per handler) for all four kinds (unary/streaming request x
unary/streaming response). A call runs inside nested ``try`` blocks of one coroutine or async generator, not
inside three stacked context managers and generator layers: the same behaviour at a fraction of the per-call
(and, for streams, per-message) cost. Layers, outermost first:

- metrics: in-flight gauge, request counter and latency per (service, method, model, code); the code is the
  status the call ended with (CANCELLED / DEADLINE_EXCEEDED when grpc cancelled the handler);
- errors: the request id (``x-request-id`` metadata or a new one) goes into the trailing metadata; domain
  errors (``service.errors``) become gRPC status codes here and nowhere else (``STATUS_CODES``), with a
  google.rpc ``ErrorInfo``; anything unexpected is logged and becomes INTERNAL with the request id;
- auth: every RPC but health and reflection needs ``authorization: Bearer <api_key>`` metadata.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import inspect
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from service import errors
from service.core.context import call_scope
from service.metrics import Metrics

log = logging.getLogger(__name__)

ERROR_DOMAIN = "seqserve"
REQUEST_ID_KEY = "x-request-id"
# Per-RPC request id, for log lines written while serving the call (grpc runs each RPC in its own Context).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# The ONE table from domain errors to gRPC status codes (most specific class first wins via the MRO walk).
STATUS_CODES: dict[type[errors.SeqServeError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.SessionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}

# Methods that never need credentials: load balancers and grpcurl must reach them.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/")  # fmt: skip

MISSING_KEY = "missing credentials: this server needs metadata 'authorization: Bearer <api key>'"
WRONG_KEY = "wrong API key in metadata 'authorization' (expected 'Bearer <api key>')"


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


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return None


def _model_label(request: Any) -> str:
    """The model a request names (ours: ``model.name``; KServe: ``model_name``), else ""."""
    model = getattr(request, "model", None)
    if isinstance(model, str):
        return model
    name = getattr(model, "name", None) or getattr(request, "model_name", None)
    return name if isinstance(name, str) else ""


def _code_name(context: grpc.aio.ServicerContext, default: str) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):  # some grpc versions keep the raw integer
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), default)
    return default


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def rich_status(code: grpc.StatusCode, message: str, reason: str, request_id: str) -> grpc.Status:
    """A status whose trailing metadata carries google.rpc.Status details (ErrorInfo) and the request id."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata={"request_id": request_id}))
    status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[info]))
    return _Status(code, message, (*status.trailing_metadata, (REQUEST_ID_KEY, request_id)))


class _Status(grpc.Status):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, Any], ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def _new_request_id() -> str:
    return os.urandom(16).hex()  # 128 random bits, 32 hex digits (what uuid4().hex looked like)


class EdgeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Metrics, errors (+ request id) and auth for every RPC, in one wrapper per method (see the module doc)."""

    def __init__(self, metrics: Metrics, api_key: str | None) -> None:
        self.metrics = metrics
        self._expected = f"Bearer {api_key}".encode() if api_key else None
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return self._wrap(method, handler)

    def registering(self, server: grpc.aio.Server) -> Any:
        """A stand-in for ``server`` to register services on: every method handler is wrapped once, at
        registration, so the server needs no interceptor at all (grpc.aio runs an interceptor chain per RPC as
        coroutines; wrapped handlers skip that). Everything else passes through to ``server``."""
        return _WrappingServer(server, self)

    # --- the layers -----------------------------------------------------------------------------------
    def _enter(self, context: grpc.aio.ServicerContext) -> tuple[str, str | None]:
        """The request id (set on the call) and the ``authorization`` value sent, in one pass over the metadata."""
        request_id = auth = None
        for k, v in context.invocation_metadata() or ():
            if k == REQUEST_ID_KEY and request_id is None:
                request_id = v if isinstance(v, str) else v.decode("utf-8", "replace")
            elif k == "authorization" and auth is None:
                auth = v if isinstance(v, str) else v.decode("utf-8", "replace")
        request_id = request_id or _new_request_id()
        REQUEST_ID.set(request_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        return request_id, auth

    def _check(self, auth: str | None) -> None:
        if auth is None:
            raise errors.Unauthenticated(MISSING_KEY)
        assert self._expected is not None
        if not hmac.compare_digest(auth.encode(), self._expected):
            raise errors.Unauthenticated(WRONG_KEY)

    async def _fail(self, method: str, context: grpc.aio.ServicerContext, exc: Exception, request_id: str) -> None:
        """Errors layer: aborts the call with the status ``exc`` maps to (re-raises an AbortError as it is)."""
        if isinstance(exc, errors.SeqServeError):
            code = status_code_for(exc)
            log.info("%s -> %s: %s (request id %s)", method, code.name, exc.message, request_id)
            await context.abort_with_status(rich_status(code, exc.message, error_reason(exc), request_id))
        if isinstance(exc, grpc.aio.AbortError):
            raise exc  # the servicer already chose a status
        log.exception("internal error in %s (request id %s)", method, request_id, exc_info=exc)
        message = f"internal error (request id {request_id})"
        await context.abort_with_status(rich_status(grpc.StatusCode.INTERNAL, message, "INTERNAL", request_id))

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, name = split_method(method)
        metrics, fail = self.metrics, self._fail
        check = self._check if self._expected is not None and not method.startswith(PUBLIC_PREFIXES) else None
        kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}

        def finish(request: Any, context: Any, resolved: list[str], start: float, code: str) -> None:
            model = _model_label(request) if request is not None else ""
            metrics.rpc_finished(
                service, name, model or (resolved[0] if resolved else ""), code, time.perf_counter() - start
            )

        def cancelled(context: Any) -> str:
            return "DEADLINE_EXCEEDED" if _deadline_passed(context) else "CANCELLED"

        if handler.unary_unary is not None or handler.stream_unary is not None:
            behaviour = handler.unary_unary or handler.stream_unary
            unary_request = handler.unary_unary is not None

            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                metrics.rpc_started(service, name)
                resolved = call_scope()  # the core notes the model it served (session calls, default model)
                start, code = time.perf_counter(), "OK"
                try:
                    request_id, auth = self._enter(context)
                    try:
                        if check is not None:
                            check(auth)
                        result = behaviour(request, context)
                        if inspect.isawaitable(result):
                            result = await result
                    except Exception as exc:
                        await fail(method, context, exc, request_id)
                        raise
                    code = _code_name(context, "OK")
                    return result
                except asyncio.CancelledError:
                    code = cancelled(context)
                    raise
                except BaseException:
                    code = _code_name(context, "UNKNOWN")
                    raise
                finally:
                    finish(request if unary_request else None, context, resolved, start, code)

            if unary_request:
                return grpc.unary_unary_rpc_method_handler(unary_response, **kw)
            return grpc.stream_unary_rpc_method_handler(unary_response, **kw)

        streaming = handler.unary_stream or handler.stream_stream
        unary_in = handler.unary_stream is not None

        async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            metrics.rpc_started(service, name)
            resolved = call_scope()
            start, code = time.perf_counter(), "OK"
            try:
                request_id, auth = self._enter(context)
                try:
                    if check is not None:
                        check(auth)
                    result = streaming(request, context)
                    if hasattr(result, "__aiter__"):
                        async with aclosing(result) as gen:  # closes the inner generator promptly on cancellation
                            async for item in gen:
                                yield item
                    elif inspect.isawaitable(result):  # a handler that writes through context.write
                        await result
                    else:
                        for item in result:
                            yield item
                except Exception as exc:
                    await fail(method, context, exc, request_id)
                    raise
                code = _code_name(context, "OK")
            except asyncio.CancelledError:
                code = cancelled(context)
                raise
            except BaseException:
                code = _code_name(context, "UNKNOWN")
                raise
            finally:
                finish(request if unary_in else None, context, resolved, start, code)

        if unary_in:
            return grpc.unary_stream_rpc_method_handler(stream_response, **kw)
        return grpc.stream_stream_rpc_method_handler(stream_response, **kw)


class _WrappingGeneric(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, inner: grpc.GenericRpcHandler, edge: EdgeInterceptor) -> None:
        self._inner, self._edge = inner, edge
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(details)
        if handler is None:
            return None
        cached = self._wrapped.get(details.method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[details.method] = (handler, self._edge.wrap(details.method, handler))
        return cached[1]


class _WrappingServer:
    def __init__(self, server: grpc.aio.Server, edge: EdgeInterceptor) -> None:
        self._server, self._edge = server, edge

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(tuple(_WrappingGeneric(h, self._edge) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        wrapped = {name: self._edge.wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        self._server.add_registered_method_handlers(service, wrapped)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def build_interceptors(metrics: Metrics, api_key: str | None) -> list[grpc.aio.ServerInterceptor]:
    """The one edge interceptor: metrics sees the final status of everything, errors maps what auth raises."""
    return [EdgeInterceptor(metrics, api_key)]
