"""``seqserve-train ensemble``: several trained sentiment models as one ONNX graph answering with the mean of their
probabilities, the combination ``seqserve-train heldout`` scores.

    seqserve-train ensemble --model runs/a --model runs/b [...] --data ../shared/data/sst2 --out models/NAME/N \
        [--half]

The members must be interchangeable behind one contract: sentiment models with the same tokenizer rules (kind,
special tokens, case, length), the same labels and states of the same kind and width, trained holding out the same
rows (so the held-out accuracy that picks models can score the combination; ``training/heldout.py``). Their
vocabularies may differ (a model with GloVe words added beside one trained from scratch): the graph's vocabulary is
the first member's followed by every later member's words it lacks, in order, and a member whose own ids differ
reads them through a constant map (``Gather``: the graph's id -> the member's id for that word, or the member's
``<unk>``), so each member sees exactly the ids its own tokenizer would give. The graph runs every member's own
graph side by side on the same ``input_ids`` (mapped where needed) and ``lengths``: each member's nodes and weights
keep their names behind a ``mK.`` prefix; the state inputs are split by rows into the members' states and their
state outputs concatenated back (state rows = the members' rows, in ``--model`` order); ``logits`` = log of the mean
of the members' softmax probabilities, so serving's softmax returns exactly that mean. Inputs, outputs, tokenizer
and labels keep their names and meaning: a client sees a sentiment model like any other, only slower (it runs every
member).

``--half`` stores every large float32 weight as float16 followed by a ``Cast`` back to float32 (ONNX Runtime folds
the casts when the session loads, so it computes in float32): half the bytes on disk, answers within float16
rounding of the members' (the probe records by how much).

Release rule, checked before anything is written: on probe batches (random words and lengths, batch 1 to 64) the
graph's logits equal the log of the members' mean probability within ``TOLERANCE`` (1e-4; with ``--half``
``HALF_TOLERANCE``, 1e-2) and its states equal the members' states within ``TOLERANCE`` (with ``--half`` the state
difference is only recorded: float16 weights move the unbounded cell states more, and sentiment serving never reads
them). The held-out accuracy and the dev metrics are then recomputed from the written graph and recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from service.core.arrays import softmax, zero_states
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, StateSpec, TensorSpec, Tokenizer
from training.cards import CARDS, card_for
from training.data import DataError
from training.evaluate import evaluate_model, open_model, recomputed, sentiment_logits
from training.heldout import heldout_rows, recorded
from training.onnx_graph import HALF_TOLERANCE, cpu_session, halved, probe_batches
from training.pipelines import derived_manifest, derived_source, new_model_folder

TOLERANCE = 1e-4  # largest logit difference from the members' mean on the probe batches
SAME_WEIGHTS = 1e-3  # two members closer than this on every probe logit hold the same weights (a fused copy: 2e-6)
SHARED = ("input_ids", "lengths")  # inputs every member reads as they are
FLOOR = 1e-30  # the mean probability is clipped here before the log, so a certain answer never gives -inf
Array = npt.NDArray[Any]


def _check_members(paths: list[Path], manifests: list[Manifest]) -> None:
    """Refuses members that could not stand behind one contract, with the reason."""
    first = manifests[0]
    for path, m in zip(paths, manifests, strict=True):
        if m.task != "sentiment":
            raise DataError(f"{path} is a {m.task!r} model; ensemble combines sentiment models")
        if m.tokenizer is None or first.tokenizer is None:
            raise DataError(f"{path}: no tokenizer in its manifest; ensemble combines sentiment models that have one")
        rules, first_rules = (t.model_copy(update={"vocab": []}) for t in (m.tokenizer, first.tokenizer))
        if rules != first_rules:
            raise DataError(
                f"{path}: its tokenizer's rules differ from {paths[0]}'s ({_differences(rules, first_rules)}); "
                "members must split and encode text alike (their vocabularies may differ)"
            )
        if m.labels != first.labels:
            raise DataError(f"{path}: labels {m.labels} differ from {paths[0]}'s {first.labels}")
        kinds = [(s.name, s.input, s.output, s.dtype, s.shape[1:]) for s in m.states]
        if kinds != [(s.name, s.input, s.output, s.dtype, s.shape[1:]) for s in first.states]:
            raise DataError(f"{path}: its states differ in kind or width from {paths[0]}'s")
        if [i.name for i in m.inputs] != [i.name for i in first.inputs] or m.outputs[0].name != "logits":
            raise DataError(f"{path}: its inputs or outputs differ from {paths[0]}'s")
        derived = m.training.get("ensemble_of")
        if derived:
            raise DataError(f"{path}: already an ensemble (of {', '.join(derived)}); combine its members instead")


def _differences(a: Tokenizer, b: Tokenizer) -> str:
    fields = [k for k in type(a).model_fields if getattr(a, k) != getattr(b, k)]
    return ", ".join(f"{k} {getattr(a, k)!r} against {getattr(b, k)!r}" for k in fields)


def joined_vocab(manifests: list[Manifest]) -> list[str]:
    """The graph's vocabulary: the first member's, then each later member's words it lacks, in their order."""
    vocab: list[str] = []
    seen: set[str] = set()
    for m in manifests:
        assert m.tokenizer is not None  # checked by _check_members
        for word in m.tokenizer.vocab:
            if word not in seen:
                seen.add(word)
                vocab.append(word)
    return vocab


