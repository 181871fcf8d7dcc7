"""Sentiment classification (many-to-one): validate texts, tokenize words, one batched run, softmax over labels.

The model takes ``input_ids`` (batch, time) right-padded with the pad id and, when declared, ``lengths``
(batch,), so a text's probabilities do not depend on how much padding its batch carries.

v2 contract: TEXT BYTES [-1] -> LABEL BYTES [-1], PROBABILITIES FP32 [-1, labels] (labels in manifest order).
"""

from __future__ import annotations

import asyncio

import numpy as np

from service.core.aio import inline_unless
from service.core.arrays import F64, I64, right_pad, softmax
from service.core.batching import StepInput, length_groups
from service.core.manifest import Manifest
from service.core.sessions.state import SessionState
from service.core.tasks.base import (
    ModelHandle,
    Task,
    TaskResult,
    bytes_tensor,
    check_text,
    check_text_count,
    fp32_tensor,
    register_task,
    utf8_items,
)
from service.core.tokenizers import Encoder
from service.core.types import SentimentResult, Tensor, TensorContract, TensorDef
from service.errors import InvalidInput
from service.settings import Settings

# Texts of more characters than this in all are checked and split into words in a worker thread: a request at the
# limits (256 texts, max_words_per_request) is tens of milliseconds of Python that would hold the event loop.
ENCODE_OFF_LOOP_CHARS = 16_384


