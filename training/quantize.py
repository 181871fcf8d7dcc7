"""``seqserve-train quantize``: an int8 copy of a trained recurrent model, without retraining.

ONNX Runtime's dynamic quantization (``onnxruntime.quantization.quantize_dynamic``) stores the weights of every
LSTM, MatMul and Gemm node and the embedding tables (Gather) as int8 (per tensor, 7-bit range: CPUs without VNNI
then never saturate their 16-bit sums) and quantizes the activations per run, so there is nothing to calibrate and
the serving contract (inputs, outputs, states, tokenizer, labels) is unchanged. Why it pays for recurrent serving:
one step of a small batch reads every weight once and does little arithmetic with it, so its cost is the memory
traffic. The 2x256 char LM holds 3.5 MB of float32 weights, more than a core's L2 cache here; as int8 they fit, and
a batch-1 step costs about a quarter (``make bench``'s runtime table measures it).

The price: activations are quantized with one scale per run, computed over the whole batch, so a row's outputs
depend slightly on which rows share its run (the float32 graph's do not). ``quantize`` measures that on a probe
batch and records it (``training.quantization.batch_dependence``). Because serving batches requests together,
the copy is published under its own name (``models/charlm-int8/1``), never as a newer version of the float32
model: a client chooses the faster, batch-dependent model by name, and nobody's default changes under them.

``--method static`` (char LMs with LSTM cells; ``training/int8_lstm.py``) removes that price: it rebuilds the graph
so that every int8 product reads a tanh-bounded hidden state with one fixed scale, and the embedding and first input
projection become one float32 table. Nothing is scaled per run, so a row's outputs are bit-identical alone or
batched, step by step or as one sequence (``batch_dependence`` and ``sequence_dependence`` record 0). Its copy is
still published under its own name: its answers are within ``--tolerance`` of the parent's, not equal to them.

Release rule, fixed before any quantized model was evaluated: the copy's headline metric, recomputed from
its ONNX by ``evaluate`` on the same split, may be worse than its parent's by at most ``--tolerance`` (0.005:
nats/char for the char LM, accuracy for sentiment); otherwise nothing is written and the command fails. Other
metrics are recomputed the same way and reported; the parent is left untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from service.core.arrays import softmax, zero_states
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, Metric, ModelCard
from training.cards import INT8_LIMITS, card_for
from training.data import DataError
from training.evaluate import RECOMPUTED, evaluate_model
from training.int8_lstm import StructureError, build, check_structure
from training.onnx_graph import cpu_session
from training.pipelines import (
    derived_manifest,
    derived_source,
    name_version,
    new_model_folder,
    write_derived_report,
)

OPS = ["LSTM", "MatMul", "Gemm", "Gather"]
QUANTIZED_OPS = {"DynamicQuantizeLSTM", "MatMulInteger", "DynamicQuantizeMatMul", "DequantizeLinear", "QuantizeLinear"}
METHODS = {
    "dynamic": "onnxruntime dynamic quantization: int8 weights (per tensor, reduce_range), activations per run",
    "static": "int8 hidden-state products with a fixed activation scale (h in [-1, 1]), int8 weights per column "
    "(7-bit), int32 sums; embedding and first input projection folded into one float32 table; float32 cell and head",
}
TOLERANCE = 0.005
# The copy reports the metrics ``evaluate`` recomputes (``training.evaluate.RECOMPUTED``); the first that the parent
# reports decides the release. (A parent's metric that ``evaluate`` cannot recompute from ONNX, such as sentiment's
# held-out accuracy measured in PyTorch during training, is not carried over.)


def quantized_nodes(path: Path) -> dict[str, int]:
    """How many nodes of each integer op type the graph at ``path`` holds, subgraphs included."""
    counts: dict[str, int] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type in QUANTIZED_OPS:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for a in node.attribute:  # a Scan's or Loop's body
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(onnx.load(str(path), load_external_data=False).graph)
    return counts


def batch_dependence(m: Manifest, model: Path, rows: int = 16, steps: int = 24) -> dict[str, float]:
    """Per output, the largest change when ``rows`` random inputs run as one batch instead of one by one: what
    batching does to a row's answer (0 or float rounding for a float32 graph)."""
    sess = cpu_session(model)
    rng = np.random.default_rng(0)
    vocab = len(m.tokenizer.vocab) if m.tokenizer is not None else 2
    ids = rng.integers(2, vocab, (rows, steps)).astype(np.int64)
    lengths = rng.integers(steps // 2, steps + 1, rows).astype(np.int64)

    def feeds(a: int, b: int) -> dict[str, Any]:
        f: dict[str, Any] = {"input_ids": ids[a:b]}
        if m.has_input("lengths"):
            f["lengths"] = lengths[a:b]
        return f | zero_states(m.states, {"batch": b - a})

    names = [o.name for o in sess.get_outputs()]
    batched = sess.run(names, feeds(0, rows))
    alone = [sess.run(names, feeds(i, i + 1)) for i in range(rows)]
    out = {}
    for k, name in enumerate(names):
        axis = 1 if any(s.output == name for s in m.states) else 0  # states: batch on axis 1
        joined = np.concatenate([a[k] for a in alone], axis=axis)
        out[name] = float(np.abs(joined - batched[k]).max())
        if name == "logits":  # what a client reads: the probabilities serving returns
            out["probabilities"] = float(np.abs(softmax(joined) - softmax(batched[k])).max())
    return out


def sequence_dependence(m: Manifest, model: Path, rows: int = 4, steps: int = 24) -> dict[str, float]:
    """Per output of a char LM, the largest change when ``steps`` characters run one at a time (state carried, as a
    typing session feeds them) instead of as one sequence: 0 or float rounding for a float32 graph."""
    sess = cpu_session(model)
    vocab = len(m.tokenizer.vocab) if m.tokenizer is not None else 2
    ids = np.random.default_rng(1).integers(0, vocab, (rows, steps)).astype(np.int64)
    names = [o.name for o in sess.get_outputs()]
    state_of = {s.output: s.input for s in m.states}
    state = zero_states(m.states, {"batch": rows})
    whole = dict(zip(names, sess.run(names, {"input_ids": ids, **state}), strict=True))
    logits = []
    for t in range(steps):
        step = dict(zip(names, sess.run(names, {"input_ids": ids[:, t : t + 1], **state}), strict=True))
        logits.append(step["logits"])
        state = {state_of[n]: step[n] for n in state_of}
    out = {"logits": float(np.abs(np.concatenate(logits, axis=1) - whole["logits"]).max())}
    return out | {n: float(np.abs(state[state_of[n]] - whole[n]).max()) for n in state_of}


def quantize(
    src: Path, data: Path, out: Path, command: str, tolerance: float = TOLERANCE, method: str = "dynamic"
) -> dict[str, Any]:
    """``src`` (models/NAME/N) -> ``out`` (models/NAME-int8/1) with int8 weights; returns the quantization record.
    Raises ``DataError`` (and leaves no ``out``) when the model cannot be quantized or misses the release rule."""
    if method not in METHODS:
        raise DataError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    m = derived_source(src, out)
    if name_version(out)[0] == m.name:
        why = (
            "its outputs depend on batching"
            if method == "dynamic"
            else "its answers are close to the float32 model's, not equal"
        )
        raise DataError(
            f"{out}: publish the int8 copy under its own name (e.g. models/{m.name}-int8/1), not as a version of "
            f"{m.name}: {why}, so it must not become {m.name}'s default"
        )
    wanted = RECOMPUTED.get(m.task)
    if wanted is None:
        raise DataError(
            f"{src}: quantize supports {', '.join(RECOMPUTED)} models (LSTM graphs); this one is {m.task!r}"
        )
    if m.training.get("quantized_from"):
        raise DataError(f"{src}: already quantized (from {m.training['quantized_from']}); quantize its parent")
    if method == "static" and (m.task != "charlm" or m.architecture.cell != "lstm" or m.architecture.directions != 1):
        raise DataError(
            f"{src}: --method static rebuilds unidirectional LSTM char LMs; this one is a {m.task} with "
            f"{m.architecture.directions} x {m.architecture.cell} (use --method dynamic)"
        )
    headline = next((x for x in m.metrics if x.name in wanted), None)
    if headline is None:
        raise DataError(f"{src}: its manifest reports none of {', '.join(wanted)}; nothing to hold the copy to")
    with new_model_folder(out) as (name, version):
        return _quantize(src, m, data, out, name, version, command, tolerance, wanted, headline, method)


def _quantize(
    src: Path,
    m: Manifest,
    data: Path,
    out: Path,
    name: str,
    version: int,
    command: str,
    tolerance: float,
    wanted: dict[str, tuple[str, bool]],
    headline: Metric,
    method: str,
) -> dict[str, Any]:
    structure_gap = _write_int8(src / MODEL_FILE, out / MODEL_FILE, method)
    nodes = quantized_nodes(out / MODEL_FILE)
    if not nodes:
        raise DataError(f"{src}: the graph has no {', '.join(OPS)} node to quantize")
    parent = f"{m.name}/{m.version}"
    record: dict[str, Any] = {
        "method": METHODS[method],
        "ops": OPS if method == "dynamic" else ["LSTM (rebuilt as Scan + MatMulInteger)", "Gather"],
        "nodes": nodes,
        "onnxruntime": ort.__version__,
        "bytes": {"parent": (src / MODEL_FILE).stat().st_size, "quantized": (out / MODEL_FILE).stat().st_size},
        "tolerance": tolerance,
        "batch_dependence": batch_dependence(m, out / MODEL_FILE),
        "batch_dependence_parent": batch_dependence(m, src / MODEL_FILE),
    }
    if m.task == "charlm":  # a typing session feeds characters one by one; a prompt arrives whole
        record["sequence_dependence"] = sequence_dependence(m, out / MODEL_FILE)
        record["sequence_dependence_parent"] = sequence_dependence(m, src / MODEL_FILE)
    if structure_gap is not None:
        record["structure_gap"] = structure_gap  # the float32 rebuild against the parent (check_structure)
    description = m.description.rstrip(".") + f"; int8 weights ({method} quantization of {parent})."
    training = {"quantized_from": parent, "parent_command": m.training.get("command"), "quantization": record}
    new = derived_manifest(m, out, (name, version), command, description, training, metrics=[])
    new.dump(out / MANIFEST_FILE)
    ev_parent, ev = evaluate_model(src, data), evaluate_model(out, data)
    key = wanted[headline.name][0]
    worse = (ev_parent[key] - ev[key]) if headline.higher_is_better else (ev[key] - ev_parent[key])
    record["headline"] = {"metric": key, "parent": ev_parent[key], "quantized": ev[key], "worse_by": worse}
    if worse > tolerance:
        raise DataError(
            f"{name}/{version}: {key} {ev[key]:.4f} against {parent}'s {ev_parent[key]:.4f} is worse by {worse:.4f}, "
            f"more than --tolerance {tolerance}; not released (nothing written)"
        )
    evaluate = f"seqserve-train evaluate --model {out} --data {data}"
    reported = {x.name: x for x in m.metrics}
    metrics = [
        (reported.get(metric) or headline.model_copy(update={"name": metric, "target": None})).model_copy(
            update={"value": ev[key], "higher_is_better": higher, "command": evaluate}
        )
        for metric, (key, higher) in wanted.items()
    ]
    new_training = {**new.training, "quantization": record}
    card = _card(m, tolerance, method)
    new.model_copy(update={"metrics": metrics, "card": card, "training": new_training}).dump(out / MANIFEST_FILE)
    _report(src, out, f"{name}/{version}", command, evaluate, ev, ev_parent, record)
    return record


def _card(m: Manifest, tolerance: float, method: str) -> ModelCard:
    """The parent's card plus what quantization changes."""
    card = m.card or card_for(m.name, m.task, m.version)
    parent = f"{m.name}/{m.version}"
    limits = [
        *(INT8_LIMITS.get(limit, limit) for limit in card.limits),
        f"int8 weights quantized from {parent} (same training, same contract): its metrics are within "
        f"{tolerance} of the parent's, not identical.",
    ]
    if method == "dynamic":
        limits += [
            "Activations are quantized per ONNX Runtime run, over the whole batch and all its time steps: a request's "
            "outputs move slightly with the requests that share its run and with how its text is split into runs "
            "(see training.quantization.batch_dependence and sequence_dependence). Use "
            f"{m.name} for batch-invariant results.",
            f"ONNX Runtime's CUDA provider has no quantized LSTM kernel: on a GPU these nodes run on the CPU; use "
            f"{m.name} there.",
        ]
    else:
        limits += [
            "Batch-invariant: a request's outputs are bit-identical alone or batched, fed one character at a time or "
            "as one sequence (training.quantization.batch_dependence and sequence_dependence are 0).",
            "A prompt is read by a Scan over time (small nodes per character): against the float32 LSTM's native "
            "kernel it gains nothing where the float32 weights fit the CPU's cache and several times where they do "
            f"not (make bench's runtime table); built for CPU serving (not measured on a GPU: use {m.name} there).",
        ]
    return card.model_copy(update={"limits": limits})


def _write_int8(src: Path, dst: Path, method: str) -> float | None:
    """Writes the int8 graph of ``src`` to ``dst``; for ``static`` returns the float32 rebuild's gap to the parent."""
    if method == "static":
        parent = onnx.load(str(src))
        try:
            gap = check_structure(parent)
            onnx.save(build(parent), str(dst))
        except StructureError as exc:
            raise DataError(f"{src}: --method static cannot rebuild this graph: {exc}") from None
        return gap
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs advice to pre-process the graph, meant for CNNs
    try:
        quantize_dynamic(
            src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=OPS, reduce_range=True,
        )  # fmt: skip
    finally:
        root.setLevel(level)
    return None


def _report(
    src: Path,
    out: Path,
    model: str,
    command: str,
    evaluate: str,
    ev: dict[str, float],
    ev_parent: dict[str, float],
    record: dict[str, Any],
) -> None:
    """metrics.json: the parent's training report (its curve copied beside it) plus the quantization and both
    models' ONNX metrics."""
    fields = {
        "model": model,
        "command": command,
        "parent": str(src),
        "evaluate_command": evaluate,
        "onnx_metrics": ev,
        "parent_onnx_metrics": ev_parent,
        "quantization": record,
    }
    write_derived_report(src, out, fields, "parent_command")
