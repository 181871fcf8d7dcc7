"""Dynamic batching: concurrent requests merge into one ORT run (checked through the recorded batch sizes),
merged results equal solo results, a failing batch runs each request alone (only a request that fails by
itself fails), and a full queue refuses."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.core.batching import Batcher, StepInput, StepOutput
from service.core.context import set_priority
from service.core.dataplane import CoreDataPlane
from service.core.manifest import MANIFEST_FILE
from service.core.types import Duration, ModelRef, SamplingParams
from service.errors import RETRY_SOON, ModelUnavailable, Overloaded
from tests.hooks import hook_runs
from tests.service.core.conftest import MakeDP, recorded

LM = ModelRef("charlm")
SENT = ModelRef("sentiment")


async def test_concurrent_classify_requests_share_one_run(make_dp: MakeDP) -> None:
    # A long delay and a batch size of 5: the batch flushes when full, so the 5 requests must share it.
    dp = await make_dp(max_batch_size=5, max_batch_delay_ms=60_000)
    texts = ["good film", "a very boring movie", "bad", "i love this great fun film !", "not good"]
    merged = await asyncio.gather(*(dp.classify(ModelRef("sentiment"), [t]) for t in texts))
    assert recorded(dp).batch_sizes("sentiment") == [5]
    # Padding to the batch's longest text does not change any text's result.
    solo = await make_dp()
    for text, result in zip(texts, merged, strict=True):
        alone = (await solo.classify(ModelRef("sentiment"), [text]))[0]
        np.testing.assert_allclose(result[0].probabilities, alone.probabilities, atol=1e-5)
        assert result[0].label == alone.label


async def test_concurrent_streams_share_generation_steps(dp: CoreDataPlane) -> None:
    prompts = ["abc", "xyz", "Hel", "q q"]  # equal lengths: prompt runs merge too
    params = SamplingParams(max_chars=6, temperature=0.0)

    async def run(prompt: str) -> str:
        return "".join([c.text async for c in dp.complete(LM, prompt, params)])

    together = await asyncio.gather(*(run(p) for p in prompts))
    sizes = recorded(dp).batch_sizes("charlm")
    assert max(sizes) == 4  # every step of the 4 streams ran as one batch of 4
    assert sum(sizes) == 4 * 6  # prompt (1 run) + 5 steps (the last character needs no step without a session)
    recorded(dp).batches.clear()
    alone = [await run(p) for p in prompts]
    assert together == alone
    assert recorded(dp).batch_sizes("charlm") == [1] * 20  # 5 steps each: the prompts' states are in the prefix cache


async def test_merged_session_states_split_back_correctly(dp: CoreDataPlane) -> None:
    texts = ["first text", "other text", "third one!"]  # same length: they merge
    ids = [(await dp.create_session(LM)).id for _ in texts]
    together = await asyncio.gather(*(dp.char_step(LM, t, session_id=s) for t, s in zip(texts, ids, strict=True)))
    assert max(recorded(dp).batch_sizes("charlm")) == 3
    for text, step in zip(texts, together, strict=True):
        alone = await dp.char_step(LM, text)
        np.testing.assert_allclose(step.probabilities, alone.probabilities, atol=1e-6)


async def test_a_failing_batch_runs_each_request_alone_and_fails_only_the_culprit(
    make_dp: MakeDP, caplog: pytest.LogCaptureFixture
) -> None:
    dp = await make_dp(max_batch_size=3, max_batch_delay_ms=60_000)
    batcher = dp.registry.resolve(LM).batcher
    good = StepInput(inputs={"input_ids": np.array([[1, 2]], dtype=np.int64)}, rows=1, key=2)
    bad = StepInput(inputs={"input_ids": np.array([[1.5, 2.5]], dtype=np.float32)}, rows=1, key=2)  # wrong dtype
    with caplog.at_level("WARNING", logger="service.core.batching"):
        results = await asyncio.gather(
            batcher.submit(good), batcher.submit(bad), batcher.submit(good), return_exceptions=True
        )
    assert "batch of 3 requests failed on model charlm version 1" in caplog.text  # the three did meet, and failed
    first, failed, last = results
    assert isinstance(failed, Exception) and "type" in str(failed).lower()
    assert isinstance(first, StepOutput) and isinstance(last, StepOutput)
    assert recorded(dp).batch_sizes("charlm") == [1, 1]  # the two good ones, each alone
    solo = await make_dp()
    alone = await solo.registry.resolve(LM).batcher.submit(good)
    np.testing.assert_array_equal(first.outputs["logits"], alone.outputs["logits"])
    np.testing.assert_array_equal(last.outputs["logits"], alone.outputs["logits"])
    # The batcher goes on batching.
    outs = await asyncio.gather(*(batcher.submit(good) for _ in range(3)))
    assert [o.outputs["logits"].shape for o in outs] == [(1, 2, 96)] * 3
    assert recorded(dp).batch_sizes("charlm")[-1] == 3


async def test_a_word_the_graph_lacks_fails_its_own_request_not_its_batchs(repo: Path, make_dp: MakeDP) -> None:
    """A manifest whose vocabulary is one word longer than the graph's embedding table (a mismatched export): the
    loader cannot see it (no tensor's size names the vocabulary; the warm-up's words are the first ones), and a text
    with that word fails in ONNX Runtime. The three requests batched with it get their answers."""
    path = repo / "sentiment" / "1" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["tokenizer"]["vocab"].append("zzzunseen")
    path.write_text(json.dumps(manifest))
    dp = await make_dp(models=repo, max_batch_size=4, max_batch_delay_ms=60_000)
    texts = ["good film", "zzzunseen film", "bad", "not good"]
    results = await asyncio.gather(*(dp.classify(SENT, [t]) for t in texts), return_exceptions=True)
    assert isinstance(results[1], Exception) and "indices" in str(results[1]), results[1]
    assert recorded(dp).batch_sizes("sentiment") == [1, 1, 1]  # the batch of 4 failed; the others ran alone
    solo = await make_dp(models=repo)
    for text, result in zip(texts, results, strict=True):
        if text != "zzzunseen film":
            assert not isinstance(result, BaseException), (text, result)
            (alone,) = await solo.classify(SENT, [text])
            np.testing.assert_allclose(result[0].probabilities, alone.probabilities, atol=1e-5)


async def test_full_queue_is_refused(make_dp: MakeDP) -> None:
    dp = await make_dp(max_queue_size=2, max_batch_size=2, max_batch_delay_ms=60_000)
    results = await asyncio.gather(
        *(dp.classify(ModelRef("sentiment"), ["good"]) for _ in range(3)), return_exceptions=True
    )
    assert not isinstance(results[0], Exception) and not isinstance(results[1], Exception)
    assert isinstance(results[2], Overloaded)
    assert "max_queue_size=2" in str(results[2])
    assert results[2].retry_after == RETRY_SOON  # refused before it ran: the status says when to send it again


async def test_requests_of_different_lengths_do_not_merge(make_dp: MakeDP) -> None:
    dp = await make_dp(max_batch_size=4, max_batch_delay_ms=1.0)
    texts = ["ab", "abc", "ab", "abc"]
    steps = await asyncio.gather(*(dp.char_step(LM, t) for t in texts))
    assert sorted(recorded(dp).batch_sizes("charlm")) == [2, 2]
    np.testing.assert_allclose(steps[0].probabilities, steps[2].probabilities, atol=1e-6)


async def test_unloading_fails_queued_waiters_after_the_grace_and_refuses_new_requests(make_dp: MakeDP) -> None:
    dp = await make_dp(max_batch_size=4, max_batch_delay_ms=60_000, grace_seconds=0.05)
    sentiment = ModelRef("sentiment")
    await asyncio.gather(*(dp.classify(sentiment, ["good"]) for _ in range(4)))  # a full batch of 4
    batcher = dp.registry.resolve(sentiment).batcher
    pending = asyncio.ensure_future(dp.classify(sentiment, ["good"]))  # now waits for 3 more
    while batcher.pending == 0:
        await asyncio.sleep(0)  # runs the request up to its queue wait
    assert recorded(dp).batch_sizes("sentiment") == [4]
    await dp.unload_model("sentiment")  # drains for grace_seconds, then stops the batcher
    with pytest.raises(ModelUnavailable, match="sentiment version 1 was unloaded"):
        await pending
    with pytest.raises(ModelUnavailable, match="sentiment' was unloaded; load it again"):
        await dp.classify(sentiment, ["good"])


async def test_a_lone_request_does_not_wait_for_company(make_dp: MakeDP) -> None:
    dp = await make_dp(max_batch_size=8, max_batch_delay_ms=60_000)
    # With nothing else in flight each step runs at once (this would take minutes if it waited the delay).
    out = "".join([c.text async for c in dp.complete(LM, "abc", SamplingParams(max_chars=5, temperature=0.0))])
    assert len(out) == 5 and recorded(dp).batch_sizes("charlm") == [1] * 5


async def _queue(dp: CoreDataPlane) -> tuple[int, int]:
    (stats,) = await dp.statistics(ModelRef("charlm", 1))
    return stats.queue.count, stats.queue.ns


async def test_a_lone_step_skips_the_queue_and_company_still_batches(make_dp: MakeDP) -> None:
    dp = await make_dp(max_batch_size=8, max_batch_delay_ms=50)
    await asyncio.sleep(0.01)  # the data plane's background tasks have started and wait
    # Nothing else ready to run and no recent company: the step runs at once on the caller (no queue wait at all).
    await dp.char_step(LM, "abc")
    count, alone = await _queue(dp)  # (one loop turn at most: when a background timer happened to be ready then)
    assert count == 1 and alone < 0.01e9 and recorded(dp).batch_sizes("charlm") == [1]
    # Requests that arrive together still meet in one run, through the queue.
    await asyncio.gather(*(dp.char_step(LM, t) for t in ("xyz", "Hel", "q q")))
    assert recorded(dp).batch_sizes("charlm") == [1, 3]
    count, waited = await _queue(dp)
    assert count == 4 and waited > 0
    # After a batch with company, a lone step is queued and waits for company up to max_batch_delay_ms. (Another
    # text than the first: "abc" again would come whole from the prefix cache, with no model run at all.)
    await dp.char_step(LM, "abd")
    assert recorded(dp).batch_sizes("charlm") == [1, 3, 1] and (await _queue(dp))[1] - waited >= 0.045e9


async def test_a_lone_clients_request_of_several_texts_is_no_company(make_dp: MakeDP) -> None:
    """The README's MAX_BATCH_DELAY_MS: a lone request (no recent company) skips the queue. One client's request of
    two texts counted as company for the next eight batches: each of its later one-text requests waited the
    whole batch delay (here it would be a minute)."""
    dp = await make_dp(max_batch_size=8, max_batch_delay_ms=60_000)
    await asyncio.sleep(0.01)  # the data plane's background tasks have started and wait
    for words in (["good film", "bad"], ["fine"], ["a dull film"], ["good", "bad", "fine"], ["dull"]):
        await asyncio.wait_for(dp.classify(SENT, words), 30)
    (stats,) = await dp.statistics(ModelRef("sentiment", 1))
    # None waited for company (a minute each): each ran at once on its caller, or, when a background timer of the
    # data plane happened to be ready in that loop turn, queued for that one turn (CI once saw 43 µs in all).
    assert stats.queue.count == 5 and stats.queue.ns < 1e9, stats.queue
    assert recorded(dp).batch_sizes("sentiment") == [2, 1, 1, 3, 1]


async def test_a_failing_lone_step_fails_only_its_caller(make_dp: MakeDP) -> None:
    dp = await make_dp()
    await asyncio.sleep(0.01)  # the data plane's background tasks have started and wait
    batcher = dp.registry.resolve(LM).batcher
    bad = StepInput(inputs={"input_ids": np.array([[1.5, 2.5]], dtype=np.float32)}, rows=1, key=2)  # wrong dtype
    with pytest.raises(Exception, match=r"(?i)type"):
        await batcher.submit(bad)
    assert batcher.pending == 0 and recorded(dp).batch_sizes("charlm") == []
    good = StepInput(inputs={"input_ids": np.array([[1, 2]], dtype=np.int64)}, rows=1, key=2)
    assert (await batcher.submit(good)).outputs["logits"].shape == (1, 2, 96)
    assert recorded(dp).batch_sizes("charlm") == [1]


async def test_a_lone_generation_never_holds_the_loop(make_dp: MakeDP) -> None:
    dp = await make_dp()
    await asyncio.sleep(0.01)
    ticks, turns, done = 0, 0, False

    async def ticker() -> None:  # a timer, not a ready callback: it never stops a step from running alone
        nonlocal ticks
        while not done:
            await asyncio.sleep(0.0001)
            ticks += 1

    async def turner() -> None:  # uvloop: a ready callback wakes once a turn (there steps never run alone anyway)
        nonlocal turns
        while not done:
            await asyncio.sleep(0)
            turns += 1

    loop = asyncio.get_running_loop()
    run_once = getattr(loop, "_run_once", None)  # asyncio's: counted without a callback of its own

    def counted() -> None:
        nonlocal turns
        turns += 1
        assert run_once is not None
        run_once()

    tasks = [asyncio.create_task(ticker())]
    await asyncio.sleep(0.001)
    if run_once is not None:
        loop._run_once = counted  # type: ignore[attr-defined]
    else:
        tasks.append(asyncio.create_task(turner()))
    try:
        out = [c.text async for c in dp.complete(LM, "abc", SamplingParams(max_chars=200, temperature=0.0))]
    finally:
        done = True
        if run_once is not None:
            del loop._run_once  # type: ignore[attr-defined]
    await asyncio.gather(*tasks)
    assert len(out) == 200
    # Steps that skip the queue run on the generation's own coroutine; the loop still turns at least every other
    # step, so timers (and every other request) keep being served while one stream generates. A loop that turned
    # only every third step would turn at most 67 times. (Counted as turns, not as the timer's ticks: a 0.1 ms
    # timer fires on fewer turns when a step takes less than 0.1 ms, as on a fast machine.)
    assert turns > 200 // 2, turns
    assert ticks > 0


async def test_alone_inline_ms_bounds_which_lone_runs_skip_the_thread(make_dp: MakeDP) -> None:
    sentiment = ModelRef("sentiment", 1)

    async def queued_ns(**settings: float) -> int:
        dp = await make_dp(inline_batch_ms=0, **settings)  # with company, every run after the first goes to a thread
        await asyncio.sleep(0.01)
        for _ in range(3):
            await dp.classify(sentiment, ["a good film"])
            await asyncio.sleep(0.001)  # separate calls, as from the network (not one caller looping)
        (stats,) = await dp.statistics(sentiment)
        assert stats.queue.count == 3
        return stats.queue.ns

    # Alone, a run that took less than alone_inline_ms runs at once on the loop: no queue, no thread.
    assert await queued_ns(alone_inline_ms=1_000) == 0
    # alone_inline_ms=0 follows inline_batch_ms (0 here): once the first run took any time, lone runs queue too.
    assert await queued_ns(alone_inline_ms=0) > 0


async def test_a_batch_with_nobody_else_to_serve_runs_inline_up_to_alone_inline_ms(
    make_dp: MakeDP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that took every queued request and is not full runs on the loop while its size's last run took at
    most alone_inline_ms (no other call to serve meanwhile: the thread's hop only adds its cost); a full batch, or
    one with requests queued behind it, keeps the inline_batch_ms rule and runs in a worker thread."""

    async def threads(alone_inline_ms: float, sizes: list[int]) -> list[bool]:
        dp = await make_dp(inline_batch_ms=0, alone_inline_ms=alone_inline_ms, max_batch_size=3, max_batch_delay_ms=20)
        batcher = dp.registry.resolve(LM).batcher
        loop_thread, on_loop = threading.get_ident(), []

        def run(real: Callable[[], Any], feeds: dict[str, Any]) -> Any:
            on_loop.append(threading.get_ident() == loop_thread)
            return real()

        hook_runs(monkeypatch, batcher.runtime, run)
        step = StepInput(inputs={"input_ids": np.array([[1, 2]], dtype=np.int64)}, rows=1, key=2)
        for size in sizes:  # each a burst of `size` steps; a burst over max_batch_size is two batches
            await asyncio.gather(*(batcher.submit(step) for _ in range(size)))
        assert recorded(dp).batch_sizes("charlm") == [2, 2, 3, 3, 3, 2]
        return on_loop

    # The first run of each size is inline (no time known yet); after it, inline_batch_ms=0 sends every batch
    # with company to the thread, except those with nobody else to serve.
    assert await threads(1_000, [2, 2, 3, 3, 5]) == [True, True, True, False, False, True]
    # alone_inline_ms=0 follows inline_batch_ms for these batches too.
    assert await threads(0, [2, 2, 3, 3, 5]) == [True, False, True, False, False, False]


