"""What a Prometheus scrape costs the engine of a multi-process server.

With ``--workers N`` the engine answers ``/metrics`` for the whole server: at each scrape it reads every frontend's
RPC metrics (their private ports) and sums them (``service/engine/metrics.py``), so its cost grows with the series
the frontends hold (service x method x model x status code, each latency histogram a few dozen samples) and comes
out of the process that batches every model's steps. This starts ``seqserve serve --workers N`` on ``--models``,
gives its frontends many series (five KServe model calls: ModelInfer without inputs, refused, ModelMetadata,
ModelConfig, ModelReady and ModelStatistics, on every model of the repository and on unknown names, over several
connections so that every frontend serves some), then scrapes the engine's ``/metrics`` ``--scrapes`` times and
prints the answer's size and, per scrape, the CPU time (from /proc) of the engine and of all the server's
processes (the frontends answer the engine's reads), and the scrape's wall time.

    python -m bench.scrape [--models models] [--workers 2] [--scrapes 10] [--code DIR] [--out bench/results/scrape.json]

``--code`` serves another checkout's ``service`` (e.g. a worktree of an earlier commit), so a change can be set
against what it replaced: the same models, the same calls.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from bench import cli
from bench.launch import cpu_seconds, serve
from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.argtypes import count

CONNECTIONS = 8  # (SO_REUSEPORT spreads connections over the frontends)
UNKNOWN = ("no-such-model-1", "no-such-model-2", "no-such-model-3")


def model_names(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir() if p.is_dir() and any(v.name.isdigit() for v in p.iterdir()))


def populate(target: str, names: list[str]) -> int:
    """Every frontend's series: each KServe model call on each model (``ModelInfer`` without inputs is refused:
    another status code), over ``CONNECTIONS`` connections. Returns the calls made."""
    calls = 0
    for _ in range(CONNECTIONS):
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for name in [*names, *UNKNOWN]:
                for method, request in (
                    (stub.ModelInfer, pb.ModelInferRequest(model_name=name)),
                    (stub.ModelMetadata, pb.ModelMetadataRequest(name=name)),
                    (stub.ModelConfig, pb.ModelConfigRequest(name=name)),
                    (stub.ModelReady, pb.ModelReadyRequest(name=name)),
                    (stub.ModelStatistics, pb.ModelStatisticsRequest(name=name)),
                ):
                    with contextlib.suppress(grpc.RpcError):  # (refusals too: their status codes are series)
                        method(request, timeout=30)
                    calls += 1
    return calls


def measure(models: Path, workers: int, scrapes: int, code: Path = cli.ROOT) -> dict[str, Any]:
    with serve(models, workers=workers, code=code) as served:
        calls = populate(served.target, model_names(models))
        engine, everyone = served.engine_pids[0], cli.server_processes(served.pid, served.engine_pids)
        rows = []
        for _ in range(scrapes + 1):  # (the first one not counted: the engine's first read of each frontend)
            before, wall = {p: cpu_seconds(p) for p in everyone}, time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=60) as r:
                size = len(r.read())
            wall, spent = time.perf_counter() - wall, {p: cpu_seconds(p) - before[p] for p in everyone}
            rows.append({"bytes": size, "wall_ms": 1e3 * wall, "engine_cpu_ms": 1e3 * spent[engine],
                         "server_cpu_ms": 1e3 * sum(spent.values())})  # fmt: skip
            time.sleep(0.2)  # (the processes' own work between scrapes stays out of the next one's CPU time)
    kept = rows[1:]
    return {
        "workers": workers,
        "code": str(code),
        "calls": calls,
        "scrapes": scrapes,
        "bytes": kept[-1]["bytes"],
        "processes": len(everyone),
        "engine_cpu_ms_mean": statistics.fmean(r["engine_cpu_ms"] for r in kept),
        "server_cpu_ms_mean": statistics.fmean(r["server_cpu_ms"] for r in kept),
        "wall_ms_median": statistics.median(r["wall_ms"] for r in kept),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "scrape.json")
    ap.add_argument("--workers", type=count(2), default=2)
    ap.add_argument("--scrapes", type=count(1), default=10)
    ap.add_argument("--code", type=Path, default=cli.ROOT, help="the checkout whose service runs")
    args = ap.parse_args(argv)
    result = measure(args.models, args.workers, args.scrapes, args.code)
    cli.write_json(args.out, result)
    print(
        f"/metrics of a --workers {result['workers']} server ({result['code']}) after {result['calls']} calls: "
        f"{result['bytes']:,} bytes; per scrape ({result['scrapes']}), the engine's CPU "
        f"{result['engine_cpu_ms_mean']:.1f} ms and all {result['processes']} processes' "
        f"{result['server_cpu_ms_mean']:.1f} ms (means; /proc ticks of 10 ms), wall {result['wall_ms_median']:.1f} ms "
        "(median)"
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
