"""gRPC server interceptors, outermost first: metrics, errors (+ request id), auth.

Every interceptor wraps all four handler kinds (unary/streaming request x unary/streaming response) the same
way: the call runs inside an async context manager (``scope``) that sees the request (unary requests only),
the context, and any exception the call raises. Domain errors (``service.errors``) become gRPC status codes
here and nowhere else (``STATUS_CODES``).
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
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
    errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.SessionConflict: grpc.StatusCode.ABORTED,
}

# Methods that never need credentials: load balancers and grpcurl must reach them.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/")  # fmt: skip

Scope = Callable[[Any, grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]


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


async def _drive(result: Any) -> AsyncIterator[Any]:
    """Iterates what a streaming behaviour returned: an async generator, a sync iterator, or an awaitable
    (a handler that writes through ``context.write`` and returns None)."""
    if hasattr(result, "__aiter__"):
        async with aclosing(result) as gen:  # closes the inner generator promptly on cancellation
            async for item in gen:
                yield item
    elif inspect.isawaitable(result):
        await result
    else:
        for item in result:
            yield item


def wrap_handler(handler: grpc.RpcMethodHandler, scope: Scope) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` whose behaviour runs inside ``scope(request or None, context)``."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with scope(request, context):
                result = uu(request, context)
                return await result if inspect.isawaitable(result) else result

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
    if handler.unary_stream is not None:
        us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with scope(request, context):
                async for item in _drive(us(request, context)):
                    yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
    if handler.stream_unary is not None:
        su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async with scope(None, context):
                result = su(requests, context)
                return await result if inspect.isawaitable(result) else result

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
    ss = handler.stream_stream

    async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with scope(None, context):
            async for item in _drive(ss(requests, context)):
                yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


class _Wrapping(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Base class: subclasses implement ``scope`` and may exempt methods with ``applies``."""

    def applies(self, method: str) -> bool:
        return True

    def scope(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not self.applies(details.method):
            return handler
        method: str = details.method
        return wrap_handler(handler, lambda request, context: self.scope(method, request, context))


def _model_label(request: Any) -> str:
    """The model a request names (ours: ``model.name``; KServe: ``model_name``), else ""."""
    model = getattr(request, "model", None)
    if isinstance(model, str):
        return model
    name = getattr(model, "name", None) or getattr(request, "model_name", None)
    return name if isinstance(name, str) else ""


class MetricsInterceptor(_Wrapping):
    """In-flight gauge, request counter and latency per (service, method, model, code)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    @asynccontextmanager
    async def scope(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        service, name = split_method(method)
        self.metrics.rpc_started(service, name)
        resolved = call_scope()  # the core notes the model it served (session calls, default model)
        start, code = time.perf_counter(), "OK"
        try:
            yield
            code = _code_name(context, "OK")
        except asyncio.CancelledError:
            # grpc cancels the handler when the client goes away or its deadline passes.
            code = "DEADLINE_EXCEEDED" if _deadline_passed(context) else "CANCELLED"
            raise
        except BaseException:
            code = _code_name(context, "UNKNOWN")
            raise
        finally:
            model = _model_label(request) or (resolved[0] if resolved else "")
            self.metrics.rpc_finished(service, name, model, code, time.perf_counter() - start)


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


class ErrorInterceptor(_Wrapping):
    """Request id in, domain error -> status code out; anything unexpected -> INTERNAL with the request id
    (the traceback goes to the log, never to the caller)."""

    @asynccontextmanager
    async def scope(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        request_id = metadata_value(context, REQUEST_ID_KEY) or uuid.uuid4().hex
        REQUEST_ID.set(request_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        try:
            yield
        except errors.SeqServeError as exc:
            code = status_code_for(exc)
            log.info("%s -> %s: %s (request id %s)", method, code.name, exc.message, request_id)
            await context.abort_with_status(rich_status(code, exc.message, error_reason(exc), request_id))
        except grpc.aio.AbortError:
            raise  # the servicer already chose a status
        except Exception:
            log.exception("internal error in %s (request id %s)", method, request_id)
            message = f"internal error (request id {request_id})"
            await context.abort_with_status(rich_status(grpc.StatusCode.INTERNAL, message, "INTERNAL", request_id))


class AuthInterceptor(_Wrapping):
    """Every RPC but health and reflection needs ``authorization: Bearer <api_key>`` metadata."""

    def __init__(self, api_key: str) -> None:
        self._expected = f"Bearer {api_key}".encode()

    def applies(self, method: str) -> bool:
        return not method.startswith(PUBLIC_PREFIXES)

    @asynccontextmanager
    async def scope(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        sent = metadata_value(context, "authorization")
        if sent is None:
            raise errors.Unauthenticated(
                "missing credentials: this server needs metadata 'authorization: Bearer <api key>'"
            )
        if not hmac.compare_digest(sent.encode(), self._expected):
            raise errors.Unauthenticated("wrong API key in metadata 'authorization' (expected 'Bearer <api key>')")
        yield


def build_interceptors(metrics: Metrics, api_key: str | None) -> list[grpc.aio.ServerInterceptor]:
    """Outermost first: metrics sees the final status of everything, errors maps what auth raises."""
    chain: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(metrics), ErrorInterceptor()]
    if api_key:
        chain.append(AuthInterceptor(api_key))
    return chain
