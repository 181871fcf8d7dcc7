"""Per-step cost of each session store, and what a session costs Redis (part of ``make bench``).

For each store (``memory``, Redis with ``step`` durability, Redis with ``idle`` durability) a real ``seqserve
serve`` process is started against a ``redis-server`` on a loopback port (started here), and clients type one
character per step into their own session over a Suggest stream (n=1, 1 char of lookahead), at c=1 and c=64
concurrent sessions. Reported: p50/p99 step latency and steps/s; for Redis, the commands Redis ran per step
(``INFO stats``) and the bytes per session (``INFO memory`` before/after opening sessions; value and index).
These are the inputs of docs/capacity.md.

    python -m bench.stores [--models models] [--steps 200] [--quick]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from bench import cli
from bench.launch import serve
from service.client import Client

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, " * 40
STORES = [("memory", {}), ("redis step", {"SEQSERVE_SESSION_DURABILITY": "step"}),
          ("redis idle", {"SEQSERVE_SESSION_DURABILITY": "idle"})]  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def redis_server() -> Iterator[redis.Redis]:
    """A throwaway redis-server on a loopback port (no persistence: the bench measures the store's path)."""
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=port)
        try:
            for _ in range(200):
                try:
                    client.ping()
                    break
                except redis.exceptions.ConnectionError:
                    time.sleep(0.02)
            yield client
        finally:
            proc.terminate()
            proc.wait(timeout=30)


Barriers = tuple[threading.Barrier, threading.Barrier, threading.Barrier]  # start, end, read (see step_cost)


def _typist(client: Client, steps: int, out: list[float], barriers: Barriers) -> None:
    try:
        _type(client, steps, out, barriers)
    except threading.BrokenBarrierError:
        return  # another party failed or the bench is exiting: it reports that, not each typist
    except BaseException:
        for b in barriers:
            b.abort()  # the others (and the bench) stop waiting instead of hanging
        raise


def _type(client: Client, steps: int, out: list[float], barriers: Barriers) -> None:
    from bench.run import TypingStream

    start, end, read = barriers
    with client.session("charlm") as s:
        typing = TypingStream(client, s.id)
        typing.step(TEXT[:8])  # the stream and the session are warm
        start.wait()
        for i in range(steps):
            t0 = time.perf_counter()
            typing.step(TEXT[8 + i])
            out.append(time.perf_counter() - t0)
        end.wait()
        read.wait()  # the bench has read Redis' counters: only now is the session closed and deleted
        typing.close()


def _commands(r: redis.Redis | None) -> tuple[int, int]:
    """(commands Redis ran, counting those inside scripts; script calls = round trips of the store)."""
    if r is None:
        return 0, 0
    stats = r.info("commandstats")
    return int(r.info("stats")["total_commands_processed"]), int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def _usec_per_script(r: redis.Redis | None) -> float:
    """Redis CPU per script call (commandstats), scripts' inner commands included."""
    if r is None:
        return 0.0
    return float(r.info("commandstats").get("cmdstat_evalsha", {}).get("usec_per_call", 0.0))


def step_cost(client: Client, sessions: int, steps: int, r: redis.Redis | None) -> dict[str, float]:
    """``sessions`` clients type ``steps`` characters each, all at once. Redis commands per step leave out the
    replica's background commands (reaper, health check), measured over an idle second before."""
    samples: list[float] = []
    barriers = (threading.Barrier(sessions + 1), threading.Barrier(sessions + 1), threading.Barrier(sessions + 1))
    start, end, read = barriers
    threads = [threading.Thread(target=_typist, args=(client, steps, samples, barriers)) for _ in range(sessions)]
    for t in threads:
        t.start()
    try:
        # Every typist waits at the start: its session is created and warm. (A fixed sleep let creates and first steps
        # of a slow start fall into the idle window, counted as background and subtracted from the steps' cost.)
        deadline = time.monotonic() + 120
        while start.n_waiting < sessions and not start.broken and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # their last replies' lease renewals are done
        idle0, t_idle = _commands(r), time.perf_counter()
        time.sleep(1.0)
        idle1 = _commands(r)
        rate = [(x1 - x0) / (time.perf_counter() - t_idle) for x0, x1 in zip(idle0, idle1, strict=True)]
        if r is not None:
            r.config_resetstat()  # commandstats (Redis CPU per script call) cover the measured window only
        before = _commands(r)
        start.wait()
        t0 = time.perf_counter()
        end.wait()
        wall = time.perf_counter() - t0
        after, usec = _commands(r), _usec_per_script(r)  # before any session is deleted
        read.wait()
        n = sessions * steps
        per_step = [max(0.0, x1 - x0 - bg * wall) / n for x0, x1, bg in zip(before, after, rate, strict=True)]
    finally:  # an exit on the way (SIGTERM: bench.cli.run) frees the typists instead of leaving them waiting
        for b in barriers:
            b.abort()
    for t in threads:
        t.join()
    return {
        "sessions": sessions,
        **cli.percentiles(samples),
        "steps_per_s": len(samples) / wall,
        "redis_commands_per_step": per_step[0],
        "redis_scripts_per_step": per_step[1],
        "redis_background_commands_per_s": rate[0],
        "redis_usec_per_script": usec,
    }


