"""``seqserve serve --workers 2``: two gRPC frontend processes and one engine. A client that alternates between
the two frontends (each also listens on a port of its own: SEQSERVE_FRONTEND_PORTS) gets, for sessions and for
KServe sequences, exactly what a single-process server answers; metrics sum both frontends; SIGTERM drains all
processes and exits 0."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.kserve.tensors import serialize_bytes
from service.client import ApiError, Client
from tests.service.api.test_rpcs import backspace_across, reads_during_a_long_completion
from tests.service.kserve.procs import CLIENT_SCRIPT, scrape, start_server, stop_server

TEXT = ["To be, ", "or not", " to be", ": that is ", "the question"]


@pytest.fixture(scope="module")
def servers(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, object], int]]:
    """(ready file of a --workers 2 server, gRPC port of a single-process server over the same models)."""
    multi, multi_info = start_server(
        tiny_models,
        tmp_path_factory.mktemp("workers"),
        SEQSERVE_WORKERS="2",
        SEQSERVE_FRONTEND_PORTS="true",
        SEQSERVE_HTTP_PORT="0",
    )
    single, single_info = start_server(tiny_models, tmp_path_factory.mktemp("single"), SEQSERVE_WORKERS="1")
    try:
        yield dict(multi_info), int(single_info["grpc_port"])
    finally:
        stop_server(single)
        if multi.poll() is None:
            stop_server(multi)


def _frontends(info: Mapping[str, object]) -> list[str]:
    ports = info["frontend_ports"]
    assert isinstance(ports, list) and len(ports) == 2 and len(set(ports)) == 2
    pids = info["frontend_pids"]
    assert isinstance(pids, list) and len(set(pids)) == 2  # two processes, one port each
    return [f"127.0.0.1:{p}" for p in ports]


def _session_run(targets: list[str]) -> list[tuple[float, ...]]:
    """Creates a char-LM session on the first target, then feeds TEXT piece by piece, alternating targets."""
    clients = [Client(t, timeout=30) for t in targets]
    try:
        sid = clients[0].create_session("charlm").id
        out = []
        for i, piece in enumerate(TEXT):
            r = clients[i % len(clients)].suggest_once(sid, piece, n=2, max_chars=3)
            out.append((r.steps, *[s.logprob for s in r.suggestions]))
        info = clients[1 % len(clients)].get_session(sid)
        assert info.steps == sum(len(p) for p in TEXT)
        clients[-1].delete_session(sid)
        with pytest.raises(ApiError) as err:
            clients[0].get_session(sid)
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        return out
    finally:
        for c in clients:
            c.close()


def _step(text: str, seq: str, start: bool = False, end: bool = False) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="charlm", id=f"{seq}-{text}")
    r.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    r.raw_input_contents.append(serialize_bytes([text.encode()]))
    r.parameters["sequence_id"].string_param = seq
    r.parameters["sequence_start"].bool_param = start
    r.parameters["sequence_end"].bool_param = end
    return r


def _sequence_run(targets: list[str]) -> list[np.ndarray]:
    channels = [grpc.insecure_channel(t) for t in targets]
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
        probs = []
        for i, piece in enumerate(TEXT):
            last = i == len(TEXT) - 1
            response = stubs[i % len(stubs)].ModelInfer(_step(piece, "seq-1", start=i == 0, end=last), timeout=30)
            assert response.parameters["seqserve_steps"].int64_param == sum(len(p) for p in TEXT[: i + 1])
            probs.append(np.frombuffer(response.raw_output_contents[0], dtype="<f4"))
        with pytest.raises(grpc.RpcError) as err:  # ended on one frontend: gone for the other too
            stubs[0].ModelInfer(_step("x", "seq-1"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        return probs
    finally:
        for c in channels:
            c.close()


def _sessions_match(frontends: list[str], single: int) -> None:
    alternating = _session_run(frontends)
    alone = _session_run([f"127.0.0.1:{single}"])
    np.testing.assert_allclose(np.array(alternating), np.array(alone), rtol=1e-5, atol=1e-6)


def _sequences_match(frontends: list[str], single: int) -> None:
    alternating = _sequence_run(frontends)
    alone = _sequence_run([f"127.0.0.1:{single}"])
    for a, b in zip(alternating, alone, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_sessions_alternating_frontends_match_one_process(servers: tuple[dict[str, object], int]) -> None:
    info, single = servers
    _sessions_match(_frontends(info), single)


def test_sequences_alternating_frontends_match_one_process(servers: tuple[dict[str, object], int]) -> None:
    info, single = servers
    _sequences_match(_frontends(info), single)


def test_forecast_columns_by_name_cross_to_the_engine(servers: tuple[dict[str, object], int]) -> None:
    """``columns`` travels from a frontend to the engine (Predict and a session's Observe), with the answers of
    one process, and the engine's refusal of a missing name comes back as INVALID_ARGUMENT."""
    info, single = servers
    cols = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    rng = np.random.default_rng(3)
    rows = (10 + rng.normal(0, 1, (30, 7))).astype(np.float32)
    order = [3, 6, 0, 1, 5, 2, 4]
    named = [cols[i] for i in order]
    with Client(_frontends(info)[0], timeout=30) as multi, Client(f"127.0.0.1:{single}", timeout=30) as alone:
        want = alone.forecast(rows)
        got = multi.forecast(rows[:, order], columns=named)
        np.testing.assert_array_equal(got.point, want.point)
        with multi.session("forecaster") as s:
            np.testing.assert_array_equal(multi.observe(s.id, rows[:, order], columns=named).point, want.point)
        with pytest.raises(ApiError) as err:
            multi.forecast(rows[:, order], columns=[n.lower() for n in named])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "columns lacks 'HUFL'" in err.value.message


def _listeners(port: object, pids: list[int]) -> set[int]:
    """Which of ``pids`` hold a socket listening on TCP ``port`` (IPv4 loopback; /proc)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{int(str(port)):04X}") and fields[3] == "0A":  # (state 0A: LISTEN)
            inodes.add(fields[9])
    holders = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in {f"socket:[{i}]" for i in inodes}:
                    holders.add(pid)
    return holders


def test_every_frontend_serves_rest_and_the_engine_sums_their_counts(servers: tuple[dict[str, object], int]) -> None:
    """The REST gateway runs in every frontend, on one port (SO_REUSEPORT, as gRPC), not in the engine: its JSON
    and HTTP work never takes the engine's time, the one process that cannot be multiplied. The engine's /metrics
    sums what the frontends count."""
    info, _ = servers
    frontends = [int(p) for p in info["frontend_pids"]]  # type: ignore[attr-defined]
    engine = int(str(info["engine_pid"]))
    assert _listeners(info["http_port"], [engine, *frontends]) == set(frontends)

    def answered() -> float:
        samples = scrape(info["metrics_port"]).get("seqserve_http_requests_total", {})
        return sum(v for k, v in samples.items() if dict(k)["route"] == "/v2/models/{model}/ready")

    before = answered()
    for _ in range(20):  # a connection each: the kernel spreads them over the frontends
        with urllib.request.urlopen(f"http://127.0.0.1:{info['http_port']}/v2/models/charlm/ready", timeout=30) as r:
            assert r.status == 200
    assert answered() - before == 20


def test_kserve_rest_reaches_the_engine_through_the_frontends(servers: tuple[dict[str, object], int]) -> None:
    """With --workers 2 every frontend runs the REST gateway, forwarding to the frontends' shared gRPC port: a
    sequence stepped through REST gives what a single process gives, and REST requests are counted as RPCs."""
    info, single = servers
    port = info["http_port"]
    assert isinstance(port, int) and port not in (info["grpc_port"], info["metrics_port"])

    def post(piece: str, seq: str, i: int) -> np.ndarray:
        params = {"sequence_id": seq, "sequence_start": i == 0, "sequence_end": i == len(TEXT) - 1}
        body = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": [piece]}], "parameters": params}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/charlm/infer", json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=30) as r:
            outputs = {o["name"]: o for o in json.loads(r.read())["outputs"]}
        return np.asarray(outputs["NEXT_CHAR_PROBS"]["data"], dtype=np.float32)

    before = _served(info, 'method="ModelInfer",model="charlm"')
    through_rest = [post(piece, "rest-1", i) for i, piece in enumerate(TEXT)]
    assert _served(info, 'method="ModelInfer",model="charlm"') - before == len(TEXT)  # each a frontend's ModelInfer
    for a, b in zip(through_rest, _sequence_run([f"127.0.0.1:{single}"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_rest_generate_streams_from_the_engine(servers: tuple[dict[str, object], int]) -> None:
    """Triton's generate_stream through a frontend's gateway and the engine: the text a single process generates
    for the same seed, and the first piece names the version that generated it (it crosses the engine link)."""
    info, single = servers
    with Client(f"127.0.0.1:{single}") as c:
        want = list(c.complete("ROMEO:", max_chars=12, temperature=0.7, seed=5))
    assert want[0].model_version == 1
    body = {"text_input": "ROMEO:", "max_tokens": 12, "temperature": 0.7, "seed": 5}
    url = f"http://127.0.0.1:{info['http_port']}/v2/models/charlm/generate_stream"
    with urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode()), timeout=30) as r:
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        events = [json.loads(line[6:]) for line in r.read().decode().split("\n") if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == "".join(chunk.text for chunk in want)
    assert {e["model_version"] for e in events} == {"1"} and events[-1]["finish_reason"] == "length"


def _served(info: dict[str, object], labels: str) -> float:
    """The engine's summed ``seqserve_rpc_requests_total`` of OK calls whose labels start with ``labels``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{info['metrics_port']}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.search(r'seqserve_rpc_requests_total\{code="OK",' + labels + r"[^}]*\} ([0-9.e+]+)", text)
    return float(found.group(1)) if found else 0.0


def test_metrics_sum_both_frontends(servers: tuple[dict[str, object], int]) -> None:
    info, _ = servers

    def served() -> float:
        return _served(info, 'method="ServerLive",')

    before = served()
    for target in _frontends(info) * 3:
        with grpc.insecure_channel(target) as channel:
            assert pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert served() - before == 6


def _stream_sequences(target: str, sequences: int, steps: int) -> None:
    """``sequences`` KServe sequences of ``steps`` one-character steps, each on its own ModelStreamInfer stream,
    all at once (as perf_analyzer's streaming workload sends them)."""

    def one(seq: str) -> None:
        requests = (_step("abcdefgh"[i % 8], seq, start=i == 0, end=i == steps - 1) for i in range(steps))
        with grpc.insecure_channel(target) as channel:
            answers = list(pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests, timeout=60))
        assert len(answers) == steps and not any(a.error_message for a in answers)

    threads = [threading.Thread(target=one, args=(f"gc-{i}",)) for i in range(sequences)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_servers_do_not_collect_garbage_per_batch(
    servers: tuple[dict[str, object], int], tiny_models: Path, tmp_path: Path
) -> None:
    """Server processes run with a young-generation GC threshold of SERVER_GC_THRESHOLD, not CPython's 700: a call
    in flight holds a few dozen container objects, so 16 concurrent sequences set off a collection every ~19 steps
    at 700 (85 in the engine over the 1,600 steps here). With the servers' threshold: none or one, in the engine of
    a --workers 2 server and in a single process alike (each reports its own ``python_gc_collections_total``)."""
    info, _ = servers
    single, single_info = start_server(tiny_models, tmp_path, SEQSERVE_WORKERS="1")
    try:
        for target, metrics_port in (
            (_frontends(info)[0], info["metrics_port"]),
            (f"127.0.0.1:{single_info['grpc_port']}", single_info["metrics_port"]),
        ):

            def young(port: object = metrics_port) -> float:
                return scrape(port)["python_gc_collections_total"][(("generation", "0"),)]

            _stream_sequences(target, 4, 20)  # warm: every batch size the run will see
            before = young()
            _stream_sequences(target, 16, 100)
            assert young() - before <= 2, target
    finally:
        stop_server(single)


def test_a_second_server_on_a_port_in_use_does_not_start(
    servers: tuple[dict[str, object], int], tiny_models: Path
) -> None:
    """gRPC binds with SO_REUSEPORT (the frontends share a port), so a second server on a taken port started and
    quietly took half the connections: sessions made on one were unknown on the other. A taken metrics port was
    a bare "[Errno 98] Address already in use", after the frontends had listened for a while."""
    import subprocess
    import sys

    info, single = servers
    seqserve = [str(Path(sys.executable).parent / "seqserve"), "serve", "--models", str(tiny_models)]
    cases = [
        (["--port", str(info["grpc_port"]), "--metrics-port", "0"], "--port or SEQSERVE_PORT"),
        (["--port", str(single), "--metrics-port", "0", "--workers", "1"], "--port or SEQSERVE_PORT"),
        (["--port", "0", "--metrics-port", str(info["metrics_port"])], "--metrics-port or SEQSERVE_METRICS_PORT"),
        (["--port", "0", "--metrics-port", str(info["metrics_port"]), "--workers", "1"], "SEQSERVE_METRICS_PORT"),
    ]
    for args, setting in cases:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")} | {"SEQSERVE_WORKERS": "2"}
        done = subprocess.run([*seqserve, *args], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 1, (args, done.stderr[-2000:])
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: cannot bind ") and "another process listens there" in last, last
        assert setting in last and "Traceback" not in done.stderr
    _sessions_match(_frontends(info), single)  # the running servers were not disturbed


def test_a_frontends_private_metrics_port_answers_its_engine_only(servers: tuple[dict[str, object], int]) -> None:
    """Each frontend serves its RPC metrics on a loopback port of its own, which the engine reads at each scrape.
    Anyone on the machine could read them there, even where the public port demands a client certificate
    (mTLS); they now ask for a random token that only the engine holds."""
    info, _ = servers
    ports = info["frontend_metrics_ports"]
    assert isinstance(ports, list) and len(ports) == 2
    for port in ports:
        for path in ("/metrics", "/healthz", "/readyz"):
            for headers in ({}, {"Authorization": "Bearer guess"}, {"Authorization": "Bearer gu\u00e9ss"}):
                request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(request, timeout=10)
                assert refused.value.code == 403
    assert "seqserve_rpc_requests_total" in "".join(
        str(k) for k in scrape(info["metrics_port"])
    )  # the engine still reads them


def test_every_process_reports_its_cpu_and_memory(servers: tuple[dict[str, object], int]) -> None:
    """``process_*`` describe the engine alone (the only /metrics endpoint); ``seqserve_process_*{process}`` cover
    the engine and each frontend, so a dashboard's CPU and memory panels see the whole server."""
    info, _ = servers
    scraped = scrape(info["metrics_port"])
    cpu = {dict(k)["process"]: v for k, v in scraped["seqserve_process_cpu_seconds_total"].items()}
    rss = {dict(k)["process"]: v for k, v in scraped["seqserve_process_resident_memory_bytes"].items()}
    assert set(cpu) == set(rss) == {"engine", "frontend-1", "frontend-2"}
    assert all(v > 0 for v in cpu.values())
    pids = info["frontend_pids"]
    assert isinstance(pids, list)
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in pids:  # each frontend's /proc RSS is one of the reported frontend values (it moves a little)
        now = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        assert any(abs(rss[f"frontend-{i}"] - now) < 0.2 * now for i in (1, 2))
    engine = int(Path(f"/proc/{info['engine_pid']}/statm").read_text().split()[1]) * page
    assert abs(rss["engine"] - engine) < 0.2 * engine


def test_a_frontend_that_misses_a_scrape_keeps_its_counts(servers: tuple[dict[str, object], int]) -> None:
    """A frontend that does not answer the engine's scrape in time counts with its last reading: the summed
    counters never go down (Prometheus would read a reset and count the whole history again in every rate)."""
    info, _ = servers
    for target in _frontends(info):
        with grpc.insecure_channel(target) as channel:
            assert pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live

    def total() -> float:
        return sum(scrape(info["metrics_port"])["seqserve_rpc_requests_total"].values())

    before = total()
    pids = info["frontend_pids"]
    assert isinstance(pids, list) and before > 0
    os.kill(pids[0], signal.SIGSTOP)
    try:
        during = total()  # (the engine waits out its 2 s timeout for the stopped frontend)
    finally:
        os.kill(pids[0], signal.SIGCONT)
    assert during == before
    assert total() == before


def test_model_calls_that_name_their_model_in_name_are_labelled_with_it(
    servers: tuple[dict[str, object], int],
) -> None:
    """KServe readiness, metadata, config and statistics name their model in ``name`` (not ``model_name``): their
    RPC metrics carry that model, as the table in docs/metrics.md says (they were counted under model="")."""
    info, _ = servers
    with grpc.insecure_channel(_frontends(info)[0]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelReady(pb.ModelReadyRequest(name="charlm"), timeout=30)
        stub.ModelMetadata(pb.ModelMetadataRequest(name="charlm"), timeout=30)
        stub.ModelConfig(pb.ModelConfigRequest(name="charlm"), timeout=30)
        stub.ModelStatistics(pb.ModelStatisticsRequest(name="charlm"), timeout=30)
    seen = {
        (labels["method"], labels["model"])
        for labels in (dict(k) for k in scrape(info["metrics_port"])["seqserve_rpc_requests_total"])
        if labels["method"] in ("ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics")
    }
    assert {m for m, model in seen if model == "charlm"} == {"ModelReady", "ModelMetadata", "ModelConfig",
                                                             "ModelStatistics"}  # fmt: skip


def test_summed_metrics_are_valid_openmetrics(servers: tuple[dict[str, object], int]) -> None:
    """What Prometheus asks for by default parses with the strict OpenMetrics parser: each label set's samples
    together, a histogram's buckets by increasing ``le`` with ``+Inf`` last (once summed, they were sorted as
    strings and interleaved)."""
    from prometheus_client.metrics_core import Metric
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    info, _ = servers
    for target in _frontends(info):  # latencies in two label sets (methods) on both frontends
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
            stub.ServerReady(pb.ServerReadyRequest(), timeout=10)
    request = urllib.request.Request(
        f"http://127.0.0.1:{info['metrics_port']}/metrics", headers={"Accept": "application/openmetrics-text"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        text = r.read().decode()
    parse: Callable[[str], Iterable[Metric]] = text_string_to_metric_families  # (unannotated there)
    families = {f.name: f for f in parse(text)}
    buckets = [s for s in families["seqserve_rpc_duration_seconds"].samples if s.name.endswith("_bucket")]
    live = [s.labels["le"] for s in buckets if s.labels["method"] == "ServerLive"]
    assert live[-1] == "+Inf" and [float(x) for x in live] == sorted(float(x) for x in live)


def test_an_admitted_stream_is_never_refused_by_the_frontends_queue(tiny_models: Path, tmp_path: Path) -> None:
    """A frontend bounds the calls it has waiting for the engine (max_queue_size), but, as the batcher does in
    one process, never refuses the later steps of a stream it admitted: here two calls wait on a session held by
    a long Complete (a third call is refused: the queue is full) while an admitted Suggest stream sends its
    second event."""
    import queue
    import threading

    from service.client import SuggestEvent

    proc, info = start_server(tiny_models, tmp_path, SEQSERVE_WORKERS="2", SEQSERVE_MAX_QUEUE_SIZE="2")
    try:
        with Client(f"127.0.0.1:{info['grpc_port']}", timeout=60) as c:  # one channel: one frontend
            a, b = c.create_session("charlm").id, c.create_session("charlm").id
            events: queue.Queue[SuggestEvent | None] = queue.Queue()
            answers = c.suggest(a, iter(events.get, None))
            events.put(SuggestEvent("To be"))
            assert next(answers).steps == 5  # admitted
            done = threading.Event()

            def long_complete() -> None:
                for _ in c.complete("ROMEO:", session_id=b, max_chars=2000, seed=1):
                    pass
                done.set()

            failures: list[BaseException] = []

            def wait_on_b() -> None:
                try:
                    c.suggest_once(b, "x")
                except BaseException as exc:  # (a thread's exception would only be a warning)
                    failures.append(exc)

            waiting = [threading.Thread(target=wait_on_b) for _ in range(2)]
            threads = [threading.Thread(target=long_complete), *waiting]
            threads[0].start()
            time.sleep(0.05)
            for t in waiting:
                t.start()

            def waiting_for_the_engine() -> float:
                return scrape(info["metrics_port"])["seqserve_frontend_engine_calls_waiting"][()]

            deadline = time.monotonic() + 20
            while waiting_for_the_engine() < 2:  # both calls wait for the engine (the gauge, read at the scrape)
                assert time.monotonic() < deadline, "the two calls never waited at the frontend"
                time.sleep(0.02)
            with pytest.raises(ApiError) as full:  # a call it has not admitted is refused: the queue is full
                c.get_session(a)
            assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue_size=2" in full.value.message
            assert full.value.retry_after == 0.1  # refused before it ran: the status says when to try again
            kserve = pb_grpc.GRPCInferenceServiceStub(c._channel)  # the same connection: the same frontend
            (refused,) = list(kserve.ModelStreamInfer(iter([_step("a", "new-seq", start=True)]), timeout=30))
            assert refused.infer_response.parameters["seqserve_error_code"].string_param == "RESOURCE_EXHAUSTED"
            assert refused.infer_response.parameters["seqserve_retry_after_ms"].int64_param == 100
            assert not done.is_set(), "the Complete ended before the stream's step: nothing was tested"
            events.put(SuggestEvent(" or no"))
            assert next(answers).steps == 11
            events.put(None)
            for t in threads:
                t.join(60)
            assert failures == []  # both waiting calls were admitted and answered
    finally:
        stop_server(proc)


def test_shared_port_serves_and_sigterm_exits_zero(tiny_models: Path, tmp_path: Path) -> None:
    proc, info = start_server(tiny_models, tmp_path, SEQSERVE_WORKERS="2")
    try:
        with Client(f"127.0.0.1:{info['grpc_port']}", timeout=30) as c:
            result = c.classify(["a fine film"])[0]
            assert result.label in result.labels
    finally:
        proc.terminate()
        code = proc.wait(timeout=60)
    assert code == 0
    frontends = info["frontend_pids"]
    assert isinstance(frontends, list)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in frontends) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in frontends if Path(f"/proc/{pid}").exists()]  # the frontends exited too


def test_a_stream_cut_at_the_end_of_the_drain_logs_no_traceback(tiny_models: Path, tmp_path: Path) -> None:
    """A ModelStreamInfer that its client keeps open past the drain's grace is cut (UNAVAILABLE), and the frontend
    that held it exits without an ERROR: it used to close its event loop before grpc's own tasks of the cut call
    had ended, and asyncio's cancelling them was logged as a CancelledError traceback."""
    proc, info = start_server(tiny_models, tmp_path, SEQSERVE_WORKERS="2", SEQSERVE_GRACE_SECONDS="1")
    requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
    channel = grpc.insecure_channel(f"127.0.0.1:{info['grpc_port']}")
    try:
        responses = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests.get, None), timeout=60)
        requests.put(_step("To be", "kept-open", start=True))
        first = next(responses)
        assert first.error_message == "" and first.infer_response.parameters["seqserve_steps"].int64_param == 5
        proc.terminate()  # the stream stays open: the drain waits its grace for it, then cuts it
        with pytest.raises(grpc.RpcError) as cut:
            next(responses)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.wait(timeout=60) == 0
    finally:
        requests.put(None)
        channel.close()
        if proc.poll() is None:
            stop_server(proc)
    log = (tmp_path / "server.log").read_text()
    assert "stopped (exit code 0)" in log
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


def test_principals_cross_frontends(tiny_models: Path, tmp_path: Path) -> None:
    """The engine owns sessions per principal: what alice starts on one frontend, she continues on the other, and
    bob (same sequence id, other frontend) never reaches it."""
    proc, info = start_server(
        tiny_models,
        tmp_path,
        SEQSERVE_WORKERS="2",
        SEQSERVE_FRONTEND_PORTS="true",
        SEQSERVE_API_KEYS="alice:key-alice-0123456789abcdef,bob:key-bob-0123456789abcdef0",
        SEQSERVE_ADMIN_PRINCIPALS="alice",
    )
    try:
        one, two = _frontends(dict(info))
        alice = (("authorization", "Bearer key-alice-0123456789abcdef"),)
        bob = (("authorization", "Bearer key-bob-0123456789abcdef0"),)
        with grpc.insecure_channel(one) as c1, grpc.insecure_channel(two) as c2:
            s1, s2 = pb_grpc.GRPCInferenceServiceStub(c1), pb_grpc.GRPCInferenceServiceStub(c2)
            first = s1.ModelInfer(_step("To be", "7", start=True), metadata=alice, timeout=30)
            assert first.parameters["seqserve_steps"].int64_param == 5
            with pytest.raises(grpc.RpcError) as err:
                s2.ModelInfer(_step(", or", "7"), metadata=bob, timeout=30)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            later = s2.ModelInfer(_step(", or", "7"), metadata=alice, timeout=30)
            assert later.parameters["seqserve_steps"].int64_param == 9
            # The engine checks who changes the log settings: the frontend passes the caller on with the call.
            change = pb.LogSettingsRequest()
            change.settings["log_verbose_level"].uint32_param = 0
            with pytest.raises(grpc.RpcError) as err:
                s1.LogSettings(change, metadata=bob, timeout=30)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "principal 'bob' may not change the log settings" in str(err.value.details())
            assert s2.LogSettings(change, metadata=alice, timeout=30).settings["log_verbose_level"].uint32_param == 0
        with Client(one, api_key="key-alice-0123456789abcdef", timeout=30) as a:
            sid = a.create_session("charlm").id
        with Client(two, api_key="key-bob-0123456789abcdef0", timeout=30) as b, pytest.raises(ApiError) as denied:
            b.get_session(sid)
        assert denied.value.code == grpc.StatusCode.NOT_FOUND
        with Client(two, api_key="key-alice-0123456789abcdef", timeout=30) as a2:
            assert a2.get_session(sid).id == sid
    finally:
        stop_server(proc)


def test_on_uvloop_alternating_frontends_match_one_process(
    servers: tuple[dict[str, object], int], tiny_models: Path, tmp_path: Path
) -> None:
    """SEQSERVE_EVENT_LOOP=uvloop in every process (engine and frontends): the engine link works on uvloop's
    transports, and sessions and sequences answer as the single asyncio process does."""
    pytest.importorskip("uvloop")
    _, single = servers
    env = {"SEQSERVE_WORKERS": "2", "SEQSERVE_FRONTEND_PORTS": "true", "SEQSERVE_EVENT_LOOP": "uvloop"}
    proc, info = start_server(tiny_models, tmp_path, **env)
    try:
        targets = _frontends(dict(info))
        _sessions_match(targets, single)
        _sequences_match(targets, single)
    finally:
        stop_server(proc)
    assert proc.returncode == 0  # SIGTERM drained every process


def test_a_stalled_engine_never_blocks_a_frontends_loop(tiny_models: Path, tmp_path: Path) -> None:
    """Metadata, readiness and statistics calls wait for the engine without holding the frontend's event loop:
    with the engine process stopped (SIGSTOP), ServerLive, which the frontend answers alone, still answers at
    once while a ModelMetadata call waits, and the waiting call completes when the engine runs again."""
    import threading

    proc, info = start_server(tiny_models, tmp_path, SEQSERVE_WORKERS="2", SEQSERVE_FRONTEND_PORTS="true")
    target = _frontends(dict(info))[0]
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
            assert stub.ModelMetadata(pb.ModelMetadataRequest(name="charlm"), timeout=30).name == "charlm"
            os.kill(proc.pid, signal.SIGSTOP)  # the engine (the parent process) stops answering
            answers: list[object] = []
            waiting = threading.Thread(
                target=lambda: answers.append(stub.ModelMetadata(pb.ModelMetadataRequest(name="charlm"), timeout=30))
            )
            try:
                waiting.start()
                time.sleep(0.5)  # the metadata call is now waiting for the engine
                assert waiting.is_alive() and not answers
                started = time.monotonic()
                assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
                assert time.monotonic() - started < 2.0  # (old code: blocked until the engine answered)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            waiting.join(30)
            assert answers and getattr(answers[0], "name", None) == "charlm"
    finally:
        stop_server(proc)


def test_a_silent_engine_turns_every_frontends_health_not_serving(tiny_models: Path, tmp_path: Path) -> None:
    """Health followed the engine's events only: a stopped or wedged engine sends none and keeps its connection, so
    the probes (gRPC health "" for readiness, grpc.health.v1.Health for liveness, as deploy/k8s and the image's
    HEALTHCHECK ask) said SERVING while every call hung. Each frontend's watchdog now turns readiness NOT_SERVING
    once the engine is silent ENGINE_SILENT_SECONDS (ServerReady answers false at once), liveness after six times
    as long, and both SERVING again once it answers."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.service.security.conftest import eventually

    live, serving, not_serving = "grpc.health.v1.Health", health_pb2.HealthCheckResponse.SERVING, 2
    proc, info = start_server(tiny_models, tmp_path, SEQSERVE_WORKERS="2", SEQSERVE_FRONTEND_PORTS="true",
                              SEQSERVE_ENGINE_SILENT_SECONDS="0.5")  # fmt: skip
    targets = _frontends(dict(info))

    def statuses(service: str) -> set[int]:
        got = set()
        for target in targets:
            with grpc.insecure_channel(target) as channel:
                request = health_pb2.HealthCheckRequest(service=service)
                got.add(health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status)
        return got

    try:
        assert statuses("") == statuses(live) == {serving}
        os.kill(proc.pid, signal.SIGSTOP)  # the engine (the parent process) stops answering
        try:
            assert eventually(lambda: statuses("") == {not_serving}, timeout=15)
            with grpc.insecure_channel(targets[0]) as channel:
                started = time.monotonic()
                ready = pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=5)
                assert not ready.ready and time.monotonic() - started < 2.0  # (it waited 10 s for the engine)
            assert eventually(lambda: statuses(live) == {not_serving}, timeout=20)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert eventually(lambda: statuses("") == statuses(live) == {serving}, timeout=20)
    finally:
        stop_server(proc)
    assert proc.returncode == 0


@pytest.mark.parametrize(("mark", "after"), [("metrics/health HTTP on", 0.3), ("gRPC listening", 0.0)])
def test_ctrl_c_while_frontends_start_stops_cleanly(tiny_models: Path, tmp_path: Path, mark: str, after: float) -> None:
    """A terminal's Ctrl-C reaches the whole process group: a frontend still starting (importing, or serving
    already) died of it with a KeyboardInterrupt traceback, and the engine reported "frontend N failed to start".
    Frontends now start with SIGINT blocked; the engine stops them (tests/service/engine/test_sigint.py)."""
    import subprocess
    import sys

    log = tmp_path / "serve.log"
    cmd = [str(Path(sys.executable).parent / "seqserve"), "serve", "--models", str(tiny_models), "--port", "0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--metrics-port", "0", "--workers", "2"], stdout=out, stderr=out, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while mark not in log.read_text() and time.monotonic() < deadline:  # the engine's port, or a frontend's
            time.sleep(0.02)
        time.sleep(after)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text and "failed to start" not in text, text
    assert text.rstrip().endswith("seqserve stopped (exit code 0)")


def test_session_calls_are_labelled_with_the_sessions_model(servers: tuple[dict[str, object], int]) -> None:
    """A session call names no model; the engine notes the session's model and the frontend's RPC metrics carry
    it (model="charlm"), as in one process, not model=""."""
    info, _ = servers

    def counts() -> dict[tuple[str, str], float]:  # (method, model) -> Get/Delete calls answered OK so far
        rpcs = scrape(info["metrics_port"]).get("seqserve_rpc_requests_total", {})  # none before a first call
        return {
            (labels["method"], labels["model"]): value
            for labels, value in ((dict(k), v) for k, v in rpcs.items())
            if labels["service"] == "seqserve.v1.Sessions" and labels["method"] in ("Get", "Delete")
            and labels["code"] == "OK"
        }  # fmt: skip

    before = counts()
    with Client(_frontends(info)[0], timeout=30) as c:
        sid = c.create_session("charlm").id
        c.get_session(sid)
        c.delete_session(sid)
    after = counts()
    added = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    assert added == {("Get", "charlm"): 1.0, ("Delete", "charlm"): 1.0}, added


def _ready(tmp_path: Path) -> dict[str, object]:
    info: dict[str, object] = json.loads((tmp_path / "ready.json").read_text())
    return info


def _readyz(metrics_port: object) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _replaced(tmp_path: Path, old: list[int], timeout: float = 60) -> list[int]:
    """The frontend pids once the ready file lists others than ``old`` (the engine rewrites it after a respawn)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [int(p) for p in _ready(tmp_path)["frontend_pids"]]  # type: ignore[attr-defined]
        if pids != old:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"no frontend replaced {old} within {timeout}s")


