"""Several engines (``SEQSERVE_ENGINES`` > 1): each owns a share of the sessions and sequences, and a frontend
sends each call to the engine that owns what it names.

    frontend ── ShardedDataPlane ─┬─ RemoteDataPlane ── engine 1 (the ``seqserve serve`` process: metrics, start-up)
                                  ├─ RemoteDataPlane ── engine 2
                                  └─ ...

An id's engine is ``shard_of(id)`` (``service/core/shards.py``). Sessions: an engine draws the ids it creates (a
create, a fork, an import) until one is its own (``SessionManager.new_id``), so a session id routes to the engine
that made it. KServe sequences: the client's ``sequence_id`` names it, so the frontend routes by its text. Calls
that name neither (stateless inference, metadata) go to the frontend's own engine (``home``), so one frontend's
stateless steps batch together; new sessions go to each engine in turn. Model loads and unloads, log and trace
settings and shared-memory regions apply in every engine; statistics add up over them. Every engine loads every
model, and a model version is ready only where it is ready in every engine: one that failed, or is missing, in one
engine is reported not ready, with that engine's reason (``merged``), since the calls routed there fail.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import fields, replace
from typing import Any, TypeVar

from service.core.shards import shard_of
from service.core.shm import Regions
from service.core.types import (
    BatchStats,
    CharStep,
    CompletionChunk,
    Duration,
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
from service.engine.client import RemoteDataPlane
from service.errors import SeqServeError
from service.logs import LogSettings

T = TypeVar("T")


def _batches(a: list[BatchStats], b: list[BatchStats]) -> list[BatchStats]:
    """Two engines' batch statistics as one's: per batch size, the times add up."""
    by_size = {x.batch_size: x for x in a}
    for y in b:
        x = by_size.get(y.batch_size)
        by_size[y.batch_size] = y if x is None else BatchStats(
            y.batch_size, x.compute_input + y.compute_input, x.compute_infer + y.compute_infer,
            x.compute_output + y.compute_output,
        )  # fmt: skip
    return [by_size[k] for k in sorted(by_size)]


def _plus(a: ModelStats, b: ModelStats) -> ModelStats:
    """One version's statistics of two engines as one's: counts and times (every ``Duration`` field) add up, each
    batch size's too; the last inference is the later one."""
    durations = [f.name for f in fields(a) if isinstance(getattr(a, f.name), Duration)]
    added = {name: getattr(a, name) + getattr(b, name) for name in durations}
    return replace(
        a,
        last_inference_ms=max(a.last_inference_ms, b.last_inference_ms),
        inference_count=a.inference_count + b.inference_count,
        execution_count=a.execution_count + b.execution_count,
        batches=_batches(a.batches, b.batches),
        **added,
    )


def summed(tables: Sequence[list[ModelStats]]) -> list[ModelStats]:
    """The statistics of several engines as one server's, per model version (``_plus``). In the first engine's
    order (every engine loads the same versions)."""
    out: dict[tuple[str, int], ModelStats] = {}
    for table in tables:
        for s in table:
            key = (s.name, s.version)
            out[key] = s if key not in out else _plus(out[key], s)
    return list(out.values())


def _in_engine(info: ModelInfo, k: int, engines: int, why: str | None = None) -> ModelInfo:
    """``info`` as the server's: not ready, saying which engine it is not ready in and why."""
    why = why or info.error or "not ready"
    return replace(info, ready=False, error=f"in engine {k + 1} of {engines}: {why}")


def merged(tables: Sequence[list[ModelInfo]]) -> list[ModelInfo]:
    """Several engines' model versions as one server's, in the first engine's order: a version is ready where every
    engine has it ready. Else it is the first engine's entry that is not ready (its reason naming that engine), or,
    where an engine lacks the version, not ready saying which."""
    out: dict[tuple[str, int], ModelInfo] = {}
    holders: dict[tuple[str, int], set[int]] = defaultdict(set)
    for k, table in enumerate(tables):
        for m in table:
            key = (m.name, m.version)
            holders[key].add(k)
            if key not in out or (out[key].ready and not m.ready):
                out[key] = m if m.ready else _in_engine(m, k, len(tables))
    for key, m in out.items():
        missing = [k for k in range(len(tables)) if k not in holders[key]]
        if m.ready and missing:
            out[key] = _in_engine(m, missing[0], len(tables), "not loaded there")
    return list(out.values())


