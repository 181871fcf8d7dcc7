"""Triton's trace extension in the core (``TRACE_*`` settings, ``service.core.traces``): settings as Triton keeps them
(a model's own over the server's, clearing back to the server's or the start-up value), every ``trace_rate``-th
request traced until ``trace_count`` runs out, and each trace written as Triton's JSON with the timestamps of the
request and of every model run it had (the same times the statistics count) and the tensors of those runs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core import traces
from service.core.traces import OFF, Tracer, summarize
from service.core.types import ModelRef, SamplingParams
from service.errors import InvalidInput
from service.logs import CALL
from tests.hooks import hook_runs
from tests.service.core.conftest import core_settings, memory_dp, recorded, texts

SENT = ModelRef("sentiment")
RUN = ["COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END"]


def written(path: Path) -> dict[int, dict[str, Any]]:
    """A trace file by trace id: its header, its timestamps (name, ns) in order, and its tensors (activity, tensor)."""
    out: dict[int, dict[str, Any]] = {}
    for entry in json.loads(path.read_text()):
        trace = out.setdefault(entry["id"], {"header": None, "stamps": [], "tensors": []})
        if "model_name" in entry:
            trace["header"] = entry
        elif "timestamps" in entry:
            trace["stamps"] += [(t["name"], t["ns"]) for t in entry["timestamps"]]
        else:
            trace["tensors"].append((entry["activity"], entry["tensor"]))
    return out


def traced(t: Tracer, n: int, model: str = "m") -> None:
    """``n`` requests of ``model`` through the tracer, as ``CountedRequest`` makes them."""
    for _ in range(n):
        trace = t.start(model, 1)
        if trace is not None:
            t.finish(trace)


# --- settings ---------------------------------------------------------------------------------------------------
def test_models_follow_the_servers_settings_except_those_they_set(tmp_path: Path) -> None:
    """Triton's own check of the extension (L0_trace): a model's setting stays its own; the rest follow the
    server's, a later change included."""
    t = Tracer(str(tmp_path / "global.log"), ["TIMESTAMPS"], 1, -1, 0, str(tmp_path))
    initial = {
        "trace_file": [str(tmp_path / "global.log")],
        "trace_level": ["TIMESTAMPS"],
        "trace_rate": ["1"],
        "trace_count": ["-1"],
        "log_frequency": ["0"],
    }
    assert t.settings() == initial and t.settings("simple") == initial
    assert t.update("simple", {"trace_file": ["model.log"]}) == {**initial, "trace_file": [str(tmp_path / "model.log")]}
    server = t.update(None, {"trace_file": ["another.log"], "trace_level": ["TIMESTAMPS", "TENSORS"]})
    assert server == {
        **initial,
        "trace_file": [str(tmp_path / "another.log")],
        "trace_level": ["TIMESTAMPS", "TENSORS"],
    }
    assert t.settings("simple") == {**server, "trace_file": [str(tmp_path / "model.log")]}
    assert t.settings("other") == server


