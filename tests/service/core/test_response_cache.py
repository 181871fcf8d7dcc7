"""The response cache (``RESPONSE_CACHE_BYTES``, Triton's ``response_cache``): stateless KServe requests to
deterministic models are answered again from it, without a model run; per principal, per loaded version, bounded,
counted in ``cache_hit`` / ``cache_miss`` and off by default."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from service.core.context import set_principal
from service.core.dataplane import CoreDataPlane
from service.core.responses import (
    DIGEST_BYTES,
    ENTRY_OVERHEAD,
    ITEM_OVERHEAD,
    ResponseCache,
    kept_result,
    kept_sentiment,
)
from service.core.types import InferResult, ModelRef, SentimentResult, SequenceRef, Tensor
from service.errors import InvalidInput
from tests.graphs import scale_logits
from tests.service.core.conftest import MakeDP, recorded, texts

SENT = ModelRef("sentiment")
MIB = 1024 * 1024


def history(rows: int = 30, shift: float = 0.0) -> list[Tensor]:
    a = (np.arange(rows * 7, dtype=np.float32).reshape(rows, 7) % 11 + shift).astype(np.float32)
    return [Tensor("HISTORY", "FP32", a.shape, array=a)]


async def stats(dp: CoreDataPlane, model: str) -> tuple[int, int, int, int, int, int]:
    """(cache hits, cache misses, successes, queue count, compute count, model runs) of version 1: Triton counts
    every successful request in queue, only those that ran the model in compute."""
    (s,) = await dp.statistics(ModelRef(model, 1))
    return (
        s.cache_hit.count,
        s.cache_miss.count,
        s.success.count,
        s.queue.count,
        s.compute_infer.count,
        s.execution_count,
    )


async def test_off_by_default_every_request_runs_the_model(make_dp: MakeDP) -> None:
    dp = await make_dp()
    for _ in range(2):
        await dp.infer(SENT, texts("good film"))
    assert await stats(dp, "sentiment") == (0, 0, 2, 2, 2, 2)
    assert not (await dp.model_metadata(SENT)).response_cache


async def test_a_request_seen_before_is_answered_without_a_model_run(make_dp: MakeDP) -> None:
    dp = await make_dp(response_cache_bytes=MIB)
    assert (await dp.model_metadata(SENT)).response_cache
    first = await dp.infer(SENT, texts("good film", "bad"))
    again = await dp.infer(SENT, texts("good film", "bad"))
    assert again.outputs[0].items == first.outputs[0].items
    np.testing.assert_array_equal(again.outputs[1].array, first.outputs[1].array)
    assert again.inferences == first.inferences == 2
    assert recorded(dp).batch_sizes("sentiment") == [2]  # one run, for the first
    assert await stats(dp, "sentiment") == (1, 1, 2, 2, 1, 1)
    (s,) = await dp.statistics(ModelRef("sentiment", 1))
    assert s.inference_count == 2  # as Triton's: the model's inferences, not the answers from the cache
    assert s.cache_hit.ns > 0 and s.cache_miss.ns > 0
    # Anything else in the request is another answer: the texts, their order, the outputs asked for, class_count.
    await dp.infer(SENT, texts("bad", "good film"))
    await dp.infer(SENT, texts("good film", "bad"), outputs=["LABEL"])
    await dp.infer(SENT, texts("good film", "bad"), outputs=["PROBABILITIES"], classes={"PROBABILITIES": 1})
    assert await stats(dp, "sentiment") == (1, 4, 5, 5, 4, 4)
    ranked = await dp.infer(SENT, texts("good film", "bad"), outputs=["PROBABILITIES"], classes={"PROBABILITIES": 1})
    assert ranked.outputs[0].datatype == "BYTES" and ranked.outputs[0].shape == (2, 1)
    assert await stats(dp, "sentiment") == (2, 4, 6, 6, 4, 4)


async def test_stateless_forecasts_are_kept_sequences_and_the_char_lm_never(make_dp: MakeDP) -> None:
    dp = await make_dp(response_cache_bytes=MIB)
    fc = ModelRef("forecaster")
    first = await dp.infer(fc, history())
    np.testing.assert_array_equal((await dp.infer(fc, history())).outputs[0].array, first.outputs[0].array)
    assert (await stats(dp, "forecaster"))[:2] == (1, 1)
    await dp.infer(fc, history(shift=0.5))  # other values: another answer
    assert (await stats(dp, "forecaster"))[:2] == (1, 2)
    for i in range(2):  # a sequence's steps carry state: never from the cache
        await dp.infer(fc, history(), sequence=SequenceRef(id="s", start=i == 0))
    assert (await stats(dp, "forecaster"))[:2] == (1, 2)
    lm = ModelRef("charlm")
    assert not (await dp.model_metadata(lm)).response_cache  # it samples: not deterministic
    for _ in range(2):
        await dp.infer(lm, texts("abc"))
    assert (await stats(dp, "charlm"))[:2] == (0, 0)


async def test_our_apis_classify_and_predict_are_kept_too_apart_from_kserves(make_dp: MakeDP) -> None:
    dp = await make_dp(response_cache_bytes=MIB)
    first = await dp.classify(SENT, ["good film", "bad"])
    assert await dp.classify(SENT, ["good film", "bad"]) == first
    await dp.infer(SENT, texts("good film", "bad"))  # the same texts through KServe: another answer (a miss)
    assert (await stats(dp, "sentiment"))[:2] == (1, 2)
    (s,) = await dp.statistics(ModelRef("sentiment", 1))
    assert s.inference_count == 4  # the two misses' texts; the hit ran nothing
    rows = history()[0].array
    assert rows is not None
    forecast = await dp.forecast(ModelRef("forecaster"), rows)
    again = await dp.forecast(ModelRef("forecaster"), rows)
    np.testing.assert_array_equal(again.point, forecast.point)
    assert not again.point.flags.writeable and again.columns == forecast.columns
    named = await dp.forecast(ModelRef("forecaster"), rows, columns=again.columns)  # COLUMNS named: other inputs
    np.testing.assert_allclose(named.point, forecast.point, rtol=1e-6)
    assert (await stats(dp, "forecaster"))[:2] == (1, 2)
    assert recorded(dp).batch_sizes("sentiment") == [2, 2]


async def test_classify_keeps_each_text_so_a_request_runs_only_the_texts_not_seen_before(make_dp: MakeDP) -> None:
    """A text's sentiment does not depend on the texts sent with it, so ``Classify`` keeps one answer per text: a
    request answers what it can from the cache and runs the rest in one run (a text twice in it runs once)."""
    dp, plain = await make_dp(response_cache_bytes=MIB), await make_dp()

    def lookups(result: str) -> float:
        value = dp.metrics.registry.get_sample_value(
            "seqserve_response_cache_lookups_total", {"model": "sentiment", "result": result}
        )
        return value or 0.0

    first = await dp.classify(SENT, ["good film", "bad"])
    mixed = ["bad", "a new one", "good film", "a new one"]
    again = await dp.classify(SENT, mixed)
    assert again[0] == first[1] and again[2] == first[0] and again[1] == again[3]
    fresh = await plain.classify(SENT, mixed)  # the same texts without the cache, in one run
    for got, want in zip(again, fresh, strict=True):
        assert got.label == want.label and np.allclose(got.probabilities, want.probabilities, atol=1e-5)
    assert recorded(dp).batch_sizes("sentiment") == [2, 1]  # only "a new one" ran, once
    (s,) = await dp.statistics(ModelRef("sentiment", 1))
    assert s.inference_count == 3  # the texts that ran: 2, then 1
    assert await stats(dp, "sentiment") == (0, 2, 2, 2, 2, 2)  # per request: both ran something
    assert (lookups("hit"), lookups("miss")) == (2, 4)  # per text: bad and good film kept; a new one twice missed
    assert await dp.classify(SENT, ["a new one", "good film"]) == [again[1], first[0]]
    assert await stats(dp, "sentiment") == (1, 2, 3, 3, 2, 2)  # all kept: a hit, no run
    assert recorded(dp).batch_sizes("sentiment") == [2, 1]


async def test_a_classify_request_of_no_texts_or_too_many_is_refused_as_without_the_cache(make_dp: MakeDP) -> None:
    """With the cache on, an empty request answered OK (a "hit" of nothing), and one over max_texts_per_request
    whose texts were all kept answered OK too."""
    dp = await make_dp(response_cache_bytes=MIB, max_texts_per_request=4)
    model = ModelRef("sentiment")
    await dp.classify(model, ["fine", "bad"])
    with pytest.raises(InvalidInput, match="texts is empty; send between 1 and 4 texts"):
        await dp.classify(model, [])
    with pytest.raises(InvalidInput, match="texts has 5 texts; the limit is 4"):
        await dp.classify(model, ["fine", "bad", "fine", "bad", "fine"])
    (stats,) = await dp.statistics(ModelRef("sentiment", 1))
    assert stats.cache_hit.count == 0


async def test_a_classify_request_over_the_word_limit_is_refused_though_its_texts_are_kept(make_dp: MakeDP) -> None:
    """Three five-word texts, each kept by an earlier request, answered OK together: 15 words, over a
    max_words_per_request of 8 that refuses the same request without the cache."""
    dp = await make_dp(response_cache_bytes=MIB, max_words_per_request=8)
    model = ModelRef("sentiment")
    kept = ["a good film , really", "a bad film , really", "not a good film ."]
    for text in kept:
        await dp.classify(model, [text])
    with pytest.raises(InvalidInput, match="texts has more than 8 words in all"):
        await dp.classify(model, kept)
    (stats,) = await dp.statistics(ModelRef("sentiment", 1))
    assert stats.cache_hit.count == 0  # refused before the cache was asked


async def test_one_principals_answers_never_reach_another(make_dp: MakeDP) -> None:
    dp = await make_dp(response_cache_bytes=MIB)
    set_principal("alice")
    await dp.infer(SENT, texts("good film"))
    await dp.infer(SENT, texts("good film"))
    set_principal("bob")
    await dp.infer(SENT, texts("good film"))  # a miss: bob cannot time alice's requests
    set_principal("")
    assert (await stats(dp, "sentiment"))[:2] == (1, 2)


async def test_new_weights_answer_anew_and_an_unload_frees_the_answers(repo: Path, make_dp: MakeDP) -> None:
    dp = await make_dp(models=repo, response_cache_bytes=MIB)
    before = await dp.infer(SENT, texts("good film"))
    cache = dp.responses
    assert len(cache) == 1 and cache.bytes > ENTRY_OVERHEAD
    scale_logits(repo / "sentiment" / "1", 2.0)  # logits doubled: other probabilities
    await dp.registry.sync()
    after = await dp.infer(SENT, texts("good film"))
    assert not np.array_equal(np.asarray(after.outputs[1].array), np.asarray(before.outputs[1].array))
    assert (await stats(dp, "sentiment"))[:2] == (0, 1)  # the reloaded version's own statistics: a miss
    assert len(cache) == 1  # the old weights' answer went with them
    await dp.unload_model("sentiment")
    assert len(cache) == 0 and cache.bytes == 0


def keep(cache: ResponseCache, key: tuple[int, str, bytes], answer: InferResult) -> int:
    """What ``ResponseCache.answer`` does with a miss's answer: its read-only copy, charged its data and the
    per-entry overhead."""
    kept, nbytes = kept_result(answer)
    return cache.put(key, kept, nbytes + ENTRY_OVERHEAD)


def _answer(values: int) -> InferResult:
    return InferResult("m", 1, [Tensor("P", "FP32", (values,), array=np.zeros(values, np.float32))], 1)


def test_the_cache_stays_within_its_bytes_least_recently_used_first() -> None:
    entry = 100 * 4 + ENTRY_OVERHEAD
    cache = ResponseCache(3 * entry)
    keys = [(1, "", bytes([i]) * 16) for i in range(4)]
    for k in keys[:3]:
        assert keep(cache, k, _answer(100)) == 0
    assert cache.bytes == 3 * entry
    assert cache.get(keys[0]) is not None  # now the most recently used
    assert keep(cache, keys[3], _answer(100)) == 1
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.bytes == 3 * entry
    assert keep(cache, (1, "", b"x" * 16), _answer(10_000)) == 0 and len(cache) == 3  # larger than the cache: not kept
    kept = cache.get(keys[0])
    assert kept is not None and kept.outputs[0].array is not None
    assert not kept.outputs[0].array.flags.writeable  # nobody can change an answer others get
    assert cache.drop(1) == 3 and cache.bytes == 0


def test_keys_follow_the_request_not_its_layout() -> None:
    a = {
        "X": Tensor("X", "FP32", (2,), array=np.array([1, 2], np.float32)),
        "Y": Tensor("Y", "BYTES", (1,), items=[b"ab"]),
    }
    b = {
        "Y": Tensor("Y", "BYTES", (1,), items=[b"ab"]),
        "X": Tensor("X", "FP32", (2,), array=np.array([1, 2], np.float32)[::1]),
    }
    key = ResponseCache.key
    assert key(1, "", a, ["P"], {}) == key(1, "", b, ["P"], {})
    split = {"Y": Tensor("Y", "BYTES", (2,), items=[b"a", b"b"]), "X": a["X"]}
    assert key(1, "", a, ["P"], {}) != key(1, "", split, ["P"], {})  # b"ab" is not b"a" + b"b"
    assert key(1, "", a, ["P"], {}) != key(2, "", a, ["P"], {}) != key(1, "p", a, ["P"], {})


def test_the_budget_covers_what_the_answers_really_take() -> None:
    """``ENTRY_OVERHEAD`` is counted per answer on top of its data: the memory the cache really holds (keys
    included, tracemalloc) stays within the bytes it says it holds."""
    cache = ResponseCache(1 << 30)
    answers = [
        InferResult(
            "sentiment",
            1,
            [
                Tensor("LABEL", "BYTES", (1,), items=[b"positive"]),
                Tensor("PROBABILITIES", "FP32", (1, 2), array=np.array([[0.9, 0.1]], np.float32)),
            ],
            1,
        )
        for _ in range(5000)
    ]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i, answer in enumerate(answers):
            keep(cache, (1, "a principal", i.to_bytes(DIGEST_BYTES, "little")), answer)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    held = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert held <= cache.bytes, (held / len(answers), cache.bytes / len(answers))
    # Classify's answers: Python objects, a few hundred bytes a text, kept one text an entry.
    texts = ResponseCache(1 << 30)
    classified = [SentimentResult("positive", ["positive", "negative"], [0.9, 0.1]) for _ in range(5000)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i, r in enumerate(classified):
            kept, nbytes = kept_sentiment(r)
            texts.put((1, "a principal", i.to_bytes(DIGEST_BYTES, "little")), kept, nbytes + ITEM_OVERHEAD)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    held = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert held <= texts.bytes <= 2 * held, (held / len(classified), texts.bytes / len(classified))
