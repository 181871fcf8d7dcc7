"""``seqserve-train fuse``: a bidirectional sentiment export rebuilt with one bidirectional recurrent node per member
and layer; the same answers as its parent (any cell, layers, members, padding), published as a new version that
serves next to it, and a clear refusal for anything else."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from service.client import Client
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, sha256_file
from tests.conftest import ServerHandle
from tests.training.fast import FAST
from tests.training.graphs import logits
from training import fuse as fuse_module
from training.cli import main
from training.evaluate import evaluate_model

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["a great movie", "boring", "i hate this film , dull and cold and bad acting", "wonderful", "good fun !"]


def train(tmp_path: Path, data: Path, *options: str) -> Path:
    out = tmp_path / "models" / "sentiment" / "1"
    args = ["sentiment", "--data", str(data), "--out", str(out), "--run-dir", str(tmp_path / "run"), *FAST]
    assert main([*args, "--hidden", "8", "--embedding", "8", "--epochs", "1", "--batch-size", "32", *options]) == 0
    return out


def fused(src: Path, data: Path, capsys: pytest.CaptureFixture[str], version: int = 2) -> Path:
    out = src.parent / str(version)
    capsys.readouterr()
    assert main(["fuse", "--model", str(src), "--data", str(data), "--out", str(out)]) == 0
    assert f"{out}: " in capsys.readouterr().out
    return out


def refused(model: Path, data: Path, out: Path, capsys: pytest.CaptureFixture[str], message: str) -> None:
    """``fuse`` exits 2 and says ``message``."""
    capsys.readouterr()
    assert main(["fuse", "--model", str(model), "--data", str(data), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cell", "layers", "members", "extra"),
    [("lstm", 2, 2, []), ("gru", 1, 1, []), ("rnn_relu", 2, 3, ["--half-table"])],
    ids=["lstm-2x2", "gru", "rnn_relu-half-table"],
)
def test_fusing_keeps_every_answer(
    tmp_path: Path,
    tiny_sst2: Path,
    capsys: pytest.CaptureFixture[str],
    cell: str,
    layers: int,
    members: int,
    extra: list[str],
) -> None:
    options = ["--cell", cell, "--layers", str(layers), "--ensemble", str(members), *extra]
    v1 = train(tmp_path, tiny_sst2, *options)
    before = {p.name: p.read_bytes() for p in v1.iterdir()}
    v2 = fused(v1, tiny_sst2, capsys)
    assert {p.name: p.read_bytes() for p in v1.iterdir()} == before  # the parent is left as it was

    parent, m = Manifest.load(v1 / MANIFEST_FILE), Manifest.load(v2 / MANIFEST_FILE)
    assert (m.name, m.version, m.task) == ("sentiment", 2, "sentiment") and m.sha256 == sha256_file(v2 / MODEL_FILE)
    for field in ("inputs", "outputs", "states", "tokenizer", "labels", "stateful"):
        assert getattr(m, field) == getattr(parent, field), field
    cells = {"lstm": "LSTM", "gru": "GRU", "rnn_relu": "RNN (ReLU)"}
    assert f" + Bi{cells[cell]} ensemble" in parent.description  # the cell trained, not always "LSTM"
    record = m.training["fusion"]
    assert m.training["fused_from"] == "sentiment/1" and record["max_logit_gap"] <= 1e-4
    assert record["nodes"]["fused"] < record["nodes"]["parent"]
    recurrent = [n for n in onnx.load(str(v2 / MODEL_FILE)).graph.node if n.op_type in ("LSTM", "GRU", "RNN")]
    assert len(recurrent) == layers * members  # one node per member and layer, both directions in it
    assert {n.op_type for n in recurrent} == {cell.split("_")[0].upper()}
    assert [x.name for x in m.metrics] == [x.name for x in parent.metrics]
    assert "fuse" in json.loads((v2 / "metrics.json").read_text())["command"]

    # Padding, batch company and order do not move a text's answer, and each equals the parent's.
    alone = np.concatenate([logits(v2, [t]) for t in TEXTS])
    np.testing.assert_allclose(logits(v2, TEXTS), alone, atol=1e-5)
    np.testing.assert_allclose(logits(v2, TEXTS[::-1])[::-1], alone, atol=1e-5)
    np.testing.assert_allclose(logits(v1, TEXTS), alone, atol=1e-5)


@pytest.mark.slow
def test_the_committed_sentiment_model_fuses_to_the_same_answers(
    tmp_path: Path, tiny_sst2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    v1 = tmp_path / "models" / "sentiment" / "1"
    shutil.copytree(ROOT / "models" / "sentiment" / "1", v1)
    v2 = fused(v1, tiny_sst2, capsys)
    texts = [*TEXTS, "the film is a charming , often affecting journey", "x" * 3]
    np.testing.assert_allclose(logits(v2, texts), logits(v1, texts), atol=1e-5)
    m = Manifest.load(v2 / MANIFEST_FILE)
    assert m.training["fusion"]["nodes"] == {"parent": 342, "fused": 34}


@pytest.mark.parametrize(("parent", "fused"), [(1, 2), (3, 4)])
def test_the_committed_fused_version_serves_its_parents_answers(
    tmp_path: Path, start_server: Callable[..., ServerHandle], parent: int, fused: int
) -> None:
    """``models/sentiment/2`` (``/4``) is ``sentiment/1``'s (``/3``'s) weights in the fused graph: served side by
    side, equal answers."""
    m = Manifest.load(ROOT / "models" / "sentiment" / str(fused) / MANIFEST_FILE)
    assert m.training["fused_from"] == f"sentiment/{parent}"
    models = tmp_path / "models"
    for version in (parent, fused):
        shutil.copytree(ROOT / "models" / "sentiment" / str(version), models / "sentiment" / str(version))
    server = start_server(models=models)
    with Client(server.target) as c:
        new = c.classify(TEXTS, model="sentiment")  # the newest version by default
        old = c.classify(TEXTS, model="sentiment", version=parent)
    assert [r.label for r in new] == [r.label for r in old]
    np.testing.assert_allclose([r.probabilities for r in new], [r.probabilities for r in old], atol=1e-6)


@pytest.mark.slow
def test_fuse_refuses_what_it_cannot_rebuild(
    tmp_path: Path, tiny_sst2: Path, tiny_text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def fails(model: Path, data: Path, out: Path, message: str) -> None:
        refused(model, data, out, capsys, message)

    uni = train(tmp_path / "uni", tiny_sst2, "--no-bidirectional", "--ensemble", "1")
    fails(
        uni, tiny_sst2, tmp_path / "u2", "fuse rebuilds bidirectional sentiment models; this one is a sentiment with 1"
    )
    fails(ROOT / "models" / "charlm" / "1", tiny_text, tmp_path / "c2", "this one is a charlm with 1 direction(s)")
    fails(tmp_path / "nowhere" / "1", tiny_sst2, tmp_path / "n2", "file not found (expected models/NAME/VERSION)")
    assert not any((tmp_path / d).exists() for d in ("u2", "c2", "n2"))  # nothing written

    v1 = train(tmp_path / "bi", tiny_sst2, "--ensemble", "1")
    fails(v1, tiny_sst2, v1, "--out must differ from --model")
    busy = v1.parent / "3"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    fails(v1, tiny_sst2, busy, "already exists and is not empty")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    v2 = fused(v1, tiny_sst2, capsys)
    fails(v2, tiny_sst2, v1.parent / "4", "already derived from sentiment/1")
    copied = tmp_path / "copied" / "sentiment" / "1"  # a fused graph whose manifest lost its record
    shutil.copytree(v2, copied)
    m = Manifest.load(copied / MANIFEST_FILE)
    m.model_copy(update={"training": {"command": "copied by hand"}}).dump(copied / MANIFEST_FILE)
    fails(copied, tiny_sst2, copied.parent / "2", "already runs b'bidirectional' (is this graph already fused?)")
    assert not (v1.parent / "4").exists() and not (copied.parent / "2").exists()


@pytest.mark.slow
def test_a_fused_graph_that_answers_differently_is_not_released(
    tmp_path: Path, tiny_sst2: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = train(tmp_path, tiny_sst2, "--ensemble", "2")
    real_build = fuse_module.build

    def misread(p: fuse_module.Parent, ir_version: int) -> onnx.ModelProto:  # one head's bias misread
        p.heads[0] = (p.heads[0][0], p.heads[0][1] + 0.01)
        return real_build(p, ir_version)

    monkeypatch.setattr(fuse_module, "build", misread)
    out = v1.parent / "2"
    refused(v1, tiny_sst2, out, capsys, "differ from the parent's by up to")
    assert not out.exists()


@pytest.mark.slow
def test_a_refusal_after_writing_began_leaves_no_folder(
    tmp_path: Path, tiny_sst2: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dev check runs on the written model; when it refuses, the half-written version folder goes away."""
    v1 = train(tmp_path, tiny_sst2, "--ensemble", "1")
    real_evaluate = evaluate_model  # (training.fuse's own name for it is what the patch replaces)

    def evaluate(model: Path, data: Path) -> dict[str, float]:
        ev = real_evaluate(model, data)
        return ev | {"dev_accuracy": ev["dev_accuracy"] - 0.5} if model.name == "2" else ev

    monkeypatch.setattr(fuse_module, "evaluate_model", evaluate)
    out = v1.parent / "2"
    refused(v1, tiny_sst2, out, capsys, "not the same answers; nothing written")
    assert not out.exists() and sorted(p.name for p in v1.parent.iterdir()) == ["1"]