def test_clearing_sends_a_model_back_to_the_servers_and_the_servers_to_its_start(tmp_path: Path) -> None:
    t = Tracer(str(tmp_path / "global.log"), ["TIMESTAMPS"], 1, -1, 0)
    t.update("simple", {"trace_rate": ["12"], "log_frequency": ["34"]})
    t.update(None, {"trace_rate": ["56"], "trace_count": ["78"], "trace_level": ["OFF"]})
    server = t.update(None, {"trace_rate": None, "trace_count": []})
    assert (server["trace_level"], server["trace_rate"], server["trace_count"]) == (["OFF"], ["1"], ["-1"])
    model = t.settings("simple")
    assert (model["trace_level"], model["trace_rate"], model["log_frequency"]) == (["OFF"], ["12"], ["34"])
    model = t.update("simple", {"trace_rate": None, "trace_level": None})
    assert (model["trace_rate"], model["log_frequency"]) == (["1"], ["34"])
    assert not t.active  # every level is OFF again


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"trace_sample": ["1"]}, "'trace_sample' is no trace setting"),
        ({"trace_sample": None}, "'trace_sample' is no trace setting"),  # (clearing it too: found by the fuzzer)
        ({"trace_level": ["VERBOSE"]}, "'VERBOSE' is not a level"),
        ({"trace_level": ["OFF", "TIMESTAMPS"]}, "OFF goes alone"),
        ({"trace_rate": ["0"]}, "trace_rate is 0; it must be at least 1"),
        ({"trace_rate": ["99999999999999999999999"]}, "it must be at most 2147483647"),
        ({"trace_rate": ["ten"]}, "'ten' is not a whole number"),
        ({"trace_count": ["-2"]}, "at least -1"),
        ({"log_frequency": ["1", "2"]}, "log_frequency takes one value, not 2"),
        ({"trace_file": ["/etc/seqserve-trace.json"]}, "outside TRACE_DIR"),
        ({"trace_file": ["../escape.json"]}, "outside TRACE_DIR"),
        ({"trace_file": ["missing/trace.json"]}, "does not exist"),
        ({"trace_file": [""]}, "trace_file is empty: name the file"),
        ({"trace_file": ["\x00"]}, "contains a NUL character"),  # (the OS's ValueError before: found by the fuzzer)
        ({"trace_file": ["a" * 5000 + "/t.json"]}, "longer than 255 bytes"),  # a name too long for the OS
        # taken, then a file named with a new line was made, or "File name too long" lost the traces at a flush
        ({"trace_file": ["t\n8.json"]}, "contains a control character"),
        ({"trace_file": ["t" * 300 + ".json"]}, "a file or folder name is longer than 255 bytes"),
        ({"trace_rate": ["5"], "trace_level": ["LOUD"]}, "'LOUD' is not a level"),  # the valid one is not applied
    ],
)
def test_a_refused_change_says_what_to_fix_and_changes_nothing(
    tmp_path: Path, changes: dict[str, list[str] | None], words: str
) -> None:
    t = Tracer(str(tmp_path / "t.json"), ["TIMESTAMPS"], 10, -1, 0, str(tmp_path / "dir"))
    (tmp_path / "dir").mkdir()
    before = (t.settings(), t.settings("m"))
    for model in (None, "m"):
        with pytest.raises(InvalidInput, match=words):
            t.update(model, changes)
    assert (t.settings(), t.settings("m")) == before


def test_a_trace_file_is_named_by_callers_only_inside_trace_dir(tmp_path: Path) -> None:
    start = str(tmp_path / "start.json")
    fixed = Tracer(start, ["TIMESTAMPS"], 1, -1, 0)
    with pytest.raises(InvalidInput, match=r"set at start only .* SEQSERVE_TRACE_DIR"):
        fixed.update(None, {"trace_file": [str(tmp_path / "other.json")]})
    assert fixed.update("m", {"trace_file": [start]})["trace_file"] == [start]  # the start-up file stays allowed
    (tmp_path / "traces" / "sub").mkdir(parents=True)
    free = Tracer(start, ["TIMESTAMPS"], 1, -1, 0, str(tmp_path / "traces"))
    assert free.update(None, {"trace_file": ["sub/a.json"]})["trace_file"] == [str(tmp_path / "traces/sub/a.json")]
    absolute = str(tmp_path / "traces" / "b.json")
    assert free.update(None, {"trace_file": [absolute]})["trace_file"] == [absolute]
    (tmp_path / "traces" / "out").symlink_to(tmp_path)  # a link inside that leads outside
    with pytest.raises(InvalidInput, match=r"'out/c\.json' is outside TRACE_DIR"):
        free.update(None, {"trace_file": ["out/c.json"]})
    (tmp_path / "traces" / "loop").symlink_to(tmp_path / "traces" / "loop")  # a link to itself
    with pytest.raises(InvalidInput, match=r"'loop/d\.json' (cannot be used|.*does not exist)"):
        free.update(None, {"trace_file": ["loop/d.json"]})