@register_task
class SentimentTask(Task):
    name = "sentiment"
    deterministic = True

    @classmethod
    def check(cls, manifest: Manifest) -> None:
        if manifest.tokenizer is None or not manifest.labels:
            raise ValueError("a 'sentiment' model needs tokenizer and labels sections in manifest.json")
        if not manifest.has_input("input_ids") or "logits" not in {t.name for t in manifest.outputs}:
            raise ValueError("a 'sentiment' model must declare input 'input_ids' and output 'logits' in manifest.json")
        last = manifest.output("logits").shape[-1]
        if isinstance(last, int) and last != len(manifest.labels):
            raise ValueError(f"logits have {last} classes but manifest.labels has {len(manifest.labels)}")

    @classmethod
    def warmup_input(cls, manifest: Manifest, rows: int) -> dict[str, I64]:
        """Texts of eight words: the vocabulary's first ids that are not padding."""
        tokenizer = manifest.tokenizer
        assert tokenizer is not None  # check() ran first
        words = [i for i, word in enumerate(tokenizer.vocab[:9]) if word != tokenizer.pad_token][:8]
        sample = {"input_ids": np.tile(np.asarray(words, np.int64), (rows, 1))}
        if manifest.has_input("lengths"):
            sample["lengths"] = np.full(rows, len(words), np.int64)
        return sample

    def __init__(self, model: ModelHandle, settings: Settings) -> None:
        super().__init__(model, settings)
        m = model.manifest
        assert m.tokenizer is not None and m.labels is not None  # check() ran at load
        self.encoder = Encoder(m.tokenizer, fold=settings.fold_chars)
        self.labels = list(m.labels)
        self.pad = self.encoder.pad_id if self.encoder.pad_id is not None else 0
        self.with_lengths = m.has_input("lengths")

    def contract(self) -> TensorContract:
        return TensorContract(
            inputs=(
                TensorDef(
                    "TEXT",
                    "BYTES",
                    (-1,),
                    max_shape=(self.settings.max_texts_per_request,),
                    limit_name="max_texts_per_request",
                ),
            ),
            outputs=(
                TensorDef("LABEL", "BYTES", (-1,)),
                TensorDef("PROBABILITIES", "FP32", (-1, len(self.labels)), labels=tuple(self.labels)),
            ),
            sequences=False,
        )

    async def infer(self, inputs: dict[str, Tensor], session: SessionState | None) -> TaskResult:
        texts = utf8_items(inputs["TEXT"])
        results = await self._classify(texts, "input TEXT")
        probs = np.asarray([r.probabilities for r in results], dtype=np.float32)  # (texts, labels)
        outputs = {
            "LABEL": bytes_tensor("LABEL", [r.label for r in results]),
            "PROBABILITIES": fp32_tensor("PROBABILITIES", probs),
        }
        return TaskResult(outputs, inferences=len(texts))

    async def classify(self, texts: list[str]) -> list[SentimentResult]:
        return await self._classify(texts, "texts")

    async def _run(self, ids: list[I64], request: bool = True) -> F64:
        """The label probabilities of these texts' ids, (texts, labels): one item for the batcher (``request``:
        it counts as the request in the metrics; the later length groups of one request do not)."""
        batch, lengths = right_pad(ids, self.pad)  # (batch, time), (batch,)
        inputs = {"input_ids": batch}
        if self.with_lengths:
            inputs["lengths"] = lengths
        # Every classify request merges with every other (key None); the batcher pads input_ids to the longest.
        step = StepInput(inputs=inputs, rows=len(ids), pad={"input_ids": self.pad}, request=request)
        out = await self.model.batcher.submit(step)
        return softmax(out.outputs["logits"])  # (batch, labels)

    def encode(self, texts: list[str], field: str) -> list[I64]:
        """Validates every text and returns its word ids (int64, (time,))."""
        check_text_count(texts, field, self.settings.max_texts_per_request)
        ids: list[I64] = []
        words, word_limit = 0, self.settings.max_words_per_request
        for i, text in enumerate(texts):
            name = f"{field}[{i}]"
            check_text(text, name, self.settings.max_chars_per_text)
            x = self.encoder.encode(text, field=name)
            if len(x) == 0:
                raise InvalidInput(f"{name} has no words the tokenizer recognizes; send some words")
            # A text longer than the training window (tokenizer.max_length) is read whole: the net is recurrent,
            # and reads long texts well (docs/models.md, "Long texts"); max_chars_per_text bounds it.
            words += len(x)
            if words > word_limit:
                raise InvalidInput(
                    f"{field} has more than {word_limit} words in all ({words} by {name}; max_words_per_request); "
                    "send the texts in several requests"
                )
            ids.append(x)
        return ids

    async def check_texts(self, texts: list[str], field: str) -> None:
        """Every limit ``encode`` checks (count, characters, words in all, words the tokenizer knows). A request of
        no more characters than max_words_per_request cannot hold more words (a word has one at least): its texts
        are not split into words for it (the response cache's hits then cost no tokenizing)."""
        check_text_count(texts, field, self.settings.max_texts_per_request)
        if sum(map(len, texts)) > self.settings.max_words_per_request:
            await self._encoded(texts, field)
            return
        for i, text in enumerate(texts):
            check_text(text, f"{field}[{i}]", self.settings.max_chars_per_text)

    async def _encoded(self, texts: list[str], field: str) -> list[I64]:
        return await inline_unless(sum(map(len, texts)) > ENCODE_OFF_LOOP_CHARS, self.encode, texts, field)

    async def _classify(self, texts: list[str], field: str) -> list[SentimentResult]:
        ids = await self._encoded(texts, field)
        # One request's texts of very different lengths go as several length groups, as concurrent requests do
        # (``padding_groups``): padded to its longest text, 255 one-word texts and one of 4,000 words held the model
        # for 29 s, though far under max_words_per_request.
        groups = length_groups([len(x) for x in ids], [1] * len(ids), self.model.batcher.pad_split)
        if len(groups) == 1:
            probs = await self._run(ids)
        else:
            # (the metrics time the request by its longest texts' run, the last group: its cost, not its cheapest)
            last = len(groups) - 1
            parts = await asyncio.gather(*(self._run([ids[i] for i in g], k == last) for k, g in enumerate(groups)))
            probs = np.empty((len(ids), parts[0].shape[1]), dtype=parts[0].dtype)
            for g, part in zip(groups, parts, strict=True):
                probs[g] = part
        return [
            SentimentResult(label=self.labels[int(p.argmax())], labels=self.labels, probabilities=[float(v) for v in p])
            for p in probs
        ]
