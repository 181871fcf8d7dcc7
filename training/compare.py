"""``seqserve-train compare``: two sentiment models on the same sentences, paired.

Two accuracies on 872 dev sentences differ by a few sentences from one training run to the next. What tells a real
difference from noise is the sentences the two models disagree on: if neither model were better, each of those
would be as likely to favour one as the other. The exact McNemar test (a two-sided binomial test on the
disagreements) gives the chance of a split at least this lopsided under that hypothesis. ``--split heldout``
compares them on the rows their training held out of train.tsv (both must have held out the same rows).

    seqserve-train compare --model models/sentiment/1 --model models/sentiment/3 --data ../shared/data/sst2
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from training.data import DataError, load_sst2
from training.evaluate import sentiment_logits
from training.heldout import heldout_rows, open_sentiment


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: P(a split of the ``only_a + only_b`` disagreements at least this uneven)
    when each disagreement favours either model with probability 1/2."""
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / (1 << n))  # exact integers: no overflow however many disagreements


def compare(models: list[Path], data: Path, split: str = "dev") -> dict[str, Any]:
    if len(models) != 2:
        raise DataError(f"compare takes exactly two --model, got {len(models)}")
    opened = open_sentiment(models, "compare")
    if split == "heldout":
        _, rows = heldout_rows(models, [m for m, _ in opened], data)
    else:
        _, rows = load_sst2(data)
    texts, y = [t for t, _ in rows], np.array([label for _, label in rows])
    right = [sentiment_logits(m, sess, texts).argmax(1) == y for m, sess in opened]  # (N,) bool each
    only = [int((r & ~other).sum()) for r, other in ((right[0], right[1]), (right[1], right[0]))]
    a, b = (str(p) for p in models)
    return {
        "split": split, "examples": len(rows),
        "correct": {a: int(right[0].sum()), b: int(right[1].sum())},
        "only_this_one_correct": {a: only[0], b: only[1]},
        "mcnemar_exact_p": mcnemar_exact(only[0], only[1]),
    }  # fmt: skip
