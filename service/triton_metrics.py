"""Triton's own Prometheus names, for dashboards and alerts written for Triton (``SEQSERVE_TRITON_METRICS``).

Read at scrape time from the numbers the statistics extension reports (``ModelStatistics``: one ``StatsBook`` per
model version), so nothing is counted twice and a request costs nothing more. Labels ``model`` and ``version``, as
Triton's. Durations are microseconds, as Triton's (``_us``).

- ``nv_inference_request_success`` / ``_failure``: requests (a request of several texts counts once);
  ``nv_inference_count``: inferences (each text); ``nv_inference_exec_count``: model runs (batches).
- ``nv_inference_request_duration_us`` (successful requests, whole), ``nv_inference_queue_duration_us``,
  ``nv_inference_compute_input_duration_us``, ``nv_inference_compute_infer_duration_us``,
  ``nv_inference_compute_output_duration_us``: cumulative.
- ``nv_inference_pending_request_count``: requests waiting in the version's batch queue now.
- ``nv_cache_num_hits_per_model``, ``nv_cache_num_misses_per_model``, ``nv_cache_hit_duration_per_model``,
  ``nv_cache_miss_duration_per_model``: the response cache's lookups, when it is on (``RESPONSE_CACHE_BYTES``).
- ``nv_cpu_utilization`` (all cores, 0-1, since the previous scrape), ``nv_cpu_memory_total_bytes``,
  ``nv_cpu_memory_used_bytes`` (the machine's, from ``/proc``, as Triton reads them; absent elsewhere).

Triton declares its cumulative series as counters without the ``_total`` suffix; the Prometheus text formats
allow that only for untyped series, so these are exposed untyped under Triton's exact names (``rate()`` and
``increase()`` treat them alike). No ``nv_gpu_*``: Triton reads those from DCGM, which this server does not use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.metrics_core import GaugeMetricFamily, Metric, UnknownMetricFamily
from prometheus_client.registry import Collector

from service.core.types import Duration, ModelStats

LABELS = ("model", "version")
_COUNTS = (
    ("nv_inference_request_success", "Number of successful inference requests, each request counted once.",
     lambda s: s.success.count),
    ("nv_inference_request_failure", "Number of failed inference requests, each request counted once.",
     lambda s: s.fail.count),
    ("nv_inference_count", "Number of inferences performed (a request of n texts or rows counts n; no cache hits).",
     lambda s: s.inference_count),
    ("nv_inference_exec_count", "Number of model executions (batches; no cache hits).", lambda s: s.execution_count),
    ("nv_inference_request_duration_us", "Cumulative time of successful requests, end to end, in microseconds.",
     lambda s: _us(s.success)),
    ("nv_inference_queue_duration_us", "Cumulative time requests waited in the batch queue, in microseconds.",
     lambda s: _us(s.queue)),
    ("nv_inference_compute_input_duration_us", "Cumulative time requests spent building inputs, in microseconds.",
     lambda s: _us(s.compute_input)),
    ("nv_inference_compute_infer_duration_us", "Cumulative time requests spent in the model, in microseconds.",
     lambda s: _us(s.compute_infer)),
    ("nv_inference_compute_output_duration_us", "Cumulative time requests spent on outputs, in microseconds.",
     lambda s: _us(s.compute_output)),
)  # fmt: skip
_CACHE = (
    ("nv_cache_num_hits_per_model", "Number of response cache hits.", lambda s: s.cache_hit.count),
    ("nv_cache_num_misses_per_model", "Number of response cache misses.", lambda s: s.cache_miss.count),
    ("nv_cache_hit_duration_per_model", "Cumulative time of response cache hits, in microseconds.",
     lambda s: _us(s.cache_hit)),
    ("nv_cache_miss_duration_per_model", "Cumulative time of response cache misses (lookup and keep), in µs.",
     lambda s: _us(s.cache_miss)),
)  # fmt: skip


def _us(d: Duration) -> int:
    """Whole microseconds, as Triton exports them."""
    return d.ns // 1000


class TritonMetrics(Collector):
    """The collector: ``stats()`` gives every loaded version's statistics, ``pending(model, version)`` its queue's
    length, ``label(model)`` the model label value (the cardinality guard of ``Metrics``); ``cache``: whether the
    response cache is on (its families are exported only then, as Triton's)."""

    def __init__(
        self,
        stats: Callable[[], list[ModelStats]],
        pending: Callable[[str, int], int],
        label: Callable[[str], str],
        cache: bool,
        proc: Path = Path("/proc"),
        models: bool = True,
        machine: bool = True,
    ) -> None:
        """``models`` / ``machine``: export the per-version families / the machine's (with several engines, the
        first engine sums the first over every engine and exports the second once)."""
        self._stats, self._pending, self._label, self._cache, self._proc = stats, pending, label, cache, proc
        self.models, self.machine = models, machine
        self._lock = threading.Lock()
        self._cpu: tuple[int, int] | None = None  # (busy, total) jiffies at the previous scrape

    def part(self, models: bool, machine: bool) -> TritonMetrics:
        """The same collector exporting only these families."""
        return TritonMetrics(self._stats, self._pending, self._label, self._cache, self._proc, models, machine)

    def collect(self) -> Iterator[Metric]:
        if self.models:
            rows = self._stats()
            yield from self._families(_COUNTS + (_CACHE if self._cache else ()), rows)
            pending = GaugeMetricFamily(
                "nv_inference_pending_request_count", "Requests waiting in the batch queue.", labels=LABELS
            )
            for key, total in self._summed(rows, lambda s: self._pending(s.name, s.version)).items():
                pending.add_metric(list(key), total)
            yield pending
        if self.machine:
            yield from self._machine()

    def _families(self, table: tuple[tuple[str, str, Callable[[ModelStats], float]], ...], rows: list[ModelStats]
                  ) -> Iterator[Metric]:  # fmt: skip
        for name, doc, value in table:
            family = UnknownMetricFamily(name, doc, labels=LABELS)
            for key, total in self._summed(rows, value).items():
                family.add_metric(list(key), total)
            yield family

    def _summed(self, rows: list[ModelStats], value: Callable[[ModelStats], float]) -> dict[tuple[str, str], float]:
        """``value`` of each version by its labels: two model names the guard folds into one label add up (one
        sample per label set, as the exposition format requires)."""
        sums: dict[tuple[str, str], float] = {}
        for s in rows:
            key = (self._label(s.name), str(s.version))
            sums[key] = sums.get(key, 0.0) + value(s)
        return sums

    def _machine(self) -> Iterator[Metric]:
        """The CPU's utilization since the previous scrape and the machine's memory, when ``/proc`` has them."""
        try:
            fields = [int(x) for x in (self._proc / "stat").read_text().split("\n", 1)[0].split()[1:]]
            memory = {
                line.split(":")[0]: int(line.split()[1]) * 1024
                for line in (self._proc / "meminfo").read_text().splitlines()
                if line.startswith(("MemTotal:", "MemAvailable:"))
            }
        except (OSError, ValueError, IndexError):
            return
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is in user already)
        with self._lock:
            before, self._cpu = self._cpu, (total - idle, total)
        busy0, total0 = before if before is not None else (0, 0)
        share = (total - idle - busy0) / (total - total0) if total > total0 else 0.0
        yield GaugeMetricFamily(
            "nv_cpu_utilization", "CPU utilization of the machine since the previous scrape, 0 to 1.",
            value=min(max(share, 0.0), 1.0),
        )  # fmt: skip
        if "MemTotal" in memory and "MemAvailable" in memory:
            yield GaugeMetricFamily("nv_cpu_memory_total_bytes", "Memory of the machine.", value=memory["MemTotal"])
            yield GaugeMetricFamily(
                "nv_cpu_memory_used_bytes", "Memory in use on the machine (total less available).",
                value=memory["MemTotal"] - memory["MemAvailable"],
            )  # fmt: skip
