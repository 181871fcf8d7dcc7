"""``CoreDataPlane``: the one object every transport calls (our gRPC API, KServe v2, the CLI).

It wires the registry (models), one batcher per ready model version, the session manager, and the tasks.
Each public method validates, resolves the model or session, and hands over to a task function.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator

from service.core.batching import Batcher
from service.core.context import note_model
from service.core.manifest import Manifest
from service.core.registry import ModelRegistry
from service.core.sessions import Session, SessionManager
from service.core.tasks import autocomplete, forecast, sentiment
from service.core.tasks.autocomplete import CharCursor
from service.core.tasks.common import Served, check_int, check_text
from service.core.tokenizers import Encoder
from service.core.types import (
    CharStep,
    CompletionChunk,
    FloatArray,
    ForecastResult,
    ModelInfo,
    ModelRef,
    SamplingParams,
    SentimentResult,
    SessionInfo,
    SuggestResult,
)
from service.errors import FailedPrecondition, InvalidInput, ModelUnavailable
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


class CoreDataPlane:
    """Implements ``service.core.types.DataPlane``. Build once in main; ``await start()`` before serving."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = ModelRegistry(settings, metrics)
        self.sessions = SessionManager(settings, metrics)
        self._served: dict[tuple[str, int], Served] = {}
        self._started = False
        self._reload_lock = asyncio.Lock()

    # --- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Loads every model in ``settings.models`` and starts the session reaper."""
        await self.reload()
        self.sessions.start()
        self._started = True

    async def reload(self) -> None:
        """Rescans the repository: loads new (or previously failed) versions, unloads removed ones.
        Sessions pinned to a removed version then get FAILED_PRECONDITION."""
        async with self._reload_lock:
            added, removed = await asyncio.to_thread(self.registry.scan)
            for mv in removed:
                served = self._served.pop((mv.name, mv.version), None)
                if served is not None:
                    await served.batcher.stop()
            for mv in added:
                if mv.runtime is None or mv.manifest is None:
                    continue
                batcher = Batcher(mv.name, mv.version, mv.runtime, self.settings, self.metrics)
                batcher.start()
                tok = mv.manifest.tokenizer
                self._served[(mv.name, mv.version)] = Served(
                    mv.name, mv.version, mv.manifest, mv.runtime, batcher, Encoder(tok) if tok is not None else None
                )

    async def stop(self) -> None:
        self._started = False
        await self.sessions.stop()
        for served in list(self._served.values()):
            await served.batcher.stop()
        self._served.clear()

    def ready(self) -> bool:
        return self._started and bool(self._served)

    # --- models ---------------------------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        return [mv.info() for mv in self.registry.versions()]

    def model_info(self, model: ModelRef) -> ModelInfo:
        return self.registry.find(model).info()

    def model_manifest(self, model: ModelRef) -> Manifest:
        mv = self.registry.find(model)
        if mv.manifest is None:
            raise ModelUnavailable(f"model {mv.name} version {mv.version} has no valid manifest: {mv.error}")
        return mv.manifest

    def _serve(self, model: ModelRef, task: str) -> Served:
        mv = self.registry.resolve(model)
        note_model(mv.name)
        served = self._served.get((mv.name, mv.version))
        if served is None:
            raise ModelUnavailable(f"model {mv.name} version {mv.version} is not serving (unloaded or stopping)")
        if served.manifest.task != task:
            raise InvalidInput(
                f"model {served.label} is a {served.manifest.task!r} model; this call needs a {task!r} model"
            )
        return served

    @contextlib.asynccontextmanager
    async def _session(
        self, session_id: str, task: str, model: ModelRef | None = None
    ) -> AsyncIterator[tuple[Session, Served]]:
        """Locks the session and checks it fits the call: task, model (when named) and pinned version."""
        async with self.sessions.use(session_id) as s:
            note_model(s.model)
            if s.task != task:
                raise FailedPrecondition(
                    f"session {session_id!r} belongs to {s.task!r} model {s.model}; this call needs a {task!r} session"
                )
            if (
                model is not None
                and model.name
                and (model.name != s.model or (model.version is not None and model.version != s.version))
            ):
                named = model.name + (f" version {model.version}" if model.version is not None else "")
                raise FailedPrecondition(
                    f"session {session_id!r} belongs to model {s.model} version {s.version}, but the request names "
                    f"{named}; omit the model or name the session's"
                )
            served = self._served.get((s.model, s.version))
            if served is None:
                raise FailedPrecondition(
                    f"session {session_id!r} is pinned to model {s.model} version {s.version}, which is no longer "
                    "loaded; create a new session"
                )
            yield s, served

    # --- sentiment ------------------------------------------------------------------------------------
    async def classify(self, model: ModelRef, texts: list[str]) -> list[SentimentResult]:
        return await sentiment.classify(self._serve(model, "sentiment"), texts, self.settings)

    # --- char LM --------------------------------------------------------------------------------------
    async def _stream(
        self, served: Served, cur: CharCursor, prompt: str, params: SamplingParams, keep_state: bool, t0: float
    ) -> AsyncGenerator[CompletionChunk, None]:
        chars = 0
        gen = autocomplete.complete(served, cur, prompt, params, self.settings, keep_state)
        try:
            async with contextlib.aclosing(gen):
                async for chunk in gen:
                    if chars == 0:
                        self.metrics.time_to_first_chunk(served.name, time.perf_counter() - t0)
                    chars += len(chunk.text)
                    yield chunk
        finally:
            self.metrics.chars_generated(served.name, chars)

    async def complete(
        self, model: ModelRef, prompt: str, params: SamplingParams, session_id: str | None = None
    ) -> AsyncGenerator[CompletionChunk, None]:
        t0 = time.perf_counter()
        if session_id is None:
            served = self._serve(model, "charlm")
            stream = self._stream(served, autocomplete.fresh_cursor(served), prompt, params, False, t0)
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    yield chunk
            return
        async with self._session(session_id, "charlm", model) as (s, served):
            stream = self._stream(served, s, prompt, params, True, t0)
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    yield chunk

    async def suggest(
        self, session_id: str, appended: str, *, reset: bool = False, n: int = 3, max_chars: int = 10, beam: bool = True
    ) -> SuggestResult:
        check_int(n, "n", 1, self.settings.max_suggestions, " (max_suggestions)")
        check_int(max_chars, "max_chars", 1, self.settings.max_generate_chars, " (max_generate_chars)")
        check_text(appended, "appended", self.settings.max_chars_per_text, allow_empty=True)
        if reset and not appended:
            raise InvalidInput("appended is empty while reset is set: after a reset there is no text to continue")
        async with self._session(session_id, "charlm") as (s, served):
            assert served.encoder is not None
            ids = served.encoder.encode(appended, field="appended")  # bad characters fail before the session changes
            if reset:
                s.reset()
            await autocomplete.advance_ids(served, s, ids)
            suggestions = await autocomplete.suggest(served, s, n, max_chars, beam)
            steps = s.steps
        self.metrics.chars_generated(served.name, sum(len(x.text) for x in suggestions))
        return SuggestResult(suggestions=suggestions, steps=steps)

    async def char_step(
        self, model: ModelRef, text: str, *, session_id: str | None = None, num_chars: int = 0
    ) -> CharStep:
        if session_id is None:
            served = self._serve(model, "charlm")
            result = await autocomplete.char_step(
                served, autocomplete.fresh_cursor(served), text, num_chars, self.settings
            )
        else:
            async with self._session(session_id, "charlm", model) as (s, served):
                result = await autocomplete.char_step(served, s, text, num_chars, self.settings)
        self.metrics.chars_generated(served.name, len(result.completion))
        return result

    # --- forecasting ----------------------------------------------------------------------------------
    async def forecast(self, model: ModelRef, history: FloatArray) -> ForecastResult:
        return await forecast.predict(self._serve(model, "forecast"), history, self.settings)

    async def observe(self, session_id: str, rows: FloatArray) -> ForecastResult:
        async with self._session(session_id, "forecast") as (s, served):
            return await forecast.observe(served, s, rows, self.settings)

    # --- sessions -------------------------------------------------------------------------------------
    async def create_session(
        self, model: ModelRef, ttl_seconds: float | None = None, session_id: str | None = None
    ) -> SessionInfo:
        ttl = self.sessions.ttl(ttl_seconds)
        sid = self.sessions.new_id(session_id)
        mv = self.registry.resolve(model)
        note_model(mv.name)
        served = self._served.get((mv.name, mv.version))
        if served is None:
            raise ModelUnavailable(f"model {mv.name} version {mv.version} is not serving (unloaded or stopping)")
        m = served.manifest
        if m.task == "charlm":
            state = served.runtime.zero_states(1)
            context = 4 * len(m.tokenizer.vocab) if m.tokenizer else 0  # next-char logits, float32
        elif m.task == "forecast" and m.forecast is not None:
            forecast.check_mode(served)
            state, context = {}, 4 * m.forecast.window * m.forecast.features  # last window rows, float32
        else:
            raise FailedPrecondition(
                f"model {served.label} is a stateless {m.task!r} model; sessions are for 'charlm' and 'forecast' models"
            )
        now = self.sessions.clock()
        session = Session(
            id=sid,
            model=served.name,
            version=served.version,
            task=m.task,
            state=state,
            nbytes=sum(int(v.nbytes) for v in state.values()) + context,
            ttl_seconds=ttl,
            created_at=now,
            last_used_at=now,
            metadata={"task": m.task},
        )
        return self.sessions.add(session).info()

    async def get_session(self, session_id: str) -> SessionInfo:
        s = self.sessions.get(session_id)
        note_model(s.model)
        return s.info()

    async def fork_session(self, session_id: str, ttl_seconds: float | None = None) -> SessionInfo:
        twin = await self.sessions.fork(session_id, ttl_seconds)
        note_model(twin.model)
        return twin.info()

    async def delete_session(self, session_id: str) -> None:
        note_model(self.sessions.delete(session_id).model)

    async def reset_session(self, session_id: str) -> SessionInfo:
        async with self.sessions.use(session_id) as s:
            s.reset()
        return s.info()
