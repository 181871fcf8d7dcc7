"""``seqserve-train fuse``: a bidirectional sentiment export rebuilt as a lean ONNX graph, same weights, same answers.

The PyTorch export of ``SentimentNet`` runs every direction of every layer of every ensemble member as its own
unidirectional recurrent node, and makes the backward direction length-aware by hand: a gather builds a reversed
copy of each row's valid tokens, a second gather puts the outputs back, and masks, shapes and slices glue it
together (``sentiment/1``: 342 nodes for 6 LSTM nodes). ONNX's recurrent operators already do that themselves: with
``direction="bidirectional"`` and ``sequence_lens`` the backward pass starts at each row's last valid token. This
command reads the parent's weights and writes, per member and layer, one bidirectional node fed ``lengths``; then
one masked mean + max pooling over every member's outputs at once and the members' heads folded into one ``Gemm``
(the mean of K linear heads is one linear head). ``sentiment/1`` becomes 34 nodes, and a one-sentence run costs
15-20% less (``make bench``'s runtime table measures it).

Nothing is retrained, quantized or approximated beyond float32 rounding order, so the result is published as a new
*version* of the same model (``models/sentiment/2``). Release rule, fixed before the first run: on probe batches
(random words, random lengths, batch 1 to 64) no logit may differ from the parent's by more than ``TOLERANCE``
(1e-4), and on the evaluation split every prediction must be the parent's; otherwise nothing is written.

One output changes meaning, for the better: the state outputs (``hn``/``cn``) of a padded row are its state after its
last valid token; the parent's forward direction also read the padding. Sentiment serving never reads them (the
model is stateless); rows without padding get identical states.

Only bidirectional ``SentimentNet`` exports are accepted (LSTM, GRU or RNN cells, any number of layers and members);
anything else exits 2 with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from service.core.arrays import zero_states
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from training.cards import card_for
from training.data import DataError
from training.evaluate import evaluate_model, recomputed
from training.onnx_graph import GraphBuilder, cpu_session, probe_batches
from training.pipelines import derived_manifest, derived_source, new_model_folder, write_derived_report

RECURRENT = ("LSTM", "GRU", "RNN")
TOLERANCE = 1e-4  # largest logit difference from the parent on the probe batches
OPSET = 17
MASK_FILL = 1e4  # the parent's masked_fill value for padded steps before the max pooling
Array = npt.NDArray[Any]


class StructureError(ValueError):
    """The graph is not a bidirectional SentimentNet export this command can rebuild."""


@dataclass
class Cell:
    """One unidirectional recurrent node of the parent: its op, weights and attributes."""

    op: str
    w: Array
    r: Array
    b: Array | None
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Parent:
    embedding: Array  # (vocab, E), float32 or float16
    cells: list[list[tuple[Cell, Cell]]]  # [member][layer] -> (forward, backward)
    heads: list[tuple[Array, Array]]  # [member] -> (weight (classes, 4H), bias (classes,))
    hidden: int
    state_inputs: list[str]  # h0 (+ c0), in manifest order
    state_outputs: list[str]


def read_parent(model: onnx.ModelProto, m: Manifest) -> Parent:
    """The weights of a bidirectional ``SentimentNet`` export; ``StructureError`` for any other graph."""
    g = model.graph
    nodes = [n for n in g.node if n.op_type in RECURRENT]
    for n in nodes:
        direction = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "direction"), b"forward")
        if direction not in (b"forward", "forward"):
            raise StructureError(f"{n.name or n.op_type} already runs {direction!r} (is this graph already fused?)")
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    if "embed.weight" not in inits:
        raise StructureError("no 'embed.weight' initializer (not a SentimentNet export)")
    k = 0
    heads = []
    while f"heads.{k}.weight" in inits:
        heads.append((inits[f"heads.{k}.weight"].astype(np.float32), inits[f"heads.{k}.bias"].astype(np.float32)))
        k += 1
    if not heads:
        raise StructureError("no 'heads.0.weight' initializer (not a SentimentNet export)")
    layers = m.architecture.layers
    if len(nodes) != 2 * layers * len(heads):
        raise StructureError(
            f"{len(nodes)} recurrent nodes; a bidirectional {layers}-layer net with {len(heads)} member(s) has "
            f"{2 * layers * len(heads)}"
        )
    if any(n.op_type != nodes[0].op_type for n in nodes):
        raise StructureError("the recurrent nodes are not all of one kind")
    cells = [_cell(n, inits) for n in nodes]
    hidden = int(cells[0].attrs["hidden_size"])
    grouped = [
        [(cells[(i * layers + j) * 2], cells[(i * layers + j) * 2 + 1]) for j in range(layers)]
        for i in range(len(heads))
    ]
    if heads[0][0].shape[1] != 4 * hidden:
        raise StructureError(f"head input width {heads[0][0].shape[1]}, expected 4 x hidden = {4 * hidden}")
    return Parent(
        embedding=inits["embed.weight"],
        cells=grouped,
        heads=heads,
        hidden=hidden,
        state_inputs=[s.input for s in m.states],
        state_outputs=[s.output for s in m.states],
    )


def _cell(node: onnx.NodeProto, inits: dict[str, Array]) -> Cell:
    names = list(node.input) + [""] * 4
    if names[1] not in inits or names[2] not in inits:
        raise StructureError(f"{node.name}: weights W and R are not initializers")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if "clip" in attrs or attrs.get("layout", 0) != 0:
        raise StructureError(f"{node.name}: clip or layout attributes are not supported")
    b = inits.get(names[3]) if names[3] else None
    return Cell(node.op_type, inits[names[1]], inits[names[2]], b, attrs)


def build(p: Parent, ir_version: int) -> onnx.ModelProto:
    """The fused graph: same inputs and outputs (names, shapes, dtypes) as the parent, written for the parent's
    ONNX IR version (so the same onnxruntime reads it)."""
    g = GraphBuilder(OPSET)
    const, node = g.const, g.node
    h, members, layers = p.hidden, len(p.cells), len(p.cells[0])
    rows = 2 * layers  # state rows per member
    node("Transpose", ["input_ids"], ["ids_tb"], perm=[1, 0])  # (T, B): the recurrent ops read time-major
    node("Gather", [const("embed.weight", p.embedding), "ids_tb"], ["x_raw"])
    if p.embedding.dtype != np.float32:
        node("Cast", ["x_raw"], ["x0"], to=TensorProto.FLOAT)
    else:
        node("Identity", ["x_raw"], ["x0"])
    node("Cast", ["lengths"], ["seq"], to=TensorProto.INT32)
    splits = const("state_split", np.full(members * layers, 2, dtype=np.int64))
    for s in p.state_inputs:  # member i, layer j -> rows [(i*L + j)*2, +2): [forward, backward]
        node("Split", [s, splits], [f"{s}_{i}_{j}" for i in range(members) for j in range(layers)], axis=0)
    flat = const("shape_tb2h", np.array([0, 0, 2 * h], dtype=np.int64)) if layers > 1 else ""
    last: list[str] = []
    finals: dict[str, list[str]] = {s: [] for s in p.state_outputs}
    for i, member in enumerate(p.cells):
        x = "x0"
        for j, (fwd, bwd) in enumerate(member):
            tag = f"{i}_{j}"
            w = const(f"W_{tag}", np.concatenate([fwd.w, bwd.w]))
            r = const(f"R_{tag}", np.concatenate([fwd.r, bwd.r]))
            b = "" if fwd.b is None or bwd.b is None else const(f"B_{tag}", np.concatenate([fwd.b, bwd.b]))
            attrs = {key: v for key, v in fwd.attrs.items() if key != "direction"}
            if "activations" in attrs:  # one list per direction
                attrs["activations"] = [a.decode() if isinstance(a, bytes) else a for a in attrs["activations"]] * 2
            states = [f"{s}_{tag}" for s in p.state_inputs]
            outs = [f"Y_{tag}"] + [f"{s}_{tag}" for s in p.state_outputs]
            node(fwd.op, [x, w, r, b, "seq", *states], outs, direction="bidirectional", **attrs)
            for s in p.state_outputs:
                finals[s].append(f"{s}_{tag}")
            if j < layers - 1:  # (T, 2, B, H) -> (T, B, 2H): the next layer's input
                node("Transpose", [f"Y_{tag}"], [f"Yt_{tag}"], perm=[0, 2, 1, 3])
                node("Reshape", [f"Yt_{tag}", flat], [f"x_{tag}"])
                x = f"x_{tag}"
            else:
                last.append(f"Y_{tag}")
    for s in p.state_outputs:
        node("Concat", finals[s], [s], axis=0)
    # Every member's last layer at once, batch-major: (T, 2K, B, H) -> (B, T, 2K*H), member-major, forward then
    # backward. Pooling over the middle axis of (B, T, X) is ONNX Runtime's fast reduction; ReduceMax over the
    # leading time axis of a (T, X) layout took 20x as long at batch 16.
    node("Concat", last, ["Y_all"], axis=1)
    node("Transpose", ["Y_all"], ["Y_bt"], perm=[2, 0, 1, 3])
    node("Reshape", ["Y_bt", const("shape_out", np.array([0, 0, 2 * h * members], dtype=np.int64))], ["out"])
    one, zero = const("one", np.array(1, dtype=np.int64)), const("zero", np.array(0, dtype=np.int64))
    ax0, ax1 = const("axis0", np.array([0], dtype=np.int64)), const("axis1", np.array([1], dtype=np.int64))
    node("Shape", ["input_ids"], ["ids_shape"])
    node("Gather", ["ids_shape", one], ["steps"], axis=0)
    node("Range", [zero, "steps", one], ["t"])
    node("Unsqueeze", ["t", ax0], ["t_row"])  # (1, T)
    node("Unsqueeze", ["lengths", ax1], ["len_col"])  # (B, 1)
    node("Less", ["t_row", "len_col"], ["valid"])  # (B, T)
    node("Cast", ["valid"], ["valid_f"], to=TensorProto.FLOAT)
    node("Unsqueeze", ["valid_f", const("axis2", np.array([2], dtype=np.int64))], ["mask"])  # (B, T, 1)
    node("Mul", ["out", "mask"], ["masked"])
    node("ReduceSum", ["masked", ax1], ["total"], keepdims=0)  # (B, 2K*H)
    node("Max", ["lengths", one], ["n"])
    node("Cast", ["n"], ["n_f"], to=TensorProto.FLOAT)
    node("Unsqueeze", ["n_f", ax1], ["n_col"])  # (B, 1)
    node("Div", ["total", "n_col"], ["mean"])
    node("Sub", ["mask", const("one_f", np.array(1.0, dtype=np.float32))], ["mask_m1"])
    node("Mul", ["mask_m1", const("fill", np.array(MASK_FILL, dtype=np.float32))], ["pad_fill"])  # 0 or -1e4
    node("Add", ["masked", "pad_fill"], ["filled"])
    node("ReduceMax", ["filled"], ["peak"], axes=[1], keepdims=0)  # (B, 2K*H)
    node("Concat", ["mean", "peak"], ["pooled"], axis=1)  # (B, 4K*H): all means, then all maxima
    # Head k reads [mean_k, max_k] (2 x 2H); the mean of the K heads is one Gemm over the pooled row.
    d = 2 * h
    w_mean = np.concatenate([w[:, :d].T for w, _ in p.heads]) / members
    w_max = np.concatenate([w[:, d:].T for w, _ in p.heads]) / members
    head_w = np.concatenate([w_mean, w_max]).astype(np.float32)
    head_b = (np.sum([b for _, b in p.heads], axis=0) / members).astype(np.float32)
    node("Gemm", ["pooled", const("head.weight", head_w), const("head.bias", head_b)], ["logits"])

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    state_shape: list[str | int | None] = [rows * members, "batch", h]
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "time"]),
        helper.make_tensor_value_info("lengths", i64, ["batch"]),
        *(helper.make_tensor_value_info(s, f32, state_shape) for s in p.state_inputs),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", f32, ["batch", len(p.heads[0][1])]),
        *(helper.make_tensor_value_info(s, f32, state_shape) for s in p.state_outputs),
    ]
    graph = helper.make_graph(g.nodes, "sentiment_fused", inputs, outputs, g.inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="seqserve-train fuse"
    )
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def probe_gap(parent: Path, fused: onnx.ModelProto, m: Manifest, seed: int = 0) -> dict[str, float]:
    """Largest |logit difference| between the parent and the fused graph on random padded batches, and the
    largest state difference on rows without padding."""
    a, b = cpu_session(parent, threads=1), cpu_session(fused, threads=1)
    assert m.tokenizer is not None
    logit_gap = state_gap = 0.0
    for words in probe_batches(len(m.tokenizer.vocab), seed):
        lengths = words["lengths"]
        feeds = words | zero_states(m.states, {"batch": len(lengths)})
        out_a, out_b = a.run(None, feeds), b.run(None, feeds)
        logit_gap = max(logit_gap, float(np.abs(out_a[0] - out_b[0]).max()))
        full = lengths == words["input_ids"].shape[1]
        for sa, sb in zip(out_a[1:], out_b[1:], strict=True):
            state_gap = max(state_gap, float(np.abs(sa[:, full] - sb[:, full]).max()))
    return {"max_logit_gap": logit_gap, "max_state_gap_unpadded": state_gap}


def fuse(src: Path, data: Path, out: Path, command: str, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """``src`` (models/NAME/N) -> ``out`` (models/NAME/M): the fused graph, checked against the parent.
    Raises ``DataError`` (and leaves no ``out``) when the graph cannot be fused or misses the release rule."""
    m = derived_source(src, out)
    if m.task != "sentiment" or m.architecture.directions != 2:
        raise DataError(
            f"{src}: fuse rebuilds bidirectional sentiment models; this one is a {m.task} with "
            f"{m.architecture.directions} direction(s)"
        )
    derived = m.training.get("quantized_from") or m.training.get("fused_from")
    if derived:
        raise DataError(f"{src}: already derived from {derived}; fuse its trained parent")
    try:
        graph = onnx.load(str(src / MODEL_FILE))
        weights = read_parent(graph, m)
        fused = build(weights, graph.ir_version)
    except StructureError as exc:
        raise DataError(f"{src}: cannot fuse this graph: {exc}") from None
    gaps = probe_gap(src / MODEL_FILE, fused, m)
    if gaps["max_logit_gap"] > tolerance:
        raise DataError(
            f"{src}: the fused graph's logits differ from the parent's by up to {gaps['max_logit_gap']:.2e} "
            f"(tolerance {tolerance:.0e}); not released (nothing written)"
        )
    record: dict[str, Any] = {
        "nodes": {"parent": len(graph.graph.node), "fused": len(fused.graph.node)},  # the parent as read above
        "onnxruntime": ort.__version__,
        "tolerance": tolerance,
        **gaps,
    }
    with new_model_folder(out) as (name, version):
        return _publish(src, m, fused, len(weights.cells), data, out, name, version, command, record)


def _publish(
    src: Path,
    m: Manifest,
    fused: onnx.ModelProto,
    members: int,
    data: Path,
    out: Path,
    name: str,
    version: int,
    command: str,
    record: dict[str, Any],
) -> dict[str, Any]:
    """Writes the fused model and its manifest, holds its dev answers to the parent's, completes ``record``."""
    onnx.save(fused, str(out / MODEL_FILE))
    parent, tolerance, gap = f"{m.name}/{m.version}", record["tolerance"], record["max_logit_gap"]
    notes = (
        f"{members} member(s) averaged over one shared embedding (state rows = members x layers x "
        f"directions); fused graph: one bidirectional {m.architecture.cell.upper()} node per member and layer reads "
        "lengths itself (sequence_lens), so padding never changes a result; the members' heads are one Gemm"
    )
    description = m.description.rstrip(".") + f" (the graph of {parent}, fused: same weights)."
    training = {"fused_from": parent, "parent_command": m.training.get("command"), "fusion": record}
    architecture = m.architecture.model_copy(update={"notes": notes})
    new = derived_manifest(m, out, (name, version), command, description, training, architecture=architecture)
    new.dump(out / MANIFEST_FILE)
    ev_parent, ev = evaluate_model(src, data), evaluate_model(out, data)
    record["evaluation"] = {"parent": ev_parent, "fused": ev}
    if ev["dev_accuracy"] != ev_parent["dev_accuracy"] or abs(ev["dev_nll"] - ev_parent["dev_nll"]) > tolerance:
        raise DataError(
            f"{name}/{version}: dev accuracy {ev['dev_accuracy']:.4f} / NLL {ev['dev_nll']:.6f} against {parent}'s "
            f"{ev_parent['dev_accuracy']:.4f} / {ev_parent['dev_nll']:.6f}: not the same answers; nothing written"
        )
    evaluate = f"seqserve-train evaluate --model {out} --data {data}"
    metrics = recomputed(m.metrics, m.task, ev, evaluate)
    card = m.card or card_for(m.name, m.task, m.version)
    limits = [
        *card.limits,
        f"The weights of {parent} in a leaner graph: its answers equal {parent}'s up to float32 rounding "
        f"(largest logit difference on the probe batches {gap:.1e}); hn/cn of a padded row are "
        "its state after its last valid token (nothing in serving reads them).",
    ]
    new = new.model_copy(
        update={"metrics": metrics, "card": card.model_copy(update={"limits": limits}),
                "training": {**new.training, "fusion": record}}
    )  # fmt: skip
    new.dump(out / MANIFEST_FILE)
    fields = {
        "model": f"{name}/{version}",
        "command": command,
        "parent": str(src),
        "evaluate_command": evaluate,
        "onnx_metrics": ev,
        "parent_onnx_metrics": ev_parent,
        "fusion": record,
    }
    write_derived_report(src, out, fields, "parent_command")
    return record
