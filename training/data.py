"""Data loaders: Tiny Shakespeare (chars), SST-2 (words), ETTh1 (z-scored windows).

Every problem with a data file raises ``DataError`` with ONE line naming the file and what is wrong; the CLI
prints it and exits 2. Tokenization goes through ``service.core.tokenizers`` so serving matches training.
"""

from __future__ import annotations

import csv
import hashlib
import math
import urllib.request
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.core.manifest import Tokenizer
from service.core.tokenizers import Encoder, split_words

PAD, UNK = "<pad>", "<unk>"
ETT_SPLITS = (8640, 11520, 14400)  # Informer's 12/4/4 months of 30 days; the last ~4 months are unused
FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


class DataError(Exception):
    """A missing or malformed data file; ``str(err)`` is one line naming the file and the problem."""


def download(url: str, dest: Path, sha256: str) -> Path:
    """Fetch ``url`` to ``dest`` unless it is already there, and check its sha256 (for users without the data)."""
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        try:
            urllib.request.urlretrieve(url, tmp)
        except OSError as e:
            raise DataError(f"{url}: download failed: {e}") from None
        tmp.rename(dest)
    got = hashlib.sha256(dest.read_bytes()).hexdigest()
    if got != sha256:
        raise DataError(f"{dest}: sha256 {got} does not match the expected {sha256}; delete it and retry")
    return dest


def read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


# --- char LM ------------------------------------------------------------------------------------------------------


def load_chars(path: Path, val_fraction: float = 0.1) -> tuple[Tokenizer, IntArray, IntArray]:
    """Tiny Shakespeare: vocab = sorted distinct chars; train = first 90%, val = last 10% (as ids)."""
    text = read_text(path)
    if len(text) < 1000:
        raise DataError(f"{path}: only {len(text)} characters; need at least 1000 for a train/val split")
    tok = Tokenizer(kind="char", vocab=sorted(set(text)))
    ids = Encoder(tok).encode(text)
    cut = int(len(ids) * (1 - val_fraction))
    return tok, ids[:cut], ids[cut:]


# --- SST-2 --------------------------------------------------------------------------------------------------------


def read_tsv(path: Path) -> list[tuple[str, int]]:
    """GLUE SST-2 ``sentence\\tlabel`` rows (label 0/1); the trailing space GLUE leaves is stripped."""
    lines = read_text(path).splitlines()
    if lines[0].split("\t") != ["sentence", "label"]:
        raise DataError(f"{path}: header must be 'sentence<TAB>label', got {lines[0][:60]!r}")
    rows = []
    for n, row in enumerate(csv.reader(lines[1:], delimiter="\t", quoting=csv.QUOTE_NONE), start=2):
        if len(row) != 2 or row[1] not in ("0", "1"):
            raise DataError(f"{path}: line {n}: expected '<sentence><TAB><0|1>', got {row!r:.80}")
        rows.append((row[0].strip(), int(row[1])))
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    return rows


