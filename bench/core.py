"""``make bench``'s core table: the per-step cost of the core alone, without gRPC.

In one process, ``C`` concurrent sequences each send one-character KServe steps (a serialized
``ModelInferRequest`` with ``sequence_id``, parsed, served by the KServe servicer's ``_infer`` through the real
data plane, batcher, session store and ONNX Runtime, the response serialized), on one event loop, exactly as the
server does minus the transport and the edge. It reports steps per second, CPU microseconds per step (process time
over wall), the ONNX Runtime share (from the model's own statistics, the ``compute_infer`` Triton reports) and the
mean batch. Set against perf_analyzer's server CPU per request and the canned floor's (``bench/perf.py``), it
splits a served step into gRPC, edge and core.

    python -m bench.core [--models models] [--steps 4000]
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench import cli
from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.kserve.servicer import KServeServicer
from service.core.dataplane import CoreDataPlane
from service.core.manifest import MANIFEST_FILE
from service.core.types import ModelRef
from service.metrics import Metrics
from service.settings import Settings


def request(model: str, sequence: int, start: bool, version: int | None = None) -> bytes:
    r = pb.ModelInferRequest(model_name=model, model_version="" if version is None else str(version), id=str(sequence))
    r.parameters["sequence_id"].int64_param = sequence
    if start:
        r.parameters["sequence_start"].bool_param = True
    t = r.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(b"e")
    return r.SerializeToString()


async def measure(models: Path, ref: ModelRef, concurrency: int, steps: int) -> dict[str, Any]:
    settings = Settings(models=models, device="cpu", log_level="WARNING")
    dp = CoreDataPlane(settings, Metrics(runtime_collectors=False))
    await dp.start()
    try:
        servicer = KServeServicer(dp, settings)
        per = max(1, steps // concurrency)

        async def sequence(i: int, n: int) -> None:
            first, later = request(ref.name, i + 1, True, ref.version), request(ref.name, i + 1, False, ref.version)
            servicer_infer = servicer._infer  # the servicer's whole per-request path, transport excluded
            (await servicer_infer(pb.ModelInferRequest.FromString(first))).SerializeToString()
            for _ in range(n):
                # Each step in a loop iteration of its own, as gRPC hands the server its requests: without this a
                # lone inline step's end-of-iteration marker (Batcher.submit) was still queued when the next step
                # came, so at c=1 every other step went through the batcher's queue, which a server's never does.
                await asyncio.sleep(0)
                (await servicer_infer(pb.ModelInferRequest.FromString(later))).SerializeToString()

        await asyncio.gather(*(sequence(i, per // 10) for i in range(concurrency)))  # warm-up
        before = await _infer_ns(dp, ref)
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(sequence(i, per) for i in range(concurrency)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        after = await _infer_ns(dp, ref)
        n = concurrency * (per + 1)
        return {
            "model": f"{ref.name}/{ref.version}", "concurrency": concurrency, "steps": n, "steps_per_s": n / wall,
            "cpu_us_per_step": cpu / n * 1e6, "ort_us_per_step": (after[0] - before[0]) / n / 1e3,
            "mean_batch_rows": (after[1] - before[1]) / max(after[2] - before[2], 1),
        }  # fmt: skip
    finally:
        await dp.stop()


async def _infer_ns(dp: CoreDataPlane, ref: ModelRef) -> tuple[int, int, int]:
    """ORT nanoseconds, rows and runs so far of one model version (batch statistics)."""
    ns = rows = runs = 0
    for s in await dp.statistics(ref):
        for b in s.batches:
            ns, rows, runs = (
                ns + b.compute_infer.ns,
                rows + b.batch_size * b.compute_infer.count,
                runs + b.compute_infer.count,
            )
    return ns, rows, runs


def versions(models: Path, name: str) -> list[int]:
    """The committed versions of ``name`` (folders with a manifest), oldest first."""
    return sorted(int(p.parent.name) for p in (models / name).glob(f"*/{MANIFEST_FILE}"))


def char_models(models: Path) -> list[ModelRef]:
    """Every committed version of the float32 char LM and of its int8 copies (``charlm-int8/1``: dynamic
    quantization; ``/2``: static, batch-invariant)."""
    return [ModelRef(name, v) for name in ("charlm", "charlm-int8") for v in versions(models, name)]


def run(models: Path, steps: int = 4000, concurrency: tuple[int, ...] = (1, 16)) -> list[dict[str, Any]]:
    return [asyncio.run(measure(models, ref, c, steps)) for ref in char_models(models) for c in concurrency]


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\nThe core alone, no gRPC (KServe servicer -> data plane -> batcher -> ORT, one-character sequence steps):")
    print(
        f"  {'model':>12} {'c':>3} {'steps/s':>8} {'CPU µs/step':>12} {'ORT µs/step':>12} {'rest µs':>8} {'batch':>6}"
    )
    for r in rows:
        rest = r["cpu_us_per_step"] - r["ort_us_per_step"]
        print(
            f"  {r['model']:>12} {r['concurrency']:>3} {r['steps_per_s']:>8.0f} {r['cpu_us_per_step']:>12.1f} "
            f"{r['ort_us_per_step']:>12.1f} {rest:>8.1f} {r['mean_batch_rows']:>6.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "core.json")
    ap.add_argument("--steps", type=int, default=4000)
    args = ap.parse_args(argv)
    rows = run(args.models, args.steps)
    cli.write_json(args.out, rows)
    print_table(rows)
    return 0


if __name__ == "__main__":
    cli.run(main)