async def test_derived_outputs_are_computed_only_for_batches_that_ask(dp: CoreDataPlane) -> None:
    batcher = dp.registry.resolve(LM).batcher
    derive, calls = batcher.derive, []
    assert derive is not None  # the char LM's next-character probabilities

    def counted(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(outputs["logits"]))
        return derive(outputs)

    batcher.derive = counted
    # A keystroke (Suggest) and a completion only read logits: no softmax per batch for them.
    s = await dp.create_session(LM)
    await dp.suggest(s.id, "To be", reset=False, n=2, max_chars=3, beam=False)
    _ = [c async for c in dp.complete(LM, "abc", SamplingParams(max_chars=3, temperature=0.0))]
    assert calls == []
    # CharStep returns the distribution: its run computes it, and it equals a softmax of the logits. (A text not fed
    # before: "To be" is in the prefix cache since the session's first Suggest, and would run nothing.)
    step = await dp.char_step(LM, "Or not")
    assert calls == [1]
    np.testing.assert_allclose(step.probabilities.sum(), 1.0, rtol=1e-5)
    ask = StepInput(inputs={"input_ids": np.array([[3]], dtype=np.int64)}, rows=1, key=("step", 1), derive=True)
    skip = StepInput(inputs={"input_ids": np.array([[4]], dtype=np.int64)}, rows=1, key=("step", 1))
    asked, skipped = await batcher.submit(ask), await batcher.submit(skip)
    assert "next_char_probs" in asked.outputs and "next_char_probs" not in skipped.outputs


