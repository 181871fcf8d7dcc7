"""Character language model (many-to-many): advance a state by text, sample, stream completions, suggest.

A ``Cursor`` is where the model stands: its recurrent state (graph input name -> ``[layers, rows, hidden]``),
the logits of the next character ``(vocab,)`` and the characters consumed. A session stores the same three
(the logits as its context), so a session call reads a cursor from it and writes the cursor back at every
consistent point. Text is fed once: advancing by ``appended`` costs O(len(appended)), never O(prefix).

v2 contract: TEXT BYTES [1], NUM_CHARS INT32 [1] (optional), BACKSPACE INT32 [1] (optional: characters a
sequence takes back before TEXT, ``undo.py``) -> NEXT_CHAR_PROBS FP32 [vocab], VOCAB BYTES [vocab], COMPLETION
BYTES [1]; with a sequence, TEXT advances the sequence's state.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Container
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import numpy as np
import numpy.typing as npt

from service.core.arrays import F64, I64, log_softmax, sample, softmax
from service.core.batching import StepInput, StepOutput
from service.core.context import admitted, mark_admitted, principal
from service.core.manifest import Manifest
from service.core.sessions.state import SessionState
from service.core.tasks import undo
from service.core.tasks.base import (
    Array,
    ModelHandle,
    Task,
    TaskResult,
    bytes_tensor,
    check_float,
    check_int,
    check_text,
    fp32_tensor,
    register_task,
    utf8_items,
)
from service.core.tokenizers import Encoder, fold_char
from service.core.types import (
    CharStep,
    CompletionChunk,
    FloatArray,
    SamplingParams,
    Suggestion,
    SuggestResult,
    Tensor,
    TensorContract,
    TensorDef,
)
from service.errors import FailedPrecondition, InvalidInput
from service.settings import Settings

if TYPE_CHECKING:
    from service.core.prefixes import PrefixCache
    from service.core.runtime import Runtime

log = logging.getLogger(__name__)
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63 - 1  # what the API's int64 seed carries


@dataclass
class Cursor:
    state: dict[str, Array]
    logits: FloatArray | None = None
    steps: int = 0
    probs: npt.NDArray[np.float32] | None = None  # softmax(logits) as float32, when the batch computed it
    undo: undo.Undo | None = None  # checkpoints and recent characters, for backspace (UNDO_CHARS > 0)

    @classmethod
    def of(cls, s: SessionState, undo_chars: int = 0) -> Cursor:
        logits = s.context.get("logits")
        kept = None if not undo_chars else undo.Undo.load(undo_chars, s.context, s.steps, s.state, logits)
        return cls(state=s.state, logits=logits, steps=s.steps, undo=kept)

    def commit(self, s: SessionState) -> None:
        s.state, s.steps = self.state, self.steps
        s.context = {} if self.logits is None else {"logits": self.logits}
        if self.undo is not None:
            s.context |= self.undo.context(self.steps)


# The largest change in a next-character probability that feeding a probe text in two runs may make (``inspect``):
# rounding does far less (``charlm-int8/1``, activations quantized per run: 0.002), a manifest whose states wire
# each graph output to the other's input far more (0.32-0.61 on the committed char LMs).
BROKEN_STATE_GAP = 0.05
PROBS = "next_char_probs"  # derived per batch (Batcher.derive) when a step asks: softmax of the last logits, float32


def _probabilities(outputs: dict[str, Array]) -> dict[str, Array]:
    """Every row's next-character distribution in one softmax per batch (row for row the same numbers as one
    softmax per request: float64, then float32)."""
    return {PROBS: softmax(outputs["logits"][:, -1, :]).astype(np.float32)}  # (rows, vocab)


def _unfed(session: SessionState) -> bool:
    """A session that has consumed nothing: no steps, no logits, every state value zero (a new session, or one
    whose text was all refused); feeding it is feeding a text without a session."""
    return session.steps == 0 and not session.context and not any(np.any(v) for v in session.state.values())


def _one_int(inputs: dict[str, Tensor], name: str) -> int:
    """An optional one-element integer input's value; 0 when it was not sent."""
    array = inputs[name].array if name in inputs else None
    return 0 if array is None else int(array.reshape(-1)[0])


