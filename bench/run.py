"""``make bench``: latency and throughput of a real ``seqserve serve`` process on the committed models.

Starts the server as a subprocess on loopback ports, drives it through the real gRPC client, prints a table
and writes ``bench/results/latest.json`` (git-ignored). Every number in the README comes from this command.

What it measures, and why:
- ``keystroke``: one typed character through a session (``Suggest`` on an open stream, n=1, 1 char of
  lookahead) at growing prefix lengths. A stateful session costs O(appended); the stateless alternative, what a
  server without sequence state must do (the same stream, but reset and re-fed the whole prefix each time),
  costs O(prefix). For every version of ``charlm`` and of its int8 copy ``charlm-int8``. Its floor: the same
  client and stream against a canned Suggest (``bench.floor.canned_method``): what the Python client and gRPC
  alone cost per keystroke, and so the largest speed-up any server reaches with this client.
- ``core``: the per-step CPU of the core alone, without gRPC (``bench/core.py``): what the transport adds is
  the rest of perf_analyzer's server CPU per request.
- ``runtime``: one ONNX Runtime run of each int8 copy or fused graph against its parent, what batching does to the
  int8 char LM's answers on real text, what the batcher's length groups save on real sentences, and one run of
  each default model with one and with two intra-op threads (``bench/runtime.py``).
- ``prefixes``: the same typing user without a session, re-sending the whole text at every keystroke, against the
  default server (prefix cache) and one without the cache (``bench/prefixes.py``).
- ``streams``: concurrent generation streams; the dynamic batcher merges their one-character steps.
- ``classify`` / ``forecast`` / ``observe``: request latency of the other APIs.
- ``memory``: server RSS before and after opening many char-LM sessions (bytes per session).
- ``codec``: what the frontend <-> engine link's encoding costs per char-LM step with ``--workers N``, each side
  (``bench/codec.py``).
- ``stores``: per-step cost of each session store (memory, Redis ``step``, Redis ``idle``) at c=1 and c=64, and
  Redis memory per session (``bench/stores.py``).
- ``overload``: 256 closed-loop callers against the default server, then against a queue bound below them:
  latency stays bounded and the excess is refused (``RESOURCE_EXHAUSTED``), quickly (``bench/overload.py``).
- ``perf``: Triton's perf_analyzer on the KServe endpoint, seqserve with 1 worker and with the default worker
  count against the canned-response floor (``bench/perf.py``), with ratios and CPU seconds per 1,000 requests.
- ``where``: the server CPU of one worker and of the floor per request, split by library with Linux ``perf``
  (``bench/where.py``): how much of the gap is Python bytecode, gRPC, the kernel or ONNX Runtime. Skipped, saying
  why, where ``perf`` cannot sample; not in ``--quick`` runs.
- ``layers``: the same server CPU per request split by layer (``bench/layers.py``): servers that replay the layers
  below a cut (the servicer, the data plane, the batcher, ONNX Runtime) against the floor and seqserve itself,
  and beside them the lean reference (``bench/lean.py``: the floor plus a real char-LM step and nothing else);
  not in ``--quick`` runs.
- ``loops``: the event-loop turns and callbacks per request of the floor, the lean server and seqserve
  (``bench/loops.py``): whether the gap is in more turns of the loop or in the Python each turn runs; not in
  ``--quick`` runs.

    python -m bench.run [--models models] [--repeats 50] [--quick] [--no-perf]
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench import cli, codec, core, layers, loops, prefixes, runtime, where
from bench.floor import canned_method
from bench.launch import rss_bytes, serve
from bench.stores import print_stores, run_stores
from service.api.gen.seqserve.v1 import autocomplete_pb2
from service.client import Client, SuggestEvent
from service.core.types import ModelRef

NO_PREFIX_CACHE = {"SEQSERVE_PREFIX_CACHE_BYTES": "0"}
TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
) * 40


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


class TypingStream:
    """One long-lived bidirectional Suggest stream, as a typing client keeps: ``step`` sends one event and
    waits for its answer."""

    def __init__(self, client: Client, session_id: str) -> None:
        self._events: list[SuggestEvent | None] = []
        self._cond = threading.Condition()
        self._answers = client.suggest(session_id, self._source(), timeout=600)

    def _source(self) -> Iterator[SuggestEvent]:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._events))
                ev = self._events.pop(0)
            if ev is None:
                return
            yield ev

    def _send(self, ev: SuggestEvent | None) -> None:
        with self._cond:
            self._events.append(ev)
            self._cond.notify()

    def step(self, appended: str, reset: bool = False, backspace: int = 0) -> None:
        self._send(SuggestEvent(appended, reset=reset, n=1, max_chars=1, beam=False, backspace=backspace))
        next(self._answers)

    def close(self) -> None:
        self._send(None)


def bench_keystroke(client: Client, prefixes: list[int], repeats: int, model: ModelRef) -> list[dict[str, Any]]:
    rows = []
    for n in prefixes:
        prefix = TEXT[:n]
        with client.session(model.name, model.version) as s:
            typing = TypingStream(client, s.id)
            typing.step(prefix)  # the session now holds the prefix's state
            stateful = timed(lambda t=typing: t.step("e"), repeats)  # type: ignore[misc]
            # What a server without sequence state must do per keystroke: re-read the whole prefix. Same stream,
            # same answer size; only the state handling differs (reset + the whole text every time).
            recompute = timed(lambda t=typing, p=prefix: t.step(p + "e", reset=True), repeats)  # type: ignore[misc]
            typing.close()
        row = {"prefix_chars": n, "session_step": cli.percentiles(stateful), "recompute": cli.percentiles(recompute)}
        rows.append(row | {"model": f"{s.model}/{s.version}"})
    return rows


def keystroke_floor(repeats: int) -> dict[str, float]:
    """One keystroke through the same client and stream against a canned Suggest answer (no model, no session)."""
    answer = autocomplete_pb2.SuggestResponse(
        suggestions=[autocomplete_pb2.Suggestion(text=" ", logprob=-0.5)], steps=1
    ).SerializeToString()
    canned = canned_method("seqserve.v1.Autocomplete", "Suggest", answer, streaming=True)
    with canned as target, Client(target, timeout=120) as client:
        typing = TypingStream(client, "floor")
        step = timed(lambda: typing.step("e"), repeats)
        typing.close()
    return cli.percentiles(step)


def stream_rate(client: Client, seed: int, chars: int, out: list[float]) -> None:
    got = 0
    t0 = time.perf_counter()
    for chunk in client.complete("ROMEO:", max_chars=chars, temperature=0.8, seed=seed, timeout=600):
        got += len(chunk.text)
    out.append(got / (time.perf_counter() - t0))


def bench_streams(client: Client, concurrency: list[int], chars: int) -> list[dict[str, Any]]:
    rows = []
    for c in concurrency:
        rates: list[float] = []
        t0 = time.perf_counter()
        threads = [threading.Thread(target=stream_rate, args=(client, i, chars, rates)) for i in range(c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rows.append(
            {
                "streams": c,
                "chars_per_stream": chars,
                "total_chars_per_s": c * chars / wall,
                "per_stream_chars_per_s": float(np.mean(rates)),
            }
        )
    return rows


def bench_memory(client: Client, pid: int, sessions: int) -> dict[str, Any]:
    before = rss_bytes(pid)
    ids = []
    for _ in range(sessions):
        info = client.create_session("charlm")
        client.suggest_once(info.id, "To be", n=1, max_chars=1)
        ids.append(info.id)
    after = rss_bytes(pid)
    for i in ids:
        client.delete_session(i)
    return {
        "sessions": sessions,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "bytes_per_session": (after - before) / sessions,
    }


def etth1_rows(n: int) -> np.ndarray:
    path = cli.ROOT.parent / "shared" / "data" / "etth1" / "ETTh1.csv"
    if path.exists():
        return np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(1, 8), max_rows=n, dtype=np.float32)
    return np.random.default_rng(0).normal(size=(n, 7)).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "latest.json")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and sizes (a smoke run)")
    ap.add_argument("--no-perf", action="store_true", help="skip the perf_analyzer section")
    args = ap.parse_args(argv)
    repeats = 5 if args.quick else args.repeats
    lengths = [16, 256] if args.quick else [16, 256, 1024, 4000]
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "python_speed_us_start": cli.python_speed_us(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "repeats": repeats,
    }
    # Without the prefix cache: the keystroke table's "recompute" column is what a server without sequence state must
    # do (with the cache, the reset's repeated text would come from it; the ``prefixes`` section measures the cache).
    with serve(args.models, NO_PREFIX_CACHE) as server, Client(server.target, timeout=120) as client:
        pid = server.pid
        refs = core.char_models(args.models)
        results["keystroke"] = [row for r in refs for row in bench_keystroke(client, lengths, repeats, r)]
        results["keystroke_floor"] = keystroke_floor(max(repeats, 200))
        results["streams"] = bench_streams(client, [1, 4] if args.quick else [1, 4, 16], 50 if args.quick else 200)
        texts = ["a gripping , beautifully acted film", "dull and far too long"] * 8
        results["classify"] = {
            "batch_1": cli.percentiles(timed(lambda: client.classify(texts[:1]), repeats)),
            "batch_16": cli.percentiles(timed(lambda: client.classify(texts), repeats)),
        }
        hist = etth1_rows(200)
        results["forecast"] = {"predict_96_rows": cli.percentiles(timed(lambda: client.forecast(hist[:96]), repeats))}
        with client.session("forecaster") as s:
            client.observe(s.id, hist[:96])
            rows = iter(range(96, 96 + 10_000))
            results["forecast"]["observe_1_row"] = cli.percentiles(
                timed(lambda: client.observe(s.id, hist[[next(rows) % 200]]), repeats)
            )
        results["memory"] = bench_memory(client, pid, 50 if args.quick else 500)
    results["prefixes"] = prefixes.run(args.models, lengths, repeats)
    results["core"] = core.run(args.models, 500 if args.quick else 4000)  # the core's per-step cost, no gRPC
    results["runtime"] = runtime.run(args.models, 30 if args.quick else 300)  # int8 models vs float32 parents
    results["batch_dependence"] = runtime.real_text_dependence(args.models, runtime.TEXT, 3 if args.quick else 20)
    results["cache_effect"] = runtime.cache_effect(args.models, 200 if args.quick else 2000)
    results["padding"] = runtime.padding_effect(args.models, trials=3 if args.quick else 30)  # length groups
    results["threads"] = runtime.threads_effect(args.models, 30 if args.quick else 300)  # 1 vs 2 intra-op threads
    results["stores"] = run_stores(args.models, quick=args.quick)  # per-step cost of each session store
    results["codec"] = codec.measure(2000 if args.quick else 20000, 3 if args.quick else 7)  # the engine link
    from bench import sessions  # session create rate at 1k/50k/250k live sessions (its own server; not --quick)

    if not args.quick:
        results["sessions"] = sessions.bench(args.models)
    if not args.no_perf:
        from bench import pa, perf

        default = perf.available_workers()
        if args.quick:  # a smoke run: one workload, short windows
            results["perf"] = perf.run(args.models, ["charlm-stream"], [4], sorted({1, default}), window_ms=300)
        else:
            results["perf"] = perf.run(args.models, list(pa.WORKLOADS), [1, 16, 64], sorted({1, default}))
            results["where"] = run_where(args.models)  # the perf rows' server CPU split by library (Linux perf)
            results["layers"] = layers.run(args.models, where.WORKLOADS, [16])  # ... by layer
            results["loops"] = loops.run(args.models, where.WORKLOADS, [16])  # event-loop turns per request
    from bench import overload  # 256 callers against the default server, then against a small queue bound

    results["overload"] = overload.run(args.models, 96 if args.quick else 256, 1.0 if args.quick else 8.0)
    results["machine"]["python_speed_us_end"] = cli.python_speed_us()
    cli.write_json(args.out, results)
    print_table(results)
    prefixes.print_table(results["prefixes"])
    core.print_table(results["core"])
    runtime.print_table(
        results["runtime"], results["batch_dependence"], results["cache_effect"], results["padding"], results["threads"]
    )
    print_stores(results["stores"])
    codec.print_table(results["codec"])
    if "sessions" in results:
        sessions.print_table(results["sessions"])
    if "perf" in results:
        perf.print_table(results["perf"])
    if "summary" in results.get("where", {}):
        where.print_table(results["where"])
    elif "where" in results:
        print(f"\nServer CPU per request by library: skipped ({results['where']['skipped']})")
    if "layers" in results:
        layers.print_table(results["layers"])
    if "loops" in results:
        loops.print_table(results["loops"])
    overload.print_table(results["overload"])
    print(f"\nwritten: {args.out}")
    return 0


def run_where(models: Path) -> dict[str, Any]:
    """``bench/where.py`` on the streamed and unary ``charlm/1`` steps at c=16, or why it could not run (no Linux
    perf, or no right to sample a process here)."""
    try:
        perf = where.perf_binary()
    except SystemExit as e:
        return {"skipped": str(e)}
    return where.run(models, where.WORKLOADS, [16], perf=perf)


def print_table(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"seqserve bench  ({m['cpus']} CPUs, {r['repeats']} repeats, CPU execution provider)")
    if "python_speed_us_end" in m:
        print(
            f"machine speed: sum(range(1000)) took {m['python_speed_us_start']:.1f} µs at the start and "
            f"{m['python_speed_us_end']:.1f} at the end (python -m timeit; lower is faster)"
        )
    print()
    print("One keystroke on the char LM (p50 / p99 ms):")
    print(f"  {'model':>13}  {'prefix chars':>12}  {'session step':>20}  {'recompute prefix':>20}  {'speed-up':>8}")
    for row in r["keystroke"]:
        s, c = row["session_step"], row["recompute"]
        print(
            f"  {row['model']:>13}  {row['prefix_chars']:>12}  {s['p50_ms']:>9.2f} / {s['p99_ms']:>7.2f}  "
            f"{c['p50_ms']:>9.2f} / {c['p99_ms']:>7.2f}  {c['p50_ms'] / s['p50_ms']:>7.1f}x"
        )
    f = r.get("keystroke_floor")
    if f:
        longest = max(row["prefix_chars"] for row in r["keystroke"])
        best = max(row["recompute"]["p50_ms"] for row in r["keystroke"] if row["prefix_chars"] == longest)
        print(
            f"  floor (the same client against a canned Suggest): {f['p50_ms']:.2f} / {f['p99_ms']:.2f} ms; "
            f"recomputing {longest:,} chars / floor = {best / f['p50_ms']:.0f}x, the most any server gets here"
        )
    print("\nConcurrent Complete streams (dynamic batching of one-char steps):")
    print(f"  {'streams':>8}  {'total chars/s':>14}  {'per stream':>11}")
    for row in r["streams"]:
        print(f"  {row['streams']:>8}  {row['total_chars_per_s']:>14.0f}  {row['per_stream_chars_per_s']:>11.0f}")
    print("\nOther APIs (p50 / p99 ms):")
    for name, p in [*r["classify"].items(), *r["forecast"].items()]:
        print(f"  {name:>16}  {p['p50_ms']:>8.2f} / {p['p99_ms']:>8.2f}")
    m = r["memory"]
    added = (m["rss_after_bytes"] - m["rss_before_bytes"]) / 2**20
    print(f"\nMemory: {m['sessions']} char-LM sessions add {added:.1f} MiB RSS")
    print(f"        ({m['bytes_per_session'] / 1024:.1f} KiB per session)")


if __name__ == "__main__":
    cli.run(main)