def _texts(n: int, words: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = ["good", "bad", "film", "movie", "boring", "great", "fun", "not", "very", "a"]
    return [" ".join(rng.choice(vocab, words)) for _ in range(n)]


def _padded(lengths: list[int], rows: list[int] | None = None) -> list[StepInput]:
    rows = rows or [1] * len(lengths)
    return [
        StepInput(inputs={"input_ids": np.ones((r, t), dtype=np.int64)}, rows=r, pad={"input_ids": 0})
        for t, r in zip(lengths, rows, strict=True)
    ]


def test_padding_groups_split_only_where_it_saves_enough() -> None:
    from service.core.batching import padding_groups

    short_long = _padded([40, 2, 41, 3, 2, 40, 3, 39])
    groups = padding_groups(short_long, 64)
    assert sorted(sorted(g) for g in groups) == [[0, 2, 5, 7], [1, 3, 4, 6]]  # the short rows run apart
    assert padding_groups(short_long, 0) == [list(range(8))]  # 0 = never split
    assert padding_groups(short_long, 10_000) == [list(range(8))]  # the saving (~150) is below the bound
    unpadded = [StepInput(inputs={"input_ids": np.ones((1, t), dtype=np.int64)}, rows=1) for t in (2, 40)]
    assert padding_groups(unpadded, 1) == [[0, 1]]  # only padded requests are regrouped
    assert padding_groups([*_padded([2, 2, 2]), unpadded[1]], 1) == [[0, 1, 2, 3]]  # all of them, or none
    similar = _padded([30, 28, 31, 29, 27, 30])
    assert padding_groups(similar, 1) == [list(range(6))]  # saves less than a quarter: one run
    three = _padded([5, 5, 60, 60, 25, 25])
    assert sorted(sorted(g) for g in padding_groups(three, 16)) == [[0, 1], [2, 3], [4, 5]]
    # Rows count: one request of 20 short rows is worth splitting from one long row, a short single row is not.
    assert len(padding_groups(_padded([4, 50], [20, 1]), 64)) == 2
    assert len(padding_groups(_padded([4, 50], [1, 1]), 64)) == 1


async def test_a_padded_batch_runs_as_length_groups_with_unchanged_answers(make_dp: MakeDP) -> None:
    # 8 two-word and 8 thirty-word texts arrive together: one ORT run each group, not 16 rows padded to 30.
    dp = await make_dp(max_batch_size=16, max_batch_delay_ms=60_000)
    texts = [t for pair in zip(_texts(8, 2, 0), _texts(8, 30, 1), strict=True) for t in pair]
    merged = await asyncio.gather(*(dp.classify(ModelRef("sentiment"), [t]) for t in texts))
    assert sorted(recorded(dp).batch_sizes("sentiment")) == [8, 8]
    (stats,) = await dp.statistics(ModelRef("sentiment", 1))
    assert stats.execution_count == 2 and stats.queue.count == 16 and stats.compute_infer.count == 16
    assert sorted((b.batch_size, b.compute_infer.count) for b in stats.batches) == [(8, 2)]
    solo = await make_dp()
    for text, result in zip(texts, merged, strict=True):  # every answer went back to its own caller
        alone = (await solo.classify(ModelRef("sentiment"), [text]))[0]
        np.testing.assert_allclose(result[0].probabilities, alone.probabilities, atol=1e-5)

    whole = await make_dp(max_batch_size=16, max_batch_delay_ms=60_000, pad_split_tokens=0)
    await asyncio.gather(*(whole.classify(ModelRef("sentiment"), [t]) for t in texts))
    assert recorded(whole).batch_sizes("sentiment") == [16]


async def test_one_requests_texts_of_very_different_lengths_run_as_length_groups(make_dp: MakeDP) -> None:
    """A request's texts were one item, padded to its longest: 255 one-word texts and one of 4,000 words ran as
    256 rows x 4,000 steps and held the model for 29 s, far under max_words_per_request. Its texts now go as
    length groups, as concurrent requests do, with the same answers; PAD_SPLIT_TOKENS=0 keeps one run."""
    texts = [*_texts(20, 2, 0), *_texts(1, 120, 1), *_texts(11, 3, 2)]
    dp = await make_dp()
    grouped = await dp.classify(ModelRef("sentiment"), texts)
    sizes = recorded(dp).batch_sizes("sentiment")
    assert sorted(sizes) == [1, 31], sizes
    (stats,) = await dp.statistics(ModelRef("sentiment", 1))
    assert stats.execution_count == 2 and stats.inference_count == len(texts) and stats.success.count == 1
    # one request in the per-request histograms, whatever its groups (it went in once per group)
    labels = {"model": "sentiment", "version": "1"}
    assert dp.metrics.registry.get_sample_value("seqserve_inference_seconds_count", labels) == 1
    assert dp.metrics.registry.get_sample_value("seqserve_inference_queue_seconds_count", labels) == 1
    # ...observed with the run of its longest texts (the 120-word one, alone), not its cheapest
    assert sorted(recorded(dp).requests) == [(1, 1), (31, 0)]
    whole = await make_dp(pad_split_tokens=0)
    one_run = await whole.classify(ModelRef("sentiment"), texts)
    assert recorded(whole).batch_sizes("sentiment") == [len(texts)]
    for a, b in zip(grouped, one_run, strict=True):  # in the request's order, the same answers
        assert a.label == b.label
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)


