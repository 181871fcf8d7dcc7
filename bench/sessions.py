"""Session create rate at 1k, 50k and 250k live sessions, the idle server's CPU with them all alive, and the
memory an idle char-LM session costs against its raw state.

Fills a real server (its own process, sized for 300k sessions) through ``Sessions.Create`` from an asyncio
client with many calls in flight; at each level it measures a window of creates (rate, p50/p99 latency), then
keeps filling. "core only" repeats the fill through the data plane in this process, without gRPC: the part the
session manager and store cost (the rest of an RPC is gRPC's own per-call work, shared with every method), and
"full gc ms" is one full garbage collection of that process at each level (a server's event loop stops as long
whenever one runs: idle sessions must not be objects the collector walks).
Creating must not slow down as the store grows (O(1)/O(log n) store operations; issue 12 asks 3,000/s at
250,000 live sessions), and the idle server must not walk its sessions (the reaper uses an expiry heap).
"memory per idle session" fills a fresh engine (the data plane in a child process of its own, no gRPC) with 20,000
char-LM sessions, then advances each by one character: the RSS each session adds, fresh and after its step,
against the bytes of the arrays it holds (the state; after a step also the next-character logits). Issue 9 asks
at most 1.2x.

    python -m bench.sessions [--models models] [--quick]
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing as mp
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc

from bench import cli
from bench.floor import canned_method
from bench.launch import cpu_seconds, first_message, rss_bytes, rss_mib, serve
from service.api.gen.seqserve.v1 import common_pb2, sessions_pb2
from service.core.dataplane import CoreDataPlane
from service.core.sessions import SessionState
from service.core.types import ModelRef
from service.metrics import Metrics
from service.settings import Settings

LEVELS = (1_000, 50_000, 250_000)
MEMORY_SESSIONS = 20_000
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


@asynccontextmanager
async def _engine(models: Path, sessions: int) -> AsyncIterator[CoreDataPlane]:
    """The data plane in this process, started, with room for ``sessions`` sessions that do not expire."""
    settings = Settings(
        models=models, device="cpu", max_sessions=sessions, max_session_bytes=64 << 30, session_ttl_seconds=3600,
        log_level="WARNING",
    )  # fmt: skip
    dp = CoreDataPlane(settings, Metrics())
    await dp.start()
    try:
        yield dp
    finally:
        await dp.stop()


async def core_rates(models: Path, levels: tuple[int, ...], window: int) -> list[dict[str, Any]]:
    """The same fill-and-measure through the data plane in this process, without gRPC: what the session
    manager and store cost by themselves, and how long one full garbage collection of this process takes with
    that many sessions (every server process pauses its event loop for as long when one runs)."""
    rows, live, model = [], 0, ModelRef("charlm")
    async with _engine(models, max(levels) + 2 * window) as dp:
        for level in levels:
            for _ in range(level - live):
                await dp.create_session(model)
            started = time.perf_counter()
            for _ in range(window):
                await dp.create_session(model)
            rate = window / (time.perf_counter() - started)
            gc.collect()  # (what a window left for the collector; then one full collection on its own, timed)
            started = time.perf_counter()
            gc.collect()
            full_gc_ms = (time.perf_counter() - started) * 1e3
            rows.append({"live_sessions": level, "creates_per_s": rate, "full_gc_ms": full_gc_ms})
            live = level + window
    return rows


async def _idle_memory(models: Path, n: int) -> dict[str, Any]:
    def raw(s: SessionState) -> int:
        return sum(a.nbytes for a in (*s.state.values(), *s.context.values()))

    def rss() -> int:
        gc.collect()
        return rss_bytes(os.getpid())

    async with _engine(models, n + 16) as dp:
        model = ModelRef("charlm")
        warm = await dp.create_session(model)  # first-use allocations (the batcher, ORT's arena) happen here
        await dp.char_step(model, "a", session_id=warm.id)
        before = rss()
        ids = [(await dp.create_session(model)).id for _ in range(n)]
        fresh = rss()
        raw_fresh = raw(await dp.sessions.get(ids[0]))
        for sid in ids:
            await dp.char_step(model, "a", session_id=sid)
        stepped = rss()
        raw_stepped = raw(await dp.sessions.get(ids[0]))
    per_fresh, per_stepped = (fresh - before) / n, (stepped - before) / n
    return {
        "sessions": n,
        "fresh_bytes_per_session": per_fresh,
        "fresh_raw_bytes": raw_fresh,
        "fresh_ratio": per_fresh / raw_fresh,
        "stepped_bytes_per_session": per_stepped,
        "stepped_raw_bytes": raw_stepped,
        "stepped_ratio": per_stepped / raw_stepped,
    }


def _idle_memory_child(models: Path, n: int, out: mp.Queue[dict[str, Any]]) -> None:
    out.put(asyncio.run(_idle_memory(models, n)))


def idle_memory(models: Path, n: int = MEMORY_SESSIONS) -> dict[str, Any]:
    """RSS per idle char-LM session, fresh and after one step, against its raw arrays: in a fresh process, so
    nothing this benchmark did before sits in the heap being measured."""
    ctx = mp.get_context("spawn")
    out: mp.Queue[dict[str, Any]] = ctx.Queue()
    proc = ctx.Process(target=_idle_memory_child, args=(models, n, out), daemon=True)
    proc.start()
    try:
        result: dict[str, Any] = first_message(proc, out)
        return result
    finally:
        proc.join(60)


def floor_rate(window: int) -> float:
    """Creates/s against a canned Sessions.Create (``bench.floor.canned_method``: one canned SessionInfo, no store,
    no interceptors, no metrics), with the same client and calls in flight: what the same client reaches against
    gRPC alone on this machine (the ceiling for any server)."""
    canned = sessions_pb2.SessionInfo(session_id="x" * 32, model="charlm", version=1).SerializeToString()
    with canned_method("seqserve.v1.Sessions", "Create", canned) as target:
        asyncio.run(create_many(target, 500))  # warm-up
        return window / asyncio.run(create_many(target, window))


def idle_cpu(pid: int, seconds: float) -> float:
    """The server's CPU use (% of one core) while nobody calls it."""
    before, t0 = cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds)
    return 100.0 * (cpu_seconds(pid) - before) / (time.perf_counter() - t0)


