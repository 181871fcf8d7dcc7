"""The committed models' cards say what their training did: a sentiment model whose training fitted a temperature
says its probabilities are temperature-scaled, one that did not says they are not calibrated."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.core.manifest import MANIFEST_FILE, Manifest
from training.cards import (
    CARDS,
    CHARLM2_COST,
    GLOVE,
    INT8_LIMITS,
    MEAN_OF_MEMBERS,
    NOT_CALIBRATED,
    TARGETS,
    TEMPERATURE_SCALED,
    calibrated,
    card_for,
    stamp,
    temperature_fitted,
)
from training.data import PUBLIC_DATA, data_sha256, public_data
from training.sentiment import frozen_card

ROOT = Path(__file__).resolve().parents[2]
SENTIMENT = [
    m for m in map(Manifest.load, sorted((ROOT / "models").glob(f"*/*/{MANIFEST_FILE}"))) if m.task == "sentiment"
]


@pytest.mark.parametrize("m", SENTIMENT, ids=lambda m: f"{m.name}/{m.version}")
def test_a_sentiment_card_says_whether_probabilities_are_temperature_scaled(m: Manifest) -> None:
    assert m.card is not None
    if m.training.get("ensemble_of"):
        assert MEAN_OF_MEMBERS in m.card.limits
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
        if key.startswith("sentiment") and MEAN_OF_MEMBERS not in card.limits:  # an ensemble's card says so
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


FORECASTERS = [
    m for m in map(Manifest.load, sorted((ROOT / "models").glob(f"*/*/{MANIFEST_FILE}"))) if m.task == "forecast"
]


def test_a_version_card_wins_over_the_name_card() -> None:
    """forecaster/3's limits differ from forecaster/2's; a name without
    a card gets the generic one."""
    assert card_for("forecaster", "forecast", 3) == CARDS["forecaster/3"]
    assert card_for("forecaster", "forecast", 2) == CARDS["forecaster"]
    assert card_for("my-sales", "forecast", 1).data.startswith("The file named in training.data")


def test_a_temperature_of_one_is_no_fitted_temperature() -> None:
    """1.0, what training records when it fitted none, is not a fitted temperature on the card."""
    assert not temperature_fitted({"temperature": 1.0}) and not temperature_fitted({})
    assert temperature_fitted({"temperature": 1.4})


@pytest.mark.parametrize("m", FORECASTERS, ids=lambda m: f"{m.name}/{m.version}")
def test_committed_forecasters_carry_their_card_and_their_issue_goal(m: Manifest) -> None:
    """What training writes (card_for, TARGETS) matches the committed manifests: the issue's goal sits on the metric
    it names."""
    assert m.card == card_for(m.name, m.task, m.version)
    if m.name in TARGETS:
        metric, goal = TARGETS[m.name]
        assert {x.name: x.target for x in m.metrics}[metric] == goal


@pytest.mark.parametrize("version", [1, 2])
def test_committed_char_lms_carry_their_version_card(version: int) -> None:
    """charlm/2's card adds what it costs (a 2x512 net) and that a GPU rerun lands near it; charlm/1 keeps the
    name's card."""
    m = Manifest.load(ROOT / "models" / "charlm" / str(version) / MANIFEST_FILE)
    assert m.card == card_for("charlm", "charlm", version)
    assert (m.card == CARDS["charlm/2"]) == (version == 2) and (m.card == CARDS["charlm"]) == (version == 1)
    assert m.architecture.hidden == {1: 256, 2: 512}[version]


