"""Start and stop a real ``seqserve serve`` process (127.0.0.1, free ports) for the KServe v2 tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

SEQSERVE = Path(sys.executable).parent / "seqserve"
CLIENT_SCRIPT = Path(__file__).parent / "triton_client.py"


def start_server(repo: Path, workdir: Path, **env: str) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """Starts ``seqserve serve`` on free ports (127.0.0.1) and waits for its ready file."""
    ready = workdir / "ready.json"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")} | env
    cmd = [str(SEQSERVE), "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    with (workdir / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            [*cmd, "--models", str(repo), "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT, env=environ
        )
    deadline = time.monotonic() + 120
    while True:
        try:
            ports: dict[str, int] = json.loads(ready.read_text())
            return proc, ports
        except (FileNotFoundError, json.JSONDecodeError):
            pass  # not written (completely) yet
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"seqserve did not start:\n{(workdir / 'server.log').read_text()[-4000:]}")
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