def _depth(dp: CoreDataPlane, model: str) -> float | None:
    return dp.metrics.registry.get_sample_value("seqserve_queue_depth", {"model": model})


async def test_the_queue_depth_gauge_follows_requests_dropped_from_the_head(make_dp: MakeDP) -> None:
    """Requests whose deadline passed (or whose client left) while they waited are dropped from the head of the
    queue; the gauge followed only submits and batches, so a queue drained that way kept its last value and an
    idle server showed a backlog (the soak test saw 1 to 4 after deadline churn). The gauge now reads the queue's
    length at scrape time: it shows the three while they wait, and 0 once they are dropped."""
    from service.core.batching import _Pending

    dp = await make_dp(max_batch_size=4, max_batch_delay_ms=60_000)
    batcher = dp.registry.resolve(ModelRef("sentiment")).batcher
    loop = asyncio.get_running_loop()
    gone: list[asyncio.Future[object]] = [loop.create_future() for _ in range(3)]
    for fut in gone:
        fut.cancel()  # each waited past its deadline
        batcher._pending.append(_Pending(StepInput(inputs={}, rows=1, key="k"), fut, 0.0))  # type: ignore[arg-type]
    assert _depth(dp, "sentiment") == 3
    batcher._wake.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not batcher._pending and _depth(dp, "sentiment") == 0


