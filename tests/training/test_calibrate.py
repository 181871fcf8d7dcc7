"""Conformal quantile offsets on synthetic residuals land near nominal on fresh data; scores and baselines."""

from __future__ import annotations

import numpy as np
import pytest

from training.calibrate import (
    choose_half_life,
    conformal_offsets,
    conformal_rank,
    coverage,
    halves,
    interval_scores,
    pinball,
    scale_floor,
    weighted_offsets,
)
from training.data import DataError
from training.scores import ece, fit_temperature, mape, mase, mase_scale, seasonal_naive

LEVELS = [0.1, 0.5, 0.9]


def test_conformal_rank_finite_sample_correction() -> None:
    assert conformal_rank(9, 0.9) == 9 and conformal_rank(9, 0.1) == 1  # ceil(10 * 0.9), floor(10 * 0.1)
    assert conformal_rank(99, 0.5) == 50 and conformal_rank(3, 0.9) == 3 and conformal_rank(3, 0.1) == 1


def test_offsets_cover_fresh_data_per_step_and_target() -> None:
    """Residuals whose spread grows with the horizon step and differs per target: on new draws from the same
    distribution each level's coverage is within 2 points of nominal, per step too, and the band covers ~80%."""
    rng = np.random.default_rng(0)
    scale = np.sqrt(1 + np.arange(8))[None, :, None] * np.array([0.5, 2.0])[None, None, :]  # (1, H, T)
    offsets = conformal_offsets(rng.standard_normal((4000, 8, 2)) * scale + 0.3, LEVELS)
    assert offsets.shape == (3, 8, 2) and (np.diff(offsets, axis=0) >= 0).all()
    point = rng.standard_normal((6000, 8, 2))
    y = point + rng.standard_normal((6000, 8, 2)) * scale + 0.3
    for level, off in zip(LEVELS, offsets, strict=True):
        assert coverage(y, point + off) == pytest.approx(level, abs=0.02)
        per_step = (y <= point + off).mean(axis=(0, 2))
        assert np.abs(per_step - level).max() < 0.03
    scores = interval_scores(y, point, offsets, LEVELS)
    assert scores["coverage_band_p10_p90"] == pytest.approx(0.8, abs=0.02)
    # A constant band (pooled without per-step scale) would be wrong per step: the data has teeth.
    flat = np.quantile((y - point).ravel(), 0.9)
    assert (y[:, 0] <= point[:, 0] + flat).mean() > 0.95


def test_pooled_offsets_from_few_windows() -> None:
    """13 windows x 12 steps (AirPassengers' validation): pooled over steps is still near nominal."""
    rng = np.random.default_rng(1)
    scale = (1 + 0.1 * np.arange(12))[None, :, None]
    hits: dict[float, list[float]] = {level: [] for level in LEVELS}
    for _ in range(200):
        offsets = conformal_offsets(rng.standard_normal((13, 12, 1)) * scale, LEVELS, pooled=True)
        y = rng.standard_normal((200, 12, 1)) * scale
        for level, off in zip(LEVELS, offsets, strict=True):
            hits[level].append(coverage(y, off))
    for level in LEVELS:
        assert np.mean(hits[level]) == pytest.approx(level, abs=0.02)


def test_offsets_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="expected \\(windows, horizon, targets\\)"):
        conformal_offsets(np.zeros((5, 3)), LEVELS)
    with pytest.raises(ValueError, match="increasing levels"):
        conformal_offsets(np.zeros((5, 3, 1)), [0.9, 0.1])


def test_pinball_loss() -> None:
    y = np.array([1.0, 2.0, 3.0])
    assert pinball(y, np.full(3, 2.0), 0.5) == pytest.approx(0.5 * np.abs(y - 2).mean())
    assert pinball(y, np.full(3, 3.0), 0.9) == pytest.approx((0.1 * 2 + 0.1 * 1) / 3)


