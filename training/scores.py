"""Plain-numpy scores: the seasonal-naive baseline, MAPE and MASE for forecasts, expected calibration error for
classifier probabilities."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


def seasonal_naive(history: npt.ArrayLike, horizon: int, season: int) -> F64:
    """history (N, L, T) -> forecasts (N, H, T): each step repeats the value one season (or k seasons) earlier,
    ``y(t + h) = y(t + h - season * ceil(h / season))``. Needs ``L >= season``."""
    x = np.asarray(history, dtype=np.float64)
    if x.shape[1] < season:
        raise ValueError(f"seasonal naive needs a history of at least one season ({season} rows), got {x.shape[1]}")
    h = np.arange(1, horizon + 1)
    pos = x.shape[1] - 1 + h - season * np.ceil(h / season).astype(int)  # index into the history
    out: F64 = x[:, pos]
    return out


def mase_scale(train: npt.ArrayLike, season: int) -> F64:
    """Per-column in-sample MAE of the seasonal-naive forecast on the train rows (T,): MASE's denominator."""
    y = np.asarray(train, dtype=np.float64)
    out: F64 = np.abs(y[season:] - y[:-season]).mean(axis=0)
    return out


def mase(y: npt.ArrayLike, pred: npt.ArrayLike, scale: npt.ArrayLike) -> float:
    """Mean over columns of MAE / scale (Hyndman & Koehler 2006); < 1 beats in-sample seasonal naive."""
    err = np.abs(np.asarray(y, np.float64) - np.asarray(pred, np.float64)).reshape(-1, np.shape(scale)[0])
    return float((err.mean(axis=0) / np.asarray(scale)).mean())


def mape(y: npt.ArrayLike, pred: npt.ArrayLike) -> float:
    """Mean absolute percentage error in percent; only defined when no target is 0."""
    t, p = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    if (t == 0).any():
        raise ValueError("MAPE is undefined: a target is 0")
    return float(100 * np.abs((t - p) / t).mean())


def ece(probs: npt.ArrayLike, labels: npt.ArrayLike, bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence (Guo et al. 2017): the bin-weighted mean of
    |accuracy - confidence| over ``bins`` equal-width confidence bins."""
    p = np.asarray(probs, dtype=np.float64)  # (N, classes)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    correct = (pred == np.asarray(labels)).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def fit_temperature(logits: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """The softmax temperature T minimizing the NLL of ``logits / T`` (Guo et al. 2017), by a fine grid over
    log T in [-2, 2] (one parameter: a grid is exact enough and cannot diverge)."""
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    best, best_nll = 1.0, np.inf
    for t in np.exp(np.linspace(-2, 2, 401)):
        s = z / t
        s = s - s.max(axis=1, keepdims=True)
        nll = float((np.log(np.exp(s).sum(axis=1)) - s[np.arange(len(y)), y]).mean())
        if nll < best_nll:
            best, best_nll = float(t), nll
    return best
