"""Backspace in char-LM sessions (``UNDO_CHARS``, service/core/tasks/undo.py): a session that takes characters back
answers exactly as one fed the shortened text whole, re-feeds at most the characters kept since a checkpoint,
refuses what it cannot do without changing, and keeps its checkpoints through generation, fork and export."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest

from service.core.dataplane import CoreDataPlane
from service.core.registry import ModelEntry
from service.core.tasks.charlm import CharLMTask
from service.core.types import ModelRef, SamplingParams
from service.errors import FailedPrecondition, InvalidInput
from tests.service.core.conftest import MakeDP

LM = ModelRef("charlm")
U = 8
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"


async def distribution(dp: CoreDataPlane, session_id: str) -> np.ndarray:
    return (await dp.char_step(LM, "", session_id=session_id)).probabilities


async def whole(dp: CoreDataPlane, text: str) -> np.ndarray:
    """The next-character distribution after ``text`` fed in one call to a session of its own."""
    s = await dp.create_session(LM)
    try:
        return await distribution_after(dp, s.id, text)
    finally:
        await dp.delete_session(s.id)


async def distribution_after(dp: CoreDataPlane, session_id: str, text: str) -> np.ndarray:
    return (await dp.char_step(LM, text, session_id=session_id)).probabilities


@pytest.fixture
def fed(dp_undo: CoreDataPlane) -> Iterator[list[int]]:
    """The time lengths of every ORT run the char LM's task submits (how many characters each run fed)."""
    entry = dp_undo.registry.resolve(LM)
    task = entry.task
    assert isinstance(task, CharLMTask)
    lengths: list[int] = []
    submit = task._submit

    async def counting(state: object, ids: np.ndarray, probs: bool = False) -> object:
        lengths.append(int(ids.shape[1]))
        return await submit(state, ids, probs)  # type: ignore[arg-type]

    task._submit = counting  # type: ignore[method-assign,assignment]
    yield lengths
    task._submit = submit  # type: ignore[method-assign]


@pytest.fixture
async def dp_undo(make_dp: MakeDP) -> CoreDataPlane:
    return await make_dp(undo_chars=U, session_signing_key="s" * 40)


async def test_typing_with_backspaces_answers_as_the_text_fed_whole(dp_undo: CoreDataPlane) -> None:
    """Random typing: chunks of 1-5 characters and backspaces of what the session can take back, 60 events; after
    each, the session's distribution and steps are those of its current text fed whole."""
    dp, rng = dp_undo, random.Random(0)
    s = await dp.create_session(LM)
    text, pos, took_back = "", 0, 0
    for _ in range(60):
        if text and rng.random() < 0.35:
            back = rng.randint(1, min(len(text), U))
            try:
                result = await dp.suggest(s.id, "", backspace=back, n=1, max_chars=1)
            except (FailedPrecondition, InvalidInput):  # past what it keeps, or back to nothing (nothing to continue)
                assert (await dp.get_session(s.id)).steps == len(text)  # refused: the session is as it was
                continue
            text, took_back = text[:-back], took_back + 1
        else:
            chunk = TEXT[pos % len(TEXT) : pos % len(TEXT) + rng.randint(1, 5)] or "x"
            pos += len(chunk)
            result = await dp.suggest(s.id, chunk, n=1, max_chars=1)
            text += chunk
        assert result.steps == len(text)
        np.testing.assert_allclose(await distribution(dp, s.id), await whole(dp, text), atol=1e-6)
    assert took_back >= 10  # the test exercised backspace, not only typing


async def test_a_backspace_feeds_at_most_what_was_kept_not_the_text(dp_undo: CoreDataPlane, fed: list[int]) -> None:
    dp = dp_undo
    s = await dp.create_session(LM)
    long = (TEXT * 12)[:1003]
    await dp.suggest(s.id, long, n=1, max_chars=1)  # (a one-character suggestion runs nothing more)
    assert fed == [992, 8, 3]  # one feed, cut at the last two checkpoints (992 and 1000): three runs
    fed.clear()
    result = await dp.suggest(s.id, "", backspace=U, n=1, max_chars=1)
    assert result.steps == 1003 - U and fed == [3]  # from the checkpoint at 992, the 3 kept characters to 995
    np.testing.assert_allclose(await distribution(dp, s.id), await whole(dp, long[:-U]), atol=1e-6)


