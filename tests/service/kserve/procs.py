"""Start and stop a real ``seqserve serve`` process (127.0.0.1, free ports) for the KServe v2 tests."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from bench.launch import server_env, start, stop

SEQSERVE = Path(sys.executable).parent / "seqserve"
CLIENT_SCRIPT = Path(__file__).parent / "triton_client.py"


def start_server(repo: Path, workdir: Path, **env: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Starts ``seqserve serve`` on free ports (127.0.0.1) and waits for its ready file (``bench.launch.start``):
    (process, the ready file's JSON: ports, and lists such as ``frontend_ports``)."""
    ready = workdir / "ready.json"
    cmd = [str(SEQSERVE), "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    return start(
        [*cmd, "--models", str(repo), "--ready-file", str(ready)], ready, workdir / "server.log", server_env(env)
    )


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    stop(proc, timeout=30)


def scrape(metrics_port: object) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """A server's /metrics as {sample name: {sorted labels: value}}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out
