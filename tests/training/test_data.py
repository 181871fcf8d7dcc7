"""Loaders: splits, vocabularies, and one clear error line per bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.core.tokenizers import Encoder
from training.data import (
    DataError,
    char_streams,
    hold_out_sentences,
    load_chars,
    load_sst2,
    long_texts,
    read_tsv,
    sentence_rows,
    word_tokenizer,
)


def test_chars_split_90_10(tiny_text: Path) -> None:
    tok, train, val = load_chars(tiny_text)
    text = tiny_text.read_text()
    assert tok.kind == "char" and tok.vocab == sorted(set(text))
    assert len(train) == int(len(text) * 0.9) and len(train) + len(val) == len(text)
    assert Encoder(tok).decode(val) == text[len(train) :]


def test_char_streams_are_contiguous() -> None:
    s = char_streams(np.arange(103), 4)
    assert s.shape == (4, 25) and s[1, 0] == 25 and s[1, -1] == 49


def test_sst2_vocab_pad_unk_and_padding(tiny_sst2: Path) -> None:
    train, dev = load_sst2(tiny_sst2)
    assert len(train) == 300 and len(dev) == 40 and not train[0][0].endswith(" ")
    tok = word_tokenizer([t for t, _ in train])
    assert tok.vocab[:2] == ["<pad>", "<unk>"] and tok.pad_token == "<pad>" and tok.lowercase
    ids = Encoder(tok).encode("A GREAT zebra")
    assert ids.tolist()[2] == 1  # unknown word -> unk


def _one_line(e: pytest.ExceptionInfo[DataError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_chars(tmp_path / "nope.txt")
    assert _one_line(e) == f"{tmp_path / 'nope.txt'}: file not found"
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="file is empty"):
        load_chars(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match="not UTF-8"):
        load_chars(tmp_path / "bin.txt")
    with pytest.raises(DataError, match="not a directory"):
        load_sst2(tmp_path / "nope")


def test_malformed_tsv_names_line(tmp_path: Path) -> None:
    p = tmp_path / "train.tsv"
    p.write_text("text\tlabel\nfine\t1\n")
    with pytest.raises(DataError, match="header must be 'sentence<TAB>label'"):
        read_tsv(p)
    p.write_text("sentence\tlabel\nfine\t1\nbroken\t7\n")
    with pytest.raises(DataError) as e:
        read_tsv(p)
    assert "line 3" in _one_line(e) and str(p) in str(e.value)
    for text, message in (
        ("sentence\tlabel\n\t1\nbad\t0\n", "line 2: the sentence is empty"),
        ("sentence\tlabel\ngood\t1\n\nbad\t0\n", "line 3 is blank; remove it"),
    ):
        p.write_text(text)
        with pytest.raises(DataError) as e:
            read_tsv(p)
        assert _one_line(e) == f"{p}: {message}"


def test_tsv_from_an_editor_reads_the_same(tmp_path: Path) -> None:
    """A byte-order mark, CRLF line ends, a space around the label and blank lines at the end (each once refused
    or, for the mark, read as part of the header) give the same rows."""
    p = tmp_path / "train.tsv"
    p.write_bytes(b"\xef\xbb\xbfsentence\tlabel\r\na fine film \t 1\r\nbad\t0\r\n\r\n\n")
    assert read_tsv(p) == [("a fine film", 1), ("bad", 0)]


# A tiny treebank-shaped train.tsv: two sentences, each with some of its phrases as rows of their own.
TREEBANK = [
    ("a gorgeous , witty film", 1),
    ("gorgeous", 1),
    ("witty film", 1),
    ("a gorgeous", 1),
    ("the plot is a dull mess", 0),
    ("dull mess", 0),
    ("dull", 0),
    ("the plot", 1),
    ("mess", 0),
    ("witty", 1),
    ("gorgeous", 1),  # a phrase listed twice
]


def test_sentence_rows_are_the_rows_no_other_row_contains() -> None:
    flags = sentence_rows([t for t, _ in TREEBANK])
    assert [t for (t, _), f in zip(TREEBANK, flags, strict=True) if f] == [
        "a gorgeous , witty film", "the plot is a dull mess",
    ]  # fmt: skip
    assert sentence_rows(["film", "films"]) == [True, True]  # whole words only, not characters


def test_held_out_sentences_take_their_phrases_out_of_training() -> None:
    fit, held = hold_out_sentences(TREEBANK, 0.5, np.random.default_rng(0))
    assert len(held) == 1
    sentence = held[0][0]
    other = next(t for t in ("a gorgeous , witty film", "the plot is a dull mess") if t != sentence)
    assert (other, 1 if other.startswith("a ") else 0) in fit  # the other sentence trains
    for text, _ in fit:  # nothing of the held-out sentence is trained on
        assert f" {text} " not in f" {sentence} "
    fit_texts = {t for t, _ in fit}
    if sentence.startswith("a gorgeous"):
        assert fit_texts == {"the plot is a dull mess", "dull mess", "dull", "the plot", "mess"}
    else:
        assert fit_texts == {"a gorgeous , witty film", "gorgeous", "witty film", "a gorgeous", "witty"}


def test_a_text_under_1000_characters_is_refused(tmp_path: Path) -> None:
    """A char-LM text needs at least 1,000 characters; 999 are refused."""
    p = tmp_path / "short.txt"
    p.write_text("x" * 999)
    with pytest.raises(DataError) as e:
        load_chars(p)
    assert _one_line(e) == f"{p}: only 999 characters; need at least 1000 for a train/val split"
    p.write_text("xy" * 500)
    assert len(load_chars(p)[1]) == 900


def test_a_tsv_row_with_an_extra_field_is_refused(tmp_path: Path) -> None:
    """A stray tab (a third field) is named, not read as sentence + label."""
    p = tmp_path / "train.tsv"
    p.write_text("sentence\tlabel\nfine\t1\na film\t0\tnote\n")
    with pytest.raises(DataError) as e:
        read_tsv(p)
    assert _one_line(e).startswith(f"{p}: line 3: expected '<sentence><TAB><0|1>', got ")


def test_at_least_one_sentence_is_held_out() -> None:
    """A fraction too small for one whole sentence still holds one out."""
    _, held = hold_out_sentences(TREEBANK, 0.1, np.random.default_rng(0))
    assert len(held) == 1 and held[0][0] in ("a gorgeous , witty film", "the plot is a dull mess")


def test_min_count_keeps_words_seen_exactly_that_often() -> None:
    """min_count is inclusive: a word seen exactly that often is in the vocabulary."""
    tok = word_tokenizer(["a b a", "b c"], min_count=2)
    assert tok.vocab == ["<pad>", "<unk>", "a", "b"]


def test_written_form_undoes_the_treebank_tokenization() -> None:
    """``written_form``: an SST sentence as a client would send it (what ``dev_accuracy_written`` scores)."""
    from training.data import written_form

    assert written_form("it does n't work , and it 's dull .") == "it doesn't work, and it's dull."
    assert written_form("i ca n't , you wo n't ; they 're , we 've , i 'm") == "i can't, you won't; they're, we've, i'm"
    assert written_form("a `` great '' film !") == 'a "great" film!'
    assert written_form("plain words stay") == "plain words stay"


def test_long_texts_join_sentences_of_one_label() -> None:
    """``long_texts`` (what ``dev_accuracy_long`` scores): k distinct sentences of one label per text, labels
    alternating, the same texts for the same seed, none when a label has too few sentences."""
    rows = [(f"good {i}", 1) for i in range(10)] + [(f"bad {i}", 0) for i in range(9)]
    texts = long_texts(rows, k=8, n=6)
    assert [y for _, y in texts] == [0, 1, 0, 1, 0, 1]
    for text, y in texts:
        words = text.split()
        parts = [" ".join(words[j : j + 2]) for j in range(0, len(words), 2)]
        assert len(set(parts)) == 8 and all((p.startswith("good") if y else p.startswith("bad")) for p in parts)
    assert long_texts(rows, k=8, n=6) == texts and long_texts(rows, k=8, n=6, seed=1) != texts
    assert long_texts(rows, k=10, n=6) == []  # (9 "bad" sentences)
