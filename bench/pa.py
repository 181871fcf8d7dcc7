"""Triton's ``perf_analyzer`` against a KServe v2 endpoint: library set-up, workloads, runs, parsed results.

perf_analyzer ships in the dev venv with ``tritonclient`` and needs two shared libraries it does not bring:
``libb64.so.0d`` (Debian's ``libb64-0d``) and ``libcudart.so.12`` (PyPI's ``nvidia-cuda-runtime-cu12``; no GPU
is used). ``environment()`` installs what is missing (apt as root, pip into this interpreter) and returns the
environment to run it with; a library the dynamic loader already finds (``LD_LIBRARY_PATH``) is used as it is, so
a machine without a package index runs it too. ``PERF_ANALYZER`` names another binary (Triton's SDK image).

Workloads (the issue's): one SST-2 sentence per request for ``sentiment``; one character per request for
``charlm`` in sequences of 100 steps, unary (ModelInfer) or ``--streaming`` (ModelStreamInfer).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.launch import cpu_seconds
from service.argtypes import count

# The binary tritonclient's wheel puts beside this interpreter; PERF_ANALYZER names another (Triton's SDK image).
PERF_ANALYZER = Path(os.environ.get("PERF_ANALYZER") or Path(sys.executable).parent / "perf_analyzer")
SENTENCES = [
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "allows us to hope that nolan is poised to embark a major career as a commercial yet inventive filmmaker .",
    "the acting , costumes , music , cinematography and sound are all astounding given the production 's "
    "austere locales .",
    "it 's slow -- very , very slow .",
    "although laced with humor and a few fanciful touches , the film is a refreshingly serious look at young women .",
]
CHARS = "First Citizen: Before we proceed any further, hear me speak."


@dataclass(frozen=True)
class Workload:
    name: str  # "sentiment", "charlm-stream", "charlm-unary"
    model: str
    streaming: bool
    sequences: bool
    version: str = ""  # "" = no -x: perf_analyzer finds the newest through ModelStatistics, as clients do

    def committed(self, models: Path) -> bool:
        """Whether ``models`` holds this workload's model (and its pinned version)."""
        return (models / self.model / self.version).is_dir()


WORKLOADS = {
    "sentiment": Workload("sentiment", "sentiment", streaming=False, sequences=False),
    "charlm-stream": Workload("charlm-stream", "charlm", streaming=True, sequences=True),
    "charlm-unary": Workload("charlm-unary", "charlm", streaming=False, sequences=True),
    # charlm/1 (2x256), pinned with -x 1: the ONNX file the Triton figures were measured on; the default
    # charlm (charlm/2, 2x512) does about four times its arithmetic per step
    "charlm1-stream": Workload("charlm1-stream", "charlm", streaming=True, sequences=True, version="1"),
    "charlm1-unary": Workload("charlm1-unary", "charlm", streaming=False, sequences=True, version="1"),
    # the opt-in static int8 char LM (its newest, charlm-int8/3: charlm/2 with int8 weights, batch-invariant
    # answers), for comparison with charlm-stream
    "int8-stream": Workload("int8-stream", "charlm-int8", streaming=True, sequences=True),
}


def add_options(
    ap: argparse.ArgumentParser,
    workloads: list[str],
    concurrency: list[int],
    rounds: int,
    choices: list[str] | None = None,
) -> None:
    """The options every perf_analyzer bench takes: ``--workloads`` (of ``choices``, default every workload),
    ``--concurrency`` and ``--rounds``, with the caller's defaults."""
    ap.add_argument("--workloads", nargs="+", default=workloads, choices=choices or list(WORKLOADS))
    ap.add_argument("--concurrency", nargs="+", type=count(1), default=concurrency)
    ap.add_argument("--rounds", type=count(1), default=rounds, help="interleaved rounds per workload and concurrency")


@dataclass
class Result:
    workload: str
    concurrency: int
    throughput: float  # inferences/s (client)
    p50_us: float
    p99_us: float
    server_cpu_s: float  # CPU seconds of the server processes during the run
    client_cpu_s: float  # CPU seconds of perf_analyzer
    requests: float  # approximate requests sent during the run (throughput x wall)
    wall_s: float
    server_queue_us: float | None = None  # perf_analyzer's server-side breakdown (from ModelStatistics)
    server_compute_us: float | None = None
    # Of server_cpu_s, the engine's: a server of several processes (`--workers N`) lists its engines first, the
    # process `seqserve serve` started first of them; None for one process. One engine serves every frontend, on
    # one event loop; with `--engines K`, the busiest engine's (each serves about 1/K of the steps).
    engine_cpu_s: float | None = None

    def per_1k(self, seconds: float) -> float:
        return seconds / (max(self.requests, 1.0) / 1000)

    def cpu_per_1k(self) -> tuple[float, float]:
        return self.per_1k(self.server_cpu_s), self.per_1k(self.client_cpu_s)

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["server_cpu_s_per_1k"], d["client_cpu_s_per_1k"] = self.cpu_per_1k()
        if self.engine_cpu_s is not None:
            d["engine_cpu_s_per_1k"] = self.per_1k(self.engine_cpu_s)
        return d


def cudart_dir() -> Path | None:
    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations or [] if spec is not None else []:
        lib = Path(root) / "cuda_runtime" / "lib"
        if (lib / "libcudart.so.12").exists():
            return lib
    return None


