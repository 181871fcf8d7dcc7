"""``CoreDataPlane``: the one object every transport calls (our gRPC API, KServe v2, the CLI).

It wires the registry (one entry per loaded model version: runtime, batcher, task), the session manager and
the tasks. Each public method resolves the model or the session, checks the model's task offers what the call
needs (a capability, never a task name), counts the request in the model's statistics and hands over to the
task. Sessions are loaded, advanced by the task and saved back by the session manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import numpy as np

from service import logs
from service.core import pinning
from service.core.aio import cancel_and_wait, within_timeout
from service.core.context import check_admin, note_model, principal
from service.core.registry import ModelEntry, ModelRegistry
from service.core.responses import CLASSIFY, PREDICT, ResponseCache, kept_forecast, kept_sentiment
from service.core.runtime import SHRINK_IDLE_SECONDS
from service.core.sequences import V2Inference
from service.core.sessions import SessionManager, SessionState, SessionStore, open_store, store_label, unknown_session
from service.core.sessions.export import seal
from service.core.shm import Regions
from service.core.stats import CountedRequest
from service.core.tasks import load_plugins, task_class
from service.core.tasks.base import Classifier, Forecaster, Generator, bytes_tensor, needs
from service.core.traces import Tracer
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
    Tensor,
)
from service.errors import FailedPrecondition, InvalidInput, echo
from service.logs import LogSettings
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
PLATFORM = "onnxruntime_onnx"
STORE_CHECK_SECONDS = 1.0  # how often the session store is asked whether it answers (health)


class CoreDataPlane:
    """Implements ``service.core.types.DataPlane``. Build once in main; ``await start()`` before serving."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        store: SessionStore | None = None,
        clock: Callable[[], float] = time.time,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        """``shard``: (this engine, of how many) when several share the server (``service/engine/shards.py``)."""
        self.settings = settings
        self.metrics = metrics
        load_plugins(settings.plugins)  # tasks and stores from outside this package register themselves
        self.tracer = Tracer.from_settings(settings, *shard)
        self.registry = ModelRegistry(settings, metrics, self.tracer)
        self.registry.subscribe(on_load=self._loaded, on_unload=self._unloaded)
        store = store if store is not None else open_store(settings.session_store, settings)
        self.sessions = SessionManager(settings, metrics, store, clock, shard)
        self._started = False
        self._watcher: asyncio.Task[None] | None = None
        self.responses = ResponseCache(settings.response_cache_bytes)  # (off at 0 bytes)
        if self.responses.enabled:
            self.registry.subscribe(on_unload=self.responses.forget)
        self._v2 = V2Inference(settings, self.registry, self.sessions, self.responses)
        if settings.triton_metrics:
            metrics.export_triton(lambda: _snapshots(self.registry.versions()), self.responses.enabled)
        self.store_ok = True  # the session store answered the last check (health of the Sessions service)
        self._store_watch: asyncio.Task[None] | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._store_listeners: list[Callable[[bool], Awaitable[None]]] = []
        self._log_listeners: list[Callable[[LogSettings], Awaitable[None]]] = []
        self.regions = Regions(settings.shared_memory == "system")
        self._region_listeners: list[Callable[[list[SharedRegion]], Awaitable[None]]] = []

    # --- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Loads the models in ``settings.models`` (those in ``load_models`` when set), starts the session reaper
        and the repository watcher."""
        await self.registry.start()
        self.sessions.start()
        if self.settings.watch_models_seconds:
            self._watcher = asyncio.create_task(self._watch(self.settings.watch_models_seconds), name="model-watch")
        self.metrics.session_store_info(store_label(self.settings.session_store))
        await self._check_store()
        advice = getattr(self.sessions.store, "advice", None)  # (an optional method of a store: the Redis store's)
        if advice is not None and (warning := await advice()):
            log.warning("session store: %s", warning)
        self._store_watch = asyncio.create_task(self._watch_store(), name="store-watch")
        self._trimmer = asyncio.create_task(self._trim_arenas(), name="arena-trim")
        self._started = True

    def on_store_change(self, listener: Callable[[bool], Awaitable[None]]) -> None:
        """``listener(ok)`` runs whenever the session store stops or starts answering."""
        self._store_listeners.append(listener)

    async def _check_store(self) -> None:
        problem = await self.sessions.store.check()
        ok = problem is None
        self.metrics.session_store_up(ok)
        counts = getattr(self.sessions.store, "counts", None)  # (a shared store's operations: the Redis store's)
        if isinstance(counts, dict):
            self.metrics.session_store_operations(counts)
        if ok != self.store_ok:
            self.store_ok = ok
            if ok:
                log.warning("session store answers again: sessions are served")
            else:
                log.warning("session store is unavailable (%s): calls that need a session fail", problem)
            for listener in self._store_listeners:
                await listener(ok)

    async def _watch_store(self) -> None:
        while True:
            await asyncio.sleep(STORE_CHECK_SECONDS)
            try:
                await self._check_store()
            except Exception:  # the watch must survive anything
                log.exception("session store check failed")

    async def _trim_arenas(self) -> None:
        """Hands back a large run's arena growth in versions no run has come to since (``Runtime.trim_due``): a
        one-row warm-up run, in a worker thread, runs with arena shrinkage on."""
        while True:
            await asyncio.sleep(SHRINK_IDLE_SECONDS)
            for entry in self.registry.versions():
                try:
                    if entry.state != "READY" or not entry.runtime.trim_due:
                        continue
                    feeds = task_class(entry.manifest.task).warmup_input(entry.manifest, 1)
                    if feeds is not None:
                        await asyncio.to_thread(entry.runtime.run, feeds, 1)
                except Exception:  # the trim must survive anything (a version unloading meanwhile)
                    log.exception("%s: handing back ONNX Runtime's memory failed", entry.label)

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.registry.sync()
            except Exception:  # the watcher must survive anything (a half-copied folder, a permission error)
                log.exception("model repository poll failed")

    async def stop(self) -> None:
        self._started = False
        for task in (self._watcher, self._store_watch, self._trimmer):
            await cancel_and_wait(task)
        await self.sessions.stop()
        await self.registry.stop()
        await asyncio.to_thread(self.tracer.close)  # every trace collected is written
        self.regions.close()

    def _loaded(self, entry: ModelEntry, replaced: bool) -> None:
        self.metrics.model_loaded(entry.name, entry.version, entry.runtime.provider, entry.load_seconds, True)
        if entry.task.stateful:  # (settings that leave no room for one of its sessions: a warning naming them)
            self.sessions.check_fits(entry.label, entry.task.session_nbytes())
        if self.responses.serves(entry):
            self.metrics.response_cache_model(entry.name)

    def _unloaded(self, entry: ModelEntry, replaced: bool) -> None:
        if not replaced:
            self.metrics.model_unloaded(entry.name, entry.version)

    @property
    def is_ready(self) -> bool:
        return self._started and any(e.ready for e in self.registry.versions())

    async def ready(self) -> bool:
        return self.is_ready

    async def capabilities(self) -> set[str]:
        return {c for e in self.registry.versions() if e.ready for c in e.capabilities}

    async def store_up(self) -> bool:
        return self.store_ok

    # --- models ---------------------------------------------------------------------------------------
    async def models(self) -> list[ModelInfo]:
        return [e.info() for e in self.registry.versions()]

    async def unloaded(self) -> list[str]:
        return self.registry.unloaded()

    async def model_info(self, model: ModelRef) -> ModelInfo:
        return self.registry.find(model).info()

    async def model_metadata(self, model: ModelRef) -> ModelMetadata:
        entry = self.registry.resolve(model)
        return ModelMetadata(
            name=entry.name,
            version=entry.version,
            # The versions a call may name and be served, as Triton's ModelMetadata lists its ready versions (one
            # that failed to load answers UNAVAILABLE when named, and shows in the repository index).
            versions=sorted(e.version for e in self.registry.versions() if e.name == entry.name and e.ready),
            task=entry.task.name,
            platform=PLATFORM,
            contract=entry.task.contract(),
            parameters={
                "task": entry.task.name,
                "version": str(entry.version),
                "sha256": entry.sha256,
                **entry.task.config_parameters(),
            },
            device="gpu" if entry.runtime.provider.startswith("CUDA") else "cpu",
            response_cache=self.responses.serves(entry),
            batch_delay_ms=entry.served_with.max_batch_delay_ms,
            instances=entry.served_with.model_instances,
            version_policy=entry.served_with.version_policy,
        )

    async def statistics(self, model: ModelRef | None) -> list[ModelStats]:
        """Per version: of every model, or of one, the versions that serve (as Triton lists the available ones: a
        version that failed to load has no statistics to show); a version named explicitly, whatever its state."""
        if model is not None and model.version is not None:
            return _snapshots([self.registry.find(model)])
        name = None if model is None else self.registry.find(model).name
        entries = [e for e in self.registry.versions() if name in (None, e.name) and e.state != "UNAVAILABLE"]
        return _snapshots(entries)

    def _check_admin(self, action: str) -> None:
        check_admin(self.settings.admin_principals, action)

    def _check_regions(self, action: str) -> None:
        s = self.settings
        check_admin([*s.admin_principals, *s.shared_memory_principals], action, "shared_memory_principals")

    async def load_model(self, name: str, serving: dict[str, object] | None = None) -> None:
        self._check_admin("load models")
        given = f" with {', '.join(f'{k}={v}' for k, v in sorted(serving.items()))}" if serving else ""
        try:
            await self.registry.load_model(name, serving)
        except Exception as exc:  # (audited too: who tried what; the caller gets the error itself)
            logs.audit.warning("model %s load%s by %s failed: %s", echo(name), given, _who(), exc)
            raise
        logs.audit.warning("model %s loaded%s by %s", echo(name), given, _who())

    async def unload_model(self, name: str) -> None:
        self._check_admin("unload models")
        await self.registry.unload_model(name)
        logs.audit.warning("model %s unloaded by %s", echo(name), _who())

    async def log_settings(self, changes: dict[str, Any] | None = None) -> LogSettings:
        """The log settings (Triton's logging extension); with ``changes``, checked and applied first, in this
        process and (through ``on_log_change`` listeners: the engine's frontends) every other one."""
        if not changes:
            return logs.current()
        self._check_admin("change the log settings")
        now = logs.update(changes)  # (checks every change first)
        logs.audit.warning("log settings changed by %s: %s", _who(),
                           ", ".join(f"{k}={now[k]}" for k in sorted(changes)))  # fmt: skip
        for listener in self._log_listeners:
            await listener(now)
        return now

    async def trace_settings(
        self, model: str | None = None, changes: dict[str, list[str] | None] | None = None
    ) -> dict[str, list[str]]:
        """Triton's trace extension: the trace settings in force for ``model`` (None: the server's); with
        ``changes`` (an empty value clears a setting), checked and applied first. Changing them is for admins, as
        for the log settings: a trace file is written where the settings say."""
        if model is not None:
            self.registry.find(ModelRef(model))  # NOT_FOUND for a model the repository lacks
        if not changes:
            return self.tracer.settings(model)
        self._check_admin("change the trace settings")
        now = self.tracer.update(model, changes)
        logs.audit.warning("trace settings of %s changed by %s: %s", model or "the server",
                           _who(),
                           ", ".join(f"{k}={','.join(now[k])}" for k in sorted(changes)))  # fmt: skip
        return now

    async def register_region(self, region: SharedRegion) -> None:
        """Triton's system shared-memory extension: opens ``region`` here, then (through ``on_regions_change``
        listeners: the engine's frontends) in every other process, before answering. Registering and unregistering
        are for admins and ``shared_memory_principals``: they make the server open files of its host."""
        self.regions.check_on()  # off: UNIMPLEMENTED saying how to turn it on, before anything else
        self._check_regions("register shared-memory regions")
        self.regions.register(region)
        who = _who()
        logs.audit.warning("shared-memory region %r (key %r, offset %d, %d bytes) registered by %s", region.name,
                           region.key, region.offset, region.byte_size, who)  # fmt: skip
        await self._regions_changed()

    async def unregister_region(self, name: str | None) -> None:
        self.regions.check_on()
        self._check_regions("unregister shared-memory regions")
        self.regions.unregister(name)
        await self._regions_changed()

    async def _regions_changed(self) -> None:
        table = self.regions.table()
        for listener in self._region_listeners:
            await listener(table)

    def on_regions_change(self, listener: Callable[[list[SharedRegion]], Awaitable[None]]) -> None:
        """``listener(table)`` runs after a region was registered or unregistered, before the call answers."""
        self._region_listeners.append(listener)

    def on_log_change(self, listener: Callable[[LogSettings], Awaitable[None]]) -> None:
        """``listener(settings)`` runs after a change of the log settings, before the call answers."""
        self._log_listeners.append(listener)

    # --- resolving ----------------------------------------------------------------------------------------
    def _serve(self, model: ModelRef, capability: str) -> ModelEntry:
        entry = self.registry.resolve(model)
        note_model(entry.name)
        if capability not in entry.capabilities:
            raise InvalidInput(
                f"model {entry.label} is a {entry.task.name!r} model; this call needs {needs(capability)}"
            )
        return entry

    @contextlib.asynccontextmanager
    async def _session(
        self, session_id: str, capability: str | None, model: ModelRef | None = None
    ) -> AsyncIterator[tuple[SessionState, ModelEntry]]:
        """Leases the session, checks it fits the call (``pinning.fits``) and counts the call as one request of the
        model's statistics."""
        async with self.sessions.use(session_id) as s:
            entry = pinning.fits(self.registry, s, capability, model)
            with CountedRequest(entry):
                yield s, entry

    # --- v2 inference -------------------------------------------------------------------------------------
    async def infer(
        self,
        model: ModelRef,
        inputs: Sequence[InputTensor],
        outputs: list[str] | None = None,
        sequence: SequenceRef | None = None,
        classes: dict[str, int] | None = None,
        timeout: float | None = None,
    ) -> InferResult:
        call = self._v2.infer(model, inputs, outputs, sequence, classes)
        return await (call if timeout is None else within_timeout(call, timeout))

    # --- our API: sentiment -------------------------------------------------------------------------------
    async def classify(self, model: ModelRef, texts: list[str]) -> list[SentimentResult]:
        entry = self._serve(model, "classify")
        with CountedRequest(entry, len(texts)) as req:
            if not self.responses.serves(entry):
                return await _classifier(entry).classify(texts)
            # Kept per text (a text's answer does not depend on the others in its request): a request answers from
            # the cache whatever texts come with it, and runs only the texts not seen before. It is checked first,
            # as without the cache (an empty request was an OK "hit"; one over the limits, all kept, an OK: its
            # count, and its words in all, max_words_per_request).
            await entry.task.check_texts(texts, "texts")
            who = principal()
            keys = [
                self.responses.key(entry.prefix_scope, who, {"TEXT": bytes_tensor("TEXT", [t])}, [CLASSIFY], {})
                for t in texts
            ]

            async def run(indices: list[int]) -> list[SentimentResult]:
                return await _classifier(entry).classify([texts[i] for i in indices])

            answers, req.inferences = await self.responses.answer_each(entry, keys, run, kept_sentiment)
            return answers

    # --- our API: char LM ---------------------------------------------------------------------------------
    async def _metered(
        self, entry: ModelEntry, stream: AsyncGenerator[CompletionChunk, None], t0: float
    ) -> AsyncGenerator[CompletionChunk, None]:
        chars, first = 0, True
        try:
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    if first:  # says which version answers (REST's generate, a client pinning to it)
                        chunk, first = dataclasses.replace(chunk, model_version=entry.version), False
                    if chars == 0:
                        self.metrics.time_to_first_chunk(entry.name, time.perf_counter() - t0)
                    chars += len(chunk.text)
                    yield chunk
        finally:
            self.metrics.chars_generated(entry.name, chars)

    async def complete(
        self, model: ModelRef, prompt: str, params: SamplingParams, session_id: str | None = None
    ) -> AsyncGenerator[CompletionChunk, None]:
        t0 = time.perf_counter()
        if session_id is None:
            entry = self._serve(model, "generate")
            with CountedRequest(entry):
                stream = self._metered(entry, _generator(entry).complete(None, prompt, params), t0)
                async with contextlib.aclosing(stream):
                    async for chunk in stream:
                        yield chunk
            return
        last: CompletionChunk | None = None
        async with self._session(session_id, "generate", model) as (s, entry):
            stream = self._metered(entry, _generator(entry).complete(s, prompt, params), t0)
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    if chunk.finish_reason is None:
                        yield chunk
                    else:
                        last = chunk
        if last is not None:  # the finishing chunk acknowledges the call: sent once the session is saved
            yield last

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
        async with self._session(session_id, "generate") as (s, entry):
            result = await _generator(entry).suggest(s, appended, reset, n, max_chars, beam, backspace)
        self.metrics.chars_generated(entry.name, sum(len(x.text) for x in result.suggestions))
        return result

    async def char_step(
        self, model: ModelRef, text: str, *, session_id: str | None = None, num_chars: int = 0
    ) -> CharStep:
        if session_id is None:
            entry = self._serve(model, "generate")
            with CountedRequest(entry):
                result = await _generator(entry).char_step(None, text, num_chars)
        else:
            async with self._session(session_id, "generate", model) as (s, entry):
                result = await _generator(entry).char_step(s, text, num_chars)
        self.metrics.chars_generated(entry.name, len(result.completion))
        return result

    # --- our API: forecasting -----------------------------------------------------------------------------
    async def forecast(
        self, model: ModelRef, history: FloatArray, *, columns: Sequence[str] | None = None
    ) -> ForecastResult:
        entry = self._serve(model, "forecast")
        with CountedRequest(entry) as req:
            if not self.responses.serves(entry):
                return await _forecaster(entry).predict(history, columns)
            rows = np.asarray(history)
            inputs = {"HISTORY": Tensor("HISTORY", rows.dtype.str, rows.shape, array=rows)}
            if columns is not None:
                inputs["COLUMNS"] = bytes_tensor("COLUMNS", list(columns))
            return await self._cached(
                entry, req, PREDICT, inputs, lambda: _forecaster(entry).predict(history, columns), kept_forecast
            )

    async def _cached(
        self,
        entry: ModelEntry,
        req: CountedRequest,
        call: str,
        inputs: dict[str, Tensor],
        compute: Callable[[], Awaitable[T]],
        keep: Callable[[T], tuple[T, int]],
    ) -> T:
        """One of our API's stateless calls through the response cache (keyed by ``call`` and its inputs); a hit
        counts no inference, as in Triton (a miss counts what ``req`` was made with)."""
        key = self.responses.key(entry.prefix_scope, principal(), inputs, [call], {})
        answer, hit = await self.responses.answer(entry, key, compute, keep)
        if hit:
            req.inferences = 0
        return answer

    async def observe(
        self, session_id: str, rows: FloatArray, *, columns: Sequence[str] | None = None
    ) -> ForecastResult:
        async with self._session(session_id, "forecast") as (s, entry):
            return await _forecaster(entry).observe(s, rows, columns)

    # --- sessions -------------------------------------------------------------------------------------
    async def create_session(self, model: ModelRef, ttl_seconds: float | None = None) -> SessionInfo:
        ttl = self.sessions.ttl(ttl_seconds)
        entry = self.registry.resolve(model)
        note_model(entry.name)
        _steppable(entry)
        return (await self.sessions.add(pinning.new_session(self.sessions, entry, ttl, None))).info()

    async def get_session(self, session_id: str) -> SessionInfo:
        s, in_use = await self.sessions.read(session_id)
        note_model(s.model)
        return s.info(in_use)

    async def fork_session(self, session_id: str, ttl_seconds: float | None = None) -> SessionInfo:
        def forkable(src: SessionState) -> None:  # (a plugin's sequence: its twin's id no call could reach)
            note_model(src.model)
            entry = self.registry.get(src.model, src.version)
            if entry is not None:
                _steppable(entry)

        twin = await self.sessions.fork(session_id, ttl_seconds, forkable)
        note_model(twin.model)
        return twin.info()

    async def delete_session(self, session_id: str) -> None:
        note_model((await self.sessions.delete(session_id)).model)

    # --- export / import ------------------------------------------------------------------------------
    async def export_session(self, session_id: str) -> tuple[bytes, SessionInfo]:
        key = pinning.signing_key(self.settings)
        s, in_use = await self.sessions.read(session_id)
        note_model(s.model)
        return seal(s, key, self.sessions.clock()), s.info(in_use)

    async def import_session(self, blob: bytes, ttl_seconds: float | None = None) -> SessionInfo:
        ttl = self.sessions.ttl(ttl_seconds)
        imported, entry = pinning.importable(self.registry, blob, pinning.signing_key(self.settings))
        note_model(entry.name)
        _steppable(entry)  # (a plugin's sequence imports as a sequence: seqserve_import with sequence_start)
        adopted = pinning.adopted(self.sessions, imported, entry, ttl, None)
        return (await self.sessions.add(adopted, event="imported")).info()


def _steppable(entry: ModelEntry) -> None:
    """FailedPrecondition for a model whose sessions no call of our API advances (a plugin's stateful task: KServe
    sequences only), before a session of it is made by Create, Fork or Import: it would live, unreachable, until
    its TTL."""
    if entry.task.stateful and not entry.capabilities & {"generate", "forecast"}:
        raise FailedPrecondition(
            f"model {entry.label} ({entry.task.name!r}) keeps state only through KServe v2 sequences "
            "(sequence_id, sequence_start): no call of this API advances a session of it, so none is created"
        )


# The capability was checked by _serve/_session (entry.capabilities, computed once at load): no isinstance here.
def _classifier(entry: ModelEntry) -> Classifier:
    return cast(Classifier, entry.task)


def _generator(entry: ModelEntry) -> Generator:
    return cast(Generator, entry.task)


def _forecaster(entry: ModelEntry) -> Forecaster:
    return cast(Forecaster, entry.task)


__all__ = ["CoreDataPlane", "unknown_session"]


def _snapshots(entries: list[ModelEntry]) -> list[ModelStats]:
    """The statistics of ``entries`` as they stand (ModelStatistics, and Triton's metric names)."""
    return [e.stats.snapshot(e.name, e.version) for e in entries]


def _who() -> str:
    """The caller as audit lines name it."""
    return principal() or "the anonymous principal"
