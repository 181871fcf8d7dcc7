"""Data loaders: Tiny Shakespeare (chars), SST-2 (words); forecasting CSVs are in ``training/series.py``.

Every problem with a data file raises ``DataError`` with ONE line naming the file and what is wrong; the CLI
prints it and exits 2. Tokenization goes through ``service.core.tokenizers`` so serving matches training.
"""

from __future__ import annotations

import csv
import hashlib
import math
import random
import re
import urllib.request
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.core.manifest import Tokenizer, sha256_file
from service.core.tokenizers import Encoder, split_words

PAD, UNK = "<pad>", "<unk>"
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


# The public data sets of the committed models, by the sha256 of their files as published (the copies in
# ../shared/data, whose PROVENANCE.md gives the same sums): a manifest and its card name one of these data sets only
# when the training file's bytes are that set's, and otherwise the file itself.
PUBLIC_DATA = {
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed": "Tiny Shakespeare",  # input.txt
    "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1": "SST-2",  # train.tsv (with SST2_DEV)
    "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066": "ETTh1.csv",
    "6ce1759b1a18e3328421d5d75fadcb316c449fcd7cec32820c8dafda71986c9e": "ETTm1.csv",
    "8cb51be753a718d9be5d76d7e238cc224792754676adc21faa59e954b0201621": "AirPassengers",  # airline-passengers.csv
}
SST2_DEV = "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0"  # dev.tsv


