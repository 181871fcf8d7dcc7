"""Tokenizers shared by training and serving (training imports this module; serving never imports torch).

Both are driven by the manifest's ``Tokenizer`` section so that a served model tokenizes exactly as it was
trained.
"""

from __future__ import annotations

import re

import numpy as np
import numpy.typing as npt

from service.core.manifest import Tokenizer
from service.errors import InvalidInput

# Words, numbers, and single punctuation marks; apostrophe suffixes ("n't", "'s") stay separate, as in SST.
_WORD_RE = re.compile(r"n't|'\w+|\w+(?:-\w+)*|[^\w\s]")


def split_words(text: str, lowercase: bool = True) -> list[str]:
    if lowercase:
        text = text.lower()
    return _WORD_RE.findall(text)


class Encoder:
    """token <-> id for one manifest tokenizer. ``encode`` returns int64 ids, shape (time,)."""

    def __init__(self, spec: Tokenizer) -> None:
        self.spec = spec
        self.vocab = list(spec.vocab)
        self.index = {tok: i for i, tok in enumerate(self.vocab)}
        self.unk_id = self.index.get(spec.unk_token) if spec.unk_token is not None else None
        self.pad_id = self.index.get(spec.pad_token) if spec.pad_token is not None else None

    def tokens(self, text: str) -> list[str]:
        if self.spec.kind == "char":
            return list(text.lower() if self.spec.lowercase else text)
        return split_words(text, self.spec.lowercase)

    def encode(self, text: str, field: str = "text") -> npt.NDArray[np.int64]:
        """Unknown tokens map to ``unk``; a char model without ``unk`` rejects characters outside its vocab."""
        ids: list[int] = []
        for tok in self.tokens(text):
            i = self.index.get(tok, self.unk_id)
            if i is None:
                raise InvalidInput(
                    f"{field}: character {tok!r} is not in the model's vocabulary of {len(self.vocab)} "
                    f"characters; remove or replace it"
                )
            ids.append(i)
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: list[int] | npt.NDArray[np.int64]) -> str:
        sep = "" if self.spec.kind == "char" else " "
        return sep.join(self.vocab[int(i)] for i in ids)
