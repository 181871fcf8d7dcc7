"""``training/int8_lstm.py``: the static int8 char LM graph is read only from the export it knows, rebuilt in float32
to check the reading, and quantized with fixed scales and 7-bit columns."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from training.int8_lstm import WEIGHT_MAX, StructureError, build, check_structure, quantize_columns, read_weights
from training.onnx_graph import halved

CHARLM = Path(__file__).resolve().parents[2] / "models" / "charlm" / "1" / "model.onnx"


@pytest.fixture(scope="module")
def charlm() -> onnx.ModelProto:
    return onnx.load(str(CHARLM))


def test_the_committed_char_lm_is_read_and_rebuilt_exactly_in_float32(charlm: onnx.ModelProto) -> None:
    w = read_weights(charlm)
    assert [layer.hidden for layer in w.layers] == [256, 256] and w.embedding.shape == (65, 64)
    assert check_structure(charlm) < 1e-4
    q = build(charlm)
    assert [i.name for i in q.graph.input] == ["input_ids", "h0", "c0"]
    assert [o.name for o in q.graph.output] == ["logits", "hn", "cn"]


def test_weights_stored_as_float16_are_read_through_their_casts(charlm: onnx.ModelProto) -> None:
    """``charlm/2`` stores its weights as float16, each cast to float32 by a node (``--half``): the reader takes a
    cast initializer for the weight it names, at the values the graph computes with."""
    half = copy.deepcopy(charlm)
    nodes, inits = halved(list(half.graph.node), list(half.graph.initializer))
    del half.graph.node[:], half.graph.initializer[:]
    half.graph.node.extend(nodes)
    half.graph.initializer.extend(inits)
    assert sum(n.op_type == "Cast" for n in half.graph.node) >= 7  # embedding, 2 x (W, R, B), head
    full, read = read_weights(charlm), read_weights(half)
    assert read.embedding.dtype == np.float32 and not np.array_equal(read.embedding, full.embedding)
    np.testing.assert_array_equal(read.embedding, full.embedding.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(read.layers[1].r, full.layers[1].r.astype(np.float16).astype(np.float32))
    assert check_structure(half) < 1e-4
    committed = onnx.load(str(CHARLM.parents[1] / "2" / "model.onnx"))  # the 2x512 char LM, float16-stored
    assert [layer.hidden for layer in read_weights(committed).layers] == [512, 512]
    assert check_structure(committed) < 1e-4


def test_a_graph_that_computes_something_else_is_refused_by_the_float32_rebuild(charlm: onnx.ModelProto) -> None:
    scaled = copy.deepcopy(charlm)  # the logits doubled by one more node: read_weights cannot see it, the probe can
    add = next(n for n in scaled.graph.node if n.output[0] == "logits")
    add.output[0] = "logits_half"
    scaled.graph.initializer.append(onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    scaled.graph.node.append(helper.make_node("Mul", ["logits_half", "two"], ["logits"]))
    with pytest.raises(StructureError, match="differs from the original"):
        check_structure(scaled)


def test_what_is_not_a_forward_lstm_char_lm_is_refused(charlm: onnx.ModelProto) -> None:
    backward = copy.deepcopy(charlm)
    next(n for n in backward.graph.node if n.op_type == "LSTM").attribute.append(
        helper.make_attribute("direction", "reverse")
    )
    with pytest.raises(StructureError, match="not a plain forward LSTM"):
        read_weights(backward)
    headless = copy.deepcopy(charlm)
    headless.graph.node.remove(next(n for n in headless.graph.node if n.op_type == "MatMul"))
    with pytest.raises(StructureError, match="one head MatMul"):
        read_weights(headless)


def test_weights_are_quantized_per_column_in_the_7_bit_range() -> None:
    w = np.random.default_rng(0).normal(size=(300, 40)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column keeps a usable scale
    q, scale = quantize_columns(w)
    assert q.dtype == np.int8 and np.abs(q).max() == WEIGHT_MAX == 63 and np.all(q[:, 3] == 0)
    assert np.all(np.abs(q * scale - w) <= scale / 2 + 1e-7)
