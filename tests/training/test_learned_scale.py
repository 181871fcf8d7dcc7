"""training/learned_scale.py: a scale fitted on train residuals, checked beside the volatility scales. Synthetic
windows whose error size is a known function of their history's volatility, so what the fit should find is
known."""

from __future__ import annotations

import numpy as np
import pytest

from training.calibrate import volatility
from training.learned_scale import LEARNED, agreement, features, fit, learned_scale, study

LEVELS = [0.1, 0.5, 0.9]
WINDOW, HORIZON = 24, 4


def windows(n: int, power: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n random-walk windows (n, WINDOW, 1), each with its own step size v; residuals (n, HORIZON, 1) Gaussian with
    standard deviation v ** power (power 0: unrelated to the history). -> history, residuals, v."""
    rng = np.random.default_rng(seed)
    v = np.exp(rng.uniform(-1.5, 1.5, n))
    history = np.cumsum(rng.standard_normal((n, WINDOW, 1)) * v[:, None, None], axis=1)
    residuals = rng.standard_normal((n, HORIZON, 1)) * (v**power)[:, None, None]
    return history, residuals, v


def test_the_fit_finds_an_error_size_that_grows_faster_than_the_volatility() -> None:
    history, residuals, v = windows(6000, power=2.0, seed=0)
    weights = fit(history, residuals)
    assert weights.shape == (1, features(history).shape[2] + 1)
    s = learned_scale(history, weights)[:, 0, 0]
    # log s tracks log v ** 2 (slope ~2), which no single volatility measure (slope ~1) can express
    slope = np.polyfit(np.log(v), np.log(s), 1)[0]
    assert 1.7 < slope < 2.3
    assert np.polyfit(np.log(v), np.log(volatility(history, "mad", WINDOW - 1)[:, 0]), 1)[0] < 1.2
    fresh_h, fresh_r, _ = windows(3000, power=2.0, seed=1)
    assert agreement(fresh_h, fresh_r, weights) > 0.5


def test_when_it_explains_the_errors_best_the_learned_band_is_the_sharpest_and_still_covers() -> None:
    _, scored, _ = study(windows(6000, 2.0, 0)[:2], windows(3000, 2.0, 1)[:2], LEVELS, gap=HORIZON)
    learned = [c for c in scored if c.kind == LEARNED]
    assert len(learned) == 2 and {c.pooled for c in learned} == {False, True}
    best_other = min(c.pinball for c in scored if c.kind != LEARNED)
    for c in learned:
        assert c.pinball < 0.95 * best_other
        for direction in c.halves:  # coverage per level, then the band, on the other half
            assert abs(direction[-1] - 0.8) < 0.04


def test_with_errors_unrelated_to_the_history_the_learned_scale_stays_flat() -> None:
    history, residuals, _ = windows(6000, power=0.0, seed=2)
    s = learned_scale(history, fit(history, residuals))[:, 0, 0]
    assert s.std() / s.mean() < 0.05
    _, scored, _ = study((history, residuals), windows(3000, 0.0, 3)[:2], LEVELS, gap=HORIZON)
    constant = min(c.pinball for c in scored if c.kind == "none")
    assert all(c.pinball > 0.99 * constant for c in scored if c.kind == LEARNED)  # nothing to gain


def test_fit_refuses_mismatched_or_too_few_windows() -> None:
    history, residuals, _ = windows(50, 1.0, 0)
    with pytest.raises(ValueError, match="same N and T"):
        fit(history, residuals[:40])
    with pytest.raises(ValueError, match="need more windows"):
        fit(history[:5], residuals[:5])