def data_sha256(path: Path) -> str:
    """The sha256 of a data file; of a folder (SST-2's), of its train.tsv and dev.tsv sums joined by a newline."""
    if path.is_dir():
        return hashlib.sha256("\n".join(data_sha256(path / f) for f in ("train.tsv", "dev.tsv")).encode()).hexdigest()
    try:
        return sha256_file(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None


def public_data(path: Path) -> str | None:
    """The public data set ``path`` holds (``PUBLIC_DATA``'s name: a file, or SST-2's folder whose train.tsv and
    dev.tsv are both the published ones), else None: the user's own data."""
    try:
        if path.is_dir():
            if data_sha256(path / "dev.tsv") != SST2_DEV:
                return None
            path = path / "train.tsv"
        return PUBLIC_DATA.get(data_sha256(path))
    except DataError:
        return None


def read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark (some editors write one) is not text
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
    vocab = sorted(set(text))
    if len(vocab) < 2:  # (one character: nothing to predict, and the export's example input cannot be drawn)
        raise DataError(f"{path}: holds only the character {vocab[0]!r}; a language model needs at least two")
    tok = Tokenizer(kind="char", vocab=vocab)
    ids = Encoder(tok).encode(text)
    cut = int(len(ids) * (1 - val_fraction))
    return tok, ids[:cut], ids[cut:]


# --- SST-2 --------------------------------------------------------------------------------------------------------

_PTB_NEGATIONS = {"ca": "can't", "wo": "won't", "ai": "ain't"}


def written_form(text: str) -> str:
    """An SST sentence as people write it, not as the Penn Treebank tokenizes it: contractions joined ("does n't"
    -> "doesn't", "ca n't" -> "can't", "it 's" -> "it's"), no space before punctuation, `` and '' as ". What a
    client sends the server; the model was trained and is scored (``dev_accuracy``) on the tokenized form."""
    text = re.sub(r"\b(ca|wo|ai) n't\b", lambda m: _PTB_NEGATIONS[m.group(1)], text)
    text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    text = re.sub(r" ([,.!?;:])", r"\1", text)
    return text.replace("`` ", '"').replace(" ''", '"')


def long_texts(rows: list[tuple[str, int]], k: int = 8, n: int = 300, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` long texts made of labelled sentences (``dev_accuracy_long``): each joins ``k`` distinct sentences
    of one label, labels alternating (0, 1, 0, ...), drawn with ``random.Random(seed)``. A review is several
    sentences; SST-2 holds single ones. Empty when a label has fewer than ``k`` sentences."""
    by_label = {label: [t for t, y in rows if y == label] for label in (0, 1)}
    if min(len(texts) for texts in by_label.values()) < k:
        return []
    rng = random.Random(seed)
    return [(" ".join(rng.sample(by_label[i % 2], k)), i % 2) for i in range(n)]


def read_tsv(path: Path) -> list[tuple[str, int]]:
    """GLUE SST-2 ``sentence\\tlabel`` rows (label 0/1); the trailing space GLUE leaves is stripped."""
    lines = read_text(path).splitlines()
    while not lines[-1].strip():
        lines.pop()  # blank lines at the end (read_text refused a blank file)
    if lines[0].split("\t") != ["sentence", "label"]:
        raise DataError(f"{path}: header must be 'sentence<TAB>label', got {lines[0][:60]!r}")
    rows = []
    for n, row in enumerate(csv.reader(lines[1:], delimiter="\t", quoting=csv.QUOTE_NONE), start=2):
        if not row:
            raise DataError(f"{path}: line {n} is blank; remove it")
        if len(row) != 2 or row[1].strip() not in ("0", "1"):
            raise DataError(f"{path}: line {n}: expected '<sentence><TAB><0|1>', got {row!r:.80}")
        if not row[0].strip():
            raise DataError(f"{path}: line {n}: the sentence is empty")
        rows.append((row[0].strip(), int(row[1])))
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    return rows


def load_sst2(folder: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory (expected the SST-2 folder with train.tsv and dev.tsv)")
    return read_tsv(folder / "train.tsv"), read_tsv(folder / "dev.tsv")


def word_runs(text: str) -> Iterator[str]:
    """Every run of whole words of ``text``, ``text`` itself included."""
    words = text.split()
    for i in range(len(words)):
        for j in range(i + 1, len(words) + 1):
            yield " ".join(words[i:j])


def sentence_rows(texts: list[str]) -> list[bool]:
    """Which rows are whole sentences: SST-2's train.tsv mixes the treebank's sentences with their phrases, and a
    row is taken for a sentence when no other row contains it as a run of whole words."""
    seen = set(texts)
    contained = {run for text in seen for run in word_runs(text) if run != text and run in seen}
    return [t not in contained for t in texts]


def hold_out_sentences(
    rows: list[tuple[str, int]], fraction: float, rng: np.random.Generator
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(fit, held): ``fraction`` of the whole sentences held out, and every row that is a run of words of a held-out
    sentence left out of fit too, so the held-out sentences read as new text, as the dev sentences do."""
    texts = [t for t, _ in rows]
    sentences = sorted({t for t, s in zip(texts, sentence_rows(texts), strict=True) if s})
    n_held = max(1, int(len(sentences) * fraction))
    chosen = {sentences[i] for i in rng.permutation(len(sentences))[:n_held]}
    parts = {run for text in chosen for run in word_runs(text)}
    held, fit, taken = [], [], set()
    for text, y in rows:
        if text in chosen:
            if text not in taken:  # a sentence listed twice is held out once
                taken.add(text)
                held.append((text, y))
        elif text not in parts:
            fit.append((text, y))
    return fit, held


def heldout_split(
    rows: list[tuple[str, int]], kind: str, fraction: float, rng: np.random.Generator
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(fit, held) as sentiment training splits train.tsv: ``kind`` "rows" holds out a random ``fraction`` of the
    rows (phrases and sentences), "sentences" that fraction of the whole sentences (``hold_out_sentences``). The
    same ``rng`` state gives the same split (``seqserve-train heldout`` recomputes it from the manifest's seed)."""
    if kind == "sentences":
        return hold_out_sentences(rows, fraction, rng)
    order = rng.permutation(len(rows))
    n = int(len(rows) * fraction)
    return [rows[i] for i in order[n:]], [rows[i] for i in order[:n]]


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


def char_streams(ids: IntArray, batch: int) -> IntArray:
    """Cut a long id sequence into ``batch`` parallel contiguous streams (B, N) for truncated BPTT."""
    n = len(ids) // batch
    if n < 2:
        raise DataError(f"text of {len(ids)} characters is too short for {batch} parallel streams")
    return ids[: n * batch].reshape(batch, n)


def perplexity(nats: float) -> float:
    return math.exp(nats)
