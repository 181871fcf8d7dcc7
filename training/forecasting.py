"""``seqserve-train forecast``: any CSV -> segment-RNN forecaster -> conformal intervals -> ONNX + manifest.

The data options (``--preset``, ``--split``, ``--columns``, ``--targets``, ``--time-column``, ``--freq``) travel
in ``Job.extra``; the manifest records what they resolved to (columns, targets, frequency, time column, split), so
``seqserve-train evaluate`` re-reads the file exactly as training did (``series_for``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from service.core.manifest import MANIFEST_FILE, ForecastSpec, Manifest, Metric, Normalization
from service.tables import IRREGULAR
from training.calibrate import (
    SCALE_KINDS,
    IntervalChoice,
    choose_half_life,
    choose_interval,
    conformal_offsets,
    scale_floor,
    volatility,
    weighted_offsets,
    window_scale,
)
from training.cards import TARGETS, card_for
from training.evaluate import evaluate_model
from training.export import write_model
from training.nets import build_net, count_parameters
from training.pipelines import Job, finish, training_info
from training.runners import ForecastRunner
from training.scale import add_scale_output
from training.series import DEFAULT_SPLIT, PRESETS, Series, load_series
from training.train import fit

LEVELS = [0.1, 0.5, 0.9]
F64 = npt.NDArray[np.float64]


def _names(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def options(extra: dict[str, Any]) -> dict[str, Any]:
    """The CLI's data options with the preset's values filled in where the user gave none."""
    preset = PRESETS[extra["preset"]] if extra.get("preset") else None
    return {
        "split": extra.get("split") or (preset.split if preset else DEFAULT_SPLIT),
        "time_column": extra.get("time_column") or (preset.time_column if preset else "auto"),
        "frequency": extra.get("freq") or (preset.frequency if preset else "auto"),
        "columns": _names(extra.get("columns")),
        "targets": _names(extra.get("targets")),
    }


def scale_candidates(text: str, window: int | None = None) -> tuple[tuple[str, ...], list[int] | None]:
    """``--interval-scale``: "auto" (constant or any volatility, chosen), "none", or KIND[:K] (e.g. "mad:24"); K
    counts row-to-row changes of the history, so 1 <= K < ``window`` (checked when the window is known)."""
    if text == "auto":
        return ("none", *SCALE_KINDS), None
    if text == "none":
        return ("none",), None
    kind, _, k = text.partition(":")
    if kind not in SCALE_KINDS or (k and not (k.isascii() and k.isdigit())):
        raise ValueError(f"--interval-scale: expected auto, none or KIND[:K] with KIND in {SCALE_KINDS}, got {text!r}")
    if k and not 1 <= int(k) < (window or int(k) + 1):
        below = f" and below --window {window} (a window of {window} rows has {window - 1} changes)" if window else ""
        raise ValueError(
            f"--interval-scale {text}: K counts the last K row-to-row changes: it must be at least 1{below}"
        )
    return (kind,), ([int(k)] if k else None)


@dataclass
class Intervals:
    """Calibrated intervals: offsets (Q, H, T) on the z-scored scale, the choice behind them, the scale's floor
    (T,) when there is a scale, and what to record in the manifest's training section."""

    offsets: F64
    choice: IntervalChoice
    floor: list[float] | None
    info: dict[str, Any]


def calibrate(history: F64, residuals: F64, mode: str = "auto", scale: str = "auto") -> Intervals:
    """Conformal offsets from the calibration (validation) windows: ``history`` (N, L, T) their targets' z-scored
    rows, ``residuals`` (N, H, T) = y - point, in time order. The per-window scale (``--interval-scale``) and
    per-step vs pooled offsets (``mode`` "auto") are chosen by ``choose_interval``'s half-split check on these
    windows; "recent" weights the newest windows (half-life by a rolling-origin check, inf = unweighted). See
    training/calibrate.py."""
    kinds, ks = scale_candidates(scale)
    pooled = {"auto": (False, True), "pooled": (True,)}.get(mode, (False,))
    if len(residuals) >= 4:
        choice, table = choose_interval(history, residuals, LEVELS, kinds, ks, pooled, gap=residuals.shape[1])
    else:  # too few windows to check anything: the first candidate (constant offsets under "auto")
        k = 0 if kinds[0] == "none" else (ks or [history.shape[1] - 1])[0]
        choice, table = IntervalChoice(kinds[0], k, pooled[0]), []
    floor = None if choice.kind == "none" else scale_floor(volatility(history, choice.kind, choice.k))
    z = residuals if floor is None else residuals / window_scale(history, choice.kind, choice.k, floor)
    info: dict[str, Any] = {
        "calibration": mode, "calibration_windows": len(residuals), "interval_scale": choice.label,
        "interval_choice": {"kind": choice.kind, "k": choice.k, "pooled": choice.pooled},
        "interval_check": {c.label: {"miss": round(c.miss, 4), "pinball": round(c.pinball, 5)} for c in table},
        "interval_check_halves": {c.label: [[round(v, 4) for v in h] for h in c.halves] for c in table if c.halves},
    }  # fmt: skip
    if mode == "recent":
        half_life = choose_half_life(z, LEVELS, gap=residuals.shape[1])
        offsets = weighted_offsets(z, LEVELS, half_life)
        info["calibration_half_life_windows"] = half_life if np.isfinite(half_life) else "inf"
    else:
        offsets = conformal_offsets(z, LEVELS, pooled=choice.pooled)
    if floor is not None:
        info["interval_scale_floor"] = floor.tolist()
    return Intervals(offsets, choice, None if floor is None else floor.tolist(), info)


