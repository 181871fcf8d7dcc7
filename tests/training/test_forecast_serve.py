"""A user's own CSV end to end: seqserve-train forecast -> ONNX + manifest -> the real gRPC server -> the client
and ``seqserve forecast --plot``. Targets = every column (serving's covariate path is tested on the serving side)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.cli import main as seqserve
from service.client import Client
from service.core.arrays import zero_states
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from service.tables import read_table
from tests.conftest import ServerHandle
from tests.training.fast import FAST, TINY_FORECAST
from training.cli import main as train


@pytest.mark.slow
def test_train_export_serve_all_targets_generated_csv(
    tmp_path: Path, tiny_csv: Path, start_server: Callable[..., ServerHandle], capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    out = models / "sales-forecaster" / "1"
    args = ["forecast", "--data", str(tiny_csv), "--out", str(out), "--run-dir", str(tmp_path / "run"), *FAST]
    args += [*TINY_FORECAST, "--epochs", "2", "--lr", "0.01"]
    args += ["--interval-scale", "std:8"]  # offsets x each window's volatility: a "scale" graph output
    assert train(args) == 0
    m = Manifest.load(out / MANIFEST_FILE)
    assert m.forecast is not None and m.normalization is not None and m.card is not None
    assert m.forecast.targets == [] and m.forecast.target_count == 3  # every column is forecast
    assert m.forecast.scale_output == "scale" and m.training["interval_scale"].startswith("std of the last 8 changes")
    assert (m.forecast.frequency, m.forecast.time_column) == ("1h", "time")

    history = read_table(tiny_csv).values[-30:].astype(np.float32)  # original units, 30 >= window rows
    mean, std = np.asarray(m.normalization.mean, np.float32), np.asarray(m.normalization.std, np.float32)
    sess = ort.InferenceSession(str(out / MODEL_FILE), providers=["CPUExecutionProvider"])
    z = ((history[-24:] - mean) / std)[None]
    feeds = {"history": z, **zero_states(m.states, {"batch": 1, "features": 3})}
    want_z, scale_z = (o[0] for o in sess.run(["forecast", "scale"], feeds))  # (12, 3), (1, 3)

    handle = start_server(models=models)
    with Client(handle.target, timeout=60.0) as client:
        got = client.forecast(history, model="sales-forecaster")
    assert got.columns == ["load", "temp", "price"] and got.point.shape == (12, 3)
    np.testing.assert_allclose(got.point, want_z * std + mean, rtol=1e-4, atol=1e-4)
    offsets = np.asarray(m.forecast.quantile_offsets, np.float32)  # (3, 12, 3), z-scored, from validation
    want_q = (want_z[None] + offsets * scale_z[None]) * std + mean
    np.testing.assert_allclose(got.quantiles, want_q, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got.quantiles, (want_z[None] + offsets) * std + mean, atol=1e-3)  # the scale counts
    assert (got.quantiles[0] <= got.quantiles[2]).all() and got.quantile_levels == [0.1, 0.5, 0.9]

    capsys.readouterr()  # training's progress lines
    png = tmp_path / "band.png"
    argv = ["forecast", "--target", handle.target, "--model", "sales-forecaster", "--csv", str(tiny_csv)]
    assert seqserve([*argv, "--rows", "48", "--plot", str(png)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split("\t") == ["time", "load", "temp", "price"] and len(printed) == 1 + 12
    times = read_table(tiny_csv).times  # each printed row's time: the file's next hours
    assert times is not None
    last = times[-1]
    assert [row.split("\t")[0] for row in printed[1:]] == [str(last + dt.timedelta(hours=k)) for k in range(1, 13)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