def test_a_frontend_that_dies_is_replaced_and_sessions_live_on(tiny_models: Path, tmp_path: Path) -> None:
    """A frontend killed (OOM killer, a crash) is replaced on the same port within seconds. Sessions are the
    engine's: one fed before the kill continues after it, whichever frontend serves it; the summed RPC counters
    keep the dead frontend's counts (they never go down) and seqserve_frontend_restarts_total says what happened."""
    proc, info = start_server(tiny_models, tmp_path, SEQSERVE_WORKERS="2", SEQSERVE_FRONTEND_PORTS="true")
    try:
        target = f"127.0.0.1:{info['grpc_port']}"
        own = info["frontend_ports"][0]
        with Client(f"127.0.0.1:{own}", timeout=30) as c:  # frontend 1, the one that dies, serves these
            session = c.create_session("charlm")
            first = c.suggest_once(session.id, "To be, or not", n=1, max_chars=2)
            metrics = scrape(info["metrics_port"])
            before = sum(metrics["seqserve_rpc_requests_total"].values())
            assert metrics["seqserve_frontend_restarts_total"][()] == 0 and before >= 2
            old = [int(p) for p in info["frontend_pids"]]
            readiness: list[int] = []  # /readyz while the frontend is dead and replaced: the other one serves
            done = threading.Event()

            def poll() -> None:
                while not done.is_set():
                    readiness.append(_readyz(info["metrics_port"]))
                    time.sleep(0.02)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            os.kill(old[0], signal.SIGKILL)
            new = _replaced(tmp_path, old)
            done.set()
            poller.join(10)
            assert new[1] == old[1] and new[0] != old[0]
            Path(f"/proc/{new[0]}").stat()  # alive
            assert len(readiness) >= 10 and set(readiness) == {200}, readiness
        with Client(target, timeout=30) as c:  # new connections: either frontend, the new one included
            for _ in range(6):
                assert c.get_session(session.id).steps == first.steps
            assert c.suggest_once(session.id, " to be", n=1, max_chars=2).steps == first.steps + 6
        metrics = scrape(info["metrics_port"])
        assert metrics["seqserve_frontend_restarts_total"][()] == 1
        assert sum(metrics["seqserve_rpc_requests_total"].values()) >= before + 7
        with urllib.request.urlopen(f"http://127.0.0.1:{info['metrics_port']}/readyz", timeout=10) as r:
            assert r.status == 200
        assert proc.poll() is None
    finally:
        stop_server(proc)
    assert proc.returncode == 0  # and it still stops cleanly