def test_a_level_on_needs_a_file(tmp_path: Path) -> None:
    t = Tracer("", OFF, 1, -1, 0, str(tmp_path))
    for model in (None, "m"):
        with pytest.raises(InvalidInput, match="no trace_file is set: set trace_file too"):
            t.update(model, {"trace_level": ["TIMESTAMPS"]})
    assert t.update(None, {"trace_level": ["TIMESTAMPS"], "trace_file": ["t.json"]})["trace_level"] == ["TIMESTAMPS"]
    with pytest.raises(ValueError, match="SEQSERVE_TRACE_FILE"):  # the same at start
        core_settings(tmp_path, trace_level="TIMESTAMPS")
    with pytest.raises(ValueError, match="'LOUD' is not a level"):
        core_settings(tmp_path, trace_level="LOUD", trace_file="t.json")


# --- sampling ---------------------------------------------------------------------------------------------------
def test_every_rate_th_request_is_traced_until_the_count_runs_out(tmp_path: Path) -> None:
    t = Tracer(str(tmp_path / "t.json"), ["TIMESTAMPS"], 3, 2, 0)
    picks = []
    for _ in range(9):
        trace = t.start("m", 1)
        picks.append(trace is not None)
        if trace is not None:
            t.finish(trace)
    assert picks == [False, False, True, False, False, True, False, False, False]
    assert t.settings()["trace_count"] == ["0"]  # what is left, as Triton shows it
    # A model that sets its own count counts its own traces; its requests still count toward its own rate only.
    t.update("own", {"trace_count": ["1"], "trace_rate": ["2"]})
    assert [t.start("own", 1) is not None for _ in range(4)] == [False, True, False, False]
    assert t.settings("own")["trace_count"] == ["0"] and t.settings()["trace_count"] == ["0"]
    t.close()
    assert len(written(tmp_path / "t.json")) == 2  # (the "own" trace was never finished: not written)


async def test_off_by_default(tiny_models: Path) -> None:
    dp = await memory_dp(tiny_models)
    try:
        await dp.infer(SENT, texts("good film"))
        assert not dp.tracer.active and dp.tracer.settings()["trace_level"] == ["OFF"]
        assert dp.tracer.start("sentiment", 1) is None
    finally:
        await dp.stop()


# --- traces of real requests ---------------------------------------------------------------------------------------
async def test_a_traced_request_is_written_as_tritons_json(tiny_models: Path, tmp_path: Path) -> None:
    file = tmp_path / "trace.json"
    dp = await memory_dp(tiny_models, trace_file=str(file), trace_level="TIMESTAMPS,TENSORS", trace_rate=1)
    token = CALL.set(("req-1", "/inference.GRPCInferenceService/ModelInfer", ""))
    try:
        result = await dp.infer(SENT, texts("good film"))
        (stats,) = await dp.statistics(ModelRef("sentiment", 1))
    finally:
        CALL.reset(token)
        await dp.stop()
    (trace,) = written(file).values()
    assert trace["header"] == {"id": 1, "model_name": "sentiment", "model_version": 1, "request_id": "req-1"}
    names = [name for name, _ in trace["stamps"]]
    assert names == ["REQUEST_START", "QUEUE_START", *RUN, "REQUEST_END"]
    ns = [t for _, t in trace["stamps"]]
    assert ns == sorted(ns)
    # The run's parts are the times the statistics counted for it.
    assert (stats.compute_input.ns, stats.compute_infer.ns, stats.compute_output.ns) == (
        ns[3] - ns[2],
        ns[4] - ns[3],
        ns[5] - ns[4],
    )
    tensors = {(activity, t["name"]): t for activity, t in trace["tensors"]}
    ids = tensors["TENSOR_QUEUE_INPUT", "input_ids"]
    assert (ids["dtype"], ids["shape"]) == ("INT64", "1,2")  # two known words
    logits = tensors["TENSOR_BACKEND_OUTPUT", "logits"]
    assert (logits["dtype"], logits["shape"]) == ("FP32", "1,2")
    z = np.array([float(v) for v in logits["data"].split(",")])
    probabilities = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert result.outputs[1].array is not None
    np.testing.assert_allclose(probabilities, result.outputs[1].array[0], rtol=1e-5)


