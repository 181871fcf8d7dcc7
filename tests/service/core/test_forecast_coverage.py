"""Interval coverage scored as the truth arrives: a forecast session keeps its last forecast, and the rows it
observes next are counted against that forecast's quantiles (``seqserve_forecast_observed_targets_total``,
``seqserve_forecast_targets_below_total``), on our API and on KServe sequences, on every session store. The
expected counts are recomputed here from the quantiles the server returned to the client."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.core.dataplane import CoreDataPlane
from service.core.types import ModelRef, SequenceRef
from service.errors import InvalidInput
from service.metrics import Metrics
from tests.service.core.conftest import MakeDP
from tests.service.core.test_forecast_scale import FEATURES, HORIZON, PLAIN, SCALED, WINDOW, history_tensor, series

LEVELS = (0.1, 0.5, 0.9)


def counts(dp: CoreDataPlane, model: str) -> tuple[float | None, list[float | None]]:
    """(targets scored, at-or-below count per level) as the Prometheus registry holds them."""
    get = dp.metrics.registry.get_sample_value
    labels = {"model": model, "version": "1"}
    below = [get("seqserve_forecast_targets_below_total", {**labels, "level": f"{q:g}"}) for q in LEVELS]
    return get("seqserve_forecast_observed_targets_total", labels), below


def expected(quantiles: np.ndarray, rows: np.ndarray) -> tuple[int, list[int]]:
    """The observed ``rows`` against a forecast's ``quantiles`` (levels, horizon, targets), original units."""
    steps = min(len(rows), quantiles.shape[1])
    y = rows[:steps]
    return y.size, [int((y <= q[:steps]).sum()) for q in quantiles]


@pytest.mark.parametrize("model", [PLAIN, SCALED], ids=["constant", "scaled"])
async def test_observed_rows_are_scored_against_the_previous_forecast(
    scaled_repo: Path, make_dp: MakeDP, model: ModelRef
) -> None:
    dp = await make_dp(models=scaled_repo)
    assert counts(dp, model.name) == (0.0, [0.0, 0.0, 0.0])  # the series exist from load
    history = series(WINDOW + 5 + 20, volatility=1.5, seed=11)
    await dp.forecast(model, history[:WINDOW])  # stateless: nothing to score
    s = await dp.create_session(model)
    await dp.observe(s.id, history[: WINDOW - 4])  # warming up: no forecast yet
    first = await dp.observe(s.id, history[WINDOW - 4 : WINDOW])  # the first forecast
    assert first.quantiles.shape == (3, HORIZON, FEATURES) and counts(dp, model.name)[0] == 0.0
    second = await dp.observe(s.id, history[WINDOW : WINDOW + 5])  # 5 rows: steps 1-5 of the first forecast
    n1, below1 = expected(first.quantiles, history[WINDOW : WINDOW + 5])
    assert counts(dp, model.name) == (n1, below1) and n1 == 5 * FEATURES
    assert below1[0] <= below1[1] <= below1[2] and below1[2] > 0
    await dp.observe(s.id, history[WINDOW + 5 :])  # 20 rows: only the horizon's 12 have a quantile
    n2, below2 = expected(second.quantiles, history[WINDOW + 5 :])
    assert n2 == HORIZON * FEATURES
    assert counts(dp, model.name) == (n1 + n2, [a + b for a, b in zip(below1, below2, strict=True)])


async def test_a_failed_observe_scores_nothing_and_leaves_the_forecast_to_score(
    scaled_repo: Path, make_dp: MakeDP
) -> None:
    dp = await make_dp(models=scaled_repo)
    history = series(WINDOW + 3, volatility=1.0, seed=2)
    s = await dp.create_session(PLAIN)
    first = await dp.observe(s.id, history[:WINDOW])
    bad = history[WINDOW:].copy()
    bad[1, 2] = np.nan
    with pytest.raises(InvalidInput):
        await dp.observe(s.id, bad)
    assert counts(dp, PLAIN.name)[0] == 0.0
    await dp.observe(s.id, history[WINDOW:])
    assert counts(dp, PLAIN.name) == expected(first.quantiles, history[WINDOW:])


