"""Every committed sentiment model, as its graph answers in ONNX Runtime: a text's answer does not depend on the
padding its batch adds (the contract the batcher relies on when it groups texts of different lengths)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.core.manifest import MANIFEST_FILE, Manifest
from tests.training.graphs import logits

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


def test_every_kind_is_here() -> None:
    names = {p.parent.name for p in SENTIMENT}
    assert {"sentiment", "sentiment-ensemble", "sentiment-glove", "sentiment-int8"} <= names


@pytest.mark.parametrize("model", SENTIMENT, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_answers_do_not_depend_on_padding(model: Path) -> None:
    batched = logits(model, TEXTS)
    alone = np.concatenate([logits(model, [t]) for t in TEXTS])
    assert batched.shape == (len(TEXTS), 2)
    # int8 copies quantize activations per batch (docs/models.md): their answers move a little with the batch
    tolerance = 0.05 if "int8" in model.parent.name else 1e-4
    np.testing.assert_allclose(batched, alone, atol=tolerance)
    assert (batched.argmax(1) == alone.argmax(1)).all()
