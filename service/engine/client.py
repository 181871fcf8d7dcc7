"""The frontend side: ``RemoteDataPlane`` implements ``service.core.types.DataPlane`` by calling the engine.

Asynchronous calls share one Unix socket connection: each gets a call id and a Future that the reading side
resolves. A cancelled caller (the gRPC client went away) sends CANCEL so the engine stops the work too.
``complete`` streams: the engine pushes one message per chunk into a queue the generator reads. Control calls
(model table, metadata, health, statistics) share the connection, are never refused for a full queue, and fail
UNAVAILABLE after ``control_timeout`` seconds without an answer; like every call, they never block the frontend's
event loop while they wait.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

from service import logs
from service.core.aio import within_timeout
from service.core.context import admitted, mark_admitted, note_model, principal, priority
from service.core.shm import Regions
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
    SharedRegion,
    SuggestResult,
)
from service.engine import wire
from service.engine.codec import pack, raise_error, unpack
from service.errors import RETRY_SOON, ModelUnavailable, Overloaded
from service.logs import CALL, LogSettings

log = logging.getLogger(__name__)
Reply = tuple[int, Any, str | None, bool]  # status, payload, model noted, admitted


def _context() -> list[Any]:
    """What the engine's task needs to know about this call (wire.py): principal, admission, request id, priority
    level."""
    return [principal(), admitted(), CALL.get(), priority()]


class _Link(asyncio.Protocol):
    def __init__(self, plane: RemoteDataPlane) -> None:
        self.plane = plane
        self.framer = wire.Framer()

    def data_received(self, data: bytes) -> None:
        for payload in self.framer.feed(data):
            for call_id, status, body, model, was_admitted in unpack(payload):
                self.plane._answer(call_id, status, body, model, was_admitted)

    def connection_lost(self, exc: Exception | None) -> None:
        self.plane._lost()


# How much longer than a request's timeout parameter a frontend waits for its engine, which keeps the limit: the
# engine's own DeadlineExceeded (or its answer in time) comes back within the hop.
TIMEOUT_BACKSTOP_SECONDS = 0.25


class RemoteDataPlane:
    def __init__(
        self, path: str, max_pending: int = 1024, control_timeout: float = 10.0, shared_memory: bool = False
    ) -> None:
        self.path = path
        self.regions = Regions(shared_memory)  # the engine's table, opened here (its REGIONS_CHANGED events)
        self.max_pending = max_pending  # calls waiting for the engine beyond which new ones fail at once
        self.control_timeout = control_timeout
        self.silent = False  # the engine did not answer the watchdog's last call in time (``answers``)
        self._transport: asyncio.Transport | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._streams: dict[int, asyncio.Queue[Reply]] = {}
        self._hooks: list[Callable[[], Awaitable[None]]] = []
        self._outbox: list[list[Any]] = []  # calls of this loop iteration, sent as one frame
        self._closing = False
        self._hook_tasks: set[asyncio.Future[None]] = set()

    def waiting(self) -> int:
        """Calls sent to the engine and not answered yet (``max_pending`` bounds those not admitted)."""
        return len(self._pending)

    # --- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        transport, _ = await asyncio.get_running_loop().create_unix_connection(lambda: _Link(self), self.path)
        self._transport = transport  # (no isinstance check: uvloop's transports do not subclass asyncio's)
        self._send([wire.HELLO, 0, "", (os.getpid(),), {}, None])  # (the engine knows who falls silent)

    def beat(self) -> None:
        """Tells the engine this frontend's event loop runs (``wire.BEAT``: no answer)."""
        if self._transport is not None and not self._transport.is_closing():
            self._send([wire.BEAT, 0, "", (), {}, None])

    async def stop(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()
        self._lost()

    def _lost(self) -> None:
        """The engine connection closed: every waiting call fails (UNAVAILABLE) instead of waiting forever."""
        if not self._closing:
            log.error("the engine connection was lost")
        gone = ModelUnavailable("the engine is not reachable (the server is stopping or restarting)")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(gone)
        self._pending.clear()
        for queue in self._streams.values():
            queue.put_nowait((wire.ERROR, ["ModelUnavailable", gone.message], None, False))

    def on_models_changed(self, hook: Callable[[], Awaitable[None]]) -> None:
        """``hook`` runs after the engine loaded, reloaded or unloaded a model (health follows it)."""
        self._hooks.append(hook)

    def _answer(self, call_id: int, status: int, payload: Any, model: str | None, was_admitted: bool) -> None:
        fut = self._pending.pop(call_id, None)
        if fut is not None:
            if not fut.done():
                fut.set_result((status, payload, model, was_admitted))
            return
        queue = self._streams.get(call_id)
        if queue is not None:
            queue.put_nowait((status, payload, model, was_admitted))
        elif status == wire.EVENT and payload[0] == wire.LOGS_CHANGED:
            self._logs_changed(payload[1], payload[2])
        elif status == wire.EVENT and payload[0] == wire.REGIONS_CHANGED:
            self._regions_changed(payload[1], payload[2])
        elif status == wire.EVENT:
            task = asyncio.ensure_future(self._run_hooks(payload[1]))
            self._hook_tasks.add(task)  # held until done (the loop keeps only weak references)
            task.add_done_callback(self._hook_tasks.discard)

    def _logs_changed(self, event: int, settings: dict[str, Any]) -> None:
        """The engine changed the log settings: the same here, then ACK (event 0, sent on HELLO: no ACK)."""
        try:
            logs.update(settings)
        except Exception:
            log.exception("could not apply the engine's log settings %r", settings)
        if event:
            self._send([wire.ACK, event, "", (), {}, None])

    def _regions_changed(self, event: int, table: list[SharedRegion]) -> None:
        """The engine's shared-memory regions changed: map the same ones here, then ACK (the call that changed
        them answers once every frontend has)."""
        self.regions.follow(table)
        if event:
            self._send([wire.ACK, event, "", (), {}, None])

    async def _run_hooks(self, event: int) -> None:
        for hook in self._hooks:
            try:
                await hook()
            except Exception:
                log.exception("models-changed hook failed")
        self._send([wire.ACK, event, "", (), {}, None])

    # --- calling --------------------------------------------------------------------------------------
    def _send(self, message: list[Any]) -> None:
        """Queues a call; the calls of one loop iteration leave together in one frame."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(message)

    def _flush(self) -> None:
        calls, self._outbox = self._outbox, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(wire.frame(pack(calls)))

    def _check_link(self) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ModelUnavailable("the engine is not reachable (the server is stopping or restarting)")

    def _open(self, kind: int, method: str, args: Any, kwargs: Any, context: Any) -> tuple[int, asyncio.Future[Reply]]:
        """Sends a call; returns its id and the Future its reply resolves."""
        call_id = next(self._ids)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        self._send([kind, call_id, method, args, kwargs, context])
        return call_id, fut

    def _abandon(self, call_id: int) -> None:
        """The caller stopped waiting (cancelled, timed out): the engine stops the work too, unless it answered."""
        if self._pending.pop(call_id, None) is not None:
            self._send([wire.CANCEL, call_id, "", (), {}, None])

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self._check_link()
        if len(self._pending) >= self.max_pending and not admitted():  # never an admitted stream's later steps
            raise Overloaded(
                f"{len(self._pending)} requests of this frontend are waiting for the engine, the limit is "
                f"max_queue_size={self.max_pending}; retry with backoff",
                retry_after=RETRY_SOON,
            )
        call_id, fut = self._open(wire.CALL, method, args, kwargs, _context())
        try:
            status, payload, model, was_admitted = await fut
        except asyncio.CancelledError:
            self._abandon(call_id)
            raise
        if model:
            note_model(model)
        if was_admitted:
            mark_admitted()
        if status == wire.ERROR:
            raise_error(*payload)
        return payload

    async def _control(self, method: str, *args: Any, context: bool = False, timeout: float | None = None) -> Any:
        """A control call: not bounded by ``max_pending`` (health must answer under load), bounded in time
        (``timeout``, default ``control_timeout``). With ``context``, the engine knows the caller (its principal),
        as for a call."""
        self._check_link()
        limit = self.control_timeout if timeout is None else timeout
        call_id, fut = self._open(wire.CONTROL, method, args, {}, _context() if context else None)
        try:
            status, payload, _, _ = await asyncio.wait_for(fut, limit)
        except TimeoutError:
            self._abandon(call_id)
            raise ModelUnavailable(f"the engine did not answer {method} within {limit:g} s") from None
        except asyncio.CancelledError:
            self._abandon(call_id)
            raise
        if status == wire.ERROR:
            raise_error(*payload)
        return payload

    # --- DataPlane: control -----------------------------------------------------------------------------
    async def store_up(self) -> bool:
        """Whether the engine's session store answers (health of the Sessions service)."""
        try:
            return bool(await self._control("store_up"))
        except ModelUnavailable:
            return False

    async def ready(self) -> bool:
        if self.silent:  # (the watchdog found the engine silent: not ready, at once, until it answers again)
            return False
        try:
            return bool(await self._control("ready"))
        except ModelUnavailable:
            return False

    async def answers(self, within: float) -> bool:
        """Whether the engine answers a control call within ``within`` seconds (the frontend's watchdog: a stopped
        or wedged engine keeps its connection open, and health that only follows its events stayed SERVING)."""
        try:
            await self._control("ready", timeout=within)
            self.silent = False
        except ModelUnavailable:
            self.silent = True
        return not self.silent

    async def capabilities(self) -> set[str]:
        return set(await self._control("capabilities"))

    async def models(self) -> list[ModelInfo]:
        return list(await self._control("models"))

    async def unloaded(self) -> list[str]:
        return list(await self._control("unloaded"))

    async def model_info(self, model: ModelRef) -> ModelInfo:
        info: ModelInfo = await self._control("model_info", model)
        return info

    async def model_metadata(self, model: ModelRef) -> ModelMetadata:
        meta: ModelMetadata = await self._control("model_metadata", model)
        return meta

    async def statistics(self, model: ModelRef | None) -> list[ModelStats]:
        return list(await self._control("statistics", model))

    async def log_settings(self, changes: dict[str, Any] | None = None) -> LogSettings:
        """Read and changed in the engine, which passes a change on to every frontend before it answers."""
        return dict(await self._control("log_settings", changes, context=True))

    async def trace_settings(
        self, model: str | None = None, changes: dict[str, list[str] | None] | None = None
    ) -> dict[str, list[str]]:
        """Read and changed in the engine, which traces the requests and writes the trace files."""
        return dict(await self._control("trace_settings", model, changes, context=True))

    async def register_region(self, region: SharedRegion) -> None:
        """Registered in the engine, which passes its table on to every frontend (each opens it) before it
        answers."""
        await self._control("register_region", region, context=True)

    async def unregister_region(self, name: str | None) -> None:
        await self._control("unregister_region", name, context=True)

    # --- DataPlane: asynchronous ------------------------------------------------------------------------
    async def load_model(self, name: str, serving: dict[str, object] | None = None) -> None:
        await self._call("load_model", name, serving)

    async def unload_model(self, name: str) -> None:
        await self._call("unload_model", name)

    async def infer(
        self,
        model: ModelRef,
        inputs: Sequence[InputTensor],
        outputs: list[str] | None = None,
        sequence: SequenceRef | None = None,
        classes: dict[str, int] | None = None,
        timeout: float | None = None,
    ) -> InferResult:
        # The engine keeps the time limit (where the work runs, and the statistics count it: a frontend that gave
        # up first counted its request's success, or nothing, when the engine had started it or not). This wait, a
        # moment longer, only bounds one for an engine that does not answer at all (stopped, wedged).
        call = self._call("infer", model, list(inputs), outputs, sequence, classes, timeout)
        backstop = None if timeout is None else timeout + TIMEOUT_BACKSTOP_SECONDS
        result: InferResult = await (call if backstop is None else within_timeout(call, backstop, timeout))
        return result

    async def classify(self, model: ModelRef, texts: list[str]) -> list[SentimentResult]:
        return list(await self._call("classify", model, texts))

    async def complete(
        self, model: ModelRef, prompt: str, params: SamplingParams, session_id: str | None = None
    ) -> AsyncGenerator[CompletionChunk, None]:
        self._check_link()
        call_id = next(self._ids)
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        self._streams[call_id] = queue
        self._send([wire.STREAM, call_id, "complete", (model, prompt, params, session_id), {}, _context()])
        finished = False
        try:
            while True:
                status, payload, noted, was_admitted = await queue.get()
                if noted:
                    note_model(noted)
                if was_admitted:
                    mark_admitted()
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
                self._send([wire.CANCEL, call_id, "", (), {}, None])

    async def suggest(
        self,
        session_id: str,
        appended: str,
        *,
        reset: bool = False,
        n: int = 3,
        max_chars: int = 10,
        beam: bool = True,
        backspace: int = 0,
    ) -> SuggestResult:
        kwargs = {"reset": reset, "n": n, "max_chars": max_chars, "beam": beam, "backspace": backspace}
        result: SuggestResult = await self._call("suggest", session_id, appended, **kwargs)
        return result

    async def char_step(
        self, model: ModelRef, text: str, *, session_id: str | None = None, num_chars: int = 0
    ) -> CharStep:
        result: CharStep = await self._call("char_step", model, text, session_id=session_id, num_chars=num_chars)
        return result

    async def forecast(
        self, model: ModelRef, history: FloatArray, *, columns: Sequence[str] | None = None
    ) -> ForecastResult:
        result: ForecastResult = await self._call("forecast", model, history, columns=_names(columns))
        return result

    async def observe(
        self, session_id: str, rows: FloatArray, *, columns: Sequence[str] | None = None
    ) -> ForecastResult:
        result: ForecastResult = await self._call("observe", session_id, rows, columns=_names(columns))
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

    async def export_session(self, session_id: str) -> tuple[bytes, SessionInfo]:
        blob, info = await self._call("export_session", session_id)
        return bytes(blob), info

    async def import_session(self, blob: bytes, ttl_seconds: float | None = None) -> SessionInfo:
        info: SessionInfo = await self._call("import_session", blob, ttl_seconds)
        return info


def _names(columns: Sequence[str] | None) -> list[str] | None:
    """Column names as msgpack sends them (a protobuf repeated field is not a list)."""
    return None if columns is None else [str(c) for c in columns]
