"""The prefix cache of char-LM calls without a session (``service/core/prefixes.py``): its keys, lookup order,
eviction and read-only entries; and in the core: answers identical to feeding the whole text, only the new
characters fed, per-principal scopes, and the Prometheus metrics it reports to."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.core.context import set_principal
from service.core.dataplane import CoreDataPlane
from service.core.prefixes import ENTRY_OVERHEAD, PrefixCache
from service.core.types import Duration, ModelRef, SamplingParams
from tests.hooks import HookedSession
from tests.service.core.conftest import RecordingMetrics, core_settings

LM = ModelRef("charlm")
RESULTS = ("hit", "partial", "miss")
TEXT = "Now is the winter of our discontent made glorious summer by this sun of York; " * 6  # 474 chars


def ids_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 60, size=n).astype(np.int64)


def state(value: float) -> dict[str, np.ndarray]:
    return {"h": np.full((2, 1, 4), value, np.float32), "c": np.full((2, 1, 4), -value, np.float32)}


# --- the cache alone -----------------------------------------------------------------------------------------


def test_keys_depend_on_scope_length_and_every_id() -> None:
    cache = PrefixCache(1 << 20, checkpoint=8)
    a, b = ids_of(40), ids_of(40)
    b[3] += 1  # one id differs, inside the first checkpoint block
    ka, kb = cache.keys(("m", ""), a), cache.keys(("m", ""), b)
    assert ka.key(40) == cache.keys(("m", ""), a.copy()).key(40)  # the same ids: the same key
    assert ka.key(3) == kb.key(3) and ka.key(4) != kb.key(4)  # prefixes agree up to the differing id
    assert ka.key(40) != kb.key(40) and ka.key(16) != kb.key(16)  # the chain carries the difference on
    assert ka.key(40) != cache.keys(("m", "other"), a).key(40)  # another principal
    assert ka.key(40) != cache.keys(("n", ""), a).key(40)  # another model version
    assert len({ka.key(n) for n in range(1, 41)}) == 40


def test_lookup_order_and_where_feeding_stops() -> None:
    keys = PrefixCache(1 << 20, checkpoint=128, lookback=16).keys(("m", ""), ids_of(300))
    assert list(keys.candidates(16)) == [*range(300, 283, -1), 256, 128]
    assert list(keys.segments(0)) == [128, 256, 300]
    assert list(keys.segments(130)) == [256, 300]
    assert list(keys.segments(256)) == [300]
    long = PrefixCache(1 << 20, checkpoint=128).keys(("m", ""), ids_of(4000))  # 8 runs at most: every 512th
    assert list(long.segments(0)) == [*range(512, 4000, 512), 4000]
    assert list(long.segments(3000)) == [3072, 3328, 3584, 3840, 4000]  # from 3,000: every 256th
    assert list(long.segments(3900)) == [3968, 4000] and list(long.segments(3970)) == [4000]
    short = PrefixCache(1 << 20, checkpoint=128).keys(("m", ""), ids_of(5))
    assert list(short.candidates(16)) == [5, 4, 3, 2, 1] and list(short.segments(0)) == [5]


def test_the_longest_cached_prefix_is_found() -> None:
    cache = PrefixCache(1 << 20, checkpoint=8, lookback=3)
    ids = ids_of(30)
    keys = cache.keys(("m", ""), ids)
    assert cache.lookup(keys) == (0, None)
    for n in (8, 16, 26):
        cache.store(keys, n, state(n), np.full(5, n, np.float32))
    assert cache.lookup(cache.keys(("m", ""), ids[:26]))[0] == 26  # the whole text
    assert cache.lookup(cache.keys(("m", ""), ids[:29]))[0] == 26  # 3 characters typed since
    assert cache.lookup(keys)[0] == 16  # 4 typed since: beyond the lookback, the checkpoint below
    found, hit = cache.lookup(cache.keys(("m", ""), ids[:20]))
    assert found == 16 and hit is not None
    assert float(hit.state["h"][0, 0, 0]) == 16 and float(hit.logits[0]) == 16
    other = ids.copy()
    other[0] += 1
    assert cache.lookup(cache.keys(("m", ""), other)) == (0, None)
    assert cache.lookup(cache.keys(("m", "someone else"), ids[:26])) == (0, None)


def test_entries_are_owned_read_only_copies() -> None:
    cache = PrefixCache(1 << 20, checkpoint=8)
    keys = cache.keys(("m", ""), ids_of(4))
    src, logits = state(1.0), np.ones(5, np.float32)
    cache.store(keys, 4, src, logits)
    src["h"][:] = 7.0  # the caller's arrays change afterwards
    logits[:] = 7.0
    _, hit = cache.lookup(keys)
    assert hit is not None and float(hit.state["h"].max()) == 1.0 and float(hit.logits.max()) == 1.0
    with pytest.raises(ValueError, match="read-only"):
        hit.state["h"][0, 0, 0] = 2.0
    big = np.zeros((64, 64), np.float32)
    view = big[:1]
    cache.store(cache.keys(("m", ""), ids_of(5)), 5, {"h": view}, logits)
    _, kept = cache.lookup(cache.keys(("m", ""), ids_of(5)))
    assert kept is not None and kept.state["h"].base is None  # not a view keeping the whole batch alive


def test_least_recently_used_entries_are_evicted_within_the_budget() -> None:
    one = sum(v.nbytes for v in state(0).values()) + 5 * 4 + ENTRY_OVERHEAD
    cache = PrefixCache(3 * one, checkpoint=8)
    keys = [cache.keys(("m", ""), ids_of(6, seed)) for seed in range(4)]
    for i in range(3):
        cache.store(keys[i], 6, state(i), np.zeros(5, np.float32))
    assert len(cache) == 3 and cache.bytes == 3 * one and cache.evictions == 0
    assert cache.lookup(keys[0])[0] == 6  # 0 is now the most recently used
    cache.store(keys[3], 6, state(3), np.zeros(5, np.float32))
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes and cache.evictions == 1
    assert cache.lookup(keys[1]) == (0, None)  # the least recently used went
    assert all(cache.lookup(keys[i])[0] == 6 for i in (0, 2, 3))
    cache.store(keys[3], 6, state(9), np.zeros(5, np.float32))  # stored again: replaced, not counted twice
    assert len(cache) == 3 and cache.bytes == 3 * one
    tiny = PrefixCache(one - 1, checkpoint=8)
    tiny.store(keys[0], 6, state(0), np.zeros(5, np.float32))  # larger than the whole cache: not kept
    assert len(tiny) == 0 and tiny.bytes == 0


def test_the_budget_counts_what_entries_really_take() -> None:
    """``max_bytes`` bounds the memory the entries take, not just their arrays' data: what Python allocates for
    2,000 char-LM-sized entries (keys, dicts, array objects included) stays within what the cache counts."""
    import tracemalloc

    cache = PrefixCache(1 << 30, checkpoint=128)
    full = {"h0": np.zeros((2, 1, 256), np.float32), "c0": np.zeros((2, 1, 256), np.float32)}
    keys = [cache.keys((1, ""), ids_of(40, seed)) for seed in range(2000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for k in keys:
            cache.store(k, 40, full, np.zeros(65, np.float32))
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) == 2000 and taken <= cache.bytes, (taken / 2000, cache.bytes / 2000)


def test_drop_forgets_one_model_versions_entries() -> None:
    cache = PrefixCache(1 << 20, checkpoint=8)
    for scope in ((1, ""), (1, "p"), (2, "")):
        cache.store(cache.keys(scope, ids_of(5)), 5, state(1), np.zeros(5, np.float32))
    assert cache.drop(1) == 2
    assert len(cache) == 1 and cache.lookup(cache.keys((2, ""), ids_of(5)))[0] == 5
    assert cache.bytes == next(iter(cache._entries.values()))[1]


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="checkpoint"):
        PrefixCache(100, checkpoint=0)
    assert not PrefixCache(0).enabled and PrefixCache(1).enabled


# --- in the core -------------------------------------------------------------------------------------------


async def started(models: Path, **overrides: Any) -> CoreDataPlane:
    overrides.setdefault("session_store", "memory")
    dp = CoreDataPlane(core_settings(models, **overrides), RecordingMetrics(), clock=time.time)
    await dp.start()
    return dp


@pytest.fixture
async def planes(tiny_models: Path) -> AsyncIterator[tuple[CoreDataPlane, CoreDataPlane]]:
    """The same tiny models with the prefix cache (default size) and without it."""
    on, off = await started(tiny_models), await started(tiny_models, prefix_cache_bytes=0)
    try:
        yield on, off
    finally:
        await on.stop()
        await off.stop()


def fed_lengths(dp: CoreDataPlane) -> list[int]:
    """Spies on the char LM's runs: the time length of every step run from now on (one request at a time here,
    so each run is one step)."""
    runtime = dp.registry.resolve(LM).runtime
    seen: list[int] = []

    def run(real: Any, feeds: dict[str, Any]) -> Any:
        seen.append(int(feeds["input_ids"].shape[1]))
        return real()

    runtime.session = HookedSession(runtime.session, run)
    return seen


def counter(dp: CoreDataPlane, name: str, **labels: str) -> float:
    value = dp.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_a_growing_text_feeds_only_what_it_added_and_answers_the_same(
    planes: tuple[CoreDataPlane, CoreDataPlane],
) -> None:
    on, off = planes
    fed = fed_lengths(on)
    for n in range(300, 306):  # a client typing, re-sending the whole text each time
        got, want = await on.char_step(LM, TEXT[:n], num_chars=4), await off.char_step(LM, TEXT[:n], num_chars=4)
        assert np.array_equal(got.probabilities, want.probabilities)  # bit for bit
        assert got.completion == want.completion and got.steps == want.steps == n
    # The first call is cut at each checkpoint (128, 256), then the rest; every later call feeds the one character
    # it added. Each call's greedy completion of 4 characters adds its 3 one-character steps.
    assert fed == [128, 128, 44] + [1] * 3 + ([1] + [1] * 3) * 5
    assert counter(on, "seqserve_prefix_cache_lookups_total", model="charlm", result="miss") == 1
    assert counter(on, "seqserve_prefix_cache_lookups_total", model="charlm", result="partial") == 5
    assert counter(on, "seqserve_prefix_cache_reused_chars_total", model="charlm") == sum(range(300, 305))
    assert counter(off, "seqserve_prefix_cache_lookups_total", model="charlm", result="miss") == 0
    # the same text again: the whole prompt is cached, nothing is fed for it
    before = len(fed)
    again = await on.char_step(LM, TEXT[:305])
    assert len(fed) == before and again.steps == 305
    assert np.array_equal(again.probabilities, (await off.char_step(LM, TEXT[:305])).probabilities)
    assert counter(on, "seqserve_prefix_cache_lookups_total", model="charlm", result="hit") == 1
    assert counter(on, "seqserve_prefix_cache_entries") == len(on.registry.prefixes) == 2 + 6
    assert counter(on, "seqserve_prefix_cache_bytes") == on.registry.prefixes.bytes > 0
    assert sum(counter(off, "seqserve_prefix_cache_lookups_total", model="charlm", result=r) for r in RESULTS) == 0


async def test_an_answer_from_the_cache_counts_in_queue_not_in_compute(
    planes: tuple[CoreDataPlane, CoreDataPlane],
) -> None:
    """A step answered whole from the prefix cache runs no model: it counted in success alone, and Triton counts every
    successful request in queue, which is how perf_analyzer finds the version it measures (`perf_analyzer -m charlm
    --sequence-length 1` on one text failed: "failed to find the requested model version"). Now in queue with no
    time, as a response-cache hit, and not in compute."""
    on, _ = planes
    await on.char_step(LM, TEXT[:40])
    (before,) = await on.statistics(LM)
    fed = fed_lengths(on)
    assert (await on.char_step(LM, TEXT[:40])).steps == 40
    assert fed == []  # (from the cache)
    (after,) = await on.statistics(LM)
    assert after.success.count == before.success.count + 1
    assert after.queue == Duration(before.queue.count + 1, before.queue.ns)
    assert (after.compute_infer, after.execution_count) == (before.compute_infer, before.execution_count)


async def test_a_shared_beginning_is_found_at_its_checkpoint(planes: tuple[CoreDataPlane, CoreDataPlane]) -> None:
    on, off = planes
    await on.char_step(LM, TEXT[:300])
    fed = fed_lengths(on)
    other = TEXT[:260] + "Richard speaks."  # shares 260 characters: the checkpoint at 256 is cached
    got = await on.char_step(LM, other)
    assert fed == [len(other) - 256]
    assert np.array_equal(got.probabilities, (await off.char_step(LM, other)).probabilities)


async def test_completions_without_a_session_reuse_their_prompt(planes: tuple[CoreDataPlane, CoreDataPlane]) -> None:
    on, off = planes
    params = SamplingParams(max_chars=12, temperature=0.8, seed=3)

    async def complete(dp: CoreDataPlane, prompt: str) -> list[tuple[str, str | None, int]]:
        return [(c.text, c.finish_reason, c.steps) async for c in dp.complete(LM, prompt, params)]

    first = await complete(on, TEXT[:200])
    fed = fed_lengths(on)
    second = await complete(on, TEXT[:200])
    assert first == second == await complete(off, TEXT[:200])
    assert fed == [1] * 11  # the generation's steps only; the prompt came from the cache


async def test_principals_never_share_prefixes(planes: tuple[CoreDataPlane, CoreDataPlane]) -> None:
    on, _ = planes
    set_principal("alice")
    await on.char_step(LM, TEXT[:50])
    fed = fed_lengths(on)
    set_principal("bob")
    await on.char_step(LM, TEXT[:50])  # bob's own call: fed in full, and it tells bob nothing of alice's
    assert fed == [50]
    set_principal("alice")
    await on.char_step(LM, TEXT[:51])
    assert fed == [50, 1]
    set_principal("")


async def test_a_session_uses_the_cache_only_while_it_starts_from_nothing(
    planes: tuple[CoreDataPlane, CoreDataPlane],
) -> None:
    on, off = planes
    await on.char_step(LM, TEXT[:40])  # a call without a session keeps the state after 40 characters
    s, t = await on.create_session(LM), await off.create_session(LM)
    fed = fed_lengths(on)
    first = await on.char_step(LM, TEXT[:41], session_id=s.id)  # a new session: its text's beginning was kept
    assert fed == [1] and first.steps == 41
    second = await on.char_step(LM, TEXT[41:44], session_id=s.id)  # from then on, from its own state only
    assert fed == [1, 3] and second.steps == 44
    assert np.array_equal(first.probabilities, (await off.char_step(LM, TEXT[:41], session_id=t.id)).probabilities)
    assert np.array_equal(second.probabilities, (await off.char_step(LM, TEXT[41:44], session_id=t.id)).probabilities)
    # A reset starts from nothing: the state kept after the session's first text (41; steps from the session's own
    # state are not kept) is found, the 3 characters after it are fed, then the suggestions' steps (beam of 2).
    again = await on.suggest(s.id, TEXT[:44], reset=True, n=2, max_chars=3)
    assert fed == [1, 3, 3, 1, 1] and again.steps == 44
    assert again == await off.suggest(t.id, TEXT[:44], reset=True, n=2, max_chars=3)
    after = await on.char_step(LM, "x", session_id=s.id)  # and goes on from there
    assert after.steps == 45
    assert np.array_equal(after.probabilities, (await off.char_step(LM, "x", session_id=t.id)).probabilities)


async def test_an_unloaded_model_leaves_nothing_in_the_cache(planes: tuple[CoreDataPlane, CoreDataPlane]) -> None:
    on, _ = planes
    await on.char_step(LM, TEXT[:40])
    assert len(on.registry.prefixes) == 1
    await on.unload_model("charlm")
    assert len(on.registry.prefixes) == 0 and on.registry.prefixes.bytes == 0
    await on.load_model("charlm")
    fed = fed_lengths(on)
    await on.char_step(LM, TEXT[:40])  # a new load never reads the last one's states
    assert fed == [40]


async def test_committed_char_lms_answer_bit_for_bit_from_the_cache() -> None:
    """On the committed models (every version): the state after a prefix fed in pieces, at checkpoints and from
    the cache, gives exactly the answer of feeding the whole text in one run. ``charlm-int8/1`` quantizes its
    activations per run, so its answers depend on the cuts: the probe at load keeps the cache away from it."""
    models = Path(__file__).resolve().parents[3] / "models"
    names = ["charlm", "charlm-int8"]
    on = await started(models, load_models=names)
    off = await started(models, load_models=names, prefix_cache_bytes=0)
    try:
        refs = [ModelRef(e.name, e.version) for e in on.registry.versions() if e.name in names]
        assert {(r.name, r.version) for r in refs} >= {("charlm", 1), ("charlm-int8", 1), ("charlm-int8", 3)}
        exact = {(r.name, r.version): on.registry.resolve(r).task.cuts_exactly for r in refs}  # type: ignore[attr-defined]
        assert exact[("charlm-int8", 1)] is False
        assert exact[("charlm", 1)] is True and exact[("charlm-int8", 2)] is True and exact[("charlm-int8", 3)] is True

        def lookups(ref: ModelRef) -> dict[str, float]:  # (the metric is per name: every version of it)
            return {r: counter(on, "seqserve_prefix_cache_lookups_total", model=ref.name, result=r) for r in RESULTS}

        for ref in refs:
            before = lookups(ref)
            for n in (1, 127, 128, 129, 300, 301, 302, 420, 300):
                got = await on.char_step(ref, TEXT[:n], num_chars=2)
                want = await off.char_step(ref, TEXT[:n], num_chars=2)
                assert np.array_equal(got.probabilities, want.probabilities), (ref, n)
                assert got.completion == want.completion
            looked = {r: n - before[r] for r, n in lookups(ref).items()}
            if exact[(ref.name, ref.version)]:
                assert looked["hit"] == 1 and looked["miss"] + looked["partial"] == 8  # the repeated 300 is the hit
            else:
                assert sum(looked.values()) == 0
    finally:
        await on.stop()
        await off.stop()


async def test_only_a_session_at_its_zero_state_counts_as_starting_from_nothing(
    planes: tuple[CoreDataPlane, CoreDataPlane],
) -> None:
    """A session with no steps but a state that is not zero (an imported one, say) must be fed from its own state:
    taking the cache's state for its text would drop what it carries."""
    from service.core.tasks.charlm import _unfed

    on, _ = planes
    s = await on.sessions.get((await on.create_session(LM)).id)
    assert _unfed(s)
    carried = {k: np.full_like(v, 0.5) for k, v in s.state.items()}
    assert not _unfed(dataclasses.replace(s, state=carried))
    assert not _unfed(dataclasses.replace(s, steps=1))
    assert not _unfed(dataclasses.replace(s, context={"logits": np.zeros(3, np.float32)}))
