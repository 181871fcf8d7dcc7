"""Every committed sentiment model, as its graph answers in ONNX Runtime: a text's answer does not depend on the
padding its batch adds (the contract the batcher relies on when it groups texts of different lengths)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.core.arrays import right_pad, zero_states
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from service.core.tokenizers import Encoder

ROOT = Path(__file__).resolve().parents[2]
SENTIMENT = sorted(
    p.parent for p in (ROOT / "models").glob(f"*/*/{MANIFEST_FILE}") if Manifest.load(p).task == "sentiment"
)
TEXTS = [
    "a great movie",
    "boring",
    "it 's a charming and often affecting journey , though the last act drags on and on without much purpose",
    "not bad at all",
    "the acting is wooden",
]


def run(model: Path, texts: list[str]) -> np.ndarray:
    """Logits for ``texts`` in one batch, right-padded to the longest."""
    m = Manifest.load(model / MANIFEST_FILE)
    assert m.tokenizer is not None
    enc = Encoder(m.tokenizer)
    ids, lengths = right_pad([enc.encode(t) for t in texts], pad=0)
    sess = ort.InferenceSession(str(model / MODEL_FILE), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "lengths": lengths, **zero_states(m.states, {"batch": len(texts)})}
    out: np.ndarray = sess.run(["logits"], feeds)[0]
    return out


def test_every_kind_is_here() -> None:
    names = {p.parent.name for p in SENTIMENT}
    assert {"sentiment", "sentiment-ensemble", "sentiment-glove", "sentiment-int8"} <= names


@pytest.mark.parametrize("model", SENTIMENT, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_answers_do_not_depend_on_padding(model: Path) -> None:
    batched = run(model, TEXTS)
    alone = np.concatenate([run(model, [t]) for t in TEXTS])
    assert batched.shape == (len(TEXTS), 2)
    # int8 copies quantize activations per batch (docs/models.md): their answers move a little with the batch
    tolerance = 0.05 if "int8" in model.parent.name else 1e-4
    np.testing.assert_allclose(batched, alone, atol=tolerance)
    assert (batched.argmax(1) == alone.argmax(1)).all()
