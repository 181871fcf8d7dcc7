"""Tasks: every validation error (naming the field and the limit), sampling (seeded, greedy, top-k, stop
strings), suggestions (beam / greedy, log-probabilities), and forecasting (normalization, quantiles, warm-up)."""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.core.dataplane import CoreDataPlane
from service.core.manifest import MANIFEST_FILE
from service.core.types import CompletionChunk, Duration, ModelRef, SamplingParams
from service.errors import FailedPrecondition, InvalidInput
from tests.service.core.conftest import MakeDP

LM = ModelRef("charlm")
SENT = ModelRef("sentiment")
FC = ModelRef("forecaster")
WINDOW, HORIZON, FEATURES = 24, 12, 7


async def chunks(dp: CoreDataPlane, prompt: str, session_id: str | None = None, **params: Any) -> list[CompletionChunk]:
    return [c async for c in dp.complete(LM, prompt, SamplingParams(**params), session_id)]


async def text(dp: CoreDataPlane, prompt: str, **params: Any) -> str:
    return "".join(c.text for c in await chunks(dp, prompt, **params))


# --- sentiment -------------------------------------------------------------------------------------------------


async def test_classify_returns_a_distribution_per_text(dp: CoreDataPlane) -> None:
    results = await dp.classify(SENT, ["a good film", "this movie was n't fun !", "zzz unknown words"])
    assert len(results) == 3
    for r in results:
        assert r.labels == ["negative", "positive"]
        assert math.isclose(sum(r.probabilities), 1.0, rel_tol=1e-6)
        assert r.label == r.labels[int(np.argmax(r.probabilities))]


async def test_classify_validation(make_dp: MakeDP) -> None:
    dp = await make_dp(max_texts_per_request=3, max_chars_per_text=400, max_words_per_request=100)
    cases = [
        (
            ["good " * 70, "bad " * 31],
            r"texts has more than 100 words in all \(101 by texts\[1\]; max_words_per_request\); send the texts in "
            r"several requests",
        ),
        ([], "texts is empty"),
        (["a"] * 4, r"texts has 4 texts; the limit is 3 \(max_texts_per_request\)"),
        (["good", "   "], r"texts\[1\] is empty"),
        (["good", "x" * 401], r"texts\[1\] has 401 characters; the limit is 400 \(max_chars_per_text\)"),
    ]
    for texts, message in cases:
        with pytest.raises(InvalidInput, match=message):
            await dp.classify(SENT, texts)
    assert len(await dp.classify(SENT, ["good " * 70, "bad " * 30])) == 2  # (100 words: at the limit)


