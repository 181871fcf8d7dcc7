"""How often a forecaster whose quantiles are exactly right passes the interval check on a test split this size.

The check (issue #14): the p10-p90 band covers 78-82% of the test targets and each quantile's share of targets at or
below it is within 2 points of its level. A split of N stride-1 windows x H steps of one series holds only
N + H - 1 distinct target rows, and a forecast's errors are correlated across steps and windows, so the shares vary
from split to split even for a perfect forecaster. This simulates that forecaster: a Gaussian AR(1) series
``y[t] = phi * y[t-1] + e[t]`` forecast with its true conditional quantiles ``phi**h * y[t] + z_tau * sd_h``, over
``runs`` independent splits of the given size, ``columns`` independent target columns each. It prints the share of
splits that pass, and the middle 90% of the band's coverage.

    python -m training.coverage_power            # AirPassengers', ETTh1's and ETTm1's test splits, phi 0 / 0.5 / 0.9
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

LEVELS = (0.1, 0.5, 0.9)
BAND, TOLERANCE = (0.78, 0.82), 0.02
SPLITS = {  # test split: (stride-1 windows, horizon, target columns), as seqserve-train evaluate scores them
    "AirPassengers (forecaster-air)": (13, 12, 1),
    "ETTh1 (forecaster/4)": (2785, 96, 7),
    "ETTm1 (forecaster-ettm1/3)": (11425, 96, 7),
}


@dataclass(frozen=True)
class Power:
    passed: float  # share of the simulated splits that pass the check
    band: tuple[float, float]  # 5th and 95th percentile of the band's coverage over those splits
    below: float | None  # share of the splits whose band covers at most ``at_most`` (None when none is given)


def shares(windows: int, horizon: int, columns: int, phi: float, runs: int, seed: int = 0) -> npt.NDArray[np.float64]:
    """(runs, levels + 1): each simulated split's share of targets at or below each quantile, then the band's."""
    rng = np.random.default_rng(seed)
    burn = 50
    out = np.empty((runs, len(LEVELS) + 1))
    z = np.array([NormalDist().inv_cdf(tau) for tau in LEVELS])  # (Q,)
    steps = np.arange(1, horizon + 1)
    sd = np.sqrt(np.cumsum(phi ** (2 * (steps - 1))))  # sd of the h-step error, innovations of variance 1
    for r in range(runs):
        e = rng.standard_normal((burn + windows + horizon, columns))
        y = np.empty_like(e)
        y[0] = e[0] / np.sqrt(max(1 - phi**2, 1e-12)) if phi < 1 else e[0]
        for t in range(1, len(e)):
            y[t] = phi * y[t - 1] + e[t]
        y = y[burn - 1 :]  # row 0: the last history row of window 0
        origin = y[:windows]  # (N, C)
        target = np.stack([y[h : h + windows] for h in steps], axis=1)  # (N, H, C)
        err = (target - phi ** steps[None, :, None] * origin[:, None]) / sd[None, :, None]  # ~ N(0, 1)
        below = err[None] <= z[:, None, None, None]  # (Q, N, H, C)
        out[r, : len(LEVELS)] = below.mean(axis=(1, 2, 3))
        out[r, -1] = ((err >= z[0]) & (err <= z[-1])).mean()
    return out


def power(s: npt.NDArray[np.float64], at_most: float | None = None) -> Power:
    ok = (s[:, -1] >= BAND[0]) & (s[:, -1] <= BAND[1])
    ok &= (np.abs(s[:, : len(LEVELS)] - np.asarray(LEVELS)) <= TOLERANCE).all(axis=1)
    lo, hi = np.percentile(s[:, -1], [5, 95])
    below = None if at_most is None else float((s[:, -1] <= at_most).mean())
    return Power(float(ok.mean()), (float(lo), float(hi)), below)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2000, help="simulated splits per row (ETT rows: a tenth of them)")
    ap.add_argument("--air-band", type=float, default=0.763, help="forecaster-air/1's test band, for the last column")
    args = ap.parse_args(argv)
    print(f"A perfect forecaster (AR(1), true quantiles) on test splits of these sizes: share of splits that pass "
          f"(band {BAND[0]:.0%}-{BAND[1]:.0%}, each quantile within {TOLERANCE * 100:.0f} points)")  # fmt: skip
    print(f"{'split (windows x horizon x columns)':<44} {'phi':>4} {'pass':>6}  {'band, 5-95%':>13}  "
          f"band <= {args.air_band:.1%}")  # fmt: skip
    for name, (n, h, c) in SPLITS.items():
        small = n * h * c < 100_000  # AirPassengers' size: all the runs, and the share at or below its band
        runs = args.runs if small else max(args.runs // 10, 2)
        for phi in (0.0, 0.5, 0.9):
            p = power(shares(n, h, c, phi, runs), args.air_band if small else None)
            below = "     -" if p.below is None else f"{p.below:6.1%}"
            print(f"{f'{name} {n}x{h}x{c}':<44} {phi:>4} {p.passed:6.1%}  {p.band[0]:5.1%}-{p.band[1]:5.1%}  {below}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
