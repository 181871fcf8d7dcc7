"""ONNX export with explicit recurrent state I/O, the manifest beside it, and a parity check.

Tensor names follow the serving contract (see service/core/manifest.py):
  charlm:    input_ids (B, T) int64, h0 [, c0]            -> logits (B, T, V), hn [, cn]
  sentiment: input_ids (B, T) int64, lengths (B,), h0 [, c0] -> logits (B, 2), hn [, cn]
  forecast:  history (B, T, F) float32, h0 [, c0] (channel-major, batch*features) -> forecast (B, H, T), hn [, cn]
             (T = the target columns; F - T covariates are inputs only)
"""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from service.core.arrays import resolve_shape
from service.core.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    Architecture,
    ForecastSpec,
    Manifest,
    Metric,
    Normalization,
    StateSpec,
    TensorSpec,
    Tokenizer,
    sha256_file,
)
from training.nets import NetConfig, count_parameters, state_specs
from training.onnx_graph import HALF_TOLERANCE, store_half

OPSET = 17
NATIVE_OPS = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}
DEFAULT_NAMES = {"sentiment": "sentiment", "charlm": "charlm", "forecast": "forecaster"}


def cell_name(cell: str) -> str:
    """A recurrent cell as a description names it: LSTM, GRU, RNN (tanh), RNN (ReLU)."""
    return {"rnn_tanh": "RNN (tanh)", "rnn_relu": "RNN (ReLU)"}.get(cell, NATIVE_OPS.get(cell, cell))


@dataclass
class GraphIO:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    states: list[StateSpec]
    dynamic_axes: dict[str, dict[int, str]]


def graph_io(cfg: NetConfig) -> GraphIO:
    """Names, dtypes, shapes and dynamic axes of the exported graph for ``cfg.task``."""
    states = state_specs(cfg)
    sshape, sbatch = states[0].shape, str(states[0].shape[1])
    axes: dict[str, dict[int, str]] = {}
    for s in states:
        axes[s.input] = {1: sbatch}
        axes[s.output] = {1: sbatch}
    if cfg.task == "charlm":
        ins = [TensorSpec(name="input_ids", dtype="int64", shape=["batch", "time"], description="char ids")]
        outs = [TensorSpec(name="logits", dtype="float32", shape=["batch", "time", cfg.vocab])]
        axes |= {"input_ids": {0: "batch", 1: "time"}, "logits": {0: "batch", 1: "time"}}
    elif cfg.task == "sentiment":
        ins = [
            TensorSpec(
                name="input_ids", dtype="int64", shape=["batch", "time"], description="word ids, right-padded with 0"
            ),
            TensorSpec(name="lengths", dtype="int64", shape=["batch"], description="valid tokens per row (>= 1)"),
        ]
        outs = [TensorSpec(name="logits", dtype="float32", shape=["batch", 2])]
        axes |= {"input_ids": {0: "batch", 1: "time"}, "lengths": {0: "batch"}, "logits": {0: "batch"}}
    elif cfg.task == "forecast":
        ins = [
            TensorSpec(
                name="history",
                dtype="float32",
                shape=["batch", "time", cfg.features],
                description=f"z-scored rows, time a multiple of {cfg.segment}",
            )
        ]
        width = len(cfg.targets) if cfg.targets is not None else cfg.features
        outs = [TensorSpec(name="forecast", dtype="float32", shape=["batch", cfg.horizon, width])]
        axes |= {"history": {0: "batch", 1: "time"}, "forecast": {0: "batch"}}
    else:
        raise ValueError(f"task: unknown task {cfg.task!r}")
    ins += [TensorSpec(name=s.input, dtype="float32", shape=sshape) for s in states]
    outs += [TensorSpec(name=s.output, dtype="float32", shape=sshape) for s in states]
    return GraphIO(ins, outs, states, axes)


def example_inputs(cfg: NetConfig, batch: int, time: int, seed: int = 0) -> tuple[Tensor, ...]:
    """Random inputs in the graph's input order (states random too, so state plumbing is exercised)."""
    g = torch.Generator().manual_seed(seed)
    if cfg.task == "forecast":
        xs: tuple[Tensor, ...] = (torch.randn(batch, time, cfg.features, generator=g),)
    else:
        ids = torch.randint(1, cfg.vocab, (batch, time), generator=g)
        xs = (ids,)
        if cfg.task == "sentiment":
            lengths = torch.randint(1, time + 1, (batch,), generator=g)
            lengths[0] = time
            ids.masked_fill_(torch.arange(time).unsqueeze(0) >= lengths.unsqueeze(1), 0)
            xs = (ids, lengths)
    sizes = {"batch": batch, "features": cfg.features}
    st = tuple(0.1 * torch.randn(resolve_shape(s.shape, sizes), generator=g) for s in state_specs(cfg))
    return xs + st