def test_seasonal_naive_mase_mape() -> None:
    history = np.arange(24, dtype=float).reshape(1, 24, 1)  # values 0..23, season 12
    pred = seasonal_naive(history, 14, 12)
    assert pred[0, :, 0].tolist() == [*range(12, 24), 12, 13]  # one season back, then two
    with pytest.raises(ValueError, match="at least one season"):
        seasonal_naive(history[:, :6], 3, 12)
    train = np.array([[1.0], [2.0], [4.0], [7.0]])
    assert mase_scale(train, 1).tolist() == [2.0]
    assert mase(np.array([3.0, 5.0]), np.array([4.0, 5.0]), np.array([2.0])) == pytest.approx(0.25)
    assert mape(np.array([100.0, 200.0]), np.array([110.0, 180.0])) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="a target is 0"):
        mape(np.array([0.0]), np.array([1.0]))


def test_ece_and_temperature() -> None:
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 5000)
    p1 = 1 / (1 + np.exp(-true_logit))
    labels = (rng.random(5000) < p1).astype(int)
    calibrated = np.stack([1 - p1, p1], axis=1)
    assert ece(calibrated, labels) < 0.03
    over = np.stack([np.zeros(5000), 3 * true_logit], axis=1)  # 3x overconfident logits
    probs = np.exp(over) / np.exp(over).sum(1, keepdims=True)
    assert ece(probs, labels) > 0.08
    assert fit_temperature(over, labels) == pytest.approx(3.0, rel=0.1)


def test_weighted_offsets_reduce_to_conformal_and_follow_drift() -> None:
    rng = np.random.default_rng(2)
    r = rng.standard_normal((500, 3, 2))
    np.testing.assert_allclose(weighted_offsets(r, LEVELS, np.inf), conformal_offsets(r, LEVELS))
    # Spread grows over time: weighting the newest windows widens the band towards what comes next.
    drift = rng.standard_normal((2000, 2, 1)) * np.linspace(0.5, 2.0, 2000)[:, None, None]
    plain, recent = conformal_offsets(drift, LEVELS), weighted_offsets(drift, LEVELS, half_life=100)
    assert (recent[2] > plain[2]).all() and (recent[0] < plain[0]).all()
    nxt = rng.standard_normal((1000, 2, 1)) * 2.0
    assert abs(coverage(nxt, recent[2]) - 0.9) < abs(coverage(nxt, plain[2]) - 0.9)
    assert choose_half_life(drift, LEVELS, gap=2) < np.inf  # the rolling-origin check sees the drift
    assert choose_half_life(rng.standard_normal((2000, 2, 1)), LEVELS, gap=2) >= 250  # stationary: long memory


def test_the_half_life_check_never_scores_a_block_with_its_own_future(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rolling origin: each scored block is fitted only on windows that end ``gap`` windows before it. With few
    windows, ``r[: b * size - gap]`` went empty (IndexError) or, with a negative stop, took the block and its
    future; such blocks are skipped, and too few windows for any block are refused with the numbers."""
    from training import calibrate

    seen: list[int] = []
    fit = calibrate.weighted_offsets

    def spy(past: np.ndarray, levels: object, half_life: float) -> object:
        seen.append(len(past))
        return fit(past, levels, half_life)  # type: ignore[arg-type]

    monkeypatch.setattr(calibrate, "weighted_offsets", spy)
    r = np.random.default_rng(0).standard_normal((49, 12, 1))
    choose_half_life(r, LEVELS, gap=12)  # 5 blocks of 9: blocks 1 and 2 have no room before them
    size = 9
    assert seen and set(seen) == {3 * size - 12, 4 * size - 12}  # blocks 3 and 4 only, each on its own past
    with pytest.raises(DataError, match=r"13 calibration windows are too few .* at least 20 windows"):
        choose_half_life(r[:13], LEVELS, gap=12)


def test_conformal_rank_median_and_float_products() -> None:
    """tau = 0.5 takes the ceiling like the upper levels; a level whose (n + 1) * tau lands a hair above an
    integer in floating point is not bumped a rank (100 * 0.55 = 55.00000000000001, a level of
    training.adaptive's GRID: rank 55, not 56)."""
    assert conformal_rank(98, 0.5) == 50 and conformal_rank(99, 0.55) == 55


def test_coverage_counts_a_target_on_the_quantile() -> None:
    """'at or below' the quantile: ties count; ties are common in rounded data."""
    assert coverage(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 2.0, 2.0])) == 0.5


def test_scale_floor_is_a_tenth_of_the_median_and_never_zero() -> None:
    """One volatile window must not lift the floor."""
    np.testing.assert_allclose(scale_floor(np.array([[1.0, 0.0], [2.0, 0.0], [30.0, 0.0]])), [0.2, 1e-6])


