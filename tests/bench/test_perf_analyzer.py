"""Triton's perf_analyzer runs against a real seqserve with no ``-x``, over gRPC and over the REST port (HTTP, its
default): it finds the model version through our ModelStatistics (inference_stats.queue.count) and prints our
server-side breakdown (queue, compute input / infer / output), and nothing it reads as inconsistent. A short run
on the tiny models; speed is the benchmark's business, not this test's."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import pa
from tests.service.kserve.procs import start_server, stop_server


def _server(models: Path, folder: Path, **env: str) -> Iterator[dict[str, str]]:
    """{"grpc": the gRPC port, "http": the KServe REST port} of one server (default workers) with ``env``."""
    proc, ports = start_server(models, folder, SEQSERVE_HTTP_PORT="0", **env)
    try:
        yield {"grpc": f"127.0.0.1:{ports['grpc_port']}", "http": f"127.0.0.1:{ports['http_port']}"}
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def targets(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    yield from _server(tiny_models, tmp_path_factory.mktemp("perf-analyzer"))


def short_run(w: pa.Workload, target: str, protocol: str, folder: Path, concurrency: int) -> list[str]:
    """A short perf_analyzer run of ``w`` (its ``-x`` when it pins a version): stability is the benchmark's concern,
    so a wide threshold and enough windows that a busy machine passes."""
    cmd = [str(pa.PERF_ANALYZER), "-m", w.model, "-u", target, "-i", protocol]
    cmd += ["--input-data", str(pa.input_data(w, folder)), "--concurrency-range", str(concurrency)]
    cmd += ["--measurement-mode", "count_windows", "--measurement-request-count", "200", "-s", "1000", "-r", "10"]
    return cmd + pa.workload_flags(w, sequence_length=20)


@pytest.mark.parametrize(
    ("workload", "protocol"),
    # HTTP is perf_analyzer's default protocol (Triton's port 8000): the REST port's statistics and sequences
    # carry it too. Streaming has no HTTP form.
    [("charlm-stream", "grpc"), ("charlm-unary", "grpc"), ("sentiment", "grpc"), ("charlm-unary", "http"),
     ("sentiment", "http")],
)  # fmt: skip
def test_perf_analyzer_without_version_flag(
    targets: dict[str, str], workload: str, protocol: str, tmp_path: Path
) -> None:
    cmd = short_run(pa.WORKLOADS[workload], targets[protocol], protocol, tmp_path, 4)
    assert "-x" not in cmd
    _passes(cmd)


@pytest.fixture(scope="module")
def engine_targets(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two frontends and two engines (``--engines 2``)."""
    yield from _server(tiny_models, tmp_path_factory.mktemp("perf-engines"), SEQSERVE_WORKERS="2", SEQSERVE_ENGINES="2")


@pytest.mark.parametrize("workload", ["charlm-stream", "charlm-unary"])
def test_perf_analyzer_reads_the_statistics_of_several_engines_as_one_servers(
    engine_targets: dict[str, str], workload: str, tmp_path: Path
) -> None:
    """Sequences spread over both engines: the summed statistics find the version and give a consistent
    breakdown."""
    _passes(short_run(pa.WORKLOADS[workload], engine_targets["grpc"], "grpc", tmp_path, 4))


