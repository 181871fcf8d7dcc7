"""``seqserve-train sample`` draws the same characters as serving for one seed: both call arrays.sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.core import arrays
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from service.core.tokenizers import Encoder
from tests.tiny_models import export_tiny
from training.cli import main


def _direct(model: Path, prompt: str, length: int, temperature: float, top_k: int, seed: int) -> str:
    """The reference: feed the prompt, then one character at a time, each drawn by ``arrays.sample``."""
    m = Manifest.load(model / MANIFEST_FILE)
    assert m.tokenizer is not None
    enc, rng = Encoder(m.tokenizer), np.random.default_rng(seed)
    sess = ort.InferenceSession(str(model / MODEL_FILE), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": enc.encode(prompt)[None, :], **arrays.zero_states(m.states, {"batch": 1})}
    out = []
    for _ in range(length):
        logits, *state = sess.run(None, feeds)
        out.append(arrays.sample(logits[0, -1], temperature, top_k, rng))
        feeds = {"input_ids": np.array([[out[-1]]]), **{s.input: v for s, v in zip(m.states, state, strict=True)}}
    return prompt + enc.decode(out)


@pytest.mark.parametrize(("temperature", "top_k"), [(0.8, 0), (1.0, 5), (0.0, 0)])
def test_sample_cli_equals_a_loop_over_arrays_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], temperature: float, top_k: int
) -> None:
    model = export_tiny("charlm", tmp_path, seed=3)
    argv = ["sample", "--model", str(model), "--prompt", "ROMEO:", "--length", "40", "--seed", "7"]
    assert main([*argv, "--temperature", str(temperature), "--top-k", str(top_k)]) == 0
    got = capsys.readouterr().out.removesuffix("\n")
    assert got == _direct(model, "ROMEO:", 40, temperature, top_k, seed=7)
    if temperature > 0:  # the seed matters: another one draws other characters
        assert got != _direct(model, "ROMEO:", 40, temperature, top_k, seed=8)