@pytest.mark.parametrize("engines", ["1", "2"])
def test_a_frontend_that_hangs_is_killed_and_replaced(tiny_models: Path, tmp_path: Path, engines: str) -> None:
    """A frontend that stops without dying (SIGSTOP here; an event loop that never gets control back alike) kept
    its share of new connections, which the kernel sends it from the shared port, and answered none of them.
    Silent FRONTEND_SILENT_SECONDS (its event loop sends a heartbeat every second), the engine kills it and starts a
    new one on the same port; the other frontend, idle but speaking, is kept; sessions live on."""
    proc, info = start_server(
        tiny_models,
        tmp_path,
        SEQSERVE_WORKERS="2",
        SEQSERVE_ENGINES=engines,
        SEQSERVE_FRONTEND_PORTS="true",
        SEQSERVE_FRONTEND_SILENT_SECONDS="3",
    )
    try:
        target = f"127.0.0.1:{info['grpc_port']}"
        with Client(f"127.0.0.1:{info['frontend_ports'][1]}", timeout=30) as c:
            session = c.create_session("charlm")
            first = c.suggest_once(session.id, "To be, or not", n=1, max_chars=2)
        time.sleep(4)  # idle frontends are not silent: each one's heartbeat speaks every second
        old = [int(p) for p in _ready(tmp_path)["frontend_pids"]]  # type: ignore[attr-defined]
        assert old == [int(p) for p in info["frontend_pids"]]
        os.kill(old[0], signal.SIGSTOP)
        stopped = time.monotonic()
        new = _replaced(tmp_path, old, timeout=30)
        assert time.monotonic() - stopped >= 2.5  # (not before its silence reached the limit)
        assert new[1] == old[1] and new[0] != old[0]
        assert not Path(f"/proc/{old[0]}").exists()  # killed, and reaped
        for _ in range(8):  # new connections: none goes to the stopped one any more
            with grpc.insecure_channel(target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        with Client(target, timeout=30) as c:
            assert c.get_session(session.id).steps == first.steps
        assert scrape(info["metrics_port"])["seqserve_frontend_restarts_total"][()] == 1
        log = (tmp_path / "server.log").read_text()
        assert f"frontend 1 (pid {old[0]}) has sent nothing for 3 s" in log, log[-3000:]
        assert "frontend 2 (pid" not in log
    finally:
        stop_server(proc)
    assert proc.returncode == 0


def test_frontends_waiting_on_a_stalled_second_engine_are_not_taken_for_hung(tiny_models: Path, tmp_path: Path) -> None:
    """Each frontend's watchdog waits for every engine's answer at once (up to ENGINE_SILENT_SECONDS), so with
    engine 2 stopped an idle frontend said nothing to engine 1 for seconds, and engine 1 killed every frontend as
    hung. The heartbeat comes from the frontend's event loop apart from those waits."""
    proc, info = start_server(
        tiny_models, tmp_path, SEQSERVE_WORKERS="2", SEQSERVE_ENGINES="2", SEQSERVE_FRONTEND_SILENT_SECONDS="3"
    )
    try:
        second = int(info["engine_pids"][1])
        os.kill(second, signal.SIGSTOP)
        try:
            time.sleep(8)
        finally:
            os.kill(second, signal.SIGCONT)
        assert [int(p) for p in _ready(tmp_path)["frontend_pids"]] == [int(p) for p in info["frontend_pids"]]  # type: ignore[attr-defined]
        assert "has sent nothing for" not in (tmp_path / "server.log").read_text()
    finally:
        stop_server(proc)
    assert proc.returncode == 0


def test_reads_from_another_frontend_do_not_wait_behind_a_long_complete(tiny_models: Path, tmp_path: Path) -> None:
    """The engine owns the sessions, so a Get or Export on frontend 2 answers at once while frontend 1 streams a
    Complete on the same session (``in_use`` crosses the engine's wire); and a Suggest backspace from either."""
    proc, info = start_server(
        tiny_models,
        tmp_path,
        SEQSERVE_WORKERS="2",
        SEQSERVE_FRONTEND_PORTS="true",
        SEQSERVE_MAX_GENERATE_CHARS="100000",
        SEQSERVE_SESSION_SIGNING_KEY="k" * 40,
        SEQSERVE_UNDO_CHARS="8",
    )
    try:
        first, second = _frontends(info)
        reads_during_a_long_completion(first, read_at=second)
        backspace_across([first, second])  # backspace crosses the engine's wire, from either frontend
    finally:
        stop_server(proc)


@pytest.mark.parametrize(("restarts", "window"), [(None, None), (0, None), (2, "30")])
def test_a_frontend_that_keeps_dying_stops_the_server_with_exit_code_1(
    tiny_models: Path, tmp_path: Path, restarts: int | None, window: str | None
) -> None:
    """Frontends that die again and again (a bug, a node out of memory) are replaced FRONTEND_RESTARTS times (5 by
    default) within FRONTEND_RESTART_WINDOW_SECONDS (60); the next exit stops the whole server with exit code 1,
    so that the orchestrator restarts it (exit 0 would read as a clean shutdown: Kubernetes' restartPolicy
    OnFailure, systemd's Restart=on-failure would leave it down). 0 restarts: the first exit stops it."""
    env = {"SEQSERVE_WORKERS": "2"}
    if restarts is not None:
        env["SEQSERVE_FRONTEND_RESTARTS"] = str(restarts)
    if window is not None:
        env["SEQSERVE_FRONTEND_RESTART_WINDOW_SECONDS"] = window
    allowed = 5 if restarts is None else restarts
    proc, info = start_server(tiny_models, tmp_path, **env)
    try:
        pids = [int(p) for p in info["frontend_pids"]]
        for kill in range(allowed + 1):
            os.kill(pids[kill % 2], signal.SIGKILL)
            if kill < allowed:
                pids = _replaced(tmp_path, pids)
        assert proc.wait(timeout=60) == 1
        line = (
            f"({allowed + 1} frontend exits within {window or 60}s, FRONTEND_RESTARTS {allowed}); stopping the server"
        )
        assert line in (tmp_path / "server.log").read_text()
    finally:
        if proc.poll() is None:
            stop_server(proc)


@pytest.mark.parametrize("engines", ["1", "2"])
def test_frontends_exit_when_their_engine_is_gone(tiny_models: Path, tmp_path: Path, engines: str) -> None:
    """The engine process is killed (SIGKILL, OOM): its frontends notice within seconds and exit, instead of
    holding the gRPC port and answering UNAVAILABLE forever (a restarted server could not bind it); with
    ``--engines 2`` the second engine exits too."""
    import contextlib

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    proc, info = start_server(tiny_models, tmp_path, SEQSERVE_WORKERS="2", SEQSERVE_ENGINES=engines)
    pids = [int(p) for p in [*info["frontend_pids"], *info["engine_pids"][1:]]]
    assert len(pids) == 1 + int(engines)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if alive(p)]
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def _get(port: object, path: str) -> None:
    """One HTTP request to a metrics port; its answer does not matter, its DEBUG line in the log does."""
    with contextlib.suppress(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30).read()


