"""``python -m bench.layers``: server CPU per request layer by layer, from servers that replay the layers below a
cut. The summary's arithmetic on fixed rows; each cut's server answering KServe steps as seqserve does (the same
outputs, dtypes and shapes, later steps of a sequence too); one short real run of every server. No timing is
asserted: speed lives in the benchmark."""

from __future__ import annotations

import contextlib
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench import layers, lean
from bench.floor import record
from bench.launch import serve
from bench.perf import canned_requests
from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc


def _row(server: str, rnd: int, cpu_ms_per_1k: float, throughput: float) -> dict[str, object]:
    return {"server": server, "round": rnd, "workload": "w", "concurrency": 4,
            "server_cpu_s_per_1k": cpu_ms_per_1k / 1000, "throughput": throughput}  # fmt: skip


def test_summary_takes_medians_and_each_layers_difference() -> None:
    rows = [
        _row("seqserve", 0, 500, 1000),
        _row("floor", 0, 100, 5000),
        _row("edge", 0, 130, 4000),
        _row("floor", 1, 120, 4800),
        _row("edge", 1, 150, 3800),
        _row("seqserve", 1, 540, 900),
    ]  # (the core, servicer and batcher servers missing: skipped, and the next one is set against the last present)
    (s,) = layers.summary(rows)
    assert (s["workload"], s["concurrency"]) == ("w", 4)
    by = {layer["server"]: layer for layer in s["layers"]}
    assert [layer["server"] for layer in s["layers"]] == ["floor", "edge", "seqserve"]  # ORDER, not the rows' order
    assert by["floor"]["cpu_us"] == pytest.approx(110) and by["floor"]["adds_us"] is None
    assert by["edge"]["cpu_us"] == pytest.approx(140) and by["edge"]["adds_us"] == pytest.approx(30)
    assert by["seqserve"]["adds_us"] == pytest.approx(520 - 140)
    assert by["seqserve"]["throughput"] == 950
    assert by["seqserve"]["xfloor"] == pytest.approx((1000 / 5000 + 900 / 4800) / 2)  # within each round
    assert by["floor"]["xfloor"] == pytest.approx(1.0)


def test_the_lean_reference_is_set_against_the_floor_not_the_layer_before() -> None:
    rows = [_row("floor", 0, 100, 5000), _row("seqserve", 0, 500, 1000), _row("lean", 0, 160, 3000),
            _row("floor", 1, 120, 4000), _row("seqserve", 1, 540, 900), _row("lean", 1, 180, 3000)]  # fmt: skip
    (s,) = layers.summary(rows)
    assert [layer["server"] for layer in s["layers"]] == ["floor", "seqserve", "lean"]  # after the layers
    lean = s["layers"][-1]
    assert lean["cpu_us"] == pytest.approx(170) and lean["adds_us"] == pytest.approx(170 - 110)
    assert lean["xfloor"] == pytest.approx((3000 / 5000 + 3000 / 4000) / 2)
    (no_floor,) = layers.summary([_row("lean", 0, 160, 3000)])
    assert no_floor["layers"][0]["adds_us"] is None and no_floor["layers"][0]["xfloor"] is None


def test_an_unknown_cut_and_an_unpinned_workload_are_refused(tiny_models: Path) -> None:
    with pytest.raises(ValueError, match="cut must be one of edge, servicer, core, batcher"):
        layers.install("ort")
    with pytest.raises(ValueError, match="workloads charlm-stream name no model version"):
        layers.run(tiny_models, ["charlm1-stream", "charlm-stream"], [4])


def _steps(target: str, n: int = 3) -> list[pb.ModelInferResponse]:
    """``n`` one-character steps of one sequence (the first starts it), as perf_analyzer sends them."""
    out = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for i in range(n):
            r = pb.ModelInferRequest(model_name="charlm", id=f"r{i}")
            r.parameters["sequence_id"].int64_param = 7
            r.parameters["sequence_start"].bool_param = i == 0
            r.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"ab"[i % 2 :][:1])
            out.append(stub.ModelInfer(r))
    return out


def test_every_cut_answers_as_seqserve_does(tiny_models: Path, tmp_path: Path) -> None:
    with serve(tiny_models, {"SEQSERVE_LOG_LEVEL": "WARNING"}, 1) as real:
        want = _steps(real.target)
    assert [a.id for a in want] == ["r0", "r1", "r2"]

    def shape(a: pb.ModelInferResponse) -> list[tuple[str, str, list[int]]]:
        return [(o.name, o.datatype, list(o.shape)) for o in a.outputs]

    with contextlib.ExitStack() as running:
        for cut in layers.CUTS:
            target, _ = running.enter_context(layers._cut_server(tiny_models, cut, tmp_path))
            got = _steps(target)
            assert [a.id for a in got] == ["r0", "r1", "r2"], cut  # each answer echoes its own request's id
            assert [shape(a) for a in got] == [shape(a) for a in want], cut
            assert [a.model_name for a in got] == ["charlm"] * 3, cut
            assert all(len(a.raw_output_contents) == len(a.outputs) for a in got), cut


def test_the_lean_server_answers_seqserves_probabilities(tiny_models: Path, tmp_path: Path) -> None:
    """The lean reference does the step for real: its NEXT_CHAR_PROBS are seqserve's, later steps of a sequence
    too (which depend on the state it kept), and every other output is the floor's recorded bytes."""
    with serve(tiny_models, {"SEQSERVE_LOG_LEVEL": "WARNING"}, 1) as real:
        want = _steps(real.target)
        record(real.target, canned_requests(tiny_models), tmp_path / "canned")
    with layers._lean_server(tiny_models, tmp_path) as (target, _):
        got = _steps(target)
    assert [a.id for a in got] == ["r0", "r1", "r2"]
    assert [o.name for o in got[0].outputs] == [o.name for o in want[0].outputs]
    k = [o.name for o in want[0].outputs].index(lean.PROBS)

    def probs(a: pb.ModelInferResponse) -> np.ndarray:
        return np.frombuffer(a.raw_output_contents[k], np.float32)

    assert not np.allclose(probs(want[2]), probs(want[0]), atol=1e-4)  # "a" after "ab" is not "a" from nothing
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(probs(a), probs(b), rtol=1e-5, atol=1e-6)
        assert len(a.raw_output_contents) == len(b.raw_output_contents)


def test_a_real_run_measures_every_server(tiny_models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = layers.run(tiny_models, ["charlm1-stream"], [4], rounds=1, window_ms=300)  # (-x 1: the tiny charlm/1)
    everyone = [*layers.ORDER, layers.REFERENCE]
    assert sorted(row["server"] for row in r["rows"]) == sorted(everyone)
    for row in r["rows"]:
        assert row["throughput"] > 0 and row["server_cpu_s_per_1k"] > 0, row["server"]
    (s,) = r["summary"]
    assert [layer["server"] for layer in s["layers"]] == everyone
    layers.print_table(r)
    printed = capsys.readouterr().out
    for label in everyone:
        assert layers.ADDS[label] in printed
