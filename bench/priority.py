"""Triton's priority levels under load: what level 1 buys a few urgent callers while many others keep the server
saturated.

One ``seqserve serve`` with ``PRIORITY_LEVELS=2`` (the default level 2) on the committed ``sentiment``; a
closed-loop asyncio client: ``--callers`` background callers (KServe ``ModelInfer``, one SST-2 sentence each,
no priority) and ``--urgent`` callers doing the same. Two runs, interleaved ``--rounds`` times: ``urgent at level
1`` (their requests carry ``priority`` 1) and ``urgent at the default level`` (no priority: the control). Prints
the urgent callers' latency (p50/p99) and the background throughput of each, and writes
``bench/results/priority.json``.

    python -m bench.priority [--models models] [--callers 256] [--urgent 4] [--seconds 6] [--rounds 2] [--workers 1]
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from bench import cli, pa, perf
from bench.launch import serve
from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc


async def drive(target: str, callers: int, urgent: int, level: int | None, seconds: float) -> dict[str, Any]:
    background = [perf.text_request("sentiment", text) for text in pa.SENTENCES]
    marked = []
    for text in pa.SENTENCES:
        request = pb.ModelInferRequest()
        request.CopyFrom(perf.text_request("sentiment", text))
        if level is not None:
            request.parameters["priority"].int64_param = level
        marked.append(request)
    channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(ch) for ch in channels]
    times: dict[str, list[float]] = {"background": [], "urgent": []}
    measure_from = stop = 0.0

    async def caller(i: int, kind: str, bodies: list[pb.ModelInferRequest]) -> None:
        stub, n = stubs[i % len(stubs)], i
        while (t0 := time.perf_counter()) < stop:
            await stub.ModelInfer(bodies[n % len(bodies)], timeout=60)
            if t0 >= measure_from:
                times[kind].append(time.perf_counter() - t0)
            n += 1

    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), 30)
        start = time.perf_counter()
        measure_from, stop = start + 1.0, start + 1.0 + seconds
        await asyncio.gather(
            *(caller(i, "background", background) for i in range(callers)),
            *(caller(i, "urgent", marked) for i in range(urgent)),
        )
    finally:
        for ch in channels:
            await ch.close()
    return {
        "urgent": cli.percentiles(times["urgent"]),
        "background": cli.percentiles(times["background"]),
        "background_per_s": len(times["background"]) / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "priority.json")
    ap.add_argument("--callers", type=int, default=256)
    ap.add_argument("--urgent", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    env = {"SEQSERVE_LOG_LEVEL": "WARNING", "SEQSERVE_PRIORITY_LEVELS": "2"}
    rows: list[dict[str, Any]] = []
    with serve(args.models, env, workers=args.workers) as server:
        for round_ in range(args.rounds):
            for label, level in (("urgent at level 1", 1), ("urgent at the default level", None)):
                row = asyncio.run(drive(server.target, args.callers, args.urgent, level, args.seconds))
                rows.append({"run": label, "round": round_, **row})
    result = {"callers": args.callers, "urgent": args.urgent, "workers": args.workers, "rows": rows}
    print(f"\nPriority levels (sentiment, {args.callers} background + {args.urgent} urgent callers, "
          f"{args.workers} worker(s); ms as the client saw them):")  # fmt: skip
    print(f"  {'run':>28} {'round':>5} {'urgent p50':>10} {'urgent p99':>10} {'bg p50':>7} {'bg p99':>7} {'bg/s':>6}")
    for r in rows:
        u, b = r["urgent"], r["background"]
        print(
            f"  {r['run']:>28} {r['round']:>5} {u['p50_ms']:>10.1f} {u['p99_ms']:>10.1f} {b['p50_ms']:>7.1f} "
            f"{b['p99_ms']:>7.1f} {r['background_per_s']:>6.0f}"
        )
    cli.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    cli.run(main)
