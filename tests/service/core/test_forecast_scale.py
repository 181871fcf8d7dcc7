"""A forecaster whose graph has a per-window ``scale`` output (``forecast.scale_output``): quantiles are
``point + offsets * scale`` on every path (Forecast, Observe sessions, KServe infer, KServe sequences), the band
follows the window's volatility, the contract is checked at load, and a model without one is served exactly as
before. The models are tiny, untrained, and built through the training export code (``training/scale.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from service.core.manifest import MANIFEST_FILE, Manifest
from service.core.tasks.forecast import ForecastTask
from service.core.types import ModelRef, SequenceRef, Tensor
from tests.service.core.conftest import SCALED_FLOOR, MakeDP
from training.calibrate import window_scale

WINDOW, HORIZON, FEATURES = 24, 12, 7
PLAIN, SCALED = ModelRef("plain"), ModelRef("scaled")
FLOOR = SCALED_FLOOR  # the scaled model's (conftest.scaled_repo)


def series(rows: int, volatility: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array([7.9, 2.1, 5.0, 0.7, 3.0, 0.9, 13.3], dtype=np.float32)
    return (base + volatility * rng.normal(size=(rows, FEATURES))).astype(np.float32)


def history_tensor(rows: np.ndarray) -> list[Tensor]:
    """KServe v2 inputs: ``rows`` as HISTORY."""
    return [Tensor("HISTORY", "FP32", rows.shape, array=rows)]


def z_window(manifest: Manifest, history: np.ndarray) -> np.ndarray:
    assert manifest.normalization is not None
    mean = np.asarray(manifest.normalization.mean, np.float32)
    std = np.asarray(manifest.normalization.std, np.float32)
    return ((history[-WINDOW:] - mean) / std).astype(np.float32)[None]  # (1, window, features), as serving does


async def test_quantiles_are_point_plus_offsets_times_the_windows_scale(scaled_repo: Path, make_dp: MakeDP) -> None:
    dp = await make_dp(models=scaled_repo)
    entry = dp.registry.resolve(SCALED)
    m = entry.manifest
    assert m.forecast is not None and m.normalization is not None and m.forecast.scale_output == "scale"
    history = series(40, volatility=1.0)
    result = await dp.forecast(SCALED, history)
    # The point forecast is the plain model's (the graft adds an output, it changes nothing else).
    np.testing.assert_array_equal(result.point, (await dp.forecast(PLAIN, history)).point)
    z = z_window(m, history)
    out = entry.runtime.run({"history": z}, 1)
    scale = out["scale"][0]  # (1, features)
    np.testing.assert_allclose(scale[None], window_scale(z, "std", 5, FLOOR), rtol=1e-5)
    mean, std = np.array(m.normalization.mean, np.float32), np.array(m.normalization.std, np.float32)
    offsets = np.asarray(m.forecast.quantile_offsets, np.float32)
    want = (out["forecast"][0][None] + offsets * scale[None]) * std + mean
    np.testing.assert_allclose(result.quantiles, want, rtol=1e-5, atol=1e-5)
    assert (result.quantiles[0] < result.point).all() and (result.point < result.quantiles[2]).all()


async def test_the_band_follows_the_windows_volatility(scaled_repo: Path, make_dp: MakeDP) -> None:
    """Same model, a calm and a volatile history: the scaled band is ~10x wider on the volatile one; the plain
    model's band is the same width for both (constant offsets)."""
    dp = await make_dp(models=scaled_repo)
    calm, wild = series(40, volatility=0.5, seed=3), series(40, volatility=5.0, seed=3)

    async def width(model: ModelRef, history: np.ndarray) -> np.ndarray:
        q = (await dp.forecast(model, history)).quantiles
        return np.asarray(q[2] - q[0])

    ratio = await width(SCALED, wild) / await width(SCALED, calm)
    assert 7.0 < float(np.median(ratio)) < 13.0
    np.testing.assert_allclose(await width(PLAIN, wild), await width(PLAIN, calm), rtol=1e-4)


