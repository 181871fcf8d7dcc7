"""Tokenizers shared by training and serving (training imports this module; serving never imports torch).

Both are driven by the manifest's ``Tokenizer`` section so that a served model tokenizes exactly as it was
trained.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import numpy.typing as npt

from service.core.manifest import Tokenizer
from service.errors import InvalidInput

# Words, numbers, and single punctuation marks; apostrophe suffixes ("n't", "'s") stay separate, as in SST (whose
# text is tokenized as the Penn Treebank does: "does n't", "ca n't", "it 's", "can not", "gon na"). A contraction
# typed as one word splits the same way: "doesn't" -> "does" "n't", not "doesn" "'t", and "cannot" -> "can" "not"
# (words SST never has: the negation was lost).
_WORD_RE = re.compile(r"\w+(?=n't)|(?i:\bcan(?=not\b)|\bgon(?=na\b))|n't|'\w+|\w+(?:-\w+)*|[^\w\s]")


# Typographic characters that keyboards (phones, word processors) put where plain text has ASCII, one for one.
_TYPOGRAPHIC = dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u02bc\u00b4\u0060", "'")
_TYPOGRAPHIC |= dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", '"')
_TYPOGRAPHIC |= dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212", "-")
# A word model's text as SST writes it: ASCII apostrophes and quotes, "--" for a long dash; the backtick stays (SST
# opens quotes with ``).
_WORD_PUNCTUATION = str.maketrans(
    {k: v for k, v in _TYPOGRAPHIC.items() if k != "`"} | dict.fromkeys("\u2014\u2015", "--")
)
# ...and its double quotes as SST's: `` opens, '' closes, for a vocabulary that has no " (SST's has none: a curly
# quote read as " was an unknown word).
_SST_QUOTES = str.maketrans(dict.fromkeys("\u201c\u201e\u201f\u00ab", "``") | dict.fromkeys("\u201d\u2033\u00bb", "''"))
# ...and a straight " as the Penn Treebank tokenizer reads it (SST's own): opening (`` ) at the start or after a
# space or an opening bracket, closing ('') elsewhere; it was an unknown word, where the curly pair was known.
_OPENING_QUOTE = re.compile(r'(^|[\s(\[{<])"')
MAX_FOLDED = 4096  # distinct unknown characters whose folding an encoder remembers
# Line breaks other than LF (Unicode's mandatory breaks, UAX #14: CR, VT, FF, NEL, LINE and PARAGRAPH SEPARATOR): a
# model whose text breaks lines with LF reads each as one, and a CRLF (Windows, an HTML form) as the one LF it is.
LINE_BREAKS = "\r\x0b\x0c\x85\u2028\u2029"


def fold_char(c: str, known: dict[str, int]) -> int | None:
    """The id of the one known character that ``c``, outside the vocabulary, stands for, or None: a typographic
    quote or dash as its ASCII form, a compatibility form as its plain one (NFKC: full-width letters, ligature-free
    single characters), an accented letter without its accents (NFKD), a line break (``LINE_BREAKS``) as LF, any
    other whitespace as a space. Only one character for one (``Encoder.tokens`` reads a CRLF as one LF first)."""
    candidates = [_TYPOGRAPHIC.get(c, ""), unicodedata.normalize("NFKC", c)]
    candidates.append("".join(x for x in unicodedata.normalize("NFKD", c) if not unicodedata.combining(x)))
    if c in LINE_BREAKS:
        candidates.append("\n")
    if c.isspace():
        candidates.append(" ")
    for candidate in candidates:
        if len(candidate) == 1 and candidate in known:
            return known[candidate]
    return None


def _unseen(c: str) -> tuple[str, str]:
    """For a character that its quoted form does not show (a combining mark, a control or format character, a
    separator other than the space): its code point and name, and what to do about it. ('', '') for the others."""
    kind = unicodedata.category(c)[0]
    if kind not in "MCZ":
        return "", ""
    name = unicodedata.name(c, "")
    code = f" (U+{ord(c):04X}{' ' + name if name else ''})"
    if kind == "M":
        return code, (
            "; it is a combining mark: send the text composed (Unicode NFC), where an accented letter is one character"
        )
    return code, "; it is an invisible character, often pasted with the text"


# Controls that are no whitespace: each separates the words beside it, as a space ("a\x01b" is "a" and "b", not
# the one unknown word "ab").
_CONTROLS = dict.fromkeys([*range(0x00, 0x09), *range(0x0E, 0x1C), 0x7F], " ")
_BREAKS = "\u200b"  # a zero-width space: a break between words, where the other format characters join or mark


def _visible(text: str) -> str:
    """A word model's text composed (Unicode NFC: an accented letter typed as a letter and a combining mark is the
    one letter it stands for) and without invisible characters, each of which was read as an unknown word: format
    characters (a byte order mark, a soft hyphen, a zero-width joiner) dropped, controls and the zero-width space
    read as a space."""
    if text.isascii():
        return text.translate(_CONTROLS)
    text = unicodedata.normalize("NFC", text)
    return "".join(
        " " if c in _BREAKS or (unicodedata.category(c) == "Cc" and not c.isspace()) else c
        for c in text
        if unicodedata.category(c) != "Cf" or c in _BREAKS
    )


def split_words(text: str, lowercase: bool = True) -> list[str]:
    if lowercase:
        text = text.lower()
    return _WORD_RE.findall(text)


class Encoder:
    """token <-> id for one manifest tokenizer. ``encode`` returns int64 ids, shape (time,). ``fold``: a char
    model reads a character outside its vocabulary as the one it stands for (``fold_char``) instead of refusing
    the text, and a CRLF as one LF when CR is not in its vocabulary (so a session's steps count the characters
    sent, less one for each CRLF: the characters the model read); a word model reads typographic quotes and dashes
    as ASCII before it splits words (so "don’t" is "do" "n't", as in its training text, not "don" "’" "t")."""

    def __init__(self, spec: Tokenizer, fold: bool = False) -> None:
        self.spec = spec
        self._fold_words = fold and spec.kind == "word"
        # A char model's folded characters (None: it refuses them); a word model maps unknown words to <unk>.
        self._folded: dict[str, int | None] | None = {} if fold and spec.kind == "char" else None
        self.vocab = list(spec.vocab)
        self.index = {tok: i for i, tok in enumerate(self.vocab)}
        self.unk_id = self.index.get(spec.unk_token) if spec.unk_token is not None else None
        self._crlf = self._folded is not None and "\r" not in self.index and self.unk_id is None
        self.pad_id = self.index.get(spec.pad_token) if spec.pad_token is not None else None
        self._punctuation = _WORD_PUNCTUATION
        self._sst_quotes = self._fold_words and '"' not in self.index and "`" in self.index
        if self._sst_quotes:
            self._punctuation = {**_WORD_PUNCTUATION, **_SST_QUOTES}

    def tokens(self, text: str) -> list[str]:
        if self.spec.kind == "char":
            if self._crlf:  # (one line break: read as " \n", CR folded alone, it changed the answer)
                text = text.replace("\r\n", "\n")
            return list(text.lower() if self.spec.lowercase else text)
        if self._fold_words:
            text = _visible(text).translate(self._punctuation)
            if self._sst_quotes and '"' in text:
                text = _OPENING_QUOTE.sub(r"\1``", text).replace('"', "''")
        return split_words(text, self.spec.lowercase)

    def encode(self, text: str, field: str = "text") -> npt.NDArray[np.int64]:
        """Unknown tokens map to ``unk``; a char model without ``unk`` folds (``fold``) or rejects characters
        outside its vocab."""
        ids: list[int] = []
        for tok in self.tokens(text):
            i = self.index.get(tok, self.unk_id)
            if i is None and self._folded is not None:
                i = self._fold(self._folded, tok)
            if i is None:
                code, hint = _unseen(tok)
                raise InvalidInput(
                    f"{field}: character {tok!r}{code} is not in the model's vocabulary of {len(self.vocab)} "
                    f"characters; remove or replace it{hint}"
                )
            ids.append(i)
        return np.asarray(ids, dtype=np.int64)

    def _fold(self, folded: dict[str, int | None], c: str) -> int | None:
        if c in folded:
            return folded[c]
        i = fold_char(c, self.index)
        if len(folded) < MAX_FOLDED:  # (a client sending every code point once cannot grow it further)
            folded[c] = i
        return i

    def decode(self, ids: list[int] | npt.NDArray[np.int64]) -> str:
        sep = "" if self.spec.kind == "char" else " "
        return sep.join(self.vocab[int(i)] for i in ids)