def _passes(cmd: list[str]) -> None:
    """perf_analyzer ``cmd`` succeeds, finds the version and prints the server's breakdown with ORT time in it."""
    done = subprocess.run(cmd, env=pa.environment(), capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "failed to find the requested model version" not in out
    served = re.search(r"Server:\s+Inference count: (\d+)", out)
    assert served is not None and int(served.group(1)) > 0, out[-3000:]
    breakdown = re.search(
        r"Avg request latency: \d+ usec \(overhead \d+ usec \+ queue (\d+) usec \+ compute input \d+ usec \+ "
        r"compute infer (\d+) usec \+ compute output \d+ usec\)",
        out,
    )
    assert breakdown is not None, out[-3000:]
    assert int(breakdown.group(2)) > 0  # ORT time per request is reported, not zero
    # Triton's cache_hit / cache_miss belong to its response cache, off by default (as here): reporting anything there
    # (the char LM's prefix cache, at each sequence's start) made perf_analyzer flag our statistics as inconsistent.
    assert "cache hit/miss" not in out, out[-3000:]


def test_perf_analyzer_finds_a_version_whose_answers_come_from_the_prefix_cache(
    targets: dict[str, str], tmp_path: Path
) -> None:
    """Sequences of one step: each request starts a sequence on one character, which the char LM's prefix cache
    answers after its first time, with no model run. Such answers counted in success alone, and perf_analyzer,
    which finds the version it measures by the queue count that grew (Triton counts every success there), failed:
    "failed to find the requested model version"."""
    cmd = short_run(pa.WORKLOADS["charlm-unary"], targets["grpc"], "grpc", tmp_path, 1)
    cmd[cmd.index("--sequence-length") + 1] = "1"
    assert "-x" not in cmd
    done = subprocess.run(cmd, env=pa.environment(), capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "failed to find the requested model version" not in out, out[-3000:]
    served = re.search(r"Server:\s+Inference count: (\d+)", out)
    assert served is not None and int(served.group(1)) > 0, out[-3000:]


@pytest.fixture(scope="module")
def cached_targets(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A server with the response cache on."""
    folder = tmp_path_factory.mktemp("perf-analyzer-cache")
    yield from _server(tiny_models, folder, SEQSERVE_RESPONSE_CACHE_BYTES=str(1 << 20))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_reads_the_response_cache_as_tritons(
    cached_targets: dict[str, str], protocol: str, tmp_path: Path
) -> None:
    """RESPONSE_CACHE_BYTES on: perf_analyzer (no ``-x``) sends one sentence over and over, every request after the
    first is a hit, and it still finds the version (hits count in queue, as Triton's do), then prints its cache
    breakdown, with nothing it reads as inconsistent."""
    cmd = short_run(pa.WORKLOADS["sentiment"], cached_targets[protocol], protocol, tmp_path, 4)
    done = subprocess.run(cmd, env=pa.environment(), capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "failed to find the requested model version" not in out, out[-3000:]
    hits = re.search(r"Cache hit count: (\d+)", out)
    assert hits is not None and int(hits.group(1)) > 0, out[-3000:]
    assert re.search(r"Average Cache Hit Latency: \d+ usec", out), out[-3000:]
    assert "Response Cache is disabled" not in out, out[-3000:]  # its warning when counts and config disagree
    breakdown = re.search(r"Avg request latency: \d+ usec \(overhead \d+ usec \+ queue \d+ usec \+ cache hit/miss", out)
    assert breakdown is not None, out[-3000:]


@pytest.fixture(scope="module")
def shm_targets(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A server with system shared memory on."""
    yield from _server(tiny_models, tmp_path_factory.mktemp("perf-analyzer-shm"), SEQSERVE_SHARED_MEMORY="system")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_sends_its_tensors_through_system_shared_memory(
    shm_targets: dict[str, str], protocol: str, tmp_path: Path
) -> None:
    """``--shared-memory system``: perf_analyzer creates an object per input and output, registers them, sends
    requests that name them, and unregisters every region (system and CUDA) at the end, with nothing it reports as
    failed. (It refuses models with optional inputs itself, so the char LM cannot run this way.)"""
    cmd = short_run(pa.WORKLOADS["sentiment"], shm_targets[protocol], protocol, tmp_path, 2)
    cmd += ["--shared-memory", "system", "--output-shared-memory-size", "4096"]
    done = subprocess.run(cmd, env=pa.environment(), capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    served = re.search(r"Server:\s+Inference count: (\d+)", out)
    assert served is not None and int(served.group(1)) > 0, out[-3000:]
    assert "Unable to" not in out, out[-3000:]
    with urllib.request.urlopen(f"http://{shm_targets['http']}/v2/systemsharedmemory/status", timeout=10) as r:
        assert json.loads(r.read()) == []  # it unregistered what it registered


def _environment_in_child(env: dict[str, str], prelude: str = "") -> subprocess.CompletedProcess[str]:
    """``pa.environment(install=False)`` in a fresh interpreter (the dynamic loader reads LD_LIBRARY_PATH once, at
    start-up), printing the PERF_ANALYZER it used and the LD_LIBRARY_PATH it returns."""
    code = f"{prelude}\nfrom bench import pa\nenv = pa.environment(install=False)\nprint(pa.PERF_ANALYZER)\n"
    code += "print(env.get('LD_LIBRARY_PATH', ''))\n"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_perf_analyzer_elsewhere_is_named_by_the_environment(tmp_path: Path) -> None:
    # Triton's SDK image, or a machine without tritonclient's wheel: PERF_ANALYZER names the binary.
    missing = tmp_path / "perf_analyzer"
    done = _environment_in_child(os.environ | {"PERF_ANALYZER": str(missing)})
    assert done.returncode != 0 and f"{missing} is missing" in done.stderr, done.stderr[-2000:]
    missing.write_bytes(b"")
    done = _environment_in_child(os.environ | {"PERF_ANALYZER": str(missing)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0] == str(missing)


def test_a_cudart_on_the_loader_path_needs_no_pip_package() -> None:
    # A machine with no package index (the GPU machine): libcudart.so.12 on LD_LIBRARY_PATH is enough, and
    # environment() neither installs nor looks for the PyPI package. Without it on the path, and the package
    # hidden, it says what to install instead of installing (install=False).
    lib = pa.cudart_dir()
    assert lib is not None  # the dev extra brings it
    hide = "import bench.pa\nbench.pa.cudart_dir = lambda: None"
    base = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    done = _environment_in_child(base | {"LD_LIBRARY_PATH": str(lib)}, hide)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[1] == str(lib)  # returned as it was: nothing added
    done = _environment_in_child(base, hide)
    assert done.returncode != 0 and "pip install nvidia-cuda-runtime-cu12" in done.stderr, done.stderr[-2000:]


def test_a_pinned_workload_measures_its_version_and_not_the_newest(tiny_models: Path, tmp_path: Path) -> None:
    # charlm1-*: the bench pins charlm/1 with -x 1 (the file the Triton figures were measured on) while the
    # default charlm is a newer version. A repository with charlm/1 and charlm/2: every step perf_analyzer sends
    # with the bench's flags lands on version 1, none on the newest; a workload whose version is not committed is
    # skipped by the bench.
    import grpc

    from service.api.gen.inference import grpc_service_pb2 as pb
    from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc

    repo = tmp_path / "repo"
    shutil.copytree(tiny_models / "charlm", repo / "charlm")
    shutil.copytree(repo / "charlm" / "1", repo / "charlm" / "2")
    pinned = pa.WORKLOADS["charlm1-stream"]
    assert pinned.model == "charlm" and pinned.version == "1" and pinned.committed(repo)
    assert not pa.Workload("x", "charlm", True, True, version="3").committed(repo)
    assert not pa.WORKLOADS["sentiment"].committed(repo)
    cmd = pa.command("T", pinned, 4, tmp_path / "data.json", tmp_path / "r.csv", 2000)
    assert cmd[cmd.index("-x") + 1] == "1"
    assert "-x" not in pa.command("T", pa.WORKLOADS["charlm-stream"], 4, tmp_path / "d.json", tmp_path / "r.csv", 2000)
    proc, ports = start_server(repo, tmp_path)
    try:
        target = f"127.0.0.1:{ports['grpc_port']}"
        cmd = short_run(pinned, target, "grpc", tmp_path, 2)
        assert cmd[cmd.index("-x") + 1] == "1"
        done = subprocess.run(cmd, env=pa.environment(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        with grpc.insecure_channel(target) as channel:
            stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(pb.ModelStatisticsRequest(name="charlm"))
        counts = {s.version: s.inference_count for s in stats.model_stats}
        assert counts.get("1", 0) >= 100 and counts.get("2", 0) == 0, counts
    finally:
        stop_server(proc)


def test_the_bench_reports_the_busiest_engines_cpu(tiny_models: Path, tmp_path: Path) -> None:
    """A server of two frontends and two engines, measured as bench.perf measures it: its processes are listed
    engines first (from the ready file), and the engine CPU it reports is one engine's, within the server's."""
    from bench import perf
    from bench.launch import serve

    with serve(tiny_models, {"SEQSERVE_ENGINES": "2", "SEQSERVE_LOG_LEVEL": "WARNING"}, workers=2) as served:
        server = perf.Server.of("two engines", served)
        assert server.engines == 2 and server.pids[:2] == list(served.engine_pids) and len(server.pids) >= 4
        r = pa.run(served.target, pa.WORKLOADS["charlm-stream"], 4, tmp_path, pa.environment(), lambda: server.pids,
                   window_ms=500, engines=server.engines)  # fmt: skip
    assert r.engine_cpu_s is not None and 0 < r.engine_cpu_s < r.server_cpu_s
