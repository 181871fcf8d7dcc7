"""The committed models' cards say what their training did: a sentiment model whose training fitted a temperature
says its probabilities are temperature-scaled, one that did not says they are not calibrated."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.core.manifest import MANIFEST_FILE, Manifest
from training.cards import CARDS, NOT_CALIBRATED, TEMPERATURE_SCALED, calibrated, stamp, temperature_fitted

ROOT = Path(__file__).resolve().parents[2]
SENTIMENT = [
    m for m in map(Manifest.load, sorted((ROOT / "models").glob(f"*/*/{MANIFEST_FILE}"))) if m.task == "sentiment"
]


@pytest.mark.parametrize("m", SENTIMENT, ids=lambda m: f"{m.name}/{m.version}")
def test_a_sentiment_card_says_whether_probabilities_are_temperature_scaled(m: Manifest) -> None:
    assert m.card is not None
    if m.training.get("ensemble_of"):
        assert any(limit.startswith("Probabilities are the mean of its members'") for limit in m.card.limits)
    elif temperature_fitted(m.training):
        assert TEMPERATURE_SCALED in m.card.limits and NOT_CALIBRATED not in m.card.limits
    else:
        assert NOT_CALIBRATED in m.card.limits and TEMPERATURE_SCALED not in m.card.limits


def test_every_kind_of_sentiment_model_is_checked() -> None:
    temperatures = {m.training.get("temperature") is None for m in SENTIMENT if not m.training.get("ensemble_of")}
    assert temperatures == {True, False} and any(m.training.get("ensemble_of") for m in SENTIMENT)


def test_every_sentiment_card_follows_the_run() -> None:
    """The frozen-feature cards say temperature-scaled by default, the plain one not calibrated; either way the run
    decides."""
    for key, card in CARDS.items():
        if key.startswith("sentiment") and key != "sentiment-ensemble":
            assert TEMPERATURE_SCALED in calibrated(card, True).limits
            assert NOT_CALIBRATED not in calibrated(card, True).limits
            assert NOT_CALIBRATED in calibrated(card, False).limits
            assert TEMPERATURE_SCALED not in calibrated(card, False).limits


@pytest.mark.parametrize(("version", "line"), [(1, NOT_CALIBRATED), (3, TEMPERATURE_SCALED)])
def test_stamping_a_card_keeps_what_training_did(tmp_path: Path, version: int, line: str) -> None:
    copy = tmp_path / "sentiment" / str(version)
    shutil.copytree(ROOT / "models" / "sentiment" / str(version), copy)
    card = stamp(copy)
    assert line in card.limits and Manifest.load(copy / MANIFEST_FILE).card == card
