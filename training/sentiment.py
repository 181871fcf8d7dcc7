"""``seqserve-train sentiment``: SST-2 -> BiLSTM ensemble (+ sub-words, + frozen GloVe and/or VADER lexicon
features) -> temperature -> ONNX.

Selection never sees dev: the checkpoint is the best on a slice held out from train.tsv, and the softmax
temperature (folded into the heads' weights) minimizes the ensemble's NLL on that same slice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from service.core.manifest import Metric, ModelCard
from service.core.tokenizers import Encoder
from training.cards import CARDS, calibrated, card_for, describes, generic_card
from training.data import DataError, heldout_split, load_sst2, ngram_table, public_data, word_tokenizer
from training.evaluate import evaluate_model
from training.export import cell_name, write_model
from training.glove import Glove, extend_vocab, glove_table, load_glove
from training.lexicon import load_vader
from training.nets import SentimentNet, build_net
from training.pipelines import Job, finish, training_info
from training.runners import SentimentRunner
from training.scores import fit_temperature
from training.train import fit


def train_sentiment(job: Job) -> None:
    train_rows, dev_rows = load_sst2(job.data)
    public = public_data(job.data) == "SST-2"  # else the user's own folder: named as itself, not as SST-2
    rng = np.random.default_rng(job.train.seed)
    kind = job.extra.get("heldout") or "rows"
    fraction = job.extra["heldout_fraction"]
    fit_rows, held_rows = heldout_split(train_rows, kind, fraction, rng)
    if not held_rows or not fit_rows:
        what = "whole sentences" if kind == "sentences" else "rows"
        raise DataError(
            f"{job.data / 'train.tsv'}: {len(train_rows)} rows; holding out {fraction:g} of the {what} leaves "
            f"{len(held_rows)} held out (they pick the checkpoint and fit the temperature) and {len(fit_rows)} to "
            "train on: both need at least one; give more rows or change --heldout-fraction"
        )
    if kind == "sentences":
        held_what = f"{len(held_rows)} whole sentences held out from train.tsv (their phrases left out of training)"
    else:
        held_what = f"{len(held_rows)} rows held out from train.tsv"
    n_held = len(held_rows)
    tok = word_tokenizer([t for t, _ in fit_rows], min_count=job.extra["min_count"], max_length=job.extra["max_length"])
    learned_rows = len(tok.vocab)
    frozen = frozen_sources(job)
    for f in frozen.values():
        tok = tok.model_copy(update={"vocab": extend_vocab(tok.vocab, f.features, f.top)})
    job.net.glove = sum(f.features.dim for f in frozen.values())
    enc = Encoder(tok)
    job.net.vocab = len(tok.vocab)
    net = build_net(job.net, job.train.seed)
    assert isinstance(net, SentimentNet)
    if job.net.subword_buckets:
        net.set_ngrams(torch.from_numpy(ngram_table(tok.vocab, job.net.subword_buckets)))
    # Blanking a word's own vector teaches the net to read words known only from frozen features; with none, it
    # would only hide information (sentiment/1 trained without it).
    blank = job.extra.get("glove_dropout", 0.0) if frozen else 0.0
    adversarial = job.extra.get("adversarial", 0.0)
    recipe: dict[str, float] = {"blank_dropout": blank, "adversarial": adversarial}
    if frozen:
        tables = {name: glove_table(tok.vocab, f.features) for name, f in frozen.items()}
        table = np.concatenate([t for t, _ in tables.values()], axis=1)
        net.set_glove(torch.from_numpy(table), learned_rows, init=job.extra.get("glove_init", False))
        recipe |= {"frozen_words_added": len(tok.vocab) - learned_rows}
        recipe |= {f"{name}_rows_with_vector": found for name, (_, found) in tables.items()}

    def encode(rows: list[tuple[str, int]]) -> list[tuple[Any, int]]:
        return [(enc.encode(t), y) for t, y in rows]

    print(
        f"sentiment: {len(fit_rows)} train / {n_held} held-out / {len(dev_rows)} dev, vocab {len(tok.vocab)} "
        f"({learned_rows} from train{', the rest from ' + ' and '.join(frozen) if frozen else ''})"
    )
    runner = SentimentRunner(
        net, encode(fit_rows), encode(held_rows), encode(dev_rows), tok.max_length or 128,
        job.train.device, job.extra["word_dropout"], blank, adversarial,
    )  # fmt: skip
    res = fit(runner, job.train)
    net.eval()
    with torch.no_grad():
        held_logits, held_y = runner.logits(runner.heldout)
    temperature = fit_temperature(held_logits.cpu().numpy(), held_y.cpu().numpy()) if job.extra["calibrate"] else 1.0
    net.scale_logits(temperature)
    net.bake(half=job.extra["half_table"])
    write_model(
        net.cpu(), job.net, job.out, name=job.name, version=job.version,
        description=f"{'SST-2' if public else job.data.name} binary sentiment: word embeddings"
        + "".join(f" + frozen {f.description}" for f in frozen.values())
        + f" + {'Bi' if job.net.bidirectional else ''}{cell_name(job.net.cell)} ensemble, masked mean+max pooling.",
        tokenizer=tok, labels=["negative", "positive"],
        training={**training_info(job, res), **recipe, "temperature": temperature},
        notes=f"{job.net.ensemble} member(s) averaged over one shared embedding (state rows = members x layers x "
        "directions); the backward direction runs on a length-aware reversed copy: padding never changes a result"
        + (f"; embedding table = {job.net.embedding} learned (+ sub-word) dims + "
           + " + ".join(f"{f.features.dim} {name}" for name, f in frozen.items())
           + f" frozen dims, {'float16' if job.extra['half_table'] else 'float32'}" if frozen else ""),
    )  # fmt: skip
    ev = evaluate_model(job.out, job.data)
    command = f"seqserve-train evaluate --model {job.out} --data {job.data}"
    metric = Metric(
        name="accuracy", value=ev["dev_accuracy"], target=(0.86 if frozen else 0.85) if public else None,
        dataset="GLUE SST-2" if public else f"{job.data.name} (dev.tsv)",
        split=f"dev ({len(dev_rows):,} sentences); checkpoint and temperature chosen on a held-out slice of train",
        command=command,
    )  # fmt: skip
    held = metric.model_copy(
        update={"name": "heldout_accuracy", "value": res.best["heldout_accuracy"], "target": None,
                "split": f"{held_what} (PyTorch; selects the checkpoint)",
                "command": job.command}
    )  # fmt: skip
    ece = metric.model_copy(update={"name": "ece", "value": ev["dev_ece"], "target": None, "higher_is_better": False})
    card = frozen_card(list(frozen), job.data) if frozen else card_for(job.name, "sentiment", job.version, job.data)
    card = calibrated(card, job.extra["calibrate"])
    finish(job, res, [metric, held, ece], ev, {"task": "sentiment", "temperature": temperature}, card)


class Frozen(NamedTuple):
    """One source of pretrained word features beside the learned vectors."""

    features: Glove
    top: int | None  # how many of its words join the vocabulary (most frequent first; None: all)
    description: str  # for the manifest's description


def frozen_card(frozen: list[str], data: Path | None = None) -> ModelCard:
    """The card of a run with these frozen features, whatever its --out: CARDS' NAME/VERSION keys belong to released
    models (``sentiment-glove/1`` is an ensemble with one such run), not to every run named like them. Trained on
    other ``data`` than SST-2: the generic card, with the features' provenance and license."""
    card = CARDS[f"sentiment-{'-'.join(frozen)}"]
    return card if data is None or describes(card, data) else generic_card("sentiment", tuple(frozen))


def frozen_sources(job: Job) -> dict[str, Frozen]:
    """The pretrained word features the job asks for, by name, in table order (GloVe first: ``--glove-init`` reads
    the table's first dims)."""
    sources: dict[str, Frozen] = {}
    if job.extra.get("glove"):
        sources["glove"] = Frozen(load_glove(job.extra["glove_dir"]), job.extra["glove_top"], "GloVe 6B 50-d vectors")
    if job.extra.get("lexicon"):
        sources["vader"] = Frozen(load_vader(job.extra["lexicon_dir"]), None, "VADER lexicon ratings")
    return sources
