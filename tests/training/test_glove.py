"""GloVe folding: words known only from GloVe get their vectors in the exported table; padding invariance holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from service.core.arrays import right_pad, zero_states
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, Tokenizer
from service.core.tokenizers import Encoder
from training.cards import CARDS, calibrated, generic_card
from training.cli import main
from training.export import ort_run, write_model
from training.glove import Glove, extend_vocab, glove_table, load_glove
from training.nets import NetConfig, SentimentNet, build_net, zero_state

WORDS = ["the", "good", "great", "bad", "awful", "superb", "dreadful", "well", "made", "u.s."]


@pytest.fixture
def glove_dir(tmp_path: Path) -> Path:
    """The package's two files, tiny: 10 words x 6 dims; 'superb' and 'dreadful' point like 'great' and 'awful'."""
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(WORDS), 6)).astype(np.float32)
    vectors[WORDS.index("superb")] = vectors[WORDS.index("great")] + 0.01
    vectors[WORDS.index("dreadful")] = vectors[WORDS.index("awful")] - 0.01
    d = tmp_path / "glove"
    d.mkdir()
    np.save(d / "glove_6B_50d_emb.npy", vectors)
    pq.write_table(pa.table({"index": WORDS}), d / "glove_6B_index.parquet")
    return d


def test_load_extend_and_table(glove_dir: Path) -> None:
    g = load_glove(glove_dir)
    assert g.words == WORDS and g.dim == 6
    vocab = extend_vocab(["<pad>", "<unk>", "good", "well-made"], g, top=10)
    assert vocab[4:] == ["the", "great", "bad", "awful", "superb", "dreadful", "well", "made"]  # not 'u.s.'
    table, found = glove_table([*vocab, "zzz"], g)
    assert found == len(vocab) - 2  # every word but pad and unk ('well-made' from its parts), not 'zzz'
    np.testing.assert_array_equal(table[:2], 0)
    np.testing.assert_allclose(table[vocab.index("superb")], g.vectors[WORDS.index("superb")])
    np.testing.assert_allclose(table[3], g.vectors[[WORDS.index("well"), WORDS.index("made")]].mean(0))
    np.testing.assert_array_equal(table[-1], 0)


def _glove_net(g: Glove, vocab: list[str], learned: int) -> SentimentNet:
    torch.manual_seed(0)
    cfg = NetConfig(
        task="sentiment", cell="lstm", hidden=8, bidirectional=True, vocab=len(vocab), embedding=4,
        subword_buckets=50, glove=g.dim, ensemble=2,
    )  # fmt: skip
    net = build_net(cfg)
    assert isinstance(net, SentimentNet)
    from training.data import ngram_table

    net.set_ngrams(torch.from_numpy(ngram_table(vocab, 50)))
    net.set_glove(torch.from_numpy(glove_table(vocab, g)[0]), learned)
    return net.eval()


