"""The per-window interval scale as a graph output: ``WindowScale`` (torch) and ``add_scale_output``, which
grafts it onto an exported forecaster's ONNX graph beside ``forecast`` (the point forecast is untouched).

Serving multiplies ``forecast.quantile_offsets`` by this output (``service/core/tasks/forecast.py``); the
numbers it computes are ``training.calibrate.window_scale``'s, checked against ORT at export.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from service.core.arrays import zero_states
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, TensorSpec, sha256_file
from training.calibrate import SCALE_KINDS, window_scale

SCALE_OUTPUT = "scale"
OPSET = 17


class WindowScale(nn.Module):
    """history (B, L, F) z-scored -> scale (B, 1, T) > 0: the volatility of each target's last ``k`` row-to-row
    changes ("mad": mean absolute change, "std": their standard deviation), never below ``floor`` (T,)."""

    def __init__(self, kind: str, k: int, targets: list[int], floor: list[float]) -> None:
        super().__init__()
        if kind not in SCALE_KINDS or k < 1 or len(targets) != len(floor) or min(floor) <= 0:
            raise ValueError(f"scale: kind in {SCALE_KINDS}, k >= 1, one positive floor per target; got {kind}:{k}")
        self.kind, self.k, self.targets = kind, k, list(targets)
        self.floor: Tensor
        self.register_buffer("floor", torch.tensor(floor, dtype=torch.float32).reshape(1, 1, -1))

    def forward(self, history: Tensor) -> Tensor:
        x = history[:, -(self.k + 1) :, self.targets]  # (B, k+1, T)
        d = x[:, 1:] - x[:, :-1]  # (B, k, T)
        if self.kind == "mad":
            v = d.abs().mean(dim=1, keepdim=True)
        else:
            v = ((d - d.mean(dim=1, keepdim=True)) ** 2).mean(dim=1, keepdim=True).sqrt()
        return torch.maximum(v, self.floor)  # (B, 1, T)


def _export_scale(module: WindowScale, features: int, window: int, path: Path) -> None:
    example = torch.randn(2, window, features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # legacy exporter notice
        torch.onnx.export(
            module.eval(), (example,), str(path), input_names=["history"], output_names=[SCALE_OUTPUT],
            dynamic_axes={"history": {0: "batch", 1: "time"}, SCALE_OUTPUT: {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )  # fmt: skip


def graft(base: onnx.ModelProto, part: onnx.ModelProto, prefix: str = "scale/") -> onnx.ModelProto:
    """``base`` plus ``part``'s nodes and outputs; ``part`` reads only inputs ``base`` has. Every internal name of
    ``part`` gets ``prefix`` so nothing collides; ``base``'s nodes and outputs are unchanged."""
    shared = {i.name for i in part.graph.input}
    missing = shared - {i.name for i in base.graph.input}
    clash = {o.name for o in part.graph.output} & {o.name for o in base.graph.output}
    if missing:
        raise ValueError(f"graft: the part reads inputs {sorted(missing)} that the base graph lacks")
    if clash:
        raise ValueError(f"graft: the base graph already has outputs {sorted(clash)}")
    keep = shared | {o.name for o in part.graph.output}
    g = onnx.GraphProto()
    g.CopyFrom(part.graph)

    def rename(name: str) -> str:
        return name if not name or name in keep else prefix + name

    for node in g.node:
        node.name = prefix + node.name
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for init in g.initializer:
        init.name = rename(init.name)
    out = onnx.ModelProto()
    out.CopyFrom(base)
    out.graph.node.extend(g.node)  # after base's nodes: they read graph inputs only, so the order stays topological
    out.graph.initializer.extend(g.initializer)
    out.graph.output.extend(g.output)
    onnx.checker.check_model(out)
    return out


def _run(path: Path, m: Manifest, x: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    features = m.forecast.features if m.forecast is not None else 1
    feeds = {"history": x, **zero_states(m.states, {"batch": len(x), "features": features})}
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def add_scale_output(model_dir: Path, kind: str, k: int, floor: list[float]) -> float:
    """Grafts ``WindowScale(kind, k, floor)`` onto ``model_dir/model.onnx`` as output ``scale`` (batch, 1,
    targets), declares it in the manifest (``outputs``, ``forecast.scale_output``, ``sha256``) and checks it: every
    other output bit for bit as before, ``scale`` vs ``window_scale`` <= 1e-5. Returns that max abs difference."""
    m = Manifest.load(model_dir / MANIFEST_FILE)
    f = m.forecast
    if f is None or m.normalization is None:
        raise ValueError(f"{model_dir}: not a forecaster")
    columns = list(m.normalization.columns)
    targets = [columns.index(t) for t in f.targets] if f.targets else list(range(f.features))
    path = model_dir / MODEL_FILE
    x = np.random.default_rng(1).standard_normal((3, f.window, f.features)).astype(np.float32)  # batch 3, not 2
    before = _run(path, m, x)
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "scale.onnx"
        _export_scale(WindowScale(kind, k, targets, floor), f.features, f.window, part)
        onnx.save(graft(onnx.load(str(path)), onnx.load(str(part))), str(path))
    after = _run(path, m, x)
    same = all(np.array_equal(before[n], after[n]) for n in before)
    want = window_scale(x[:, :, targets], kind, k, floor)  # (3, 1, T)
    diff = float(np.abs(after[SCALE_OUTPUT] - want).max())
    if not same or not diff <= 1e-5:
        raise RuntimeError(f"{path}: grafted scale changed other outputs ({not same}) or differs by {diff:.2e}")
    spec = TensorSpec(
        name=SCALE_OUTPUT, dtype="float32", shape=["batch", 1, len(targets)],
        description=f"per-window interval scale: {kind} of each target's last {k} row-to-row changes (z-scored), "
        f"floored; quantile q = forecast + quantile_offsets[q] * scale",
    )  # fmt: skip
    m = m.model_copy(
        update={
            "outputs": [*m.outputs, spec],
            "forecast": f.model_copy(update={"scale_output": SCALE_OUTPUT}),
            "sha256": sha256_file(path),
        }
    )
    m.dump(model_dir / MANIFEST_FILE)
    return diff


def remove_scale_output(model_dir: Path) -> Manifest:
    """The inverse of ``add_scale_output``: ``model_dir``'s graph without the scale output and the nodes that only
    fed it (``onnx.utils.extract_model``), and its manifest without it, so a scaled forecaster can be recalibrated
    from its point forecast. Checked: every other output bit for bit as before. Returns the new manifest."""
    m = Manifest.load(model_dir / MANIFEST_FILE)
    f = m.forecast
    if f is None or f.scale_output is None:
        return m
    path = model_dir / MODEL_FILE
    x = np.random.default_rng(1).standard_normal((3, f.window, f.features)).astype(np.float32)
    before = _run(path, m, x)
    keep = [o.name for o in m.outputs if o.name != f.scale_output]
    inputs = [i.name for i in onnx.load(str(path)).graph.input]
    onnx.utils.extract_model(str(path), str(path), inputs, keep)  # (keeps the opset imports; checks both graphs)
    after = _run(path, m, x)
    if set(after) != set(keep) or not all(np.array_equal(before[n], after[n]) for n in keep):
        raise RuntimeError(f"{path}: removing {f.scale_output!r} changed the other outputs")
    m = m.model_copy(
        update={
            "outputs": [o for o in m.outputs if o.name != f.scale_output],
            "forecast": f.model_copy(update={"scale_output": None}),
            "sha256": sha256_file(path),
        }
    )
    m.dump(model_dir / MANIFEST_FILE)
    return m
