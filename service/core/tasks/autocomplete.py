"""Character language model: advance a state by text, sample, stream completions, suggest continuations.

A ``Cursor`` is where a char LM stands: its recurrent state (graph input name -> ``[layers, rows, hidden]``),
the logits of the next character ``(vocab,)`` and the characters consumed. A ``Session`` has the same three
attributes, so the functions below advance a session in place (the caller holds its lock). Text is fed once:
advancing by ``appended`` costs O(len(appended)), never O(prefix).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.core.batching import StepInput
from service.core.runtime import Array
from service.core.tasks.common import F64, Served, check_float, check_int, check_text, log_softmax, softmax
from service.core.types import CharStep, CompletionChunk, FloatArray, SamplingParams, Suggestion
from service.errors import InvalidInput
from service.settings import Settings

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
MAX_TEMPERATURE = 100.0


class CharCursor(Protocol):
    state: dict[str, Array]
    logits: FloatArray | None
    steps: int


@dataclass
class Cursor:
    """A throw-away cursor for stateless calls (starts from the zero state)."""

    state: dict[str, Array]
    logits: FloatArray | None = None
    steps: int = 0


def fresh_cursor(m: Served) -> Cursor:
    return Cursor(state=m.runtime.zero_states(1))


def validate_params(p: SamplingParams, settings: Settings, vocab: int) -> None:
    check_int(p.max_chars, "max_chars", 1, settings.max_generate_chars, " (max_generate_chars)")
    check_float(p.temperature, "temperature", 0.0, MAX_TEMPERATURE)
    check_int(p.top_k, "top_k", 0, vocab, f" (0 = no cut; the vocabulary has {vocab} characters)")
    if len(p.stop) > MAX_STOP_STRINGS:
        raise InvalidInput(f"stop has {len(p.stop)} strings; the limit is {MAX_STOP_STRINGS}")
    for i, s in enumerate(p.stop):
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise InvalidInput(f"stop[{i}] must have 1 to {MAX_STOP_CHARS} characters; got {len(s)}")


async def step_rows(m: Served, state: dict[str, Array], ids: np.ndarray) -> tuple[dict[str, Array], FloatArray]:
    """Feeds ``ids`` (rows, time) with ``state`` (axis 1 = rows); returns the new state and the last logits
    (rows, vocab). Requests with equal time length merge in the batcher (every generation step is length 1)."""
    rows, time = ids.shape
    out = await m.batcher.submit(StepInput(inputs={"input_ids": ids}, rows=rows, states=state, key=("step", time)))
    logits: FloatArray = out.outputs["logits"][:, -1, :]  # (rows, vocab)
    return out.states, logits


async def advance(m: Served, cur: CharCursor, text: str, field: str) -> None:
    """Consumes ``text`` (one ORT run over all its characters) and updates the cursor in place."""
    assert m.encoder is not None
    await advance_ids(m, cur, m.encoder.encode(text, field=field))


async def advance_ids(m: Served, cur: CharCursor, ids: np.ndarray) -> None:
    """``advance`` for already-encoded text: ``ids`` (time,) int64."""
    if ids.size == 0:
        return
    cur.state, logits = await step_rows(m, cur.state, ids[None, :])  # (1, time)
    cur.logits = logits[0]
    cur.steps += ids.shape[0]


def _need_logits(cur: CharCursor, field: str) -> FloatArray:
    if cur.logits is None:
        raise InvalidInput(
            f"{field} is empty and there is no text to continue (the session, if any, has consumed none); "
            "send at least one character"
        )
    return cur.logits


def sample(logits: FloatArray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """temperature 0 = greedy (argmax); otherwise softmax(logits / T) over the top_k ids (0 = all)."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < len(z):
        keep = np.argpartition(z, -top_k)[-top_k:]
        masked = np.full_like(z, -np.inf)
        masked[keep] = z[keep]
        z = masked
    p = softmax(z)
    return int(rng.choice(len(p), p=p))