def export_onnx(net: nn.Module, path: Path, cfg: NetConfig, example_time: int = 7) -> GraphIO:
    """Trace ``net`` to ONNX (opset 17) with named, dynamic inputs and explicit state; check native cells."""
    io = graph_io(cfg)
    net = net.eval().cpu()
    args = example_inputs(cfg, batch=2, time=example_time)
    with torch.no_grad(), warnings.catch_warnings():
        # torch warns that batch > 1 with variable length needs explicit h0/c0: we do pass them as inputs.
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        # nn.RNN's Python-side shape checks become trace constants: harmless, state shapes are inputs.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # legacy exporter notice
        torch.onnx.export(
            net,
            args,
            str(path),
            input_names=[t.name for t in io.inputs],
            output_names=[t.name for t in io.outputs],
            dynamic_axes=dict(io.dynamic_axes),
            opset_version=OPSET,
            dynamo=False,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    op = NATIVE_OPS[cfg.cell]
    if not any(n.op_type == op for n in model.graph.node):
        raise RuntimeError(f"{path}: exported graph has no native {op} node for cell {cfg.cell!r}")
    return io


def ort_run(path: Path, feeds: dict[str, np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(sess.run(None, feeds))


def parity(net: nn.Module, path: Path, cfg: NetConfig, time: int, batch: int = 3, seed: int = 1) -> float:
    """Max |ORT - PyTorch| over every output, at a (batch, time) different from the export example."""
    io = graph_io(cfg)
    args = example_inputs(cfg, batch=batch, time=time, seed=seed)
    with torch.no_grad():
        want = net.eval()(*args)
    got = ort_run(path, {t.name: a.numpy() for t, a in zip(io.inputs, args, strict=True)})
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want, strict=True))


def write_model(
    net: nn.Module,
    cfg: NetConfig,
    out: Path,
    *,
    name: str,
    version: int,
    description: str = "",
    tokenizer: Tokenizer | None = None,
    labels: list[str] | None = None,
    normalization: Normalization | None = None,
    forecast: ForecastSpec | None = None,
    training: dict[str, Any] | None = None,
    metrics: list[Metric] | None = None,
    notes: str = "",
    half: bool = False,
) -> Path:
    """Export ``net`` to ``out/model.onnx``, verify parity (<= 1e-4), write ``out/manifest.json``. ``half``: then
    store the large weights as float16 (computed in float32: half the bytes), parity within ``HALF_TOLERANCE``."""
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / MODEL_FILE
    example_time = cfg.window if cfg.task == "forecast" else 7
    io = export_onnx(net, onnx_path, cfg, example_time)
    check_time = example_time + cfg.segment if cfg.task == "forecast" else 11
    diff = parity(net, onnx_path, cfg, check_time)
    if not diff <= 1e-4:
        raise RuntimeError(f"{onnx_path}: ORT vs PyTorch max abs diff {diff:.2e} exceeds 1e-4")
    stored: dict[str, Any] = {}
    if half:
        store_half(onnx_path)
        half_diff = parity(net, onnx_path, cfg, check_time)
        if not half_diff <= HALF_TOLERANCE:
            raise RuntimeError(
                f"{onnx_path}: with float16 weights ORT vs PyTorch max abs diff {half_diff:.2e} exceeds "
                f"{HALF_TOLERANCE:g}; export without --half"
            )
        stored = {"weights": "float16 (computed in float32)", "parity_max_abs_diff_half": half_diff}
    dirs = 2 if (cfg.bidirectional and cfg.task == "sentiment") else 1
    manifest = Manifest(
        name=name,
        version=version,
        task=cfg.task,
        description=description,
        architecture=Architecture(
            cell=cfg.cell,  # type: ignore[arg-type]
            layers=cfg.layers,
            hidden=cfg.hidden,
            directions=dirs,  # type: ignore[arg-type]
            embedding=None if cfg.task == "forecast" else cfg.embedding,
            dropout=cfg.dropout,
            parameters=count_parameters(net),
            notes=notes,
        ),
        inputs=io.inputs,
        outputs=io.outputs,
        states=io.states,
        stateful=cfg.task == "charlm",
        tokenizer=tokenizer,
        labels=labels,
        normalization=normalization,
        forecast=forecast,
        training={"net": cfg.to_dict(), "parity_max_abs_diff": diff, **stored, **(training or {})},
        metrics=metrics or [],
        sha256=sha256_file(onnx_path),
        opset=OPSET,
        torch_version=torch.__version__,
        onnx_version=onnx.__version__,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    manifest.dump(out / MANIFEST_FILE)
    return out
