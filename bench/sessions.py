"""Session create rate at 1k, 50k and 250k live sessions, and the idle server's CPU with them all alive.

Fills a real server (its own process, sized for 300k sessions) through ``Sessions.Create`` from an asyncio
client with many calls in flight; at each level it measures a window of creates (rate, p50/p99 latency), then
keeps filling. "core only" repeats the fill through the data plane in this process, without gRPC: the part the
session manager and store cost (the rest of an RPC is gRPC's own per-call work, shared with every method).
Creating must not slow down as the store grows (O(1)/O(log n) store operations; issue 12 asks 3,000/s at
250,000 live sessions), and the idle server must not walk its sessions (the reaper uses an expiry heap).

    python -m bench.sessions [--models models] [--quick]
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import grpc

from bench import cli
from bench.launch import cpu_seconds, rss_mib, serve
from service.api.gen.seqserve.v1 import common_pb2, sessions_pb2

LEVELS = (1_000, 50_000, 250_000)
WINDOW = 5_000  # creates measured at each level
IN_FLIGHT = 64
IDLE_SECONDS = 5.0


async def create_many(target: str, n: int, latencies: list[float] | None = None) -> float:
    """Creates ``n`` sessions with ``IN_FLIGHT`` calls at a time; returns the wall time."""
    request = sessions_pb2.CreateSessionRequest(model=common_pb2.ModelSelector(name="charlm")).SerializeToString()
    left = n
    async with grpc.aio.insecure_channel(target) as channel:
        create = channel.unary_unary("/seqserve.v1.Sessions/Create")

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                t0 = time.perf_counter()
                await create(request, timeout=60)
                if latencies is not None:
                    latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(IN_FLIGHT, n))))
        return time.perf_counter() - started


async def core_rates(models: Path, levels: tuple[int, ...], window: int) -> list[dict[str, Any]]:
    """The same fill-and-measure through the data plane in this process, without gRPC: what the session
    manager and store cost by themselves."""
    from service.core.dataplane import CoreDataPlane
    from service.core.types import ModelRef
    from service.metrics import Metrics
    from service.settings import Settings

    settings = Settings(
        models=models, device="cpu", max_sessions=max(levels) + 2 * window, max_session_bytes=64 << 30,
        session_ttl_seconds=3600, log_level="WARNING",
    )  # fmt: skip
    dp = CoreDataPlane(settings, Metrics())
    await dp.start()
    rows, live, model = [], 0, ModelRef("charlm")
    try:
        for level in levels:
            for _ in range(level - live):
                await dp.create_session(model)
            started = time.perf_counter()
            for _ in range(window):
                await dp.create_session(model)
            rows.append({"live_sessions": level, "creates_per_s": window / (time.perf_counter() - started)})
            live = level + window
    finally:
        await dp.stop()
    return rows


def _floor(ready: mp.Queue[int]) -> None:
    """A grpc.aio server whose Sessions.Create returns one canned SessionInfo: no store, no interceptors, no
    metrics. What the same client reaches against gRPC alone on this machine (the ceiling for any server)."""
    canned = sessions_pb2.SessionInfo(session_id="x" * 32, model="charlm", version=1).SerializeToString()

    async def create(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return canned

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(create)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("seqserve.v1.Sessions", {"Create": handler})]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def floor_rate(window: int) -> float:
    """Creates/s against the canned floor server, with the same client and calls in flight."""
    ctx = mp.get_context("spawn")
    ready: mp.Queue[int] = ctx.Queue()
    proc = ctx.Process(target=_floor, args=(ready,), daemon=True)
    proc.start()
    try:
        target = f"127.0.0.1:{ready.get(timeout=60)}"
        asyncio.run(create_many(target, 500))  # warm-up
        return window / asyncio.run(create_many(target, window))
    finally:
        proc.terminate()
        proc.join(10)


def idle_cpu(pid: int, seconds: float) -> float:
    """The server's CPU use (% of one core) while nobody calls it."""
    before, t0 = cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds)
    return 100.0 * (cpu_seconds(pid) - before) / (time.perf_counter() - t0)


def bench(
    models: Path, levels: tuple[int, ...] = LEVELS, window: int = WINDOW, idle_seconds: float = IDLE_SECONDS
) -> dict[str, Any]:
    env = {
        "SEQSERVE_MAX_SESSIONS": str(max(levels) + 2 * window),
        "SEQSERVE_MAX_SESSION_BYTES": str(64 << 30),
        "SEQSERVE_SESSION_TTL_SECONDS": "3600",
        "SEQSERVE_LOG_LEVEL": "WARNING",
    }
    rows: list[dict[str, Any]] = []
    with serve(models, env) as server:
        live = 0
        for level in levels:
            asyncio.run(create_many(server.target, level - live))  # fill up to the level
            latencies: list[float] = []
            wall = asyncio.run(create_many(server.target, window, latencies))
            live = level + window
            rows.append({
                "live_sessions": level,
                "creates_per_s": window / wall,
                **cli.percentiles(latencies),
                "rss_mib": rss_mib(server.pid),
            })  # fmt: skip
        cpu = idle_cpu(server.pid, idle_seconds)
    core = asyncio.run(core_rates(models, levels, window))
    floor = floor_rate(window)
    return {
        "create": rows,
        "core": core,
        "floor_creates_per_s": floor,
        "idle_cpu_percent": cpu,
        "idle_live_sessions": live,
        "in_flight": IN_FLIGHT,
    }


def quick(models: Path) -> dict[str, Any]:
    """A smoke run: 1k sessions, a short window."""
    return bench(models, (1_000,), 500, idle_seconds=1.0)


def print_table(r: dict[str, Any]) -> None:
    print(f"Session create rate ({r['in_flight']} calls in flight, Sessions.Create on charlm):")
    print(
        f"  {'live sessions':>13}  {'creates/s':>10}  {'p50 ms':>7}  {'p99 ms':>7}  {'RSS MiB':>8}  {'core only/s':>11}"
    )
    for row, core in zip(r["create"], r["core"], strict=True):
        print(
            f"  {row['live_sessions']:>13,}  {row['creates_per_s']:>10,.0f}  {row['p50_ms']:>7.2f}  "
            f"{row['p99_ms']:>7.2f}  {row['rss_mib']:>8.0f}  {core['creates_per_s']:>11,.0f}"
        )
    floor = r.get("floor_creates_per_s")
    if floor:
        worst = min(row["creates_per_s"] for row in r["create"])
        print(f"  gRPC floor (canned Create, same client): {floor:,.0f}/s; slowest level = {worst / floor:.2f}x floor")
    print(f"  idle with {r['idle_live_sessions']:,} live sessions: {r['idle_cpu_percent']:.1f}% CPU")


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "sessions.json")
    ap.add_argument("--quick", action="store_true", help="1k sessions only (a smoke run)")
    args = ap.parse_args(argv)
    result = quick(args.models) if args.quick else bench(args.models)
    cli.write_json(args.out, result)
    print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
