"""A real ``seqserve serve`` process over tiny exported models, for the KServe v2 tests.

The server runs as a subprocess (not in the pytest process) and tritonclient runs in yet another interpreter:
tritonclient's ``inference`` protos and ours must never meet in one protobuf descriptor pool.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.kserve.procs import CLIENT_SCRIPT, start_server, stop_server


@pytest.fixture(scope="session")
def kserve_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untrained tiny sentiment/charlm/forecaster models under the names the KServe contract uses; charlm has
    versions 1 and 2."""
    from tests.tiny_models import export_tiny

    root = tmp_path_factory.mktemp("kserve-models")
    for task, name in (("sentiment", "sentiment"), ("charlm", "charlm"), ("forecast", "forecaster")):
        export_tiny(task, root, name=name)
    export_tiny("charlm", root, name="charlm", version=2, seed=1)  # newest version, other weights
    return root


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
