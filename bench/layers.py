"""Where a served step's CPU goes, layer by layer.

perf_analyzer drives, in alternating rounds, the canned-response floor, four seqserve servers (one worker each)
in which one layer answers from a recording, and seqserve itself. Each server runs for real everything above its
cut; the cut layer and everything below it answer with what they answered the first time they met the same
kind of request (computed for real then). So each server does one more layer's work than the one before, and the
difference in server CPU per request between neighbours is that layer's cost, measured where it runs: inside a
served request, beside gRPC's threads, the client and the other layers (in-process figures such as
``bench/core.py``'s come out lower: the caches are warm there).

    server     runs for real                                                       replays
    floor      gRPC only (``bench/floor.py``: no edge, no model, no state)          everything
    edge       + the edge (auth, metrics, decoding) and the servicer's stream loop  the servicer's ``_infer``
    servicer   + parameters, inputs, response encoding                              the data plane's ``infer``
    core       + resolve, session lease/load/save, checks, the task                 the batcher's ``submit``
    batcher    + the batcher (queue, concatenate, split, softmax, statistics)       ONNX Runtime's ``run``
    seqserve   + ONNX Runtime (and what its runs do to the caches and threads)      nothing

Beside them runs a reference, ``lean`` (``bench/lean.py``): the floor plus a real char-LM step and nothing else
(the sequence's state in a dict, batched ONNX Runtime runs, the softmax; no edge, checks, session store,
statistics or error handling). Its CPU over the floor's is what the step alone costs a Python server on this
skeleton: the least any such server spends, however lean the rest of its Python. Each server's ``xfloor`` is its
throughput over the floor's in the same round.

A replay costs one dictionary lookup and a copy of the recorded answer (the answer is the first one the layer
gave for that key: model and outputs for the servicer and the data plane, batch shape for the batcher and ONNX
Runtime). A sequence's first recorded answer is computed as its start. Replayed answers are not counted in the
model's statistics, so the workloads pin their model version (perf_analyzer's ``-x``; it would otherwise look for
the version in those statistics). The servers of the cuts are this module:
``python -m bench.layers serve CUT [seqserve serve flags]`` installs the replay, then runs ``seqserve serve``.

    python -m bench.layers [--models models] [--workloads charlm1-stream charlm1-unary] [--concurrency 16]
                           [--rounds 2] [--window-ms 2000]
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import cli, pa, perf, where
from bench.launch import process, serve_flags, server_env
from service.argtypes import count

ADDS = {
    "floor": "gRPC alone (the canned-response floor)",
    "edge": "+ the edge (auth, metrics, decoding) and the stream loop",
    "servicer": "+ parameters, inputs, response encoding",
    "core": "+ resolve, session lease/load/save, checks, the task",
    "batcher": "+ the batcher (queue, concatenate, split, softmax, stats)",
    "seqserve": "+ ONNX Runtime's runs",
    "lean": "the floor + the step alone (bench/lean.py), nothing else",
}


# --- the replays, installed in a server process -------------------------------------------------------------
def install(cut: str) -> None:
    """Makes this process's seqserve answer from recordings at ``cut`` (one of ``CUTS``) and below."""
    if cut not in CUTS:
        raise ValueError(f"cut must be one of {', '.join(CUTS)}, got {cut!r}")
    REPLAYS[cut]()


def _replay_servicer() -> None:
    from service.api.gen.inference import grpc_service_pb2 as pb
    from service.api.kserve.servicer import KServeServicer

    real = KServeServicer._infer
    answers: dict[tuple[str, str, tuple[str, ...]], Any] = {}

    async def _infer(self: KServeServicer, request: Any, response: Any = None) -> Any:
        key = (request.model_name, request.model_version, tuple(o.name for o in request.outputs))
        answer = answers.get(key)
        if answer is None:
            first = pb.ModelInferRequest()
            first.CopyFrom(request)
            if "sequence_id" in first.parameters:
                first.parameters["sequence_start"].bool_param = True
            answer = answers[key] = await real(self, first)
        response = pb.ModelInferResponse() if response is None else response
        response.CopyFrom(answer)
        response.id = request.id
        return response

    KServeServicer._infer = _infer  # type: ignore[method-assign]


