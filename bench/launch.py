"""A real ``seqserve serve`` subprocess on free loopback ports, with extra ``SEQSERVE_*`` settings, for the
benchmarks that need their own server (``bench.sessions``, ``bench.hostile``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Served:
    target: str  # 127.0.0.1:<grpc port>
    pid: int
    metrics_port: int


@contextmanager
def serve(models: Path, env: dict[str, str] | None = None) -> Iterator[Served]:
    """The server runs with the caller's environment minus its SEQSERVE_* variables, plus ``env``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")} | (env or {})
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        cmd = [sys.executable, "-m", "service.cli", "serve", "--port", "0", "--metrics-port", "0"]
        cmd += ["--models", str(models), "--device", "cpu", "--ready-file", str(ready)]
        log = Path(tmp) / "server.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=environ)
        try:
            deadline = time.monotonic() + 120
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"bench: server did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.1)
            ports = json.loads(ready.read_text())
            yield Served(f"127.0.0.1:{ports['grpc_port']}", proc.pid, int(ports["metrics_port"]))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric_families(metrics_port: int) -> list[Any]:
    """The server's /metrics, parsed (prometheus_client metric families)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        return list(text_string_to_metric_families(r.read().decode()))
