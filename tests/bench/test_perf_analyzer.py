"""Triton's perf_analyzer runs against a real seqserve with no ``-x``, over gRPC and over the REST port (HTTP, its
default): it finds the model version through our ModelStatistics (inference_stats.queue.count) and prints our
server-side breakdown (queue, compute input / infer / output), and nothing it reads as inconsistent. A short run
on the tiny models; speed is the benchmark's business, not this test's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import pa
from tests.service.kserve.procs import start_server, stop_server


@pytest.fixture(scope="module")
def targets(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """{"grpc": the gRPC port, "http": the KServe REST port} of one server (default workers)."""
    proc, ports = start_server(tiny_models, tmp_path_factory.mktemp("perf-analyzer"), SEQSERVE_HTTP_PORT="0")
    try:
        yield {"grpc": f"127.0.0.1:{ports['grpc_port']}", "http": f"127.0.0.1:{ports['http_port']}"}
    finally:
        stop_server(proc)


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
    w = pa.WORKLOADS[workload]
    cmd = [str(pa.PERF_ANALYZER), "-m", w.model, "-u", targets[protocol], "-i", protocol]
    cmd += ["--input-data", str(pa.input_data(w, tmp_path)), "--concurrency-range", "4"]
    # Stability is the benchmark's concern: a wide threshold and enough windows that a busy machine passes.
    cmd += ["--measurement-mode", "count_windows", "--measurement-request-count", "200", "-s", "1000", "-r", "10"]
    if w.sequences:
        cmd += ["--sequence-length", "20", "--sequence-length-variation", "0"]
    if w.streaming:
        cmd.append("--streaming")
    assert "-x" not in cmd
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
    # Triton's cache_hit / cache_miss belong to its response cache, which we do not have: reporting anything there
    # (the char LM's prefix cache, at each sequence's start) made perf_analyzer flag our statistics as inconsistent.
    assert "cache hit/miss" not in out, out[-3000:]


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
