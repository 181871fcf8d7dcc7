"""Committed-style model folders changed on purpose, for the tests of loading and caching: a model's ``logits``
rewired through extra ONNX nodes, with the manifest's sha256 following so the files still load."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.core.manifest import MANIFEST_FILE, MODEL_FILE, sha256_file

Rewire = Callable[[str, str], list[onnx.NodeProto]]


def replace_logits(vdir: Path, nodes: Rewire, initializers: dict[str, np.ndarray]) -> None:
    """The graph's ``logits`` output becomes ``nodes(raw, "logits")`` of what it was (``raw``); the manifest's sha256
    follows, so the files load as before."""
    model = onnx.load(vdir / MODEL_FILE)
    for node in model.graph.node:
        node.output[:] = ["logits_raw" if name == "logits" else name for name in node.output]
    model.graph.node.extend(nodes("logits_raw", "logits"))
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in initializers.items())
    onnx.save(model, vdir / MODEL_FILE)
    manifest = json.loads((vdir / MANIFEST_FILE).read_text())
    manifest["sha256"] = sha256_file(vdir / MODEL_FILE)
    (vdir / MANIFEST_FILE).write_text(json.dumps(manifest))


def scale_logits(vdir: Path, factor: float) -> None:
    """``logits`` times ``factor``: the graph loads and runs, with other answers (NaN: every answer is NaN)."""
    replace_logits(
        vdir,
        lambda raw, out: [helper.make_node("Mul", [raw, "factor"], [out])],
        {"factor": np.asarray(factor, np.float32)},
    )


def answer_nan(vdir: Path) -> None:
    scale_logits(vdir, np.nan)


def reshape_logits(vdir: Path, shape: list[int]) -> None:
    """``logits`` reshaped to a fixed ``shape``: the graph loads (its batch axis is symbolic) and fails at run time
    for batches whose logits do not have that many values."""
    replace_logits(
        vdir,
        lambda raw, out: [helper.make_node("Reshape", [raw, "fixed_shape"], [out])],
        {"fixed_shape": np.asarray(shape, np.int64)},
    )