async def test_sessions_and_kserve_use_the_same_scaled_quantiles(scaled_repo: Path, make_dp: MakeDP) -> None:
    dp = await make_dp(models=scaled_repo)
    history = series(40, volatility=2.0, seed=5)
    want = await dp.forecast(SCALED, history)
    s = await dp.create_session(SCALED)
    await dp.observe(s.id, history[:30])
    observed = await dp.observe(s.id, history[30:])
    np.testing.assert_allclose(observed.quantiles, want.quantiles, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want.quantiles, (await dp.forecast(PLAIN, history)).quantiles, atol=1e-3)  # scaled

    def quantiles(outputs: list[Tensor]) -> np.ndarray:
        q = {t.name: t.array for t in outputs}["QUANTILES"]
        assert q is not None
        return q

    plain = await dp.infer(SCALED, history_tensor(history))
    np.testing.assert_allclose(quantiles(plain.outputs), want.quantiles, rtol=1e-5, atol=1e-5)
    seq = [
        await dp.infer(SCALED, history_tensor(part), sequence=SequenceRef(**cast(dict[str, Any], ref)))
        for part, ref in ((history[:20], {"id": "q-1", "start": True}), (history[20:], {"id": "q-1", "end": True}))
    ]
    np.testing.assert_allclose(quantiles(seq[1].outputs), want.quantiles, rtol=1e-5, atol=1e-5)


async def test_without_a_scale_output_quantiles_are_computed_exactly_as_before(
    scaled_repo: Path, make_dp: MakeDP
) -> None:
    """Bit for bit: ``(point_z + offsets) * std + mean`` in float32, the pre-scale formula."""
    dp = await make_dp(models=scaled_repo)
    entry = dp.registry.resolve(PLAIN)
    m = entry.manifest
    assert m.forecast is not None and m.forecast.scale_output is None and m.normalization is not None
    assert [t.name for t in m.outputs] == ["forecast", "hn"]
    history = series(40, volatility=1.0, seed=7)
    point_z = entry.runtime.run({"history": z_window(m, history)}, 1)["forecast"][0]
    mean, std = np.asarray(m.normalization.mean, np.float32), np.asarray(m.normalization.std, np.float32)
    quant_z = point_z[None] + np.asarray(m.forecast.quantile_offsets, dtype=np.float32)
    np.testing.assert_array_equal((await dp.forecast(PLAIN, history)).quantiles, (quant_z * std + mean))


def _edited(manifest: Manifest, **changes: Any) -> Manifest:
    raw = json.loads(manifest.model_dump_json())
    for key, value in changes.items():
        outer, _, inner = key.partition(".")
        if inner:
            raw[outer][inner] = value
        else:
            raw[outer] = value
    return Manifest.model_validate(raw)


