"""An int8 char LM whose answers do not depend on batching: ``seqserve-train quantize --method static``.

ONNX Runtime's dynamic quantization (``--method dynamic``) quantizes activations with one scale per run, taken over
the whole batch, so a request's answer moves with the requests that share its run. This graph needs no such scale:
every matrix product it quantizes reads an LSTM hidden state, and ``h = o * tanh(c)`` lies in [-1, 1] whatever the
input, so one fixed scale (1/127, zero point 128, uint8) quantizes it. With fixed scales and integer accumulation
(``MatMulInteger``), a row's arithmetic is the same whoever shares its run and however many steps the run holds:
batched or alone, one character at a time or a whole prompt at once, the outputs are bit-identical.

The graph, per layer, ``l`` = 0..L-1 (unidirectional LSTM, gates in ONNX's i, o, f, c order):

- layer 0: the embedding and the input projection are folded into one float32 table, ``E @ W0^T + b0``
  (vocab x 4H): a character's input gates are one row lookup (exact, nothing quantized);
- layers > 0: ``x @ W^T`` with ``x`` the layer below's hidden states (uint8, fixed scale) and ``W`` int8 per output
  column, for all time steps in one ``MatMulInteger``;
- the recurrence is a ``Scan`` over time whose body adds ``h @ R^T`` (the same int8 product) to the step's input
  gates and applies the LSTM cell in float32;
- the head (hidden -> vocab logits) stays float32.

Weights are int8 in the 7-bit range (+-63), as ``--method dynamic`` uses: CPUs without VNNI sum pairs of uint8 x
int8 products in 16 bits, and 2 * 255 * 63 never saturates there, so every x86 CPU computes the same integers.

``build`` refuses any graph that is not the char LM export it knows (``StructureError``), and ``check_structure``
rebuilds the same graph with float32 weights and compares it with the parent, so a misread graph (gate order, bias,
wiring) is refused before anything is quantized.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from training.onnx_graph import GraphBuilder, cpu_session

F32 = npt.NDArray[np.float32]
WEIGHT_MAX = 63  # 7-bit int8 weights: uint8 x int8 pair sums fit 16 bits on CPUs without VNNI
H_SCALE = 1.0 / 127.0  # hidden states in [-1, 1] -> uint8 1..255 around the zero point 128
ZERO_POINT = 128


class StructureError(ValueError):
    """The graph is not a unidirectional LSTM char LM export this method can rebuild."""


@dataclass
class Layer:
    hidden: int
    w: F32  # (4H, in): input weights, gates i, o, f, c
    r: F32  # (4H, H): recurrent weights
    bias: F32  # (4H,): input + recurrent biases


@dataclass
class CharLMWeights:
    embedding: F32  # (vocab, E)
    layers: list[Layer]
    head_w: F32  # (H, vocab)
    head_b: F32  # (vocab,)


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


def read_weights(model: onnx.ModelProto) -> CharLMWeights:
    """The weights of a char LM export (Gather -> LSTM x L -> MatMul + Add), or ``StructureError`` saying why not."""
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = list(model.graph.node)
    for n in nodes:  # weights stored in a smaller type (``charlm/2``: float16) and cast to float32 when loaded
        if n.op_type == "Cast" and n.input[0] in init and _attr(n, "to") == onnx.TensorProto.FLOAT:
            init[n.output[0]] = init[n.input[0]].astype(np.float32)
    gathers = [n for n in nodes if n.op_type == "Gather" and n.input[0] in init]
    lstms = [n for n in nodes if n.op_type == "LSTM"]
    heads = [n for n in nodes if n.op_type == "MatMul" and n.input[1] in init]
    adds = [n for n in nodes if n.op_type == "Add" and any(i in init for i in n.input)]
    if len(gathers) != 1 or not lstms or len(heads) != 1 or len(adds) != 1:
        raise StructureError(
            f"expected one embedding Gather, LSTM nodes, one head MatMul and one bias Add; found {len(gathers)}, "
            f"{len(lstms)}, {len(heads)} and {len(adds)} (only unidirectional LSTM char LMs can be rebuilt)"
        )
    layers = []
    for i, n in enumerate(lstms):
        direction = _attr(n, "direction")
        if direction not in (None, b"forward") or _attr(n, "clip") is not None or _attr(n, "input_forget"):
            raise StructureError(f"LSTM node {i} is not a plain forward LSTM (direction, clip or input_forget set)")
        if _attr(n, "activations") is not None or (len(n.input) > 7 and n.input[7]):
            raise StructureError(f"LSTM node {i} has custom activations or peepholes")
        if not all(name in init for name in n.input[1:4]):
            raise StructureError(f"LSTM node {i}: W, R and B must be initializers")
        w, r, b = (init[name][0].astype(np.float32) for name in n.input[1:4])
        h = int(_attr(n, "hidden_size"))
        if w.shape[0] != 4 * h or r.shape != (4 * h, h) or b.shape != (8 * h,):
            raise StructureError(f"LSTM node {i}: weight shapes {w.shape}, {r.shape}, {b.shape} for hidden {h}")
        layers.append(Layer(h, w, r, (b[: 4 * h] + b[4 * h :]).astype(np.float32)))
    embedding = init[gathers[0].input[0]].astype(np.float32)
    head_w = init[heads[0].input[1]].astype(np.float32)
    head_b = init[next(i for i in adds[0].input if i in init)].astype(np.float32)
    if layers[0].w.shape[1] != embedding.shape[1] or head_w.shape != (layers[-1].hidden, head_b.shape[0]):
        raise StructureError(
            f"shapes do not chain: embedding {embedding.shape}, first LSTM input {layers[0].w.shape[1]}, head "
            f"{head_w.shape}, bias {head_b.shape}"
        )
    for below, above in itertools.pairwise(layers):
        if above.w.shape[1] != below.hidden:
            raise StructureError("a layer's input size differs from the hidden size of the layer below")
    return CharLMWeights(embedding, layers, head_w, head_b)


def quantize_columns(w: F32) -> tuple[npt.NDArray[np.int8], F32]:
    """``w`` (in, out) as int8 in +-WEIGHT_MAX with one float32 scale per output column."""
    scale = np.abs(w).max(axis=0) / WEIGHT_MAX
    scale[scale == 0] = 1.0
    q = np.clip(np.round(w / scale), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8)
    return q, scale.astype(np.float32)


class _Graph(GraphBuilder):
    """A (sub)graph of the char LM: ``quantized`` False builds the same structure in float32 (the structure check)."""

    def __init__(self, quantized: bool, opset: int) -> None:
        super().__init__(opset)
        self.quantized = quantized

    def hidden_matmul(self, x: str, w: F32, name: str, out: str) -> None:
        """``out = x @ w`` for hidden states ``x`` in [-1, 1]: uint8 with the fixed scale times int8 columns, summed
        in int32 (float32 MatMul when not ``quantized``: the structure check)."""
        if not self.quantized:
            self.node("MatMul", [x, self.const(name, w)], [out])
            return
        q, scale = quantize_columns(w)
        self.node("QuantizeLinear", [x, self.const(name + "_xs", np.float32(H_SCALE)), name + "_zp"], [name + "_u8"])
        self.const(name + "_zp", np.uint8(ZERO_POINT))
        self.node("MatMulInteger", [name + "_u8", self.const(name + "_q", q), name + "_zp"], [name + "_i32"])
        self.node("Cast", [name + "_i32"], [name + "_f"], to=TensorProto.FLOAT)
        self.node("Mul", [name + "_f", self.const(name + "_s", (scale * H_SCALE).astype(np.float32))], [out])


def _cell_body(layer: Layer, index: int, quantized: bool, opset: int) -> onnx.GraphProto:
    """One LSTM step: (h, c, input gates of this step) -> (h', c', h')."""
    g, h = _Graph(quantized, opset), layer.hidden
    g.hidden_matmul("h_in", layer.r.T.copy(), f"R{index}", "rh")
    g.node("Add", ["x_t", "rh"], ["gates"])
    g.split("gates", ["gi", "go", "gf", "gc"], axis=1)
    for gate in ("i", "o", "f"):
        g.node("Sigmoid", [f"g{gate}"], [gate])
    g.node("Tanh", ["gc"], ["candidate"])
    g.node("Mul", ["f", "c_in"], ["kept"])
    g.node("Mul", ["i", "candidate"], ["added"])
    g.node("Add", ["kept", "added"], ["c_out"])
    g.node("Tanh", ["c_out"], ["c_tanh"])
    g.node("Mul", ["o", "c_tanh"], ["h_out"])
    g.node("Identity", ["h_out"], ["y_t"])
    value = helper.make_tensor_value_info
    inputs = [
        value("h_in", TensorProto.FLOAT, ["batch", h]),
        value("c_in", TensorProto.FLOAT, ["batch", h]),
        value("x_t", TensorProto.FLOAT, ["batch", 4 * h]),
    ]
    outputs = [value(n, TensorProto.FLOAT, ["batch", h]) for n in ("h_out", "c_out", "y_t")]
    return helper.make_graph(g.nodes, f"lstm_step_{index}", inputs, outputs, g.inits)


def build(model: onnx.ModelProto, quantized: bool = True) -> onnx.ModelProto:
    """The char LM ``model`` rebuilt as described in the module docstring, with the same inputs, outputs and
    states (``quantized=False``: the same structure in float32, for ``check_structure``)."""
    wts = read_weights(model)
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    g, n_layers = _Graph(quantized, opset), len(wts.layers)
    axis0 = g.const("axis0", np.array([0], np.int64))
    for state in ("h0", "c0"):
        if n_layers == 1:
            g.node("Identity", [state], [f"{state}_0"])
        else:
            g.split(state, [f"{state}_{i}" for i in range(n_layers)], axis=0)
    x = ""
    for i, layer in enumerate(wts.layers):
        if i == 0:  # embedding and input projection in one table: a character's input gates are one row
            table = (wts.embedding @ layer.w.T + layer.bias).astype(np.float32)
            g.node("Gather", [g.const("input_gates_table", table), "input_ids"], ["gates_in0"])
        else:
            g.hidden_matmul(x, layer.w.T.copy(), f"W{i}", f"xw{i}")
            g.node("Add", [f"xw{i}", g.const(f"b{i}", layer.bias)], [f"gates_in{i}"])
        g.node("Transpose", [f"gates_in{i}"], [f"gates_tb{i}"], perm=[1, 0, 2])  # (time, batch, 4H) for Scan
        g.node("Squeeze", [f"h0_{i}", axis0], [f"h_first{i}"])
        g.node("Squeeze", [f"c0_{i}", axis0], [f"c_first{i}"])
        g.node(
            "Scan",
            [f"h_first{i}", f"c_first{i}", f"gates_tb{i}"],
            [f"h_last{i}", f"c_last{i}", f"h_all_tb{i}"],
            body=_cell_body(layer, i, quantized, opset),
            num_scan_inputs=1,
        )
        g.node("Transpose", [f"h_all_tb{i}"], [f"h_all{i}"], perm=[1, 0, 2])  # (batch, time, H)
        g.node("Unsqueeze", [f"h_last{i}", axis0], [f"hn_{i}"])
        g.node("Unsqueeze", [f"c_last{i}", axis0], [f"cn_{i}"])
        x = f"h_all{i}"
    g.node("Concat", [f"hn_{i}" for i in range(n_layers)], ["hn"], axis=0)
    g.node("Concat", [f"cn_{i}" for i in range(n_layers)], ["cn"], axis=0)
    g.node("MatMul", [x, g.const("head_w", wts.head_w)], ["head"])
    g.node("Add", ["head", g.const("head_b", wts.head_b)], ["logits"])
    graph = helper.make_graph(
        g.nodes, model.graph.name or "charlm", list(model.graph.input), list(model.graph.output), g.inits
    )
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="seqserve-train")
    out.ir_version = model.ir_version
    onnx.checker.check_model(out)
    return out


