"""``make bench``'s perf_analyzer section: seqserve (1 worker and the default worker count) against the
canned-response floor (``bench/floor.py``), in the same run, on the issue's workloads.

For each server and workload it prints throughput, client p50/p99, seqserve/floor ratios and CPU seconds per
1,000 requests for server and client (perf_analyzer shares the machine's cores with the server).

    python -m bench.perf [--models models] [--concurrency 1 16 64] [--workloads sentiment charlm-stream ...]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import cli, pa
from bench.launch import process, serve
from service.settings import Settings


def _children(pid: int) -> list[int]:
    """``pid`` and all its descendants (the workers and the engine of a multi-process server)."""
    out, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


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
    names = {w.model for w in pa.WORKLOADS.values() if (models / w.model).is_dir()}
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


def measure(
    label: str,
    target: str,
    pids: list[int],
    workloads: list[str],
    conc: list[int],
    folder: Path,
    env: dict[str, str],
    window_ms: int,
) -> list[dict[str, Any]]:
    rows = []
    for name in workloads:
        for c in conc:
            r = pa.run(target, pa.WORKLOADS[name], c, folder, env, lambda: pids, window_ms=window_ms)
            row = {"server": label, **r.as_dict()}
            rows.append(row)
            print(
                f"  {label:>14} {name:>14} c={c:<3} {r.throughput:>9.0f}/s  p50 {r.p50_us / 1000:6.2f} ms  "
                f"p99 {r.p99_us / 1000:6.2f} ms  cpu/1k srv {row['server_cpu_s_per_1k']:.3f}s "
                f"cli {row['client_cpu_s_per_1k']:.3f}s",
                flush=True,
            )
    return rows


def run(
    models: Path,
    workloads: list[str],
    conc: list[int],
    workers: list[int],
    extra: dict[str, str] | None = None,
    with_floor: bool = True,
    window_ms: int = 2000,
) -> dict[str, Any]:
    """Each seqserve worker count, then the floor, over every workload and concurrency; a dict of rows."""
    env = pa.environment()
    workloads = [w for w in workloads if (models / pa.WORKLOADS[w].model).is_dir()]  # a model not committed: skipped
    results: dict[str, Any] = {"concurrency": conc, "workloads": workloads, "workers": workers, "rows": []}
    results["load_before"] = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for w in workers:
            with serve(models, {"SEQSERVE_LOG_LEVEL": "WARNING"} | (extra or {}), w) as server:
                target, pid = server.target, server.pid
                warm(target, models)
                if not (folder / "canned").exists():
                    from bench.floor import record

                    record(target, canned_requests(models), folder / "canned")
                pids = _children(pid)
                results["rows"] += measure(f"seqserve w={w}", target, pids, workloads, conc, folder, env, window_ms)
        if with_floor:  # on the server's event loop (the event_loop setting's default unless --env names one)
            loop = (extra or {}).get("SEQSERVE_EVENT_LOOP", Settings.model_fields["event_loop"].default)
            with floor(folder / "canned", folder, loop) as (info, pid):
                target = f"127.0.0.1:{info['grpc_port']}"
                results["rows"] += measure("floor", target, [pid], workloads, conc, folder, env, window_ms)
    results["load_after"] = os.getloadavg()
    return results


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """seqserve/floor throughput per (server, workload, concurrency)."""
    floor_rows = {(r["workload"], r["concurrency"]): r for r in results["rows"] if r["server"] == "floor"}
    out = []
    for r in results["rows"]:
        f = floor_rows.get((r["workload"], r["concurrency"]))
        if r["server"] != "floor" and f is not None:
            out.append({**r, "ratio": r["throughput"] / f["throughput"]})
    return out


def print_table(results: dict[str, Any]) -> None:
    before, after = results.get("load_before", ()), results.get("load_after", ())
    print("\nperf_analyzer (client on the same cores; throughput/s, p50 ms, ratio to the floor, CPU s per 1k req):")
    if before and after:
        print(f"  load average before {before[0]:.2f}, after {after[0]:.2f} (1 min)")
    print(f"  {'server':>14} {'workload':>14} {'c':>3} {'thr/s':>8} {'p50':>6} {'p99':>6} {'xfloor':>6} "
          f"{'srv cpu':>7} {'cli cpu':>7}")  # fmt: skip
    with_ratio = {(r["server"], r["workload"], r["concurrency"]): r["ratio"] for r in ratios(results)}
    for r in results["rows"]:
        x = with_ratio.get((r["server"], r["workload"], r["concurrency"]))
        print(
            f"  {r['server']:>14} {r['workload']:>14} {r['concurrency']:>3} {r['throughput']:>8.0f} "
            f"{r['p50_us'] / 1000:>6.2f} {r['p99_us'] / 1000:>6.2f} {'' if x is None else f'{x:.2f}':>6} "
            f"{r['server_cpu_s_per_1k']:>7.3f} {r['client_cpu_s_per_1k']:>7.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "perf.json")
    ap.add_argument("--workloads", nargs="+", default=list(pa.WORKLOADS), choices=list(pa.WORKLOADS))
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, available_workers()])
    ap.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="extra SEQSERVE_* for the server")
    ap.add_argument("--no-floor", action="store_true", help="skip the floor server (tuning runs)")
    args = ap.parse_args(argv)
    extra = dict(kv.split("=", 1) for kv in args.env)
    results = run(args.models, args.workloads, args.concurrency, sorted(set(args.workers)), extra, not args.no_floor)
    cli.write_json(args.out, results)
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
