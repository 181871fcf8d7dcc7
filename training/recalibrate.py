"""``seqserve-train calibrate``: new intervals for an already trained forecaster, without retraining it.

Reads ``models/NAME/N`` (ONNX + manifest), runs it with onnxruntime on its own validation windows, calibrates
the intervals (``training.forecasting.calibrate``: per-window scale and per-step vs pooled chosen inside the
validation split), and writes ``models/NAME/M``: the same graph (the point forecast is bit for bit the same)
plus the ``scale`` output when one was chosen, the new offsets, the test metrics and the model card. Seconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from training.cards import card_for
from training.data import DataError
from training.evaluate import evaluate_model, forecast_windows, open_model
from training.forecasting import Intervals, calibrate, forecast_metrics
from training.pipelines import derived_manifest, derived_source, new_model_folder, write_derived_report
from training.scale import add_scale_output, remove_scale_output
from training.series import Series, series_for, windows


def recalibrate(src: Path, data: Path, out: Path, command: str, mode: str = "auto", scale: str = "auto") -> None:
    """``src`` (models/NAME/N) -> ``out`` (models/NAME/M) with intervals calibrated on ``src``'s validation split."""
    derived_source(src, out)
    m, sess = open_model(src)
    f = m.forecast
    if f is None or m.task != "forecast":
        raise DataError(f"{src}: calibrate needs a forecast model, this one is {m.task!r}")
    s = series_for(m, data)
    x, y = windows(s.part("val", f.window), f.window, f.horizon, s.target_index)
    residuals = (y - forecast_windows(m, sess, x)).astype(np.float64)  # (N, H, T), windows in time order
    iv = calibrate(x[:, :, s.target_index].astype(np.float64), residuals, mode, scale)
    with new_model_folder(out) as (name, version):
        _write(src, m, s, iv, data, out, name, version, command)


def _write(
    src: Path, m: Manifest, s: Series, iv: Intervals, data: Path, out: Path, name: str, version: int, command: str
) -> None:
    f = m.forecast
    assert f is not None
    shutil.copyfile(src / MODEL_FILE, out / MODEL_FILE)
    if f.scale_output is not None:  # recalibrated from the point forecast: the old scale goes, a new one may come
        shutil.copyfile(src / MANIFEST_FILE, out / MANIFEST_FILE)
        m = remove_scale_output(out)
        f = m.forecast
        assert f is not None
    extra = "" if iv.floor is None else f", offsets x each window's scale ({iv.choice.label})"
    description = m.description.rstrip(".") + f"{extra}; intervals recalibrated from {m.name}/{m.version}."
    training = {"point_model": f"{m.name}/{m.version}", "point_model_command": m.training.get("command"), **iv.info}
    forecast = f.model_copy(update={"quantile_offsets": iv.offsets.tolist()})
    new = derived_manifest(m, out, (name, version), command, description, training, metrics=[], forecast=forecast)
    new.dump(out / MANIFEST_FILE)
    if iv.floor is not None:
        add_scale_output(out, iv.choice.kind, iv.choice.k, iv.floor)
    ev = evaluate_model(out, data)
    final = Manifest.load(out / MANIFEST_FILE)
    card = card_for(name, "forecast", version, data)
    final.model_copy(update={"metrics": forecast_metrics(name, out, data, s, ev), "card": card}).dump(
        out / MANIFEST_FILE
    )
    _report(src, out, f"{name}/{version}", data, command, ev, iv.info)
    band = ev.get("test_coverage_band_p10_p90", float("nan"))
    print(f"{name}/{version}: {iv.choice.label}; test_mse={ev['test_mse']:.4f}, p10-p90 band {band:.3f} -> {out}")


def _report(
    src: Path, out: Path, model: str, data: Path, command: str, ev: dict[str, float], info: dict[str, Any]
) -> None:
    """metrics.json: the point model's training report (its curve copied beside it) plus the new intervals."""
    fields = {
        "model": model,
        "command": command,
        "evaluate_command": f"seqserve-train evaluate --model {out} --data {data}",
        "onnx_metrics": ev,
        "point_model": str(src),
        "intervals": info,
    }
    write_derived_report(src, out, fields, "point_model_command")