class ShardedDataPlane:
    """``service.core.types.DataPlane`` over one ``RemoteDataPlane`` per engine (see the module's docstring)."""

    def __init__(self, planes: list[RemoteDataPlane], home: int) -> None:
        self.planes = planes
        self.home = planes[home % len(planes)]
        self._turn = itertools.cycle(planes)  # where the next new session goes

    def _of(self, key: str) -> RemoteDataPlane:
        return self.planes[shard_of(key, len(self.planes))]

    async def _every(self, call: Callable[[RemoteDataPlane], Awaitable[T]]) -> list[T]:
        """``call`` on every engine at once; the first failure is raised once all have answered (a change that
        one engine refuses, for a reason of its request, every engine refuses alike)."""
        results = await asyncio.gather(*(call(p) for p in self.planes), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    # --- the frontend's link ---------------------------------------------------------------------------
    @property
    def regions(self) -> Regions:
        return self.home.regions  # every engine holds the same table (registered in each), so every link too

    def waiting(self) -> int:
        return sum(p.waiting() for p in self.planes)

    async def start(self) -> None:
        await asyncio.gather(*(p.start() for p in self.planes))

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.planes))

    def on_models_changed(self, hook: Callable[[], Awaitable[None]]) -> None:
        for p in self.planes:
            p.on_models_changed(hook)

    # --- control --------------------------------------------------------------------------------------
    async def ready(self) -> bool:
        return all(await self._every(lambda p: p.ready()))

    async def store_up(self) -> bool:
        return all(await self._every(lambda p: p.store_up()))

    async def answers(self, within: float) -> bool:
        """Whether every engine answers within ``within`` seconds (a call routed to a silent one would hang)."""
        return all(await asyncio.gather(*(p.answers(within) for p in self.planes)))

    async def capabilities(self) -> set[str]:
        return await self.home.capabilities()

    async def models(self) -> list[ModelInfo]:
        return merged(await self._every(lambda p: p.models()))

    async def unloaded(self) -> list[str]:
        return await self.home.unloaded()

    async def model_info(self, model: ModelRef) -> ModelInfo:
        """The version's state in every engine as one, by ``merged``'s rule: an engine that does not have it, or has
        it failed, makes it not ready; not found only where no engine has it."""
        answers = await asyncio.gather(*(p.model_info(model) for p in self.planes), return_exceptions=True)
        found = [a for a in answers if isinstance(a, ModelInfo)]
        for a in answers:
            if isinstance(a, BaseException) and (not found or not isinstance(a, SeqServeError)):
                raise a
        for k, a in enumerate(answers):
            if not isinstance(a, ModelInfo):
                return _in_engine(found[0], k, len(answers), str(a))
            if not a.ready:
                return _in_engine(a, k, len(answers))
        return found[0]

    async def model_metadata(self, model: ModelRef) -> ModelMetadata:
        return await self.home.model_metadata(model)

    async def statistics(self, model: ModelRef | None) -> list[ModelStats]:
        return summed(await self._every(lambda p: p.statistics(model)))

    async def load_model(self, name: str, serving: dict[str, object] | None = None) -> None:
        """The load in every engine. One that fails in some engines only (a nondeterministic failure: memory, files
        changed during the load) says in which, and that the others loaded it."""
        results = await asyncio.gather(*(p.load_model(name, serving) for p in self.planes), return_exceptions=True)
        failed = [(k, r) for k, r in enumerate(results) if isinstance(r, BaseException)]
        if not failed:
            return
        k, first = failed[0]
        if len(failed) == len(results) or not isinstance(first, SeqServeError):
            raise first
        loaded = [str(j + 1) for j, r in enumerate(results) if not isinstance(r, BaseException)]
        which = f"engine {loaded[0]}" if len(loaded) == 1 else f"engines {', '.join(loaded)}"
        raise type(first)(
            f"in engine {k + 1} of {len(results)} ({which} loaded it): {first.message}", first.retry_after
        ) from None

    async def unload_model(self, name: str) -> None:
        await self._every(lambda p: p.unload_model(name))

    async def log_settings(self, changes: dict[str, Any] | None = None) -> LogSettings:
        if not changes:
            return await self.home.log_settings(changes)
        return (await self._every(lambda p: p.log_settings(changes)))[0]

    async def trace_settings(
        self, model: str | None = None, changes: dict[str, list[str] | None] | None = None
    ) -> dict[str, list[str]]:
        if not changes:
            return await self.home.trace_settings(model, changes)
        return (await self._every(lambda p: p.trace_settings(model, changes)))[0]

    async def register_region(self, region: SharedRegion) -> None:
        await self._every(lambda p: p.register_region(region))

    async def unregister_region(self, name: str | None) -> None:
        await self._every(lambda p: p.unregister_region(name))

    # --- inference ------------------------------------------------------------------------------------
    async def infer(
        self,
        model: ModelRef,
        inputs: Sequence[InputTensor],
        outputs: list[str] | None = None,
        sequence: SequenceRef | None = None,
        classes: dict[str, int] | None = None,
        timeout: float | None = None,
    ) -> InferResult:
        plane = self.home if sequence is None else self._of(str(sequence.id))
        return await plane.infer(model, inputs, outputs, sequence, classes, timeout)

    async def classify(self, model: ModelRef, texts: list[str]) -> list[SentimentResult]:
        return await self.home.classify(model, texts)

    def complete(
        self, model: ModelRef, prompt: str, params: SamplingParams, session_id: str | None = None
    ) -> AsyncGenerator[CompletionChunk, None]:
        plane = self.home if session_id is None else self._of(session_id)
        return plane.complete(model, prompt, params, session_id)

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
        return await self._of(session_id).suggest(
            session_id, appended, reset=reset, n=n, max_chars=max_chars, beam=beam, backspace=backspace
        )

    async def char_step(
        self, model: ModelRef, text: str, *, session_id: str | None = None, num_chars: int = 0
    ) -> CharStep:
        plane = self.home if session_id is None else self._of(session_id)
        return await plane.char_step(model, text, session_id=session_id, num_chars=num_chars)

    async def forecast(
        self, model: ModelRef, history: FloatArray, *, columns: Sequence[str] | None = None
    ) -> ForecastResult:
        return await self.home.forecast(model, history, columns=columns)

    async def observe(
        self, session_id: str, rows: FloatArray, *, columns: Sequence[str] | None = None
    ) -> ForecastResult:
        return await self._of(session_id).observe(session_id, rows, columns=columns)

    # --- sessions -------------------------------------------------------------------------------------
    async def create_session(self, model: ModelRef, ttl_seconds: float | None = None) -> SessionInfo:
        return await next(self._turn).create_session(model, ttl_seconds)

    async def get_session(self, session_id: str) -> SessionInfo:
        return await self._of(session_id).get_session(session_id)

    async def fork_session(self, session_id: str, ttl_seconds: float | None = None) -> SessionInfo:
        return await self._of(session_id).fork_session(session_id, ttl_seconds)  # its engine draws the twin's id

    async def delete_session(self, session_id: str) -> None:
        await self._of(session_id).delete_session(session_id)

    async def export_session(self, session_id: str) -> tuple[bytes, SessionInfo]:
        return await self._of(session_id).export_session(session_id)

    async def import_session(self, blob: bytes, ttl_seconds: float | None = None) -> SessionInfo:
        return await next(self._turn).import_session(blob, ttl_seconds)
