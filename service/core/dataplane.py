"""``CoreDataPlane``: the one object every transport calls (our gRPC API, KServe v2, the CLI).

It wires the registry (one entry per loaded model version: runtime, batcher, task), the session manager and
the tasks. Each public method resolves the model or the session, checks the model's task offers what the call
needs (a capability, never a task name), counts the request in the model's statistics and hands over to the
task. Sessions are loaded, advanced by the task and saved back by the session manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import cast

from service.core.aio import cancel_and_wait
from service.core.context import note_model, principal
from service.core.registry import ModelEntry, ModelRegistry
from service.core.sessions import SessionManager, SessionState, SessionStore, open_store, unknown_session
from service.core.sessions.export import Exported, seal, unseal
from service.core.tasks import TASKS, load_plugins
from service.core.tasks.base import Classifier, Forecaster, Generator, TaskResult, check_and_decode, needs
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
    Tensor,
    TensorContract,
)
from service.errors import FailedPrecondition, InvalidInput, PermissionDenied, SessionEvicted, SessionNotFound, echo
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)
PLATFORM = "onnxruntime_onnx"
STORE_CHECK_SECONDS = 1.0  # how often the session store is asked whether it answers (health)


class _Request:
    """One request on a model version, from construction to ``finish``: counted in flight (unload drains it)
    and, when it finishes, in the model's statistics. Also a context manager (ok = the block did not raise)."""

    __slots__ = ("entry", "inferences", "t0")

    def __init__(self, entry: ModelEntry, inferences: int = 1) -> None:
        self.entry, self.inferences = entry, inferences
        entry.enter()
        self.t0 = time.perf_counter_ns()

    def finish(self, ok: bool) -> None:
        try:
            self.entry.stats.request(ok, time.perf_counter_ns() - self.t0, self.inferences)
        finally:
            self.entry.leave()

    def __enter__(self) -> _Request:
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        self.finish(kind is None)


