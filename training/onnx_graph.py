"""Small tools for the commands that write ONNX graphs by hand (``quantize --method static``, ``fuse``,
``ensemble``, ``--half``): a graph under construction, a CPU session over a graph in memory or on disk, the random
padded word batches a rebuilt sentiment graph is checked on, and weights stored as float16."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HALF_MIN_ELEMENTS = 1024  # float16 storage leaves smaller tensors (biases, shapes) as they are
# Largest output difference allowed between a graph with float16-stored weights and its float32 reference
# (ensemble --half against its members, --half at export against PyTorch)
HALF_TOLERANCE = 1e-2


def halved(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Every float32 initializer of ``HALF_MIN_ELEMENTS`` or more stored as float16, cast back under its own name
    (ONNX Runtime folds the casts when the session loads, so the graph computes in float32 as before)."""
    casts, kept = [], []
    for t in inits:
        if t.data_type == TensorProto.FLOAT and int(np.prod(t.dims)) >= HALF_MIN_ELEMENTS:
            kept.append(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name + ".f16"))
            casts.append(helper.make_node("Cast", [t.name + ".f16"], [t.name], to=TensorProto.FLOAT))
        else:
            kept.append(t)
    return casts + nodes, kept


def store_half(path: Path) -> None:
    """Rewrites the model at ``path`` with its large weights stored as float16 (``halved``): half the bytes."""
    model = onnx.load(str(path))
    nodes, inits = halved(list(model.graph.node), list(model.graph.initializer))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


class GraphBuilder:
    """Nodes and initializers of one (sub)graph under construction, for ONNX opset ``opset``."""

    def __init__(self, opset: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.opset = opset

    def const(self, name: str, value: Any) -> str:
        """An initializer named ``name``; returns the name (to use it as a node input in place)."""
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, **attrs))

    def split(self, x: str, outputs: list[str], axis: int) -> None:
        """Equal parts (opset 18 wants their number said)."""
        extra = {"num_outputs": len(outputs)} if self.opset >= 18 else {}
        self.node("Split", [x], outputs, axis=axis, **extra)


def cpu_session(model: onnx.ModelProto | Path, threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime CPU session over ``model`` (in memory or a file); ``threads`` 0 = ORT's default."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


# (batch, time) of the probe batches: one word, one row, a few rows, and batches as serving sends them
PROBE_SHAPES = ((1, 1), (1, 9), (3, 17), (16, 40), (64, 25))


def probe_batches(vocab: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Random word batches (``input_ids`` right-padded with 0, ``lengths``), one per ``PROBE_SHAPES``; the first row
    of each is full length, the others random lengths, so both padded and unpadded rows are probed."""
    rng = np.random.default_rng(seed)
    for batch, steps in PROBE_SHAPES:
        lengths = rng.integers(1, steps + 1, size=batch)
        lengths[0] = steps
        ids = rng.integers(1, vocab, size=(batch, steps))
        ids[np.arange(steps)[None, :] >= lengths[:, None]] = 0
        yield {"input_ids": ids.astype(np.int64), "lengths": lengths.astype(np.int64)}
