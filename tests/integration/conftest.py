"""Real processes for the integration tests: ``seqserve serve`` on tiny exported models, and a real Prometheus
scraping it every second. Both listen on 127.0.0.1 only and are stopped (SIGTERM, then SIGKILL) in teardown."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0  # bounded waits; generous because the CI box is shared


def wait_for(what: str, check: Callable[[], Any], timeout: float = START_TIMEOUT_S, every: float = 0.2) -> Any:
    """Polls ``check`` until it returns something truthy; fails with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@dataclass
class SeqServe:
    grpc_target: str
    metrics_port: int
    log: Path
    max_sessions: int
    http_port: int  # the REST port, with HTTP_MAX_CONNECTIONS slots
    http_slots: int


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import export_tiny  # torch: only the test process imports it, never the server

    root = tmp_path_factory.mktemp("models")
    for task, name in (("sentiment", "sentiment"), ("charlm", "charlm"), ("forecast", "forecaster")):
        export_tiny(task, root, name=name)
    return root


@pytest.fixture(scope="module")
def seqserve(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeqServe]:
    tmp = tmp_path_factory.mktemp("seqserve")
    ready_file, log = tmp / "ready.json", tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
    # A 3-session store that refuses when full: the traffic then also produces a server-side error code
    # (RESOURCE_EXHAUSTED), so the error-ratio expressions have series to return.
    max_sessions = 3
    env.update(SEQSERVE_MAX_SESSIONS=str(max_sessions), SEQSERVE_SESSION_FULL_POLICY="reject", PYTHONUNBUFFERED="1")
    # The REST port with 2 connection slots per frontend: the traffic fills them, so refused connections are counted.
    http_slots = 2
    env.update(SEQSERVE_HTTP_PORT="0", SEQSERVE_HTTP_MAX_CONNECTIONS=str(http_slots))
    # The response cache on: the traffic's second round is answered from it (its panels and counters have series).
    env.update(SEQSERVE_RESPONSE_CACHE_BYTES=str(1 << 20))
    # Triton's metric names too (from the engine: the server runs its default worker count).
    env.update(SEQSERVE_TRITON_METRICS="true")
    cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    cmd += ["--models", str(model_repo), "--ready-file", str(ready_file)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:

        def started() -> dict[str, int] | None:
            if proc.poll() is not None:
                raise AssertionError(f"seqserve exited with {proc.returncode}:\n{log_tail(log)}")
            return json.loads(ready_file.read_text()) if ready_file.exists() else None

        ports = wait_for("seqserve's ready file", started)
        metrics_port = int(ports["metrics_port"])
        wait_for("/readyz = 200", lambda: http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 200)
        grpc_target = f"127.0.0.1:{ports['grpc_port']}"
        yield SeqServe(grpc_target, metrics_port, log, max_sessions, int(ports["http_port"]), http_slots)
    finally:
        stop_process(proc)
        print("--- seqserve log (tail) ---\n" + log_tail(log))


def prometheus_binary() -> str:
    exe = shutil.which("prometheus")
    if exe is None and os.geteuid() == 0:  # CI and dev boxes run as root: install it rather than skip
        subprocess.run(["bash", str(ROOT / ".ci" / "install-sysdeps")], check=True, timeout=600)
        exe = shutil.which("prometheus")
        assert exe is not None, ".ci/install-sysdeps ran but prometheus is still not on PATH"
    if exe is None:
        unavailable("prometheus is not installed and we are not root to install it (make sysdeps)")
    return exe


@dataclass
class Prometheus:
    url: str
    config: dict[str, Any]
    log: Path


def shipped_job(metrics_port: int) -> dict[str, Any]:
    """The shipped scrape job (its labels and relabelling included), with one server as its only target."""
    import yaml

    shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in shipped["scrape_configs"] if j["job_name"] == "seqserve"]
    job["static_configs"] = [{**sc, "targets": [f"127.0.0.1:{metrics_port}"]} for sc in job["static_configs"]]
    return dict(job)


@contextlib.contextmanager
def run_prometheus(tmp: Path, job: dict[str, Any]) -> Iterator[Prometheus]:
    """A real Prometheus scraping with ``job`` every second and evaluating our alert rules, until the block ends."""
    exe = prometheus_binary()
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "deploy" / "prometheus" / "alerts.yml")],  # our real alert rules
        "scrape_configs": [job],
    }
    (tmp / "prometheus.yml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    log = tmp / "prometheus.log"
    port = free_port()
    cmd = [exe, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}"]
    cmd += [f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn", "--enable-feature=exemplar-storage"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {proc.returncode}:\n{log_tail(log)}")
            return http_get(url + "/-/ready")[0] == 200

        wait_for("prometheus /-/ready", ready)
        yield Prometheus(url, config, log)
    finally:
        stop_process(proc)
        print("--- prometheus log (tail) ---\n" + log_tail(log))


@pytest.fixture(scope="module")
def prometheus(seqserve: SeqServe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    with run_prometheus(tmp_path_factory.mktemp("prometheus"), shipped_job(seqserve.metrics_port)) as prom:
        yield prom
