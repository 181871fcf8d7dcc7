"""Online adaptive conformal intervals (ACI; Gibbs & Candes 2021), checked inside the validation split.

No released model moves its levels (docs/models.md, "Online adaptive intervals"): the check refuses it. The width
variant below passes it (2026-12-05) and is served (``service/core/intervals.py``, ``forecaster/4`` and
``forecaster-ettm1/3``); ``release`` is ``seqserve-train adapt``.

A served forecaster's band is fixed at calibration. When the error level drifts (ETTh1's test months are calmer
than its validation months), a fixed band is right for no period. ACI instead moves each quantile's *level* as
targets arrive: after each new row, every earlier forecast whose target that row is gets scored, and level
``a_tau`` (per quantile and target column) becomes ``a_tau + gamma * (tau - share of those targets at or below
their quantile)``; the quantile used next is the calibration windows' conformal quantile at level ``a_tau``
(interpolated on a grid of levels, per horizon step or pooled, times the window's scale as serving does). Over
any sequence the long-run coverage then tends to ``tau``; the price is a band whose width follows recent misses.

``online_width`` is the gentler variant (declared 2026-12-05 before it was computed): the levels stay nominal and one
width multiplier per target column moves, so the band keeps its calibrated shape and widens or narrows as a whole.

``check`` runs either as ``training.calibrate.choose_interval`` checks a calibration: calibrate on the first half of
the validation windows, run online through the second half starting at the nominal levels, and vice versa, for
each rate ``gamma`` (0 = today's fixed band), scoring coverage ``miss`` and mean pinball loss. The same rule
applies: a rate whose pinball loss is more than ``PINBALL_TOLERANCE`` above the fixed band's is refused.

    python -m training.adaptive --model models/forecaster/3 --data ../shared/data/etth1/ETTh1.csv
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.core.intervals import WidthRule
from training.calibrate import PINBALL_TOLERANCE, conformal_offsets, halves, pinball

F64 = npt.NDArray[np.float64]
GRID = np.round(np.arange(0.01, 0.99 + 1e-9, 0.01), 4)  # levels the offsets are tabulated at
GAMMAS = (0.0, 0.002, 0.005, 0.01, 0.02)


@dataclass(frozen=True)
class Online:
    """One online run: share of targets at or below each quantile, p_lo-p_hi band coverage, mean pinball loss."""

    below: tuple[float, ...]
    band: float
    pinball: float

    def miss(self, levels: Sequence[float]) -> float:
        return float(sum(abs(b - tau) for b, tau in zip(self.below, levels, strict=True)))


def offsets_at(table: F64, alpha: F64) -> F64:
    """``table`` (G, H, T) offsets at the ``GRID`` levels, ``alpha`` (T,) levels -> offsets (H, T), linear in the
    level between grid points and clamped to the grid's ends."""
    pos = np.interp(np.clip(alpha, GRID[0], GRID[-1]), GRID, np.arange(len(GRID)))  # (T,)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(GRID) - 1)
    w = pos - lo
    cols = np.arange(table.shape[2])
    out: F64 = table[lo, :, cols].T * (1 - w) + table[hi, :, cols].T * w  # (H, T)
    return out


def online(
    z_cal: F64, residuals: F64, scale: F64, levels: Sequence[float], gamma: float, pooled: bool = False
) -> Online:
    """Calibrate on ``z_cal`` (M, H, T) residual / scale, then run through ``residuals`` (N, H, T) y - point of
    consecutive stride-1 windows, ``scale`` (N, 1 or H, T) their scales, in time order, moving the levels with
    rate ``gamma`` as each window's targets are revealed row by row."""
    table = conformal_offsets(z_cal, list(GRID), pooled=pooled)  # (G, H, T)
    n, h, t = residuals.shape
    tau = np.asarray(levels, dtype=np.float64)[:, None]  # (Q, 1)
    alpha = np.repeat(tau, t, axis=1)  # (Q, T): start at the nominal levels
    quant = np.empty((len(levels), n, h, t))
    below = np.empty((len(levels), n, h, t), dtype=bool)
    for i in range(n):
        quant[:, i] = np.stack([offsets_at(table, a) for a in alpha]) * scale[i][None]
        below[:, i] = residuals[i][None] <= quant[:, i]
        if gamma > 0:
            alpha = alpha + gamma * (tau - below[(slice(None), *revealed(i, h))].mean(axis=1))
    return scored(residuals, quant, levels)


