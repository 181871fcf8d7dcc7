"""What a sentiment model's exported graph answers in ONNX Runtime, without the server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.core.arrays import right_pad, zero_states
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from service.core.tokenizers import Encoder


def logits(model: Path, texts: list[str]) -> np.ndarray:
    """The model's logits for ``texts``, right-padded to the longest in one batch."""
    m = Manifest.load(model / MANIFEST_FILE)
    assert m.tokenizer is not None
    enc = Encoder(m.tokenizer)
    ids, lengths = right_pad([enc.encode(t) for t in texts], pad=0)
    sess = ort.InferenceSession(str(model / MODEL_FILE), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "lengths": lengths, **zero_states(m.states, {"batch": len(texts)})}
    out: np.ndarray = sess.run(["logits"], feeds)[0]
    return out