async def test_a_generation_has_one_run_per_step(tiny_models: Path, tmp_path: Path) -> None:
    file = tmp_path / "trace.json"
    dp = await memory_dp(
        tiny_models, trace_file=str(file), trace_level="TIMESTAMPS", trace_rate=1, prefix_cache_bytes=0
    )
    try:
        params = SamplingParams(max_chars=6, temperature=0.0)
        chunks = [c async for c in dp.complete(ModelRef("charlm"), "to be", params)]
        (stats,) = await dp.statistics(ModelRef("charlm", 1))
    finally:
        await dp.stop()
    assert "".join(c.text for c in chunks)
    (trace,) = written(file).values()
    names = [name for name, _ in trace["stamps"]]
    assert names[0] == "REQUEST_START" and names[-1] == "REQUEST_END"
    runs = names.count("COMPUTE_START")
    assert runs == stats.execution_count > 1  # the prompt's run and a run per generated character
    assert names[1:-1] == ["QUEUE_START", *RUN] * runs


async def test_requests_batched_together_share_their_runs_times(tiny_models: Path, tmp_path: Path) -> None:
    file = tmp_path / "trace.json"
    dp = await memory_dp(
        tiny_models, trace_file=str(file), trace_level="TIMESTAMPS,TENSORS", trace_rate=1, max_batch_delay_ms=200.0
    )
    try:
        # The first request alone teaches the batcher to wait for company; the next two then run together.
        await dp.infer(SENT, texts("good"))
        await asyncio.gather(dp.infer(SENT, texts("good film")), dp.infer(SENT, texts("bad")))
        assert recorded(dp).batch_sizes("sentiment")[-1] == 2
    finally:
        await dp.stop()
    traces = list(written(file).values())
    assert len(traces) == 3
    a, b = traces[1], traces[2]
    run_of = [{n: t for n, t in trace["stamps"] if n in RUN} for trace in (a, b)]
    assert run_of[0] == run_of[1] and len(run_of[0]) == 4
    for trace, words in ((a, 2), (b, 1)):  # each trace holds its own rows of the batch
        tensors = {(activity, t["name"]): t for activity, t in trace["tensors"]}
        assert tensors["TENSOR_QUEUE_INPUT", "input_ids"]["shape"] == f"1,{words}"
        assert tensors["TENSOR_BACKEND_OUTPUT", "logits"]["shape"] == "1,2"


def test_log_frequency_writes_numbered_files_and_the_rest_at_the_end(tmp_path: Path) -> None:
    file = tmp_path / "t.json"
    t = Tracer(str(file), ["TIMESTAMPS"], 1, -1, 2)
    traced(t, 5)
    t.close()
    assert not file.exists()
    assert [sorted(written(tmp_path / f"t.json.{i}")) for i in range(3)] == [[1, 2], [3, 4], [5]]
    assert not (tmp_path / "t.json.3").exists()


def test_a_file_no_setting_names_any_more_gets_what_it_collected(tmp_path: Path) -> None:
    t = Tracer(str(tmp_path / "a.json"), ["TIMESTAMPS"], 1, -1, 0, str(tmp_path))
    traced(t, 2)
    t.update(None, {"trace_file": ["b.json"]})
    traced(t, 1)
    t.update(None, {"trace_file": ["a.json"]})  # set again: numbered from scratch, written at the end
    traced(t, 1)
    t.close()
    assert sorted(written(tmp_path / "b.json")) == [3]
    assert sorted(written(tmp_path / "a.json")) == [4]  # (the first two were written, then this replaced them)


def test_traces_kept_for_the_end_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(traces, "KEPT_BYTES", 3 * 120 * 3)  # three traces of a header and two timestamps
    t = Tracer(str(tmp_path / "t.json"), ["TIMESTAMPS"], 1, -1, 0)
    with caplog.at_level(logging.WARNING, logger="service.core.traces"):
        traced(t, 5)
    t.close()
    assert sorted(written(tmp_path / "t.json")) == [1, 2, 3]
    assert [r.message for r in caplog.records if "later ones are dropped" in r.message]


def test_a_file_that_cannot_be_written_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    t = Tracer(str(tmp_path / "gone" / "t.json"), ["TIMESTAMPS"], 1, -1, 0)
    traced(t, 1)
    with caplog.at_level(logging.ERROR, logger="service.core.traces"):
        t.close()
    assert [r.message for r in caplog.records if "could not write the trace file" in r.message]


