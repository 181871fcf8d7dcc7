"""Response cache (Triton's ``response_cache``): whole answers of stateless requests to deterministic tasks
(sentiment; forecasts without a session or sequence), through KServe (gRPC and REST) and our own API (``Classify``,
``Predict``), so that a request seen before is answered without queueing or running the model. ``Classify`` keeps
one answer per text (``answer_each``): its texts are classified independently, so a request runs only the texts not
seen before.

A key is a 16-byte BLAKE2b digest of the request as the model's contract decoded it (every input's name,
datatype, shape and data, the outputs asked for and their ``class_count``; our API's calls as the same inputs
under a name of their own), under a scope of the loaded version (a reload never reads the last weights' answers)
and the caller's principal (one tenant's requests never answer, or time, another's). Requests that fail are
never kept. Entries are evicted least recently used first, within ``max_bytes`` (``RESPONSE_CACHE_BYTES``; 0 =
off, as in Triton, where each model opts in).

A kept answer is one the model gave to that request; a fresh run could differ in the last bits of a float when
its batch is shaped otherwise (batching already varies that much), never more. Kept answers are read-only copies
(arrays not writeable), shared by every caller that gets them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from service.core.arrays import read_only_copy
from service.core.lru import ByteLRU
from service.core.types import ForecastResult, InferResult, SentimentResult, Tensor

if TYPE_CHECKING:
    from service.core.registry import ModelEntry

T = TypeVar("T")
Key = tuple[int, str, bytes]
# Our API's calls in a key's place of the outputs asked for: no v2 output is named so, so they never meet a KServe
# request's answers (another type of answer for the same inputs).
CLASSIFY = "seqserve.v1.Sentiment/Classify"
PREDICT = "seqserve.v1.Forecast/Predict"

DIGEST_BYTES = 16
SENTIMENT_BYTES = 200  # one kept SentimentResult and its lists, beyond 32 bytes a probability (tracemalloc)
ENTRY_OVERHEAD = 1024  # the key, the OrderedDict slot, the result and its tensor objects beyond their data (~880 B
# for a sentiment answer, tracemalloc: tests/service/core/test_response_cache.py checks the budget holds)
ITEM_OVERHEAD = 320  # one item's entry beyond its answer (``answer_each``): its key and slot (~245 B, tracemalloc)


def _tensor(t: Tensor) -> tuple[Tensor, int]:
    if t.array is None:
        items = list(t.items or ())
        return dataclasses.replace(t, items=items), sum(len(b) for b in items)
    array = read_only_copy(t.array)
    return dataclasses.replace(t, array=array), array.nbytes


def kept_result(r: InferResult) -> tuple[InferResult, int]:
    """A KServe answer as kept, and its data's bytes."""
    tensors = [_tensor(t) for t in r.outputs]
    return dataclasses.replace(r, outputs=[t for t, _ in tensors], session_blob=None), sum(n for _, n in tensors)


def kept_sentiment(r: SentimentResult) -> tuple[SentimentResult, int]:
    """One text's ``Classify`` answer as kept (its lists copied), and the bytes of its Python objects: ~250 for two
    labels (the result, its two lists and their floats; the label strings are the task's own, shared)."""
    return SentimentResult(r.label, list(r.labels), list(r.probabilities)), SENTIMENT_BYTES + 32 * len(r.probabilities)


def kept_forecast(r: ForecastResult) -> tuple[ForecastResult, int]:
    """``Predict``'s answer as kept, and its arrays' bytes."""
    point, quantiles = read_only_copy(r.point), read_only_copy(r.quantiles)
    kept = dataclasses.replace(
        r, columns=list(r.columns), point=point, quantile_levels=list(r.quantile_levels), quantiles=quantiles
    )
    return kept, point.nbytes + quantiles.nbytes


