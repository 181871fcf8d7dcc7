"""The committed models' cards say what their training did: a sentiment model whose training fitted a temperature
says its probabilities are temperature-scaled, one that did not says they are not calibrated."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.manifest import MANIFEST_FILE, Manifest
from training.cards import NOT_CALIBRATED, TEMPERATURE_SCALED

ROOT = Path(__file__).resolve().parents[2]
SENTIMENT = [
    m for m in map(Manifest.load, sorted((ROOT / "models").glob(f"*/*/{MANIFEST_FILE}"))) if m.task == "sentiment"
]


@pytest.mark.parametrize("m", SENTIMENT, ids=lambda m: f"{m.name}/{m.version}")
def test_a_sentiment_card_says_whether_probabilities_are_temperature_scaled(m: Manifest) -> None:
    assert m.card is not None
    if m.training.get("ensemble_of"):
        assert any(limit.startswith("Probabilities are the mean of its members'") for limit in m.card.limits)
    elif m.training.get("temperature") not in (None, 1.0):
        assert TEMPERATURE_SCALED in m.card.limits and NOT_CALIBRATED not in m.card.limits
    else:
        assert NOT_CALIBRATED in m.card.limits and TEMPERATURE_SCALED not in m.card.limits


def test_every_kind_of_sentiment_model_is_checked() -> None:
    temperatures = {m.training.get("temperature") is None for m in SENTIMENT if not m.training.get("ensemble_of")}
    assert temperatures == {True, False} and any(m.training.get("ensemble_of") for m in SENTIMENT)
