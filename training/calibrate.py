"""Split-conformal quantile offsets for forecasters, and the scores that check them (coverage, pinball loss).

Serving forms quantile ``q`` as ``point + offsets[q][h][t]`` on the z-scored scale and then de-normalizes it
(``service/core/tasks/forecast.py``), so calibration produces exactly those constants: one-sided conformal
quantiles of the residuals ``y - point`` (z-scored) of windows the model was not fitted on (the validation
split), per horizon step ``h`` and target ``t``. With ``n`` calibration windows, the level-``tau`` offset is the
``k``-th smallest residual, ``k = ceil((n + 1) tau)`` for ``tau >= 0.5`` and ``floor((n + 1) tau)`` below: under
exchangeability ``P(y <= point + offset)`` is then within ``1 / (n + 1)`` of ``tau`` (Vovk et al. 2005; Romano,
Patterson & Candes 2019). ``pooled=True`` (for small data) shares one set of quantiles across horizon steps after
dividing each step's residuals by its RMS, then scales back per step: ``n * horizon`` residuals instead of ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


def conformal_rank(n: int, tau: float) -> int:
    """1-based rank of the level-``tau`` conformal quantile among ``n`` sorted residuals (clamped to 1..n)."""
    k = math.ceil((n + 1) * tau - 1e-9) if tau >= 0.5 else math.floor((n + 1) * tau + 1e-9)
    return min(max(k, 1), n)


def conformal_offsets(residuals: npt.ArrayLike, levels: Sequence[float], pooled: bool = False) -> F64:
    """``residuals`` (N, H, T) = y - point on the calibration windows -> offsets (Q, H, T), non-decreasing in q."""
    r = np.asarray(residuals, dtype=np.float64)
    if r.ndim != 3 or r.shape[0] < 1:
        raise ValueError(f"residuals: expected (windows, horizon, targets) with windows >= 1, got {list(r.shape)}")
    if list(levels) != sorted(levels) or not all(0 < tau < 1 for tau in levels):
        raise ValueError(f"levels: expected increasing levels in (0, 1), got {list(levels)}")
    if pooled:
        scale = np.sqrt((r**2).mean(axis=0, keepdims=True)) + 1e-12  # (1, H, T) per-step RMS
        unit = (r / scale).transpose(1, 0, 2).reshape(-1, r.shape[2])  # (H*N, T)
        pooled_offsets: F64 = conformal_offsets(unit[:, None, :], levels) * scale  # (Q, 1, T) * (1, H, T)
        return pooled_offsets
    s = np.sort(r, axis=0)
    return np.stack([s[conformal_rank(len(s), tau) - 1] for tau in levels])  # (Q, H, T)


def weighted_offsets(residuals: npt.ArrayLike, levels: Sequence[float], half_life: float) -> F64:
    """Non-exchangeable split conformal (Barber, Candes, Ramdas & Tibshirani 2023): residuals (N, H, T) in time
    order, window i weighted ``0.5 ** ((N - 1 - i) / half_life)`` (the newest weighs 1), plus weight 1 at +inf for
    the point to cover. An infinite half-life gives ``conformal_offsets`` exactly. -> offsets (Q, H, T)."""
    r = np.asarray(residuals, dtype=np.float64)
    n = r.shape[0]
    w = 0.5 ** ((n - 1 - np.arange(n)) / half_life) if np.isfinite(half_life) else np.ones(n)

    def upper(values: F64, tau: float) -> F64:
        order = np.argsort(values, axis=0, kind="stable")  # (N, H, T)
        cum = np.cumsum(w[order], axis=0) / (w.sum() + 1.0)  # weight 1 stays at +inf
        k = np.minimum((cum < tau - 1e-12).sum(axis=0), n - 1)  # first rank reaching tau (clamped to the max)
        out: F64 = np.take_along_axis(np.sort(values, axis=0), k[None], axis=0)[0]
        return out

    return np.stack([upper(r, tau) if tau >= 0.5 else -upper(-r, 1 - tau) for tau in levels])


def choose_half_life(residuals: npt.ArrayLike, levels: Sequence[float], gap: int, blocks: int = 5) -> float:
    """The half-life (in windows; inf = unweighted) whose offsets, fitted on the windows before each of the last
    ``blocks - 1`` consecutive blocks of the calibration windows, miss the levels least on that block (rolling
    origin inside the validation split; ``gap`` windows that overlap the block's targets are skipped)."""
    r = np.asarray(residuals, dtype=np.float64)
    size = len(r) // blocks
    candidates = [np.inf, len(r) / 2, len(r) / 4, len(r) / 8]
    errors = []
    for half_life in candidates:
        miss = []
        for b in range(1, blocks):
            past, block = r[: b * size - gap], r[b * size : (b + 1) * size]
            off = weighted_offsets(past, levels, half_life)
            miss += [abs(float((block <= o).mean()) - tau) for tau, o in zip(levels, off, strict=True)]
        errors.append(float(np.mean(miss)))
    return float(candidates[int(np.argmin(errors))])


def coverage(y: npt.ArrayLike, quantile: npt.ArrayLike) -> float:
    """Share of targets at or below the quantile forecast (should be close to its level)."""
    return float((np.asarray(y) <= np.asarray(quantile)).mean())


def pinball(y: npt.ArrayLike, quantile: npt.ArrayLike, tau: float) -> float:
    """Mean quantile (pinball) loss of the level-``tau`` forecast: lower is better; 0.5 * MAE at tau 0.5."""
    d = np.asarray(y, dtype=np.float64) - np.asarray(quantile, dtype=np.float64)
    return float(np.maximum(tau * d, (tau - 1) * d).mean())


def interval_scores(
    y: npt.ArrayLike, point: npt.ArrayLike, offsets: npt.ArrayLike, levels: Sequence[float]
) -> dict[str, float]:
    """Coverage and pinball loss per level, and the coverage of the outer band (e.g. p10-p90), for ``y`` and
    ``point`` (N, H, T) z-scored and ``offsets`` (Q, H, T)."""
    y, point, off = np.asarray(y), np.asarray(point), np.asarray(offsets)
    q = point[None] + off[:, None]  # (Q, N, H, T)
    out: dict[str, float] = {}
    for tau, qi in zip(levels, q, strict=True):
        out[f"coverage_q{tau:g}"] = coverage(y, qi)
        out[f"pinball_q{tau:g}"] = pinball(y, qi, tau)
    lo, hi = levels[0], levels[-1]
    band = f"band_p{round(100 * lo)}_p{round(100 * hi)}"
    out[f"coverage_{band}"] = float(((y >= q[0]) & (y <= q[-1])).mean())
    return out
