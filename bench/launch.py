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


def watch_live(target: str, stop: Any, out: Any, every: float, metadata: tuple[tuple[str, str], ...]) -> None:
    """KServe ``ServerLive`` every ``every`` seconds until ``stop`` (an event) is set; on ``out`` (a queue): "ready"
    once its channel is up, then, once, the (start time, seconds) of every probe answered and the count of every
    status code refused. It runs in a process of its own (``LiveWatcher``): a thread of the bench's process would
    time that process too, whose threads building and parsing megabyte requests hold the GIL for hundreds of
    milliseconds (bench.hostile, seed 44, 2026-12-06: a probe thread in the campaign's process saw a worst of
    515 ms where a probe process beside it saw 21 ms)."""
    import grpc

    from service.api.gen.inference import grpc_service_pb2 as pb

    seen: list[tuple[float, float]] = []
    refused: dict[str, int] = {}
    with grpc.insecure_channel(target) as channel:
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        request = pb.ServerLiveRequest().SerializeToString()
        grpc.channel_ready_future(channel).result(timeout=30)
        out.put("ready")
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                live(request, timeout=30, metadata=metadata)
            except grpc.RpcError as err:
                refused[err.code().name] = refused.get(err.code().name, 0) + 1
            else:
                seen.append((t0, time.perf_counter() - t0))
            time.sleep(every)
    out.put((seen, refused))


class LiveWatcher:
    """``watch_live`` in a process of its own, started (and its channel up) on construction; ``stop`` ends the
    probing, ``results`` collects it: (start time, seconds) of each probe answered, refusals by status code."""

    def __init__(self, target: str, every: float, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        ctx = mp.get_context("spawn")  # (a fork would copy this process's gRPC threads' state)
        self._stop, self._out = ctx.Event(), ctx.Queue()
        args = (target, self._stop, self._out, every, metadata)
        self._process = ctx.Process(target=watch_live, args=args, daemon=True, name="ServerLive watcher")
        self._process.start()
        first_message(self._process, self._out, timeout=60)  # "ready"

    def stop(self) -> None:
        self._stop.set()

    def results(self) -> tuple[list[tuple[float, float]], dict[str, int]]:
        self.stop()
        seen, refused = first_message(self._process, self._out, timeout=60)
        self._process.join(30)
        return seen, refused