def test_the_int8_copy_of_charlm2_says_its_own_cost_not_its_parents() -> None:
    """``charlm-int8/3``'s card is its parent's with the cost line reworded (``INT8_LIMITS``: int8 weights cost about
    ``charlm/1``'s per step) and the quantization's own limits; nothing else of the parent's is lost."""
    parent = Manifest.load(ROOT / "models" / "charlm" / "2" / MANIFEST_FILE)
    m = Manifest.load(ROOT / "models" / "charlm-int8" / "3" / MANIFEST_FILE)
    assert parent.card is not None and m.card is not None and CHARLM2_COST in parent.card.limits
    assert CHARLM2_COST not in m.card.limits and INT8_LIMITS[CHARLM2_COST] in m.card.limits
    assert m.card.limits[: len(parent.card.limits)] == [INT8_LIMITS.get(x, x) for x in parent.card.limits]
    assert any(x.startswith("Batch-invariant") for x in m.card.limits)
    assert m.card.intended_use == parent.card.intended_use and m.card.data == parent.card.data


@pytest.mark.parametrize("frozen", [["glove"], ["vader"], ["glove", "vader"]])
def test_a_frozen_feature_run_gets_its_kind_of_card_whatever_its_folder(frozen: list[str]) -> None:
    """A run with GloVe trained into runs/glove-G2 is version 1 of its folder's name; it must not get the card of
    the released sentiment-glove/1, an ensemble, which card_for("sentiment-glove", ..., 1) returns."""
    card = frozen_card(frozen)
    assert MEAN_OF_MEMBERS not in card.limits and TEMPERATURE_SCALED in card.limits
    assert ("GloVe" in card.data) == ("glove" in frozen) and ("VADER" in card.data) == ("vader" in frozen)
    assert card_for("sentiment-glove", "sentiment", 1) != frozen_card(["glove"])  # the trap it avoids


def test_a_card_names_a_public_data_set_only_when_trained_on_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run named like a released model (``sentiment``, ``charlm``, ``forecaster``) but trained on the user's own
    file got the released model's card: "GLUE SST-2" or "Tiny Shakespeare" as its data, their licenses and measured
    limits. Now the card follows the data's bytes (``PUBLIC_DATA``, by sha256)."""
    text = tmp_path / "input.txt"
    text.write_text("To be, or not to be\n" * 60, encoding="utf-8")
    assert public_data(text) is None
    assert card_for("charlm", "charlm", 1, text).data.startswith("The file named in training.data")
    assert card_for("charlm", "charlm", 1) == CARDS["charlm"]  # without data (stamping a committed model): by name
    monkeypatch.setitem(PUBLIC_DATA, data_sha256(text), "Tiny Shakespeare")  # as if these were the published bytes
    assert public_data(text) == "Tiny Shakespeare" and card_for("charlm", "charlm", 1, text) == CARDS["charlm"]
    assert card_for("forecaster", "forecast", 1, text).data.startswith("The file named")  # not ETTh1's bytes
    sst2 = tmp_path / "sst2"
    sst2.mkdir()
    for f in ("train.tsv", "dev.tsv"):
        (sst2 / f).write_text("sentence\tlabel\ngood\t1\n", encoding="utf-8")
    own = card_for("sentiment", "sentiment", 1, sst2)
    assert own.data.startswith("The file named") and NOT_CALIBRATED in own.limits  # calibrated() can say which
    assert TEMPERATURE_SCALED in calibrated(own, True).limits
    monkeypatch.setitem(PUBLIC_DATA, data_sha256(sst2 / "train.tsv"), "SST-2")
    assert public_data(sst2) is None  # a published train.tsv beside another dev.tsv is not SST-2
    glove = frozen_card(["glove"], sst2)
    assert glove.data.startswith("The file named") and GLOVE in glove.data and "PDDL-1.0" in glove.license
    assert "SST" not in glove.model_dump_json() and frozen_card(["glove"]) == CARDS["sentiment-glove"]


def test_every_listed_card_names_the_public_data_set_it_describes() -> None:
    """``describes`` finds a card's data set by the name ``PUBLIC_DATA`` gives it in the card's data line: every
    card must name exactly one, or no training run could ever get it."""
    for key, card in CARDS.items():
        assert sum(name in card.data for name in set(PUBLIC_DATA.values())) == 1, key


def test_the_stamping_command_has_a_help(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m training.cards --help`` read "--help" as a model folder (FileNotFoundError)."""
    from training.cards import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "models/NAME/N" in capsys.readouterr().out