def _replay_dataplane() -> None:
    from service.core.dataplane import CoreDataPlane
    from service.core.types import SequenceRef

    real = CoreDataPlane.infer
    answers: dict[tuple[Any, tuple[str, ...]], Any] = {}

    async def infer(self: CoreDataPlane, model: Any, inputs: Any, outputs: Any = None, sequence: Any = None,
                    classes: Any = None, timeout: Any = None) -> Any:  # fmt: skip
        key = (model, tuple(outputs or ()))
        answer = answers.get(key)
        if answer is None:
            start = None if sequence is None else SequenceRef(sequence.id, start=True)
            answer = answers[key] = await real(self, model, inputs, outputs, start, classes, timeout)
        return answer

    CoreDataPlane.infer = infer  # type: ignore[method-assign]


def _replay_batcher() -> None:
    from service.core.batching import Batcher

    real = Batcher.submit
    answers: dict[tuple[int, int, Any, bool], Any] = {}

    async def submit(self: Batcher, item: Any) -> Any:
        key = (id(self), item.rows, item.key, item.derive)
        answer = answers.get(key)
        if answer is None:
            answer = answers[key] = await real(self, item)
        return answer

    Batcher.submit = submit  # type: ignore[method-assign]


def _replay_runtime() -> None:
    from service.core.runtime import Runtime

    real = Runtime.run
    answers: dict[tuple[Any, ...], dict[str, Any]] = {}

    def run(self: Runtime, feeds: dict[str, Any], batch: int) -> dict[str, Any]:
        key = (id(self), batch, *((name, a.shape, a.dtype.str) for name, a in feeds.items()))
        answer = answers.get(key)
        if answer is None:
            answer = answers[key] = real(self, feeds, batch)
        return {name: a.copy() for name, a in answer.items()}  # fresh arrays, as a real run returns

    Runtime.run = run  # type: ignore[method-assign]


REPLAYS: dict[str, Callable[[], None]] = {  # the replay each cut installs, outermost cut first
    "edge": _replay_servicer,
    "servicer": _replay_dataplane,
    "core": _replay_batcher,
    "batcher": _replay_runtime,
}
CUTS = tuple(REPLAYS)  # seqserve servers with a replayed layer, outermost cut first
ORDER = ("floor", *CUTS, "seqserve")  # each runs one more layer for real than the one before
REFERENCE = "lean"  # beside the layers: the floor plus a real step and nothing else (set against the floor)


def serve_cut(cut: str, serve_args: Sequence[str]) -> int:
    install(cut)
    from service.cli import main

    return main(["serve", *serve_args])


# --- the measurement --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _cut_server(models: Path, cut: str, folder: Path) -> Any:
    ready = folder / f"cut-{cut}.json"
    cmd = [sys.executable, "-m", "bench.layers", "serve", cut, *serve_flags(models, ready, workers=1)]
    with process(cmd, ready, server_env({"SEQSERVE_LOG_LEVEL": "WARNING"})) as (info, pid):
        target = f"127.0.0.1:{info['grpc_port']}"
        perf.warm(target, models)
        yield target, pid


@contextlib.contextmanager
def _lean_server(models: Path, folder: Path) -> Any:
    """``bench/lean.py`` on the floor's recorded answers (``folder / "canned"``, written by the first seqserve)."""
    ready = folder / "lean.json"
    cmd = [sys.executable, "-m", "bench.lean", "--canned", str(folder / "canned"), "--models", str(models),
           "--ready-file", str(ready)]  # fmt: skip
    with process(cmd, ready, server_env({})) as (info, pid):
        yield f"127.0.0.1:{info['grpc_port']}", pid