def test_log_settings_reach_the_engine_and_every_frontend(tiny_models: Path, tmp_path: Path) -> None:
    """Triton's logging extension with --workers 2: a change made through one frontend (stock tritonclient) is
    in force in the engine and in both frontends when the call returns, and so is the next one, made through
    the other frontend. Each process's HTTP side writes a DEBUG line per request, so the log shows which
    processes write what: nothing verbose before, JSON from all three after, no INFO line once it is off."""
    proc, info = start_server(tiny_models, tmp_path, SEQSERVE_WORKERS="2", SEQSERVE_FRONTEND_PORTS="true")
    try:
        # (the ready file's frontend_metrics_ports: a list of ports)
        http_ports = [info["metrics_port"], *cast(list[int], info["frontend_metrics_ports"])]
        grpc_ports = info["frontend_ports"]
        assert isinstance(grpc_ports, list) and len(grpc_ports) == 2
        for port in http_ports:
            _get(port, "/mark-before")
        done = subprocess.run(
            [sys.executable, str(CLIENT_SCRIPT), "--url", f"127.0.0.1:{grpc_ports[0]}", "--logging"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
        report = json.loads(done.stdout)
        assert "logging" in report["extensions"]
        assert report["before"]["log_verbose_level"] == {"uint32_param": 0}
        assert report["after"]["log_verbose_level"] == {"uint32_param": 1}
        assert report["after"]["log_format"] == {"string_param": "json"}
        assert report["refused"]["status"] == "StatusCode.INVALID_ARGUMENT"
        assert "log_file must be empty" in report["refused"]["message"]
        assert report["again"] == report["after"]  # the refused request changed nothing, log_info included
        for port in http_ports:
            _get(port, "/mark-after")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_ports[1]}") as channel:
            request = pb.LogSettingsRequest()
            request.settings["log_info"].bool_param = False
            request.settings["log_verbose_level"].uint32_param = 0
            settings = pb_grpc.GRPCInferenceServiceStub(channel).LogSettings(request, timeout=30).settings
            assert not settings["log_info"].bool_param and settings["log_format"].string_param == "json"
        for port in http_ports:
            _get(port, "/mark-off")
        for port in grpc_ports:  # an unknown model: an INFO line (the refusal) from that frontend, when INFO is on
            with Client(f"127.0.0.1:{port}", timeout=30) as c, pytest.raises(ApiError):
                c.create_session("mark-off-model")
    finally:
        stop_server(proc)
    lines = (tmp_path / "server.log").read_text().splitlines()
    assert not [line for line in lines if "mark-before" in line or "mark-off" in line]
    after = [json.loads(line) for line in lines if "mark-after" in line]
    assert {(r["level"], r.get("process", "engine")) for r in after} == {
        ("DEBUG", "engine"),
        ("DEBUG", "frontend-1"),
        ("DEBUG", "frontend-2"),
    }
    audit = [json.loads(line)["message"] for line in lines if "log settings changed" in line and line[0] == "{"]
    assert audit == [
        "log settings changed by the anonymous principal: log_format=json, log_verbose_level=1",
        "log settings changed by the anonymous principal: log_info=False, log_verbose_level=0",
    ]  # written by the engine, in the format just set


def test_trace_settings_and_traces_live_in_the_engine(tiny_models: Path, tmp_path: Path) -> None:
    """Triton's trace extension with --workers 2: settings changed through one frontend (stock tritonclient) trace
    the calls that come through the other, and the engine writes the file when the server stops."""
    folder = tmp_path / "traces"
    folder.mkdir()
    proc, info = start_server(
        tiny_models, tmp_path, SEQSERVE_WORKERS="2", SEQSERVE_FRONTEND_PORTS="true", SEQSERVE_TRACE_DIR=str(folder)
    )
    try:
        first, second = _frontends(dict(info))
        done = subprocess.run(
            [sys.executable, str(CLIENT_SCRIPT), "--url", first, "--trace"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-4000:]
        report = json.loads(done.stdout)
        assert "trace" in report["extensions"]
        assert report["before"]["trace_level"] == {"value": ["OFF"]}
        assert report["server"]["trace_file"] == {"value": [str(folder / "grpc.json")]}
        assert report["model"]["trace_rate"] == {"value": ["2"]}
        assert report["model"]["trace_level"] == {"value": ["TIMESTAMPS"]}  # the server's, followed
        assert report["refused"]["status"] == "StatusCode.INVALID_ARGUMENT"
        assert "trace_count is -5; it must be at least -1" in report["refused"]["message"]
        assert report["unknown"]["status"] == "StatusCode.NOT_FOUND"
        assert report["again"] == report["server"]
        with grpc.insecure_channel(second) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for i, model in enumerate(["charlm"] * 4 + ["sentiment"]):
                request = pb.ModelInferRequest(model_name=model)
                request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
                request.raw_input_contents.append(serialize_bytes([f"call {i}".encode()]))
                stub.ModelInfer(request, metadata=[("x-request-id", f"call-{i}")], timeout=30)
    finally:
        stop_server(proc)
    written = json.loads((folder / "grpc.json").read_text())
    heads = {e["request_id"]: e["model_name"] for e in written if "model_name" in e}
    assert heads == {"call-1": "charlm", "call-3": "charlm", "call-4": "sentiment"}  # charlm: every 2nd


def test_the_timeout_parameter_ends_a_request_the_engine_does_not_answer_in_time(
    tiny_models: Path, tmp_path: Path
) -> None:
    """Triton's ``timeout`` request parameter (microseconds; tritonclient's ``infer(timeout=...)``): a request not
    answered in time is DEADLINE_EXCEEDED at its limit, not when the engine comes back, unary or inside a stream,
    and the stream goes on. The engine is stopped (SIGSTOP) so that nothing can answer in time."""
    proc, info = start_server(tiny_models, tmp_path, SEQSERVE_WORKERS="2", SEQSERVE_FRONTEND_PORTS="true")
    target = _frontends(dict(info))[0]

    def request(timeout_us: int, text: str = "a fine film") -> pb.ModelInferRequest:
        r = pb.ModelInferRequest(model_name="sentiment", id=f"t{timeout_us}")
        r.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
        r.raw_input_contents.append(serialize_bytes([text.encode()]))
        r.parameters["timeout"].int64_param = timeout_us
        return r

    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelInfer(request(30_000_000), timeout=30).outputs  # in time: answered
            responses: queue.Queue[pb.ModelStreamInferResponse] = queue.Queue()
            requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
            stream = stub.ModelStreamInfer(iter(requests.get, None), timeout=60)

            def read() -> None:
                for r in stream:
                    responses.put(r)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            os.kill(proc.pid, signal.SIGSTOP)  # the engine (the parent process) stops answering
            try:
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as info_:
                    stub.ModelInfer(request(300_000), timeout=30)
                took = time.monotonic() - started
                assert info_.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "not answered within the request's timeout parameter (300000 microseconds)" in str(
                    info_.value.details()
                )
                assert 0.3 <= took < 5.0  # at its limit (old code: ignored, waited for the engine)
                requests.put(request(300_000))
                refused = responses.get(timeout=10)
                assert "timeout parameter (300000 microseconds)" in refused.error_message
                assert refused.infer_response.parameters["seqserve_error_code"].string_param == "DEADLINE_EXCEEDED"
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            requests.put(request(0))  # 0: no limit; the same stream answers once the engine is back
            answered = responses.get(timeout=30)
            assert answered.error_message == "" and answered.infer_response.id == "t0"
            requests.put(None)
            reader.join(30)
    finally:
        stop_server(proc)


def test_requests_over_their_timeout_parameter_count_as_failures_in_the_engine(
    servers: tuple[dict[str, object], int],
) -> None:
    """The frontend kept the limit and cancelled the engine's call when it passed: a request the engine had already
    run was counted a success in ModelStatistics though its client got DEADLINE_EXCEEDED, and one cancelled before
    the engine started it was not counted at all (20 such requests: success +8, fail +3). The engine keeps it now,
    where the work runs and is counted, as in one process."""
    info, _ = servers

    def stats(stub: pb_grpc.GRPCInferenceServiceStub) -> tuple[int, int]:
        (m,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="sentiment"), timeout=30).model_stats
        return m.inference_stats.success.count, m.inference_stats.fail.count

    for target in _frontends(info):
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            before = stats(stub)
            for i in range(10):
                r = pb.ModelInferRequest(model_name="sentiment", id=f"late-{i}")
                r.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
                r.raw_input_contents.append(serialize_bytes([f"a fine film, take {i}".encode()]))
                r.parameters["timeout"].int64_param = 1  # one microsecond
                with pytest.raises(grpc.RpcError) as err:
                    stub.ModelInfer(r, timeout=30)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            after = stats(stub)
            assert (after[0] - before[0], after[1] - before[1]) == (0, 10)


def test_rest_over_mtls_serves_a_callers_sequence_across_frontends(
    tiny_models: Path, tmp_path: Path, short_tmp: Path
) -> None:
    """With TLS and a client CA, every frontend's REST gateway speaks TLS and reaches its own frontend over that
    frontend's private socket: alice's sequence, stepped over new connections (which the shared port spreads over
    the frontends), continues across them, also after a frontend is killed and replaced, and bob cannot step it.
    The sockets' folders live in the engine's private folder, which is gone at stop, the dead frontend's too."""
    from tests.service.security.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    # The server's temporary folder of its own (short: the sockets' paths must fit AF_UNIX's 108 bytes), so that
    # what other servers on this machine leave in /tmp meanwhile (a parallel test run's) is none of this test's.
    proc, info = start_server(
        tiny_models,
        tmp_path,
        TMPDIR=str(short_tmp),
        SEQSERVE_WORKERS="2",
        SEQSERVE_HTTP_PORT="0",
        SEQSERVE_TLS_CERT=str(pki.server.cert),
        SEQSERVE_TLS_KEY=str(pki.server.key),
        SEQSERVE_TLS_CLIENT_CA=str(pki.ca),
    )

    def post(who: Any, piece: str, i: int) -> tuple[int, dict[str, Any]]:
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(who.cert, who.key)
        params = {"sequence_id": "tls-1", "sequence_start": i == 0}
        body = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": [piece]}], "parameters": params}
        url = f"https://127.0.0.1:{info['http_port']}/v2/models/charlm/infer"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode()), context=context,
                                        timeout=30) as r:  # fmt: skip
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        (engine,) = short_tmp.glob("seqserve-engine-*")
        assert not list(short_tmp.glob("seqserve-rest-*"))
        assert len(list(engine.glob("seqserve-rest-*/grpc.sock"))) == 2  # one per frontend
        steps = []
        for i, piece in enumerate(TEXT * 2):
            status, answer = post(pki.alice, piece, i)
            assert status == 200, answer
            steps.append(answer["parameters"]["seqserve_steps"])
            if i == len(TEXT):  # a frontend dies (its socket stays behind); the engine starts another
                old = [int(p) for p in info["frontend_pids"]]
                os.kill(old[0], signal.SIGKILL)
                _replaced(tmp_path, old)
            if i:
                status, refused = post(pki.bob, "x", 1)
                assert status == 404, refused
        assert steps == list(itertools.accumulate(len(piece) for piece in TEXT * 2))
        assert len(list(engine.glob("seqserve-rest-*/grpc.sock"))) == 3
    finally:
        stop_server(proc)
    assert not list(short_tmp.glob("seqserve-*"))
