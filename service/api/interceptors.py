"""gRPC server interceptors, outermost first: metrics (+ access log), errors (+ request id), auth (principal),
decoding (``service.api.decoding``: size limits, corrupt messages, memory budget, request rate).

Every interceptor wraps all four handler kinds (unary/streaming request x unary/streaming response) the same
way: the call runs inside an async context manager (``scope``) that sees the request (unary requests only, as
``Undecoded`` bytes that name their model once decoded), the context, and any exception the call raises.
Domain errors (``service.errors``) become gRPC status codes here and nowhere else (``STATUS_CODES``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from service import errors
from service.api.decoding import PUBLIC_PREFIXES, DecodeInterceptor, Undecoded, drive, model_label
from service.api.principals import KeyTable, load_keys, subject_of
from service.core.context import call_scope, principal, set_principal
from service.logs import ACCESS_LOGGER, CALL
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)
access_log = logging.getLogger(ACCESS_LOGGER)

ERROR_DOMAIN = "seqserve"
REQUEST_ID_KEY = "x-request-id"
# A caller's x-request-id is used (and echoed) only when it looks like an id; anything else gets a fresh one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

# The ONE table from domain errors to gRPC status codes (most specific class first wins via the MRO walk).
STATUS_CODES: dict[type[errors.SeqServeError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.SessionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.SessionConflict: grpc.StatusCode.ABORTED,
}

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
                async for item in drive(us(request, context)):
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
            async for item in drive(ss(requests, context)):
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
    """The model a request names ("" for streams, and for a request that could not be decoded)."""
    return request.model if isinstance(request, Undecoded) else model_label(request)


class MetricsInterceptor(_Wrapping):
    """In-flight gauge, request counter and latency per (service, method, model, code); with ``access_log``,
    one log line per finished call."""

    def __init__(self, metrics: Metrics, access: bool = False) -> None:
        self.metrics = metrics
        self.access = access

    @asynccontextmanager
    async def scope(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        service, name = split_method(method)
        self.metrics.rpc_started(service, name)
        resolved = call_scope()  # the core notes the model it served (session calls, default model)
        start, code = time.perf_counter(), "OK"
        try:
            yield
            code = _code_name(context, "OK")
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away (or its deadline passed): grpc cancels the handler, or stops iterating a
            # streaming response and closes it. Never UNKNOWN: a cancel is the caller's choice, not our error.
            code = "DEADLINE_EXCEEDED" if _deadline_passed(context) else "CANCELLED"
            raise
        except BaseException:
            code = _code_name(context, "UNKNOWN")
            raise
        finally:
            model = _model_label(request) or (resolved[0] if resolved else "")
            seconds = time.perf_counter() - start
            self.metrics.rpc_finished(service, name, model, code, seconds)
            if self.access:
                model = errors.short(model)  # a name the caller sent: bounded
                fields = {"model": model, "code": code, "duration_ms": round(seconds * 1e3, 3)}
                access_log.info("%s %s %s %.1fms", method, model or "-", code, seconds * 1e3,
                                extra={**fields, "principal": principal()})  # fmt: skip


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
    """A status whose trailing metadata carries google.rpc.Status details (ErrorInfo) and the request id. The
    message is bounded (``errors.clip``): the core echoes with ``errors.echo``, this is the last resort."""
    message = errors.clip(message)
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata={"request_id": request_id}))
    status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[info]))
    return _Status(code, message, (*status.trailing_metadata, (REQUEST_ID_KEY, request_id)))


class _Status(grpc.Status):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, Any], ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's x-request-id when it looks like one (at most 128 id characters), else a fresh one."""
    sent = metadata_value(context, REQUEST_ID_KEY)
    return sent if sent is not None and _REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex


class ErrorInterceptor(_Wrapping):
    """Request id in, domain error -> status code out; anything unexpected -> INTERNAL with the request id
    (the traceback goes to the log, never to the caller)."""

    @asynccontextmanager
    async def scope(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        request_id = request_id_of(context)
        CALL.set((request_id, method))
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        try:
            yield
        except errors.SeqServeError as exc:
            code = status_code_for(exc)
            message = errors.clip(exc.message)
            log.info("%s -> %s: %s (request id %s)", method, code.name, message, request_id,
                     extra={"code": code.name})  # fmt: skip
            await context.abort_with_status(rich_status(code, message, error_reason(exc), request_id))
        except grpc.aio.AbortError:
            raise  # the servicer already chose a status
        except NotImplementedError:  # a generated servicer base for a method this server does not offer
            log.info("%s -> UNIMPLEMENTED (request id %s)", method, request_id, extra={"code": "UNIMPLEMENTED"})
            status = rich_status(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server",
                                 "UNIMPLEMENTED", request_id)  # fmt: skip
            await context.abort_with_status(status)
        except Exception:
            log.exception("internal error in %s (request id %s)", method, request_id, extra={"code": "INTERNAL"})
            message = f"internal error (request id {request_id})"
            await context.abort_with_status(rich_status(grpc.StatusCode.INTERNAL, message, "INTERNAL", request_id))


class AuthInterceptor(_Wrapping):
    """Every RPC but health and reflection needs credentials; the caller's principal goes into the core's
    request context (``service.core.context.set_principal``).

    With API keys: metadata ``authorization: Bearer <key>``, the key's name is the principal. Without API keys
    but with mTLS: the verified client certificate's subject is the principal."""

    def __init__(self, keys: KeyTable, mtls: bool) -> None:
        self.keys = keys
        self.mtls = mtls

    def applies(self, method: str) -> bool:
        return not method.startswith(PUBLIC_PREFIXES)

    @asynccontextmanager
    async def scope(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        if self.keys:
            set_principal(self._by_key(context))
        else:
            subject = subject_of(context.auth_context() or {})
            if subject is None:
                raise errors.Unauthenticated("this server needs a client certificate (mTLS) signed by its client CA")
            set_principal(subject)
        yield

    def _by_key(self, context: grpc.aio.ServicerContext) -> str:
        sent = metadata_value(context, "authorization")
        if sent is None:
            raise errors.Unauthenticated(
                "missing credentials: this server needs metadata 'authorization: Bearer <api key>'"
            )
        scheme, _, key = sent.partition(" ")
        name = self.keys.principal(key.strip()) if scheme.lower() == "bearer" else None
        if name is None:
            raise errors.Unauthenticated("wrong API key in metadata 'authorization' (expected 'Bearer <api key>')")
        return name


class ComposedChain(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The chain as one interceptor that composes each method's handler once and then reuses it.

    Every interceptor above derives a method's wrapped handler from the method name and the inner handler only
    (all per-call work happens inside the wrapped behaviour), so the composition can be cached: per RPC, grpc
    then awaits one ``intercept_service`` instead of one per interceptor, each building wrappers again."""

    def __init__(self, chain: list[grpc.aio.ServerInterceptor]) -> None:
        self.chain = chain
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        cached = self._cache.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = handler
        for interceptor in reversed(self.chain):  # innermost first, as grpc would apply them

            async def inner(_: grpc.HandlerCallDetails, h: grpc.RpcMethodHandler = wrapped) -> grpc.RpcMethodHandler:
                return h

            wrapped = await interceptor.intercept_service(inner, details)
        self._cache[details.method] = (handler, wrapped)
        return wrapped


def build_interceptors(metrics: Metrics, settings: Settings | None = None) -> list[grpc.aio.ServerInterceptor]:
    """Outermost first: metrics sees the final status of everything, errors maps what auth and decoding raise,
    auth names the principal before decoding spends anything on the request. Served as one ``ComposedChain``."""
    s = settings if settings is not None else Settings()
    chain: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(metrics, s.access_log), ErrorInterceptor()]
    keys = KeyTable(load_keys(s))
    if keys or s.tls_client_ca is not None:
        chain.append(AuthInterceptor(keys, mtls=s.tls_client_ca is not None))
    chain.append(DecodeInterceptor(s))
    return [ComposedChain(chain)]