def test_the_queue_depth_gauge_sums_a_models_versions() -> None:
    """Each version has its own batcher; one version's queue length replaced the other's in the model's gauge."""
    from prometheus_client import CollectorRegistry

    from service.metrics import Metrics

    m = Metrics(CollectorRegistry(), runtime_collectors=False)
    m.model_loaded("sentiment", 1, "CPUExecutionProvider", 0.1, True)
    m.watch_queue("sentiment", 1, lambda: 3)
    m.watch_queue("sentiment", 2, lambda: 2)
    assert m.registry.get_sample_value("seqserve_queue_depth", {"model": "sentiment"}) == 5
    m.watch_queue("sentiment", 2, lambda: 0)  # version 2 stopped: version 1's backlog stays
    assert m.registry.get_sample_value("seqserve_queue_depth", {"model": "sentiment"}) == 3


# The batch-size bound and a stop during a threaded run (found by mutation testing: neither was checked).
async def test_max_batch_size_bounds_every_batch(make_dp: MakeDP) -> None:
    dp = await make_dp(max_batch_size=2, max_batch_delay_ms=1.0)
    await asyncio.gather(*(dp.classify(SENT, ["good"]) for _ in range(7)))
    sizes = recorded(dp).batch_sizes("sentiment")
    assert sum(sizes) == 7 and max(sizes) <= 2, sizes


