"""``seqserve serve --workers 2 --engines 2``: two frontends and two engines, each engine owning the sessions and
sequences whose ids hash to it. A client that alternates frontends gets what one process answers, whichever
engine owns its session; both engines serve; statistics and metrics add up over them; a model load reaches both;
a lost engine stops the server."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.client import Client
from service.core.shards import shard_of
from tests.service.engine.test_workers import _frontends, _sequences_match, _sessions_match, _step
from tests.service.kserve.procs import scrape, start_server, stop_server


@pytest.fixture(scope="module")
def servers(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, object], int]]:
    """(ready file of a --workers 2 --engines 2 server, gRPC port of a single-process server over the same
    models); the single server's metrics port is in the first as ``single_metrics_port``, its TRACE_DIR as
    ``trace_dir``."""
    traces = tmp_path_factory.mktemp("traces")
    multi, multi_info = start_server(
        tiny_models,
        tmp_path_factory.mktemp("engines"),
        SEQSERVE_WORKERS="2",
        SEQSERVE_ENGINES="2",
        SEQSERVE_FRONTEND_PORTS="true",
        SEQSERVE_TRITON_METRICS="true",
        SEQSERVE_TRACE_DIR=str(traces),
    )
    single, single_info = start_server(
        tiny_models, tmp_path_factory.mktemp("single"), SEQSERVE_WORKERS="1", SEQSERVE_TRITON_METRICS="true"
    )
    try:
        extra = {"single_metrics_port": single_info["metrics_port"], "trace_dir": str(traces)}
        yield dict(multi_info) | extra, int(single_info["grpc_port"])
    finally:
        stop_server(single)
        if multi.poll() is None:
            stop_server(multi)


def test_the_ready_file_lists_both_engines(servers: tuple[dict[str, object], int]) -> None:
    info, _ = servers
    pids = info["engine_pids"]
    assert info["engines"] == 2 and isinstance(pids, list) and len(set(pids)) == 2
    assert pids[0] == info["engine_pid"]


def test_sessions_alternating_frontends_match_one_process(servers: tuple[dict[str, object], int]) -> None:
    info, single = servers
    for _ in range(3):  # sessions go to each engine in turn: both engines serve one
        _sessions_match(_frontends(info), single)


def test_sequences_alternating_frontends_match_one_process(servers: tuple[dict[str, object], int]) -> None:
    info, single = servers
    _sequences_match(_frontends(info), single)


def test_new_session_ids_route_to_each_engine_in_turn(servers: tuple[dict[str, object], int]) -> None:
    """Each frontend's creates alternate between the engines, and each id hashes to the engine that made it: a
    fork stays on its source's engine, and every id is served from both frontends."""
    info, _ = servers
    clients = [Client(t, timeout=30) for t in _frontends(info)]
    try:
        ids = [clients[0].create_session("charlm").id for _ in range(4)]
        assert {shard_of(i, 2) for i in ids} == {0, 1}
        assert [shard_of(i, 2) for i in ids[:2]] in ([0, 1], [1, 0])
        twin = clients[1].fork_session(ids[0]).id
        assert shard_of(twin, 2) == shard_of(ids[0], 2) and twin != ids[0]
        for sid in [*ids, twin]:
            assert clients[1].suggest_once(sid, "ab", n=1, max_chars=1).steps == 2
            assert clients[0].get_session(sid).steps == 2
            clients[0].delete_session(sid)
    finally:
        for c in clients:
            c.close()


def _count(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: object) -> float:
    return sum(v for k, v in samples.get(name, {}).items() if labels.items() <= dict(k).items())


