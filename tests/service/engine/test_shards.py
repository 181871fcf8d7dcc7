"""Several engines, in one process: the shard of an id, the ids an engine draws, statistics summed over engines,
the settings that need a shared store, each engine's share of the in-memory store's limits, trace files and ids
per engine, a model's state over engines that disagree. (The processes: ``test_engines.py``.)"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import start_http_server
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from pydantic import ValidationError

from service.api.http import MetricsHttpServer
from service.core.dataplane import CoreDataPlane
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, sha256_file
from service.core.sessions import SessionManager, SessionState
from service.core.sessions.store import InMemorySessionStore
from service.core.shards import shard_of
from service.core.traces import Tracer
from service.core.types import BatchStats, Duration, ModelInfo, ModelRef, ModelStats
from service.engine.client import RemoteDataPlane
from service.engine.metrics import serve_engine_metrics, serve_frontend_rpc_metrics
from service.engine.shards import ShardedDataPlane, merged, summed
from service.errors import FailedPrecondition, ModelNotFound, Overloaded
from service.metrics import Metrics
from service.settings import Settings
from tests.service.core.test_traces import traced, written


def test_an_ids_shard_is_the_same_in_every_process_and_spreads() -> None:
    assert shard_of("abc", 4) == 0x352441C2 % 4  # CRC-32 of the text: no per-process hash seed
    assert shard_of("anything", 1) == 0
    counts = [0, 0, 0]
    for i in range(3000):
        counts[shard_of(f"seq-{i}", 3)] += 1
    assert min(counts) > 900


@pytest.mark.parametrize("index", [0, 1, 2])
def test_an_engine_draws_only_ids_of_its_own(index: int) -> None:
    settings = Settings()
    manager = SessionManager(settings, Metrics(runtime_collectors=False), InMemorySessionStore(), shard=(index, 3))
    assert {shard_of(manager.new_id(), 3) for _ in range(50)} == {index}
    assert manager.new_id("chosen") == "chosen"  # a caller's id (a KServe sequence's) is routed by the frontend


def _stats(version: int, n: int, batches: dict[int, int], last: int) -> ModelStats:
    d = Duration(n, 10 * n)
    return ModelStats(
        "m", version, last, n, len(batches), d, Duration(), d, d, d, d,
        [BatchStats(size, Duration(c, c), Duration(c, 2 * c), Duration(c, 3 * c)) for size, c in batches.items()],
    )  # fmt: skip


def test_statistics_add_up_over_engines() -> None:
    a = [_stats(1, 3, {1: 1, 2: 1}, 100), _stats(2, 1, {1: 1}, 50)]
    b = [_stats(1, 5, {2: 2, 4: 1}, 70)]
    one, two = summed([a, b])
    assert (one.version, one.inference_count, one.execution_count, one.last_inference_ms) == (1, 8, 4, 100)
    assert one.success == Duration(8, 80) and one.queue == Duration(8, 80)
    assert [(x.batch_size, x.compute_infer) for x in one.batches] == [
        (1, Duration(1, 2)),
        (2, Duration(3, 6)),
        (4, Duration(1, 2)),
    ]
    assert two == a[1]


def test_quotas_with_several_engines_need_a_shared_store() -> None:
    with pytest.raises(ValidationError, match="need a shared session store"):
        Settings(workers=2, engines=2, quota_sessions=5)
    Settings(workers=2, engines=2, quota_sessions=5, session_store="redis://127.0.0.1:6379/0")  # counted in Redis
    with pytest.raises(ValidationError, match="needs frontend processes"):
        Settings(workers=1, engines=2)


async def _fill(settings: Settings, engines: int, nbytes: int) -> tuple[int, int, list[str]]:
    """Sessions of ``nbytes`` created in each of ``engines`` managers (one per engine, each its own in-memory store)
    until every one refuses: (sessions held in all, bytes held in all, the refusals' messages)."""
    held, held_bytes, refusals = 0, 0, []
    for index in range(engines):
        manager = SessionManager(
            settings, Metrics(runtime_collectors=False), InMemorySessionStore(), shard=(index, engines)
        )
        for n in range(20):
            try:
                await manager.add(_session(f"e{index}-{n}", nbytes))
            except Overloaded as exc:
                refusals.append(str(exc))
                break
            held, held_bytes = held + 1, held_bytes + nbytes
    return held, held_bytes, refusals


def _session(sid: str, nbytes: int) -> SessionState:
    return SessionState(
        id=sid, model="charlm", version=1, model_sha256="ab" * 32, task="charlm", state={}, context={}, steps=0,
        ttl_seconds=60.0, created_at=time.time(), last_used_at=time.time(), nbytes=nbytes,
    )  # fmt: skip


async def test_the_engines_together_hold_no_more_than_the_in_memory_stores_limits() -> None:
    """Split exactly (3 sessions over 2 engines held 4: each engine had ceil(3/2)), and a refusal names the
    setting as configured and the engine's share of it, not a share as if it were the setting."""
    reject: dict[str, Any] = {"workers": 2, "session_full_policy": "reject"}
    s = Settings(engines=2, max_sessions=3, **reject)
    held, _, refusals = await _fill(s, 2, 10)
    assert held == 3
    assert "1 sessions (max_sessions=3 across 2 engines: this engine holds its share of 1)" in refusals[1]
    s = Settings(engines=3, max_sessions=10, **reject)
    assert (await _fill(s, 3, 10))[0] == 10
    s = Settings(engines=3, max_session_bytes=1000, **reject)
    _, held_bytes, refusals = await _fill(s, 3, 100)
    assert held_bytes == 900  # 334 + 333 + 333: three sessions of 100 bytes each
    assert "(max_session_bytes=1000 across 3 engines: this engine holds its share of 334)" in refusals[0]
    with pytest.raises(ValidationError, match="max_sessions=1 is too small for engines=2"):
        Settings(engines=2, max_sessions=1, **reject)
    with pytest.raises(ValidationError, match="max_session_bytes=2 is too small for engines=3"):
        Settings(engines=3, max_session_bytes=2, **reject)
    shared = Settings(engines=2, max_sessions=3, session_store="redis://127.0.0.1:6379/0", **reject)
    one = SessionManager(shared, Metrics(runtime_collectors=False), InMemorySessionStore(), shard=(1, 2))
    assert one.max_sessions.share == 3  # Redis counts across every process itself
    Settings(engines=2, max_sessions=1, session_store="redis://127.0.0.1:6379/0", **reject)  # so nothing to split


def test_each_engine_writes_its_own_trace_file_with_ids_unique_across_engines(tmp_path: Path) -> None:
    file = tmp_path / "t.json"
    for engine in (0, 1):
        t = Tracer(str(file), ["TIMESTAMPS"], 1, -1, 0, engine=engine, engines=2)
        traced(t, 3)
        t.close()
    assert sorted(written(file)) == [1, 3, 5]
    assert sorted(written(tmp_path / "t.json.engine2")) == [2, 4, 6]
    numbered = Tracer(str(tmp_path / "n.json"), ["TIMESTAMPS"], 1, -1, 2, engine=1, engines=2)  # log_frequency 2
    traced(numbered, 3)
    numbered.close()
    assert [sorted(written(tmp_path / f"n.json.engine2.{i}")) for i in range(2)] == [[2, 4], [6]]


def _info(name: str, version: int, ready: bool = True, error: str | None = None) -> ModelInfo:
    return ModelInfo(name, version, "charlm", ready, "CPUExecutionProvider", error)


def test_a_version_is_ready_only_where_every_engine_has_it_ready() -> None:
    first = [_info("a", 1), _info("a", 2), _info("b", 1), _info("c", 1)]
    second = [_info("a", 1), _info("a", 2, False, "onnxruntime could not load model.onnx"), _info("b", 1)]
    third = [_info("a", 1), _info("a", 2, False, "out of memory"), _info("b", 1), _info("c", 1)]
    by = {(m.name, m.version): m for m in merged([first, second, third])}
    assert list(by) == [("a", 1), ("a", 2), ("b", 1), ("c", 1)]  # the first engine's order
    assert by["a", 1] == _info("a", 1) and by["b", 1] == _info("b", 1)
    assert not by["a", 2].ready and by["a", 2].error == "in engine 2 of 3: onnxruntime could not load model.onnx"
    assert not by["c", 1].ready and by["c", 1].error == "in engine 2 of 3: not loaded there"
    # one that only a later engine has (its load failed to reach the first) is not ready either
    late = {(m.name, m.version): m for m in merged([[_info("a", 1)], [_info("a", 1), _info("d", 1)]])}
    assert not late["d", 1].ready and late["d", 1].error == "in engine 1 of 2: not loaded there"


async def test_a_model_that_failed_in_one_engine_is_not_ready_for_the_server(tiny_models: Path, tmp_path: Path) -> None:
    """Two real data planes as two engines, the second with a broken ``sentiment/1`` and without
    ``forecaster``: the server reports both not ready, naming the engine and its reason, as the calls routed there
    fail; ``charlm``, ready in both, is ready; a model neither has is not found."""
    broken = tmp_path / "models"
    shutil.copytree(tiny_models, broken)
    shutil.rmtree(broken / "forecaster")
    vdir = broken / "sentiment" / "1"
    (vdir / MODEL_FILE).write_bytes(b"this is not an onnx graph")
    manifest = json.loads((vdir / MANIFEST_FILE).read_text())
    manifest["sha256"] = sha256_file(vdir / MODEL_FILE)
    (vdir / MANIFEST_FILE).write_text(json.dumps(manifest))
    planes = [
        CoreDataPlane(Settings(models=models, device="cpu"), Metrics(runtime_collectors=False))
        for models in (tiny_models, broken)
    ]
    for p in planes:
        await p.start()
    try:
        assert not (await planes[1].model_info(ModelRef("sentiment"))).ready
        server = ShardedDataPlane(cast(list[RemoteDataPlane], planes), home=0)  # the DataPlane methods alike
        sentiment = await server.model_info(ModelRef("sentiment"))
        assert not sentiment.ready and sentiment.error is not None
        assert sentiment.error.startswith("in engine 2 of 2: ") and "onnxruntime could not load" in sentiment.error
        forecaster = await server.model_info(ModelRef("forecaster"))
        assert not forecaster.ready and forecaster.error is not None and forecaster.error.startswith("in engine 2 of 2")
        assert (await server.model_info(ModelRef("charlm"))).ready
        with pytest.raises(ModelNotFound):
            await server.model_info(ModelRef("nothing"))
        listed = {m.name: m for m in await server.models()}
        assert listed["charlm"].ready and not listed["sentiment"].ready and not listed["forecaster"].ready
        assert listed["forecaster"].error == "in engine 2 of 2: not loaded there"
        with pytest.raises(FailedPrecondition) as err:  # loads in engine 1, fails in engine 2: the load says so
            await server.load_model("sentiment")
        assert str(err.value).startswith("in engine 2 of 2 (engine 1 loaded it): model 'sentiment': version 1 failed")
        with pytest.raises(ModelNotFound, match=r"^model 'nothing' is not in the repository"):  # alike in both
            await server.load_model("nothing")
    finally:
        for p in planes:
            await p.stop()


def test_the_first_engines_metrics_show_a_version_ready_only_where_every_engine_has_it_ready() -> None:
    """Engine 1's /metrics: ``seqserve_model_ready`` is the least over the engines (0 for a version that failed
    in engine 2 or that engine 2 lacks), where the other engine families add up (live sessions)."""
    first, second = Metrics(runtime_collectors=False), Metrics(runtime_collectors=False)
    for name in ("charlm", "sentiment", "forecaster"):
        first.model_loaded(name, 1, "CPUExecutionProvider", 0.1, True)
    second.model_loaded("charlm", 1, "CPUExecutionProvider", 0.1, True)
    second.model_loaded("sentiment", 1, "CPUExecutionProvider", 0.1, False)
    first.sessions_active("charlm", 3)
    second.sessions_active("charlm", 4)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=second.registry)  # engine 2's private port
    try:
        serve_engine_metrics(first, lambda: [server.server_port], token="t", store_per_engine=True)

        def ready(model: str) -> float | None:
            return first.registry.get_sample_value("seqserve_model_ready", {"model": model, "version": "1"})

        assert (ready("charlm"), ready("sentiment"), ready("forecaster")) == (1.0, 0.0, 0.0)
        assert first.registry.get_sample_value("seqserve_sessions_active", {"model": "charlm"}) == 7.0
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_on_a_shared_store_the_first_engines_live_sessions_are_its_own_count() -> None:
    """On Redis every engine's gauge counts the whole store: summed over two engines, 5 sessions read 10."""
    first, second = Metrics(runtime_collectors=False), Metrics(runtime_collectors=False)
    for m in (first, second):
        m.model_loaded("charlm", 1, "CPUExecutionProvider", 0.1, True)
        m.sessions_active("charlm", 5)
        m.session_event("charlm", "created")
    server, thread = start_http_server(0, addr="127.0.0.1", registry=second.registry)
    try:
        serve_engine_metrics(first, lambda: [server.server_port], token="t", store_per_engine=False)
        assert first.registry.get_sample_value("seqserve_sessions_active", {"model": "charlm"}) == 5.0
        labels = {"model": "charlm", "event": "created"}
        assert first.registry.get_sample_value("seqserve_session_events_total", labels) == 2.0  # events still add
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_a_process_whose_metrics_do_not_answer_is_named_once_until_it_answers_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A drain stops the frontends one by one: every scrape logged a warning per stopped frontend (one a second
    at a 1 s scrape interval, for the whole grace)."""
    first, second = Metrics(runtime_collectors=False), Metrics(runtime_collectors=False)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=second.registry)
    port = server.server_port
    ports = [port]
    serve_engine_metrics(first, lambda: ports, token="t", store_per_engine=True)
    with caplog.at_level("WARNING", logger="service.engine.metrics"):
        list(first.registry.collect())  # read: answers
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        for _ in range(3):
            list(first.registry.collect())
    said = [r.getMessage() for r in caplog.records if f"metrics on port {port}" in r.getMessage()]
    assert len(said) == 1 and "not read (its last reading is used until it answers)" in said[0]


def test_frontends_read_as_json_sum_as_their_openmetrics_text_does() -> None:
    """The engine reads our private ports' samples as JSON and any other endpoint's OpenMetrics text: the same
    frontend read either way gives the same sums, its latency bucket's exemplar (a sampled call's trace id) too."""
    frontend = Metrics(runtime_collectors=False)
    frontend.rpc_started("inference.GRPCInferenceService", "ModelInfer")
    frontend.rpc_finished(
        "inference.GRPCInferenceService", "ModelInfer", "charlm", "OK", 0.002, f"00-{'a' * 32}-{'b' * 16}-01"
    )
    frontend.rpc_finished("inference.GRPCInferenceService", "ModelInfer", "charlm", "NOT_FOUND", 0.0001)
    ours = MetricsHttpServer("127.0.0.1", 0, frontend, lambda: True, token="t")
    theirs, thread = start_http_server(0, addr="127.0.0.1", registry=frontend.registry)
    try:
        sums = []
        for port in (ours.start(), theirs.server_port):
            engine = Metrics(runtime_collectors=False)
            serve_frontend_rpc_metrics(engine, lambda port=port: [port], token="t")  # type: ignore[misc]
            text = openmetrics.generate_latest(engine.registry).decode()  # type: ignore[no-untyped-call]
            sums.append(
                {
                    (s.name, tuple(sorted(s.labels.items()))): (s.value, s.exemplar)
                    for family in text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
                    for s in family.samples
                    if s.name.startswith("seqserve_rpc_") and not s.name.endswith("_created")
                }
            )
        json_read, text_read = sums
        assert json_read == text_read
        counts = {
            dict(labels)["code"]: v for (name, labels), (v, _) in json_read.items() if name.endswith("_total") and v
        }
        assert counts == {"OK": 1.0, "NOT_FOUND": 1.0}
        exemplars = [e.labels for _, e in json_read.values() if e is not None]
        assert exemplars == [{"trace_id": "a" * 32}]  # (the sampled call's bucket's)
    finally:
        ours.stop()
        theirs.shutdown()
        thread.join(timeout=10)
