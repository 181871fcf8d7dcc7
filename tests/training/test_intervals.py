"""Normalized conformal intervals: the per-window volatility, the half-split choice (a scale when the error level
follows the window's volatility, none when it does not), and calibration that survives a shift in volatility
between the calibration period and the next one, where constant offsets do not."""

from __future__ import annotations

import numpy as np
import pytest

from training.calibrate import (
    choose_interval,
    conformal_offsets,
    coverage,
    interval_scores,
    quantile_scores,
    volatility,
    window_scale,
)
from training.forecasting import calibrate, scale_candidates

LEVELS = [0.1, 0.5, 0.9]


def test_volatility_and_floor_by_hand() -> None:
    x = np.array([[[0.0, 2.0], [1.0, 2.0], [3.0, 2.0], [6.0, 2.0], [10.0, 2.0], [15.0, 2.0]]])  # (1, 6, 2)
    assert volatility(x, "mad", 3)[0].tolist() == [4.0, 0.0]  # |4 + 5 + 6| / 3 ... changes 3, 4, 5 -> 4
    assert volatility(x, "std", 3)[0] == pytest.approx([np.sqrt(2 / 3), 0.0])
    assert volatility(x, "mad", 5)[0].tolist() == [3.0, 0.0]  # the whole window: changes 1..5
    assert window_scale(x, "mad", 3, [0.5, 0.25]).tolist() == [[[4.0, 0.25]]]  # a flat column gets the floor
    for kind, k in (("mad", 6), ("std", 0), ("range", 3)):
        with pytest.raises(ValueError, match="kind must be one of"):
            volatility(x, kind, k)


