"""A real ``seqserve serve`` process over tiny exported models, for the KServe v2 tests.

The server runs as a subprocess (not in the pytest process) and tritonclient runs in yet another interpreter:
tritonclient's ``inference`` protos and ours must never meet in one protobuf descriptor pool.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SEQSERVE = Path(sys.executable).parent / "seqserve"
CLIENT_SCRIPT = Path(__file__).parent / "triton_client.py"


@pytest.fixture(scope="session")
def kserve_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untrained tiny sentiment/charlm/forecaster models under the names the KServe contract uses."""
    from training.export import export_tiny

    root = tmp_path_factory.mktemp("kserve-models")
    for task, name in (("sentiment", "sentiment"), ("charlm", "charlm"), ("forecast", "forecaster")):
        export_tiny(task, root, name=name)
    return root


def start_server(repo: Path, workdir: Path, **env: str) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """Starts ``seqserve serve`` on free ports (127.0.0.1) and waits for its ready file."""
    ready = workdir / "ready.json"
    log = (workdir / "server.log").open("wb")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")} | env
    cmd = [str(SEQSERVE), "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    proc = subprocess.Popen(
        [*cmd, "--models", str(repo), "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT, env=environ
    )
    deadline = time.monotonic() + 120
    while not (ready.exists() and ready.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"seqserve did not start:\n{(workdir / 'server.log').read_text()[-4000:]}")
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def kserve_server(kserve_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """Ports of a running server: {"grpc_port": ..., "metrics_port": ...}."""
    proc, ports = start_server(kserve_repo, tmp_path_factory.mktemp("kserve-server"))
    try:
        yield ports
    finally:
        stop_server(proc)


@pytest.fixture(scope="session")
def triton_report(kserve_server: dict[str, int]) -> dict[str, object]:
    """Runs every tritonclient scenario once (in its own interpreter) and returns its JSON report."""
    url = f"127.0.0.1:{kserve_server['grpc_port']}"
    done = subprocess.run(
        [sys.executable, str(CLIENT_SCRIPT), "--url", url], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, f"tritonclient script failed:\n{done.stderr[-4000:]}"
    report: dict[str, object] = json.loads(done.stdout)
    return report


@pytest.fixture(scope="module")
def short_idle_server(kserve_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """A second server whose sequences expire after 1 s idle (Triton's max_sequence_idle_microseconds)."""
    env = {"SEQSERVE_SEQUENCE_IDLE_SECONDS": "1", "SEQSERVE_REAPER_INTERVAL_SECONDS": "0.2"}
    proc, ports = start_server(kserve_repo, tmp_path_factory.mktemp("kserve-short-idle"), **env)
    try:
        yield ports
    finally:
        stop_server(proc)