def _stepped(target: str, ids: list[str]) -> int:
    """Three steps of each sequence in ``ids``; returns how many successful charlm inferences ModelStatistics
    counted meanwhile."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def count() -> int:
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="charlm"), timeout=30).model_stats
            return sum(s.inference_stats.success.count for s in stats)

        before = count()
        for sid in ids:
            for i, piece in enumerate(["a", "b", "c"]):
                stub.ModelInfer(_step(piece, sid, start=i == 0, end=i == 2), timeout=30)
        return count() - before


def test_statistics_and_metrics_add_up_over_both_engines(servers: tuple[dict[str, object], int]) -> None:
    """Sequences hashed to both engines: ModelStatistics and the summed /metrics count what one process counts
    for the same calls (the second engine's families read from its private /metrics by the first)."""
    info, single = servers
    ids = [f"stats-{i}" for i in range(8)]
    assert {shard_of(i, 2) for i in ids} == {0, 1}
    # (Not the histograms of rows: how many rows a start feeds depends on what each engine's prefix cache holds.)
    families = [("seqserve_session_events_total", {"model": "charlm", "event": e}) for e in ("created", "deleted")]
    families.append(("nv_inference_request_success", {"model": "charlm"}))  # Triton's names, summed too
    deltas = []
    for target, port in (
        (_frontends(info)[0], info["metrics_port"]),
        (f"127.0.0.1:{single}", info["single_metrics_port"]),
    ):
        before = scrape(port)
        assert _stepped(target, ids) == 3 * len(ids)
        after = scrape(port)
        deltas.append([_count(after, n, **labels) - _count(before, n, **labels) for n, labels in families])
    assert deltas[0] == deltas[1] == [len(ids), len(ids), 3 * len(ids)]
    scraped = scrape(info["metrics_port"])
    assert {dict(k)["process"] for k in scraped["seqserve_process_cpu_seconds_total"]} == {
        "engine", "engine-2", "frontend-1", "frontend-2"
    }  # fmt: skip
    total = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    assert list(scraped["nv_cpu_memory_total_bytes"].values()) == [total]  # the machine's, once (not summed)


def test_every_model_is_ready_through_both_engines(servers: tuple[dict[str, object], int]) -> None:
    """Readiness is asked of both engines (``shards.merged``) and the first engine's ``seqserve_model_ready`` is
    the least of both engines' gauges: with every model loaded in both, all of them say ready, and the same
    versions."""
    info, _ = servers
    with grpc.insecure_channel(_frontends(info)[1]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30).models
        assert index and all(m.state == "READY" for m in index), index
        for m in index:
            assert stub.ModelReady(pb.ModelReadyRequest(name=m.name, version=m.version), timeout=30).ready
    gauge = scrape(info["metrics_port"])["seqserve_model_ready"]
    assert {(dict(k)["model"], dict(k)["version"]) for k in gauge} == {(m.name, m.version) for m in index}
    assert set(gauge.values()) == {1.0}


def test_a_model_load_reaches_every_engine(servers: tuple[dict[str, object], int]) -> None:
    """An unload through one frontend stops the model in both engines (a sequence of either engine is refused),
    and a load brings it back in both."""
    info, _ = servers
    ids = [next(i for i in (f"load-{n}" for n in range(20)) if shard_of(i, 2) == k) for k in (0, 1)]  # one each
    with grpc.insecure_channel(_frontends(info)[0]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="sentiment"), timeout=60)
        for sid in ids:
            with pytest.raises(grpc.RpcError) as err:
                r = pb.ModelInferRequest(model_name="sentiment")
                r.parameters["sequence_id"].string_param = sid
                r.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"fine")
                stub.ModelInfer(r, timeout=30)
            assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="sentiment"), timeout=120)
        for _ in range(4):  # stateless calls go to a frontend's own engine: both frontends, both engines
            for target in _frontends(info):
                with grpc.insecure_channel(target) as c:
                    ready = pb_grpc.GRPCInferenceServiceStub(c).ModelReady(
                        pb.ModelReadyRequest(name="sentiment"), timeout=30
                    )
                    assert ready.ready


def test_a_lost_engine_stops_the_server_with_exit_code_1(tiny_models: Path, tmp_path: Path) -> None:
    """(Three engines for two frontends: the start-up log says which engines serve sessions only.)"""
    proc, info = start_server(tiny_models, tmp_path, SEQSERVE_WORKERS="2", SEQSERVE_ENGINES="3")
    try:
        pids = info["engine_pids"]
        assert isinstance(pids, list) and len(set(pids)) == 3
        os.kill(int(pids[2]), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.returncode == 1
        log = (tmp_path / "server.log").read_text()
        assert "2 frontends + 3 engines" in log  # the start-up summary
        assert "3 engines for 2 frontends: engines 3..3 serve sessions and sequences only" in log
        assert "engine 3 exited" in log and "stopping the server" in log
    finally:
        if proc.poll() is None:
            stop_server(proc)


def test_log_and_trace_settings_changed_through_one_engine_hold_in_the_other(
    servers: tuple[dict[str, object], int],
) -> None:
    """Each frontend reads settings from its own engine (frontend 1 from engine 1, frontend 2 from engine 2): a
    change made through either is in force in both, and each engine writes the traces of the calls it served, the
    second into ``<file>.engine2``."""
    info, _ = servers
    folder = Path(str(info["trace_dir"]))
    channels = [grpc.insecure_channel(t) for t in _frontends(info)]
    first, second = (pb_grpc.GRPCInferenceServiceStub(c) for c in channels)

    def verbose(stub: pb_grpc.GRPCInferenceServiceStub, level: int | None = None) -> int:
        request = pb.LogSettingsRequest()
        if level is not None:
            request.settings["log_verbose_level"].uint32_param = level
        return int(stub.LogSettings(request, timeout=30).settings["log_verbose_level"].uint32_param)

    def trace(stub: pb_grpc.GRPCInferenceServiceStub, **changes: str) -> dict[str, list[str]]:
        request = pb.TraceSettingRequest()
        for name, value in changes.items():
            request.settings[name].value.append(value)
        return {k: list(v.value) for k, v in stub.TraceSetting(request, timeout=30).settings.items()}

    assert verbose(first, 1) == 1 and verbose(second) == 1
    assert verbose(second, 0) == 0 and verbose(first) == 0
    file = folder / "engines.json"
    trace(first, trace_file=str(file), trace_level="TIMESTAMPS", trace_rate="1", log_frequency="1")
    assert trace(second)["trace_file"] == [str(file)]
    try:
        for n, stub in enumerate((first, second)):
            request = pb.ModelInferRequest(model_name="charlm")
            request.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x")
            stub.ModelInfer(request, metadata=[("x-request-id", f"via-{n + 1}")], timeout=30)
    finally:
        trace(second, trace_level="OFF")
        for c in channels:
            c.close()
    for path, request_id in (
        (file.with_name("engines.json.0"), "via-1"),
        (file.with_name("engines.json.engine2.0"), "via-2"),
    ):
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:  # (written by the engine's trace thread)
            time.sleep(0.1)
        heads = [e for e in json.loads(path.read_text()) if "model_name" in e]
        assert [h["request_id"] for h in heads] == [request_id]
