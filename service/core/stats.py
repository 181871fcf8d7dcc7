"""Per-model-version inference statistics, as Triton's statistics extension reports them (transport-free).

Request level (``inference_stats``): success and fail (count, ns of the whole request), queue (time in the
batch queue), compute_input (building the batch's feeds), compute_infer (the ONNX Runtime run) and
compute_output (splitting the results): each request of a batch is charged the batch's compute time, as
Triton does. Batch level (``batch_stats``): per batch size, how many batches ran and their compute times (every
run, whatever its requests' outcome). Queue counts each successful request once (as Triton's; one answered
without a run, from a cache or a forecast window still filling: with no time), compute each successful request
that ran the model once, both with the durations of all its model runs added up (a generation of 200
characters: one count, 200 runs' time), so that duration / count, which perf_analyzer prints, is a request's own
time, as with Triton; a failed or cancelled request counts in ``fail`` alone, as Triton's (its runs are in
``batch_stats`` and ``execution_count``).
``cache_hit`` / ``cache_miss`` count the response cache's lookups (``RESPONSE_CACHE_BYTES``), as Triton's: a hit's
time to find the answer, a miss's to look and to keep the new answer; a request answered from the cache counts in
success and queue (no time), not in compute. They stay empty while the cache is off (perf_analyzer flags them as
inconsistent when the model's config enables none). The char LM's prefix cache reports to Prometheus
(``seqserve_prefix_cache_*``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.core.context import Runs, count_runs, end_runs
from service.core.types import BatchStats, Duration, ModelStats

if TYPE_CHECKING:
    from service.core.registry import ModelEntry


@dataclass
class _Acc:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, n: int = 1) -> None:
        self.count += n
        self.ns += ns

    def frozen(self) -> Duration:
        return Duration(self.count, self.ns)


@dataclass
class _Batch:
    input: _Acc = field(default_factory=_Acc)
    infer: _Acc = field(default_factory=_Acc)
    output: _Acc = field(default_factory=_Acc)


class StatsBook:
    """Counters of one model version. Thread-safe: the batcher records from its worker thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.success, self.fail, self.queue = _Acc(), _Acc(), _Acc()
        self.compute_input, self.compute_infer, self.compute_output = _Acc(), _Acc(), _Acc()
        self.cache_hit, self.cache_miss = _Acc(), _Acc()
        self._batches: dict[int, _Batch] = {}

    def request(self, ok: bool, ns: int, inferences: int, runs: Runs | None = None) -> None:
        """One finished request (any API): its outcome, duration, the inferences it counted, and its model runs
        (``runs``: the batcher added their times). A successful request counts once in queue (one answered
        without a model run, from a cache or a forecast window still filling, with no time: perf_analyzer finds
        the version it measures by the queue count that grew) and, when it ran the model, once in compute, with
        its runs' times; a failed one in ``fail`` alone, as Triton's."""
        with self._lock:
            if ok:
                self.success.add(ns)
                self.inference_count += inferences
                self.queue.add(runs.queue_ns if runs is not None else 0)
                if runs is not None and runs.count:
                    self.compute_input.add(runs.input_ns)
                    self.compute_infer.add(runs.infer_ns)
                    self.compute_output.add(runs.output_ns)
            else:
                self.fail.add(ns)
            self.last_inference_ms = int(time.time() * 1000)

    def cache(self, hit: bool, ns: int) -> None:
        """One response cache lookup (a miss: and the store of the answer that followed). A hit counts in queue as
        every successful request (``request``), in compute not: it ran nothing."""
        with self._lock:
            if hit:
                self.cache_hit.add(ns)
            else:
                self.cache_miss.add(ns)

    def batch(self, rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One model run of ``rows`` batch rows. Its requests' shares of the time are theirs (``Runs``), counted
        when they finish (``request``)."""
        with self._lock:
            self.execution_count += 1
            b = self._batches.get(rows)
            if b is None:
                b = self._batches[rows] = _Batch()
            b.input.add(input_ns)
            b.infer.add(infer_ns)
            b.output.add(output_ns)

    def snapshot(self, name: str, version: int) -> ModelStats:
        with self._lock:
            return ModelStats(
                name=name,
                version=version,
                last_inference_ms=self.last_inference_ms,
                inference_count=self.inference_count,
                execution_count=self.execution_count,
                success=self.success.frozen(),
                fail=self.fail.frozen(),
                queue=self.queue.frozen(),
                compute_input=self.compute_input.frozen(),
                compute_infer=self.compute_infer.frozen(),
                compute_output=self.compute_output.frozen(),
                cache_hit=self.cache_hit.frozen(),
                cache_miss=self.cache_miss.frozen(),
                batches=[
                    BatchStats(size, b.input.frozen(), b.infer.frozen(), b.output.frozen())
                    for size, b in sorted(self._batches.items())
                ],
            )


class CountedRequest:
    """One request on a model version, from construction to ``finish``: counted in flight (unload drains it)
    and, when it finishes, in the version's statistics. Also a context manager (ok = the block did not raise)."""

    __slots__ = ("entry", "inferences", "runs", "t0", "token")

    def __init__(self, entry: ModelEntry, inferences: int = 1) -> None:
        self.entry, self.inferences = entry, inferences
        tracer = entry.tracer
        trace = tracer.start(entry.name, entry.version) if tracer is not None and tracer.active else None
        self.runs, self.token = count_runs(trace)
        entry.enter()
        self.t0 = time.perf_counter_ns()

    def finish(self, ok: bool) -> None:
        try:
            self.entry.stats.request(ok, time.perf_counter_ns() - self.t0, self.inferences, self.runs)
        finally:
            end_runs(self.token)
            self.entry.leave()
            if self.runs.trace is not None and self.entry.tracer is not None:
                self.entry.tracer.finish(self.runs.trace)

    def __enter__(self) -> CountedRequest:
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        self.finish(kind is None)
