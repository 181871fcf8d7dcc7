"""What large requests cost the calls beside them: a health check's latency while they run.

A server process serves every call of its connections on one event loop, so a request whose Python holds that
loop (reading 10,000 forecast rows out of protobuf, splitting 256 texts into words) delays every other call for as
long. One ``seqserve serve`` on the committed models (``--workers``, default 1: one process); a probe process of
its own (so that this one's GIL does not time it) calls KServe ``ServerLive`` every 2 ms; this process runs, one
after the other, each phase's requests back to back from one thread for ``--seconds`` (at least one request):

- ``idle``: none (the probe's own latency, for comparison);
- ``forecast``: ``Forecast.Predict`` with ``--rows`` rows of history (default 10,000, ``max_forecast_rows``), every
  value drawn around the training data's mean (the model's manifest);
- ``classify``: ``Sentiment.Classify`` with ``--texts`` texts (default 256, ``max_texts_per_request``) of
  ``--words`` words in all (default 32,768, ``max_words_per_request``).

Prints each phase's request latency and the probes' p50/p99/max that fell within it, and writes
``bench/results/stalls.json``. ``--code DIR`` serves another checkout's ``service`` (a worktree of an older commit)
to compare.

    python -m bench.stalls [--models models] [--seconds 3] [--rows 10000] [--texts 256] [--words 32768]
                           [--workers 1] [--code DIR]
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import cli
from bench.launch import LiveWatcher, serve
from service.api.gen.seqserve.v1 import common_pb2, forecast_pb2, sentiment_pb2
from service.core.manifest import MANIFEST_FILE, Manifest

KS = "/inference.GRPCInferenceService/"
WORDS = "a the film movie is was not good bad great dull fun story acting plot , . and but it 's n't very too"


def forecast_request(models: Path, rows: int) -> forecast_pb2.PredictRequest:
    """``rows`` rows for the newest ``forecaster``, each value its column's mean plus half a standard deviation
    of noise (seed 0)."""
    folder = max((p for p in (models / "forecaster").iterdir() if p.name.isdecimal()), key=lambda p: int(p.name))
    norm = Manifest.model_validate_json((folder / MANIFEST_FILE).read_text()).normalization
    assert norm is not None
    values = np.asarray(norm.mean) + 0.5 * np.asarray(norm.std) * np.random.default_rng(0).standard_normal(
        (rows, len(norm.mean))
    )
    history = [common_pb2.Row(values=row) for row in values.tolist()]
    return forecast_pb2.PredictRequest(model=common_pb2.ModelSelector(name="forecaster"), history=history)


def classify_request(texts: int, words: int) -> sentiment_pb2.ClassifyRequest:
    """``texts`` texts of ``words`` words in all, drawn from a short list of review words (seed 0)."""
    rng, vocabulary = random.Random(0), WORDS.split(" ")
    each = [words // texts + (i < words % texts) for i in range(texts)]
    return sentiment_pb2.ClassifyRequest(
        model=common_pb2.ModelSelector(name="sentiment"),
        texts=[" ".join(rng.choice(vocabulary) for _ in range(n)) for n in each],
    )


def run(target: str, seconds: float, phases: dict[str, tuple[str, bytes] | None]) -> dict[str, Any]:
    """Each phase's requests (method, serialized request; None: none) for ``seconds``, with the probe process
    beside them: per phase, the requests' latency and the probes within it."""
    watcher = LiveWatcher(target, 0.002)
    windows: dict[str, tuple[float, float, list[float]]] = {}
    try:
        time.sleep(0.2)
        with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)]) as channel:
            for phase, call in phases.items():
                took: list[float] = []
                start = time.perf_counter()
                if call is None:
                    time.sleep(seconds)
                else:
                    method = channel.unary_unary(call[0])
                    while not took or time.perf_counter() - start < seconds:
                        t0 = time.perf_counter()
                        method(call[1], timeout=120)
                        took.append(time.perf_counter() - t0)
                windows[phase] = (start, time.perf_counter(), took)
    finally:
        watcher.stop()
    seen, _ = watcher.results()
    result = {}
    for phase, (start, end, took) in windows.items():
        probes = [s for t0, s in seen if start <= t0 < end]
        result[phase] = {"requests": cli.percentiles(took), "probe": cli.percentiles(probes)}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "stalls.json")
    ap.add_argument("--seconds", type=float, default=3.0, help="each phase's time")
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--words", type=int, default=32_768)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--code", type=Path, default=cli.ROOT, help="the checkout whose service runs (default: this)")
    args = ap.parse_args(argv)
    phases: dict[str, tuple[str, bytes] | None] = {
        "idle": None,
        "forecast": ("/seqserve.v1.Forecast/Predict", forecast_request(args.models, args.rows).SerializeToString()),
        "classify": (
            "/seqserve.v1.Sentiment/Classify",
            classify_request(args.texts, args.words).SerializeToString(),
        ),
    }
    env = {"SEQSERVE_LOG_LEVEL": "WARNING"}
    with serve(args.models, env, workers=args.workers, code=args.code) as server:
        rows = run(server.target, args.seconds, phases)
    sizes = {"rows": args.rows, "texts": args.texts, "words": args.words}
    result = {"workers": args.workers, **sizes, "code": str(args.code), "seconds": args.seconds, "phases": rows}
    print(f"\nServerLive beside large requests ({args.workers} worker(s); {args.seconds:g} s a phase, one request "
          f"at a time; forecast {args.rows} rows, classify {args.texts} texts of {args.words} words; ms):")  # fmt: skip
    head = ("phase", "requests", "request p50", "probes", "probe p50", "probe p99", "probe max")
    print("  " + " ".join(f"{h:>{w}}" for h, w in zip(head, (9, 8, 11, 6, 9, 9, 9), strict=True)))
    for phase, r in rows.items():
        q, p = r["requests"], r["probe"]
        took = f"{q['n']:>8} {q['p50_ms']:>11.1f}" if q["n"] else f"{'-':>8} {'-':>11}"
        probed = f"{p['p50_ms']:>9.2f} {p['p99_ms']:>9.2f} {p['max_ms']:>9.2f}" if p["n"] else f"{'-':>9} " * 3
        print(f"  {phase:>9} {took} {p['n']:>6} {probed}")
    cli.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    cli.run(main)