def bench(
    models: Path,
    levels: tuple[int, ...] = LEVELS,
    window: int = WINDOW,
    idle_seconds: float = IDLE_SECONDS,
    memory_sessions: int = MEMORY_SESSIONS,
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
        "memory_per_session": idle_memory(models, memory_sessions),
    }


def quick(models: Path) -> dict[str, Any]:
    """A smoke run: 1k sessions, a short window."""
    return bench(models, (1_000,), 500, idle_seconds=1.0, memory_sessions=2_000)


def print_table(r: dict[str, Any]) -> None:
    print(f"Session create rate ({r['in_flight']} calls in flight, Sessions.Create on charlm):")
    print(
        f"  {'live sessions':>13}  {'creates/s':>10}  {'p50 ms':>7}  {'p99 ms':>7}  {'RSS MiB':>8}  {'core only/s':>11}"
        f"  {'full gc ms':>10}"
    )
    for row, core in zip(r["create"], r["core"], strict=True):
        print(
            f"  {row['live_sessions']:>13,}  {row['creates_per_s']:>10,.0f}  {row['p50_ms']:>7.2f}  "
            f"{row['p99_ms']:>7.2f}  {row['rss_mib']:>8.0f}  {core['creates_per_s']:>11,.0f}  "
            f"{core['full_gc_ms']:>10.1f}"
        )
    floor = r.get("floor_creates_per_s")
    if floor:
        worst = min(row["creates_per_s"] for row in r["create"])
        print(f"  gRPC floor (canned Create, same client): {floor:,.0f}/s; slowest level = {worst / floor:.2f}x floor")
    print(f"  idle with {r['idle_live_sessions']:,} live sessions: {r['idle_cpu_percent']:.1f}% CPU")
    m = r.get("memory_per_session")
    if m:
        print(
            f"Memory per idle char-LM session ({m['sessions']:,} sessions, engine alone): fresh "
            f"{m['fresh_bytes_per_session']:,.0f} B RSS for {m['fresh_raw_bytes']:,} B of state = "
            f"{m['fresh_ratio']:.2f}x; after one step {m['stepped_bytes_per_session']:,.0f} B for "
            f"{m['stepped_raw_bytes']:,} B of state + logits = {m['stepped_ratio']:.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "sessions.json")
    ap.add_argument("--quick", action="store_true", help="1k sessions only (a smoke run)")
    args = ap.parse_args(argv)
    result = quick(args.models) if args.quick else bench(args.models)
    cli.write_json(args.out, result)
    print_table(result)
    return 0


if __name__ == "__main__":
    cli.run(main)
