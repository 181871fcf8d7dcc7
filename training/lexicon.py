"""The VADER sentiment lexicon from the ``vaderSentiment`` package (PyPI, MIT; Hutto & Gilbert, ICWSM 2014):
7,500 English tokens (words, slang, emoticons), each rated from -4 (most negative) to +4 by ten people.

Read as frozen word features beside the learned embedding, exactly as GloVe is (``training/glove.py``, the same
``Glove`` holder): per word its mean rating / 4, the raters' standard deviation / 4 and a "rated" flag; words the
lexicon lacks get zeros. Export folds the features into the model's embedding table, so serving never needs the
package. The package's file ``vader_lexicon.txt`` is tab-separated: token, mean, standard deviation, the ten ratings.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from training.data import DataError
from training.glove import Glove

PACKAGE = "vaderSentiment"
FILE = "vader_lexicon.txt"
FEATURES = ("valence", "spread", "rated")


def load_vader(root: Path | None = None) -> Glove:
    """The package's lexicon (or ``root/vader_lexicon.txt``: used by tests with tiny files), as (words, features)."""
    if root is None:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise DataError(f"VADER lexicon: install the package {PACKAGE} (pip install '.[train]')")
        root = Path(next(iter(spec.submodule_search_locations)))
    path = root / FILE
    words: list[str] = []
    rows: list[tuple[float, float, float]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            mean, std = float(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            raise DataError(f"{path}:{n}: expected 'token<TAB>mean<TAB>std<TAB>ratings', got {line[:60]!r}") from None
        if not -4.0 <= mean <= 4.0 or std < 0:
            raise DataError(f"{path}:{n}: rating {mean} / spread {std} outside the lexicon's -4..4 scale")
        words.append(parts[0])
        rows.append((mean / 4.0, std / 4.0, 1.0))
    if not words:
        raise DataError(f"{path}: no entries")
    return Glove(words, np.asarray(rows, dtype=np.float32))