def test_glove_only_word_gets_its_vector_after_export(tmp_path: Path, glove_dir: Path) -> None:
    g = load_glove(glove_dir)
    vocab = extend_vocab(["<pad>", "<unk>", "good", "bad", "great", "awful"], g, top=10)
    net = _glove_net(g, vocab, learned=6)  # 'superb', 'dreadful', ... were never in training
    superb = vocab.index("superb")
    assert float(net.embed.weight[superb].detach().abs().sum()) == 0.0  # no own vector: GloVe (+ sub-words) only
    ids, lengths = torch.tensor([[2, superb, 0]]), torch.tensor([2])
    with torch.no_grad():
        before = net(ids, lengths, *zero_state(net, 1))[0]
        net.bake(half=True)
        after = net(ids, lengths, *zero_state(net, 1))[0]
    assert net.embed.weight.dtype == torch.float16 and net.embed.weight.shape == (len(vocab), 4 + 6)
    folded = net.embed.weight[superb].float()
    torch.testing.assert_close(folded[4:], torch.from_numpy(g.vectors[WORDS.index("superb")]), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(after, before, atol=5e-3, rtol=5e-3)  # float16 storage, float32 math
    tok = Tokenizer(kind="word", vocab=vocab, unk_token="<unk>", pad_token="<pad>", lowercase=True)
    out = write_model(net, net.cfg, tmp_path / "m" / "1", name="m", version=1, tokenizer=tok, labels=["n", "p"])
    m = Manifest.load(out / MANIFEST_FILE)
    texts = [[2, superb, 3, 4], [superb], [5, 5]]  # padding invariance through ORT: a text alone = in a batch
    batch_ids, batch_len = right_pad([np.array(t) for t in texts], pad=0)

    def run(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "lengths": lengths, **zero_states(m.states, {"batch": len(ids)})}
        logits: np.ndarray = ort_run(out / MODEL_FILE, feeds)[0]
        return logits

    batch, alone = run(batch_ids, batch_len), run(np.array([[superb]]), np.array([1]))
    np.testing.assert_allclose(alone[0], batch[1], atol=1e-5)
    unk = run(np.array([[1]]), np.array([1]))
    assert np.abs(unk - alone).max() > 1e-4  # a GloVe-only word is not read as <unk>


@pytest.mark.slow
def test_train_sentiment_with_glove(tmp_path: Path, tiny_sst2: Path, glove_dir: Path) -> None:
    out = tmp_path / "sentiment-glove" / "1"  # the released ensemble's name: the run still gets a GloVe run's card
    args = ["sentiment", "--data", str(tiny_sst2), "--out", str(out), "--run-dir", str(tmp_path / "run")]
    args += ["--no-progress", "--threads", "1", "--warmup-steps", "2", "--hidden", "8", "--embedding", "8"]
    args += ["--epochs", "2", "--batch-size", "32", "--heldout-fraction", "0.2", "--ensemble", "1"]
    args += ["--glove", "--glove-dir", str(glove_dir), "--glove-top", "10", "--half-table"]
    assert main(args) == 0
    m = Manifest.load(out / MANIFEST_FILE)
    assert m.tokenizer is not None and "superb" in m.tokenizer.vocab and "u.s." not in m.tokenizer.vocab
    assert m.architecture.embedding == 8 and m.training["frozen_words_added"] >= 2 and m.training["temperature"] > 0
    assert [x.name for x in m.metrics] == ["accuracy", "heldout_accuracy", "ece"]
    assert m.card is not None and "GloVe" in m.card.data and "PDDL" in m.card.license
    # a GloVe run's kind of card, not the released ensemble's; trained on a toy folder, not SST-2: the generic one
    assert (
        m.card == calibrated(generic_card("sentiment", ("glove",)), True) != calibrated(CARDS["sentiment-glove"], True)
    )
    report = json.loads((out / "metrics.json").read_text())
    assert 0 <= report["onnx_metrics"]["dev_ece"] <= 1
    ids = Encoder(m.tokenizer).encode("a superb film")
    assert 1 not in ids.tolist()[1:2]


def test_glove_init_starts_train_words_from_their_vectors(glove_dir: Path) -> None:
    g = load_glove(glove_dir)
    vocab = extend_vocab(["<pad>", "<unk>", "good", "zzz"], g, top=10)
    table = torch.from_numpy(glove_table(vocab, g)[0])
    torch.manual_seed(0)
    net = build_net(NetConfig(task="sentiment", vocab=len(vocab), embedding=8, glove=g.dim, hidden=4))
    assert isinstance(net, SentimentNet)
    net.set_glove(table, learned_rows=4, init=True)
    w = net.embed.weight.detach()
    torch.testing.assert_close(w[2, :6], table[2])  # 'good': its GloVe vector in the first dims
    assert w[3].abs().sum() > 0 and not torch.equal(w[3, :6], table[3])  # 'zzz': GloVe lacks it, noise stays
    assert float(w[4:].abs().sum()) == 0.0  # GloVe-only words: no own vector