class CoreDataPlane:
    """Implements ``service.core.types.DataPlane``. Build once in main; ``await start()`` before serving."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        store: SessionStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        load_plugins(settings.plugins)  # tasks and stores from outside this package register themselves
        self.registry = ModelRegistry(settings, metrics)
        self.registry.subscribe(on_load=self._loaded, on_unload=self._unloaded)
        store = store if store is not None else open_store(settings.session_store, settings)
        self.sessions = SessionManager(settings, metrics, store, clock)
        self._started = False
        self._watcher: asyncio.Task[None] | None = None
        self._contracts: weakref.WeakKeyDictionary[ModelEntry, tuple[TensorContract, list[str]]] = (
            weakref.WeakKeyDictionary()
        )
        self.store_ok = True  # the session store answered the last check (health of the Sessions service)
        self._store_watch: asyncio.Task[None] | None = None
        self._store_listeners: list[Callable[[bool], Awaitable[None]]] = []

    # --- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Loads every model in ``settings.models``, starts the session reaper and the repository watcher."""
        await self.registry.sync()
        self.sessions.start()
        if self.settings.watch_models_seconds:
            self._watcher = asyncio.create_task(self._watch(self.settings.watch_models_seconds), name="model-watch")
        await self._check_store()
        self._store_watch = asyncio.create_task(self._watch_store(), name="store-watch")
        self._started = True

    def on_store_change(self, listener: Callable[[bool], Awaitable[None]]) -> None:
        """``listener(ok)`` runs whenever the session store stops or starts answering."""
        self._store_listeners.append(listener)

    async def _check_store(self) -> None:
        problem = await self.sessions.store.check()
        ok = problem is None
        self.metrics.session_store_up(ok)
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

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.registry.sync()
            except Exception:  # the watcher must survive anything (a half-copied folder, a permission error)
                log.exception("model repository poll failed")

    async def stop(self) -> None:
        self._started = False
        for task in (self._watcher, self._store_watch):
            await cancel_and_wait(task)
        await self.sessions.stop()
        await self.registry.stop()

    def _loaded(self, entry: ModelEntry, replaced: bool) -> None:
        self.metrics.model_loaded(entry.name, entry.version, entry.runtime.provider, entry.load_seconds, True)

    def _unloaded(self, entry: ModelEntry, replaced: bool) -> None:
        if not replaced:
            self.metrics.model_unloaded(entry.name, entry.version)

    def ready(self) -> bool:
        return self._started and any(e.ready for e in self.registry.versions())

    def capabilities(self) -> set[str]:
        return {c for e in self.registry.versions() if e.ready for c in e.capabilities}

    # --- models ---------------------------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        return [e.info() for e in self.registry.versions()]

    def unloaded(self) -> list[str]:
        return self.registry.unloaded()

    def model_info(self, model: ModelRef) -> ModelInfo:
        return self.registry.find(model).info()

    def model_metadata(self, model: ModelRef) -> ModelMetadata:
        entry = self.registry.resolve(model)
        return ModelMetadata(
            name=entry.name,
            version=entry.version,
            versions=sorted(e.version for e in self.registry.versions() if e.name == entry.name),
            task=entry.task.name,
            platform=PLATFORM,
            contract=entry.task.contract(),
            parameters={"task": entry.task.name, "version": str(entry.version), "sha256": entry.sha256},
        )

    def statistics(self, model: ModelRef | None) -> list[ModelStats]:
        if model is None:
            entries = self.registry.versions()
        elif model.version is not None:
            entries = [self.registry.find(model)]
        else:
            name = self.registry.find(model).name
            entries = [e for e in self.registry.versions() if e.name == name]
        return [e.stats.snapshot(e.name, e.version) for e in entries]

    def _check_admin(self, action: str) -> None:
        """Model management changes what every caller sees: the anonymous principal (no credentials configured)
        or a principal listed in ``admin_principals`` only."""
        who = principal()
        if who and who not in self.settings.admin_principals:
            raise PermissionDenied(
                f"principal {echo(who)} may not {action} models; list it in admin_principals "
                "(SEQSERVE_ADMIN_PRINCIPALS) to allow it"
            )

    async def load_model(self, name: str) -> None:
        self._check_admin("load")
        await self.registry.load_model(name)

    async def unload_model(self, name: str) -> None:
        self._check_admin("unload")
        await self.registry.unload_model(name)

    # --- resolving ----------------------------------------------------------------------------------------
    def _serve(self, model: ModelRef, capability: str) -> ModelEntry:
        entry = self.registry.resolve(model)
        note_model(entry.name)
        if capability not in entry.capabilities:
            raise InvalidInput(
                f"model {entry.label} is a {entry.task.name!r} model; this call needs {needs(capability)}"
            )
        return entry

    def _request(self, entry: ModelEntry, inferences: int = 1) -> _Request:
        """``with self._request(entry) as req``: one request on ``entry``, counted in flight (unload drains it)
        and in the model's statistics."""
        return _Request(entry, inferences)

    def _pinned(self, s: SessionState) -> ModelEntry:
        """The loaded model a session belongs to: the same version and the same weights, else a clear error."""
        entry = self.registry.get(s.model, s.version)
        if entry is None or not entry.ready:
            raise FailedPrecondition(
                f"session {echo(s.id)} is pinned to model {s.model} version {s.version}, which is no longer loaded; "
                "create a new session (KServe: start a new sequence)"
            )
        if entry.sha256 != s.model_sha256:
            raise FailedPrecondition(
                f"session {echo(s.id)} is pinned to model {s.model} version {s.version} with weights "
                f"{s.model_sha256[:12]}, which were replaced by {entry.sha256[:12]}; create a new session "
                "(KServe: start a new sequence)"
            )
        return entry

    def _fits(self, s: SessionState, capability: str | None, model: ModelRef | None) -> ModelEntry:
        """The session's pinned model entry, once the session fits the call: capability, model (when named)."""
        note_model(s.model)
        entry = self._pinned(s)
        if capability is not None and capability not in entry.capabilities:
            raise FailedPrecondition(
                f"session {echo(s.id)} belongs to {s.task!r} model {s.model}; this call needs a session "
                f"of {needs(capability)}"
            )
        if model is not None and model.name and (model.name != s.model or model.version not in (None, s.version)):
            named = echo(model.name) + (f" version {model.version}" if model.version is not None else "")
            raise FailedPrecondition(
                f"session {echo(s.id)} belongs to model {s.model} version {s.version}, but the request "
                f"names {named}; omit the model or name the session's"
            )
        return entry

    @contextlib.asynccontextmanager
    async def _session(
        self, session_id: str, capability: str | None, model: ModelRef | None = None
    ) -> AsyncIterator[tuple[SessionState, ModelEntry]]:
        """Leases the session, checks it fits the call (``_fits``) and counts the call as one request of the
        model's statistics."""
        async with self.sessions.use(session_id) as s:
            entry = self._fits(s, capability, model)
            with self._request(entry):
                yield s, entry

    # --- v2 inference -------------------------------------------------------------------------------------
    def _contract(self, entry: ModelEntry) -> tuple[TensorContract, list[str]]:
        """The task's v2 contract and output names, built once per loaded version (not once per request)."""
        found = self._contracts.get(entry)
        if found is None:
            contract = entry.task.contract()
            found = self._contracts[entry] = (contract, [d.name for d in contract.outputs])
        return found

    def _sequence_id(self, model: str, seq: SequenceRef) -> str:
        """The session key of a v2 sequence, namespaced per principal: two callers' sequence 1 never meet.
        (The session records its owner too; the namespace keeps a ``sequence_start`` from replacing another
        principal's sequence.)"""
        owner = principal()
        if not owner:
            return f"kserve:{model}:{seq.id}"
        return f"kserve:{hashlib.sha256(owner.encode()).hexdigest()[:24]}:{model}:{seq.id}"

    def _unknown_sequence(self, model: str, seq: SequenceRef, cause: SessionNotFound) -> SessionNotFound:
        if isinstance(cause, SessionEvicted):
            return SessionEvicted(
                f"sequence {echo(seq.id)} of model {model} was evicted to make room (the session store was full and "
                "it was the least recently used); send sequence_start=true to begin it again"
            )
        return SessionNotFound(
            f"sequence {echo(seq.id)} of model {model} is unknown or expired (sequences expire after "
            f"{self.settings.sequence_idle_seconds:g}s idle, end with sequence_end, and may be evicted when the "
            "session store is full); send sequence_start=true to begin it"
        )

    async def infer(
        self,
        model: ModelRef,
        inputs: Sequence[InputTensor],
        outputs: list[str] | None = None,
        sequence: SequenceRef | None = None,
    ) -> InferResult:
        imported: Exported | None = None
        if sequence is not None and (sequence.export or sequence.import_blob is not None):
            self._signing_key()  # refused before the sequence moves when export/import is off
        if sequence is not None and sequence.import_blob is not None:
            if not sequence.start:
                raise InvalidInput("parameter seqserve_import starts a sequence: send it with sequence_start=true")
            imported, entry = self._importable(sequence.import_blob, self.registry.find(model).name)
            if model.version not in (None, entry.version):
                raise FailedPrecondition(
                    f"the session blob holds model {entry.name} version {entry.version}, but the request names "
                    f"version {model.version}; leave the version empty"
                )
        elif sequence is not None and not sequence.start and model.version is None:
            # A running sequence stays on the version (and weights) it started with, even when a newer one loaded
            # since; FAILED_PRECONDITION when that version is gone or its weights changed.
            return await self._continue(self.registry.find(model).name, inputs, outputs, sequence)
        else:
            entry = self.registry.resolve(model)
        note_model(entry.name)
        with self._request(entry) as req:
            tensors, wanted = await self._checked(entry, inputs, outputs, sequence)
            blob = None
            if sequence is None:
                result = await entry.task.infer(tensors, None)
            else:
                result, blob = await self._infer_sequence(entry, tensors, sequence, imported)
            req.inferences = result.inferences
        return InferResult(
            entry.name, entry.version, [result.outputs[n] for n in wanted], result.inferences, result.steps, blob
        )

    async def _checked(
        self, entry: ModelEntry, inputs: Sequence[InputTensor], outputs: list[str] | None, seq: SequenceRef | None
    ) -> tuple[dict[str, Tensor], list[str]]:
        """The request checked against the version's contract: decoded inputs and the outputs to return."""
        contract, names = self._contract(entry)
        wanted = outputs or names
        for name in wanted:
            if name not in names:
                raise InvalidInput(f"model {entry.name} has no output {echo(name)}; outputs are {', '.join(names)}")
        if seq is not None and not contract.sequences:
            raise InvalidInput(
                f"model {entry.name} is stateless: it does not take sequence_id/sequence_start/sequence_end"
            )
        return await check_and_decode(entry.name, contract, inputs), wanted

    async def _continue(
        self, name: str, inputs: Sequence[InputTensor], outputs: list[str] | None, seq: SequenceRef
    ) -> InferResult:
        """One step of a running sequence that names no version, under one lease: the session says which version
        serves it (``_pinned``), the request is checked, the task advances the session and it is saved. A request
        refused before the task ran leaves the session untouched (not even its idle time)."""
        sid = self._sequence_id(name, seq)
        use = self.sessions.use(sid, save=False)
        req: _Request | None = None
        ok = False
        try:
            async with use as s:
                entry = self._pinned(s)
                note_model(entry.name)
                req = self._request(entry)
                tensors, wanted = await self._checked(entry, inputs, outputs, seq)
                use.save = True  # from here on the session is saved (or ended) whatever the task does
                result = await entry.task.infer(tensors, s)
                req.inferences = result.inferences
                blob = seal(s, self._signing_key(), self.sessions.clock()) if seq.export else None
            ok = True
        except SessionNotFound as exc:
            raise self._unknown_sequence(name, seq, exc) from None
        finally:
            try:
                if seq.end and use.save:
                    with contextlib.suppress(SessionNotFound):
                        await self.sessions.delete(sid)
            finally:
                if req is not None:
                    req.finish(ok)
        return InferResult(
            entry.name, entry.version, [result.outputs[n] for n in wanted], result.inferences, result.steps, blob
        )

    async def _infer_sequence(
        self, entry: ModelEntry, tensors: dict[str, Tensor], seq: SequenceRef, imported: Exported | None
    ) -> tuple[TaskResult, bytes | None]:
        """One step of a sequence; with ``seq.export`` also the signed blob of the state after it."""
        sid = self._sequence_id(entry.name, seq)
        ttl = self.settings.sequence_idle_seconds
        if imported is not None:  # starts from the blob's state
            await self.sessions.add(self._adopt(imported, entry, ttl, sid), event="imported")
        elif seq.start:  # (re)starts the sequence: a start on a running id replaces its state
            await self._new_session(entry, ttl, sid)
        try:
            async with self.sessions.use(sid) as s:  # the request is counted by infer()
                self._fits(s, None, ModelRef(entry.name, entry.version))
                result = await entry.task.infer(tensors, s)
                blob = seal(s, self._signing_key(), self.sessions.clock()) if seq.export else None
            return result, blob
        except SessionNotFound as exc:
            raise self._unknown_sequence(entry.name, seq, exc) from None
        finally:
            if seq.end:
                with contextlib.suppress(SessionNotFound):
                    await self.sessions.delete(sid)

    # --- our API: sentiment -------------------------------------------------------------------------------
    async def classify(self, model: ModelRef, texts: list[str]) -> list[SentimentResult]:
        entry = self._serve(model, "classify")
        with self._request(entry, len(texts)):
            return await _classifier(entry).classify(texts)

    # --- our API: char LM ---------------------------------------------------------------------------------
    async def _metered(
        self, entry: ModelEntry, stream: AsyncGenerator[CompletionChunk, None], t0: float
    ) -> AsyncGenerator[CompletionChunk, None]:
        chars = 0
        try:
            async with contextlib.aclosing(stream):
                async for chunk in stream:
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
            with self._request(entry):
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
        self, session_id: str, appended: str, *, reset: bool = False, n: int = 3, max_chars: int = 10, beam: bool = True
    ) -> SuggestResult:
        async with self._session(session_id, "generate") as (s, entry):
            result = await _generator(entry).suggest(s, appended, reset, n, max_chars, beam)
        self.metrics.chars_generated(entry.name, sum(len(x.text) for x in result.suggestions))
        return result

    async def char_step(
        self, model: ModelRef, text: str, *, session_id: str | None = None, num_chars: int = 0
    ) -> CharStep:
        if session_id is None:
            entry = self._serve(model, "generate")
            with self._request(entry):
                result = await _generator(entry).char_step(None, text, num_chars)
        else:
            async with self._session(session_id, "generate", model) as (s, entry):
                result = await _generator(entry).char_step(s, text, num_chars)
        self.metrics.chars_generated(entry.name, len(result.completion))
        return result

    # --- our API: forecasting -----------------------------------------------------------------------------
    async def forecast(self, model: ModelRef, history: FloatArray) -> ForecastResult:
        entry = self._serve(model, "forecast")
        with self._request(entry):
            return await _forecaster(entry).predict(history)

    async def observe(self, session_id: str, rows: FloatArray) -> ForecastResult:
        async with self._session(session_id, "forecast") as (s, entry):
            return await _forecaster(entry).observe(s, rows)

    # --- sessions -------------------------------------------------------------------------------------
    async def _new_session(self, entry: ModelEntry, ttl: float, session_id: str | None) -> SessionState:
        task = entry.task
        if not task.stateful:
            stateful = sorted(name for name, cls in TASKS.items() if cls.stateful)
            raise FailedPrecondition(
                f"model {entry.label} is a stateless {task.name!r} model; sessions are for models of the "
                f"stateful tasks ({', '.join(stateful)})"
            )
        task.check_session()
        now = self.sessions.clock()
        s = SessionState(
            id=self.sessions.new_id(session_id),
            model=entry.name,
            version=entry.version,
            model_sha256=entry.sha256,
            task=task.name,
            state=task.initial_state(),
            context={},
            steps=0,
            ttl_seconds=ttl,
            created_at=now,
            last_used_at=now,
            nbytes=task.session_nbytes(),
            metadata={"task": task.name},
        )
        return await self.sessions.add(s)

    async def create_session(self, model: ModelRef, ttl_seconds: float | None = None) -> SessionInfo:
        ttl = self.sessions.ttl(ttl_seconds)
        entry = self.registry.resolve(model)
        note_model(entry.name)
        return (await self._new_session(entry, ttl, None)).info()

    async def get_session(self, session_id: str) -> SessionInfo:
        s = await self.sessions.get(session_id)
        note_model(s.model)
        return s.info()

    async def fork_session(self, session_id: str, ttl_seconds: float | None = None) -> SessionInfo:
        twin = await self.sessions.fork(session_id, ttl_seconds)
        note_model(twin.model)
        return twin.info()

    async def delete_session(self, session_id: str) -> None:
        note_model((await self.sessions.delete(session_id)).model)

    # --- export / import ------------------------------------------------------------------------------
    def _signing_key(self) -> bytes:
        key = self.settings.session_signing_key
        if key is None:
            raise FailedPrecondition(
                "session export/import is off on this server: set SEQSERVE_SESSION_SIGNING_KEY (the same key on "
                "every server that should accept the blobs)"
            )
        return key.get_secret_value().encode()

    async def export_session(self, session_id: str) -> tuple[bytes, SessionInfo]:
        key = self._signing_key()
        s = await self.sessions.get(session_id)
        note_model(s.model)
        return seal(s, key, self.sessions.clock()), s.info()

    async def import_session(self, blob: bytes, ttl_seconds: float | None = None) -> SessionInfo:
        ttl = self.sessions.ttl(ttl_seconds)
        imported, entry = self._importable(blob)
        note_model(entry.name)
        return (await self.sessions.add(self._adopt(imported, entry, ttl, None), event="imported")).info()

    def _importable(self, blob: bytes, model: str | None = None) -> tuple[Exported, ModelEntry]:
        """The verified blob and the loaded model version (same weights) that can continue it."""
        x = unseal(blob, self._signing_key())
        if model is not None and model != x.model:
            raise FailedPrecondition(
                f"the session blob holds a session of model {x.model}, not of {echo(model)}; send it to {x.model}"
            )
        entry = self.registry.get(x.model, x.version)
        if entry is None or not entry.ready or entry.sha256 != x.model_sha256:
            raise FailedPrecondition(
                f"the session blob holds a session of model {x.model} version {x.version} with weights "
                f"{x.model_sha256[:12]}, which this server does not serve; load that version to import it"
            )
        if not entry.task.stateful:
            raise FailedPrecondition(f"model {entry.label} is stateless: it cannot hold an imported session")
        entry.task.check_session()
        want = {k: (v.shape, v.dtype) for k, v in entry.task.initial_state().items()}
        if want != {k: (v.shape, v.dtype) for k, v in x.session.state.items()}:
            raise FailedPrecondition(f"the session blob's state does not fit model {entry.label}")
        return x, entry

    def _adopt(self, x: Exported, entry: ModelEntry, ttl: float, session_id: str | None) -> SessionState:
        """A new session (new id, TTL, times) holding the blob's state, context and steps."""
        now = self.sessions.clock()
        src = x.session
        return SessionState(
            id=self.sessions.new_id(session_id),
            model=entry.name,
            version=entry.version,
            model_sha256=entry.sha256,
            task=entry.task.name,
            state=dict(src.state),
            context=dict(src.context),
            steps=src.steps,
            ttl_seconds=ttl,
            created_at=now,
            last_used_at=now,
            nbytes=entry.task.session_nbytes(),
            metadata=dict(src.metadata),
        )


# The capability was checked by _serve/_session (entry.capabilities, computed once at load): no isinstance here.
def _classifier(entry: ModelEntry) -> Classifier:
    return cast(Classifier, entry.task)


def _generator(entry: ModelEntry) -> Generator:
    return cast(Generator, entry.task)


def _forecaster(entry: ModelEntry) -> Forecaster:
    return cast(Forecaster, entry.task)


__all__ = ["CoreDataPlane", "unknown_session"]