class ResponseCache(ByteLRU[Any]):
    """Answers by request digest, least recently used evicted first (``ByteLRU``)."""

    def serves(self, entry: ModelEntry) -> bool:
        """Whether this version's stateless requests go through the cache (ModelConfig's ``response_cache``)."""
        return self.enabled and entry.task.deterministic

    @staticmethod
    def key(
        scope: int, principal: str, inputs: Mapping[str, Tensor], outputs: Sequence[str], classes: Mapping[str, int]
    ) -> Key:
        """The key of a decoded request (inputs in any order: the same request is the same key)."""
        h = hashlib.blake2b(digest_size=DIGEST_BYTES)
        for name in sorted(inputs):
            t = inputs[name]
            h.update(f"{name}\0{t.datatype}\0{t.shape}\0".encode())
            if t.array is not None:
                h.update(t.array.tobytes())  # (C order, contiguous or not)
            else:
                for item in t.items or ():
                    h.update(len(item).to_bytes(8, "little"))
                    h.update(item)
            h.update(b"\1")
        h.update(repr((list(outputs), sorted(classes.items()))).encode())
        return scope, principal, h.digest()

    async def answer(
        self, entry: ModelEntry, key: Key, compute: Callable[[], Awaitable[T]], keep: Callable[[T], tuple[T, int]]
    ) -> tuple[T, bool]:
        """The answer kept under ``key`` (a hit: no queue, no model run), else ``compute()``'s, kept for the next
        (``keep`` makes the read-only copy and says its data's bytes); and whether it was a hit. ``answer_each`` of
        one item, charged ``ENTRY_OVERHEAD``."""

        async def one(_: list[int]) -> list[T]:
            return [await compute()]

        (answer,), ran = await self.answer_each(entry, [key], one, keep, ENTRY_OVERHEAD)
        return answer, not ran

    async def answer_each(
        self,
        entry: ModelEntry,
        keys: Sequence[Key],
        compute: Callable[[list[int]], Awaitable[list[T]]],
        keep: Callable[[T], tuple[T, int]],
        overhead: int = ITEM_OVERHEAD,
    ) -> tuple[list[T], int]:
        """Per item of a request whose items are answered independently (``Classify``'s texts): the kept answers of
        the keys seen before (hits: no queue, no model run), ``compute(indices)``'s for the others (one run for all
        of them, each distinct key once), each kept for the next (``keep`` makes the read-only copy and says its
        data's bytes; the entry is charged those plus ``overhead``). Returns the answers in order and how many
        distinct items ran (the inferences: a text twice in one request runs once). Prometheus counts a lookup per
        item; the version's statistics one per request, as Triton does: a hit when every item was kept, else a
        miss (the looking and keeping timed, not the computing)."""
        t0 = time.perf_counter_ns()
        found: list[T | None] = [self.get(k) for k in keys]
        for f in found:
            entry.metrics.response_cache_lookup(entry.name, f is not None)
        todo: dict[Key, list[int]] = {}  # key -> the items that need it, in order
        for i, (k, f) in enumerate(zip(keys, found, strict=True)):
            if f is None:
                todo.setdefault(k, []).append(i)
        if not todo:
            entry.stats.cache(True, time.perf_counter_ns() - t0)
            return cast(list[T], found), 0
        t1 = time.perf_counter_ns()
        fresh = await compute([items[0] for items in todo.values()])
        t2 = time.perf_counter_ns()
        evicted = 0
        for (k, items), answer in zip(todo.items(), fresh, strict=True):
            kept, nbytes = keep(answer)
            evicted += self.put(k, kept, nbytes + overhead)
            for i in items:
                found[i] = answer
        entry.metrics.response_cache_usage(self.bytes, len(self), evicted)
        entry.stats.cache(False, (t1 - t0) + (time.perf_counter_ns() - t2))
        return cast(list[T], found), len(todo)

    def forget(self, entry: ModelEntry, replaced: bool = False) -> None:
        """Drops the answers of a version that unloads (the registry's unload hook)."""
        self.drop(entry.prefix_scope)
        entry.metrics.response_cache_usage(self.bytes, len(self), 0)