def train_forecast(job: Job) -> None:
    cfg, opts = job.net, options(job.extra)
    s = load_series(job.data, window=cfg.window, horizon=cfg.horizon, **opts)
    cfg.features = len(s.columns)
    cfg.targets = s.target_index if len(s.targets) < len(s.columns) else None
    net = build_net(cfg, job.train.seed)
    runner = ForecastRunner(
        net, s.part("train", cfg.window), s.part("val", cfg.window), cfg.window, cfg.horizon, job.train.device,
        targets=cfg.targets,
    )  # fmt: skip
    print(
        f"forecast: {s.path.name} {len(s.z)} rows x {len(s.columns)} columns ({len(s.targets)} forecast), "
        f"frequency {s.frequency}, split {s.split}; {len(runner.x)} train / {len(runner.vx)} val windows, "
        f"{count_parameters(net)} params"
    )
    res = fit(runner, job.train)
    net.cpu()
    runner.to("cpu")
    with torch.no_grad():
        residuals = (runner.vy - runner.predict(runner.vx)).numpy().astype(np.float64)  # (N, H, T), time order
    history = runner.vx.numpy()[:, :, s.target_index].astype(np.float64)  # (N, L, T)
    iv = calibrate(
        history, residuals, job.extra.get("calibration") or "auto", job.extra.get("interval_scale") or "auto"
    )
    spec = ForecastSpec(
        window=cfg.window, horizon=cfg.horizon, features=cfg.features, state_mode="window",
        update_cost=f"{cfg.window // cfg.segment} {cfg.cell.upper()} steps (the window is re-encoded per update)",
        quantiles=LEVELS, quantile_offsets=iv.offsets.tolist(),
        targets=s.targets if cfg.targets is not None else [], frequency=s.frequency, time_column=s.time_column,
        split={k: [a, b] for k, (a, b) in s.split.items()},
    )  # fmt: skip
    norm = Normalization(columns=s.columns, mean=s.mean.tolist(), std=s.std.tolist())
    covariates = [c for c in s.columns if c not in s.targets]
    write_model(
        net, cfg, job.out, name=job.name, version=job.version,
        description=f"{s.path.name}: forecasts {', '.join(s.targets)} ({cfg.horizon} rows ahead, "
        + ("at irregular steps" if s.frequency == IRREGULAR else f"every {s.frequency or 'row'}")
        + f") from the last {cfg.window} rows"
        + (f" of {len(s.columns)} columns (covariates: {', '.join(covariates)})" if covariates else "")
        + "; channel-independent segment RNN, conformal p10/p50/p90 from the validation split.",
        normalization=norm, forecast=spec,
        training={**training_info(job, res), **iv.info, **opts},
        notes=f"segment RNN: each channel's window cut into {cfg.window // cfg.segment} segments of {cfg.segment} "
        f"rows; per-window re-referencing '{cfg.revin}' inside the graph",
    )  # fmt: skip
    if iv.floor is not None:
        add_scale_output(job.out, iv.choice.kind, iv.choice.k, iv.floor)
    ev = evaluate_model(job.out, job.data)
    card = card_for(job.name, "forecast", job.version, job.data)
    metrics = forecast_metrics(job.name, job.out, job.data, s, ev)
    finish(job, res, metrics, ev, {"task": "forecast", "intervals": iv.info}, card)


def forecast_metrics(name: str, out: Path, data: Path, s: Series, ev: dict[str, float]) -> list[Metric]:
    """The manifest's metrics: test MSE first (the headline), then MAE, interval scores, MASE/MAPE when known.
    Coverage metrics carry their nominal level as target; the issue's goal is on the metric it names."""
    a, b = s.split["test"]
    goal = TARGETS.get(name)
    m = Manifest.load(out / MANIFEST_FILE)
    assert m.forecast is not None
    base = Metric(
        name="test_mse", value=ev["test_mse"], higher_is_better=False,
        dataset=f"{s.path.name} ({', '.join(s.targets)}; z-scored with train-split statistics)",
        split=f"test rows [{a}, {b}), every stride-1 window (history from the {m.forecast.window} rows before), "
        f"horizon {m.forecast.horizon}",
        command=f"seqserve-train evaluate --model {out} --data {data}",
    )  # fmt: skip
    metrics = []
    for key, value in ev.items():
        if not key.startswith("test_") or key == "test_windows" or not np.isfinite(value):
            continue  # (a manifest holds finite numbers only: a metric that is undefined here is left out)
        target = goal[1] if goal and goal[0] == key else None
        higher = key.startswith(("test_coverage", "test_mape_gain"))
        if key.startswith("test_coverage_q"):
            target = float(key.removeprefix("test_coverage_q"))
        elif key.startswith("test_coverage_band_p"):
            lo, hi = (int(v) for v in key.removeprefix("test_coverage_band_p").split("_p"))
            target = (hi - lo) / 100
        metrics.append(
            base.model_copy(update={"name": key, "value": value, "target": target, "higher_is_better": higher})
        )
    return metrics
