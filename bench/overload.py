"""``make bench``'s overload section: what the server does when more callers arrive than it can serve.

A real ``seqserve serve`` (the default worker count) is driven by a closed-loop asyncio client: ``C`` callers
(256 by default), each sending one SST-2 sentence per KServe ``ModelInfer`` to ``sentiment`` again as soon as its
last answer came, over a few channels. A refused caller (``RESOURCE_EXHAUSTED``) waits ``backoff_ms`` before it
retries, as a client with backoff would. Two runs:

- ``default``: the server's default settings. Throughput, latency of the answered calls (p50/p99/max) and how many
  were refused: at 256 callers the default queue bound (``MAX_QUEUE_SIZE`` 1,024) is not reached, so callers wait
  their turn and p99 is what that wait costs.
- ``bounded``: the same with ``MAX_QUEUE_SIZE`` below the callers (32), so the calls beyond the bound must be
  refused, quickly (their own latency, p50/p99), while the admitted ones keep a bounded p99; every other status
  counts as an error, and one more call after the run must be answered (the server is still up).

    python -m bench.overload [--models models] [--callers 256] [--seconds 8] [--out bench/results/overload.json]
                             [--env SEQSERVE_NAME=VALUE ...]   (settings of both runs' servers)
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc

from bench import cli, pa, perf
from bench.launch import metric_families, serve
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.settings import Settings

BOUNDED_QUEUE = 32
CHANNELS = 4


def server_side(metrics_port: int, method: str = "ModelInfer") -> dict[str, dict[str, float]]:
    """The server's own latency of ``method`` calls per status code, from its ``seqserve_rpc_duration_seconds``
    histogram (receipt to answer; what the client adds on top is its own queueing and the transport): count, mean
    and the shares answered within 1 ms and 10 ms, over the whole run."""
    out: dict[str, dict[str, float]] = {}
    for family in metric_families(metrics_port):
        if family.name != "seqserve_rpc_duration_seconds":
            continue
        for s in family.samples:
            if s.labels.get("method") != method:
                continue
            row = out.setdefault(s.labels["code"], {})
            if s.name.endswith("_count"):
                row["count"] = s.value
            elif s.name.endswith("_sum"):
                row["sum_s"] = s.value
            elif s.name.endswith("_bucket") and s.labels.get("le") in ("0.001", "0.01"):
                row[f"le_{s.labels['le']}"] = s.value
    return {
        code: {
            "count": row.get("count", 0.0),
            "mean_ms": 1e3 * row.get("sum_s", 0.0) / max(row.get("count", 0.0), 1.0),
            "within_1ms": row.get("le_0.001", 0.0) / max(row.get("count", 0.0), 1.0),
            "within_10ms": row.get("le_0.01", 0.0) / max(row.get("count", 0.0), 1.0),
        }
        for code, row in out.items()
    }


async def drive(
    target: str, model: str, callers: int, warmup_s: float, seconds: float, backoff_ms: float
) -> dict[str, Any]:
    """``callers`` closed-loop callers for ``warmup_s + seconds``; what happened in the last ``seconds``."""
    bodies = [perf.text_request(model, text) for text in pa.SENTENCES]
    channels = [grpc.aio.insecure_channel(target) for _ in range(CHANNELS)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(ch) for ch in channels]
    ok: list[float] = []
    refused: list[float] = []
    errors: dict[str, int] = {}
    measure_from = stop = 0.0  # set once the channels are ready

    async def caller(i: int) -> None:
        stub, n = stubs[i % len(stubs)], i
        while True:
            t0 = time.perf_counter()
            if t0 >= stop:
                return
            try:
                await stub.ModelInfer(bodies[n % len(bodies)], timeout=60)
                if t0 >= measure_from:
                    ok.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    if t0 >= measure_from:
                        refused.append(time.perf_counter() - t0)
                    await asyncio.sleep(backoff_ms / 1000)
                else:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1
            n += 1

    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), 30)
        start = time.perf_counter()
        measure_from, stop = start + warmup_s, start + warmup_s + seconds
        await asyncio.gather(*(caller(i) for i in range(callers)))
        try:  # the server is still up: one more call is answered
            await stubs[0].ModelInfer(bodies[0], timeout=30)
            answers_after = True
        except grpc.aio.AioRpcError:
            answers_after = False
    finally:
        for ch in channels:
            await ch.close()
    return {
        "callers": callers,
        "seconds": seconds,
        "backoff_ms": backoff_ms,
        "throughput": len(ok) / seconds,
        "answered": cli.percentiles(ok),
        "refused": cli.percentiles(refused),
        "refused_share": len(refused) / max(len(ok) + len(refused), 1),
        "other_errors": errors,
        "answers_after": answers_after,
    }


def run(
    models: Path,
    callers: int = 256,
    seconds: float = 8.0,
    warmup_s: float = 1.0,
    backoff_ms: float = 10.0,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The two runs (default settings, then ``MAX_QUEUE_SIZE`` = 32), each on a fresh server; ``env``: settings
    of both."""
    out: dict[str, Any] = {"model": "sentiment", "workers": perf.available_workers(), "rows": []}
    for label, extra in (("default", {}), ("bounded", {"SEQSERVE_MAX_QUEUE_SIZE": str(BOUNDED_QUEUE)})):
        with serve(models, {"SEQSERVE_LOG_LEVEL": "WARNING"} | (env or {}) | extra) as server:
            row = asyncio.run(drive(server.target, "sentiment", callers, warmup_s, seconds, backoff_ms))
            row["server"] = server_side(server.metrics_port)
        queue = int(extra.get("SEQSERVE_MAX_QUEUE_SIZE", Settings.model_fields["max_queue_size"].default))
        out["rows"].append({"run": label, "max_queue_size": queue, **row})
    return out