def redis_memory(client: Client, r: redis.Redis, sessions: int) -> dict[str, float]:
    """Bytes of Redis memory per charlm session (value + index): used_memory growth while ``sessions`` are
    opened, and what deleting them frees."""
    r.flushall()
    before = int(r.info("memory")["used_memory"])
    ids = []
    for _ in range(sessions):
        info = client.create_session("charlm")
        client.suggest_once(info.id, "To be", n=1, max_chars=1)
        ids.append(info.id)
    after = int(r.info("memory")["used_memory"])
    key = next(r.scan_iter(match="ss:{*}:v", count=1000))
    value = int(r.memory_usage(key) or 0)
    index = sum(int(r.memory_usage(k) or 0) for k in r.scan_iter(match="ss:{ix*", count=1000))
    state = len(r.get(key) or b"") - 32
    for i in ids:
        client.delete_session(i)
    freed = after - int(r.info("memory")["used_memory"])
    return {"sessions": sessions, "bytes_per_session": (after - before) / sessions,
            "freed_per_session": freed / sessions, "value_key_bytes": value, "state_bytes": state,
            "index_bytes_per_session": index / sessions}  # fmt: skip


def run_stores(models: Path, steps: int = 200, quick: bool = False) -> dict[str, Any]:
    """The store rows (c=1 and c=64; quick: c=1 and c=4, 10 steps) and Redis memory per session."""
    concurrency, sessions = ([1, 4], 50) if quick else ([1, 64], 1000)
    steps = 10 if quick else steps
    if shutil.which("redis-server") is None:
        return {"skipped": "redis-server is not installed (make sysdeps)"}
    out: dict[str, Any] = {"rows": []}
    with redis_server() as r:
        url = f"redis://127.0.0.1:{r.connection_pool.connection_kwargs['port']}/0"
        for name, env in STORES:
            # A generous store timeout: 64 clients, the server and Redis share the bench machine's cores.
            redis_env = {"SEQSERVE_SESSION_STORE": url, "SEQSERVE_SESSION_STORE_TIMEOUT_SECONDS": "10"}
            env = {**env, **redis_env} if name != "memory" else {}
            with serve(models, env) as server, Client(server.target, timeout=600) as client:
                for c in concurrency:
                    out["rows"].append({"store": name, **step_cost(client, c, steps, r if name != "memory" else None)})
                if name == "redis step":
                    out["memory"] = redis_memory(client, r, sessions)
    return out


def print_stores(result: dict[str, Any]) -> None:
    if "skipped" in result:
        print(f"\nSession stores: skipped ({result['skipped']})")
        return
    print("\nOne keystroke per step into a charlm session, per store (Suggest stream, n=1):")
    print(f"  {'store':>11}  {'sessions':>8}  {'p50 ms':>7}  {'p99 ms':>7}  {'steps/s':>8}  {'Redis scripts/step':>18}"
          f"  {'(commands)':>10}")  # fmt: skip
    for row in result["rows"]:
        scripts, commands = row["redis_scripts_per_step"], row["redis_commands_per_step"]
        print(
            f"  {row['store']:>11}  {row['sessions']:>8}  {row['p50_ms']:>7.2f}  {row['p99_ms']:>7.2f}  "
            f"{row['steps_per_s']:>8.0f}  {scripts:>18.2f}  {commands:>10.2f}"
        )
    m = result["memory"]
    print(
        f"  Redis memory per charlm session: {m['bytes_per_session']:.0f} bytes added, {m['freed_per_session']:.0f} "
        f"freed on delete ({m['sessions']} sessions); value key {m['value_key_bytes']} bytes (state "
        f"{m['state_bytes']}), index {m['index_bytes_per_session']:.0f} bytes"
    )
    usec = [row["redis_usec_per_script"] for row in result["rows"] if row["store"] == "redis step"]
    print(f"  Redis CPU per step (redis step): {', '.join(f'{u:.1f}' for u in usec)} µs per script call")


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    result = run_stores(args.models, args.steps, quick=args.quick)
    print(json.dumps(result, indent=2))
    print_stores(result)
    return 0


if __name__ == "__main__":
    cli.run(main)