async def test_kserve_sequences_are_scored_as_sessions_are(scaled_repo: Path, make_dp: MakeDP) -> None:
    dp = await make_dp(models=scaled_repo)
    history = series(WINDOW + 7, volatility=1.0, seed=4)

    first = await dp.infer(SCALED, history_tensor(history[:WINDOW]), sequence=SequenceRef(id="c-1", start=True))
    quantiles = {t.name: t.array for t in first.outputs}["QUANTILES"]
    assert quantiles is not None
    await dp.infer(SCALED, history_tensor(history[WINDOW:]), sequence=SequenceRef(id="c-1", end=True))
    assert counts(dp, SCALED.name) == expected(quantiles, history[WINDOW:])


async def test_a_session_reserves_room_for_the_forecast_it_keeps(scaled_repo: Path, make_dp: MakeDP) -> None:
    dp = await make_dp(models=scaled_repo)
    window = 4 * WINDOW * FEATURES
    assert dp.registry.resolve(PLAIN).task.session_nbytes() == window + 4 * HORIZON * FEATURES
    assert dp.registry.resolve(SCALED).task.session_nbytes() == window + 4 * (HORIZON + 1) * FEATURES
    s = await dp.create_session(SCALED)
    await dp.observe(s.id, series(WINDOW, volatility=1.0))
    kept = await dp.sessions.get(s.id)
    assert sum(a.nbytes for a in kept.context.values()) == dp.registry.resolve(SCALED).task.session_nbytes()


def test_scored_counts_must_fit_the_targets() -> None:
    m = Metrics(runtime_collectors=False)
    m.forecast_levels("f", 1, LEVELS)
    m.know_models(["f"])
    m.forecast_scored("f", 1, 10, {0.1: 1, 0.5: 5, 0.9: 9})
    assert m.registry.get_sample_value("seqserve_forecast_targets_below_total", {"model": "f", "version": "1",
                                                                                "level": "0.5"}) == 5.0  # fmt: skip
    with pytest.raises(ValueError, match=r"0\.\.targets=10"):
        m.forecast_scored("f", 1, 10, {0.9: 11})


async def test_coverage_of_a_covariate_model_scores_its_target(tmp_path: Path, make_dp: MakeDP) -> None:
    from tests.service.core.test_forecast_coverage import expected
    from tests.service.core.test_forecast_scale import WINDOW, series
    from tests.tiny_models import export_tiny

    export_tiny("forecast", tmp_path, name="ot-only", targets=["OT"])
    dp = await make_dp(models=tmp_path)
    model = ModelRef("ot-only")
    history = series(WINDOW + 5, volatility=1.5, seed=3)
    s = await dp.create_session(model)
    first = await dp.observe(s.id, history[:WINDOW])
    await dp.observe(s.id, history[WINDOW:])
    n, below = expected(first.quantiles, history[WINDOW:, -1:])
    get = dp.metrics.registry.get_sample_value
    labels = {"model": "ot-only", "version": "1"}
    assert get("seqserve_forecast_observed_targets_total", labels) == n
    got = [get("seqserve_forecast_targets_below_total", {**labels, "level": f"{q:g}"}) for q in first.quantile_levels]
    assert got == below


async def test_a_forecaster_without_intervals_scores_nothing_and_has_no_scoring_series(
    scaled_repo: Path, tmp_path: Path, make_dp: MakeDP
) -> None:
    """No quantile offsets in the manifest: point forecasts only, its sessions keep no forecast to score, and no
    coverage series exist for it (they would read as a model whose intervals are never scored)."""
    import json
    import shutil

    root = tmp_path / "models"
    shutil.copytree(scaled_repo / "plain", root / "bare")
    manifest = root / "bare" / "1" / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["forecast"]["quantile_offsets"] = []
    raw["name"] = "bare"
    manifest.write_text(json.dumps(raw))
    dp = await make_dp(models=root)
    history = series(WINDOW + 5, volatility=1.5, seed=5)
    s = await dp.create_session(ModelRef("bare"))
    first = await dp.observe(s.id, history[:WINDOW])
    assert first.point.shape == (HORIZON, FEATURES)
    assert first.quantile_levels == [] and first.quantiles.shape == (0, HORIZON, FEATURES)
    await dp.observe(s.id, history[WINDOW:])
    assert counts(dp, "bare") == (None, [None, None, None])
    scoring = [
        sample
        for family in dp.metrics.registry.collect()
        if family.name.startswith("seqserve_forecast_")
        for sample in family.samples
        if sample.labels.get("model") == "bare"
    ]
    assert scoring == []
