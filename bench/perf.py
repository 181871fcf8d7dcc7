"""``make bench``'s perf_analyzer section: seqserve (1 worker and the default worker count) against the
canned-response floor (``bench/floor.py``), in the same run, on the issue's workloads.

For each server and workload it prints throughput, client p50/p99, seqserve/floor ratios and CPU seconds per
1,000 requests for server and client (perf_analyzer shares the machine's cores with the server).

Every server runs for the whole section; each workload and concurrency measures them back to back, in rounds of
alternating order, and a ratio is taken within a round (``summary``): the machine this runs on drifts.

    python -m bench.perf [--models models] [--concurrency 1 16 64] [--workloads sentiment ...] [--rounds 2]
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from bench import cli, pa
from bench.launch import Served, process, serve
from service.settings import Settings

T = TypeVar("T")


def floor(canned: Path, folder: Path, loop: str) -> Any:
    cmd = [sys.executable, "-m", "bench.floor", "--canned", str(canned), "--ready-file", str(folder / "floor.json")]
    return process([*cmd, "--event-loop", loop], folder / "floor.json")


def available_workers() -> int:
    """The worker count ``seqserve serve`` picks by default (one per available core)."""
    from service.engine.procs import available_cpus

    return available_cpus()


def text_request(model: str, value: str) -> Any:
    """A KServe ModelInfer request with one TEXT element."""
    from service.api.gen.inference import grpc_service_pb2 as pb

    r = pb.ModelInferRequest(model_name=model, id="1")
    t = r.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(value.encode())
    return r


def canned_requests(models: Path) -> dict[str, Any]:
    """One request per model of the workloads that ``models`` holds."""
    names = {w.model for w in pa.WORKLOADS.values() if w.committed(models)}
    return {n: text_request(n, pa.SENTENCES[0] if n == "sentiment" else "a") for n in sorted(names)}


def warm(target: str, models: Path) -> None:
    """One ModelInfer per model of the workloads: perf_analyzer (no ``-x``) takes the version whose statistics
    show a request (the newest, which the default answers), also when a model has several versions."""
    import grpc

    from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for request in canned_requests(models).values():
            stub.ModelInfer(request)


class Server(NamedTuple):
    label: str
    target: str
    pids: list[int]  # its processes, engines first (cli.server_processes)
    engines: int = 1  # how many of pids, first, are engines (the busiest one's CPU is reported)

    @classmethod
    def of(cls, label: str, served: Served) -> Server:
        return cls(label, served.target, cli.server_processes(served.pid, served.engine_pids), len(served.engine_pids))


def measure(s: Server, w: pa.Workload, c: int, folder: Path, env: dict[str, str], window_ms: int, round_: int
            ) -> dict[str, Any]:  # fmt: skip
    label = s.label
    r = pa.run(s.target, w, c, folder, env, lambda: s.pids, window_ms=window_ms, engines=s.engines)
    row = {"server": label, "round": round_, **r.as_dict()}
    print(
        f"  {label:>14} {w.name:>14} c={c:<3} round {round_} {r.throughput:>9.0f}/s  p50 {r.p50_us / 1000:6.2f} ms  "
        f"p99 {r.p99_us / 1000:6.2f} ms  cpu/1k srv {row['server_cpu_s_per_1k']:.3f}s "
        + (f"(engine {row['engine_cpu_s_per_1k']:.3f}s) " if "engine_cpu_s_per_1k" in row else "")
        + f"cli {row['client_cpu_s_per_1k']:.3f}s",
        flush=True,
    )
    return row


def alternating(sides: Sequence[T], rounds: int) -> Iterator[tuple[int, T]]:
    """(round, side) for ``rounds`` rounds of every side back to back, every other round in reverse order (ABC,
    CBA, ...), so no side always runs first or last on a machine whose speed drifts."""
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            yield r, side


def interleaved(servers: list[Server], workloads: list[pa.Workload], conc: list[int], rounds: int, folder: Path,
                env: dict[str, str], window_ms: int) -> list[dict[str, Any]]:  # fmt: skip
    """For each workload and concurrency, every server measured back to back, ``rounds`` times (``alternating``):
    one row per measurement."""
    return [
        measure(s, w, c, folder, env, window_ms, r)
        for w in workloads
        for c in conc
        for r, s in alternating(servers, rounds)
    ]


def started(
    running: contextlib.ExitStack,
    models: Path,
    folder: Path,
    workers: list[int],
    extra: dict[str, str] | None = None,
    with_floor: bool = True,
) -> list[Server]:
    """Starts (on ``running``) one seqserve per worker count, each warmed up, and, with ``with_floor``, the floor
    answering with responses recorded from the first (in ``folder``): ``(label, target, pids)`` each, idle until
    measured. Labels: ``seqserve w=N`` and ``floor``."""
    servers: list[Server] = []
    for w in workers:
        server = running.enter_context(serve(models, {"SEQSERVE_LOG_LEVEL": "WARNING"} | (extra or {}), w))
        warm(server.target, models)
        if not (folder / "canned").exists():
            from bench.floor import record

            record(server.target, canned_requests(models), folder / "canned")
        servers.append(Server.of(f"seqserve w={w}", server))
    if with_floor:  # on the server's event loop (the event_loop setting's default unless --env names one)
        loop = (extra or {}).get("SEQSERVE_EVENT_LOOP", Settings.model_fields["event_loop"].default)
        info, pid = running.enter_context(floor(folder / "canned", folder, loop))
        servers.append(Server("floor", f"127.0.0.1:{info['grpc_port']}", [pid]))
    return servers


def run(
    models: Path,
    workloads: list[str],
    conc: list[int],
    workers: list[int],
    extra: dict[str, str] | None = None,
    with_floor: bool = True,
    window_ms: int = 2000,
    rounds: int = 2,
) -> dict[str, Any]:
    """Every server (each seqserve worker count, then the floor) is started first and left running; then, for each
    workload and concurrency, they are measured back to back, ``rounds`` times, every other round in reverse order
    (ABC, CBA, ...). A ratio to the floor is taken within a round, so both sides of it ran seconds apart: on a
    shared machine whose speed drifts by tens of percent over minutes, measuring every seqserve row first and the
    floor minutes later compared two different machines. A dict of per-round ``rows`` and their ``summary``."""
    env = pa.environment()
    workloads = [w for w in workloads if pa.WORKLOADS[w].committed(models)]  # a model not committed: skipped
    results: dict[str, Any] = {"concurrency": conc, "workloads": workloads, "workers": workers, "rounds": rounds}
    results["load_before"] = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        folder = Path(tmp)
        servers = started(running, models, folder, workers, extra, with_floor)
        chosen = [pa.WORKLOADS[name] for name in workloads]
        rows = interleaved(servers, chosen, conc, rounds, folder, env, window_ms)
    results["load_after"] = os.getloadavg()
    results["rows"] = rows
    results["summary"] = summary(rows)
    return results


def summary(rows: list[dict[str, Any]], reference: str = "floor") -> list[dict[str, Any]]:
    """One row per (server, workload, concurrency): the median over rounds of each measure, and for every server
    but ``reference`` its throughput's ratio to the reference's taken within each round (``ratio``: their median;
    ``ratio_min``/``ratio_max``: the spread the machine's noise left)."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["server"], row["workload"], row["concurrency"]), []).append(row)
    reference_rounds = {
        (row["workload"], row["concurrency"], row["round"]): row["throughput"]
        for row in rows
        if row["server"] == reference
    }
    out = []
    for (server, workload, c), group in groups.items():
        agg: dict[str, Any] = {"server": server, "workload": workload, "concurrency": c, "rounds": len(group)}
        for key in ("throughput", "p50_us", "p99_us", "server_cpu_s_per_1k", "client_cpu_s_per_1k"):
            agg[key] = statistics.median(row[key] for row in group)
        if all("engine_cpu_s_per_1k" in row for row in group):
            agg["engine_cpu_s_per_1k"] = statistics.median(row["engine_cpu_s_per_1k"] for row in group)
        paired = [
            row["throughput"] / reference_rounds[(workload, c, row["round"])]
            for row in group
            if server != reference and (workload, c, row["round"]) in reference_rounds
        ]
        if paired:
            agg |= {"ratio": statistics.median(paired), "ratio_min": min(paired), "ratio_max": max(paired)}
        out.append(agg)
    return out


def print_table(results: dict[str, Any], reference: str = "floor") -> None:
    before, after = results.get("load_before", ()), results.get("load_after", ())
    rounds = results.get("rounds", 1)
    print(
        f"\nperf_analyzer (client on the same cores; medians of {rounds} interleaved rounds: throughput/s, p50 ms, "
        f"ratio to the {reference} within a round (its range), CPU s per 1k req: server, of it the (busiest) "
        "engine's with several processes, client):"
    )
    if before and after:
        print(f"  load average before {before[0]:.2f}, after {after[0]:.2f} (1 min)")
    print(f"  {'server':>14} {'workload':>14} {'c':>3} {'thr/s':>8} {'p50':>6} {'p99':>6} {'x' + reference:>6} "
          f"{'range':>9} {'srv cpu':>7} {'eng cpu':>7} {'cli cpu':>7}")  # fmt: skip
    for r in results["summary"]:
        x = f"{r['ratio']:.2f}" if "ratio" in r else ""
        spread = f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}" if "ratio" in r and r["rounds"] > 1 else ""
        engine = f"{r['engine_cpu_s_per_1k']:.3f}" if "engine_cpu_s_per_1k" in r else ""
        print(
            f"  {r['server']:>14} {r['workload']:>14} {r['concurrency']:>3} {r['throughput']:>8.0f} "
            f"{r['p50_us'] / 1000:>6.2f} {r['p99_us'] / 1000:>6.2f} {x:>6} {spread:>9} "
            f"{r['server_cpu_s_per_1k']:>7.3f} {engine:>7} {r['client_cpu_s_per_1k']:>7.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "perf.json")
    pa.add_options(ap, list(pa.WORKLOADS), [1, 16, 64], rounds=2)
    ap.add_argument("--workers", nargs="+", type=int, default=[1, available_workers()])
    cli.add_settings(ap, "--env", "the servers")
    ap.add_argument("--no-floor", action="store_true", help="skip the floor server (tuning runs)")
    args = ap.parse_args(argv)
    extra = dict(args.env)
    workers = sorted(set(args.workers))
    results = run(args.models, args.workloads, args.concurrency, workers, extra, not args.no_floor, rounds=args.rounds)
    cli.write_json(args.out, results)
    print_table(results)
    return 0


if __name__ == "__main__":
    cli.run(main)
