"""training/adaptive.py: online adaptive conformal levels (ACI), the check that keeps them out of the released
models. Synthetic residuals with a known distribution, so every expected coverage is known."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from tests.training.fast import train_tiny_forecaster
from tests.training.test_recalibrate import evaluate
from training.adaptive import GRID, Online, admissible, check, offsets_at, online, online_width
from training.calibrate import conformal_offsets, halves
from training.cli import main

LEVELS = [0.1, 0.5, 0.9]


def residuals(n: int, horizon: int, sigma: npt.NDArray[np.float64], seed: int = 0) -> npt.NDArray[np.float64]:
    """(n, horizon, 1) Gaussian residuals, window i with standard deviation sigma[i]."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, horizon, 1)) * sigma[:, None, None]


def test_offsets_at_reads_the_table_at_grid_levels_and_interpolates_between() -> None:
    z = residuals(4000, 3, np.ones(4000))
    table = conformal_offsets(z, list(GRID))  # (G, 3, 1)
    i = int(np.argmin(np.abs(GRID - 0.9)))
    assert np.array_equal(offsets_at(table, np.array([GRID[i]])), table[i])
    mid = offsets_at(table, np.array([(GRID[i] + GRID[i + 1]) / 2]))
    assert np.allclose(mid, (table[i] + table[i + 1]) / 2)
    assert np.array_equal(offsets_at(table, np.array([1.5])), table[-1])  # clamped to the grid's ends
    assert np.array_equal(offsets_at(table, np.array([-0.3])), table[0])


def test_with_a_steady_error_level_the_fixed_band_is_on_target() -> None:
    r = residuals(3000, 4, np.ones(3000))
    fixed = online(r[:1500], r[1500:], np.ones((1500, 1, 1)), LEVELS, gamma=0.0)
    assert abs(fixed.band - 0.8) < 0.03
    assert all(abs(b - tau) < 0.03 for b, tau in zip(fixed.below, LEVELS, strict=True))


def test_after_the_error_level_halves_the_online_levels_recover_the_band() -> None:
    r = residuals(3000, 4, np.where(np.arange(3000) < 1500, 1.0, 0.5))
    cal, run, one = r[:1500], r[1500:], np.ones((1500, 1, 1))
    fixed = online(cal, run, one, LEVELS, gamma=0.0)
    adaptive = online(cal, run, one, LEVELS, gamma=0.02)
    assert fixed.band > 0.95  # a band calibrated on sigma 1 is far too wide for sigma 0.5
    assert abs(adaptive.band - 0.8) < 0.05 and abs(adaptive.band - 0.8) < abs(fixed.band - 0.8) / 3
    assert adaptive.miss(LEVELS) < fixed.miss(LEVELS)


def test_the_rule_refuses_a_rate_whose_pinball_loss_is_worse_than_the_tolerance() -> None:
    fixed = Online((0.07, 0.5, 0.93), 0.86, 0.100)
    better_cov_much_worse_loss = Online((0.1, 0.5, 0.9), 0.80, 0.120)
    better_cov_same_loss = Online((0.09, 0.5, 0.91), 0.82, 0.1005)
    scores = {0.0: (fixed, fixed), 0.01: (better_cov_much_worse_loss,) * 2}
    assert admissible(scores, LEVELS) == 0.0
    scores[0.005] = (better_cov_same_loss, better_cov_same_loss)
    assert admissible(scores, LEVELS) == 0.005


def test_check_scores_both_directions_and_refuses_too_few_windows() -> None:
    r = residuals(400, 4, np.ones(400))
    scores = check(r, None, LEVELS, gammas=(0.0, 0.01))
    assert set(scores) == {0.0, 0.01}
    for first, second in scores.values():
        assert 0.6 < first.band < 0.95 and 0.6 < second.band < 0.95
    with pytest.raises(ValueError, match="at least 4 x horizon"):
        check(residuals(13, 12, np.ones(13)), None, LEVELS)


def test_check_leaves_a_horizon_of_windows_out_between_the_halves() -> None:
    """Each direction calibrates on one half and runs online through the other, the ``horizon`` windows whose
    targets straddle the cut left out."""
    r = residuals(100, 4, np.ones(100))
    first, second = halves(100, 4)
    assert first[-1] == 47 and second[0] == 52
    one = np.ones((100, 1, 1))
    got = check(r, None, LEVELS, gammas=(0.0,))[0.0]
    assert got == (
        online(r[first], r[second], one[second], LEVELS, 0.0),
        online(r[second], r[first], one[first], LEVELS, 0.0),
    )


def test_check_needs_four_horizons_of_windows() -> None:
    """47 windows of horizon 12 are refused, 48 are enough."""
    with pytest.raises(ValueError, match=r"47 validation windows; .* at least 4 x horizon \(48\)"):
        check(residuals(47, 12, np.ones(47)), None, LEVELS)
    assert set(check(residuals(48, 12, np.ones(48)), None, LEVELS, gammas=(0.0,))) == {0.0}


