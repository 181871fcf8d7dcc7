"""Sentiment classification: validate texts, tokenize words, one batched run, softmax over labels.

The model takes ``input_ids`` (batch, time) right-padded with the pad id and ``lengths`` (batch,), so a
text's probabilities do not depend on how much padding its batch carries.
"""

from __future__ import annotations

import numpy as np

from service.core.batching import StepInput
from service.core.tasks.common import Served, check_text, softmax
from service.core.types import SentimentResult
from service.errors import InvalidInput
from service.settings import Settings


def encode_texts(m: Served, texts: list[str], settings: Settings) -> list[np.ndarray]:
    """Validates every text and returns its word ids (int64, (time,))."""
    assert m.encoder is not None and m.manifest.tokenizer is not None
    if not texts:
        raise InvalidInput(f"texts is empty; send between 1 and {settings.max_texts_per_request} texts")
    if len(texts) > settings.max_texts_per_request:
        raise InvalidInput(
            f"texts has {len(texts)} items; the limit is {settings.max_texts_per_request} (max_texts_per_request)"
        )
    max_tokens = m.manifest.tokenizer.max_length
    ids: list[np.ndarray] = []
    for i, text in enumerate(texts):
        field = f"texts[{i}]"
        check_text(text, field, settings.max_chars_per_text)
        x = m.encoder.encode(text, field=field)
        if len(x) == 0:
            raise InvalidInput(f"{field} has no words the tokenizer recognizes; send some words")
        if max_tokens is not None and len(x) > max_tokens:
            raise InvalidInput(
                f"{field} has {len(x)} tokens; model {m.label} accepts at most {max_tokens} (tokenizer.max_length); "
                "shorten it"
            )
        ids.append(x)
    return ids


async def classify(m: Served, texts: list[str], settings: Settings) -> list[SentimentResult]:
    ids = encode_texts(m, texts, settings)
    assert m.encoder is not None
    pad = m.encoder.pad_id if m.encoder.pad_id is not None else 0
    lengths = np.array([len(x) for x in ids], dtype=np.int64)  # (batch,)
    batch = np.full((len(ids), int(lengths.max())), pad, dtype=np.int64)  # (batch, time), right-padded
    for row, x in enumerate(ids):
        batch[row, : len(x)] = x
    inputs = {"input_ids": batch}
    if any(t.name == "lengths" for t in m.manifest.inputs):
        inputs["lengths"] = lengths
    # Every classify request merges with every other (key None); the batcher pads input_ids to the longest.
    out = await m.batcher.submit(StepInput(inputs=inputs, rows=len(ids), pad={"input_ids": pad}))
    probs = softmax(out.outputs["logits"])  # (batch, labels)
    labels = list(m.manifest.labels or [])
    return [
        SentimentResult(label=labels[int(p.argmax())], labels=labels, probabilities=[float(v) for v in p])
        for p in probs
    ]