async def test_how_far_back_a_session_can_go_and_refusals_that_change_nothing(dp_undo: CoreDataPlane) -> None:
    dp = dp_undo
    s = await dp.create_session(LM)
    for ch in TEXT[: 3 * U + 3]:  # typed one character at a time
        await dp.suggest(s.id, ch, n=1, max_chars=1)
    before = await distribution(dp, s.id)
    steps = 3 * U + 3
    with pytest.raises(FailedPrecondition) as err:  # kept since the checkpoint at 2U: 3U+3 - U... = U+3 back
        await dp.suggest(s.id, "", backspace=U + 4, n=1, max_chars=1)
    assert "at most 11 characters now" in err.value.message and "reset it with the text" in err.value.message
    with pytest.raises(InvalidInput):
        await dp.suggest(s.id, "", backspace=steps + 1, n=1, max_chars=1)
    with pytest.raises(InvalidInput):
        await dp.suggest(s.id, "x", backspace=1, reset=True, n=1, max_chars=1)
    with pytest.raises(InvalidInput):  # an unknown character: refused before anything is taken back
        await dp.suggest(s.id, "\x00", backspace=2, n=1, max_chars=1)
    assert (await dp.get_session(s.id)).steps == steps
    np.testing.assert_array_equal(await distribution(dp, s.id), before)
    # Three backspaces of U-... within reach: down to the older checkpoint, then no further.
    assert (await dp.suggest(s.id, "", backspace=U + 3, n=1, max_chars=1)).steps == 2 * U
    with pytest.raises(FailedPrecondition) as err:
        await dp.suggest(s.id, "", backspace=1, n=1, max_chars=1)
    assert "at most 0 characters now" in err.value.message
    np.testing.assert_allclose(await distribution(dp, s.id), await whole(dp, TEXT[: 2 * U]), atol=1e-6)


async def test_generated_text_forks_and_exports_keep_their_checkpoints(dp_undo: CoreDataPlane) -> None:
    dp = dp_undo
    s = await dp.create_session(LM)
    generated = ""
    async for chunk in dp.complete(LM, "ROMEO:", SamplingParams(max_chars=2 * U, seed=3), session_id=s.id):
        generated += chunk.text
    text = "ROMEO:" + generated
    twin = await dp.fork_session(s.id)
    blob, _ = await dp.export_session(s.id)
    copy = await dp.import_session(blob)
    for sid in (s.id, twin.id, copy.id):  # the last characters were generated, not sent: taken back all the same
        assert (await dp.suggest(sid, "", backspace=U, n=1, max_chars=1)).steps == len(text) - U
        np.testing.assert_allclose(await distribution(dp, sid), await whole(dp, text[:-U]), atol=1e-6)


async def test_off_by_default_it_keeps_nothing_and_says_how_to_turn_it_on(make_dp: MakeDP) -> None:
    dp = await make_dp()
    s = await dp.create_session(LM)
    await dp.suggest(s.id, "To be", n=1, max_chars=1)
    with pytest.raises(FailedPrecondition) as err:
        await dp.suggest(s.id, "", backspace=1, n=1, max_chars=1)
    assert "SEQSERVE_UNDO_CHARS" in err.value.message
    empty = await dp.create_session(LM)  # (it said INVALID_ARGUMENT "between 0 and 0", naming no setting)
    with pytest.raises(FailedPrecondition) as err:
        await dp.suggest(empty.id, "abc", backspace=1, n=1, max_chars=1)
    assert "SEQSERVE_UNDO_CHARS" in err.value.message
    with pytest.raises(InvalidInput) as bad:  # a negative count is the request's own mistake, undo or not
        await dp.suggest(s.id, "", backspace=-1, n=1, max_chars=1)
    assert "backspace" in bad.value.message and "between 0" in bad.value.message
    stored = await dp.sessions.get(s.id)
    assert set(stored.context) == {"logits"}
    on = await make_dp(undo_chars=U)
    grown = on.registry.resolve(LM)
    plain = dp.registry.resolve(LM)
    assert isinstance(grown, ModelEntry) and isinstance(plain, ModelEntry)
    state = sum(v.nbytes for v in plain.task.initial_state().values())
    vocab = len(plain.manifest.tokenizer.vocab)  # type: ignore[union-attr]
    # Two states and their logits, 2U characters and two positions, float32: what the store reserves more.
    assert grown.task.session_nbytes() - plain.task.session_nbytes() == 2 * (state + 4 * vocab) + 4 * 2 * U + 8
