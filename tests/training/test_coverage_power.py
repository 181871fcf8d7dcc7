"""``training.coverage_power``: the simulated forecaster is calibrated on average (its quantiles are the true ones),
and whether it passes the interval check depends on the split's size: almost never on AirPassengers' 13 windows x
12 months, mostly on thousands of windows."""

from __future__ import annotations

import numpy as np
import pytest

from training.coverage_power import LEVELS, main, power, shares


def test_a_perfect_forecaster_is_calibrated_on_average_and_fails_a_small_split() -> None:
    small = shares(13, 12, 1, phi=0.5, runs=300)
    np.testing.assert_allclose(small.mean(axis=0), [*LEVELS, 0.8], atol=0.02)  # right on average
    p = power(small, at_most=0.763)
    assert p.below is not None  # (a band was asked for)
    assert p.passed < 0.05 and p.band[0] < 0.7 and p.band[1] > 0.9  # but any one split is far off
    assert 0.15 < p.below < 0.5  # forecaster-air/1's 76.3% is what a perfect forecaster often shows
    large = power(shares(3000, 12, 1, phi=0.5, runs=40, seed=1))
    assert large.passed > 0.6 and 0.78 < large.band[0] < large.band[1] < 0.83


def test_errors_that_carry_over_widen_the_spread() -> None:
    """With phi = 0.9 each error carries into the next steps: the same split size spreads the band's coverage
    more than with independent rows."""
    calm, sticky = (power(shares(200, 12, 1, phi, runs=200)) for phi in (0.0, 0.9))
    assert sticky.band[1] - sticky.band[0] > 1.3 * (calm.band[1] - calm.band[0])


def test_the_command_prints_one_row_per_split_and_rate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--runs", "20"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 9 and rows[0].startswith("AirPassengers (forecaster-air) 13x12x1") and "%" in rows[0]