def test_halves_leave_the_overlapping_windows_out() -> None:
    """The half-split check must not score windows whose targets overlap the calibrating half: ``gap`` windows are
    left out around the cut, at most n // 4."""
    first, second = halves(100, 10)
    assert first.tolist() == list(range(45)) and second.tolist() == list(range(55, 100))
    first, second = halves(8, 10)  # the gap is clamped to 8 // 4 = 2
    assert first.tolist() == [0, 1, 2] and second.tolist() == [5, 6, 7]


def test_mase_scale_is_the_seasonal_in_sample_error() -> None:
    """MASE's denominator is the seasonal-naive error at lag ``season``, not lag 1; and ``mase``
    averages MAE / scale per column."""
    train = np.array([[0.0], [10.0], [1.0], [13.0], [3.0], [14.0]])  # period 2
    assert mase_scale(train, 2).tolist() == [1.75]  # |1-0|, |13-10|, |3-1|, |14-13| -> 7 / 4 (lag 1: 10.4)
    y = np.zeros((1, 3, 2))  # (N=1, H=3, T=2)
    pred = np.array([[[1.0, 4.0], [1.0, 4.0], [1.0, 4.0]]])  # column 0: MAE 1, column 1: MAE 4
    assert mase(y, pred, np.array([1.0, 2.0])) == pytest.approx((1 / 1 + 4 / 2) / 2)


def test_the_half_life_candidates_include_unweighted(monkeypatch: pytest.MonkeyPatch) -> None:
    """--calibration recent may choose no weighting at all (half-life inf, recorded as "inf"): it is one of the
    candidates the rolling-origin check scores, beside n/2, n/4 and n/8."""
    from training import calibrate
    from training.calibrate import choose_half_life

    seen: set[float] = set()
    fit = calibrate.weighted_offsets

    def spy(past: np.ndarray, levels: object, half_life: float) -> object:
        seen.add(half_life)
        return fit(past, levels, half_life)  # type: ignore[arg-type]

    monkeypatch.setattr(calibrate, "weighted_offsets", spy)
    choose_half_life(np.random.default_rng(0).standard_normal((400, 2, 1)), LEVELS, gap=2)
    assert seen == {np.inf, 200.0, 100.0, 50.0}


def test_the_interval_rule_on_hand_made_scores() -> None:
    """pick(): a scaled band is admissible only within 1% of the BEST constant band's pinball loss, and among the
    admissible the smallest coverage miss wins (not the smallest pinball loss; not a tolerance from the worst
    constant band, nor a 5% one)."""
    from training.calibrate import IntervalChoice, pick

    scored = [
        IntervalChoice("none", 0, False, miss=0.30, pinball=1.000),
        IntervalChoice("none", 0, True, miss=0.25, pinball=1.200),
        IntervalChoice("mad", 24, False, miss=0.05, pinball=1.030),  # 3% worse than the best constant: refused
        IntervalChoice("std", 12, False, miss=0.20, pinball=1.005),  # within 1%: admissible, best miss
    ]
    assert pick(scored) is scored[3]
    assert pick(scored[:2]) is scored[1]  # constant bands are always admissible: the smaller miss


def test_the_half_split_floors_the_scale_on_the_calibrating_half_only() -> None:
    """Windows 0-3 move by 10 a row, windows 4-7 by 0.1. Calibrating on the first half floors the scale at
    0.1 x median(10) = 1, so the calm half is scored with scale 1 and its residuals 0.6 fall under p90: the floor
    comes from the calibrating half only, never from the half it is checked on."""
    from training.calibrate import IntervalChoice, half_split

    history = np.array([[[0.0], [10.0], [20.0]]] * 4 + [[[0.0], [0.1], [0.2]]] * 4)  # (8, 3, 1)
    residuals = np.array([-10.0, -5.0, 5.0, 10.0, 0.6, 0.6, 0.6, 0.6]).reshape(8, 1, 1)
    c = half_split(history, residuals, LEVELS, IntervalChoice("mad", 2, False), gap=0)
    assert c.halves[0] == (0.0, 0.0, 1.0, 1.0)  # below p10, p50, p90, inside the p10-p90 band
