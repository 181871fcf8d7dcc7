"""Small tools for the commands that write ONNX graphs by hand (``quantize --method static``, ``fuse``): a graph
under construction, and a CPU session over a graph in memory or on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper


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
