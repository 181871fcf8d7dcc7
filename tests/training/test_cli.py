"""seqserve-train end to end on tiny generated data: train -> ONNX + manifest + report -> evaluate from ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, sha256_file
from training.cli import main

FAST = ["--no-progress", "--threads", "1", "--warmup-steps", "2"]


def _evaluate(capsys: pytest.CaptureFixture[str], model: Path, data: Path) -> dict[str, float]:
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--data", str(data)]) == 0
    result: dict[str, float] = json.loads(capsys.readouterr().out)
    return result


def _check_outputs(out: Path) -> Manifest:
    m = Manifest.load(out / MANIFEST_FILE)
    assert m.sha256 == sha256_file(out / MODEL_FILE)
    assert m.training["parity_max_abs_diff"] <= 1e-4
    assert m.metrics and "seqserve-train evaluate" in m.metrics[0].command
    report = json.loads((out / "metrics.json").read_text())
    assert report["steps"] >= 1 and report["evaluations"]
    assert (out / "training_curve.png").stat().st_size > 1000
    return m


@pytest.mark.slow
def test_charlm_train_evaluate_resume_sample(
    tmp_path: Path, tiny_text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, run = tmp_path / "models" / "lm" / "2", tmp_path / "run"
    args = ["charlm", "--data", str(tiny_text), "--out", str(out), "--run-dir", str(run), *FAST]
    args += ["--hidden", "16", "--layers", "2", "--embedding", "8", "--batch-size", "4", "--bptt", "16"]
    assert main([*args, "--epochs", "2", "--eval-every", "10"]) == 0
    m = _check_outputs(out)
    assert (m.name, m.version, m.task, m.stateful) == ("lm", 2, "charlm", True)
    metric = m.metrics[0]
    assert metric.name == "val_loss_nats_per_char" and metric.value < np.log(len(m.tokenizer.vocab))  # type: ignore[union-attr]
    assert _evaluate(capsys, out, tiny_text)["val_loss_nats_per_char"] == pytest.approx(metric.value, abs=1e-4)
    first = json.loads((out / "metrics.json").read_text())["steps"]
    assert (run / "checkpoint.pt").exists()
    assert main([*args, "--epochs", "3", "--eval-every", "10", "--resume"]) == 0
    assert "resumed" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["steps"] > first
    assert main(["sample", "--model", str(out), "--prompt", "RO", "--length", "20", "--top-k", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("RO") and len(text.rstrip("\n")) >= 20


@pytest.mark.slow
def test_sentiment_train_and_evaluate(tmp_path: Path, tiny_sst2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sentiment" / "1"
    args = ["sentiment", "--data", str(tiny_sst2), "--out", str(out), "--run-dir", str(tmp_path / "run"), *FAST]
    args += ["--hidden", "16", "--embedding", "16", "--epochs", "8", "--batch-size", "16", "--heldout-fraction", "0.2"]
    args += ["--lr", "0.01", "--dropout", "0", "--patience", "8"]
    assert main(args) == 0
    m = _check_outputs(out)
    assert m.labels == ["negative", "positive"] and m.architecture.directions == 2
    assert [x.name for x in m.metrics] == ["accuracy", "heldout_accuracy"]
    acc = _evaluate(capsys, out, tiny_sst2)["dev_accuracy"]
    assert acc == pytest.approx(m.metrics[0].value) and acc > 0.9  # the toy task is separable


@pytest.mark.slow
def test_forecast_train_and_evaluate(tmp_path: Path, tiny_ett: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fc" / "1"
    args = ["forecast", "--data", str(tiny_ett), "--out", str(out), "--run-dir", str(tmp_path / "run"), *FAST]
    args += ["--hidden", "16", "--epochs", "1", "--batch-size", "256", "--window", "48", "--horizon", "24"]
    assert main(args) == 0
    m = _check_outputs(out)
    assert m.forecast is not None and m.normalization is not None
    assert (m.forecast.window, m.forecast.horizon, m.forecast.features) == (48, 24, 3)
    assert np.asarray(m.forecast.quantile_offsets).shape == (3, 24, 3)
    ev = _evaluate(capsys, out, tiny_ett)
    assert ev["test_mse"] == pytest.approx(m.metrics[0].value, rel=1e-4)
    assert ev["test_coverage_q0.1"] < ev["test_coverage_q0.5"] < ev["test_coverage_q0.9"]


def test_missing_data_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.txt"
    assert main(["charlm", "--data", str(missing), "--out", str(tmp_path / "o" / "1"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"seqserve-train: error: {missing}: file not found"


def test_malformed_data_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nok\t1\nbad\tpositive\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    assert main(["sentiment", "--data", str(tmp_path), "--out", str(tmp_path / "o" / "1"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.tsv: line 3" in err


def test_evaluate_missing_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--model", str(tmp_path / "m" / "1"), "--data", str(tmp_path)]) == 2
    assert "manifest.json: file not found" in capsys.readouterr().err


def test_bad_hyperparameter_exits_2(tmp_path: Path, tiny_ett: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["forecast", "--data", str(tiny_ett), "--out", str(tmp_path / "f" / "1"), "--window", "50", *FAST]
    assert main(args) == 2
    assert "window: 50 must be a multiple of segment 12" in capsys.readouterr().err
