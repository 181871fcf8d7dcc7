"""``seqserve-train quantize``: a trained LSTM model copied with int8 weights under its own name, the parent
untouched, the contract unchanged, the metric recomputed from ONNX and held to the parent's, the batch dependence
measured, served next to it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.client import Client, SuggestEvent
from service.core.arrays import zero_states
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, sha256_file
from tests.conftest import ServerHandle
from tests.training.fast import FAST
from training.cli import main
from training.quantize import quantized_nodes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny 2-layer char LM as models/lm/1, and the text it was trained on."""
    tmp = tmp_path_factory.mktemp("quantize")
    text = tmp / "input.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\nJULIET:\nO Romeo!\n" * 40)
    out = tmp / "models" / "lm" / "1"
    args = ["charlm", "--data", str(text), "--out", str(out), "--run-dir", str(tmp / "run"), *FAST]
    args += ["--hidden", "32", "--layers", "2", "--embedding", "8", "--batch-size", "4", "--bptt", "16"]
    assert main([*args, "--epochs", "2", "--eval-every", "20"]) == 0
    return out, text


def feed(sess: ort.InferenceSession, ids: np.ndarray, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of one run, by name."""
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"input_ids": ids, **state}), strict=True))


def run(model: Path, ids: np.ndarray) -> list[np.ndarray]:
    """The model's outputs (logits, hn, cn) for ``ids`` from zero states."""
    m = Manifest.load(model / MANIFEST_FILE)
    sess = ort.InferenceSession(str(model / MODEL_FILE), providers=["CPUExecutionProvider"])
    return list(feed(sess, ids, zero_states(m.states, {"batch": len(ids)})).values())


def quantized(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], *options: str
) -> tuple[Path, Path, Path]:
    """A private copy of the tiny LM as models/lm/1 (a test runs once per session store), quantized with
    ``options`` into models/lm-int8/1: (parent, text, copy)."""
    v1, text = tmp_path / "models" / "lm" / "1", trained[1]
    shutil.copytree(trained[0], v1)
    v2 = v1.parent.parent / "lm-int8" / "1"
    capsys.readouterr()
    assert main(["quantize", "--model", str(v1), "--data", str(text), "--out", str(v2), *options]) == 0
    assert f"{v2}: val_loss_nats_per_char" in capsys.readouterr().out
    return v1, text, v2