def _loadable(name: str) -> bool:
    """Whether the dynamic loader finds ``name`` (LD_LIBRARY_PATH included, as perf_analyzer's loader would)."""
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def environment(install: bool = True) -> dict[str, str]:
    """The environment perf_analyzer runs in; installs its two libraries first when ``install`` and missing."""
    if not PERF_ANALYZER.exists():
        raise RuntimeError(f"{PERF_ANALYZER} is missing: install the dev extra (tritonclient ships it)")
    if not _loadable("libb64.so.0d") and install:
        apt = shutil.which("apt-get")
        if apt is None or os.geteuid() != 0:
            raise RuntimeError("perf_analyzer needs libb64.so.0d: apt-get install libb64-0d (as root)")
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run([apt, "install", "-y", "-qq", "libb64-0d"], env=env, capture_output=True).returncode:
            subprocess.run([apt, "update", "-qq"], env=env, check=True, capture_output=True)
            subprocess.run([apt, "install", "-y", "-qq", "libb64-0d"], env=env, check=True, capture_output=True)
    if _loadable("libcudart.so.12"):  # already on the loader's path (LD_LIBRARY_PATH, ldconfig)
        return dict(os.environ)
    lib = cudart_dir()
    if lib is None and install:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "nvidia-cuda-runtime-cu12"], check=True)
        importlib.invalidate_caches()
        lib = cudart_dir()
    if lib is None:
        raise RuntimeError("perf_analyzer needs libcudart.so.12: pip install nvidia-cuda-runtime-cu12")
    path = os.environ.get("LD_LIBRARY_PATH", "")
    return os.environ | {"LD_LIBRARY_PATH": f"{lib}:{path}" if path else str(lib)}


def input_data(workload: Workload, folder: Path) -> Path:
    """perf_analyzer's ``--input-data`` JSON: sentences, or one character per step."""
    if workload.model == "sentiment":
        steps = [{"TEXT": {"content": [s], "shape": [1]}} for s in SENTENCES]
        data: dict[str, object] = {"data": steps}
    else:  # one stream of characters; perf_analyzer walks it step by step along each sequence
        data = {"data": [[{"TEXT": {"content": [c], "shape": [1]}} for c in CHARS]]}
    path = folder / f"{workload.name}.json"
    path.write_text(json.dumps(data))
    return path


def workload_flags(workload: Workload, sequence_length: int = 100) -> list[str]:
    """The perf_analyzer flags that make a run ``workload``: sequences of ``sequence_length`` steps, streaming, and
    ``-x`` when it pins a version."""
    flags = []
    if workload.sequences:
        flags += ["--sequence-length", str(sequence_length), "--sequence-length-variation", "0"]
    if workload.streaming:
        flags.append("--streaming")
    if workload.version:
        flags += ["-x", workload.version]
    return flags


def command(target: str, workload: Workload, concurrency: int, data: Path, report: Path, window_ms: int) -> list[str]:
    cmd = [str(PERF_ANALYZER), "-m", workload.model, "-u", target, "-i", "grpc", "--input-data", str(data)]
    # Stability on average latency within 30% over 3 windows (this box is shared); the CSV has p50..p99 anyway.
    cmd += ["--concurrency-range", str(concurrency), "-p", str(window_ms), "-s", "30", "-r", "10", "-f", str(report)]
    return cmd + workload_flags(workload)


def run(
    target: str,
    workload: Workload,
    concurrency: int,
    folder: Path,
    env: dict[str, str],
    server_pids: Callable[[], list[int]],
    window_ms: int = 2000,
    timeout: float = 180.0,
    engines: int = 1,
) -> Result:
    """One perf_analyzer run (no ``-x`` unless the workload pins a version: it finds the newest through
    ModelStatistics). ``engines``: how many of ``server_pids()``, first, are engines (the busiest one's CPU is
    reported)."""
    data = input_data(workload, folder)
    report = folder / f"{workload.name}-c{concurrency}.csv"
    pids = server_pids()
    cpu0, usage0, t0 = [cpu_seconds(p) for p in pids], resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    for attempt in range(3):  # an unstable measurement (exit 2) is retried with a longer window
        done = subprocess.run(
            command(target, workload, concurrency, data, report, window_ms * 2**attempt),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 2:
            break
    wall = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = [cpu_seconds(p) for p in pids]  # per process: the engine's is the first (one process: no engine)
    server_cpu = sum(cpu1) - sum(cpu0)
    engine_cpu = max(cpu1[i] - cpu0[i] for i in range(max(1, engines))) if len(pids) > 1 else None
    if done.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    with report.open(newline="") as f:
        row = next(csv.DictReader(f))
    throughput = float(row["Inferences/Second"])
    client_cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)

    def opt(key: str) -> float | None:
        value = row.get(key)
        return float(value) if value not in (None, "") else None

    queue = opt("Server Queue")
    compute = [v for v in (opt("Server Compute Input"), opt("Server Compute Infer"), opt("Server Compute Output"))]
    return Result(
        workload=workload.name,
        concurrency=concurrency,
        throughput=throughput,
        p50_us=float(row["p50 latency"]),
        p99_us=float(row["p99 latency"]),
        server_cpu_s=server_cpu,
        client_cpu_s=client_cpu,
        requests=throughput * wall,
        wall_s=wall,
        server_queue_us=queue,
        server_compute_us=sum(v for v in compute if v is not None) if any(v is not None for v in compute) else None,
        engine_cpu_s=engine_cpu,
    )
