"""``seqserve-train heldout``: training's held-out slice rebuilt from the manifest and scored from the ONNX, alone and
as the mean of several models' probabilities; models that held out different rows are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.core import arrays
from service.core.manifest import MANIFEST_FILE, Manifest
from tests.training import fast
from training.cli import main
from training.data import data_sha256, heldout_split, load_sst2
from training.evaluate import open_model, sentiment_logits

FAST = [*fast.FAST, "--epochs", "1", "--batch-size", "32"]


def train(tmp_path: Path, data: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name / "1"
    args = ["sentiment", "--data", str(data), "--out", str(out), "--run-dir", str(tmp_path / f"run-{name}"), *FAST]
    assert main([*args, "--hidden", "8", "--embedding", "8", "--ensemble", "1", *extra]) == 0
    return out


def heldout(capsys: pytest.CaptureFixture[str], data: Path, *models: Path) -> tuple[int, str]:
    capsys.readouterr()
    args = ["heldout", "--data", str(data)]
    for m in models:
        args += ["--model", str(m)]
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out if rc == 0 else captured.err


@pytest.mark.slow
def test_heldout_rebuilds_trainings_slice_and_scores_the_mean(
    tmp_path: Path, tiny_sst2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = train(tmp_path, tiny_sst2, "a", "--heldout-fraction", "0.2")
    b = train(tmp_path, tiny_sst2, "b", "--heldout-fraction", "0.2", "--hidden", "4", "--lr", "0.01")
    rc, out = heldout(capsys, tiny_sst2, a, b)
    assert rc == 0
    r = json.loads(out)
    assert (r["heldout"], r["heldout_fraction"], r["seed"], r["heldout_rows"]) == ("rows", 0.2, 0, 60)
    # the same slice training scored: each model's ONNX accuracy on it is the one its manifest recorded
    for m in (a, b):
        scored = r["models"][str(m)]
        assert scored["heldout_accuracy"] == pytest.approx(scored["recorded"], abs=1e-6)
    # the mean of the two models' probabilities, computed here independently on the rebuilt slice
    _, held = heldout_split(load_sst2(tiny_sst2)[0], "rows", 0.2, np.random.default_rng(0))
    y = np.array([label for _, label in held])
    probs = [arrays.softmax(sentiment_logits(*open_model(m), [t for t, _ in held])) for m in (a, b)]
    expected = float((np.mean(probs, axis=0).argmax(1) == y).mean())
    assert r["mean_of_probabilities"]["heldout_accuracy"] == pytest.approx(expected)
    # one model alone: no mean
    rc, out = heldout(capsys, tiny_sst2, a)
    assert rc == 0 and "mean_of_probabilities" not in json.loads(out)


@pytest.mark.slow
def test_heldout_rebuilds_a_held_out_set_of_whole_sentences(
    tmp_path: Path, tiny_sst2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = train(tmp_path, tiny_sst2, "s", "--heldout", "sentences", "--heldout-fraction", "0.2")
    rc, out = heldout(capsys, tiny_sst2, s)
    assert rc == 0
    r = json.loads(out)
    # 10 distinct sentences (no phrases) in the toy train.tsv: 2 held out, once each, as training held them out
    assert (r["heldout"], r["heldout_fraction"], r["heldout_rows"]) == ("sentences", 0.2, 2)
    scored = r["models"][str(s)]
    assert scored["heldout_accuracy"] == pytest.approx(scored["recorded"], abs=1e-6)


@pytest.mark.slow
def test_heldout_refuses_models_that_held_out_different_rows(
    tmp_path: Path, tiny_sst2: Path, tiny_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = train(tmp_path, tiny_sst2, "a", "--heldout-fraction", "0.2")
    c = train(tmp_path, tiny_sst2, "c", "--heldout-fraction", "0.2", "--seed", "1")
    rc, err = heldout(capsys, tiny_sst2, a, c)
    assert rc == 2 and "held out different rows" in err and "seed 0" in err and "seed 1" in err
    # a manifest without the training record (not trained by seqserve-train sentiment) is named, not guessed
    m = Manifest.load(a / MANIFEST_FILE)
    m.model_copy(update={"training": {}}).dump(a / MANIFEST_FILE)
    rc, err = heldout(capsys, tiny_sst2, a)
    assert rc == 2 and "does not record how training held rows out" in err
    rc, err = heldout(capsys, tiny_sst2, tiny_models / "charlm" / "1")
    assert rc == 2 and "is a 'charlm' model; heldout scores sentiment models" in err


def test_heldout_split_matches_what_training_used() -> None:
    rows = [(f"text {i}", i % 2) for i in range(100)]
    fit, held = heldout_split(rows, "rows", 0.1, np.random.default_rng(3))
    order = np.random.default_rng(3).permutation(100)
    assert held == [rows[i] for i in order[:10]] and fit == [rows[i] for i in order[10:]]
    assert sorted(fit + held) == sorted(rows)


@pytest.mark.slow
def test_heldout_refuses_other_data_than_the_training_run_recorded(
    tmp_path: Path, tiny_sst2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """heldout rebuilds training's slice from --data: another train.tsv gave a slice of other rows, scored as if it
    were the one that chose the checkpoint. Training records its data's sha256; heldout checks it."""
    a = train(tmp_path, tiny_sst2, "a", "--heldout-fraction", "0.2")
    other = tmp_path / "other"
    shutil.copytree(tiny_sst2, other)
    with (other / "train.tsv").open("a", encoding="utf-8") as f:
        f.write("an added sentence\t1\n")
    rc, err = heldout(capsys, other, a)
    assert rc == 2 and err.startswith(f"seqserve-train: error: {other}: not the data {a} (")
    assert data_sha256(other) in err and "give the folder the model was trained on" in err
    assert heldout(capsys, tiny_sst2, a)[0] == 0
