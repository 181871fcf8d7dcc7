"""Request decoding at the edge: bytes -> protobuf inside the edge's scope, bounded in size and memory.

gRPC decodes a request before any handler runs, so a corrupt message would fail outside our error
mapping (UNKNOWN or INTERNAL, and no metrics). The edge (``service.api.interceptors.Edge``) swaps every
handler's request deserializer for one that keeps the bytes (``Undecoded``) and decodes them inside the call
(``MethodDecoder``), where:

- a request larger than its method accepts is refused before it is parsed (``method_limit``: the methods that
  carry no bulk data take ``max_small_message_bytes``, the rest ``max_message_bytes``);
- a corrupt message or invalid UTF-8 in a string field is ``InvalidInput`` (INVALID_ARGUMENT), counted in the
  RPC metrics like any other error; streams decode each message as it is read;
- large requests (``large_request_bytes``) share a budget of bytes in flight (``ByteBudget``): a burst of
  near-limit requests waits its turn instead of pinning hundreds of MiB, and the allocator returns freed
  memory to the system when the last large request is done (``malloc_trim``);
- the caller's request rate is charged (``RateLimiter``): a unary call over the rate is refused, the messages
  of a client stream are paced to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import traceback
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from service.api.memory import ByteBudget, Trimmer
from service.api.principals import RateLimiter
from service.core.context import principal
from service.errors import InvalidInput, TooLarge, echo
from service.settings import Settings

log = logging.getLogger(__name__)

# Methods whose requests carry no bulk data: ids, names, a prompt or a keystroke's text. Any method not named
# here (including services added later) gets max_message_bytes.
SMALL_METHODS: frozenset[str] = frozenset(
    [f"/seqserve.v1.Sessions/{m}" for m in ("Create", "Get", "Fork", "Delete")]
    + ["/seqserve.v1.Autocomplete/Complete", "/seqserve.v1.Autocomplete/Suggest"]
    + [
        f"/inference.GRPCInferenceService/{m}"
        for m in (
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelConfig",
            "ModelStatistics",
            "RepositoryIndex",
            "RepositoryModelLoad",
            "RepositoryModelUnload",
            "LogSettings",
            "TraceSetting",
        )
    ]
    + ["/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"]
    + [f"/grpc.reflection.{v}.ServerReflection/ServerReflectionInfo" for v in ("v1alpha", "v1")]
)
# Methods that need no principal: they are never rate-limited. KServe's server liveness and readiness are health, as
# in Triton (its "health" endpoints need no key unless restricted), so probes written for Triton need no key here;
# ModelReady needs one (its answer tells which models exist).
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/", "/inference.GRPCInferenceService/ServerLive",
                   "/inference.GRPCInferenceService/ServerReady")  # fmt: skip


CLASSIFY = "/seqserve.v1.Sentiment/Classify"


def method_limit(method: str, settings: Settings) -> tuple[int, str]:
    """The largest request ``method`` accepts, and the setting that says so."""
    if method in SMALL_METHODS:
        return min(settings.max_small_message_bytes, settings.max_message_bytes), "max_small_message_bytes"
    if method == CLASSIFY:  # the largest valid request: every text at its longest, 4 UTF-8 bytes a character
        texts = (
            settings.max_texts_per_request * (4 * settings.max_chars_per_text + 16) + settings.max_small_message_bytes
        )
        if texts < settings.max_message_bytes:
            return texts, "max_texts_per_request x max_chars_per_text"
    return settings.max_message_bytes, "max_message_bytes"


# When a client cancels a stream while the server waits for its next message, grpc ends the request iterator as
# if the client had half-closed, and cancels the handler a moment later. Pausing this long at the end of every
# client stream lets that cancellation land, so the call is counted CANCELLED and not OK.
END_OF_STREAM_GRACE = 0.01  # seconds: only the final status of a client stream waits this long


class Undecoded:
    """A request as gRPC received it. Once decoded, ``data`` is dropped (the message is the servicer's to hold,
    not the edge's) and ``model`` is the model it names, for the metrics."""

    __slots__ = ("data", "model")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.model = ""


# KServe requests that name their model in a field called ``name``.
_NAMED = frozenset(f"inference.Model{kind}Request" for kind in ("Ready", "Metadata", "Config", "Statistics"))


def model_label(message: Any) -> str:
    """The model a request names (ours: ``model.name``; KServe: ``model_name``, or ``name`` in model readiness,
    metadata, config and statistics), else ""."""
    model = getattr(message, "model", None)
    if isinstance(model, str):
        return model
    name = getattr(model, "name", None) or getattr(message, "model_name", None)
    if name is None and getattr(getattr(message, "DESCRIPTOR", None), "full_name", "") in _NAMED:
        name = message.name
    return name if isinstance(name, str) else ""


def keep_bytes(data: bytes) -> Undecoded:
    return Undecoded(data)


def release(request: Any) -> None:
    """Drops the bytes of a request that failed before it was decoded (refused as too large, or by the byte
    budget, or cancelled while it waited). The failed call's frames outlive it: grpc keeps the state of the
    last call it accepted, with its abort exception and that exception's traceback, until the next call
    arrives, so a refused near-limit request would stay pinned until then."""
    if isinstance(request, Undecoded):
        request.data = b""


def _type_name(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request"))


async def drive(result: Any) -> AsyncIterator[Any]:
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


# --- shared by all methods ---------------------------------------------------------------------------------------
class Decoding:
    """What decoding shares across methods: the settings, the byte budget of large requests, the rate limiter.
    ``service.api.interceptors.Edge`` holds one and wraps each method with a ``MethodDecoder``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.budget = ByteBudget(settings.max_large_bytes_in_flight, on_idle=Trimmer())
        rate = settings.quota_requests_per_second
        self.limiter = RateLimiter(rate, settings.quota_request_burst) if rate > 0 else None

    # --- per request ----------------------------------------------------------------------------------
    def charge(self, method: str) -> None:
        if self.limiter is not None and not method.startswith(PUBLIC_PREFIXES):
            self.limiter.take(principal())

    async def pace(self, method: str) -> None:
        if self.limiter is None or method.startswith(PUBLIC_PREFIXES):
            return
        while (wait := self.limiter.wait_time(principal())) > 0:
            await asyncio.sleep(wait)

    @contextlib.asynccontextmanager
    async def admit(self, size: int) -> AsyncIterator[None]:
        """Large requests hold their bytes of the budget until the caller is done."""
        try:
            if size < self.settings.large_request_bytes:
                yield
                return
            async with self.budget.hold(size):
                yield
        except BaseException as exc:
            # The finished frames of a failed call (the servicer's, holding the decoded message) live on in the
            # exception's traceback, which asyncio and contextlib tie into reference cycles: only a full garbage
            # collection would free them. Clearing their locals frees a large message now.
            traceback.clear_frames(exc.__traceback__)
            raise


class MethodDecoder:
    """One method's decoding: its size limit, its message type, its client streams."""

    def __init__(self, edge: Decoding, method: str, handler: grpc.RpcMethodHandler) -> None:
        self.edge, self.method = edge, method
        self.deserialize: Callable[[bytes], Any] = handler.request_deserializer
        self.limit, self.setting = method_limit(method, edge.settings)

    def size(self, request: Undecoded) -> int:
        """The request's size, or ``TooLarge`` before anything is parsed."""
        size = len(request.data)
        if size > self.limit:
            raise TooLarge(f"the request is {size} bytes; {self.method} accepts at most {self.limit} ({self.setting})")
        return size

    def decode(self, request: Undecoded) -> Any:
        try:
            message = self.deserialize(request.data)
        except DecodeError as exc:
            raise InvalidInput(
                f"the request is not a valid {_type_name(self.deserialize)} message ({echo(str(exc), 120)}); "
                "check that the client uses this server's .proto files and sends UTF-8 in string fields"
            ) from None
        request.data, request.model = b"", model_label(message)
        return message

    async def messages(self, requests: AsyncIterator[Undecoded]) -> AsyncGenerator[Any, None]:
        """A client stream, decoded message by message; a large message holds its budget until the next read."""
        edge, method = self.edge, self.method
        paced = edge.limiter is not None and not method.startswith(PUBLIC_PREFIXES)
        large = edge.settings.large_request_bytes
        async for raw in requests:
            try:
                if paced:
                    await edge.pace(method)
                size = self.size(raw)
                if size < large:  # the common case: no budget to hold (what admit() does for it, minus the wrapper)
                    yield self.decode(raw)
                    continue
                async with edge.admit(size):
                    yield self.decode(raw)
            except BaseException:
                release(raw)
                raise
        await asyncio.sleep(END_OF_STREAM_GRACE)
