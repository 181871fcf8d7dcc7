"""The VADER lexicon channel: the package's file read as frozen word features, folded into the exported table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from service.core.arrays import zero_states
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from service.core.tokenizers import Encoder
from tests.training import fast
from tests.training.fast import TINY_SENTIMENT
from training.cards import NOT_CALIBRATED, TEMPERATURE_SCALED
from training.cli import main
from training.data import DataError
from training.export import ort_run
from training.glove import extend_vocab, glove_table
from training.lexicon import FEATURES, load_vader

FAST = [*fast.FAST, *TINY_SENTIMENT, "--epochs", "2"]


@pytest.fixture
def lexicon_dir(tmp_path: Path) -> Path:
    """The package's file, tiny: two words the toy train split never shows ('superb', 'dreadful'), one it does."""
    d = tmp_path / "vader"
    d.mkdir()
    rows = [
        ":)\t2.0\t0.5\t[2, 2, 2, 2, 2, 2, 2, 2, 2, 2]",
        "dreadful\t-3.2\t0.6\t[-3, -3, -4, -3, -3, -3, -4, -3, -3, -3]",
        "great\t3.1\t0.7\t[3, 3, 4, 3, 3, 3, 3, 3, 3, 3]",
        "superb\t3.6\t0.5\t[4, 3, 4, 4, 3, 4, 3, 4, 4, 3]",
    ]
    (d / "vader_lexicon.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return d


def test_load_scales_ratings_and_extends_the_vocab(lexicon_dir: Path) -> None:
    lex = load_vader(lexicon_dir)
    assert lex.words == [":)", "dreadful", "great", "superb"] and lex.dim == len(FEATURES) == 3
    np.testing.assert_allclose(lex.vectors[1], [-0.8, 0.15, 1.0])
    vocab = extend_vocab(["<pad>", "<unk>", "great", "film"], lex)  # every lexicon word; ':)' is two tokens
    assert vocab == ["<pad>", "<unk>", "great", "film", "dreadful", "superb"]
    table, found = glove_table(vocab, lex)
    assert found == 3 and not table[3].any() and table[5][0] == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("line", "says"),
    [("good\tx\t0.5\t[]", "good.txt:2: expected"), ("good\t4.5\t0.5\t[]", "outside the lexicon's -4..4")],
)
def test_a_malformed_lexicon_names_its_line(tmp_path: Path, line: str, says: str) -> None:
    (tmp_path / "vader_lexicon.txt").write_text("bad\t-2.5\t0.5\t[]\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=says.replace("good.txt", "vader_lexicon.txt")):
        load_vader(tmp_path)


def test_the_package_lexicon() -> None:
    lex = load_vader()  # the train extra installs vaderSentiment
    index = lex.index()
    assert len(lex.words) > 7000
    assert lex.vectors[index["good"], 0] > 0.3 and lex.vectors[index["awful"], 0] < -0.3
    assert np.all(lex.vectors[:, 2] == 1.0) and np.all(np.abs(lex.vectors[:, 0]) <= 1.0)


@pytest.mark.slow
def test_train_sentiment_with_the_lexicon(tmp_path: Path, tiny_sst2: Path, lexicon_dir: Path) -> None:
    out = tmp_path / "sentiment" / "1"
    args = ["sentiment", "--data", str(tiny_sst2), "--out", str(out), "--run-dir", str(tmp_path / "run"), *FAST]
    args += ["--lexicon", "--lexicon-dir", str(lexicon_dir), "--glove-dropout", "0.1", "--no-calibrate"]
    assert main(args) == 0
    m = Manifest.load(out / MANIFEST_FILE)
    assert m.tokenizer is not None and {"superb", "dreadful"} <= set(m.tokenizer.vocab)
    assert m.training["frozen_words_added"] == 2 and m.training["vader_rows_with_vector"] == 3
    assert m.training["blank_dropout"] == 0.1 and "VADER lexicon" in m.description
    assert m.card is not None and "VADER" in m.card.data and "MIT" in m.card.license
    assert NOT_CALIBRATED in m.card.limits and TEMPERATURE_SCALED not in m.card.limits  # --no-calibrate
    # the exported table: 8 learned (+ sub-word) dims, then the 3 ratings, folded in
    vocab = m.tokenizer.vocab
    graph = onnx.load(out / MODEL_FILE).graph
    (table,) = [numpy_helper.to_array(t) for t in graph.initializer if list(t.dims) == [len(vocab), 11]]
    np.testing.assert_allclose(table[vocab.index("superb"), 8:], [0.9, 0.125, 1.0], rtol=1e-6)
    np.testing.assert_allclose(table[vocab.index("great"), 8:], [0.775, 0.175, 1.0], rtol=1e-6)
    assert not table[vocab.index("film"), 8:].any()

    enc = Encoder(m.tokenizer)

    def positive(text: str) -> float:
        ids = enc.encode(text)[None]
        feeds = {"input_ids": ids, "lengths": np.array([ids.shape[1]]), **zero_states(m.states, {"batch": 1})}
        logits = ort_run(out / MODEL_FILE, feeds)[0][0]
        return float(logits[1] - logits[0])

    assert positive("superb") != pytest.approx(positive("zzzz"))  # a lexicon-only word is not read as <unk>


def test_glove_init_needs_glove(
    tmp_path: Path, tiny_sst2: Path, lexicon_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sentiment" / "1"
    args = ["sentiment", "--data", str(tiny_sst2), "--out", str(out), "--lexicon", "--lexicon-dir", str(lexicon_dir)]
    assert main([*args, "--glove-init", *FAST]) == 2
    assert "--glove-init needs --glove" in capsys.readouterr().err and not out.exists()
