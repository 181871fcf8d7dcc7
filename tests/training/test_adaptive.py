"""training/adaptive.py: online adaptive conformal levels (ACI), the check that keeps them out of the released
models. Synthetic residuals with a known distribution, so every expected coverage is known."""

from __future__ import annotations

import numpy as np
import pytest

from training.adaptive import GRID, Online, admissible, check, offsets_at, online, online_width
from training.calibrate import conformal_offsets, halves

LEVELS = [0.1, 0.5, 0.9]


def residuals(n: int, horizon: int, sigma: np.ndarray, seed: int = 0) -> np.ndarray:
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
    assert still.pinball == pytest.approx(fixed.pinball, rel=1e-9)


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
