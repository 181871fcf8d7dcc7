"""Sessions: chunked == whole, serialized concurrent calls, fork independence, TTL expiry, LRU eviction and the
reject policy, version pinning, wrong task / model / unknown id, caller-chosen ids, reset."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.core.context import set_principal
from service.core.dataplane import CoreDataPlane
from service.core.types import ModelRef, SamplingParams, SequenceRef, Tensor
from service.errors import FailedPrecondition, InvalidInput, ModelNotFound, Overloaded, SessionNotFound, session_ref
from tests.clock import FakeClock
from tests.service.core.conftest import MakeDP, add_version, recorded

LM = ModelRef("charlm")
FC = ModelRef("forecaster")
TEXT = "The quick brown fox jumps over the lazy dog.\nAnd then it naps."


async def distribution(dp: CoreDataPlane, session_id: str) -> np.ndarray:
    return (await dp.char_step(LM, "", session_id=session_id)).probabilities


async def test_chunked_feeding_equals_whole_feeding(dp: CoreDataPlane) -> None:
    whole = await dp.create_session(LM)
    await dp.char_step(LM, TEXT, session_id=whole.id)
    for cuts in ([1] * 12, [3, 7, 1, 20], [len(TEXT) - 1]):
        chunked = await dp.create_session(LM)
        pos = 0
        for n in cuts:
            await dp.char_step(LM, TEXT[pos : pos + n], session_id=chunked.id)
            pos += n
        await dp.suggest(chunked.id, TEXT[pos:], n=2, max_chars=3)  # Suggest advances by `appended` too
        np.testing.assert_allclose(await distribution(dp, chunked.id), await distribution(dp, whole.id), atol=1e-5)
        assert (await dp.get_session(chunked.id)).steps == len(TEXT)
    stateless = await dp.char_step(LM, TEXT)
    np.testing.assert_allclose(stateless.probabilities, await distribution(dp, whole.id), atol=1e-5)


async def test_suggest_does_not_advance_the_session(dp: CoreDataPlane) -> None:
    s = await dp.create_session(LM)
    first = await dp.suggest(s.id, "Hello wor", n=3, max_chars=4)
    assert first.steps == 9
    before = await distribution(dp, s.id)
    again = await dp.suggest(s.id, "", n=3, max_chars=4)
    assert again == first
    np.testing.assert_array_equal(await distribution(dp, s.id), before)
    assert (await dp.get_session(s.id)).steps == 9


async def test_concurrent_calls_on_one_session_are_serialized(dp: CoreDataPlane) -> None:
    s = await dp.create_session(LM)
    await asyncio.gather(*(dp.char_step(LM, "ab", session_id=s.id) for _ in range(20)))
    assert (await dp.get_session(s.id)).steps == 40
    ref = await dp.create_session(LM)
    await dp.char_step(LM, "ab" * 20, session_id=ref.id)
    np.testing.assert_allclose(await distribution(dp, s.id), await distribution(dp, ref.id), atol=1e-5)


async def test_concurrent_completions_on_one_session_do_not_interleave(dp: CoreDataPlane) -> None:
    s = await dp.create_session(LM)
    params = SamplingParams(max_chars=8, temperature=0.0)

    async def run(prompt: str) -> str:
        return "".join([c.text async for c in dp.complete(LM, prompt, params, session_id=s.id)])

    a, b = await asyncio.gather(run("one "), run("two "))
    assert (await dp.get_session(s.id)).steps == 4 + 8 + 4 + 8
    ref = await dp.create_session(LM)  # the lock is FIFO: "one " ran first, then "two "
    await dp.char_step(LM, "one " + a + "two " + b, session_id=ref.id)
    np.testing.assert_allclose(await distribution(dp, s.id), await distribution(dp, ref.id), atol=1e-5)


async def test_fork_is_independent(dp: CoreDataPlane) -> None:
    src = await dp.create_session(LM)
    await dp.char_step(LM, "abc", session_id=src.id)
    fork = await dp.fork_session(src.id, ttl_seconds=30)
    assert fork.id != src.id and fork.steps == 3 and fork.ttl_seconds == 30 and fork.version == src.version
    await dp.char_step(LM, "xyz", session_id=src.id)
    fresh = await dp.char_step(LM, "abc")
    np.testing.assert_allclose(await distribution(dp, fork.id), fresh.probabilities, atol=1e-6)
    await dp.char_step(LM, "123", session_id=fork.id)
    np.testing.assert_allclose(
        await distribution(dp, src.id), (await dp.char_step(LM, "abcxyz")).probabilities, atol=1e-5
    )
    assert ("charlm", "forked") in recorded(dp).events


async def test_idle_sessions_expire_and_the_sweep_removes_them(make_dp: MakeDP) -> None:
    clock = FakeClock()
    dp = await make_dp(clock=clock)
    s = await dp.create_session(LM, ttl_seconds=5)
    used = await dp.create_session(LM, ttl_seconds=5)
    keep = await dp.create_session(LM, ttl_seconds=600)
    clock.advance(4)
    await dp.char_step(LM, "a", session_id=used.id)  # used at t=4: expires at t=9
    clock.advance(2)  # t=6: only `s` is idle past its TTL
    assert await dp.sessions.sweep() == 1
    assert (await dp.sessions.usage()).count == 2
    assert recorded(dp).events.count(("charlm", "expired")) == 1
    with pytest.raises(SessionNotFound, match="is unknown, expired or was lost in a restart"):
        await dp.get_session(s.id)
    clock.advance(3.5)  # t=9.5
    assert await dp.sessions.sweep() == 1
    assert (await dp.get_session(keep.id)).id == keep.id
    assert (await dp.sessions.usage()).count == 1


async def test_a_refused_call_does_not_keep_a_session_alive(make_dp: MakeDP) -> None:
    """A call refused before the task changed the session leaves it exactly as it was, its idle time included."""
    clock = FakeClock()
    dp = await make_dp(clock=clock)
    lm = await dp.create_session(LM, ttl_seconds=5)
    fc = await dp.create_session(FC, ttl_seconds=5)
    clock.advance(4)
    with pytest.raises(InvalidInput):
        await dp.char_step(LM, "\u20ac", session_id=lm.id)  # outside the vocabulary
    with pytest.raises(InvalidInput):
        await dp.observe(fc.id, np.full((1, 7), np.nan, np.float32))
    clock.advance(2)  # t=6: both idle past their TTL since t=0
    for sid in (lm.id, fc.id):
        with pytest.raises(SessionNotFound):
            await dp.get_session(sid)


async def test_the_background_reaper_sweeps_on_its_own(make_dp: MakeDP) -> None:
    clock = FakeClock()
    dp = await make_dp(clock=clock, reaper_interval_seconds=0.01)
    await dp.create_session(LM, ttl_seconds=5)
    clock.advance(6)
    for _ in range(1000):  # bounded wait for the background task; nothing here depends on how long it takes
        if (await dp.sessions.usage()).count == 0:
            break
        await asyncio.sleep(0.005)
    assert (await dp.sessions.usage()).count == 0
    assert ("charlm", "expired") in recorded(dp).events


async def test_expired_session_is_not_found_even_before_the_reaper_runs(make_dp: MakeDP) -> None:
    clock = FakeClock()
    dp = await make_dp(clock=clock)
    s = await dp.create_session(LM, ttl_seconds=5)
    clock.advance(6)
    with pytest.raises(SessionNotFound):
        await dp.char_step(LM, "a", session_id=s.id)
    assert (await dp.sessions.usage()).count == 0


async def test_sessions_past_their_ttl_make_room_before_any_eviction_or_refusal(make_dp: MakeDP) -> None:
    """A full store (or a used-up quota) counts sessions that expired but that the reaper has not removed yet:
    they are swept first, so a live session is not evicted and a create is not refused for them."""
    clock = FakeClock()
    for policy in ("evict_lru", "reject"):
        dp = await make_dp(clock=clock, max_sessions=2, session_full_policy=policy, reaper_interval_seconds=3600)
        short = await dp.create_session(LM, ttl_seconds=5)
        live = await dp.create_session(LM, ttl_seconds=600)
        clock.advance(6)  # `short` expired; the reaper has not run
        await dp.create_session(LM)
        assert (await dp.get_session(live.id)).id == live.id
        assert recorded(dp).events.count(("charlm", "evicted")) == 0
        assert recorded(dp).events.count(("charlm", "expired")) == 1
        with pytest.raises(SessionNotFound, match="unknown, expired"):
            await dp.get_session(short.id)
    quota = await make_dp(clock=clock, quota_sessions=1, reaper_interval_seconds=3600)
    await quota.create_session(LM, ttl_seconds=5)
    clock.advance(6)
    assert (await quota.create_session(LM)).model == "charlm"


async def test_full_store_evicts_the_least_recently_used(make_dp: MakeDP) -> None:
    dp = await make_dp(max_sessions=3, session_full_policy="evict_lru")
    s1, s2, s3 = [await dp.create_session(LM) for _ in range(3)]
    await dp.char_step(LM, "a", session_id=s1.id)  # s2 is now the least recently used
    s4 = await dp.create_session(LM)
    with pytest.raises(SessionNotFound):
        await dp.get_session(s2.id)
    for s in (s1, s3, s4):
        assert (await dp.get_session(s.id)).id == s.id
    assert recorded(dp).events.count(("charlm", "evicted")) == 1
    # A fork evicts others, never its source.
    one = await make_dp(max_sessions=1)
    src = await one.create_session(LM)
    with pytest.raises(Overloaded, match="max_sessions=1"):
        await one.fork_session(src.id)
    assert (await one.get_session(src.id)).id == src.id


async def test_byte_limit_evicts_too(make_dp: MakeDP, dp: CoreDataPlane) -> None:
    one = (await dp.create_session(LM)).id
    size = (await dp.sessions.get(one)).nbytes
    small = await make_dp(max_session_bytes=2 * size)
    a, _b = await small.create_session(LM), await small.create_session(LM)
    await small.create_session(LM)
    usage = await small.sessions.usage()
    assert (usage.count, usage.bytes) == (2, 2 * size)
    with pytest.raises(SessionNotFound):
        await small.get_session(a.id)
    tiny = await make_dp(max_session_bytes=size - 1)
    with pytest.raises(Overloaded, match="max_session_bytes"):
        await tiny.create_session(LM)


async def test_full_store_rejects_under_the_reject_policy(make_dp: MakeDP) -> None:
    dp = await make_dp(max_sessions=2, session_full_policy="reject")
    a = await dp.create_session(LM)
    await dp.create_session(FC)
    with pytest.raises(Overloaded, match=r"max_sessions=2"):
        await dp.create_session(LM)
    with pytest.raises(Overloaded):
        await dp.fork_session(a.id)
    await dp.delete_session(a.id)
    assert (await dp.create_session(LM)).model == "charlm"


async def test_session_keeps_its_version_and_fails_when_it_is_removed(repo: Path, make_dp: MakeDP) -> None:
    dp = await make_dp(models=repo)
    old = await dp.create_session(LM)
    await dp.char_step(LM, "abc", session_id=old.id)
    add_version(repo, "charlm", 1, 2)
    await dp.registry.sync()  # what --watch-models runs
    assert (await dp.model_info(LM)).version == 2
    assert (await dp.create_session(LM)).version == 2
    step = await dp.char_step(LM, "d", session_id=old.id)  # still served by version 1
    assert step.steps == 4 and (await dp.get_session(old.id)).version == 1
    with pytest.raises(FailedPrecondition, match="names 'charlm' version 2"):
        await dp.char_step(ModelRef("charlm", 2), "e", session_id=old.id)
    shutil.move(repo / "charlm" / "1", repo.parent / "charlm-1")
    await dp.registry.sync()
    with pytest.raises(FailedPrecondition, match="pinned to model charlm version 1, which is no longer loaded") as gone:
        await dp.suggest(old.id, "e")
    assert session_ref(old.id) in gone.value.message and old.id not in gone.value.message
    assert gone.value.retry_after is None  # the version is gone: waiting does not bring it back
    assert "keeps its state until it expires, and goes on if that version is loaded again" in gone.value.message
    with pytest.raises(ModelNotFound):
        await dp.char_step(ModelRef("charlm", 1), "e")
    shutil.move(repo.parent / "charlm-1", repo / "charlm" / "1")  # back, with the same weights: the session goes on
    await dp.registry.sync()
    assert (await dp.char_step(LM, "e", session_id=old.id)).steps == 5


async def test_wrong_task_model_or_id(dp: CoreDataPlane) -> None:
    lm = await dp.create_session(LM)
    fc = await dp.create_session(FC)
    with pytest.raises(FailedPrecondition, match="'charlm' model charlm; this call needs a session of a forecaster"):
        await dp.observe(lm.id, np.zeros((3, 7), np.float32))
    with pytest.raises(FailedPrecondition, match="needs a session of a character language model"):
        await dp.suggest(fc.id, "abc")
    with pytest.raises(FailedPrecondition, match="needs a session of a character language model"):
        [c async for c in dp.complete(LM, "a", SamplingParams(), session_id=fc.id)]
    with pytest.raises(FailedPrecondition, match="stateless 'sentiment' model"):
        await dp.create_session(ModelRef("sentiment"))
    for call in (dp.get_session("nope"), dp.delete_session("nope"), dp.fork_session("nope")):
        with pytest.raises(SessionNotFound, match=re.escape(session_ref("nope"))):
            await call
    with pytest.raises(SessionNotFound):
        await dp.suggest("nope", "a")


async def test_ttl_limits(dp: CoreDataPlane) -> None:
    for bad in (0.0, -1.0, float("inf"), float("nan"), 86400.5, 1e-9, 0.999):
        with pytest.raises(InvalidInput, match=r"ttl_seconds must be >= 1 and <= 86400 \(session_max_ttl_seconds\)"):
            await dp.create_session(LM, ttl_seconds=bad)
    with pytest.raises(InvalidInput, match=r"got 1e-09: a session idle that long is gone before the next call"):
        await dp.create_session(LM, ttl_seconds=1e-9)  # was a session dead on arrival
    assert (await dp.create_session(LM, ttl_seconds=1)).ttl_seconds == 1
    s = await dp.create_session(LM)
    assert s.ttl_seconds == 600 and s.expires_at == pytest.approx(s.last_used_at + 600)
    with pytest.raises(InvalidInput, match="ttl_seconds"):
        await dp.fork_session(s.id, ttl_seconds=-5)


def text(value: str) -> list[Tensor]:
    return [Tensor("TEXT", "BYTES", (1,), items=[value.encode()])]


async def test_ids_are_random_and_a_restarted_sequence_replaces_its_session(dp: CoreDataPlane) -> None:
    ids = {(await dp.create_session(LM)).id for _ in range(20)}
    assert len(ids) == 20 and all(len(i) >= 32 for i in ids)  # token_urlsafe(24): 192 bits
    first = await dp.infer(LM, text("abc"), sequence=SequenceRef("corr-42", start=True))
    assert first.steps == 3 and (await dp.get_session("kserve:charlm:corr-42")).steps == 3
    again = await dp.infer(LM, text("x"), sequence=SequenceRef("corr-42", start=True))  # starts over
    assert again.steps == 1 and (await dp.sessions.usage()).count == 21
    await dp.infer(LM, text("y"), sequence=SequenceRef("corr-42", end=True))
    with pytest.raises(SessionNotFound, match="sequence 'corr-42' of model charlm is unknown or expired"):
        await dp.infer(LM, text("z"), sequence=SequenceRef("corr-42"))


async def test_a_model_whose_name_has_a_colon_has_sequences_of_its_own(repo: Path, make_dp: MakeDP) -> None:
    """Sequence keys are ``kserve:<model>:<id>``: model "charlm:x" with id "5" must not be model "charlm" with id
    "x:5" (the model part is escaped)."""
    other = repo / "charlm:x" / "1"
    shutil.copytree(repo / "charlm" / "1", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["name"] = "charlm:x"
    (other / "manifest.json").write_text(json.dumps(manifest))
    dp = await make_dp(models=repo)
    assert (await dp.model_info(ModelRef("charlm:x"))).ready
    await dp.infer(LM, text("ab"), sequence=SequenceRef("x:5", start=True))
    with pytest.raises(SessionNotFound, match="sequence '5' of model charlm:x is unknown"):
        await dp.infer(ModelRef("charlm:x"), text("c"), sequence=SequenceRef("5"))
    await dp.infer(ModelRef("charlm:x"), text("z"), sequence=SequenceRef("5", start=True))
    assert (await dp.infer(LM, text("c"), sequence=SequenceRef("x:5"))).steps == 3  # untouched by the other


async def test_one_request_sequences_are_counted_and_full_stores_refuse_starts_before_running_them(
    make_dp: MakeDP,
) -> None:
    """A sequence that starts and ends in one request counts as created and deleted (nothing is stored). Under the
    reject policy, a start the full store would refuse is refused before its first step runs (no model run)."""
    dp = await make_dp(max_sessions=1, session_full_policy="reject")
    await dp.infer(LM, text("ab"), sequence=SequenceRef("one", start=True, end=True))
    assert recorded(dp).events.count(("charlm", "created")) == 1
    assert recorded(dp).events.count(("charlm", "deleted")) == 1
    await dp.infer(LM, text("ab"), sequence=SequenceRef("a", start=True))
    runs = len(recorded(dp).batch_sizes("charlm"))
    with pytest.raises(Overloaded, match="max_sessions=1"):
        await dp.infer(LM, text("cd"), sequence=SequenceRef("b", start=True))
    assert len(recorded(dp).batch_sizes("charlm")) == runs  # refused before any step ran
    assert (await dp.infer(LM, text("x"), sequence=SequenceRef("a", start=True))).steps == 1  # a restart fits
    # ...while a one-request sequence, which stores nothing, is served by a full store or a used-up quota
    quota = await make_dp(quota_sessions=1)
    await quota.infer(LM, text("ab"), sequence=SequenceRef("c", start=True))  # (the quota's one session)
    for full in (dp, quota):
        assert (await full.infer(LM, text("ab"), sequence=SequenceRef("d", start=True, end=True))).steps == 2
        assert (await full.sessions.usage()).count == 1


async def test_reset_and_delete(dp: CoreDataPlane) -> None:
    s = await dp.create_session(LM)
    await dp.char_step(LM, "abc", session_id=s.id)
    reset = await dp.suggest(s.id, "x", reset=True, n=1, max_chars=2)  # back to the zero state, then "x"
    assert reset.steps == 1 and (await dp.get_session(s.id)).version == s.version
    np.testing.assert_allclose(
        (await dp.char_step(LM, "", session_id=s.id)).probabilities,
        (await dp.char_step(LM, "x")).probabilities,
        atol=1e-6,
    )
    await dp.delete_session(s.id)
    with pytest.raises(SessionNotFound):
        await dp.get_session(s.id)
    usage = await dp.sessions.usage()
    assert (usage.count, usage.bytes) == (0, 0)
    assert ("charlm", "deleted") in recorded(dp).events


async def test_complete_with_a_session_appends_prompt_and_generated_text(dp: CoreDataPlane) -> None:
    s = await dp.create_session(LM)
    params = SamplingParams(max_chars=12, temperature=0.7, seed=3)
    text = "".join([c.text async for c in dp.complete(LM, "Once ", params, session_id=s.id)])
    assert len(text) == 12 and (await dp.get_session(s.id)).steps == 5 + 12
    np.testing.assert_allclose(
        await distribution(dp, s.id), (await dp.char_step(LM, "Once " + text)).probabilities, atol=1e-5
    )
    # An empty prompt continues from the session.
    more = "".join([c.text async for c in dp.complete(LM, "", SamplingParams(max_chars=3), session_id=s.id)])
    assert (await dp.get_session(s.id)).steps == 5 + 12 + len(more)


async def test_closing_a_stream_stops_generation_and_keeps_what_was_sent(dp: CoreDataPlane) -> None:
    s = await dp.create_session(LM)
    stream = dp.complete(LM, "abc", SamplingParams(max_chars=500, seed=1), session_id=s.id)
    got = ""
    async for chunk in stream:
        got += chunk.text
        if len(got) == 4:
            break
    await stream.aclose()
    info = await dp.get_session(s.id)
    assert info.steps == 3 + 4  # exactly the text the client received
    np.testing.assert_allclose(
        await distribution(dp, s.id), (await dp.char_step(LM, "abc" + got)).probabilities, atol=1e-5
    )
    assert recorded(dp).generated >= 4


async def long_completion(
    dp: CoreDataPlane, session_id: str, prompt: str, received: list[str], chunks: int
) -> asyncio.Task[None]:
    """A 2,000-character Complete on the session in a task of its own, returned once ``received`` holds
    ``chunks`` of its chunks."""

    async def consume() -> None:
        async for chunk in dp.complete(LM, prompt, SamplingParams(max_chars=2000, seed=1), session_id=session_id):
            received.append(chunk.text)

    task = asyncio.create_task(consume())
    while len(received) < chunks:
        await asyncio.sleep(0.001)
    return task


async def test_get_and_export_answer_at_once_during_a_long_completion(make_dp: MakeDP) -> None:
    """A read does not wait behind the call holding the session: it answers with the session as the last
    finished call left it, marked in use; another principal still gets NOT_FOUND, at once too; once the call
    ends, reads take the lease again and see it."""
    dp = await make_dp(session_signing_key="s" * 40)
    s = await dp.create_session(LM)
    await dp.char_step(LM, "abc", session_id=s.id)
    received: list[str] = []
    task = await long_completion(dp, s.id, "de", received, 3)
    info = await asyncio.wait_for(dp.get_session(s.id), 1.0)
    assert info.in_use and info.steps == 3 and info.id == s.id
    blob, exported = await asyncio.wait_for(dp.export_session(s.id), 1.0)
    assert exported.in_use and exported.steps == 3
    assert not task.done()  # both answered while the completion was still running

    async def as_someone_else() -> None:
        set_principal("mallory")
        with pytest.raises(SessionNotFound):
            await asyncio.wait_for(dp.get_session(s.id), 1.0)

    await asyncio.create_task(as_someone_else())  # (its own context: the principal stays with that task)
    copy = await dp.import_session(blob)  # the blob holds the finished state: 3 steps
    assert copy.steps == 3 and not copy.in_use
    np.testing.assert_allclose(
        await distribution(dp, copy.id), (await dp.char_step(LM, "abc")).probabilities, atol=1e-5
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    after = await dp.get_session(s.id)
    assert not after.in_use and after.steps == 3 + 2 + len(received)


async def test_cancelling_the_consumer_task_stops_generation(dp: CoreDataPlane) -> None:
    s = await dp.create_session(LM)
    received: list[str] = []
    task = await long_completion(dp, s.id, "abc", received, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    steps = (await dp.get_session(s.id)).steps  # the lock was released
    assert 3 + 5 <= steps == 3 + len(received) < 3 + 2000
    await asyncio.sleep(0.05)
    assert (await dp.get_session(s.id)).steps == steps  # nothing runs on after cancellation