def print_table(r: dict[str, Any]) -> None:
    print(f"\nOverload ({r['model']}, closed-loop asyncio client, {r['workers']} worker(s); refused callers back off):")
    print("  latencies in ms as the client saw them; 'srv ok' / 'srv ref' = the server's own mean time to answer /")
    print("  to refuse, '<=1ms' the share of refusals it sent within 1 ms (its histogram, receipt to answer): the")
    print("  rest of a call's client latency is the client's and the transport's queueing on the same cores")
    head = (
        f"  {'run':>8} {'queue':>6} {'callers':>7} {'answered/s':>10} {'p50':>7} {'p99':>7} {'max':>7} {'srv ok':>7} "
    )
    head += f"{'refused':>8} {'ref p50':>7} {'ref p99':>7} {'srv ref':>7} {'<=1ms':>6} {'errors':>6} {'up after':>8}"
    print(head)
    for row in r["rows"]:
        a, f = row["answered"], row["refused"]
        ok, srv = row["server"].get("OK", {}), row["server"].get("RESOURCE_EXHAUSTED", {})
        print(
            f"  {row['run']:>8} {row['max_queue_size']:>6} {row['callers']:>7} {row['throughput']:>10.0f} "
            f"{a.get('p50_ms', 0):>7.1f} {a.get('p99_ms', 0):>7.1f} {a.get('max_ms', 0):>7.1f} "
            f"{ok.get('mean_ms', 0):>7.1f} "
            f"{100 * row['refused_share']:>7.1f}% {f.get('p50_ms', 0):>7.2f} {f.get('p99_ms', 0):>7.2f} "
            f"{srv.get('mean_ms', 0):>7.2f} {100 * srv.get('within_1ms', 0):>5.1f}% "
            f"{sum(row['other_errors'].values()):>6} {'yes' if row['answers_after'] else 'NO':>8}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "overload.json")
    ap.add_argument("--callers", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=8.0)
    cli.add_settings(ap, "--env", "both runs' servers")
    args = ap.parse_args(argv)
    results = run(args.models, args.callers, args.seconds, env=dict(args.env))
    cli.write_json(args.out, results)
    print_table(results)
    return 0


if __name__ == "__main__":
    cli.run(main)
