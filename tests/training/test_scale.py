"""The ``scale`` graph output: ``WindowScale`` matches ``window_scale``; grafting it onto an exported forecaster
leaves every other output bit for bit as it was and updates the manifest (output, scale_output, sha256)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from service.core.arrays import zero_states
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, sha256_file
from service.core.tasks.forecast import ForecastTask
from tests.tiny_models import export_tiny
from training import scale as scale_module
from training.calibrate import window_scale
from training.scale import WindowScale, add_scale_output, graft


def run(model: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    m = Manifest.load(model / MANIFEST_FILE)
    sess = ort.InferenceSession(str(model / MODEL_FILE), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    feeds = {"history": x, **zero_states(m.states, {"batch": len(x), "features": 7})}
    return dict(zip(names, sess.run(names, feeds), strict=True))


@pytest.mark.parametrize("kind", ["mad", "std"])
def test_window_scale_module_matches_numpy(kind: str) -> None:
    x = np.random.default_rng(0).standard_normal((5, 30, 4)).astype(np.float32)
    x[0, :, 3] = 1.0  # a flat column: the floor
    module = WindowScale(kind, 7, [1, 3], [0.2, 0.3])
    got = module(torch.from_numpy(x)).numpy()
    assert got.shape == (5, 1, 2) and got[0, 0, 1] == pytest.approx(0.3)
    np.testing.assert_allclose(got, window_scale(x[:, :, [1, 3]], kind, 7, [0.2, 0.3]), rtol=1e-5)
    with pytest.raises(ValueError, match="one positive floor per target"):
        WindowScale(kind, 7, [1, 3], [0.2, 0.0])


def test_add_scale_output_keeps_the_forecast_and_declares_the_scale(tmp_path: Path) -> None:
    out = export_tiny("forecast", tmp_path, name="fc", cell="gru")
    x = np.random.default_rng(1).standard_normal((4, 24, 7)).astype(np.float32)
    before = run(out, x)
    diff = add_scale_output(out, "mad", 6, [0.1] * 7)
    assert diff <= 1e-5
    m = Manifest.load(out / MANIFEST_FILE)
    assert m.forecast is not None and m.forecast.scale_output == "scale" and m.sha256 == sha256_file(out / MODEL_FILE)
    assert [(t.name, t.shape) for t in m.outputs] == [
        ("forecast", ["batch", 12, 7]),
        ("hn", [1, "batch*features", 16]),
        ("scale", ["batch", 1, 7]),
    ]
    ForecastTask.check(m)
    after = run(out, x)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])  # bit for bit
    np.testing.assert_allclose(after["scale"], window_scale(x, "mad", 6, [0.1] * 7), rtol=1e-5)
    assert any(n.op_type == "GRU" for n in onnx.load(str(out / MODEL_FILE)).graph.node)


def test_a_covariate_model_scales_its_targets_only(tmp_path: Path) -> None:
    out = export_tiny("forecast", tmp_path, name="ot", targets=["OT"])
    add_scale_output(out, "std", 10, [0.05])
    m = Manifest.load(out / MANIFEST_FILE)
    assert m.output("scale").shape == ["batch", 1, 1]
    x = np.random.default_rng(2).standard_normal((3, 24, 7)).astype(np.float32)
    x[:, :, 6] *= 4  # OT is 4x as volatile as the covariates
    np.testing.assert_allclose(run(out, x)["scale"], window_scale(x[:, :, [6]], "std", 10, [0.05]), rtol=1e-5)


def test_graft_refuses_a_clash_or_a_missing_input(tmp_path: Path) -> None:
    out = export_tiny("forecast", tmp_path, name="fc", cell="gru")
    add_scale_output(out, "mad", 4, [0.1] * 7)
    model = onnx.load(str(out / MODEL_FILE))
    with pytest.raises(ValueError, match=r"the base graph already has outputs \['forecast', 'hn', 'scale'\]"):
        graft(model, model)
    other = onnx.load(str(export_tiny("charlm", tmp_path) / MODEL_FILE))  # reads input_ids, not history
    with pytest.raises(ValueError, match=r"reads inputs \['c0', 'input_ids'\] that the base graph lacks"):
        graft(model, other)


def test_a_grafted_scale_that_disagrees_with_numpy_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """add_scale_output checks the graph's scale against ``window_scale`` before declaring it."""
    out = export_tiny("forecast", tmp_path, name="fc", cell="gru")
    real = window_scale  # (training.scale's own name for it is what the patch replaces)
    monkeypatch.setattr(scale_module, "window_scale", lambda *a, **k: real(*a, **k) * 1.01)
    with pytest.raises(RuntimeError, match="grafted scale changed other outputs \\(False\\) or differs by"):
        add_scale_output(out, "mad", 6, [0.1] * 7)
    m = Manifest.load(out / MANIFEST_FILE)
    assert m.forecast is not None and m.forecast.scale_output is None  # the manifest was not updated