def test_check_refuses_a_broken_scale_contract(scaled_repo: Path) -> None:
    m = Manifest.load(scaled_repo / "scaled" / "1" / MANIFEST_FILE)
    ForecastTask.check(m)  # the exported contract is accepted
    outputs = [t.model_dump() for t in m.outputs]
    scale = next(t for t in outputs if t["name"] == "scale")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"forecast.scale_output": "spread"}, r"scale_output 'spread' must name a graph output other than 'forecast'"),
        ({"forecast.scale_output": "hn"}, r"scale_output 'hn' must name a graph output other than 'forecast'"),
        (
            {"outputs": [t if t is not scale else {**scale, "shape": ["batch", 5, 7]} for t in outputs]},
            r"output 'scale' \(forecast.scale_output\) is float32 \['batch', 5, 7\]; expected float32 \['batch', "
            r"1 or horizon=12, targets=7\]",
        ),
        (
            {"outputs": [t if t is not scale else {**scale, "shape": ["batch", 1, 1]} for t in outputs]},
            r"is float32 \['batch', 1, 1\]; expected",
        ),
        (
            {"outputs": [t if t is not scale else {**scale, "dtype": "int64"} for t in outputs]},
            r"output 'scale' \(forecast.scale_output\) is int64",
        ),
        ({"forecast.quantile_offsets": []}, r"scale_output 'scale' is set but forecast.quantile_offsets is empty"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            ForecastTask.check(_edited(m, **changes))
    horizon = [t if t is not scale else {**scale, "shape": ["batch", HORIZON, FEATURES]} for t in outputs]
    ForecastTask.check(_edited(m, outputs=horizon))  # one scale per horizon step is part of the contract too


async def test_a_model_with_a_broken_scale_contract_fails_to_load(
    scaled_repo: Path, tmp_path: Path, make_dp: MakeDP
) -> None:
    root = tmp_path / "models"
    shutil.copytree(scaled_repo, root)
    path = root / "scaled" / "1" / MANIFEST_FILE
    raw = json.loads(path.read_text())
    raw["forecast"]["scale_output"] = "spread"
    path.write_text(json.dumps(raw))
    dp = await make_dp(models=root)
    errors = {m.name: m.error or "" for m in await dp.models()}
    assert "forecast.scale_output 'spread' must name a graph output" in errors["scaled"]
    assert errors["plain"] == ""


def _per_step(model_dir: Path, ramp: np.ndarray) -> None:
    """``model_dir``'s one-row ``scale`` output times ``ramp`` (1, horizon, 1): one scale per horizon step, declared
    (batch, horizon, targets) in the manifest, as a graph that widens its band further ahead would."""
    import onnx
    from onnx import helper, numpy_helper

    from service.core.manifest import sha256_file

    path = model_dir / "model.onnx"
    graph = onnx.load(str(path))
    for node in graph.graph.node:
        node.output[:] = ["scale/one_row" if name == "scale" else name for name in node.output]
    graph.graph.initializer.append(numpy_helper.from_array(ramp.astype(np.float32), "scale/ramp"))
    graph.graph.node.append(helper.make_node("Mul", ["scale/one_row", "scale/ramp"], ["scale"], name="scale/steps"))
    out = next(o for o in graph.graph.output if o.name == "scale")
    out.type.tensor_type.shape.dim[1].dim_value = ramp.shape[1]
    onnx.save(graph, str(path))
    m = Manifest.load(model_dir / MANIFEST_FILE)
    outputs = [
        t if t.name != "scale" else t.model_copy(update={"shape": ["batch", HORIZON, FEATURES]}) for t in m.outputs
    ]
    update = {"name": model_dir.parent.name, "outputs": outputs, "sha256": sha256_file(path)}
    m.model_copy(update=update).dump(model_dir / MANIFEST_FILE)


async def test_a_scale_per_horizon_step_scales_each_step_and_scores_the_first_ones(
    scaled_repo: Path, tmp_path: Path, make_dp: MakeDP
) -> None:
    """The contract allows a scale per horizon step (batch, horizon, targets), not only one per window: each step's
    offsets are multiplied by that step's scale, and the rows a session observes next are scored against the
    quantiles of the steps they are (5 rows: the first 5 steps' scales)."""
    from tests.service.core.test_forecast_coverage import counts, expected

    root = tmp_path / "models"
    shutil.copytree(scaled_repo, root)
    shutil.copytree(root / "scaled", root / "stepped")
    ramp = np.linspace(1.0, 2.5, HORIZON, dtype=np.float32).reshape(1, HORIZON, 1)
    _per_step(root / "stepped" / "1", ramp)
    dp = await make_dp(models=root)
    stepped = ModelRef("stepped")
    history = series(WINDOW + 5, volatility=1.5, seed=7)
    one_row = await dp.forecast(SCALED, history[:WINDOW])
    per_step = await dp.forecast(stepped, history[:WINDOW])
    np.testing.assert_array_equal(per_step.point, one_row.point)
    np.testing.assert_allclose(per_step.quantiles - per_step.point, (one_row.quantiles - one_row.point) * ramp[0],
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    s = await dp.create_session(stepped)
    first = await dp.observe(s.id, history[:WINDOW])
    np.testing.assert_allclose(first.quantiles, per_step.quantiles, rtol=1e-5, atol=1e-5)
    await dp.observe(s.id, history[WINDOW:])
    assert counts(dp, "stepped") == expected(first.quantiles, history[WINDOW:])