def run(models: Path, workloads: list[str], conc: list[int], rounds: int = 2, window_ms: int = 2000) -> dict[str, Any]:
    """Every server of ``ORDER`` and the ``REFERENCE`` started and left running, then measured back to back per
    workload and concurrency, ``rounds`` times in alternating order; ``rows`` per measurement, ``summary`` per
    workload."""
    unpinned = [name for name in workloads if not pa.WORKLOADS[name].version]
    if unpinned:  # perf_analyzer would look for the version in statistics that replayed answers do not update
        raise ValueError(f"workloads {', '.join(unpinned)} name no model version; the layers need one (-x)")
    env = pa.environment()
    chosen = [pa.WORKLOADS[name] for name in workloads if pa.WORKLOADS[name].committed(models)]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        folder = Path(tmp)
        real = {s.label.split()[0]: s for s in perf.started(running, models, folder, [1])}
        servers: list[perf.Server] = [real["floor"]._replace(label="floor")]
        for cut in CUTS:
            target, pid = running.enter_context(_cut_server(models, cut, folder))
            servers.append(perf.Server(cut, target, [pid]))
        servers.append(real["seqserve"]._replace(label="seqserve"))
        target, pid = running.enter_context(_lean_server(models, folder))
        servers.append(perf.Server(REFERENCE, target, [pid]))
        rows = perf.interleaved(servers, chosen, conc, rounds, folder, env, window_ms)
    return {"workloads": [w.name for w in chosen], "concurrency": conc, "rounds": rounds, "rows": rows,
            "summary": summary(rows)}  # fmt: skip


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per workload and concurrency: each server's median CPU µs per request and throughput, the µs its layer
    adds over the server before it in ``ORDER`` (the lean reference's: over the floor), and its throughput as a
    ratio of the floor's in the same round (median over rounds; None without the floor)."""
    out = []
    for key in dict.fromkeys((r["workload"], r["concurrency"]) for r in rows):
        mine = [r for r in rows if (r["workload"], r["concurrency"]) == key]
        floor = {r["round"]: r["throughput"] for r in mine if r["server"] == "floor"}
        layers: list[dict[str, Any]] = []
        before: float | None = None
        floor_cpu: float | None = None
        for label in (*ORDER, REFERENCE):
            runs = [r for r in mine if r["server"] == label]
            if not runs:
                continue
            cpu = statistics.median(r["server_cpu_s_per_1k"] * 1000 for r in runs)
            base = floor_cpu if label == REFERENCE else before
            ratios = [r["throughput"] / floor[r["round"]] for r in runs if floor.get(r["round"])]
            layers.append({"server": label, "cpu_us": cpu, "adds_us": None if base is None else cpu - base,
                           "throughput": statistics.median(r["throughput"] for r in runs),
                           "xfloor": statistics.median(ratios) if ratios else None})  # fmt: skip
            before = cpu
            if label == "floor":
                floor_cpu = cpu
        out.append({"workload": key[0], "concurrency": key[1], "layers": layers})
    return out


def print_table(results: dict[str, Any]) -> None:
    print(
        "\nServer CPU per request, layer by layer (one worker; each server replays the layers below its own: "
        f"medians of {results['rounds']} round(s)):"
    )
    for s in results["summary"]:
        print(f"  {s['workload']} c={s['concurrency']}:")
        print(f"    {'server':>9}  {'runs for real':<58} {'CPU µs/req':>10} {'layer µs':>9} {'thr/s':>7} {'xfloor':>6}")
        for layer in s["layers"]:
            adds = "" if layer["adds_us"] is None else f"{layer['adds_us']:+.1f}"
            ratio = "" if layer["xfloor"] is None or layer["server"] == "floor" else f"{layer['xfloor']:.2f}"
            print(
                f"    {layer['server']:>9}  {ADDS[layer['server']]:<58} {layer['cpu_us']:>10.1f} {adds:>9} "
                f"{layer['throughput']:>7.0f} {ratio:>6}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "layers.json")
    pinned = [name for name, w in pa.WORKLOADS.items() if w.version]  # (replays are not counted in statistics)
    pa.add_options(ap, where.WORKLOADS, [16], rounds=2, choices=pinned)
    ap.add_argument("--window-ms", type=count(100), default=2000)
    a = ap.parse_args(argv)
    results = run(a.models, a.workloads, a.concurrency, a.rounds, a.window_ms)
    cli.write_json(a.out, results)
    print_table(results)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:  # one server with a replayed layer (what ``run`` starts), signals as seqserve's
        if len(sys.argv) < 3:
            raise SystemExit(f"usage: python -m bench.layers serve {{{','.join(CUTS)}}} [seqserve serve flags]")
        sys.exit(serve_cut(sys.argv[2], sys.argv[3:]))
    cli.run(main)
