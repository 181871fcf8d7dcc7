"""A learned interval scale, checked inside the validation split (not adopted: docs/models.md, "A learned scale").

The released forecasters scale their offsets by one volatility measure of the window's own history
(``training.calibrate.window_scale``). A learned scale predicts each window's error size from all of them at
once: per target column, a least-squares fit of ``log(mean |residual| over the horizon)`` on the logs of the "mad"
and "std" volatilities at every candidate ``k`` (a spread model as in Lei et al. 2018's locally weighted
conformal, fitted on other data than the calibration). It is fitted on the point model's **train-split**
windows, so the validation windows stay untouched for the check: the learned scale, per-step or pooled, joins the
constant and volatility candidates in ``choose_interval``'s half-split check on the validation windows and the
same rule (``training.calibrate.pick``) decides.

    python -m training.learned_scale --model models/forecaster/2 --data ../shared/data/etth1/ETTh1.csv
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from training.calibrate import (
    SCALE_KINDS,
    SCALE_KS,
    IntervalChoice,
    choose_interval,
    half_split,
    pick,
    volatility,
)

F64 = npt.NDArray[np.float64]
EPS = 1e-3  # added to every volatility and error size (z-scored units) before the log: flat windows stay finite
LEARNED = "learned"


def feature_ks(window: int) -> list[int]:
    """The volatility spans the fit reads: the candidate ``k`` below the window, and the whole window."""
    return sorted({k for k in (*SCALE_KS, window - 1) if 1 <= k < window})


def features(history: npt.ArrayLike) -> F64:
    """history (N, L, T) z-scored -> (N, T, P): log(EPS + volatility) for every kind in ``SCALE_KINDS`` and every
    ``feature_ks(L)``, per target column."""
    x = np.asarray(history, dtype=np.float64)
    return np.stack(
        [np.log(EPS + volatility(x, kind, k)) for kind in SCALE_KINDS for k in feature_ks(x.shape[1])], axis=-1
    )


def fit(history: npt.ArrayLike, residuals: npt.ArrayLike) -> F64:
    """Per target column, least squares of log(EPS + mean_h |residual|) on ``features`` plus an intercept, over
    the windows ``history`` (N, L, T) and ``residuals`` (N, H, T) = y - point -> weights (T, P + 1)."""
    x, r = np.asarray(history, dtype=np.float64), np.asarray(residuals, dtype=np.float64)
    if x.ndim != 3 or r.ndim != 3 or len(x) != len(r) or x.shape[2] != r.shape[2]:
        raise ValueError(
            f"fit: expected history (N, L, T) and residuals (N, H, T) with the same N and T, got "
            f"{list(x.shape)} and {list(r.shape)}"
        )
    f = features(x)  # (N, T, P)
    if len(x) <= f.shape[2] + 1:
        raise ValueError(f"fit: {len(x)} windows for {f.shape[2] + 1} weights per column; need more windows")
    size = np.log(EPS + np.abs(r).mean(axis=1))  # (N, T)
    weights = []
    for t in range(x.shape[2]):
        a = np.c_[f[:, t], np.ones(len(f))]
        w, *_ = np.linalg.lstsq(a, size[:, t], rcond=None)
        weights.append(w)
    return np.array(weights)


def learned_scale(history: npt.ArrayLike, weights: F64) -> F64:
    """history (N, L, T) -> the predicted error size (N, 1, T) > 0 that multiplies the offsets."""
    f = features(history)  # (N, T, P)
    out: F64 = np.exp((f * weights[None, :, :-1]).sum(axis=-1) + weights[None, :, -1])[:, None, :]
    return out


def agreement(history: npt.ArrayLike, residuals: npt.ArrayLike, weights: F64) -> float:
    """Correlation of the predicted and the actual log error size on these windows (mean over columns): what a
    scale needs (conformal offsets set its level, so only the ranking of windows matters)."""
    size = np.log(EPS + np.abs(np.asarray(residuals, dtype=np.float64)).mean(axis=1))  # (N, T)
    pred = np.log(learned_scale(history, weights)[:, 0])
    return float(np.mean([np.corrcoef(pred[:, t], size[:, t])[0, 1] for t in range(size.shape[1])]))


def study(
    train: tuple[F64, F64], val: tuple[F64, F64], levels: Sequence[float], gap: int
) -> tuple[IntervalChoice, list[IntervalChoice], F64]:
    """``train`` and ``val``: (history (N, L, T), residuals (N, H, T)) in time order. Fits the learned scale on
    ``train``, scores it (per-step and pooled) beside ``choose_interval``'s candidates in the half-split check on
    ``val``, and applies the rule to all -> (the rule's pick, every candidate scored, the weights)."""
    weights = fit(*train)
    hv, rv = val
    _, scored = choose_interval(hv, rv, levels, gap=gap)
    scale = learned_scale(hv, weights)
    scored += [half_split(hv, rv, levels, IntervalChoice(LEARNED, 0, p), gap, scale) for p in (False, True)]
    return pick(scored), scored, weights


def main(argv: list[str] | None = None) -> int:
    from training.evaluate import forecast_windows, forecaster_study
    from training.forecasting import LEVELS
    from training.series import windows

    m, sess, s = forecaster_study(__doc__, argv)
    f = m.forecast
    assert f is not None  # forecaster_study checked

    def part(name: str) -> tuple[F64, F64]:
        x, y = windows(s.part(name, f.window), f.window, f.horizon, s.target_index)
        residuals = (y - forecast_windows(m, sess, x)).astype(np.float64)
        return x[:, :, s.target_index].astype(np.float64), residuals

    train, val = part("train"), part("val")
    try:
        chosen, scored, weights = study(train, val, LEVELS, gap=f.horizon)
    except ValueError as e:
        raise SystemExit(f"{m.name}/{m.version}: {e}") from None
    print(
        f"{m.name}/{m.version}: a scale learned on {len(train[0])} train windows (correlation with the log "
        f"error size: {agreement(*train, weights):.3f} there, {agreement(*val, weights):.3f} on validation), "
        f"checked on {len(val[0])} validation windows, half against half"
    )
    base = min(c.pinball for c in scored if c.kind == "none")
    print(f"  {'candidate':<44} {'miss':>6} {'pinball vs constant':>20}  band (first -> second | second -> first)")
    for c in sorted(scored, key=lambda c: c.miss):
        bands = " | ".join(f"{100 * h[-1]:5.1f}%" for h in c.halves)
        mark = "  <- picked" if c == chosen else ""
        print(f"  {c.label:<44} {c.miss:6.3f} {100 * (c.pinball / base - 1):+19.1f}%  {bands}{mark}")
    print(f"  the interval rule picks: {chosen.label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
