"""``seqserve-train forecast``: any CSV -> segment-RNN forecaster -> conformal intervals -> ONNX + manifest.

The data options (``--preset``, ``--split``, ``--columns``, ``--targets``, ``--time-column``, ``--freq``) travel
in ``Job.extra``; the manifest records what they resolved to (columns, targets, frequency, time column, split), so
``seqserve-train evaluate`` re-reads the file exactly as training did (``series_for``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from service.core.manifest import ForecastSpec, Metric, Normalization
from training.calibrate import choose_half_life, conformal_offsets, weighted_offsets
from training.cards import TARGETS, card_for
from training.evaluate import evaluate_model
from training.export import write_model
from training.nets import build_net, count_parameters
from training.pipelines import Job, finish, training_info
from training.runners import ForecastRunner
from training.series import DEFAULT_SPLIT, PRESETS, Series, load_series
from training.train import fit

LEVELS = [0.1, 0.5, 0.9]


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


def calibrate(runner: ForecastRunner, mode: str) -> tuple[list[list[list[float]]], dict[str, Any]]:
    """Conformal offsets (Q, H, T) from the validation windows' residuals (z-scored), see training/calibrate.py:
    "per-step" (exchangeable), "pooled" over steps (small data), or "recent" (weighted towards the newest
    windows, the half-life picked by a rolling-origin check inside the validation split; inf = per-step)."""
    with torch.no_grad():
        pred = runner.predict(runner.vx).cpu().numpy()
    residuals = runner.vy.cpu().numpy() - pred  # (N, H, T), windows in time order
    info: dict[str, Any] = {"calibration": mode, "calibration_windows": len(residuals)}
    if mode == "recent":
        half_life = choose_half_life(residuals, LEVELS, gap=residuals.shape[1])
        offsets = weighted_offsets(residuals, LEVELS, half_life)
        info["calibration_half_life_windows"] = half_life if np.isfinite(half_life) else "inf"
    else:
        offsets = conformal_offsets(residuals, LEVELS, pooled=mode == "pooled")
    return offsets.tolist(), info


def train_forecast(job: Job) -> None:
    cfg, opts = job.net, options(job.extra)
    s = load_series(job.data, window=cfg.window, horizon=cfg.horizon, **opts)
    cfg.features = len(s.columns)
    cfg.targets = s.target_index if len(s.targets) < len(s.columns) else None
    net = build_net(cfg)
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
    offsets, calibration = calibrate(runner, job.extra.get("calibration") or "per-step")
    spec = ForecastSpec(
        window=cfg.window, horizon=cfg.horizon, features=cfg.features, state_mode="window",
        update_cost=f"{cfg.window // cfg.segment} {cfg.cell.upper()} steps (the window is re-encoded per update)",
        quantiles=LEVELS, quantile_offsets=offsets,
        targets=s.targets if cfg.targets is not None else [], frequency=s.frequency, time_column=s.time_column,
        split={k: [a, b] for k, (a, b) in s.split.items()},
    )  # fmt: skip
    norm = Normalization(columns=s.columns, mean=s.mean.tolist(), std=s.std.tolist())
    covariates = [c for c in s.columns if c not in s.targets]
    write_model(
        net, cfg, job.out, name=job.name, version=job.version,
        description=f"{s.path.name}: forecasts {', '.join(s.targets)} ({cfg.horizon} rows ahead, every "
        f"{s.frequency or 'row'}) from the last {cfg.window} rows"
        + (f" of {len(s.columns)} columns (covariates: {', '.join(covariates)})" if covariates else "")
        + "; channel-independent segment RNN, conformal p10/p50/p90 from the validation split.",
        normalization=norm, forecast=spec,
        training={**training_info(job, res), **calibration, **opts},
        notes=f"segment RNN: each channel's window cut into {cfg.window // cfg.segment} segments of {cfg.segment} "
        f"rows; per-window re-referencing '{cfg.revin}' inside the graph",
    )  # fmt: skip
    ev = evaluate_model(job.out, job.data)
    card = card_for(job.name, "forecast", job.version)
    finish(job, res, forecast_metrics(job, s, ev), ev, {"task": "forecast"}, card)


def forecast_metrics(job: Job, s: Series, ev: dict[str, float]) -> list[Metric]:
    """The manifest's metrics: test MSE first (the headline), then MAE, interval scores, MASE/MAPE when known.
    Coverage metrics carry their nominal level as target; the issue's goal is on the metric it names."""
    a, b = s.split["test"]
    goal = TARGETS.get(job.name)
    base = Metric(
        name="test_mse", value=ev["test_mse"], higher_is_better=False,
        dataset=f"{s.path.name} ({', '.join(s.targets)}; z-scored with train-split statistics)",
        split=f"test rows [{a}, {b}), every stride-1 window (history from the {job.net.window} rows before), "
        f"horizon {job.net.horizon}",
        command=f"seqserve-train evaluate --model {job.out} --data {job.data}",
    )  # fmt: skip
    out = []
    for key, value in ev.items():
        if not key.startswith("test_") or key == "test_windows":
            continue
        target = goal[1] if goal and goal[0] == key else None
        higher = key.startswith(("test_coverage", "test_mape_gain"))
        if key.startswith("test_coverage_q"):
            target = float(key.removeprefix("test_coverage_q"))
        elif key.startswith("test_coverage_band_p"):
            lo, hi = (int(v) for v in key.removeprefix("test_coverage_band_p").split("_p"))
            target = (hi - lo) / 100
        out.append(base.model_copy(update={"name": key, "value": value, "target": target, "higher_is_better": higher}))
    return out