def _overlap_counter(
    batcher: Batcher, monkeypatch: pytest.MonkeyPatch, hold: threading.Event | None = None
) -> list[int]:
    """Wraps the batcher's runtime: each run takes 50 ms (or waits for ``hold``); returns [runs at once, the most
    seen at once]."""
    seen = [0, 0]
    lock = threading.Lock()

    def slow(real: Callable[[], Any], feeds: dict[str, Any]) -> Any:
        with lock:
            seen[0] += 1
            seen[1] = max(seen[1], seen[0])
        try:
            if hold is None:
                time.sleep(0.05)
            else:
                hold.wait(10)
            return real()
        finally:
            with lock:
                seen[0] -= 1

    hook_runs(monkeypatch, batcher.runtime, slow)
    return seen


async def test_stop_during_a_threaded_run_fails_its_waiters(make_dp: MakeDP, monkeypatch: pytest.MonkeyPatch) -> None:
    dp = await make_dp(inline_batch_tokens=0)  # every batch runs in a worker thread
    batcher = dp.registry.resolve(SENT).batcher
    release = threading.Event()
    seen = _overlap_counter(batcher, monkeypatch, release)
    call = asyncio.ensure_future(dp.classify(SENT, ["good"]))
    while seen[0] < 1:
        await asyncio.sleep(0.001)
    await batcher.stop()
    release.set()
    with pytest.raises(ModelUnavailable, match="stopped"):
        await asyncio.wait_for(call, 5)


