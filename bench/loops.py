"""How many turns of the event loop, and how many callbacks, a served request takes: seqserve (one worker) against
the canned-response floor and the lean reference.

Every one of these servers runs its requests on one ``asyncio`` loop, and each turn of that loop (a wait on
epoll, then the callbacks that became ready) and each callback it runs (a task's step, a future's done callback,
gRPC's completion of a batch of operations) costs the process CPU besides the request's own work. Is seqserve's gap
to the floor there, in more turns and callbacks per request, or in the Python each callback runs?

Each server runs under a counter (``python -m bench.loops serve MODULE [ARGS]``: it wraps ``asyncio``'s
``BaseEventLoop._run_once`` and ``events.Handle._run`` with a count each, then runs MODULE as ``python -m``
would; SIGUSR2 makes it append both counts to the file ``$BENCH_LOOPS_FILE``). perf_analyzer drives each with
one workload, and the counts read before and after its run, over the requests the server's statistics counted
in between, give turns and callbacks per request (perf_analyzer's warm-up and its measurement windows alike).
The counting itself costs CPU, so the throughputs this prints are lower than ``bench.layers``' and only tell the
runs apart; the counts are what it measures. The floor answers with responses recorded from the seqserve it
runs, the lean server (``bench/lean.py``) computes the char-LM step on them.

    python -m bench.loops [--workloads charlm1-stream charlm1-unary] [--concurrency 16] [--rounds 1]
"""

from __future__ import annotations

import asyncio.base_events
import asyncio.events
import contextlib
import os
import runpy
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from bench import cli, pa
from bench.floor import record
from bench.launch import process, serve_flags, server_env
from bench.perf import alternating, canned_requests, warm
from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc

COUNTS_FILE = "BENCH_LOOPS_FILE"  # where a counted server appends "<turns> <callbacks>" on SIGUSR2
WORKLOADS = ["charlm1-stream", "charlm1-unary"]
SERVERS = ("floor", "lean", "seqserve")


# --- the counted server -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def counting(counts: list[int]) -> Iterator[list[int]]:
    """Inside the block, every turn of any asyncio loop of this process adds one to ``counts[0]`` and every callback
    it runs (a ``Handle``'s or a ``TimerHandle``'s) one to ``counts[1]``; the loop's own methods come back after."""
    run_once = asyncio.base_events.BaseEventLoop._run_once  # type: ignore[attr-defined]
    run_handle = asyncio.events.Handle._run

    def counted_run_once(self: asyncio.base_events.BaseEventLoop) -> None:
        counts[0] += 1
        run_once(self)

    def counted_run(self: asyncio.events.Handle) -> None:
        counts[1] += 1
        run_handle(self)

    asyncio.base_events.BaseEventLoop._run_once = counted_run_once  # type: ignore[attr-defined]
    asyncio.events.Handle._run = counted_run  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        asyncio.base_events.BaseEventLoop._run_once = run_once  # type: ignore[attr-defined]
        asyncio.events.Handle._run = run_handle  # type: ignore[method-assign]


def serve_counted(module: str, args: list[str]) -> None:
    """Runs ``module`` as ``python -m module args`` would, with the loop counted; SIGUSR2 appends the counts to
    ``$BENCH_LOOPS_FILE``."""
    out = Path(os.environ[COUNTS_FILE])
    with counting([0, 0]) as counts:

        def report(signum: int, frame: object) -> None:
            with out.open("a") as f:
                f.write(f"{counts[0]} {counts[1]}\n")

        signal.signal(signal.SIGUSR2, report)
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)


# --- the measurement --------------------------------------------------------------------------------------------
class Counted:
    """A server started under the counter: reads its counts (``counts``) and the requests it served."""

    def __init__(self, label: str, target: str, pid: int, counts: Path) -> None:
        self.label, self.target, self.pid, self.file = label, target, pid, counts

    def counts(self, timeout: float = 10.0) -> tuple[int, int]:
        """(turns, callbacks) so far: signals the server and waits for its new line."""
        seen = self._lines()
        os.kill(self.pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self._lines()
            if len(lines) > len(seen):
                turns, callbacks = lines[-1].split()
                return int(turns), int(callbacks)
            time.sleep(0.02)
        raise RuntimeError(f"{self.label} did not report its loop counts within {timeout:g} s")

    def _lines(self) -> list[str]:
        """The lines the server has finished writing (not one it is in the middle of)."""
        try:
            return self.file.read_text().split("\n")[:-1]
        except FileNotFoundError:
            return []

    def served(self, w: pa.Workload) -> int:
        """The requests of ``w``'s model (its pinned version) the server has answered, from its statistics."""
        with grpc.insecure_channel(self.target) as channel:
            stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                pb.ModelStatisticsRequest(name=w.model, version=w.version), timeout=30
            )
        return max((s.inference_stats.success.count for s in stats.model_stats), default=0)


