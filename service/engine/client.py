"""The frontend side: ``RemoteDataPlane`` implements ``service.core.types.DataPlane`` by calling the engine.

Asynchronous calls share one DEALER socket: each gets a call id and a Future, one reader task resolves them.
A cancelled caller (the gRPC client went away) sends CANCEL so the engine stops the work too. ``complete``
streams: the engine pushes one message per chunk into a queue the generator reads. The synchronous calls of
the protocol (model table, statistics) are answered by the engine's control socket while this frontend waits,
with a timeout: they are rare (health, metadata, statistics), never on the inference path.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

import zmq
import zmq.asyncio

from service.core.context import note_model
from service.core.types import (
    CharStep,
    CompletionChunk,
    FloatArray,
    ForecastResult,
    InferResult,
    InputTensor,
    ModelInfo,
    ModelMetadata,
    ModelRef,
    ModelStats,
    SamplingParams,
    SentimentResult,
    SequenceRef,
    SessionInfo,
    SuggestResult,
)
from service.engine import wire
from service.engine.codec import pack, raise_error, unpack
from service.errors import ModelUnavailable

log = logging.getLogger(__name__)
Reply = tuple[int, Any, str | None]  # status, payload, model noted


class RemoteDataPlane:
    def __init__(self, addresses: wire.EngineAddresses, control_timeout: float = 10.0) -> None:
        self.addresses = addresses
        self.control_timeout = control_timeout
        self._ctx = zmq.asyncio.Context()
        self._sync_ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._events = self._ctx.socket(zmq.SUB)
        self._control: zmq.Socket[bytes] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._streams: dict[int, asyncio.Queue[Reply]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._hooks: list[Callable[[], Awaitable[None]]] = []

    # --- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        for sock in (self._sock, self._events):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.connect(self.addresses.calls)
        self._events.setsockopt(zmq.SUBSCRIBE, wire.MODELS_CHANGED)
        self._events.connect(self.addresses.events)
        self._tasks = [
            asyncio.create_task(self._read(), name="engine-replies"),
            asyncio.create_task(self._watch(), name="engine-events"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ModelUnavailable("the server is shutting down"))
        if self._control is not None:
            self._control.close(linger=0)
        self._ctx.destroy(linger=0)
        self._sync_ctx.destroy(linger=0)

    def on_models_changed(self, hook: Callable[[], Awaitable[None]]) -> None:
        """``hook`` runs after the engine loaded, reloaded or unloaded a model (health follows it)."""
        self._hooks.append(hook)

    async def _watch(self) -> None:
        while True:
            await self._events.recv()
            for hook in self._hooks:
                try:
                    await hook()
                except Exception:
                    log.exception("models-changed hook failed")

    async def _read(self) -> None:
        while True:
            frame = await self._sock.recv()
            call_id, status, payload, model = unpack(frame)
            fut = self._pending.pop(call_id, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result((status, payload, model))
                continue
            queue = self._streams.get(call_id)
            if queue is not None:
                queue.put_nowait((status, payload, model))

    # --- calling --------------------------------------------------------------------------------------
    def _send(self, message: list[Any]) -> None:
        self._sock.send(pack(message), flags=zmq.NOBLOCK)  # never blocks: no high-water mark

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        call_id = next(self._ids)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        self._send([wire.CALL, call_id, method, args, kwargs])
        try:
            status, payload, model = await fut
        except asyncio.CancelledError:
            if self._pending.pop(call_id, None) is not None:
                self._send([wire.CANCEL, call_id, "", (), {}])
            raise
        if model:
            note_model(model)
        if status == wire.ERROR:
            raise_error(*payload)
        return payload

    def _sync(self, method: str, *args: Any) -> Any:
        if self._control is None:
            self._control = self._sync_ctx.socket(zmq.REQ)
            self._control.setsockopt(zmq.LINGER, 0)
            self._control.connect(self.addresses.control)
        self._control.send(pack([method, args, {}]))
        if not self._control.poll(int(self.control_timeout * 1000)):
            self._control.close(linger=0)
            self._control = None  # a REQ socket that missed its answer cannot send again
            raise ModelUnavailable(f"the engine did not answer within {self.control_timeout:g}s")
        status, payload = unpack(self._control.recv())
        if status == wire.ERROR:
            raise_error(*payload)
        return payload

    # --- DataPlane: synchronous -------------------------------------------------------------------------
    def ready(self) -> bool:
        try:
            return bool(self._sync("ready"))
        except ModelUnavailable:
            return False

    def capabilities(self) -> set[str]:
        return set(self._sync("capabilities"))

    def models(self) -> list[ModelInfo]:
        return list(self._sync("models"))

    def unloaded(self) -> list[str]:
        return list(self._sync("unloaded"))

    def model_info(self, model: ModelRef) -> ModelInfo:
        info: ModelInfo = self._sync("model_info", model)
        return info

    def model_metadata(self, model: ModelRef) -> ModelMetadata:
        meta: ModelMetadata = self._sync("model_metadata", model)
        return meta

    def statistics(self, model: ModelRef | None) -> list[ModelStats]:
        return list(self._sync("statistics", model))

    # --- DataPlane: asynchronous ------------------------------------------------------------------------
    async def load_model(self, name: str) -> None:
        await self._call("load_model", name)

    async def unload_model(self, name: str) -> None:
        await self._call("unload_model", name)

    async def infer(
        self,
        model: ModelRef,
        inputs: Sequence[InputTensor],
        outputs: list[str] | None = None,
        sequence: SequenceRef | None = None,
    ) -> InferResult:
        result: InferResult = await self._call("infer", model, list(inputs), outputs, sequence)
        return result

    async def classify(self, model: ModelRef, texts: list[str]) -> list[SentimentResult]:
        return list(await self._call("classify", model, texts))

    async def complete(
        self, model: ModelRef, prompt: str, params: SamplingParams, session_id: str | None = None
    ) -> AsyncGenerator[CompletionChunk, None]:
        call_id = next(self._ids)
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        self._streams[call_id] = queue
        self._send([wire.STREAM, call_id, "complete", (model, prompt, params, session_id), {}])
        finished = False
        try:
            while True:
                status, payload, noted = await queue.get()
                if noted:
                    note_model(noted)
                if status == wire.ITEM:
                    yield payload
                    continue
                finished = True
                if status == wire.ERROR:
                    raise_error(*payload)
                return
        finally:
            self._streams.pop(call_id, None)
            if not finished:  # the consumer stopped early or was cancelled: stop the engine's generator too
                self._send([wire.CANCEL, call_id, "", (), {}])

    async def suggest(
        self, session_id: str, appended: str, *, reset: bool = False, n: int = 3, max_chars: int = 10, beam: bool = True
    ) -> SuggestResult:
        kwargs = {"reset": reset, "n": n, "max_chars": max_chars, "beam": beam}
        result: SuggestResult = await self._call("suggest", session_id, appended, **kwargs)
        return result

    async def char_step(
        self, model: ModelRef, text: str, *, session_id: str | None = None, num_chars: int = 0
    ) -> CharStep:
        result: CharStep = await self._call("char_step", model, text, session_id=session_id, num_chars=num_chars)
        return result

    async def forecast(self, model: ModelRef, history: FloatArray) -> ForecastResult:
        result: ForecastResult = await self._call("forecast", model, history)
        return result

    async def observe(self, session_id: str, rows: FloatArray) -> ForecastResult:
        result: ForecastResult = await self._call("observe", session_id, rows)
        return result

    async def create_session(self, model: ModelRef, ttl_seconds: float | None = None) -> SessionInfo:
        info: SessionInfo = await self._call("create_session", model, ttl_seconds)
        return info

    async def get_session(self, session_id: str) -> SessionInfo:
        info: SessionInfo = await self._call("get_session", session_id)
        return info

    async def fork_session(self, session_id: str, ttl_seconds: float | None = None) -> SessionInfo:
        info: SessionInfo = await self._call("fork_session", session_id, ttl_seconds)
        return info

    async def delete_session(self, session_id: str) -> None:
        await self._call("delete_session", session_id)