def test_statistics_charge_each_request_of_a_batch_the_batchs_time() -> None:
    """Triton's accounting (service/core/stats.py): every request of a batch is charged the batch's compute
    times (the batcher adds them to its ``Runs``), batch_stats are keyed by the batch's rows and count runs, and
    requests count when they finish: a successful one once in queue (with no time when it ran nothing) and, if it
    ran, once in compute; a failed one in fail alone."""
    from service.core.context import Runs
    from service.core.stats import StatsBook

    def ran(queue: int, infer: int) -> Runs:
        r = Runs()
        r.count, r.queue_ns, r.input_ns, r.infer_ns, r.output_ns = 1, queue, 10, infer, 1
        return r

    book = StatsBook()
    book.batch(rows=5, input_ns=10, infer_ns=100, output_ns=1)
    book.batch(rows=2, input_ns=4, infer_ns=40, output_ns=2)
    for q in (10, 20, 30):
        book.request(True, 1_000, inferences=2, runs=ran(q, 100))
    book.request(True, 1_000, inferences=2, runs=Runs())  # answered without a run (a cached answer's path)
    book.request(False, 500, inferences=2, runs=ran(7, 40))  # ran, then failed: fail alone
    book.request(False, 500, inferences=2)
    s = book.snapshot("m", 1)
    assert (s.compute_input.ns, s.compute_infer.ns, s.compute_output.ns) == (30, 300, 3)
    assert s.queue == Duration(4, 60) and s.compute_infer.count == 3
    assert (s.success, s.fail) == (Duration(4, 4_000), Duration(2, 1_000))
    assert (s.execution_count, s.inference_count) == (2, 8) and s.last_inference_ms > 0
    assert [(b.batch_size, b.compute_infer.count, b.compute_infer.ns) for b in s.batches] == [(2, 1, 40), (5, 1, 100)]


async def _finishing_order(make_dp: MakeDP, levels: list[int | None], **settings: object) -> list[int]:
    """Submits one charlm step per entry of ``levels`` (the caller's priority level; None = the default), all
    queued before the batcher runs any (one row per batch); returns the order in which they were answered."""
    dp = await make_dp(max_batch_size=1, max_batch_delay_ms=60_000, **settings)
    batcher = dp.registry.resolve(LM).batcher
    done: list[int] = []

    async def step(i: int, level: int | None) -> None:
        set_priority(level)  # (this task's own context, as the KServe servicer sets it for a call)
        await batcher.submit(StepInput(inputs={"input_ids": np.array([[1, 2]], dtype=np.int64)}, rows=1, key=2))
        done.append(i)

    await asyncio.gather(*(step(i, level) for i, level in enumerate(levels)))
    return done


async def test_a_waiting_request_of_a_higher_priority_level_runs_first(make_dp: MakeDP) -> None:
    """Triton's priority levels: 1 is the highest; requests that name none take the default level (2 here); within
    a level, the oldest first."""
    levels = [None, 3, None, 1, 2, 1]
    order = await _finishing_order(make_dp, levels, priority_levels=3, default_priority_level=2)
    assert order == [3, 5, 0, 2, 4, 1]
    # The default level 0 is the lowest: a request that names no level waits behind every one that does.
    order = await _finishing_order(make_dp, [None, 3, 1, None], priority_levels=3)
    assert order == [2, 0, 1, 3]
    # With one level (the default) the queue is first come, first served, whatever the context says.
    assert await _finishing_order(make_dp, [None, 3, 1, 2]) == [0, 1, 2, 3]