@contextlib.contextmanager
def counted(label: str, module_args: list[str], folder: Path, env: dict[str, str]) -> Iterator[Counted]:
    """``python -m bench.loops serve MODULE ARGS`` (``module_args``; they name ``folder / <label>.json`` as the
    ready file) with its counts in ``folder / <label>.counts``."""
    counts = folder / f"{label}.counts"
    cmd = [sys.executable, "-m", "bench.loops", "serve", *module_args]
    with process(cmd, folder / f"{label}.json", env | {COUNTS_FILE: str(counts)}) as (info, pid):
        yield Counted(label, f"127.0.0.1:{info['grpc_port']}", pid, counts)


def servers(running: contextlib.ExitStack, models: Path, folder: Path) -> list[Counted]:
    """The three servers, counted and left running on ``running``: seqserve first (the floor and the lean server
    answer with responses recorded from it)."""
    env = server_env({"SEQSERVE_LOG_LEVEL": "WARNING"})
    seq = ["service.cli", "serve", *serve_flags(models, folder / "seqserve.json", workers=1)]
    ours = running.enter_context(counted("seqserve", seq, folder, env))
    warm(ours.target, models)
    record(ours.target, canned_requests(models), folder / "canned")
    floor = ["bench.floor", "--canned", str(folder / "canned"), "--ready-file", str(folder / "floor.json")]
    lean = ["bench.lean", "--canned", str(folder / "canned"), "--models", str(models), "--ready-file",
            str(folder / "lean.json")]  # fmt: skip
    return [
        running.enter_context(counted("floor", floor, folder, env)),
        running.enter_context(counted("lean", lean, folder, env)),
        ours,
    ]


def measure(
    server: Counted, w: pa.Workload, c: int, folder: Path, env: dict[str, str], window_ms: int
) -> dict[str, Any]:
    """One perf_analyzer run against ``server``: its turns and callbacks per request over the run."""
    served0, (turns0, calls0) = server.served(w), server.counts()
    r = pa.run(server.target, w, c, folder, env, lambda: [server.pid], window_ms=window_ms)
    turns1, calls1 = server.counts()
    requests = server.served(w) - served0
    if requests <= 0:
        raise RuntimeError(f"{server.label} counted no {w.model} requests during a perf_analyzer run")
    return {
        "server": server.label,
        "workload": w.name,
        "concurrency": c,
        "requests": requests,
        "throughput": r.throughput,
        "turns_per_request": (turns1 - turns0) / requests,
        "callbacks_per_request": (calls1 - calls0) / requests,
    }


def run(models: Path, workloads: list[str], conc: list[int], rounds: int = 1, window_ms: int = 2000) -> dict[str, Any]:
    """Per workload and concurrency, the floor, the lean server and seqserve measured back to back ``rounds``
    times in alternating order; ``rows`` per measurement, ``summary`` (medians per server) per workload."""
    unpinned = [name for name in workloads if not pa.WORKLOADS[name].version]
    if unpinned:  # the floor's and the lean server's statistics answer for the model, not a version
        raise ValueError(f"workloads {', '.join(unpinned)} name no model version; pin one (-x)")
    env = pa.environment()
    chosen = [pa.WORKLOADS[name] for name in workloads if pa.WORKLOADS[name].committed(models)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        folder = Path(tmp)
        started = servers(running, models, folder)
        for w in chosen:
            for c in conc:
                for r, server in alternating(started, rounds):
                    row = measure(server, w, c, folder, env, window_ms) | {"round": r}
                    print(f"  {server.label:>8} {w.name:>14} c={c:<3} round {r} {row['requests']:>7} requests  "
                          f"{row['turns_per_request']:6.2f} turns {row['callbacks_per_request']:6.2f} callbacks "
                          "per request", flush=True)  # fmt: skip
                    rows.append(row)
    return {"workloads": [w.name for w in chosen], "concurrency": conc, "rounds": rounds, "rows": rows,
            "summary": summary(rows)}  # fmt: skip


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (workload, concurrency, server): the median turns and callbacks per request over its rounds."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["workload"], row["concurrency"], row["server"]), []).append(row)
    return [
        {
            "workload": workload,
            "concurrency": c,
            "server": server,
            "turns_per_request": statistics.median(m["turns_per_request"] for m in measured),
            "callbacks_per_request": statistics.median(m["callbacks_per_request"] for m in measured),
        }
        for (workload, c, server), measured in groups.items()
    ]


def print_table(results: dict[str, Any]) -> None:
    print(f"\nEvent-loop turns and callbacks per request (one process each; medians of {results['rounds']} "
          "alternating rounds):")  # fmt: skip
    print(f"  {'workload':>14} {'c':>3}  {'server':<9} {'turns':>7} {'callbacks':>10}")
    for s in results["summary"]:
        print(f"  {s['workload']:>14} {s['concurrency']:>3}  {s['server']:<9} {s['turns_per_request']:>7.2f} "
              f"{s['callbacks_per_request']:>10.2f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["serve"]:  # a counted server: python -m bench.loops serve MODULE [ARGS]
        serve_counted(args_in[1], args_in[2:])
        return 0
    ap = cli.parser(__doc__, "loops.json")
    pa.add_options(ap, WORKLOADS, [16], rounds=1, choices=WORKLOADS)
    args = ap.parse_args(args_in)
    results = run(args.models, args.workloads, args.concurrency, args.rounds)
    cli.write_json(args.out, results)
    print_table(results)
    return 0


if __name__ == "__main__":
    cli.run(main)
