"""The ONNX contract on export_tiny (tests/tiny_models.py): names, dynamic axes, native cells, ORT parity, streaming."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from service.core.arrays import zero_states
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, Tokenizer, sha256_file
from service.core.tokenizers import Encoder
from tests.tiny_models import CHAR_VOCAB, TINY_WORDS, export_tiny
from training import export
from training.export import NATIVE_OPS, ort_run, parity, write_model
from training.nets import CELLS, NetConfig, build_net

TASKS = ("sentiment", "charlm", "forecast")


def _zeros(m: Manifest, batch: int) -> dict[str, np.ndarray[Any, Any]]:
    features = m.forecast.features if m.forecast is not None else 1
    return zero_states(m.states, {"batch": batch, "features": features})


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("task", TASKS)
def test_export_tiny_writes_valid_model(tmp_path: Path, task: str, cell: str) -> None:
    d = export_tiny(task, tmp_path, cell=cell, name=f"m_{task}", version=3)
    assert d == tmp_path / f"m_{task}" / "3"
    m = Manifest.load(d / MANIFEST_FILE)
    assert (m.name, m.version, m.task, m.architecture.cell) == (f"m_{task}", 3, task, cell)
    assert m.sha256 == sha256_file(d / MODEL_FILE)
    assert m.opset >= 17
    assert [s.name for s in m.states] == (["h", "c"] if cell == "lstm" else ["h"])
    graph = onnx.load(str(d / MODEL_FILE)).graph
    assert [i.name for i in graph.input] == [t.name for t in m.inputs]
    assert [o.name for o in graph.output] == [t.name for t in m.outputs]
    assert any(n.op_type == NATIVE_OPS[cell] for n in graph.node)


def test_default_names_and_contract_shapes(tmp_path: Path) -> None:
    names = {t: export_tiny(t, tmp_path).name for t in TASKS}
    assert names == {"sentiment": "1", "charlm": "1", "forecast": "1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["charlm", "forecaster", "sentiment"]

    lm = Manifest.load(tmp_path / "charlm" / "1" / MANIFEST_FILE)
    assert lm.stateful and lm.tokenizer is not None and lm.tokenizer.kind == "char"
    assert lm.tokenizer.vocab == CHAR_VOCAB
    ids = Encoder(lm.tokenizer).encode("To be, or not to be?\nThat is the question.")[None, :]
    logits, hn, cn = ort_run(tmp_path / "charlm" / "1" / MODEL_FILE, {"input_ids": ids, **_zeros(lm, 1)})
    assert logits.shape == (1, ids.shape[1], len(CHAR_VOCAB))
    assert hn.shape == cn.shape == (2, 1, 16)

    sm = Manifest.load(tmp_path / "sentiment" / "1" / MANIFEST_FILE)
    assert not sm.stateful and sm.labels == ["negative", "positive"]
    assert sm.tokenizer is not None and sm.tokenizer.vocab[0] == sm.tokenizer.pad_token
    enc = Encoder(sm.tokenizer)
    a, b = enc.encode("a great movie !"), enc.encode("boring")
    ids = np.zeros((2, 9), dtype=np.int64)
    ids[0, : len(a)], ids[1, : len(b)] = a, b
    lengths = np.array([len(a), len(b)], dtype=np.int64)
    out = ort_run(tmp_path / "sentiment" / "1" / MODEL_FILE, {"input_ids": ids, "lengths": lengths, **_zeros(sm, 2)})
    assert out[0].shape == (2, 2)
    # Padding does not change a text's logits: the short text alone, unpadded.
    alone = ort_run(
        tmp_path / "sentiment" / "1" / MODEL_FILE,
        {"input_ids": ids[1:, : len(b)], "lengths": lengths[1:], **_zeros(sm, 1)},
    )
    np.testing.assert_allclose(alone[0], out[0][1:], atol=1e-5)

    fm = Manifest.load(tmp_path / "forecaster" / "1" / MANIFEST_FILE)
    assert fm.forecast is not None and fm.normalization is not None
    f = fm.forecast
    assert (f.window, f.horizon, f.features, f.state_mode) == (24, 12, 7, "window")
    assert np.asarray(f.quantile_offsets).shape == (3, f.horizon, f.features)
    assert fm.states[0].shape[1] == "batch*features"
    hist = np.random.default_rng(0).standard_normal((2, f.window, f.features)).astype(np.float32)
    fc, hn_f, _ = ort_run(tmp_path / "forecaster" / "1" / MODEL_FILE, {"history": hist, **_zeros(fm, 2)})
    assert fc.shape == (2, f.horizon, f.features)
    assert hn_f.shape == (1, 2 * f.features, 16)


def test_export_tiny_rejects_unknown_task(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="task"):
        export_tiny("translation", tmp_path)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("task", TASKS)
def test_parity_at_other_length(tmp_path: Path, task: str, cell: str) -> None:
    d = export_tiny(task, tmp_path, cell=cell)
    m = Manifest.load(d / MANIFEST_FILE)
    cfg = NetConfig(**m.training["net"])
    torch.manual_seed(0)  # export_tiny seeds 0 before building, so this rebuilds the same weights
    net = build_net(cfg)
    time = cfg.window + 3 * cfg.segment if task == "forecast" else 23
    assert parity(net, d / MODEL_FILE, cfg, time=time, batch=4, seed=7) <= 1e-4


@pytest.mark.parametrize("cell", CELLS)
def test_streaming_identity_charlm(tmp_path: Path, cell: str) -> None:
    """Two chunks with the state passed between equal one call over the whole text."""
    d = export_tiny("charlm", tmp_path, cell=cell)
    m = Manifest.load(d / MANIFEST_FILE)
    assert m.tokenizer is not None
    ids = Encoder(m.tokenizer).encode("Now is the winter of our discontent")[None, :]
    whole = ort_run(d / MODEL_FILE, {"input_ids": ids, **_zeros(m, 1)})
    first = ort_run(d / MODEL_FILE, {"input_ids": ids[:, :13], **_zeros(m, 1)})
    state = {s.input: first[1 + i] for i, s in enumerate(m.states)}
    second = ort_run(d / MODEL_FILE, {"input_ids": ids[:, 13:], **state})
    np.testing.assert_allclose(np.concatenate([first[0], second[0]], axis=1), whole[0], atol=1e-5)
    for i in range(len(m.states)):
        np.testing.assert_allclose(second[1 + i], whole[1 + i], atol=1e-5)


def test_export_tiny_covariate_forecaster(tmp_path: Path) -> None:
    """targets=["OT"]: the 6 other columns are inputs only; the graph returns (batch, horizon, 1)."""
    d = export_tiny("forecast", tmp_path, cell="gru", name="cov", targets=["OT"])
    m = Manifest.load(d / MANIFEST_FILE)
    assert m.forecast is not None and m.forecast.targets == ["OT"] and m.forecast.target_count == 1
    assert m.outputs[0].shape == ["batch", 12, 1] and np.asarray(m.forecast.quantile_offsets).shape == (3, 12, 1)
    hist = np.random.default_rng(0).standard_normal((2, 24, 7)).astype(np.float32)
    fc = ort_run(d / MODEL_FILE, {"history": hist, **_zeros(m, 2)})[0]
    assert fc.shape == (2, 12, 1)
    cfg = NetConfig(**m.training["net"])
    torch.manual_seed(0)
    assert parity(build_net(cfg), d / MODEL_FILE, cfg, time=36, batch=3, seed=5) <= 1e-4


def test_manifest_architecture_fields(tmp_path: Path) -> None:
    """A bidirectional sentiment net says directions 2; a forecaster has no embedding (None, not the
    NetConfig default)."""
    cfg = NetConfig(task="sentiment", cell="gru", hidden=8, layers=1, vocab=len(TINY_WORDS), embedding=8,
                    bidirectional=True)  # fmt: skip
    tok = Tokenizer(kind="word", vocab=TINY_WORDS, unk_token="<unk>", pad_token="<pad>", lowercase=True)
    out = write_model(build_net(cfg), cfg, tmp_path / "s" / "1", name="s", version=1, tokenizer=tok,
                      labels=["negative", "positive"])  # fmt: skip
    assert Manifest.load(out / MANIFEST_FILE).architecture.directions == 2
    fm = Manifest.load(export_tiny("forecast", tmp_path) / MANIFEST_FILE)
    assert fm.architecture.embedding is None and fm.architecture.directions == 1


def test_a_graph_that_answers_differently_is_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write_model refuses an export whose ORT answers differ from PyTorch's."""
    monkeypatch.setattr(export, "parity", lambda *args, **kwargs: 1e-3)
    with pytest.raises(RuntimeError, match=r"ORT vs PyTorch max abs diff 1.00e-03 exceeds 1e-4"):
        export_tiny("forecast", tmp_path, name="fc")
    assert not (tmp_path / "fc" / "1" / MANIFEST_FILE).exists()
