"""``seqserve-train ensemble``: trained sentiment models as one graph answering with the mean of their
probabilities; served like any sentiment model; clear refusals for members that cannot share one contract."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from bench.runtime import derived_pairs
from service.client import Client
from service.core.arrays import softmax
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, sha256_file
from tests.conftest import ServerHandle
from tests.training.fast import FAST, TINY_SENTIMENT
from training.cli import main
from training.evaluate import open_model, sentiment_logits

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
# Two committed models with the same vocabulary and held-out rows: sentiment/2 (sentiment/1's weights, fused) and
# sentiment/4 (sentiment/3's, fused).
MEMBERS = [MODELS / "sentiment" / "2", MODELS / "sentiment" / "4"]
TEXTS = ["a great movie", "boring and dull", "i love this film , not", "x", "the plot is a mess but the cast shines"]


def _probabilities(model: Path, texts: list[str]) -> np.ndarray:
    m, session = open_model(model)
    return softmax(sentiment_logits(m, session, texts))


def _ensemble(out: Path, data: Path, *extra: str, members: list[Path] = MEMBERS) -> int:
    args = ["ensemble", *(a for p in members for a in ("--model", str(p))), "--data", str(data), "--out", str(out)]
    return main([*args, *extra])


def test_the_graph_answers_with_the_mean_of_its_members(
    tmp_path: Path, tiny_sst2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sentiment" / "9"
    assert _ensemble(out, tiny_sst2) == 0
    assert "2 models; largest logit difference" in capsys.readouterr().out
    want = np.mean([_probabilities(p, TEXTS) for p in MEMBERS], axis=0)
    np.testing.assert_allclose(_probabilities(out, TEXTS), want, atol=1e-6)
    # the states are the members' states, stacked by rows in --model order
    m = Manifest.load(out / MANIFEST_FILE)
    assert [s.shape for s in m.states] == [[12, "batch", 128], [12, "batch", 128]]
    assert [x.shape for x in m.inputs if x.name in ("h0", "c0")] == [[12, "batch", 128]] * 2
    assert [x.shape for x in m.outputs if x.name in ("hn", "cn")] == [[12, "batch", 128]] * 2
    record = m.training["ensemble"]
    assert m.training["ensemble_of"] == [str(p) for p in MEMBERS]
    assert record["max_logit_gap"] <= 1e-4 and record["max_state_gap"] <= 1e-4
    # its metrics are recomputed from the written graph: the held-out accuracy is the members' mean's
    capsys.readouterr()
    assert main(["heldout", *(a for p in MEMBERS for a in ("--model", str(p))), "--data", str(tiny_sst2)]) == 0
    mean = json.loads(capsys.readouterr().out)["mean_of_probabilities"]["heldout_accuracy"]
    metrics = {x.name: x.value for x in m.metrics}
    assert metrics["heldout_accuracy"] == pytest.approx(mean) == pytest.approx(record["evaluation"]["heldout_accuracy"])
    assert metrics["accuracy"] == record["evaluation"]["dev_accuracy"]
    assert m.card is not None and any("Runs 2 models per request" in limit for limit in m.card.limits)
    # its report is its own: it was the first member's (that member's evaluate command, parameters, temperature,
    # training run and curve), with the ensemble's command on top
    report = json.loads((out / "metrics.json").read_text())
    assert report["evaluate_command"] == f"seqserve-train evaluate --model {out} --data {tiny_sst2}"
    assert report["parameters"] == m.architecture.parameters and report["members"] == [str(p) for p in MEMBERS]
    assert report["onnx_metrics"].items() <= record["evaluation"].items() and "dev_accuracy" in report["onnx_metrics"]
    assert not {"temperature", "train_config", "best_step", "evaluations", "parent"} & set(report)
    assert not (out / "training_curve.png").exists()


def _with_words(src: Path, dst: Path, words: list[str], seed: int) -> Path:
    """A copy of ``src`` whose vocabulary ends with ``words``, each with an embedding row of its own (random, at the
    table's scale): the shape of a model trained with GloVe words added to its vocabulary."""
    shutil.copytree(src, dst)
    graph = onnx.load(str(dst / MODEL_FILE))
    (table,) = [t for t in graph.graph.initializer if t.name == "embed.weight"]
    old = onnx.numpy_helper.to_array(table)
    rows = np.random.default_rng(seed).normal(0.0, float(old.std()), (len(words), old.shape[1])).astype(old.dtype)
    table.CopyFrom(onnx.numpy_helper.from_array(np.concatenate([old, rows]), table.name))
    onnx.save(graph, str(dst / MODEL_FILE))
    raw = json.loads((dst / MANIFEST_FILE).read_text())
    raw["tokenizer"]["vocab"] += words
    raw["sha256"] = sha256_file(dst / MODEL_FILE)
    (dst / MANIFEST_FILE).write_text(json.dumps(raw))
    return dst


def test_members_with_different_vocabularies_each_read_their_own_ids(tmp_path: Path, tiny_sst2: Path) -> None:
    """Each member extended with words the other lacks: the graph's vocabulary is the first's plus the second's
    new words, and every text gets the mean of what each member answers through its own tokenizer (a word a member
    lacks is its <unk>)."""
    ours, theirs = ["zorbful", "glimmerous"], ["quaxy", "flurbid", "zorbful"]
    members = [
        _with_words(MEMBERS[0], tmp_path / "a" / "sentiment" / "1", ours, seed=1),
        _with_words(MEMBERS[1], tmp_path / "b" / "sentiment" / "1", theirs, seed=2),
    ]
    out = tmp_path / "sentiment" / "9"
    assert _ensemble(out, tiny_sst2, members=members) == 0
    vocab = Manifest.load(members[0] / MANIFEST_FILE).tokenizer.vocab  # type: ignore[union-attr]
    m = Manifest.load(out / MANIFEST_FILE)
    assert m.tokenizer is not None and m.tokenizer.vocab == [*vocab, "quaxy", "flurbid"]
    texts = [*TEXTS, "a zorbful movie", "quaxy and flurbid", "glimmerous , quaxy , zorbful", "zorbful"]
    want = np.mean([_probabilities(p, texts) for p in members], axis=0)
    np.testing.assert_allclose(_probabilities(out, texts), want, atol=1e-6)
    # the new words change the answers (the check above is not only on words both members share)
    plain = np.mean([_probabilities(p, texts) for p in MEMBERS], axis=0)
    assert np.abs(_probabilities(out, texts)[-4:] - plain[-4:]).max() > 1e-3
    assert np.abs(_probabilities(out, texts)[:-4] - plain[:-4]).max() < 1e-6
    assert m.training["ensemble"]["max_logit_gap"] <= 1e-4


def test_half_stores_float16_and_stays_close(tmp_path: Path, tiny_sst2: Path) -> None:
    full, half = tmp_path / "sentiment" / "8", tmp_path / "sentiment" / "9"
    assert _ensemble(full, tiny_sst2) == 0 and _ensemble(half, tiny_sst2, "--half") == 0
    ratio = (half / MODEL_FILE).stat().st_size / (full / MODEL_FILE).stat().st_size
    assert 0.45 < ratio < 0.55  # the weights are nearly all of the file
    np.testing.assert_allclose(_probabilities(half, TEXTS), _probabilities(full, TEXTS), atol=5e-3)
    assert Manifest.load(half / MANIFEST_FILE).training["ensemble"]["half"] is True


@pytest.mark.slow
def test_members_with_different_state_rows(tmp_path: Path, tiny_sst2: Path) -> None:
    """A one-member net (2 state rows) beside a three-member one (6): the states stack as 2 + 6 rows, each member
    reads its own."""
    trained = []
    for name, members in (("one", "1"), ("three", "3")):
        out = tmp_path / name / "1"
        args = ["sentiment", "--data", str(tiny_sst2), "--out", str(out), "--run-dir", str(tmp_path / f"run-{name}")]
        assert main([*args, *FAST, *TINY_SENTIMENT, "--ensemble", members, "--epochs", "1"]) == 0
        trained.append(out)
    out = tmp_path / "sentiment" / "9"
    assert _ensemble(out, tiny_sst2, members=trained) == 0
    m = Manifest.load(out / MANIFEST_FILE)
    assert [s.shape for s in m.states] == [[8, "batch", 8], [8, "batch", 8]]
    assert m.training["ensemble"]["max_state_gap"] <= 1e-4  # each member's rows are its own states
    want = np.mean([_probabilities(p, TEXTS) for p in trained], axis=0)
    np.testing.assert_allclose(_probabilities(out, TEXTS), want, atol=1e-6)


def test_an_int8_member_brings_its_operator_set(tmp_path: Path, tiny_sst2: Path) -> None:
    """An int8 copy runs ONNX Runtime's com.microsoft ops: the combined graph imports that domain too."""
    members = [MODELS / "sentiment-int8" / "3", MEMBERS[0]]
    out = tmp_path / "sentiment" / "9"
    assert _ensemble(out, tiny_sst2, members=members) == 0
    domains = {o.domain for o in onnx.load(str(out / MODEL_FILE)).opset_import}
    assert "com.microsoft" in domains and "" in domains
    want = np.mean([_probabilities(p, TEXTS) for p in members], axis=0)
    np.testing.assert_allclose(_probabilities(out, TEXTS), want, atol=1e-6)


def test_the_ensemble_serves_beside_its_members(
    tmp_path: Path, tiny_sst2: Path, start_server: Callable[..., ServerHandle]
) -> None:
    models = tmp_path / "models"
    for p in MEMBERS:
        shutil.copytree(p, models / "sentiment" / p.name)
    copies = [models / "sentiment" / p.name for p in MEMBERS]
    assert _ensemble(models / "sentiment" / "9", tiny_sst2, members=copies) == 0
    server = start_server(models=models)
    with Client(server.target) as c:
        combined = c.classify(TEXTS, model="sentiment")  # the newest version: the ensemble
        alone = [c.classify(TEXTS, model="sentiment", version=int(p.name)) for p in MEMBERS]
    want = np.mean([[r.probabilities for r in rs] for rs in alone], axis=0)
    np.testing.assert_allclose([r.probabilities for r in combined], want, atol=1e-5)
    # make bench's runtime table times it against its first committed member (and sentiment/4 against its parent,
    # which this folder lacks)
    pairs = [(a, b, how) for a, b, _, how in derived_pairs(models)]
    assert (copies[0], models / "sentiment" / "9", "ensemble") in pairs


def test_ensemble_refuses_members_that_cannot_share_a_contract(
    tmp_path: Path, tiny_sst2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def edited(name: str, change: Callable[[dict[str, object]], None]) -> Path:
        copy = tmp_path / name / "sentiment" / "7"
        shutil.copytree(MEMBERS[0], copy)
        raw = json.loads((copy / MANIFEST_FILE).read_text())
        change(raw)
        (copy / MANIFEST_FILE).write_text(json.dumps(raw))
        return copy

    def other_rows(raw: dict[str, object]) -> None:
        raw["training"]["heldout_fraction"] = 0.2  # type: ignore[index]

    def other_rules(raw: dict[str, object]) -> None:
        raw["tokenizer"]["lowercase"] = False  # type: ignore[index]

    def already(raw: dict[str, object]) -> None:
        raw["training"]["ensemble_of"] = ["a", "b"]  # type: ignore[index]

    older = edited("opset", lambda raw: None)  # the same model, its graph marked with another ONNX opset
    graph = onnx.load(str(older / MODEL_FILE))
    graph.opset_import[0].version = 16
    onnx.save(graph, str(older / MODEL_FILE))
    marked = json.loads((older / MANIFEST_FILE).read_text())  # (as its export would have written it)
    (older / MANIFEST_FILE).write_text(json.dumps(marked | {"sha256": sha256_file(older / MODEL_FILE)}))

    def no_unk(raw: dict[str, object]) -> None:
        raw["tokenizer"]["unk_token"] = None  # type: ignore[index]

    # neither knows an unknown-word token, and the second has a word the first lacks
    without_unk = [
        edited("no-unk", no_unk),
        _with_words(edited("no-unk-2", no_unk), tmp_path / "x" / "1", ["quaxy"], 3),
    ]

    cases = [
        ([MEMBERS[0]], "ensemble needs two or more --model"),
        ([MEMBERS[0], MODELS / "charlm" / "1"], "is a 'charlm' model"),
        ([MEMBERS[0], edited("rows", other_rows)], "held out different rows"),
        ([MEMBERS[0], edited("rules", other_rules)], "(lowercase False against True); members must split"),
        ([MEMBERS[0], edited("again", already)], "already an ensemble"),
        ([MEMBERS[0], older], "at versions 17 and 16"),
        (without_unk, "cannot read the other members' words it lacks (1, e.g. 'quaxy')"),
    ]
    for members, says in cases:
        out = tmp_path / "out" / "sentiment" / "9"
        capsys.readouterr()
        assert _ensemble(out, tiny_sst2, members=members) == 2, says
        assert says in capsys.readouterr().err
        assert not out.exists()  # a refusal writes nothing