def max_gap(a: onnx.ModelProto, b: onnx.ModelProto, layers: int, hidden: int, vocab: int) -> float:
    """The largest difference between the outputs (logits, hn, cn) of ``a`` and ``b`` on a probe: 4 rows of 16
    random characters from random states (h in [-1, 1])."""
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, vocab, (4, 16)).astype(np.int64),
        "h0": rng.uniform(-1, 1, (layers, 4, hidden)).astype(np.float32),
        "c0": rng.normal(0, 1, (layers, 4, hidden)).astype(np.float32),
    }
    runs = [cpu_session(m).run(None, feeds) for m in (a, b)]
    return max(float(np.abs(x - y).max()) for x, y in zip(*runs, strict=True))


def check_structure(model: onnx.ModelProto, tolerance: float = 1e-4) -> float:
    """Rebuilds ``model`` in float32 (``build(quantized=False)``) and compares it with the original on a probe;
    ``StructureError`` when they differ by more than ``tolerance`` (the graph was misread). Returns the gap."""
    wts = read_weights(model)
    gap = max_gap(model, build(model, quantized=False), len(wts.layers), wts.layers[0].hidden, len(wts.embedding))
    if gap > tolerance:
        raise StructureError(
            f"rebuilt in float32 the graph differs from the original by {gap:.2e} (> {tolerance}): it is not the "
            "char LM export this method knows"
        )
    return gap