def load_sst2(folder: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory (expected the SST-2 folder with train.tsv and dev.tsv)")
    return read_tsv(folder / "train.tsv"), read_tsv(folder / "dev.tsv")


def word_tokenizer(texts: list[str], min_count: int = 1, max_size: int = 50_000, max_length: int = 128) -> Tokenizer:
    """Word vocab from the training texts: pad at 0, unk at 1, then by frequency (ties alphabetical)."""
    counts = Counter(w for t in texts for w in split_words(t, lowercase=True))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    vocab = [PAD, UNK, *words[: max_size - 2]]
    return Tokenizer(kind="word", vocab=vocab, unk_token=UNK, pad_token=PAD, lowercase=True, max_length=max_length)


def char_ngrams(word: str, n_min: int = 3, n_max: int = 5) -> list[str]:
    """fastText-style n-grams of ``<word>``."""
    w = f"<{word}>"
    return [w[i : i + n] for n in range(n_min, n_max + 1) for i in range(len(w) - n + 1)]


def ngram_table(vocab: list[str], buckets: int, specials: int = 2) -> IntArray:
    """(V, N) 1-based hashed n-gram bucket ids per vocab word, 0-padded; the first ``specials`` rows stay empty."""
    rows = [
        [] if i < specials else [zlib.crc32(g.encode()) % buckets + 1 for g in char_ngrams(w)]
        for i, w in enumerate(vocab)
    ]
    out = np.zeros((len(vocab), max(1, max(len(r) for r in rows))), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def pad_batch(seqs: list[IntArray], max_length: int) -> tuple[IntArray, IntArray]:
    """Right-pad with 0 to the batch's longest (cut at max_length) -> ids (B, T), lengths (B,) >= 1."""
    lengths = np.array([max(1, min(len(s), max_length)) for s in seqs], dtype=np.int64)
    ids = np.zeros((len(seqs), int(lengths.max())), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : min(len(s), max_length)] = s[:max_length]
    return ids, lengths


# --- ETTh1 --------------------------------------------------------------------------------------------------------


@dataclass
class EttData:
    columns: list[str]
    mean: FloatArray  # (F,) train-split statistics
    std: FloatArray  # (F,)
    train: FloatArray  # (rows, F) z-scored
    val: FloatArray
    test: FloatArray


def read_ett(path: Path) -> tuple[list[str], FloatArray]:
    """``date,<7 numeric columns>`` CSV -> (column names, values (rows, F))."""
    lines = read_text(path).splitlines()
    header = lines[0].split(",")
    if len(header) < 2 or header[0] != "date":
        raise DataError(f"{path}: header must start with 'date' followed by numeric columns, got {lines[0][:60]!r}")
    values = np.empty((len(lines) - 1, len(header) - 1), dtype=np.float64)
    for n, line in enumerate(lines[1:], start=2):
        fields = line.split(",")
        if len(fields) != len(header):
            raise DataError(f"{path}: line {n}: {len(fields)} fields, header has {len(header)}")
        try:
            values[n - 2] = [float(v) for v in fields[1:]]
        except ValueError:
            raise DataError(f"{path}: line {n}: non-numeric value in {line[:80]!r}") from None
    if not np.isfinite(values).all():
        raise DataError(f"{path}: contains NaN or infinite values")
    return header[1:], values.astype(np.float32)


def load_ett(path: Path, window: int = 96, splits: tuple[int, int, int] = ETT_SPLITS) -> EttData:
    """Standard split: train [0, a), val [a - L, b), test [b - L, c); z-scored with train stats."""
    columns, values = read_ett(path)
    a, b, c = splits
    if len(values) < c:
        raise DataError(f"{path}: {len(values)} data rows; the standard split needs at least {c}")
    mean = values[:a].mean(axis=0)
    std = values[:a].std(axis=0)
    if (std <= 0).any():
        raise DataError(f"{path}: a column is constant over the training rows (std 0)")
    z = ((values - mean) / std).astype(np.float32)
    return EttData(columns, mean, std, z[:a], z[a - window : b], z[b - window : c])


def windows(series: FloatArray, window: int, horizon: int) -> tuple[FloatArray, FloatArray]:
    """Every (history, target) pair, stride 1 -> x (N, window, F), y (N, horizon, F)."""
    n = len(series) - window - horizon + 1
    if n < 1:
        raise DataError(f"series of {len(series)} rows is too short for window {window} + horizon {horizon}")
    idx = np.arange(n)[:, None]
    x = series[idx + np.arange(window)[None, :]]
    y = series[idx + window + np.arange(horizon)[None, :]]
    return x, y


def char_streams(ids: IntArray, batch: int) -> IntArray:
    """Cut a long id sequence into ``batch`` parallel contiguous streams (B, N) for truncated BPTT."""
    n = len(ids) // batch
    if n < 2:
        raise DataError(f"text of {len(ids)} characters is too short for {batch} parallel streams")
    return ids[: n * batch].reshape(batch, n)


def perplexity(nats: float) -> float:
    return math.exp(nats)