def test_a_width_that_never_moves_is_the_fixed_band() -> None:
    r = residuals(2000, 4, np.ones(2000))
    one = np.ones((1000, 1, 1))
    fixed, still = online(r[:1000], r[1000:], one, LEVELS, 0.0), online_width(r[:1000], r[1000:], one, LEVELS, 0.0)
    assert still.band == pytest.approx(fixed.band, abs=1e-9) and still.below == pytest.approx(fixed.below, abs=1e-9)
    assert still.pinball == pytest.approx(fixed.pinball, rel=1e-6)  # (the width rule computes in float32)


def test_after_the_error_level_halves_the_width_follows_and_the_median_stays() -> None:
    r = residuals(3000, 4, np.where(np.arange(3000) < 1500, 1.0, 0.5))
    cal, run, one = r[:1500], r[1500:], np.ones((1500, 1, 1))
    fixed = online(cal, run, one, LEVELS, gamma=0.0)
    narrowing = online_width(cal, run, one, LEVELS, gamma=0.02)
    assert fixed.band > 0.95
    assert abs(narrowing.band - 0.8) < 0.05 and abs(narrowing.band - 0.8) < abs(fixed.band - 0.8) / 3
    assert narrowing.pinball < fixed.pinball  # a narrower band where errors are smaller: sharper, not noisier
    assert abs(narrowing.below[1] - 0.5) < 0.03  # the median's offset never moves


def test_check_runs_the_width_variant_when_asked() -> None:
    r = residuals(400, 4, np.ones(400))
    first, second = halves(400, 4)
    one = np.ones((400, 1, 1))
    got = check(r, None, LEVELS, gammas=(0.01,), width=True)[0.01]
    assert got == (
        online_width(r[first], r[second], one[second], LEVELS, 0.01),
        online_width(r[second], r[first], one[first], LEVELS, 0.01),
    )


@pytest.mark.slow
def test_adapt_releases_the_same_graph_with_a_moving_width_only_when_the_test_replay_is_better(
    tmp_path: Path, tiny_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    v1, v2 = tmp_path / "models" / "sales" / "1", tmp_path / "models" / "sales" / "2"
    train_tiny_forecaster(tiny_csv, v1, tmp_path / "run")
    raw = json.loads((v1 / MANIFEST_FILE).read_text())  # a band far too wide: offsets x 5 (same graph, same sha256)
    raw["forecast"]["quantile_offsets"] = (5 * np.asarray(raw["forecast"]["quantile_offsets"])).tolist()
    (v1 / MANIFEST_FILE).write_text(json.dumps(raw))
    files = {p.name: p.read_bytes() for p in v1.iterdir()}
    adapt = ["adapt", "--model", str(v1), "--data", str(tiny_csv), "--out", str(v2)]
    capsys.readouterr()
    cases = [
        ([], "validation windows; a half-split online check needs at least 4 x horizon (48)"),  # too few to choose
        (["--gamma", "2"], "--gamma 2.0: the width's rate must be in (0, 1]"),
        (["--gamma", "1e-9"], "sales/2 not released: test miss"),  # a width that cannot move: no better
    ]
    for extra, message in cases:
        assert main([*adapt, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
        assert not v2.exists()  # nothing half-written
    assert "(not smaller)" in err
    assert main([*adapt, "--gamma", "0.05"]) == 0
    assert {p.name: p.read_bytes() for p in v1.iterdir()} == files  # the parent is left as it was
    assert (v2 / MODEL_FILE).is_symlink() and os.readlink(v2 / MODEL_FILE) == "../1/model.onnx"
    m, parent = Manifest.load(v2 / MANIFEST_FILE), Manifest.load(v1 / MANIFEST_FILE)
    assert m.forecast is not None and parent.forecast is not None
    assert (m.name, m.version, m.forecast.adaptive_width_gamma, m.sha256) == ("sales", 2, 0.05, parent.sha256)
    assert m.forecast.quantile_offsets == parent.forecast.quantile_offsets and m.card is not None
    assert m.training["adaptive_width"]["parent"] == "sales/1" and m.training["command"].startswith("seqserve-train")
    ev1, ev2 = evaluate(capsys, v1, tiny_csv), evaluate(capsys, v2, tiny_csv)
    assert ev2["test_mse"] == ev1["test_mse"]
    band1, band2 = ev1["test_coverage_band_p10_p90"], ev2["test_coverage_band_p10_p90"]
    assert band1 > 0.95 and abs(band2 - 0.8) < abs(band1 - 0.8)  # the width narrowed toward the nominal share
    assert ev2["test_adaptive_width_final"] < 1 and "test_adaptive_width_final" not in ev1
    metrics = {x.name: x.value for x in m.metrics}
    for key in ("test_coverage_band_p10_p90", "test_coverage_q0.1", "test_pinball_q0.9"):
        assert metrics[key] == pytest.approx(ev2[key], rel=1e-9)
    report = json.loads((v2 / "metrics.json").read_text())
    assert report["release"]["released"] and report["parent_metrics"]["test_coverage_band_p10_p90"] == band1