def _take(state: dict[str, Array], rows: I64) -> dict[str, Array]:
    """Selects batch rows (axis 1) of every state: beams inherit their parent's state."""
    return {k: np.take(v, rows, axis=1) for k, v in state.items()}


@register_task
class CharLMTask(Task):
    name = "charlm"
    stateful = True

    @classmethod
    def check(cls, manifest: Manifest) -> None:
        if manifest.tokenizer is None:
            raise ValueError("a 'charlm' model needs a tokenizer section in manifest.json")
        if not manifest.has_input("input_ids") or "logits" not in {t.name for t in manifest.outputs}:
            raise ValueError("a 'charlm' model must declare input 'input_ids' and output 'logits' in manifest.json")
        last = manifest.output("logits").shape[-1]
        if isinstance(last, int) and last != len(manifest.tokenizer.vocab):
            raise ValueError(
                f"logits have {last} classes but the tokenizer vocab has {len(manifest.tokenizer.vocab)} entries"
            )

    def __init__(self, model: ModelHandle, settings: Settings) -> None:
        super().__init__(model, settings)
        assert model.manifest.tokenizer is not None  # check() ran at load
        self.encoder = Encoder(model.manifest.tokenizer, fold=settings.fold_chars)
        self.vocab = self.encoder.vocab
        self._vocab_tensor = bytes_tensor("VOCAB", list(self.vocab))  # the same every call: built (and encoded) once
        model.batcher.derive = _probabilities
        self.cuts_exactly = bool(model.facts.get("cuts_exactly"))  # (inspect, at load)
        if self.prefix_cached:
            model.metrics.prefix_cache_model(model.name)

    @property
    def prefix_cached(self) -> bool:
        cache = self.model.prefixes
        return self.cuts_exactly and cache is not None and cache.enabled

    @classmethod
    def warmup_input(cls, manifest: Manifest, rows: int) -> dict[str, I64]:
        """Eight characters of the vocabulary in each row."""
        assert manifest.tokenizer is not None  # check() ran first
        return {"input_ids": np.tile(np.arange(8, dtype=np.int64) % len(manifest.tokenizer.vocab), (rows, 1))}

    @classmethod
    def inspect(cls, manifest: Manifest, runtime: Runtime) -> dict[str, object]:
        """``cuts_exactly``: whether this graph's answer after a text is the same bits fed in one run or in two
        pieces, on a probe text: float32 recurrent kernels step by step (yes), activations quantized per run (no:
        ``charlm-int8/1``). Only then may the prefix cache (``_start``) serve the model: a hit must never change
        an answer."""
        assert manifest.tokenizer is not None  # check() ran first
        ids = np.random.default_rng(0).integers(0, len(manifest.tokenizer.vocab), size=(1, 48)).astype(np.int64)
        whole = runtime.run({"input_ids": ids}, 1)
        first = runtime.run({"input_ids": ids[:, :29]}, 1)
        rest = runtime.run({"input_ids": ids[:, 29:], **{s.input: first[s.output] for s in runtime.states}}, 1)
        pairs = {"logits": (whole["logits"][:, -1], rest["logits"][:, -1])}
        pairs |= {s.output: (whole[s.output], rest[s.output]) for s in runtime.states}
        gaps = {name: float(np.max(np.abs(a - b))) for name, (a, b) in pairs.items()}
        # The state check: the last character alone on the state of the 47 before it (the state's effect is
        # largest right after the cut), against the whole text.
        head = runtime.run({"input_ids": ids[:, :47]}, 1)
        last = runtime.run({"input_ids": ids[:, 47:], **{s.input: head[s.output] for s in runtime.states}}, 1)
        moved = float(np.max(np.abs(softmax(whole["logits"][:, -1]) - softmax(last["logits"][:, -1]))))
        if moved > BROKEN_STATE_GAP:
            raise ValueError(
                f"its next-character probabilities after a text fed in two runs, the first run's state outputs fed "
                f"back as state inputs, differ from the whole text's by up to {moved:.3f}: its state does not carry "
                "the text (rounding differs by under 0.01), so every sequence step would answer wrongly; "
                "check that the manifest's states wire each graph state output to its own input (states[].input "
                "and .output) and re-export if the graph is at fault"
            )
        if any(gaps.values()):
            log.info(
                "%s/%d: no prefix cache: its answer after a text depends on how the text is cut (largest change %s)",
                manifest.name,
                manifest.version,
                max(gaps.items(), key=lambda kv: kv[1]),
            )
        return {"cuts_exactly": not any(gaps.values())}

    def session_nbytes(self) -> int:
        kept = undo.nbytes(self.settings.undo_chars, self.initial_state(), len(self.vocab))  # (0 when off)
        return super().session_nbytes() + 4 * len(self.vocab) + kept  # + next-character logits, float32

    def context_shapes(self) -> dict[str, tuple[Container[int], ...]]:
        v = len(self.vocab)
        return {"logits": ({v},)} | undo.context_shapes(self.initial_state(), v)

    def contract(self) -> TensorContract:
        v = len(self.vocab)
        return TensorContract(
            inputs=(
                TensorDef("TEXT", "BYTES", (1,)),
                TensorDef("NUM_CHARS", "INT32", (1,), optional=True, also_accepts=("INT64",)),
                TensorDef("BACKSPACE", "INT32", (1,), optional=True, also_accepts=("INT64",)),
            ),
            outputs=(
                TensorDef("NEXT_CHAR_PROBS", "FP32", (v,), labels=tuple(self.vocab)),
                TensorDef("VOCAB", "BYTES", (v,)),
                TensorDef("COMPLETION", "BYTES", (1,)),
            ),
            sequences=True,
        )

    async def infer(self, inputs: dict[str, Tensor], session: SessionState | None) -> TaskResult:
        (text,) = utf8_items(inputs["TEXT"])
        num_chars, back = (_one_int(inputs, name) for name in ("NUM_CHARS", "BACKSPACE"))
        if back and session is None:
            raise InvalidInput("input BACKSPACE takes characters back from a sequence: send it with a sequence_id")
        step = await self._char_step(session, text, num_chars, "input TEXT", "input NUM_CHARS", back)
        if step.completion:  # (our API's calls are counted by the data plane; a KServe completion here)
            self.model.metrics.chars_generated(self.model.name, len(step.completion))
        outputs = {
            "NEXT_CHAR_PROBS": fp32_tensor("NEXT_CHAR_PROBS", step.probabilities),  # (vocab,)
            "VOCAB": self._vocab_tensor,
            "COMPLETION": bytes_tensor("COMPLETION", [step.completion]),
        }
        return TaskResult(outputs, inferences=1, steps=step.steps)

    # --- steps ----------------------------------------------------------------------------------------
    async def _start(
        self,
        session: SessionState | None,
        ids: I64,
        probs: bool = False,
        reset: bool = False,
        back: int = 0,
        back_field: str = "backspace",
    ) -> Cursor:
        """The cursor after ``ids``: fed from the session's state (``back`` characters before its end, see
        ``_taken_back``), or, without one or from a session that starts from nothing (new, or ``reset``), from the
        longest beginning of ``ids`` that the prefix cache has (``service/core/prefixes.py``; the answer is the
        same either way)."""
        cache, every = self.model.prefixes, self.settings.undo_chars
        if session is not None and back:
            cur = await self._taken_back(session, back, back_field)
        elif session is not None and not reset and not _unfed(session):
            cur = Cursor.of(session, every)
        elif session is not None and every:  # from nothing, keeping checkpoints (not through the prefix cache)
            cur = Cursor(state=self.initial_state())
            cur.undo = undo.Undo.start(every, 0, cur.state, None)
        elif cache is not None and self.prefix_cached and ids.size:
            return await self._from_cache(cache, ids, probs)
        else:
            cur = Cursor(state=self.initial_state())
        await self.advance(cur, ids, probs)
        return cur

    async def _from_cache(self, cache: PrefixCache, ids: I64, probs: bool) -> Cursor:
        """Feeds ``ids`` from the longest beginning the cache has, keeping the states it passes (at each checkpoint
        and at the end); counts the lookup in the metrics."""
        m = self.model
        keys = cache.keys((m.prefix_scope, principal()), ids)
        found, hit = cache.lookup(keys)
        cur = Cursor(state=self.initial_state()) if hit is None else Cursor(dict(hit.state), hit.logits, found)
        if found == len(ids):
            m.metrics.prefix_lookup(m.name, "hit", found)
            return cur
        start, evicted = found, 0
        for end in keys.segments(found):  # cut at each checkpoint, so that those states are kept too
            await self.advance(cur, ids[start:end], probs and end == len(ids))
            assert cur.logits is not None  # advance fed at least one id
            evicted += cache.store(keys, end, cur.state, cur.logits)
            start = end
        m.metrics.prefix_lookup(m.name, "partial" if found else "miss", found)
        m.metrics.prefix_cache_usage(cache.bytes, len(cache), evicted)
        return cur

    async def step_rows(self, state: dict[str, Array], ids: I64) -> tuple[dict[str, Array], FloatArray]:
        """Feeds ``ids`` (rows, time) with ``state`` (axis 1 = rows); returns the new state and the last logits
        (rows, vocab). Requests with equal time length merge in the batcher (every generation step is length 1).
        Admission happens once per call: the first step may be refused (queue full), the later ones of the same
        call (a Complete stream, a Suggest stream's events, beam steps) are not."""
        out = await self._submit(state, ids)
        logits: FloatArray = out.outputs["logits"][:, -1, :]  # (rows, vocab)
        return out.states, logits

    async def _submit(self, state: dict[str, Array], ids: I64, probs: bool = False) -> StepOutput:
        rows, time = ids.shape
        step = StepInput(
            inputs={"input_ids": ids}, rows=rows, states=state, key=("step", time), admitted=admitted(), derive=probs
        )
        out = await self.model.batcher.submit(step)
        mark_admitted()  # the call's first step was queued: its later steps (a stream's) are never refused
        return out

    async def advance(self, cur: Cursor, ids: I64, probs: bool = False) -> None:
        """Consumes ``ids`` (time,) in one ORT run and moves the cursor (only once the run succeeded); ``probs``:
        the batch also computes the next-character probabilities (``cur.probs``). A cursor keeping undo
        checkpoints is cut at the ones the text crosses (at most three runs)."""
        if ids.size == 0:
            return
        kept = cur.undo
        if kept is None:
            return await self._run(cur, ids, probs)
        points, done = kept.cuts(cur.steps, ids.size), 0
        for cut in [*points, ids.size]:
            if cut == done:  # (the text ends at a checkpoint: marked already)
                continue
            await self._run(cur, ids[done:cut], probs and cut == ids.size)
            kept.stepped(ids[done:cut], cur.steps, cur.state, cur.logits)
            done = cut

    async def _run(self, cur: Cursor, ids: I64, probs: bool) -> None:
        out = await self._submit(cur.state, ids[None, :], probs)  # (1, time)
        cur.state, cur.logits, cur.steps = out.states, out.outputs["logits"][0, -1, :], cur.steps + ids.shape[0]
        derived = out.outputs.get(PROBS)
        cur.probs = None if derived is None else derived[0]

    @staticmethod
    def _need_logits(cur: Cursor, field: str) -> FloatArray:
        if cur.logits is None:
            raise InvalidInput(
                f"{field} is empty and there is no text to continue (the session, if any, has consumed none); "
                "send at least one character"
            )
        return cur.logits

    def _check_params(self, p: SamplingParams) -> None:
        check_int(p.max_chars, "max_chars", 1, self.settings.max_generate_chars, " (max_generate_chars)")
        check_float(p.temperature, "temperature", 0.0, MAX_TEMPERATURE)
        v = len(self.vocab)
        check_int(p.top_k, "top_k", 0, v, f" (0 = no cut; the vocabulary has {v} characters)")
        if p.seed is not None:
            check_int(p.seed, "seed", 0, MAX_SEED)
        if len(p.stop) > MAX_STOP_STRINGS:
            raise InvalidInput(f"stop has {len(p.stop)} strings; the limit is {MAX_STOP_STRINGS}")
        known = self.encoder.index
        for i, s in enumerate(p.stop):
            if not 1 <= len(s) <= MAX_STOP_CHARS:
                raise InvalidInput(f"stop[{i}] must have 1 to {MAX_STOP_CHARS} characters; got {len(s)}")
            unknown = next((c for c in s if c not in known), None)
            if unknown is not None:  # the model never writes it: the stop string could never match
                raise InvalidInput(f"stop[{i}]: {self._unwritten(unknown)}")

    def _unwritten(self, c: str) -> str:
        """Why a stop string cannot hold ``c``, a character outside the vocabulary, and what to write instead."""
        stand_in = fold_char(c, self.encoder.index) if self.settings.fold_chars else None
        hint = (
            f"; write {self.vocab[stand_in]!r}, which the model reads for it in a prompt"
            if stand_in is not None
            else ", so a stop string holding it could never match; remove it"
        )
        return f"character {c!r} is not in the model's vocabulary of {len(self.vocab)} characters{hint}"

    # --- Generator capability ---------------------------------------------------------------------------
    async def complete(
        self, session: SessionState | None, prompt: str, params: SamplingParams
    ) -> AsyncGenerator[CompletionChunk, None]:
        """Streams one chunk per generated character; the last chunk carries ``finish_reason`` ("length" or
        "stop"; a matched stop string is included in the text, as the proto says).

        The cursor consumes the prompt, then every generated character *before* that character is yielded,
        and the session is written after every step, so when the consumer stops early (cancellation) the
        session holds exactly the text that was yielded. Each chunk carries the session's step count with it in
        (``steps``): a client that cancelled compares it with ``Sessions.Get`` to learn how many characters
        were sent that it never received (gRPC cannot say what reached the client). Without a session the
        final step nobody needs is skipped.
        """
        self._check_params(params)
        check_text(prompt, "prompt", self.settings.max_chars_per_text, allow_empty=True)
        ids = self.encoder.encode(prompt, field="prompt")
        cur = await self._start(session, ids)
        logits = self._need_logits(cur, "prompt")
        if session is not None:
            cur.commit(session)
        rng = np.random.default_rng(params.seed)
        generated = ""
        for i in range(params.max_chars):
            idx = sample(logits, params.temperature, params.top_k, rng)
            generated += self.vocab[idx]
            stopped = any(generated.endswith(s) for s in params.stop)
            last = stopped or i == params.max_chars - 1
            if session is not None or not last:
                cur.state, step_logits = await self.step_rows(cur.state, np.array([[idx]], dtype=np.int64))
                logits = cur.logits = step_logits[0]
                cur.steps += 1
                if cur.undo is not None:
                    cur.undo.stepped(np.array([idx]), cur.steps, cur.state, cur.logits)
                if session is not None:
                    cur.commit(session)
            steps = cur.steps if session is not None else 0
            if last:
                yield CompletionChunk(self.vocab[idx], "stop" if stopped else "length", steps)
                return
            yield CompletionChunk(self.vocab[idx], steps=steps)

    async def suggest(
        self, session: SessionState, appended: str, reset: bool, n: int, max_chars: int, beam: bool, backspace: int = 0
    ) -> SuggestResult:
        check_int(n, "n", 1, self.settings.max_suggestions, " (max_suggestions)")
        check_int(max_chars, "max_chars", 1, self.settings.max_generate_chars, " (max_generate_chars)")
        check_text(appended, "appended", self.settings.max_chars_per_text, allow_empty=True)
        if backspace > 0 and not self.settings.undo_chars:  # (before the range check: on an empty session that
            self._no_undo("backspace")  # said "between 0 and 0", naming no setting; a negative one is the range's)
        check_int(backspace, "backspace", 0, session.steps, " (the characters the session holds)")
        if reset and not appended:
            raise InvalidInput("appended is empty while reset is set: after a reset there is no text to continue")
        if reset and backspace:
            raise InvalidInput("backspace and reset both set: a reset replaces the whole text; send one of them")
        ids = self.encoder.encode(appended, field="appended")  # bad characters fail before the session changes
        cur = await self._start(session, ids, reset=reset, back=backspace)
        self._need_logits(cur, "appended")  # (nothing to continue: refused before the session changes)
        cur.commit(session)
        return SuggestResult(suggestions=await self._suggest(cur, n, max_chars, beam, "appended"), steps=cur.steps)

    @staticmethod
    def _no_undo(field: str) -> NoReturn:
        raise FailedPrecondition(
            f"{field} needs this server to keep characters for it (SEQSERVE_UNDO_CHARS > 0, off here); reset "
            "the session with the text instead"
        )

    async def _taken_back(self, session: SessionState, back: int, field: str) -> Cursor:
        """The cursor ``back`` characters before the session's end: from the newest checkpoint at or before that
        point, fed the kept characters up to it (``undo.Undo.rewind``); the session itself is not changed."""
        if not self.settings.undo_chars:
            self._no_undo(field)
        cur = Cursor.of(session, self.settings.undo_chars)
        assert cur.undo is not None
        base, refeed = cur.undo.rewind(cur.steps, back, field)
        cur.state, cur.logits, cur.steps = base.state, base.logits, base.pos
        if refeed.size:
            await self._run(cur, refeed, False)  # (not ``advance``: these characters are kept already)
        return cur

    async def char_step(self, session: SessionState | None, text: str, num_chars: int) -> CharStep:
        return await self._char_step(session, text, num_chars, "text", "num_chars")

    async def _char_step(
        self, session: SessionState | None, text: str, num_chars: int, text_field: str, num_field: str, back: int = 0
    ) -> CharStep:
        """Appends ``text`` (after taking ``back`` characters back); returns the next-character distribution and a
        greedy completion."""
        check_int(num_chars, num_field, 0, self.settings.max_generate_chars, " (max_generate_chars)")
        check_text(text, text_field, self.settings.max_chars_per_text, allow_empty=True)
        ids = self.encoder.encode(text, field=text_field)
        if back > 0 and not self.settings.undo_chars:  # (as Suggest's backspace: not "between 0 and 0")
            self._no_undo("input BACKSPACE")
        if back and session is not None:
            check_int(back, "input BACKSPACE", 0, session.steps, " (the characters the sequence holds)")
        cur = await self._start(session, ids, probs=True, back=back, back_field="input BACKSPACE")
        logits = self._need_logits(cur, text_field)
        probs = cur.probs if cur.probs is not None else softmax(logits).astype(np.float32)  # (vocab,)
        if session is not None:
            cur.commit(session)
        completion = "" if num_chars == 0 else (await self._suggest(cur, 1, num_chars, False, text_field))[0].text
        return CharStep(probabilities=probs, vocab=list(self.vocab), completion=completion, steps=cur.steps)

    async def _suggest(self, cur: Cursor, n: int, max_chars: int, beam: bool, field: str) -> list[Suggestion]:
        """``n`` continuations of ``max_chars`` characters, likeliest first, without advancing ``cur``.

        beam=True: beam search of width ``n`` (n=1 is greedy). beam=False: the ``n`` most likely next characters,
        each continued greedily. All candidates advance together as one batch of ``n`` rows per character.
        """
        vocab = self.vocab
        logp: F64 = log_softmax(self._need_logits(cur, field))[None, :]  # (1, vocab)
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
            state, logits = await self.step_rows(_take(state, parents), chars.astype(np.int64)[:, None])
            logp = log_softmax(logits)  # (rows, vocab)
        order = np.argsort(-scores, kind="stable")
        return [Suggestion(text=texts[i], logprob=float(scores[i])) for i in order]