@pytest.mark.slow
def test_quantize_a_char_lm_into_a_served_int8_model(
    trained: tuple[Path, Path],
    tmp_path: Path,
    start_server: Callable[..., ServerHandle],
    capsys: pytest.CaptureFixture[str],
) -> None:
    v1, text, v2 = quantized(trained, tmp_path, capsys)
    files = {p.name: p.read_bytes() for p in trained[0].iterdir()}
    assert {p.name: p.read_bytes() for p in v1.iterdir()} == files  # the parent is left as it was

    parent, m = Manifest.load(v1 / MANIFEST_FILE), Manifest.load(v2 / MANIFEST_FILE)
    assert (m.name, m.version, m.task) == ("lm-int8", 1, "charlm") and m.sha256 == sha256_file(v2 / MODEL_FILE)
    same = ("inputs", "outputs", "states", "tokenizer", "stateful")
    assert all(getattr(m, k) == getattr(parent, k) for k in same)  # the serving contract is unchanged
    q = m.training["quantization"]
    assert m.training["quantized_from"] == "lm/1" and m.training["command"].startswith("seqserve-train quantize")
    assert quantized_nodes(v2 / MODEL_FILE) == q["nodes"] and q["nodes"].get("DynamicQuantizeLSTM", 0) >= 1
    assert quantized_nodes(v1 / MODEL_FILE) == {}
    assert q["bytes"]["quantized"] < q["bytes"]["parent"] / 2  # the LSTM weights are int8 now

    # The metric is recomputed from the new ONNX (evaluate reproduces it) and held to the parent's.
    (metric,) = m.metrics
    assert metric.name == "val_loss_nats_per_char" and metric.command.startswith(
        f"seqserve-train evaluate --model {v2}"
    )
    capsys.readouterr()
    assert main(["evaluate", "--model", str(v2), "--data", str(text)]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss_nats_per_char"] == pytest.approx(metric.value, abs=1e-6)
    assert abs(metric.value - parent.metrics[0].value) <= 0.005 and q["headline"]["quantized"] == metric.value
    assert m.card is not None and any("Use lm for batch-invariant results" in limit for limit in m.card.limits)
    # Activations are quantized per run over the whole batch: batching moves a row's outputs (float32: it does not).
    assert q["batch_dependence"]["logits"] > 1e-4 and q["batch_dependence_parent"]["logits"] < 1e-5
    # ... and over the run's time steps: one character at a time is not the same as the whole text at once.
    assert q["sequence_dependence"]["logits"] > 1e-4 and q["sequence_dependence_parent"]["logits"] < 1e-5
    report = json.loads((v2 / "metrics.json").read_text())
    assert report["parent"] == str(v1) and report["onnx_metrics"]["val_loss_nats_per_char"] == metric.value
    parent_report = json.loads((v1 / "metrics.json").read_text())
    assert report["parent_command"] == parent_report["command"] and report["command"].startswith("seqserve-train q")

    # Close to the float32 graph, not equal to it.
    ids = np.random.default_rng(0).integers(0, len(parent.tokenizer.vocab), (3, 12)).astype(np.int64)  # type: ignore[union-attr]
    (l1, h1, c1), (l2, h2, c2) = run(v1, ids), run(v2, ids)  # logits, hn, cn
    assert not np.array_equal(l1, l2)
    np.testing.assert_allclose(l2, l1, atol=0.05 * np.abs(l1).max())
    np.testing.assert_allclose(h2, h1, atol=0.05)
    np.testing.assert_allclose(c2, c1, atol=0.05 * max(1.0, np.abs(c1).max()))

    # Served beside its parent under its own name; the parent's name still serves the float32 graph.
    handle = start_server(models=v1.parent.parent)
    with (
        Client(handle.target, timeout=60.0) as client,
        client.session("lm-int8") as fast,
        client.session("lm") as exact,
    ):
        assert (fast.model, fast.version, exact.model, exact.version) == ("lm-int8", 1, "lm", 1)
        a = client.suggest_once(fast.id, "ROMEO:", n=1, max_chars=3)
        b = client.suggest_once(exact.id, "ROMEO:", n=1, max_chars=3)
        assert a.steps == b.steps == 6 and len(a.suggestions[0].text) == 3
        assert client.get_session(fast.id).model == "lm-int8"


@pytest.mark.slow
def test_quantize_refuses_what_it_cannot_release(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    v1, text = trained

    def fails(args: list[str], message: str) -> None:
        capsys.readouterr()
        assert main(["quantize", *args]) == 2
        assert message in capsys.readouterr().err

    out = tmp_path / "lm-int8" / "1"
    fails(["--model", str(v1), "--data", str(text), "--out", str(v1)], "--out must differ from --model")
    # Never a newer version of the float32 model: it would become the default and batching would move its answers.
    fails(["--model", str(v1), "--data", str(text), "--out", str(tmp_path / "lm" / "2")], "under its own name")
    assert not (tmp_path / "lm").exists()
    # The release rule: a headline metric worse than the parent's by more than --tolerance writes nothing.
    fails(["--model", str(v1), "--data", str(text), "--out", str(out), "--tolerance", "-1"], "not released")
    assert not out.exists()
    fails(["--model", str(tmp_path / "none" / "1"), "--data", str(text), "--out", str(out)], "file not found")
    air = ROOT / "models" / "forecaster-air" / "1"
    fails(["--model", str(air), "--data", str(text), "--out", str(out)], "quantize supports charlm, sentiment")
    assert not out.exists()

    assert main(["quantize", "--model", str(v1), "--data", str(text), "--out", str(out)]) == 0
    fails(["--model", str(v1), "--data", str(text), "--out", str(out)], "already exists and is not empty")
    fails(
        ["--model", str(out), "--data", str(text), "--out", str(tmp_path / "lm-int8-int8" / "1")], "already quantized"
    )


@pytest.mark.slow
def test_static_quantization_answers_the_same_alone_batched_and_step_by_step(
    trained: tuple[Path, Path],
    tmp_path: Path,
    start_server: Callable[..., ServerHandle],
    capsys: pytest.CaptureFixture[str],
) -> None:
    v1, text, v2 = quantized(trained, tmp_path, capsys, "--method", "static")
    parent, m = Manifest.load(v1 / MANIFEST_FILE), Manifest.load(v2 / MANIFEST_FILE)
    assert all(getattr(m, k) == getattr(parent, k) for k in ("inputs", "outputs", "states", "tokenizer"))
    q = m.training["quantization"]
    assert q["method"].startswith("int8 hidden-state products") and "static quantization of lm/1" in m.description
    # Layer 1's input product and both layers' recurrent products (inside the Scan bodies) are integer.
    assert q["nodes"] == quantized_nodes(v2 / MODEL_FILE) == {"QuantizeLinear": 3, "MatMulInteger": 3}
    assert q["structure_gap"] < 1e-4  # the float32 rebuild matched the parent before anything was quantized
    assert set(q["batch_dependence"].values()) == {0.0} and set(q["sequence_dependence"].values()) == {0.0}
    assert m.card is not None and any(limit.startswith("Batch-invariant") for limit in m.card.limits)
    (metric,) = m.metrics
    assert abs(metric.value - parent.metrics[0].value) <= 0.005
    capsys.readouterr()
    assert main(["evaluate", "--model", str(v2), "--data", str(text)]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss_nats_per_char"] == pytest.approx(metric.value, abs=1e-6)

    # Checked here too, on other inputs: bit-identical alone or batched, one character at a time or all at once.
    sess = ort.InferenceSession(str(v2 / MODEL_FILE), providers=["CPUExecutionProvider"])
    vocab = len(parent.tokenizer.vocab)  # type: ignore[union-attr]
    ids = np.random.default_rng(7).integers(0, vocab, (3, 10)).astype(np.int64)
    batched = feed(sess, ids, zero_states(m.states, {"batch": 3}))
    for row in range(3):
        alone = feed(sess, ids[row : row + 1], zero_states(m.states, {"batch": 1}))
        assert np.array_equal(alone["logits"], batched["logits"][row : row + 1])
        assert np.array_equal(alone["hn"], batched["hn"][:, row : row + 1])
    state = zero_states(m.states, {"batch": 3})
    for t in range(10):
        step = feed(sess, ids[:, t : t + 1], state)
        assert np.array_equal(step["logits"][:, 0], batched["logits"][:, t])
        state = {"h0": step["hn"], "c0": step["cn"]}
    assert np.array_equal(state["h0"], batched["hn"]) and np.array_equal(state["c0"], batched["cn"])
    (l1, h1, _), (l2, h2, _) = run(v1, ids), run(v2, ids)
    assert not np.array_equal(l1, l2)  # int8: close to the float32 parent, not equal to it
    np.testing.assert_allclose(l2, l1, atol=0.05 * np.abs(l1).max())
    np.testing.assert_allclose(h2, h1, atol=0.05)

    # Served: a session typed one character at a time ends exactly where a session given the whole text does.
    handle = start_server(models=v1.parent.parent)
    with (
        Client(handle.target, timeout=60.0) as client,
        client.session("lm-int8") as typed,
        client.session("lm-int8") as whole,
    ):
        answers = list(client.suggest(typed.id, [SuggestEvent(c, n=3, max_chars=4) for c in "ROMEO:"]))
        at_once = client.suggest_once(whole.id, "ROMEO:", n=3, max_chars=4)
        last = answers[-1]
        assert last.steps == at_once.steps == 6
        assert [s.logprob for s in last.suggestions] == [s.logprob for s in at_once.suggestions]
        assert [s.text for s in last.suggestions] == [s.text for s in at_once.suggestions]


@pytest.mark.slow
def test_static_quantization_refuses_what_it_cannot_rebuild(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = trained[1]
    gru = tmp_path / "gru" / "1"
    args = ["charlm", "--data", str(text), "--out", str(gru), "--run-dir", str(tmp_path / "run"), *FAST]
    args += ["--cell", "gru", "--hidden", "16", "--layers", "1", "--embedding", "8", "--epochs", "1"]
    assert main([*args, "--batch-size", "4", "--bptt", "16"]) == 0  # the defaults' 128 x 128 need more text
    assert Manifest.load(gru / MANIFEST_FILE).description.startswith("Character-level GRU language model")
    out = tmp_path / "gru-int8" / "1"
    for model, what in ((gru, "charlm with 1 x gru"), (ROOT / "models" / "sentiment" / "1", "sentiment with 2 x lstm")):
        capsys.readouterr()
        args = ["quantize", "--model", str(model), "--data", str(text), "--out", str(out), "--method", "static"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "--method static rebuilds unidirectional LSTM char LMs" in err and what in err
        assert not out.exists()
    capsys.readouterr()
    assert main(["quantize", "--model", str(trained[0]), "--data", str(text), "--out", str(out), "--method", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --method: invalid choice: 'x'" in err
