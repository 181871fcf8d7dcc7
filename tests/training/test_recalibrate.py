"""``seqserve-train calibrate``: a trained forecaster's intervals recalibrated into a new version, the point
forecast bit for bit the same, the old version untouched, every number reproduced by ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.core.arrays import zero_states
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, sha256_file
from tests.training.fast import FAST, TINY_FORECAST, train_tiny_forecaster
from training.cli import main


def outputs(model: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    m = Manifest.load(model / MANIFEST_FILE)
    sess = ort.InferenceSession(str(model / MODEL_FILE), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    feeds = {"history": x, **zero_states(m.states, {"batch": len(x), "features": 3})}
    return dict(zip(names, sess.run(names, feeds), strict=True))


def evaluate(capsys: pytest.CaptureFixture[str], model: Path, data: Path) -> dict[str, float]:
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--data", str(data)]) == 0
    result: dict[str, float] = json.loads(capsys.readouterr().out)
    return result


@pytest.mark.slow
def test_calibrate_a_trained_forecaster_into_a_new_version(
    tmp_path: Path, tiny_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    v1, v2 = tmp_path / "models" / "sales" / "1", tmp_path / "models" / "sales" / "2"
    args = ["forecast", "--data", str(tiny_csv), "--out", str(v1), "--run-dir", str(tmp_path / "run"), *FAST]
    args += [*TINY_FORECAST, "--epochs", "2"]
    assert main([*args, "--interval-scale", "none"]) == 0  # constant offsets, no scale output
    first = Manifest.load(v1 / MANIFEST_FILE)
    assert first.forecast is not None and first.forecast.scale_output is None
    files = {p.name: p.read_bytes() for p in v1.iterdir()}

    calibrate = ["calibrate", "--model", str(v1), "--data", str(tiny_csv), "--out", str(v2)]
    assert main([*calibrate, "--interval-scale", "std:8", "--calibration", "pooled"]) == 0
    assert {p.name: p.read_bytes() for p in v1.iterdir()} == files  # the trained version is left as it was
    m = Manifest.load(v2 / MANIFEST_FILE)
    assert m.forecast is not None and (m.name, m.version, m.forecast.scale_output) == ("sales", 2, "scale")
    assert m.sha256 == sha256_file(v2 / MODEL_FILE) and m.card is not None
    assert m.training["point_model"] == "sales/1" and m.training["command"].startswith("seqserve-train calibrate")
    assert m.training["interval_scale"] == "std of the last 8 changes, pooled"
    assert m.forecast.quantile_offsets != first.forecast.quantile_offsets
    report = json.loads((v2 / "metrics.json").read_text())
    assert report["point_model"] == str(v1) and report["evaluate_command"].endswith(f"--data {tiny_csv}")
    trained = json.loads((v1 / "metrics.json").read_text())
    assert report["point_model_command"] == trained["command"] and report["command"] == m.training["command"]
    assert (v2 / "training_curve.png").read_bytes() == files["training_curve.png"]

    x = np.random.default_rng(0).standard_normal((5, 24, 3)).astype(np.float32)
    old, new = outputs(v1, x), outputs(v2, x)
    np.testing.assert_array_equal(new["forecast"], old["forecast"])  # the point forecast is the trained one
    assert new["scale"].shape == (5, 1, 3) and (new["scale"] > 0).all()
    ev1, ev2 = evaluate(capsys, v1, tiny_csv), evaluate(capsys, v2, tiny_csv)
    assert ev2["test_mse"] == ev1["test_mse"]
    metrics = {x.name: x.value for x in m.metrics}
    for key in ("test_mse", "test_coverage_band_p10_p90", "test_pinball_q0.9"):
        assert ev2[key] == pytest.approx(metrics[key], rel=1e-9)
    assert ev2["test_coverage_band_p10_p90"] != ev1["test_coverage_band_p10_p90"]


@pytest.mark.slow
def test_calibrate_refusals_exit_2_with_one_line(
    tmp_path: Path, tiny_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    v1, v2 = tmp_path / "m" / "fc" / "1", tmp_path / "m" / "fc" / "2"
    train_tiny_forecaster(tiny_csv, v1, tmp_path / "run")
    calibrate = ["calibrate", "--model", str(v1), "--data", str(tiny_csv)]
    busy = v1.parent / "7"  # an existing version is never overwritten
    busy.mkdir()
    (busy / "manifest.json").write_text("{}")
    cases = [
        (["--out", str(v1)], "--out must differ from --model (a committed model is never rewritten)"),
        (["--out", str(busy)], f"{busy}: already exists and is not empty"),
        (["--out", str(v2), "--interval-scale", "range:4"], "--interval-scale: expected auto, none or KIND[:K]"),
        (["--out", str(v2), "--interval-scale", "mad:24"], "the scale's k must be below the window (24)"),
    ]
    capsys.readouterr()
    for extra, message in cases:
        assert main([*calibrate, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("seqserve-train: error: ") and message in err
    assert [p.name for p in busy.iterdir()] == ["manifest.json"] and (busy / "manifest.json").read_text() == "{}"
    assert main([*calibrate, "--out", str(v2), "--interval-scale", "mad:6"]) == 0
    # A scaled model (the default of `forecast`) recalibrates from its point forecast: the old scale output goes
    # (it was refused: "calibrate its point model instead", which a default run never wrote), a new one may come.
    v3, v4 = v2.parent / "3", v2.parent / "4"
    assert (
        main(["calibrate", "--model", str(v2), "--data", str(tiny_csv), "--out", str(v3), "--interval-scale", "none"])
        == 0
    )
    assert (
        main(["calibrate", "--model", str(v2), "--data", str(tiny_csv), "--out", str(v4), "--interval-scale", "std:4"])
        == 0
    )
    x = np.random.default_rng(0).standard_normal((5, 24, 3)).astype(np.float32)
    two, three, four = outputs(v2, x), outputs(v3, x), outputs(v4, x)
    assert "scale" in two and set(three) == set(two) - {"scale"} and set(four) == set(two)
    np.testing.assert_array_equal(three["forecast"], two["forecast"])
    np.testing.assert_array_equal(four["forecast"], two["forecast"])
    m3, m4 = Manifest.load(v3 / MANIFEST_FILE), Manifest.load(v4 / MANIFEST_FILE)
    assert m3.forecast is not None and m3.forecast.scale_output is None and "scale" not in {o.name for o in m3.outputs}
    assert m3.sha256 == sha256_file(v3 / MODEL_FILE) and (m3.name, m3.version) == ("fc", 3)
    assert m4.forecast is not None and m4.forecast.scale_output == "scale" and len(m4.outputs) == len(m3.outputs) + 1
    assert m4.training["interval_scale"].startswith("std of the last 4 changes")


@pytest.mark.slow
def test_a_covariate_forecasters_scale_is_measured_on_its_target(tmp_path: Path, tiny_csv: Path) -> None:
    """--targets temp: the interval scale (and its floor, recorded in the manifest) is the volatility of the temp
    column of each validation window, not of the first column (load), both when training and when
    recalibrating."""
    raw = np.loadtxt(tiny_csv, delimiter=",", skiprows=1, usecols=(1, 2, 3))  # load, temp, price
    z = ((raw - raw[:336].mean(0)) / raw[:336].std(0)).astype(np.float32)
    history = np.stack([z[312 + i : 336 + i, 1] for i in range(48 - 12 + 1)]).astype(np.float64)  # val windows
    vol = np.diff(history[:, -9:], axis=1).std(axis=1)  # std of the last 8 changes
    want = max(0.1 * float(np.median(vol)), 1e-6)

    v1, v2 = tmp_path / "m" / "temp" / "1", tmp_path / "m" / "temp" / "2"
    args = ["forecast", "--data", str(tiny_csv), "--out", str(v1), "--run-dir", str(tmp_path / "run"), *FAST]
    args += ["--targets", "temp", *TINY_FORECAST]
    assert main([*args, "--epochs", "1", "--interval-scale", "std:8", "--calibration", "per-step"]) == 0
    assert Manifest.load(v1 / MANIFEST_FILE).training["interval_scale_floor"] == pytest.approx([want], rel=1e-6)
    calibrate = ["calibrate", "--model", str(v1), "--data", str(tiny_csv), "--out", str(v2)]
    assert main([*calibrate, "--interval-scale", "std:8", "--calibration", "pooled"]) == 0
    assert Manifest.load(v2 / MANIFEST_FILE).training["interval_scale_floor"] == pytest.approx([want], rel=1e-6)