@pytest.mark.parametrize("instances", [1, 2, 3])
async def test_model_instances_bound_the_batches_running_at_once(
    make_dp: MakeDP, monkeypatch: pytest.MonkeyPatch, instances: int
) -> None:
    # Batches of one request each, all in worker threads: with N instances, N run at once and never more (1, the
    # default: one at a time); every answer is the one the request gets alone.
    dp = await make_dp(model_instances=instances, max_batch_size=1, inline_batch_tokens=0)
    texts = ["good film", "a very boring movie", "bad", "i love this great fun film !", "not good", "fine"]
    alone = [(await dp.classify(SENT, [t]))[0].probabilities for t in texts]
    seen = _overlap_counter(dp.registry.resolve(SENT).batcher, monkeypatch)
    together = await asyncio.gather(*(dp.classify(SENT, [t]) for t in texts))
    assert seen[1] == instances
    for probs, result in zip(alone, together, strict=True):
        np.testing.assert_allclose(result[0].probabilities, probs, atol=1e-6)
    assert sorted(recorded(dp).batch_sizes("sentiment")[len(texts) :]) == [1] * len(texts)


async def test_stop_fails_every_running_instance_and_queued_request(
    make_dp: MakeDP, monkeypatch: pytest.MonkeyPatch
) -> None:
    dp = await make_dp(model_instances=2, max_batch_size=1, inline_batch_tokens=0)
    batcher = dp.registry.resolve(SENT).batcher
    hold = threading.Event()
    seen = _overlap_counter(batcher, monkeypatch, hold)
    calls = [asyncio.ensure_future(dp.classify(SENT, [t])) for t in ("good", "bad", "fine")]
    while seen[0] < 2 or batcher.pending < 1:  # two running, the third queued behind them
        await asyncio.sleep(0.001)
    await batcher.stop()
    hold.set()
    for call in calls:
        with pytest.raises(ModelUnavailable, match=r"stopped|unloaded"):
            await asyncio.wait_for(call, 5)
    assert not batcher._runs and batcher._running == 0


async def test_model_config_reports_the_instances(make_dp: MakeDP) -> None:
    # Triton clients read instance_group[0].count for the model's parallelism.
    from service.api.kserve.convert import config_to_pb

    for instances in (1, 4):
        dp = await make_dp(model_instances=instances)
        config = config_to_pb(await dp.model_metadata(SENT), dp.settings)
        assert [(g.count, g.name) for g in config.instance_group] == [(instances, "sentiment")]


async def test_a_failed_batch_whose_callers_clear_their_tracebacks_leaves_the_queue_working(
    make_dp: MakeDP,
) -> None:
    """The gRPC edge clears the frames of a failed call's traceback (``traceback.clear_frames``, to free a large
    request at once). The callers got the run's own exception, whose traceback held the flush task's frames:
    clearing a suspended coroutine's frame closes it, so one failed batch closed the flush task ("cannot reuse
    already awaited coroutine") and every later request of the model waited forever, while it stayed ready."""
    import traceback

    dp = await make_dp(max_batch_size=3, max_batch_delay_ms=60_000)
    batcher = dp.registry.resolve(LM).batcher
    good = StepInput(inputs={"input_ids": np.array([[1, 2]], dtype=np.int64)}, rows=1, key=2)
    bad = StepInput(inputs={"input_ids": np.array([[1.5, 2.5]], dtype=np.float32)}, rows=1, key=2)  # wrong dtype

    async def as_the_edge(item: StepInput) -> object:
        try:
            return await batcher.submit(item)
        except Exception as exc:
            traceback.clear_frames(exc.__traceback__)
            return exc

    for _ in range(3):  # a batch of 3 fails, each runs alone; the culprit's caller clears its traceback
        results = await asyncio.wait_for(asyncio.gather(*(as_the_edge(x) for x in (good, bad, good))), 30)
        assert [isinstance(r, StepOutput) for r in results] == [True, False, True]
    outs = await asyncio.wait_for(asyncio.gather(*(batcher.submit(good) for _ in range(3))), 30)
    assert [o.outputs["logits"].shape for o in outs] == [(1, 2, 96)] * 3