def volatile_windows(
    n: int, level: float, rng: np.random.Generator, informative: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """n windows of 48 rows x 2 targets whose row-to-row changes have a per-window spread sigma (log-normal
    around ``level``), and residuals (n, 6, 2) = sigma * N(0, 1) growing with the step (or, not
    ``informative``, N(0, 1) whatever sigma is)."""
    sigma = np.exp(np.log(level) + 0.5 * rng.standard_normal((n, 1, 2)))
    history = np.cumsum(sigma * rng.standard_normal((n, 48, 2)), axis=1)
    steps = (1 + 0.2 * np.arange(6))[None, :, None]
    residuals = (sigma if informative else 1.0) * steps * rng.standard_normal((n, 6, 2))
    return history, residuals


def test_a_scale_keeps_coverage_when_the_next_period_is_calmer() -> None:
    """Calibrated on a volatile period, used on a calmer one (ETT's validation vs test months): constant offsets
    over-cover; offsets x the window's volatility stay within 2 points of every level."""
    rng = np.random.default_rng(0)
    history, residuals = volatile_windows(3000, 1.5, rng)
    choice, table = choose_interval(history, residuals, LEVELS, gap=6)
    assert choice.kind != "none" and len(table) == 2 * (1 + 2 * 5)  # constant, 2 kinds x k 4..24 + 47; x 2 modes
    for c in table:  # miss: the mean over both directions of sum_q |coverage_q - q|; halves hold the coverages
        assert len(c.halves) == 2 and all(len(h) == 4 for h in c.halves)
        per_half = [sum(abs(h[i] - tau) for i, tau in enumerate(LEVELS)) for h in c.halves]
        assert c.miss == pytest.approx(np.mean(per_half))
    constant = [c for c in table if c.kind == "none"]
    assert min(c.miss for c in constant) > choice.miss and min(c.pinball for c in constant) > choice.pinball
    iv = calibrate(history, residuals, "auto", "auto")
    assert iv.choice == choice and iv.floor is not None and iv.offsets.shape == (3, 6, 2)
    fresh_history, fresh = volatile_windows(4000, 0.6, rng)
    scale = window_scale(fresh_history, choice.kind, choice.k, iv.floor)
    scores = interval_scores(fresh, np.zeros_like(fresh), iv.offsets, LEVELS, scale)
    for tau in LEVELS:
        assert scores[f"coverage_q{tau:g}"] == pytest.approx(tau, abs=0.02)
    assert 0.78 <= scores["coverage_band_p10_p90"] <= 0.82
    flat = conformal_offsets(residuals, LEVELS)
    assert interval_scores(fresh, np.zeros_like(fresh), flat, LEVELS)["coverage_band_p10_p90"] > 0.9


def test_an_uninformative_scale_is_refused() -> None:
    """The error level ignores the window's volatility: a scale would only make the band's width random (worse
    pinball loss), so the choice stays constant offsets."""
    rng = np.random.default_rng(1)
    history, residuals = volatile_windows(3000, 1.0, rng, informative=False)
    choice, table = choose_interval(history, residuals, LEVELS, gap=6)
    assert choice.kind == "none"
    best = min(c.pinball for c in table if c.kind == "none")
    assert all(c.pinball > 1.01 * best for c in table if c.kind != "none")  # every scale refused on pinball
    iv = calibrate(history, residuals)
    assert iv.floor is None and iv.info["interval_scale"].startswith("constant")
    np.testing.assert_allclose(iv.offsets, conformal_offsets(residuals, LEVELS, pooled=iv.choice.pooled))


def test_interval_scores_multiply_offsets_by_the_scale() -> None:
    y = np.array([[[1.0]], [[-3.0]]])  # (2 windows, 1 step, 1 target)
    offsets = np.array([[[-1.0]], [[0.0]], [[1.0]]])
    scale = np.array([[[2.0]], [[0.5]]])  # window 0: band [-2, 2]; window 1: [-0.5, 0.5]
    s = interval_scores(y, np.zeros_like(y), offsets, LEVELS, scale)
    assert s["coverage_band_p10_p90"] == 0.5 and s["coverage_q0.1"] == 0.5 and s["coverage_q0.9"] == 1.0
    assert s["pinball_q0.9"] == pytest.approx((0.1 * 1 + 0.1 * 3.5) / 2)
    assert coverage(y, offsets[2] * scale) == 1.0


def test_calibrate_options() -> None:
    rng = np.random.default_rng(2)
    history, residuals = volatile_windows(400, 1.0, rng)
    fixed = calibrate(history, residuals, "pooled", "mad:12")
    assert (fixed.choice.kind, fixed.choice.k, fixed.choice.pooled) == ("mad", 12, True)
    assert fixed.info["interval_scale"] == "mad of the last 12 changes, pooled"
    assert len(fixed.info["interval_check"]) == 1  # nothing to choose between
    none = calibrate(history, residuals, "per-step", "none")
    assert none.floor is None and none.choice.kind == "none" and not none.choice.pooled
    recent = calibrate(history, residuals, "recent", "std:24")
    assert recent.choice.kind == "std" and "calibration_half_life_windows" in recent.info
    few = calibrate(history[:3], residuals[:3])  # too few windows to check: constant offsets
    assert few.choice.kind == "none" and few.info["interval_check"] == {}
    assert scale_candidates("auto") == (("none", "mad", "std"), None) and scale_candidates("std") == (("std",), None)
    for bad in ("range", "mad:x", "std:-2"):
        with pytest.raises(ValueError, match="--interval-scale: expected auto, none or KIND"):
            scale_candidates(bad)
    with pytest.raises(ValueError, match="the scale's k must be below the window \\(48\\)"):
        calibrate(history, residuals, "auto", "mad:48")


def test_calibrate_records_what_it_did() -> None:
    """The manifest's training section gets these fields verbatim: the number of calibration windows, the
    scale's floor and, under "auto", both offset modes checked."""

    history, residuals = volatile_windows(400, 1.0, np.random.default_rng(2))
    fixed = calibrate(history, residuals, "pooled", "mad:12")
    assert fixed.info["calibration_windows"] == 400 and fixed.info["calibration"] == "pooled"
    assert fixed.floor is not None and fixed.info["interval_scale_floor"] == fixed.floor
    assert fixed.info["interval_choice"] == {"kind": "mad", "k": 12, "pooled": True}
    # "auto" calibration weighs per-step against pooled offsets
    auto = calibrate(history, residuals, "auto", "none")
    assert set(auto.info["interval_check"]) == {"constant, per-step", "constant, pooled"}


def test_four_windows_are_enough_to_check_and_fewer_fall_back_to_the_whole_window() -> None:
    """With 4 calibration windows the half-split check runs; with 3 and a scale kind without K,
    the scale covers the whole window, k = window - 1."""
    from tests.training.test_intervals import volatile_windows

    history, residuals = volatile_windows(4, 1.0, np.random.default_rng(3))
    assert calibrate(history, residuals).info["interval_check"] != {}
    few = calibrate(history[:3], residuals[:3], "auto", "mad")
    assert (few.choice.kind, few.choice.k) == ("mad", 47) and few.info["interval_check"] == {}


def test_the_band_is_also_scored_over_the_first_and_last_quarter_of_the_horizon() -> None:
    """Calibrated over the whole horizon is not calibrated per step: the scores say how the band does on the first
    and on the last quarter of the steps."""
    y = np.zeros((10, 8, 2))
    q = np.stack([np.full_like(y, -1.0), np.zeros_like(y), np.ones_like(y)])
    q[2][:, 6:] = -0.5  # the last two steps' band misses every target
    scores = quantile_scores(y, q, LEVELS)
    assert scores["coverage_band_p10_p90"] == 0.75
    assert (scores["coverage_first_quarter_band"], scores["coverage_last_quarter_band"]) == (1.0, 0.0)
