"""Split-conformal quantile offsets for forecasters, and the scores that check them (coverage, pinball loss).

Serving forms quantile ``q`` as ``point + offsets[q][h][t]`` on the z-scored scale and then de-normalizes it
(``service/core/tasks/forecast.py``), so calibration produces exactly those constants: one-sided conformal
quantiles of the residuals ``y - point`` (z-scored) of windows the model was not fitted on (the validation
split), per horizon step ``h`` and target ``t``. With ``n`` calibration windows, the level-``tau`` offset is the
``k``-th smallest residual, ``k = ceil((n + 1) tau)`` for ``tau >= 0.5`` and ``floor((n + 1) tau)`` below: under
exchangeability ``P(y <= point + offset)`` is then within ``1 / (n + 1)`` of ``tau`` (Vovk et al. 2005; Romano,
Patterson & Candes 2019). ``pooled=True`` (for small data) shares one set of quantiles across horizon steps after
dividing each step's residuals by its RMS, then scales back per step: ``n * horizon`` residuals instead of ``n``.

Normalized conformal (Papadopoulos et al. 2002; Lei et al. 2018): when the error level drifts, a constant band is
right for no period. ``window_scale`` measures each window's own volatility from its history (the mean absolute
or the std of the last ``k`` row-to-row changes of each target, floored); the offsets are then conformal
quantiles of ``residual / scale`` and serving forms ``point + offset * scale``. ``choose_interval`` picks the
volatility measure, ``k`` and per-step vs pooled offsets by a check inside the calibration (validation) windows
only: calibrate on the first half, score on the second, and vice versa.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from training.data import DataError

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
    # A block is scored only with at least a block's worth of windows before it once the gap is skipped (with
    # fewer, ``r[: b * size - gap]`` would be empty, or with a negative stop, the block and its future).
    scored = [b for b in range(1, blocks) if b * size - gap >= max(size, 1)]
    if not scored:
        raise DataError(
            f"--calibration recent: {len(r)} calibration windows are too few to choose a half-life by rolling origin "
            f"(a block of the last {blocks - 1} needs a gap of {gap} windows and a block's worth before it: at least "
            f"{blocks * max(1, math.ceil(gap / (blocks - 2)))} windows); use another --calibration"
        )
    candidates = [np.inf, len(r) / 2, len(r) / 4, len(r) / 8]
    errors = []
    for half_life in candidates:
        miss = []
        for b in scored:
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
    y: npt.ArrayLike,
    point: npt.ArrayLike,
    offsets: npt.ArrayLike,
    levels: Sequence[float],
    scale: npt.ArrayLike | None = None,
) -> dict[str, float]:
    """Coverage and pinball loss per level, and the coverage of the outer band (e.g. p10-p90), for ``y`` and
    ``point`` (N, H, T) z-scored, ``offsets`` (Q, H, T) and, when the model has one, each window's ``scale``
    (N, 1 or H, T) multiplying the offsets (as serving does)."""
    y, point, off = np.asarray(y), np.asarray(point), np.asarray(offsets)
    spread = off[:, None] if scale is None else off[:, None] * np.asarray(scale)[None]  # (Q, 1 or N, H, T)
    return quantile_scores(y, point[None] + spread, levels)


def quantile_scores(y: npt.ArrayLike, q: npt.ArrayLike, levels: Sequence[float]) -> dict[str, float]:
    """``interval_scores`` for quantiles ``q`` (Q, N, H, T) given as they are (e.g. an adaptive width's)."""
    y, q = np.asarray(y), np.asarray(q)
    out: dict[str, float] = {}
    for tau, qi in zip(levels, q, strict=True):
        out[f"coverage_q{tau:g}"] = coverage(y, qi)
        out[f"pinball_q{tau:g}"] = pinball(y, qi, tau)
    lo, hi = levels[0], levels[-1]
    band = f"band_p{round(100 * lo)}_p{round(100 * hi)}"
    inside = (y >= q[0]) & (y <= q[-1])  # (N, H, T)
    out[f"coverage_{band}"] = float(inside.mean())
    if inside.ndim == 3:  # calibrated on average over the horizon is not calibrated per step: the first and last
        quarter = max(1, inside.shape[1] // 4)  # quarter of the steps (e.g. hours 1-24 and 73-96)
        out["coverage_first_quarter_band"] = float(inside[:, :quarter].mean())
        out["coverage_last_quarter_band"] = float(inside[:, -quarter:].mean())
    return out


# --- normalized conformal: a per-window scale -------------------------------------------------------------------
SCALE_KINDS = ("mad", "std")  # mean absolute / standard deviation of the last k row-to-row changes
SCALE_KS = (4, 8, 12, 24, 48)  # candidate k (those below the window, and window - 1: the whole window)
FLOOR_FRACTION = 0.1  # the scale never drops below this share of its median over the calibration windows


@dataclass(frozen=True)
class IntervalChoice:
    """How intervals are formed: ``kind`` "none" (constant offsets) or a ``SCALE_KINDS`` volatility over the last
    ``k`` changes (or "learned": the scale ``training.learned_scale`` checks, never released); offsets per horizon
    step or ``pooled``. The half-split check's scores, each the mean over both
    halves: ``miss``, sum_q |coverage_q - level_q|, and ``pinball``, the mean pinball loss over the levels; and
    ``halves``, each direction's coverage per level and of the outer band."""

    kind: str
    k: int
    pooled: bool
    miss: float = float("nan")
    pinball: float = float("nan")
    halves: tuple[tuple[float, ...], ...] = ()  # first -> second half, second -> first: coverage per level, band

    @property
    def label(self) -> str:
        scale = {"none": "constant", "learned": "learned from train residuals"}.get(
            self.kind, f"{self.kind} of the last {self.k} changes"
        )
        return f"{scale}, {'pooled' if self.pooled else 'per-step'}"


def volatility(history: npt.ArrayLike, kind: str, k: int) -> F64:
    """history (N, L, T) z-scored -> (N, T): the mean absolute ("mad") or the standard deviation ("std", ddof 0)
    of each target's last ``k`` row-to-row changes (needs ``k < L``)."""
    x = np.asarray(history, dtype=np.float64)
    if kind not in SCALE_KINDS or not 1 <= k < x.shape[1]:
        raise ValueError(f"scale: kind must be one of {SCALE_KINDS} and 1 <= k < window {x.shape[1]}, got {kind}:{k}")
    d = np.diff(x[:, -(k + 1) :], axis=1)  # (N, k, T)
    out: F64 = np.abs(d).mean(axis=1) if kind == "mad" else d.std(axis=1)
    return out


def scale_floor(vol: npt.ArrayLike) -> F64:
    """(N, T) volatilities of the calibration windows -> the per-target floor (T,) (> 0 for any non-flat target)."""
    v = np.asarray(vol, dtype=np.float64)
    out: F64 = np.maximum(FLOOR_FRACTION * np.median(v, axis=0), 1e-6)
    return out


def window_scale(history: npt.ArrayLike, kind: str, k: int, floor: npt.ArrayLike) -> F64:
    """history (N, L, T) -> the scale (N, 1, T) that multiplies the offsets: ``max(volatility, floor)``."""
    out: F64 = np.maximum(volatility(history, kind, k), np.asarray(floor))[:, None, :]
    return out


def halves(n: int, gap: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Indices of the first and the second half of ``n`` windows in time order, with ``gap`` windows (those whose
    targets overlap the other half's) left out between them; at most ``n // 4``, so each half keeps windows."""
    cut, gap = n // 2, min(gap, n // 4)
    return np.arange(0, max(cut - gap // 2, 1)), np.arange(min(cut + (gap - gap // 2), n - 1), n)


def half_split(
    history: F64,
    residuals: F64,
    levels: Sequence[float],
    choice: IntervalChoice,
    gap: int,
    scale: F64 | None = None,
) -> IntervalChoice:
    """Calibrate on one half of the windows (time order), score the other half, both ways (``halves``).
    -> ``choice`` with its ``miss`` and ``pinball``. The windows' scale is ``choice``'s volatility (floored on the
    calibrating half), or ``scale`` (N, 1, T) when given: one computed without these windows' residuals."""
    t = residuals.shape[2]
    first, second = halves(len(residuals), gap)
    misses, losses, directions = [], [], []
    for cal, ev in ((first, second), (second, first)):
        s_cal, s_ev = np.ones((len(cal), 1, t)), np.ones((len(ev), 1, t))
        if scale is not None:
            s_cal, s_ev = scale[cal], scale[ev]
        elif choice.kind != "none":
            floor = scale_floor(volatility(history[cal], choice.kind, choice.k))
            s_cal = window_scale(history[cal], choice.kind, choice.k, floor)
            s_ev = window_scale(history[ev], choice.kind, choice.k, floor)
        off = conformal_offsets(residuals[cal] / s_cal, levels, pooled=choice.pooled)  # (Q, H, T)
        q = off[:, None] * s_ev[None]  # (Q, M, H, T) quantiles of the residual: point + q
        below = [coverage(residuals[ev], qi) for qi in q]
        band = float(((residuals[ev] >= q[0]) & (residuals[ev] <= q[-1])).mean())
        directions.append((*below, band))
        misses.append(sum(abs(c - tau) for c, tau in zip(below, levels, strict=True)))
        losses.append(np.mean([pinball(residuals[ev], qi, tau) for tau, qi in zip(levels, q, strict=True)]))
    miss, loss = float(np.mean(misses)), float(np.mean(losses))
    return IntervalChoice(choice.kind, choice.k, choice.pooled, miss, loss, (directions[0], directions[1]))


PINBALL_TOLERANCE = 0.01  # a scaled band may lose at most 1% pinball loss against the constant band


def choose_interval(
    history: npt.ArrayLike,
    residuals: npt.ArrayLike,
    levels: Sequence[float],
    kinds: Sequence[str] = ("none", *SCALE_KINDS),
    ks: Sequence[int] | None = None,
    pooled: Sequence[bool] = (False, True),
    gap: int = 0,
) -> tuple[IntervalChoice, list[IntervalChoice]]:
    """Picks how to form intervals by the half-split check on the calibration windows: ``history`` (N, L, T) their
    targets' z-scored rows, ``residuals`` (N, H, T) y - point, in time order. Candidates: constant or a volatility
    kind x k (default ``SCALE_KS`` and window - 1), each per-step or pooled. Admissible: a candidate whose
    held-out pinball loss is within ``PINBALL_TOLERANCE`` of the best constant band's (a scale that only moves the
    band's width at random, worse as a forecast, is refused); the admissible one with the smallest coverage
    ``miss`` wins (ties: the earlier). Returns it and every candidate scored."""
    x, r = np.asarray(history, dtype=np.float64), np.asarray(residuals, dtype=np.float64)
    if len(r) < 4:
        raise ValueError(f"choose_interval: needs at least 4 calibration windows, got {len(r)}")
    ks = sorted({k for k in (ks or (*SCALE_KS, x.shape[1] - 1)) if 1 <= k < x.shape[1]})
    candidates = [
        IntervalChoice(kind, k if kind != "none" else 0, p)
        for kind in kinds
        for k in (ks if kind != "none" else [0])
        for p in pooled
    ]
    if not candidates:
        raise ValueError(f"choose_interval: no candidate; the scale's k must be below the window ({x.shape[1]})")
    scored = [half_split(x, r, levels, c, gap) for c in candidates]
    return pick(scored), scored


def pick(scored: Sequence[IntervalChoice]) -> IntervalChoice:
    """The interval rule: among candidates whose held-out pinball loss is within ``PINBALL_TOLERANCE`` of the best
    constant band's (every constant one is admissible), the smallest ``miss`` (ties: the earlier)."""
    constant = [c.pinball for c in scored if c.kind == "none"]
    limit = (1 + PINBALL_TOLERANCE) * min(constant) if constant else np.inf
    return min((c for c in scored if c.kind == "none" or c.pinball <= limit), key=lambda c: c.miss)
