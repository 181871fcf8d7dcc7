"""A real ``seqserve serve`` subprocess on free loopback ports, with extra ``SEQSERVE_*`` settings, for the
benchmarks that need their own server; any process that writes a ready file (``process``: the floor server)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
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

from bench.cli import ROOT


@dataclass(frozen=True)
class Served:
    target: str  # 127.0.0.1:<grpc port>
    pid: int
    metrics_port: int
    engine_pids: tuple[int, ...] = ()  # a server of several processes: its engines, the first one's pid first


def server_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment minus its SEQSERVE_* variables (a server under test gets only the settings it is
    given), plus ``extra``."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")} | extra


def start(
    cmd: list[str], ready: Path, log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Starts ``cmd`` in ``cwd`` (output to ``log``) and waits up to 120 s for it to write the JSON file ``ready``:
    (process, ready JSON). A process that exits or times out first is killed and reported with the end of its log;
    one whose wait is cut short (SIGTERM's ``SystemExit`` in a bench, Ctrl-C) is stopped before the exception goes
    on, or it would outlive the bench (nobody else holds it yet). ``python -m`` imports from ``cwd`` first: another
    checkout's ``cwd`` runs that checkout's code (``bench.regress``)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                info: dict[str, Any] = json.loads(ready.read_text())
                return proc, info
            except (FileNotFoundError, json.JSONDecodeError):
                pass  # not written (completely) yet
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{cmd[:4]} did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.1)
    except BaseException:
        if proc.poll() is None:
            stop(proc)
        raise


def stop(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """SIGTERM (a graceful stop), then SIGKILL if it is still running after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def process(
    cmd: list[str], ready: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> Iterator[tuple[dict[str, Any], int]]:
    """``start`` (its output goes to ``ready`` with the suffix ``.log``); yields (ready JSON, pid); ``stop`` on exit."""
    proc, info = start(cmd, ready, ready.with_suffix(".log"), env, cwd)
    try:
        yield info, proc.pid
    finally:
        stop(proc)


def serve_flags(models: Path, ready: Path, workers: int | None = None) -> list[str]:
    """``seqserve serve``'s flags for a bench's server: any free ports (written to the JSON file ``ready``),
    ``models``, the CPU; ``workers`` None = its default worker count."""
    flags = ["--port", "0", "--metrics-port", "0", "--models", str(models), "--device", "cpu"]
    flags += ["--ready-file", str(ready)]
    return flags if workers is None else [*flags, "--workers", str(workers)]


@contextmanager
def serve(
    models: Path, env: dict[str, str] | None = None, workers: int | None = None, code: Path = ROOT
) -> Iterator[Served]:
    """The server runs with the caller's environment minus its SEQSERVE_* variables, plus ``env``; ``workers``
    None = its default worker count; ``code``: the checkout whose ``service`` it runs (another commit's worktree)."""
    environ = server_env(env or {})
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        cmd = [sys.executable, "-m", "service.cli", "serve", *serve_flags(models, ready, workers)]
        with process(cmd, ready, environ, code) as (ports, pid):
            engines = tuple(int(p) for p in ports.get("engine_pids", ()))
            yield Served(f"127.0.0.1:{ports['grpc_port']}", pid, int(ports["metrics_port"]), engines)


def rss_bytes(pid: int) -> int:
    """Resident set size of the process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_mib(pid: int) -> float:
    return rss_bytes(pid) / 2**20


def cpu_seconds(*pids: int) -> float:
    """User + system CPU time of ``pids`` so far (from /proc; a process that is gone counts 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def metric_families(metrics_port: int) -> list[Any]:
    """The server's /metrics, parsed (prometheus_client metric families)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        return list(text_string_to_metric_families(r.read().decode()))


def first_message(proc: mp.process.BaseProcess, messages: mp.Queue[Any], timeout: float = 600.0) -> Any:
    """The first thing child ``proc`` puts on ``messages``. A child that dies first (its traceback is on stderr)
    fails this at once, not after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return messages.get(timeout=1.0)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"child process {proc.name} exited with {proc.exitcode} before answering") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"child process {proc.name} did not answer within {timeout:g}s") from None