async def test_texts_of_many_characters_are_split_into_words_off_the_event_loop(
    dp: CoreDataPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request at the limits is tens of milliseconds of tokenizing: over ``ENCODE_OFF_LOOP_CHARS`` characters
    in all, the texts are checked and split in a worker thread, to the same answers and the same refusals."""
    from service.core.tasks import sentiment

    task = dp.registry.resolve(SENT).task
    loop_thread, threads = threading.get_ident(), []
    encode = task.encode  # type: ignore[attr-defined]

    def recorded(texts: list[str], field: str) -> Any:
        threads.append(threading.get_ident())
        return encode(texts, field)

    monkeypatch.setattr(task, "encode", recorded)
    long = ["a good film , " * 20] * (sentiment.ENCODE_OFF_LOOP_CHARS // 280 + 1)  # (280 characters each)
    assert sum(map(len, long)) > sentiment.ENCODE_OFF_LOOP_CHARS
    results = await dp.classify(SENT, long)
    assert threads[-1] != loop_thread
    (alone,) = await dp.classify(SENT, long[:1])
    assert threads[-1] == loop_thread  # (the same answer, to ONNX Runtime's rounding in a batch of another size)
    assert all(np.allclose(r.probabilities, alone.probabilities, atol=1e-5) for r in results)
    with pytest.raises(InvalidInput, match=r"^texts\[3\] is empty"):
        await dp.classify(SENT, [*long[:3], "   ", *long[3:]])
    assert threads[-1] != loop_thread


async def test_a_text_longer_than_the_training_window_is_read_whole(dp: CoreDataPlane) -> None:
    """tokenizer.max_length (64 here) is where training cut texts; serving reads a longer text whole (a review
    of several sentences; docs/models.md, "Long texts"): what follows the 64th word changes the answer."""
    head = "a good film , " * 16  # 64 tokens
    whole = await dp.classify(SENT, [head + "bad bad bad dull dull dull", head])
    assert whole[0].probabilities != whole[1].probabilities


# --- char LM: sampling -----------------------------------------------------------------------------------------


async def test_seeded_sampling_is_reproducible(dp: CoreDataPlane) -> None:
    a = await text(dp, "Hello", max_chars=40, temperature=1.0, seed=7)
    b = await text(dp, "Hello", max_chars=40, temperature=1.0, seed=7)
    c = await text(dp, "Hello", max_chars=40, temperature=1.0, seed=8)
    assert a == b and len(a) == 40
    assert a != c  # 40 characters from a near-uniform untrained model


async def test_temperature_zero_is_greedy(dp: CoreDataPlane) -> None:
    greedy = (await dp.char_step(LM, "Hello", num_chars=15)).completion
    assert await text(dp, "Hello", max_chars=15, temperature=0.0, seed=1) == greedy
    assert await text(dp, "Hello", max_chars=15, temperature=0.0, seed=2) == greedy
    assert await text(dp, "Hello", max_chars=15, temperature=1.0, top_k=1, seed=3) == greedy


async def test_top_k_only_samples_the_k_most_likely(dp: CoreDataPlane) -> None:
    step = await dp.char_step(LM, "Hello")
    top3 = {step.vocab[i] for i in np.argsort(-step.probabilities)[:3]}
    firsts = {(await text(dp, "Hello", max_chars=1, temperature=5.0, top_k=3, seed=s)) for s in range(30)}
    assert firsts <= top3 and len(firsts) > 1


async def test_finish_reasons_and_stop_strings(dp: CoreDataPlane) -> None:
    out = await chunks(dp, "Hello", max_chars=30, temperature=0.0)
    assert [c.finish_reason for c in out] == [None] * 29 + ["length"]
    greedy = "".join(c.text for c in out)
    stop = greedy[6:8]
    end = greedy.find(stop) + len(stop)
    stopped = await chunks(dp, "Hello", max_chars=30, temperature=0.0, stop=("@@@@", stop))
    assert "".join(c.text for c in stopped) == greedy[:end]  # the stop string is included
    assert stopped[-1].finish_reason == "stop" and all(c.finish_reason is None for c in stopped[:-1])


async def test_sampling_validation(make_dp: MakeDP) -> None:
    dp = await make_dp(max_generate_chars=300, max_chars_per_text=100)
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("a", {"max_chars": 0}, r"max_chars must be between 1 and 300 \(max_generate_chars\); got 0"),
        ("a", {"max_chars": 301}, r"max_chars must be between 1 and 300"),
        ("a", {"temperature": -0.5}, r"temperature must be a finite number between 0 and 100; got -0.5"),
        ("a", {"temperature": float("nan")}, r"temperature must be a finite number"),
        ("a", {"top_k": 97}, r"top_k must be between 0 and 96 \(0 = no cut"),
        ("a", {"top_k": -1}, r"top_k must be between 0 and 96"),
        ("a", {"stop": ("x",) * 9}, r"stop has 9 strings; the limit is 8"),
        ("a", {"stop": ("ok", "")}, r"stop\[1\] must have 1 to 64 characters; got 0"),
        # Characters the model never writes made stop strings that could never match, accepted without a word.
        (
            "a",
            {"stop": ("ok", "\u4e2d.")},
            r"^stop\[1\]: character '中' is not in the model's vocabulary of 96 "
            r"characters, so a stop string holding it could never match; remove it$",
        ),
        (
            "a",
            {"stop": ("a\u00a0b",)},
            r"^stop\[0\]: character '\\xa0' is not in the model's vocabulary of 96 "
            r"characters; write ' ', which the model reads for it in a prompt$",
        ),
        ("a" * 101, {}, r"prompt has 101 characters; the limit is 100 \(max_chars_per_text\)"),
        ("caf\u4e2d", {}, r"prompt: character '中' is not in the model's vocabulary of 96"),
        ("", {}, r"prompt is empty and there is no text to continue"),
    ]
    for prompt, params, message in cases:
        with pytest.raises(InvalidInput, match=message):
            await chunks(dp, prompt, **params)
    s = await dp.create_session(LM)
    with pytest.raises(InvalidInput, match="prompt is empty and there is no text to continue"):
        await chunks(dp, "", session_id=s.id)


async def test_a_typed_character_the_vocabulary_lacks_reads_as_the_one_it_stands_for(make_dp: MakeDP) -> None:
    """Phones and word processors type curly quotes, long dashes, accented letters and odd spaces. The char LM
    (printable ASCII here) reads each as its plain form, one character for one, so the answer is the plain text's
    and a session's steps still count the characters sent; a character nothing stands for is still refused. With
    ``fold_chars`` off every such character is refused, as before."""
    typed, plain = "Don\u2019t \u2013 caf\u00e9\u00a0\u201cNa\u00efve\u201d \uff21\t", 'Don\'t - cafe "Naive" A '
    assert len(typed) == len(plain) and typed != plain
    dp = await make_dp()
    got, want = await dp.char_step(LM, typed, num_chars=5), await dp.char_step(LM, plain, num_chars=5)
    assert np.array_equal(got.probabilities, want.probabilities) and got.completion == want.completion
    s = await dp.create_session(LM)
    await dp.char_step(LM, typed, session_id=s.id)
    assert (await dp.get_session(s.id)).steps == len(typed)
    for bad in ("\u4e2d", "\U0001f600"):  # a CJK character, an emoji: nothing in the vocabulary stands for them
        with pytest.raises(InvalidInput, match=re.escape(f"character {bad!r} is not in the model's vocabulary")):
            await dp.char_step(LM, f"ok {bad}")
    strict = await make_dp(fold_chars=False)
    for c in ("\u2019", "\u00e9"):
        with pytest.raises(InvalidInput, match=re.escape(f"character {c!r} is not in the model's vocabulary")):
            await strict.char_step(LM, f"a{c}b")
    with pytest.raises(InvalidInput, match=re.escape("character '\\xa0' (U+00A0 NO-BREAK SPACE) is not in the")):
        await strict.char_step(LM, "a\u00a0b")


async def test_a_line_break_of_another_kind_reads_as_the_newline_it_stands_for(make_dp: MakeDP) -> None:
    """Windows and HTML forms break lines with CRLF: its CR was read as a space ("bright!\\r\\n" as "bright! \\n"),
    and so were CR, VT, FF, NEL and the line and paragraph separators alone, so such text completed as another. Each
    now reads as the model's LF, a CRLF as the one LF it is, and a session's steps count the characters read (those
    sent, less one for each CRLF). A model that knows CR reads it as itself."""
    dp = await make_dp()
    plain = "To be,\nor not\n\nto be\n"
    typed = ["To be,\r\nor not\r\n\r\nto be\r\n", "To be,\ror not\u2028\u2029to be\x85"]
    typed.append("To be,\x0bor not\x0c\r\nto be\n")
    want = await dp.char_step(LM, plain, num_chars=5)
    for text in typed:
        got = await dp.char_step(LM, text, num_chars=5)
        assert np.array_equal(got.probabilities, want.probabilities) and got.completion == want.completion
        s = await dp.create_session(LM)
        await dp.char_step(LM, text, session_id=s.id)
        assert (await dp.get_session(s.id)).steps == len(plain)
    strict = await make_dp(fold_chars=False)
    with pytest.raises(InvalidInput, match=re.escape("character '\\r' (U+000D) is not in the model's vocabulary")):
        await strict.char_step(LM, "a\r\nb")
    from service.core.manifest import Tokenizer
    from service.core.tokenizers import Encoder

    assert Encoder(Tokenizer(kind="char", vocab=list("ab\r\n")), fold=True).encode("a\r\nb").tolist() == [0, 2, 3, 1]


async def test_a_character_its_quotes_do_not_show_is_named_with_its_code_point(make_dp: MakeDP) -> None:
    """A decomposed accent (macOS text, some keyboards) or a zero-width space pasted with the text reads as ''
    or nothing in the message: it names the code point, and for a combining mark says to send the text composed."""
    dp = await make_dp()
    with pytest.raises(InvalidInput) as e:
        await dp.char_step(LM, "cafe\u0301")
    assert str(e.value) == (
        "text: character '\u0301' (U+0301 COMBINING ACUTE ACCENT) is not in the model's vocabulary of 96 characters; "
        "remove or replace it; it is a combining mark: send the text composed (Unicode NFC), where an accented letter "
        "is one character"
    )
    await dp.char_step(LM, unicodedata.normalize("NFC", "cafe\u0301"))  # composed, its accent folds away
    with pytest.raises(InvalidInput, match=re.escape("(U+200B ZERO WIDTH SPACE) is not in the model's vocabulary")):
        await dp.char_step(LM, "a\u200bb")
    with pytest.raises(InvalidInput, match=r"an invisible character, often pasted with the text$"):
        await dp.char_step(LM, "a\u200bb")


async def test_the_sentiment_model_reads_typed_apostrophes_as_its_training_text_has_them(make_dp: MakeDP) -> None:
    """SST's text has ASCII apostrophes: a phone's "isn’t" was split as "isn" "’" "t" (the last two unknown) and
    moved the answer. Now it reads as "isn't" does; with ``fold_chars`` off, as it is."""
    typed, plain = "it isn\u2019t good \u2014 it\u2019s dull", "it isn't good -- it's dull"
    dp, strict = await make_dp(), await make_dp(fold_chars=False)
    encoder = dp.registry.resolve(SENT).task.encoder  # type: ignore[attr-defined]
    assert encoder.tokens(typed) == encoder.tokens(plain) == ["it", "is", "n't", "good", "-", "-", "it", "'s", "dull"]
    (got,), (want,) = await dp.classify(SENT, [typed]), await dp.classify(SENT, [plain])
    assert got.probabilities == want.probabilities
    (raw,), (plain_strict,) = await strict.classify(SENT, [typed]), await strict.classify(SENT, [plain])
    assert plain_strict.probabilities == want.probabilities and raw.probabilities != want.probabilities


def test_typed_double_quotes_read_as_the_training_texts_quotes() -> None:
    """SST writes double quotes as `` and '' and its vocabulary has no ": a phone's “superb” was read as " superb ",
    the quotes two unknown words. A vocabulary with " keeps reading them as "."""
    from service.core.manifest import Tokenizer
    from service.core.tokenizers import Encoder

    sst = Encoder(Tokenizer(kind="word", vocab=["<unk>", "`", "'", "superb"], unk_token="<unk>"), fold=True)
    assert sst.tokens("\u201csuperb\u201d") == sst.tokens("``superb''") == ["`", "`", "superb", "'", "'"]
    assert sst.tokens("\u00absuperb\u00bb") == ["`", "`", "superb", "'", "'"]
    assert Encoder(sst.spec, fold=False).tokens("\u201csuperb\u201d") == ["\u201c", "superb", "\u201d"]
    plain = Encoder(Tokenizer(kind="word", vocab=["<unk>", '"', "superb"], unk_token="<unk>"), fold=True)
    assert plain.tokens("\u201csuperb\u201d") == ['"', "superb", '"']
    # An accent typed as a combining mark is the accented letter (it was "cafe" and an unknown mark), and invisible
    # characters are no words (a zero-width space alone got a label; a byte order mark was an unknown word).
    assert sst.tokens("cafe\u0301") == sst.tokens("caf\u00e9") == ["caf\u00e9"]
    assert sst.tokens("\ufeffsuperb\u200b \x01") == ["superb"] and sst.tokens("\u200b") == []
    # A straight " as SST's tokenizer reads it, opening or closing by its place (it was an unknown word, where the
    # curly pair was known); a control character or a zero-width space between words keeps them apart (they were
    # one unknown word, "ab"), while a soft hyphen or a joiner inside one word keeps it whole.
    assert sst.tokens('"superb"') == sst.tokens("\u201csuperb\u201d")
    assert sst.tokens('it is ("superb").') == ["it", "is", "(", "`", "`", "superb", "'", "'", ")", "."]
    assert plain.tokens('"superb"') == ['"', "superb", '"']  # a vocabulary with " keeps it
    assert sst.tokens("a\x01b") == sst.tokens("a\u200bb") == ["a", "b"]
    assert sst.tokens("su\u00adperb") == sst.tokens("su\u200dperb") == ["superb"]


async def test_a_contraction_typed_as_one_word_keeps_its_negation(dp: CoreDataPlane) -> None:
    """SST (the training text) is tokenized as the Penn Treebank does: "does n't", "ca n't", "it 's", "can not". A
    client types "doesn't": it was split "doesn" "'t", two words the model never saw, and the negation was lost (on
    GLUE dev written that way, ``dev_accuracy_written``, sentences with a contraction fell to 0.61); "cannot" was
    one unknown word. They now split as SST does, so both forms get the same answer."""
    from service.core.tokenizers import split_words

    assert split_words("It doesn't, can't, won't; it's") == [
        "it",
        "does",
        "n't",
        ",",
        "ca",
        "n't",
        ",",
        "wo",
        "n't",
        ";",
        "it",
        "'s",
    ]
    assert split_words("I cannot, gonna; pecan nothing") == [
        "i",
        "can",
        "not",
        ",",
        "gon",
        "na",
        ";",
        "pecan",
        "nothing",
    ]
    pairs = [("it isn't good", "it is n't good"), ("i can't stand it", "i ca n't stand it"), ("it's fun", "it 's fun")]
    pairs.append(("i cannot recommend it", "i can not recommend it"))
    got = await dp.classify(SENT, [typed for typed, _ in pairs])
    want = await dp.classify(SENT, [ptb for _, ptb in pairs])
    assert [r.probabilities for r in got] == [r.probabilities for r in want]


def test_the_fold_table_is_bounded() -> None:
    """Distinct unknown characters a client sends are remembered up to ``MAX_FOLDED`` only."""
    from service.core.manifest import Tokenizer
    from service.core.tokenizers import MAX_FOLDED, Encoder

    enc = Encoder(Tokenizer(kind="char", vocab=list("abc -'")), fold=True)
    assert enc.encode("a\u2019b\u2014c").tolist() == [0, 5, 1, 4, 2]
    for cp in range(0x4E00, 0x4E00 + MAX_FOLDED + 100):
        with pytest.raises(InvalidInput):
            enc.encode(chr(cp))
    assert enc._folded is not None and len(enc._folded) == MAX_FOLDED
    words = Encoder(Tokenizer(kind="word", vocab=["<unk>", "a"], unk_token="<unk>"), fold=True)
    assert words.encode("a \u4e2d").tolist() == [1, 0] and not words._folded  # a word model: <unk>, as before
    # A word model's text in SST's own form (``quotes'', "--") reads as without folding; a long dash as "--".
    plain = Encoder(words.spec)
    ptb = "a `` great '' film -- or not ... it 's `fine'"
    assert words.tokens(ptb) == plain.tokens(ptb)
    assert words.tokens("film \u2014 or") == plain.tokens("film -- or") == ["film", "-", "-", "or"]


# --- char LM: suggestions and char_step ------------------------------------------------------------------------


async def logprob_of(dp: CoreDataPlane, session_id: str, continuation: str) -> float:
    """log P(continuation | session) computed one character at a time, on a fork."""
    fork = await dp.fork_session(session_id)
    total = 0.0
    for ch in continuation:
        step = await dp.char_step(LM, "", session_id=fork.id)
        total += math.log(float(step.probabilities[step.vocab.index(ch)]))
        await dp.char_step(LM, ch, session_id=fork.id)
    await dp.delete_session(fork.id)
    return total


async def test_beam_suggestions_are_ranked_with_true_logprobs(dp: CoreDataPlane) -> None:
    s = await dp.create_session(LM)
    result = await dp.suggest(s.id, "The cat sat on the ", n=4, max_chars=5)
    texts = [x.text for x in result.suggestions]
    assert len(texts) == 4 == len(set(texts)) and all(len(t) == 5 for t in texts)
    logprobs = [x.logprob for x in result.suggestions]
    assert logprobs == sorted(logprobs, reverse=True)
    for x in result.suggestions[:2]:
        assert x.logprob == pytest.approx(await logprob_of(dp, s.id, x.text), abs=1e-4)
    assert result.steps == 19


async def test_greedy_suggestions(dp: CoreDataPlane) -> None:
    s = await dp.create_session(LM)
    greedy = (await dp.char_step(LM, "Hello", num_chars=6)).completion
    one = await dp.suggest(s.id, "Hello", n=1, max_chars=6)
    assert [x.text for x in one.suggestions] == [greedy]
    # beam=False: the n most likely first characters, each continued greedily.
    step = await dp.char_step(LM, "", session_id=s.id)
    branches = await dp.suggest(s.id, "", n=3, max_chars=4, beam=False)
    firsts = {step.vocab[i] for i in np.argsort(-step.probabilities)[:3]}
    assert {x.text[0] for x in branches.suggestions} == firsts
    assert branches.suggestions[0].logprob == pytest.approx(
        await logprob_of(dp, s.id, branches.suggestions[0].text), abs=1e-4
    )


async def test_reset_in_suggest_starts_over(dp: CoreDataPlane) -> None:
    s = await dp.create_session(LM)
    await dp.suggest(s.id, "some earlier text")
    fresh = await dp.create_session(LM)
    a = await dp.suggest(s.id, "Hi", reset=True)
    b = await dp.suggest(fresh.id, "Hi")
    assert a.steps == 2 and [x.text for x in a.suggestions] == [x.text for x in b.suggestions]


async def test_suggest_and_char_step_validation(make_dp: MakeDP) -> None:
    dp = await make_dp(max_suggestions=5, max_generate_chars=20, max_chars_per_text=50)
    s = await dp.create_session(LM)
    await dp.char_step(LM, "abc", session_id=s.id)
    for n, max_chars, message in [
        (0, 10, r"n must be between 1 and 5 \(max_suggestions\); got 0"),
        (6, 10, r"n must be between 1 and 5"),
        (3, 0, r"max_chars must be between 1 and 20 \(max_generate_chars\)"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            await dp.suggest(s.id, "d", n=n, max_chars=max_chars)
    with pytest.raises(InvalidInput, match=r"appended has 51 characters; the limit is 50"):
        await dp.suggest(s.id, "d" * 51)
    with pytest.raises(InvalidInput, match=r"appended: character '€'"):
        await dp.suggest(s.id, "ok €", reset=True)
    assert (await dp.get_session(s.id)).steps == 3  # the rejected call changed nothing
    with pytest.raises(InvalidInput, match=r"num_chars must be between 0 and 20"):
        await dp.char_step(LM, "abc", num_chars=21)
    with pytest.raises(InvalidInput, match=r"text is empty and there is no text to continue"):
        await dp.char_step(LM, "")
    with pytest.raises(InvalidInput, match=r"appended is empty while reset is set"):
        await dp.suggest(s.id, "", reset=True)
    assert (await dp.get_session(s.id)).steps == 3
    with pytest.raises(InvalidInput, match=r"appended is empty and there is no text to continue"):
        await dp.suggest((await dp.create_session(LM)).id, "")


async def test_char_step_reports_distribution_and_does_not_advance_with_completion(dp: CoreDataPlane) -> None:
    s = await dp.create_session(LM)
    step = await dp.char_step(LM, "Hello", session_id=s.id, num_chars=8)
    assert step.probabilities.shape == (len(step.vocab),) and step.probabilities.dtype == np.float32
    assert math.isclose(float(step.probabilities.sum()), 1.0, rel_tol=1e-5)
    assert len(step.completion) == 8 and step.steps == 5
    assert (await dp.get_session(s.id)).steps == 5


# --- forecasting -----------------------------------------------------------------------------------------------


def series(rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array([7.9, 2.1, 5.0, 0.7, 3.0, 0.9, 13.3], dtype=np.float32)
    return (base + rng.normal(size=(rows, FEATURES))).astype(np.float32)


async def test_forecast_normalizes_runs_the_window_and_denormalizes(dp: CoreDataPlane) -> None:
    history = series(40)
    result = await dp.forecast(FC, history)
    assert result.point.shape == (HORIZON, FEATURES) and result.quantiles.shape == (3, HORIZON, FEATURES)
    assert result.quantile_levels == [0.1, 0.5, 0.9] and result.rows_seen == 40
    manifest = dp.registry.resolve(FC).manifest
    assert manifest.normalization is not None and result.columns == manifest.normalization.columns
    # The same computation by hand, straight on the runtime.
    mean, std = np.array(manifest.normalization.mean), np.array(manifest.normalization.std)
    runtime = dp.registry.resolve(FC).runtime
    assert runtime is not None
    z = ((history[-WINDOW:] - mean) / std).astype(np.float32)[None]
    point_z = runtime.run({"history": z}, 1)["forecast"][0]
    np.testing.assert_allclose(result.point, point_z * std + mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.quantiles[1], result.point, atol=1e-5)  # the 0.5 offsets are 0
    assert np.all(result.quantiles[0] < result.point) and np.all(result.point < result.quantiles[2])
    # Only the last window rows matter.
    np.testing.assert_allclose((await dp.forecast(FC, history[-WINDOW:])).point, result.point, atol=1e-6)


async def test_forecast_validation(make_dp: MakeDP) -> None:
    dp = await make_dp(max_forecast_rows=100)
    nan = series(30)
    nan[3, 2] = np.nan
    cases = [
        (np.zeros(24, np.float32), r"history must be 2-D \(rows, features\); got shape \[24\]"),
        (np.zeros((30, 5), np.float32), r"history has 5 features per row; model forecaster/1 expects 7"),
        (series(10), r"history has 10 rows; model forecaster/1 needs at least window=24 rows"),
        (series(101), r"history has 101 rows; send 1 to 100 rows \(max_forecast_rows\)"),
        (nan, r"history\[3\]\[2\] \(column 'MUFL'\) is nan; every value must be a finite number"),
    ]
    for history, message in cases:
        with pytest.raises(InvalidInput, match=message):
            await dp.forecast(FC, history)
    s = await dp.create_session(FC)
    with pytest.raises(InvalidInput, match=r"rows has 0 rows; send 1 to 100"):
        await dp.observe(s.id, np.zeros((0, FEATURES), np.float32))
    with pytest.raises(InvalidInput, match=r"rows\[0\]\[0\] \(column 'HUFL'\) is inf"):
        await dp.observe(s.id, np.full((2, FEATURES), np.inf, np.float32))
    assert (await dp.get_session(s.id)).steps == 0


async def test_columns_by_name_in_any_order(dp: CoreDataPlane) -> None:
    """``columns``: the model takes its columns by name (a CSV's header in another order, with extra columns);
    the same rows in the model's order give the same forecast. A missing, repeated or miscounted name is
    INVALID_ARGUMENT, and a session refused that way keeps what it had."""
    manifest = dp.registry.resolve(FC).manifest
    assert manifest.normalization is not None
    model_cols = list(manifest.normalization.columns)
    history = series(30)
    want = await dp.forecast(FC, history)
    order = [6, 2, 0, 5, 1, 4, 3]
    names = [model_cols[i] for i in order] + ["humidity"]
    shuffled = np.concatenate([history[:, order], np.full((30, 1), 55.0, np.float32)], axis=1)
    got = await dp.forecast(FC, shuffled, columns=names)
    assert np.array_equal(got.point, want.point) and np.array_equal(got.quantiles, want.quantiles)
    assert got.columns == want.columns == model_cols
    wrong = await dp.forecast(FC, history[:, order])  # the same values without names: read in the model's order
    assert not np.allclose(wrong.point, want.point)
    s = await dp.create_session(FC)
    observed = await dp.observe(s.id, shuffled, columns=names)
    assert np.array_equal(observed.point, want.point)
    cases = [
        (
            [n.replace("HULL", "Hull") for n in names],
            r"columns lacks 'HULL': model forecaster/1 reads \['HUFL', 'HULL'",
        ),
        ([*names[:-1], "OT"], r"columns names 'OT' more than once"),
        (names[:-1], r"history has 8 values per row but columns names 7"),
    ]
    for cols, message in cases:
        with pytest.raises(InvalidInput, match=message):
            await dp.forecast(FC, shuffled, columns=cols)
    with pytest.raises(InvalidInput, match="columns lacks"):
        await dp.observe(s.id, shuffled, columns=cases[0][0])
    # A bad value is named where the caller sent it (its row and column of ``shuffled``), not at its index in
    # the model's order: OT is the caller's column 0, the model's 6.
    bad = shuffled.copy()
    bad[5, 0] = np.nan
    with pytest.raises(InvalidInput, match=r"^history\[5\]\[0\] \(column 'OT'\) is nan"):
        await dp.forecast(FC, bad, columns=names)
    bad[5, 0], bad[3, 2] = 1.0, 1e30
    with pytest.raises(InvalidInput, match=rf"^history\[3\]\[2\] \(column '{model_cols[0]}'\) is 1.*e\+30: "):
        await dp.forecast(FC, bad, columns=names)
    assert (await dp.get_session(s.id)).steps == 30


async def test_observe_warms_up_then_forecasts_from_the_last_window(dp: CoreDataPlane) -> None:
    history = series(50, seed=1)
    s = await dp.create_session(FC)
    warm = await dp.observe(s.id, history[:10])
    assert warm.point.shape == (0, FEATURES) and warm.quantiles.shape == (3, 0, FEATURES) and warm.rows_seen == 10
    full = await dp.observe(s.id, history[10:30])
    assert full.rows_seen == 30 and full.point.shape == (HORIZON, FEATURES)
    np.testing.assert_allclose(full.point, (await dp.forecast(FC, history[:30])).point, atol=1e-5)
    later = await dp.observe(s.id, history[30:])
    np.testing.assert_allclose(later.point, (await dp.forecast(FC, history)).point, atol=1e-5)
    assert later.rows_seen == 50 and (await dp.get_session(s.id)).steps == 50
    fork = await dp.fork_session(s.id)
    one = await dp.observe(fork.id, history[:1])
    np.testing.assert_allclose(
        one.point, (await dp.forecast(FC, np.concatenate([history, history[:1]]))).point, atol=1e-5
    )


async def test_forecast_session_of_unsupported_state_mode(repo: Path, make_dp: MakeDP) -> None:
    path = repo / "forecaster" / "1" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["forecast"]["state_mode"] = "recurrent"
    path.write_text(json.dumps(manifest))
    dp = await make_dp(models=repo)
    with pytest.raises(FailedPrecondition, match=r"declares forecast\.state_mode='recurrent'; this server supports"):
        await dp.create_session(FC)


async def test_a_forecaster_with_covariates_forecasts_its_targets_only(tmp_path: Path, make_dp: MakeDP) -> None:
    from tests.tiny_models import export_tiny

    export_tiny("forecast", tmp_path, name="ot-only", targets=["OT"])  # 7 input columns, forecasts "OT"
    dp = await make_dp(models=tmp_path)
    model = ModelRef("ot-only")
    history = series(40)
    result = await dp.forecast(model, history)
    assert result.columns == ["OT"]
    assert result.point.shape == (HORIZON, 1) and result.quantiles.shape == (3, HORIZON, 1)
    # De-normalized with OT's own statistics: the same computation by hand on the runtime.
    entry = dp.registry.resolve(model)
    norm = entry.manifest.normalization
    assert norm is not None
    mean, std = np.array(norm.mean, np.float32), np.array(norm.std, np.float32)
    z = ((history[-WINDOW:] - mean) / std).astype(np.float32)[None]
    point_z = entry.runtime.run({"history": z}, 1)["forecast"][0]  # (horizon, 1)
    np.testing.assert_allclose(result.point, point_z * std[-1] + mean[-1], rtol=1e-5, atol=1e-5)
    meta = await dp.model_metadata(model)
    assert [(d.name, d.shape) for d in meta.contract.inputs] == [("HISTORY", (-1, FEATURES)), ("COLUMNS", (FEATURES,))]
    assert [(d.name, d.shape) for d in meta.contract.outputs] == [
        ("FORECAST", (HORIZON, 1)),
        ("QUANTILES", (3, HORIZON, 1)),
    ]
    s = await dp.create_session(model)  # sessions keep every input column and forecast the target
    observed = await dp.observe(s.id, history)
    np.testing.assert_allclose(observed.point, result.point, atol=1e-5)


async def _dist(dp: CoreDataPlane, sid: str, text: str) -> np.ndarray:
    fork = await dp.fork_session(sid)
    step = await dp.char_step(LM, text, session_id=fork.id)
    await dp.delete_session(fork.id)
    return np.log(step.probabilities.astype(np.float64))


@pytest.mark.parametrize("prompt", ["The cat sat on the ", "Hello wor", "abc"])
async def test_beam_search_of_two_characters_is_exact(dp: CoreDataPlane, prompt: str) -> None:
    n = 3
    s = await dp.create_session(LM)
    await dp.char_step(LM, prompt, session_id=s.id)
    vocab = (await dp.char_step(LM, "", session_id=s.id)).vocab
    first = await _dist(dp, s.id, "")
    cands = []
    for i in np.argsort(-first, kind="stable")[:n]:
        second = await _dist(dp, s.id, vocab[i])
        cands += [(first[i] + second[j], vocab[i] + vocab[j]) for j in range(len(vocab))]
    best = [t for _, t in sorted(cands, key=lambda c: -c[0])[:n]]
    got = await dp.suggest(s.id, "", n=n, max_chars=2, beam=True)
    assert [x.text for x in got.suggestions] == best


async def test_greedy_branches_are_ranked_by_logprob(dp: CoreDataPlane) -> None:
    for prompt in ["The cat sat on the ", "Hello wor", "abc", "q", "zz top"]:
        s = await dp.create_session(LM)
        got = await dp.suggest(s.id, prompt, n=10, max_chars=8, beam=False)
        lp = [x.logprob for x in got.suggestions]
        assert lp == sorted(lp, reverse=True), (prompt, lp)


async def test_a_failed_first_step_keeps_the_prompt_in_the_session(
    dp: CoreDataPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = dp.registry.resolve(LM).task

    async def boom(state, ids):  # type: ignore[no-untyped-def]
        raise RuntimeError("step failed")

    s = await dp.create_session(LM)
    monkeypatch.setattr(task, "step_rows", boom)
    with pytest.raises(RuntimeError):
        async for _ in dp.complete(LM, "Hello", SamplingParams(max_chars=5), s.id):
            pass
    assert (await dp.get_session(s.id)).steps == 5


async def test_sampling_limits_are_inclusive(dp: CoreDataPlane) -> None:
    """The documented limits are the largest values accepted: 8 stop strings of 64 characters each, and any seed
    up to 2**63 - 1 (the proto's int64: it was 2**64 - 1, which no call could send); one more is refused naming the
    field."""
    out = await chunks(dp, "Hello", max_chars=3, temperature=0.0, stop=tuple(f"{i}" * 64 for i in range(8)))
    assert out[-1].finish_reason == "length"
    assert len(await text(dp, "Hello", max_chars=3, seed=2**63 - 1)) == 3
    with pytest.raises(InvalidInput, match=r"^seed must be between 0 and 9223372036854775807; got 9223372036854775808"):
        await chunks(dp, "Hello", max_chars=3, seed=2**63)
    with pytest.raises(InvalidInput, match=r"stop\[0\] must have 1 to 64 characters; got 65"):
        await chunks(dp, "Hello", max_chars=3, stop=("x" * 65,))
    with pytest.raises(InvalidInput, match="seed"):
        await chunks(dp, "Hello", max_chars=3, seed=2**64)


async def test_a_request_refused_before_any_model_run_counts_as_failed_only(dp: CoreDataPlane) -> None:
    """Triton's statistics: a request that fails before running the model adds to fail, never to queue or
    compute (their count is of requests that ran; perf_analyzer divides their time by it)."""
    (before,) = await dp.statistics(LM)
    with pytest.raises(InvalidInput, match="no text to continue"):
        await chunks(dp, "", max_chars=3)
    (after,) = await dp.statistics(LM)
    assert after.fail.count == before.fail.count + 1
    assert (after.queue.count, after.compute_infer.count) == (before.queue.count, before.compute_infer.count)


async def test_a_request_that_ran_the_model_and_failed_counts_in_fail_alone(dp: CoreDataPlane) -> None:
    """Triton's statistics: queue and compute hold successful requests only (its UpdateFailure adds to fail and
    nothing else); a failed request's runs still count as executions and in batch_stats. Before, a generation
    whose client went away after its first character added its runs' time to queue and compute, and a deadline
    that passed during a sentiment batch made compute_infer exceed the requests' own time."""
    (before,) = await dp.statistics(LM)
    stream = dp.complete(LM, "Hello", SamplingParams(max_chars=20, temperature=0.0))
    async with contextlib.aclosing(stream):
        async for _ in stream:
            break  # the client went away after the first character: the request failed after running the model
    (after,) = await dp.statistics(LM)
    assert (after.fail.count, after.success.count) == (before.fail.count + 1, before.success.count)
    assert after.execution_count > before.execution_count
    assert sum(b.compute_infer.count for b in after.batches) > sum(b.compute_infer.count for b in before.batches)
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(after, part) == getattr(before, part), part
    assert len(await text(dp, "Hello", max_chars=3)) == 3  # a successful one: counted once, with its runs' time
    (done,) = await dp.statistics(LM)
    assert (done.queue.count, done.compute_infer.count) == (after.queue.count + 1, after.compute_infer.count + 1)
    assert done.compute_infer.ns > after.compute_infer.ns and done.queue.ns >= after.queue.ns


async def test_rows_seen_counts_every_observed_row_while_warming_up(dp: CoreDataPlane) -> None:
    """While a forecast session warms up, rows_seen is the total it holds (the caller learns how many more rows
    the window needs), not the size of the last Observe."""
    history = series(20, seed=2)
    s = await dp.create_session(FC)
    assert (await dp.observe(s.id, history[:5])).rows_seen == 5
    second = await dp.observe(s.id, history[5:12])
    assert second.point.shape == (0, FEATURES) and second.rows_seen == 12


async def test_a_step_that_runs_no_model_counts_in_queue_as_every_success(dp: CoreDataPlane) -> None:
    """Triton counts every successful request in queue (perf_analyzer finds the version it measures by the queue
    count that grew, and compares it with the success count): a forecast step still filling its window runs no
    model and counted in success alone, so perf_analyzer's breakdown of such a sequence did not add up. Now in
    queue with no time, and not in compute."""
    (before,) = await dp.statistics(FC)
    s = await dp.create_session(FC)
    assert (await dp.observe(s.id, series(5, seed=3))).point.shape == (0, FEATURES)  # the window is not full
    (after,) = await dp.statistics(FC)
    assert after.success.count - before.success.count == 1
    assert after.queue == Duration(before.queue.count + 1, before.queue.ns)
    assert (after.compute_infer, after.execution_count) == (before.compute_infer, before.execution_count)


async def test_a_near_zero_temperature_samples_the_greedy_text(dp: CoreDataPlane) -> None:
    """temperature divides the logits: as it goes to 0 sampling becomes greedy whatever the seed (a temperature
    that were ignored would sample the untrained model's near-uniform distribution)."""
    greedy = (await dp.char_step(LM, "Hello", num_chars=15)).completion
    assert {await text(dp, "Hello", max_chars=15, temperature=1e-4, seed=s) for s in range(5)} == {greedy}
