"""``seqserve-train heldout``: the held-out accuracy that chose a sentiment checkpoint, recomputed from the ONNX.

Sentiment training picks its checkpoint (and temperature) on rows held out of train.tsv, never on dev. This command
rebuilds that held-out slice from a model's manifest (the split kind, fraction and seed its training recorded) and
scores the exported graph on it. Given several models that held out the same rows, it also scores the mean of
their probabilities: an ensemble of trained models checked the way training selects, before anyone looks at its
dev accuracy. Models that held out different rows are refused (their numbers could not be compared).

    seqserve-train heldout --model models/sentiment/1 [--model runs/other ...] --data ../shared/data/sst2
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.core import arrays
from service.core.manifest import Manifest
from training.data import DataError, data_sha256, heldout_split, load_sst2
from training.evaluate import open_model, sentiment_logits

Rows = list[tuple[str, int]]  # (text, label)


def split_of(m: Manifest) -> tuple[str, float, int]:
    """(kind, fraction, seed) of the rows ``m``'s training held out (derived models keep their parent's record)."""
    t = m.training
    try:
        return str(t.get("heldout") or "rows"), float(t["heldout_fraction"]), int(t["config"]["seed"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"model {m.name}/{m.version}: its manifest does not record how training held rows out (missing {e}); "
            "only models trained by seqserve-train sentiment can be scored on their held-out slice"
        ) from None


def recorded(m: Manifest) -> float | None:
    """The held-out accuracy training recorded (PyTorch, at the chosen checkpoint), when the manifest has it."""
    return next((x.value for x in m.metrics if x.name == "heldout_accuracy"), None)


def open_sentiment(models: list[Path], command: str) -> list[tuple[Manifest, ort.InferenceSession]]:
    """(manifest, ORT session) of each of ``models``; anything but a sentiment model is refused."""
    opened = [open_model(p) for p in models]
    for path, (m, _) in zip(models, opened, strict=True):
        if m.task != "sentiment":
            raise DataError(f"{path} is a {m.task!r} model; {command} scores sentiment models")
    return opened


def heldout_rows(models: list[Path], manifests: list[Manifest], data: Path) -> tuple[tuple[str, float, int], Rows]:
    """The rows train.tsv held out when these models trained, and how ((kind, fraction, seed)); models that held
    out different rows are refused (their numbers could not be compared)."""
    splits = {path: split_of(m) for path, m in zip(models, manifests, strict=True)}
    if len(set(splits.values())) > 1:
        listed = "; ".join(f"{p}: {k}, fraction {f:g}, seed {s}" for p, (k, f, s) in splits.items())
        raise DataError(
            f"the models held out different rows of train.tsv ({listed}); their held-out numbers cannot be compared"
        )
    kind, fraction, seed = splits[models[0]]
    train_rows, _ = load_sst2(data)
    recorded_sums = {path: m.training.get("data_sha256") for path, m in zip(models, manifests, strict=True)}
    if any(recorded_sums.values()):  # (older manifests, the committed ones among them, do not record it)
        got = data_sha256(data)
        other = [f"{p} ({s})" for p, s in recorded_sums.items() if s and s != got]
        if other:
            raise DataError(
                f"{data}: not the data {', '.join(other)} trained on (that run recorded the sha256 in "
                f"parentheses; this folder's is {got}); give the folder the model was trained on"
            )
    _, held = heldout_split(train_rows, kind, fraction, np.random.default_rng(seed))
    if not held:
        raise DataError(
            f"{data / 'train.tsv'}: {len(train_rows)} rows; holding out {fraction:g} of its {kind}, as these models "
            "did, leaves none: is this the train.tsv they were trained on?"
        )
    return (kind, fraction, seed), held


def heldout_accuracy(models: list[Path], data: Path) -> dict[str, Any]:
    opened = open_sentiment(models, "heldout")
    (kind, fraction, seed), held = heldout_rows(models, [m for m, _ in opened], data)
    texts, y = [t for t, _ in held], np.array([label for _, label in held])
    probs = [arrays.softmax(sentiment_logits(m, sess, texts)) for m, sess in opened]
    out: dict[str, Any] = {
        "heldout": kind, "heldout_fraction": fraction, "seed": seed, "heldout_rows": len(held),
        "models": {
            str(path): {"heldout_accuracy": float((p.argmax(1) == y).mean()), "recorded": recorded(m)}
            for path, p, (m, _) in zip(models, probs, opened, strict=True)
        },
    }  # fmt: skip
    if len(probs) > 1:
        out["mean_of_probabilities"] = {"heldout_accuracy": float((np.mean(probs, axis=0).argmax(1) == y).mean())}
    return out