def test_a_write_that_fails_midway_leaves_no_part_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A trace file written to a full disk failed after its temporary file was partly written, and the part stayed
    (one per flush: on a full disk the server's own leftovers kept it full)."""

    def full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    t = Tracer(str(tmp_path / "t.json"), ["TIMESTAMPS"], 1, -1, 2)
    monkeypatch.setattr(os, "replace", full)
    with caplog.at_level(logging.ERROR, logger="service.core.traces"):
        traced(t, 4)
        t.close()
    monkeypatch.undo()
    assert len([r for r in caplog.records if "No space left" in r.message]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []


async def test_seqserve_traces_sums_a_file_up_as_the_statistics_count(
    tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    file = tmp_path / "trace.json"
    dp = await memory_dp(tiny_models, trace_file=str(file), trace_level="TIMESTAMPS", trace_rate=1)
    try:
        for words in ("good film", "bad", "a dull film"):
            await dp.infer(SENT, texts(words))
        (stats,) = await dp.statistics(ModelRef("sentiment", 1))
    finally:
        await dp.stop()
    (row,) = summarize(json.loads(file.read_text()))
    assert (row["model"], row["version"], row["traces"], row["runs"]) == ("sentiment", 1, 3, 1.0)
    for part, counted in (("input_us", stats.compute_input), ("infer_us", stats.compute_infer),
                          ("output_us", stats.compute_output)):  # fmt: skip
        assert row[part] == pytest.approx(counted.ns / 3 / 1000, abs=0.06)
    assert row["queue_us"] >= 0 and row["other_us"] > 0
    assert row["request_us"] == pytest.approx(sum(row[p] for p in ("queue_us", "input_us", "infer_us",
                                                                   "output_us", "other_us")), abs=0.11)  # fmt: skip
    spans = sorted((t["stamps"][-1][1] - t["stamps"][0][1]) / 1000 for t in written(file).values())
    assert row["request_p50_us"] == pytest.approx(spans[1], abs=0.06)  # the middle one of three
    assert spans[1] <= row["request_p99_us"] <= spans[2]
    assert main(["traces", str(file)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["model", "version", "traces", "runs", "request_us", "queue_us", "input_us",
                                "infer_us", "output_us", "other_us", "request_p50_us", "request_p99_us"]  # fmt: skip
    assert table[1].split()[:4] == ["sentiment", "1", "3", "1.0"]
    assert main(["traces", "--json", str(file)]) == 0
    assert json.loads(capsys.readouterr().out) == row
    (tmp_path / "not.json").write_text('{"a": 1}')
    assert main(["traces", str(tmp_path / "not.json")]) == 1
    assert "not a trace file" in capsys.readouterr().err


async def test_a_request_whose_deadline_passed_in_its_run_ends_its_trace_there(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request cancelled while its batch ran in the worker thread: its trace ends at REQUEST_END, and the run
    that finished later is not written into it (it was, after REQUEST_END, and ``seqserve traces`` read the
    sentiment model's rest as negative)."""
    import threading

    file = tmp_path / "trace.json"
    dp = await memory_dp(tiny_models, trace_file=str(file), trace_level="TIMESTAMPS", trace_rate=1,
                         inline_batch_tokens=0)  # fmt: skip
    try:
        runtime = dp.registry.resolve(SENT).runtime
        entered, release = threading.Event(), threading.Event()

        def held(run: Any, feeds: Any) -> Any:  # (once released, every run goes through at once)
            entered.set()
            release.wait(10)
            return run()

        hook_runs(monkeypatch, runtime, held)
        call = asyncio.ensure_future(dp.infer(SENT, texts("good film")))
        assert await asyncio.to_thread(entered.wait, 10)
        call.cancel()  # (as the edge does when the call's deadline passes)
        with pytest.raises(asyncio.CancelledError):
            await call
        release.set()
        await dp.infer(SENT, texts("bad"))  # the held batch is done before this one runs
    finally:
        await dp.stop()
    cancelled, answered = written(file).values()
    names = [n for n, _ in cancelled["stamps"]]
    assert names == ["REQUEST_START", "QUEUE_START", "REQUEST_END"]
    assert [n for n, _ in answered["stamps"]] == ["REQUEST_START", "QUEUE_START", *RUN, "REQUEST_END"]
    (row,) = summarize(json.loads(file.read_text()))
    assert row["traces"] == 2 and row["runs"] == 0.5
    assert min(row[p] for p in ("request_us", "queue_us", "input_us", "infer_us", "output_us", "other_us")) >= 0


def test_seqserve_traces_reads_a_step_left_in_the_queue_and_leaves_out_a_run_after_the_end() -> None:
    """The summary of a trace whose step was still queued when the request ended (its deadline passed there), and
    of one (as an earlier release wrote it) with a run after REQUEST_END: queued until the end, no negative part.
    A missing COMPUTE_START read as 0 made the queue time minus the clock."""

    def trace(i: int, stamps: list[tuple[str, int]]) -> list[dict[str, Any]]:
        head = {"id": i, "model_name": "m", "model_version": 1, "request_id": ""}
        return [head, *({"id": i, "timestamps": [{"name": n, "ns": ns}]} for n, ns in stamps)]

    base = 10**15  # (the monotonic clock of a machine up for days, in ns)
    queued = trace(1, [("REQUEST_START", base), ("QUEUE_START", base + 1_000), ("REQUEST_END", base + 5_000)])
    late = trace(2, [("REQUEST_START", base), ("QUEUE_START", base + 1_000), ("REQUEST_END", base + 4_000),
                     *zip(RUN, (base + 6_000, base + 7_000, base + 9_000, base + 10_000), strict=True)])  # fmt: skip
    ran = trace(3, [("REQUEST_START", base), ("QUEUE_START", base + 1_000),
                    *zip(RUN, (base + 2_000, base + 3_000, base + 5_000, base + 6_000), strict=True),
                    ("QUEUE_START", base + 7_000), ("REQUEST_END", base + 9_000)])  # fmt: skip
    (row,) = summarize(queued + late + ran)
    assert row["traces"] == 3 and row["runs"] == pytest.approx(1 / 3, abs=0.05)
    assert row["request_us"] == pytest.approx((5 + 4 + 9) / 3, abs=0.05)
    assert row["queue_us"] == pytest.approx((4 + 3 + (1 + 2)) / 3, abs=0.05)  # each until its run, or the end
    assert (row["input_us"], row["infer_us"], row["output_us"]) == pytest.approx((1 / 3, 2 / 3, 1 / 3), abs=0.05)
    assert row["other_us"] >= 0


_VALUES = st.lists(
    st.sampled_from(["OFF", "TIMESTAMPS", "TENSORS", "timestamps", "0", "1", "-1", "-2", "7", "x.json", "", " 3 "])
    | st.text(max_size=8),
    max_size=3,
)


@given(
    model=st.sampled_from([None, "m"]),
    changes=st.dictionaries(st.sampled_from([*traces.NAMES, "trace_mode", ""]), st.none() | _VALUES, max_size=4),
)
@settings(max_examples=300, deadline=None)
def test_any_change_is_applied_whole_or_refused_whole(model: str | None, changes: dict[str, Any]) -> None:
    """Whatever a caller sends: the settings it asked for, or InvalidInput and nothing changed; never another
    error, and what is in force is always valid (a level on has a file; numbers within their limits)."""
    with tempfile.TemporaryDirectory() as folder:
        t = Tracer(str(Path(folder) / "t.json"), ["TIMESTAMPS"], 5, -1, 0, folder)
        t.update("m", {"trace_rate": ["2"]})
        before = (t.settings(), t.settings("m"))
        try:
            now = t.update(model, changes)
        except InvalidInput:
            assert (t.settings(), t.settings("m")) == before
            return
        assert now == t.settings(model)
        for s in (t.settings(), t.settings("m")):
            assert s["trace_level"] == ["OFF"] or s["trace_file"] != [""]
            assert int(s["trace_rate"][0]) >= 1 and int(s["trace_count"][0]) >= -1 and int(s["log_frequency"][0]) >= 0
        t.close()