def id_maps(manifests: list[Manifest], vocab: list[str]) -> list[Array | None]:
    """Per member: the graph's id -> the member's id for the same word (its ``<unk>`` id for a word it lacks), or
    ``None`` where the member's vocabulary is the graph's (it reads ``input_ids`` as they are)."""
    maps: list[Array | None] = []
    for m in manifests:
        assert m.tokenizer is not None
        own = m.tokenizer.vocab
        if own == vocab:
            maps.append(None)
            continue
        index = {w: i for i, w in enumerate(own)}
        unk = index.get(m.tokenizer.unk_token) if m.tokenizer.unk_token is not None else None
        lacks = [w for w in vocab if w not in index]
        if unk is None and lacks:
            raise DataError(
                f"{m.name}/{m.version} has no unknown-word token, so it cannot read the other members' words it "
                f"lacks ({len(lacks)}, e.g. {lacks[0]!r}); give members with one vocabulary, or with <unk>"
            )
        maps.append(np.array([index.get(w, unk) for w in vocab], dtype=np.int64))
    return maps


def _prefixed(
    graph: onnx.GraphProto, prefix: str, shared: tuple[str, ...] = SHARED
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The member's nodes and initializers with every name but ``shared`` (and empty optional inputs) prefixed."""

    def rename(name: str) -> str:
        return name if name in shared or not name else prefix + name

    nodes = []
    for n in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise DataError(f"node {n.name or n.op_type} has a subgraph; ensemble combines graphs without them")
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        copy.name = rename(n.name)
        copy.input[:] = [rename(x) for x in n.input]
        copy.output[:] = [rename(x) for x in n.output]
        nodes.append(copy)
    inits = []
    for t in graph.initializer:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(t)
        tensor.name = rename(t.name)
        inits.append(tensor)
    return nodes, inits


def _opsets(models: list[onnx.ModelProto]) -> list[onnx.OperatorSetIdProto]:
    """Every operator set the members import (an int8 member's com.microsoft ops too); a domain imported at two
    versions is refused, since a member's nodes mean what their own version says."""
    versions: dict[str, int] = {}
    for m in models:
        for o in m.opset_import:
            domain = "" if o.domain == "ai.onnx" else o.domain
            if versions.setdefault(domain, o.version) != o.version:
                raise DataError(
                    f"the members import operator set {domain or 'ai.onnx'!r} at versions {versions[domain]} and "
                    f"{o.version}; export them with one opset to combine them"
                )
    return [helper.make_opsetid(domain, version) for domain, version in sorted(versions.items())]


def build(
    models: list[onnx.ModelProto], manifests: list[Manifest], maps: list[Array | None], half: bool = False
) -> onnx.ModelProto:
    """The combined graph (see the module's docstring); ``maps``: each member's ``id_maps`` entry."""
    first = manifests[0]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    for k, (model, mapping) in enumerate(zip(models, maps, strict=True)):
        if mapping is None:
            n, i = _prefixed(model.graph, f"m{k}.")
        else:  # the member reads its own ids: mK.input_ids = map[input_ids]
            n, i = _prefixed(model.graph, f"m{k}.", tuple(x for x in SHARED if x != "input_ids"))
            inits.append(numpy_helper.from_array(mapping, f"m{k}.id_map"))
            nodes.append(helper.make_node("Gather", [f"m{k}.id_map", "input_ids"], [f"m{k}.input_ids"], axis=0))
        nodes += n
        inits += i
    if half:
        nodes, inits = halved(nodes, inits)
    rows = [[int(s.shape[0]) for s in m.states] for m in manifests]
    for j, s in enumerate(first.states):  # member k's rows of the combined state, in --model order
        sizes = numpy_helper.from_array(np.array([r[j] for r in rows], dtype=np.int64), f"{s.input}.rows")
        inits.append(sizes)
        outs = [f"m{k}.{s.input}" for k in range(len(models))]
        nodes.insert(0, helper.make_node("Split", [s.input, sizes.name], outs, axis=0))
        nodes.append(helper.make_node("Concat", [f"m{k}.{s.output}" for k in range(len(models))], [s.output], axis=0))
    for k in range(len(models)):
        nodes.append(helper.make_node("Softmax", [f"m{k}.logits"], [f"m{k}.probs"], axis=-1))
    nodes.append(helper.make_node("Sum", [f"m{k}.probs" for k in range(len(models))], ["probs_sum"]))
    inits.append(numpy_helper.from_array(np.array(1.0 / len(models), dtype=np.float32), "inverse_members"))
    inits.append(numpy_helper.from_array(np.array(FLOOR, dtype=np.float32), "floor"))
    nodes.append(helper.make_node("Mul", ["probs_sum", "inverse_members"], ["probs_mean"]))
    nodes.append(helper.make_node("Max", ["probs_mean", "floor"], ["probs_floored"]))
    nodes.append(helper.make_node("Log", ["probs_floored"], ["logits"]))

    total = [sum(r[j] for r in rows) for j in range(len(first.states))]
    graph_in = {i.name: i for i in models[0].graph.input}
    graph_out = {o.name: o for o in models[0].graph.output}
    state_in = {s.input: j for j, s in enumerate(first.states)}
    state_out = {s.output: j for j, s in enumerate(first.states)}

    def resized(info: onnx.ValueInfoProto, rows_: int) -> onnx.ValueInfoProto:
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(info)
        copy.type.tensor_type.shape.dim[0].dim_value = rows_
        return copy

    inputs = [resized(v, total[state_in[n]]) if n in state_in else v for n, v in graph_in.items()]
    outputs = [resized(v, total[state_out[n]]) if n in state_out else v for n, v in graph_out.items()]
    graph = helper.make_graph(nodes, "sentiment_ensemble", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=_opsets(models), producer_name="seqserve-train ensemble")
    model.ir_version = min(m.ir_version for m in models)
    onnx.checker.check_model(model)
    return model


def probe_gap(
    paths: list[Path],
    combined: onnx.ModelProto,
    manifests: list[Manifest],
    vocab: list[str],
    maps: list[Array | None],
    seed: int = 0,
) -> dict[str, Any]:
    """Largest |logit difference| between the combined graph and log(mean of the members' probabilities) on
    random padded batches, and the largest difference between its states and the members' concatenated states;
    also the two members whose logits are closest (``closest_members``) and their largest difference."""
    members = [cpu_session(p / MODEL_FILE, threads=1) for p in paths]
    whole = cpu_session(combined, threads=1)
    first = manifests[0]
    logit_gap = state_gap = 0.0
    pairs = {(i, j): 0.0 for i in range(len(paths)) for j in range(i + 1, len(paths))}
    for feeds in probe_batches(len(vocab), seed):
        batch = len(feeds["lengths"])
        outs = [
            s.run(None, feeds | own_ids(feeds, mapping) | zero_states(m.states, {"batch": batch}))
            for s, m, mapping in zip(members, manifests, maps, strict=True)
        ]
        for i, j in pairs:
            pairs[i, j] = max(pairs[i, j], float(np.abs(outs[i][0] - outs[j][0]).max()))
        got = whole.run(None, feeds | zero_states(_states(manifests), {"batch": batch}))
        want = np.log(np.maximum(np.mean([softmax(o[0]) for o in outs], axis=0), FLOOR))
        logit_gap = max(logit_gap, float(np.abs(got[0] - want).max()))
        for j in range(len(first.states)):
            joined = np.concatenate([o[1 + j] for o in outs], axis=0)
            state_gap = max(state_gap, float(np.abs(got[1 + j] - joined).max()))
    closest = min(pairs, key=pairs.__getitem__)
    return {"max_logit_gap": logit_gap, "max_state_gap": state_gap, "min_member_gap": pairs[closest],
            "closest_members": closest}  # fmt: skip


def own_ids(feeds: dict[str, Any], mapping: Array | None) -> dict[str, Any]:
    """``feeds``' ``input_ids`` as a member with ``mapping`` (``id_maps``) reads them (the padding stays padding)."""
    return {} if mapping is None else {"input_ids": mapping[feeds["input_ids"]]}


def _states(manifests: list[Manifest]) -> list[StateSpec]:
    """The combined graph's states: each of the first member's, with the members' rows added up."""
    return [
        s.model_copy(update={"shape": [sum(int(m.states[j].shape[0]) for m in manifests), *s.shape[1:]]})
        for j, s in enumerate(manifests[0].states)
    ]


def _resized(specs: list[TensorSpec], states: list[StateSpec], attr: str) -> list[TensorSpec]:
    shapes = {getattr(s, attr): s.shape for s in states}
    return [x.model_copy(update={"shape": shapes[x.name]}) if x.name in shapes else x for x in specs]


def ensemble(paths: list[Path], data: Path, out: Path, command: str, half: bool = False) -> dict[str, Any]:
    """``paths`` (two or more trained sentiment models) -> ``out`` (models/NAME/N): the combined graph, checked
    against its members. Raises ``DataError`` (and leaves no ``out``) when they cannot be combined or the graph
    misses the release rule."""
    if len(paths) < 2:
        raise DataError("ensemble needs two or more --model")
    manifests = [derived_source(p, out) for p in paths]
    _check_members(paths, manifests)
    split, held = heldout_rows(paths, manifests, data)  # refuses members that held out different rows
    vocab = joined_vocab(manifests)
    maps = id_maps(manifests, vocab)
    combined = build([onnx.load(str(p / MODEL_FILE)) for p in paths], manifests, maps, half)
    gaps = probe_gap(paths, combined, manifests, vocab, maps)
    a, b = gaps.pop("closest_members")
    if gaps["min_member_gap"] < SAME_WEIGHTS:  # one graph twice, or a model beside its own fused graph
        raise DataError(
            f"--model {paths[int(a)]} and --model {paths[int(b)]} answer alike (largest logit difference "
            f"{gaps['min_member_gap']:.1e} on probe batches): the same weights would only repeat one member's answers; "
            "give different models"
        )
    tolerance = HALF_TOLERANCE if half else TOLERANCE
    # float16 weights move the cell states (unbounded) more than the logits; sentiment serving never reads them
    state_tolerance = float("inf") if half else TOLERANCE
    if gaps["max_logit_gap"] > tolerance or gaps["max_state_gap"] > state_tolerance:
        raise DataError(
            f"the combined graph differs from its members' mean by up to {gaps['max_logit_gap']:.2e} (logits) and "
            f"{gaps['max_state_gap']:.2e} (states), tolerance {tolerance:.0e}; not released (nothing written)"
        )
    record: dict[str, Any] = {"members": [str(p) for p in paths], "half": half, "tolerance": tolerance, **gaps}
    with new_model_folder(out) as (name, version):
        onnx.save(combined, str(out / MODEL_FILE))
        return _publish(paths, manifests, vocab, held, split, data, out, (name, version), command, record)


def _publish(
    paths: list[Path],
    manifests: list[Manifest],
    vocab: list[str],
    held: list[tuple[str, int]],
    split: tuple[str, float, int],
    data: Path,
    out: Path,
    version: tuple[str, int],
    command: str,
    record: dict[str, Any],
) -> dict[str, Any]:
    first = manifests[0]
    states = _states(manifests)
    architecture = first.architecture.model_copy(
        update={
            "parameters": sum(m.architecture.parameters or 0 for m in manifests),
            "notes": f"{len(paths)} trained models side by side, mean of their probabilities (state rows = the "
            f"members' rows in --model order: {' + '.join(str(m.states[0].shape[0]) for m in manifests)})"
            + ("; weights stored as float16, computed in float32" if record["half"] else ""),
        }
    )
    description = f"SST-2 binary sentiment: the mean of {len(paths)} trained models' probabilities, one graph."
    training = {
        "ensemble_of": record["members"],
        "member_sha256": [m.sha256 for m in manifests],  # their model.onnx files, wherever they are kept
        # each member's own training command, then the command that derived it (fuse, quantize), if any
        "member_commands": [[c for c in (m.training.get("parent_command"), m.training.get("command")) if c]
                            for m in manifests],
        "heldout": split[0], "heldout_fraction": split[1], "config": {"seed": split[2]},
    }  # fmt: skip
    assert first.tokenizer is not None  # checked by _check_members
    tokenizer = first.tokenizer.model_copy(update={"vocab": vocab})
    new = derived_manifest(
        first, out, version, command, description, training, architecture=architecture, states=states,
        inputs=_resized(first.inputs, states, "input"), outputs=_resized(first.outputs, states, "output"),
        tokenizer=tokenizer,
    )  # fmt: skip
    new.dump(out / MANIFEST_FILE)
    ev = evaluate_model(out, data)
    y = np.array([label for _, label in held])
    held_acc = float((sentiment_logits(*open_model(out), [t for t, _ in held]).argmax(1) == y).mean())
    record["evaluation"] = {"heldout_accuracy": held_acc, **ev}
    record["members_heldout"] = {n: recorded(x) for n, x in zip(record["members"], manifests, strict=True)}
    evaluate = f"seqserve-train evaluate --model {out} --data {data}"
    heldout_metric = {
        "value": held_acc,
        "command": f"seqserve-train heldout --model {out} --data {data}",
        "split": f"{len(held)} rows held out from train.tsv by every member (this graph's answers)",
    }
    metrics = [
        x.model_copy(update=heldout_metric) if x.name == "heldout_accuracy" else x
        for x in recomputed(first.metrics, "sentiment", ev, evaluate)
    ]  # fmt: skip
    known = version[0] in CARDS or f"{version[0]}/{version[1]}" in CARDS  # else the members' card, if any
    card = card_for(version[0], "sentiment", version[1], data) if known or first.card is None else first.card
    limits = [
        *card.limits,
        f"Runs {len(paths)} models per request: about {len(paths)}x the compute and latency of one of them.",
    ]
    # The record is the ensemble's own: the first member's run details (steps, checkpoint, temperature) stay in
    # that member's manifest, named in ensemble_of.
    training = {"command": command, **training, "net": first.training.get("net"), "ensemble": record}
    new = new.model_copy(
        update={"metrics": metrics, "card": card.model_copy(update={"limits": limits}), "training": training}
    )
    new.dump(out / MANIFEST_FILE)
    # Its own report, as its manifest: the first member's (its evaluate command, parameters, temperature, training
    # run and curve) described that member, not the ensemble, which is not trained.
    report = {
        "task": "sentiment", "model": f"{version[0]}/{version[1]}", "command": command, "evaluate_command": evaluate,
        "onnx_metrics": ev, "parameters": new.architecture.parameters, "members": record["members"],
        "member_commands": training["member_commands"], "ensemble": record,
    }  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return record