async def complete(
    m: Served, cur: CharCursor, prompt: str, params: SamplingParams, settings: Settings, keep_state: bool
) -> AsyncGenerator[CompletionChunk, None]:
    """Streams one chunk per generated character; the last chunk carries ``finish_reason`` ("length" or
    "stop"; a matched stop string is included in the text, as the proto says).

    The cursor consumes the prompt, then every generated character *before* that character is yielded, so
    when the consumer stops early (cancellation, ``aclose``) the cursor holds exactly the text it received.
    ``keep_state=False`` (stateless calls) skips the final step nobody needs.
    """
    assert m.encoder is not None
    vocab = m.encoder.vocab
    validate_params(params, settings, len(vocab))
    check_text(prompt, "prompt", settings.max_chars_per_text, allow_empty=True)
    await advance(m, cur, prompt, "prompt")
    _need_logits(cur, "prompt")
    rng = np.random.default_rng(params.seed)
    generated = ""
    for i in range(params.max_chars):
        assert cur.logits is not None
        idx = sample(cur.logits, params.temperature, params.top_k, rng)
        generated += vocab[idx]
        stopped = any(generated.endswith(s) for s in params.stop)
        last = stopped or i == params.max_chars - 1
        if keep_state or not last:
            cur.state, logits = await step_rows(m, cur.state, np.array([[idx]], dtype=np.int64))
            cur.logits = logits[0]
            cur.steps += 1
        if last:
            yield CompletionChunk(vocab[idx], "stop" if stopped else "length")
            return
        yield CompletionChunk(vocab[idx])


def _take(state: dict[str, Array], rows: np.ndarray) -> dict[str, Array]:
    """Selects batch rows (axis 1) of every state: beams inherit their parent's state."""
    return {k: np.take(v, rows, axis=1) for k, v in state.items()}


async def suggest(m: Served, cur: CharCursor, n: int, max_chars: int, beam: bool) -> list[Suggestion]:
    """The ``n`` most likely continuations of ``max_chars`` characters, without advancing ``cur``.

    beam=True: beam search of width ``n`` (n=1 is greedy). beam=False: the ``n`` most likely next characters,
    each continued greedily. All candidates advance together as one batch of ``n`` rows per character.
    """
    assert m.encoder is not None
    vocab = m.encoder.vocab
    logp: F64 = log_softmax(_need_logits(cur, "appended"))[None, :]  # (1, vocab)
    state = cur.state  # rows = 1 for now; never mutated (np.take copies)
    texts, scores = [""], np.zeros(1)
    for t in range(max_chars):
        if beam or t == 0:
            total = (scores[:, None] + logp).ravel()  # (rows*vocab,) score of every one-char extension
            best = np.argsort(-total, kind="stable")[:n]
            parents, chars = best // len(vocab), best % len(vocab)
            scores = total[best]
        else:  # greedy continuation of each row
            parents = np.arange(len(texts))
            chars = logp.argmax(axis=1)
            scores = scores + logp[parents, chars]
        texts = [texts[p] + vocab[c] for p, c in zip(parents, chars, strict=True)]
        if t == max_chars - 1:
            break
        state, logits = await step_rows(m, _take(state, parents), chars.astype(np.int64)[:, None])
        logp = log_softmax(logits)  # (rows, vocab)
    order = np.argsort(-scores, kind="stable")
    return [Suggestion(text=texts[i], logprob=float(scores[i])) for i in order]


async def greedy(m: Served, cur: CharCursor, num_chars: int) -> str:
    """Greedy continuation of ``num_chars`` characters that leaves ``cur`` untouched."""
    if num_chars == 0:
        return ""
    return (await suggest(m, cur, 1, num_chars, beam=False))[0].text


async def char_step(m: Served, cur: CharCursor, text: str, num_chars: int, settings: Settings) -> CharStep:
    """Appends ``text`` to ``cur``; returns the next-character distribution and a greedy completion."""
    assert m.encoder is not None
    check_int(num_chars, "num_chars", 0, settings.max_generate_chars, " (max_generate_chars)")
    check_text(text, "text", settings.max_chars_per_text, allow_empty=True)
    await advance(m, cur, text, "text")
    probs = softmax(_need_logits(cur, "text")).astype(np.float32)  # (vocab,)
    completion = await greedy(m, cur, num_chars)
    return CharStep(probabilities=probs, vocab=list(m.encoder.vocab), completion=completion, steps=cur.steps)