def revealed(i: int, horizon: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """(windows, steps) of the targets row ``i`` reveals: window j's step i - j, for every window j in
    [i - horizon + 1, i] (consecutive stride-1 windows)."""
    js = np.arange(max(0, i - horizon + 1), i + 1)
    return js, i - js


def scored(residuals: F64, quant: F64, levels: Sequence[float]) -> Online:
    """``residuals`` (N, H, T) against the quantiles ``quant`` (Q, N, H, T) an online run used."""
    band = float(((residuals >= quant[0]) & (residuals <= quant[-1])).mean())
    loss = float(np.mean([pinball(residuals, q, lv) for lv, q in zip(levels, quant, strict=True)]))
    return Online(tuple(float((residuals <= q).mean()) for q in quant), band, loss)


def online_width(
    z_cal: F64, residuals: F64, scale: F64, levels: Sequence[float], gamma: float, pooled: bool = False
) -> Online:
    """As ``online``, but the levels stay nominal and one width multiplier ``m`` per target column moves instead:
    quantile q is the median's offset + ``m`` * (q's offset - the median's), times the window's scale, and after
    each row ``m`` *= exp(-gamma * (share of the revealed targets inside the outer band - its nominal share)). The
    band keeps the shape calibration gave it and only widens or narrows as a whole, slowly, with the error level
    (``levels`` must be odd in number, the median in the middle)."""
    rule = WidthRule(conformal_offsets(z_cal, levels, pooled=pooled), list(levels), gamma)  # what sessions run
    n, h, t = residuals.shape
    m = rule.ones()
    zero = np.zeros((1, h, t), np.float32)
    quant = np.empty((len(levels), n, h, t))
    inside = np.empty((n, h, t), dtype=bool)
    for i in range(n):
        quant[:, i] = rule.quantiles_many(zero, scale[i][None].astype(np.float32), m[None])[:, 0]
        inside[i] = (residuals[i] >= quant[0, i]) & (residuals[i] <= quant[-1, i])
        if gamma > 0:
            m = rule.updated(m, inside[revealed(i, h)].mean(axis=0, dtype=np.float32))
    return scored(residuals, quant, levels)


def check(
    residuals: npt.ArrayLike,
    scale: npt.ArrayLike | None,
    levels: Sequence[float],
    gammas: Sequence[float] = GAMMAS,
    pooled: bool = False,
    width: bool = False,
) -> dict[float, tuple[Online, Online]]:
    """Per rate: (first half calibrates, second runs online; second calibrates, first runs online) on the
    validation windows ``residuals`` (N, H, T) in time order, with their ``scale`` (N, 1 or H, T) or None; the
    ``H`` windows whose targets straddle the cut are left out between the halves. ``width``: the rate moves the
    band's width (``online_width``) instead of the levels."""
    r = np.asarray(residuals, dtype=np.float64)
    if r.ndim != 3 or len(r) < 4 * r.shape[1]:
        raise ValueError(
            f"check: {len(r)} validation windows; a half-split online check needs at least 4 x horizon "
            f"({4 * r.shape[1] if r.ndim == 3 else '?'}) windows in time order, as (windows, horizon, targets)"
        )
    s = np.ones((len(r), 1, r.shape[2])) if scale is None else np.asarray(scale, dtype=np.float64)
    z = r / s
    first, second = halves(len(r), gap=r.shape[1])
    run = online_width if width else online
    return {
        g: (
            run(z[first], r[second], s[second], levels, g, pooled),
            run(z[second], r[first], s[first], levels, g, pooled),
        )
        for g in gammas
    }


def admissible(scores: dict[float, tuple[Online, Online]], levels: Sequence[float]) -> float:
    """The rate ``choose_interval``'s rule picks: among rates whose mean pinball loss over both directions is within
    ``PINBALL_TOLERANCE`` of the fixed band's (rate 0), the smallest mean ``miss`` (ties: the smaller rate)."""
    base = np.mean([o.pinball for o in scores[0.0]])
    ok = [g for g, pair in scores.items() if np.mean([o.pinball for o in pair]) <= (1 + PINBALL_TOLERANCE) * base]
    return min(ok, key=lambda g: (np.mean([o.miss(levels) for o in scores[g]]), g))


def print_scores(scores: dict[float, tuple[Online, Online]], levels: Sequence[float]) -> None:
    """One row per rate (both directions and the miss), then the rate the interval rule picks."""
    print(f"  {'gamma':>6}  {'below p10/p50/p90, band, pinball':>44} | {'the other direction':>44}  miss")
    for g, pair in scores.items():
        cells = [
            f"{' / '.join(f'{100 * b:4.1f}' for b in o.below)}  band {100 * o.band:4.1f}  {o.pinball:.4f}" for o in pair
        ]
        print(f"  {g:>6}  {cells[0]:>44} | {cells[1]:>44}  {np.mean([o.miss(levels) for o in pair]):.3f}")
    print(f"  the interval rule (pinball within {PINBALL_TOLERANCE:.0%} of the fixed band) picks gamma = "
          f"{admissible(scores, levels)}")  # fmt: skip


def release(src: Path, data: Path, out: Path, command: str, gamma: float | None = None) -> dict[str, Any]:
    """``seqserve-train adapt``: ``src`` (a forecaster with intervals) -> ``out``, the same graph (``model.onnx`` a
    relative symbolic link to ``src``'s: byte for byte the same weights, no second copy) and offsets with
    ``forecast.adaptive_width_gamma`` = ``gamma``, or by default the rate the half-split check on the validation
    windows picks (``admissible``). Released only if on the test split, replayed as a session sees it
    (``training.evaluate.adaptive_scores``), its coverage miss is smaller than ``src``'s and its mean pinball loss
    within ``PINBALL_TOLERANCE`` of ``src``'s; else DataError with both, and nothing is written."""
    from service.core.manifest import MANIFEST_FILE, MODEL_FILE
    from training.cards import card_for
    from training.data import DataError
    from training.evaluate import eval_forecast, forecast_and_scale, open_model
    from training.forecasting import forecast_metrics
    from training.pipelines import derived_manifest, derived_source, new_model_folder, write_derived_report
    from training.series import series_for, windows

    m = derived_source(src, out)
    f = m.forecast
    if m.task != "forecast" or f is None or not f.quantile_offsets:
        raise DataError(f"{src}: adapt needs a forecaster with intervals (forecast.quantile_offsets)")
    if f.adaptive_width_gamma is not None:
        raise DataError(f"{src}: already has an adaptive width (gamma {f.adaptive_width_gamma}); adapt its parent")
    if gamma is not None and not 0 < gamma <= 1:
        raise DataError(f"--gamma {gamma}: the width's rate must be in (0, 1]")
    _, sess = open_model(src)  # the graph both versions run: one session evaluates both
    s = series_for(m, data)
    study: dict[str, Any] = {}
    if gamma is None:
        x, y = windows(s.part("val", f.window), f.window, f.horizon, s.target_index)
        point, scale = forecast_and_scale(m, sess, x)
        pooled = bool(m.training.get("interval_choice", {}).get("pooled", False))
        try:
            scores = check(y - point, scale, f.quantiles, pooled=pooled, width=True)
        except ValueError as e:
            raise DataError(f"{src}: {e}; pass --gamma to choose a rate without the check") from None
        gamma = admissible(scores, f.quantiles)
        study = {
            str(g): {"miss": float(np.mean([o.miss(f.quantiles) for o in pair])),
                     "pinball": float(np.mean([o.pinball for o in pair])),
                     "band": [o.band for o in pair]}
            for g, pair in scores.items()
        }  # fmt: skip
        if gamma == 0:
            raise DataError(f"{src}: the half-split check on the validation windows keeps the fixed band (gamma 0)")
    parent = eval_forecast(m, sess, data)  # what `seqserve-train evaluate` prints for src
    with new_model_folder(out) as (name, version):
        (out / MODEL_FILE).symlink_to(os.path.relpath((src / MODEL_FILE).resolve(), out.resolve()))
        info = {"gamma": gamma, "parent": f"{m.name}/{m.version}", "validation_check": study}
        description = m.description.rstrip(".") + f"; an adaptive band width (gamma {gamma:g}) on {m.name}/{m.version}."
        forecast = f.model_copy(update={"adaptive_width_gamma": gamma})
        training = {"point_model": m.training.get("point_model", f"{m.name}/{m.version}"), "adaptive_width": info}
        new = derived_manifest(m, out, (name, version), command, description, training, metrics=[], forecast=forecast)
        new.dump(out / MANIFEST_FILE)
        ev = eval_forecast(new, sess, data)  # ... and for out (the same graph)
        verdict = _verdict(parent, ev, f.quantiles)
        if not verdict["released"]:
            raise DataError(f"{name}/{version} not released: {verdict['why']}")
        card = card_for(name, "forecast", version, data)
        new.model_copy(update={"metrics": forecast_metrics(name, out, data, s, ev), "card": card}).dump(
            out / MANIFEST_FILE
        )
        fields = {
            "model": f"{name}/{version}", "command": command,
            "evaluate_command": f"seqserve-train evaluate --model {out} --data {data}",
            "onnx_metrics": ev, "parent_metrics": parent, "point_model": str(src), "adaptive_width": info,
            "release": verdict,
        }  # fmt: skip
        write_derived_report(src, out, fields, "parent_command")
    return {"model": f"{name}/{version}", "gamma": gamma, "release": verdict, "evaluation": ev, "parent": parent}


def _verdict(parent: dict[str, float], ev: dict[str, float], levels: Sequence[float]) -> dict[str, Any]:
    """The release rule: a smaller test coverage miss than the parent's, mean pinball loss within tolerance."""

    def miss(e: dict[str, float]) -> float:
        return float(sum(abs(e[f"test_coverage_q{tau:g}"] - tau) for tau in levels))

    def loss(e: dict[str, float]) -> float:
        return float(np.mean([e[f"test_pinball_q{tau:g}"] for tau in levels]))

    out: dict[str, Any] = {
        "miss": miss(ev),
        "parent_miss": miss(parent),
        "pinball": loss(ev),
        "parent_pinball": loss(parent),
    }
    closer, sharp = out["miss"] < out["parent_miss"], out["pinball"] <= (1 + PINBALL_TOLERANCE) * out["parent_pinball"]
    out["released"] = closer and sharp
    out["why"] = (
        f"test miss {out['miss']:.4f} vs the parent's {out['parent_miss']:.4f} "
        f"({'smaller' if closer else 'not smaller'}), "
        f"mean pinball {out['pinball']:.4f} vs {out['parent_pinball']:.4f} "
        f"({'within' if sharp else 'more than'} {PINBALL_TOLERANCE:.0%} above)"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    from training.evaluate import forecast_and_scale, forecaster_study
    from training.forecasting import LEVELS
    from training.series import windows

    m, sess, s = forecaster_study(__doc__, argv)
    f = m.forecast
    if f is None or not f.quantile_offsets:
        raise SystemExit(f"{m.name}/{m.version}: not a forecaster with intervals")
    x, y = windows(s.part("val", f.window), f.window, f.horizon, s.target_index)
    point, scale = forecast_and_scale(m, sess, x)
    pooled = bool(m.training.get("interval_choice", {}).get("pooled", False))
    for width in (False, True):
        try:
            scores = check(y - point, scale, LEVELS, pooled=pooled, width=width)
        except ValueError as e:
            raise SystemExit(f"{m.name}/{m.version}: {e}") from None
        what = "an adaptive band width" if width else "online adaptive levels"
        print(f"{m.name}/{m.version}: {what} on its {len(x)} validation windows, half against half")
        print(f"  ({'pooled' if pooled else 'per-step'} offsets; first -> second half | second -> first half)")
        print_scores(scores, LEVELS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
