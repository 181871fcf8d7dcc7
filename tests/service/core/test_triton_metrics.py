"""Triton's metric names (``SEQSERVE_TRITON_METRICS``): off by default; on, /metrics carries ``nv_inference_*``,
``nv_cache_*`` and ``nv_cpu_*`` under Triton's exact names and labels, with the numbers ModelStatistics reports
(the same book), a valid exposition in both Prometheus formats. A real Prometheus ingests them in
``tests/integration/test_prometheus.py``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from service.core.types import Duration, ModelRef, ModelStats
from service.errors import ModelNotFound
from service.metrics import Metrics
from service.triton_metrics import TritonMetrics
from tests.service.core.conftest import memory_dp, texts

SENT = ModelRef("sentiment")


def samples(exposition: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition.decode())
        for s in family.samples
    }


async def test_off_by_default(repo: Path) -> None:
    dp = await memory_dp(repo)
    try:
        await dp.classify(SENT, ["good film"])
        assert b"nv_inference" not in generate_latest(dp.metrics.registry)
    finally:
        await dp.stop()


async def test_tritons_names_carry_what_model_statistics_reports(repo: Path) -> None:
    dp = await memory_dp(repo, triton_metrics=True, response_cache_bytes=1 << 20)
    try:
        await dp.classify(SENT, ["good film", "a dull one"])  # one request, two inferences, a cache miss
        await dp.classify(SENT, ["good film"])  # answered by the response cache
        await dp.infer(SENT, texts("fine", "bad", "odd"))  # one request, three inferences, a cache miss
        with pytest.raises(ModelNotFound):
            await dp.classify(ModelRef("sentiment", 9), ["x"])  # never reaches a version: counted nowhere
        stats = {(s.name, s.version): s for s in await dp.statistics(None)}
        body = generate_latest(dp.metrics.registry)
        got = samples(body)
        sent = (("model", "sentiment"), ("version", "1"))
        s = stats[("sentiment", 1)]
        assert s.success.count == 3 and s.inference_count == 5 and s.cache_hit.count == 1  # (what was sent)
        assert got["nv_inference_request_success", sent] == s.success.count
        assert got["nv_inference_request_failure", sent] == s.fail.count == 0
        assert got["nv_inference_count", sent] == s.inference_count
        assert got["nv_inference_exec_count", sent] == s.execution_count >= 1
        assert got["nv_inference_request_duration_us", sent] == s.success.ns // 1000 > 0
        assert got["nv_inference_queue_duration_us", sent] == s.queue.ns // 1000
        assert got["nv_inference_compute_infer_duration_us", sent] == s.compute_infer.ns // 1000 > 0
        assert got["nv_inference_compute_input_duration_us", sent] == s.compute_input.ns // 1000
        assert got["nv_inference_compute_output_duration_us", sent] == s.compute_output.ns // 1000
        assert got["nv_cache_num_hits_per_model", sent] == 1
        assert got["nv_cache_num_misses_per_model", sent] == s.cache_miss.count == 2  # (per request, as Triton)
        assert got["nv_cache_hit_duration_per_model", sent] == s.cache_hit.ns // 1000 > 0
        assert got["nv_inference_pending_request_count", sent] == 0
        charlm = (("model", "charlm"), ("version", "1"))
        assert got["nv_inference_request_success", charlm] == 0  # every loaded version has its series
        assert 0.0 <= got["nv_cpu_utilization", ()] <= 1.0
        assert 0 < got["nv_cpu_memory_used_bytes", ()] <= got["nv_cpu_memory_total_bytes", ()]
        assert b"# TYPE nv_inference_request_success untyped\n" in body  # Triton's exact name, no _total
        # The OpenMetrics exposition (what Prometheus asks for) parses too, with the same names.
        render: Callable[[CollectorRegistry], bytes] = generate_openmetrics  # (both unannotated there)
        parse: Callable[[str], Iterable[Metric]] = parse_openmetrics
        families = {f.name for f in parse(render(dp.metrics.registry).decode())}
        assert {"nv_inference_request_success", "nv_inference_queue_duration_us"} <= families
    finally:
        await dp.stop()


def test_pending_requests_and_the_cpu_share_since_the_last_scrape(tmp_path: Path) -> None:
    """The queue's length at scrape time; the CPU's busy share between two scrapes (from a /proc of our own)."""
    metrics = Metrics(runtime_collectors=False)
    metrics.watch_queue("m", 2, lambda: 7)
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "meminfo").write_text("MemTotal:  1000 kB\nMemFree:  100 kB\nMemAvailable:  400 kB\n")
    collector = TritonMetrics(lambda: [], metrics.queue_length, lambda m: m, cache=False, proc=proc)

    def scrape(stat: str) -> dict[str, float]:
        (proc / "stat").write_text(stat)
        return {s.name: s.value for f in collector.collect() for s in f.samples}

    scrape("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3\n")
    second = scrape("cpu  130 0 130 840 0 0 0 0 0 0\n")  # 60 busy of 100 jiffies since the first
    assert second["nv_cpu_utilization"] == pytest.approx(0.6)
    assert (second["nv_cpu_memory_total_bytes"], second["nv_cpu_memory_used_bytes"]) == (1_024_000, 614_400)
    assert metrics.queue_length("m", 2) == 7 and metrics.queue_length("m", 3) == 0


def test_two_models_the_label_guard_folds_into_one_label_add_up() -> None:
    """Past the model label's cap ``Metrics`` reports other names as one value: their versions' numbers, the
    pending requests included, add up into one sample per label set, as the exposition format requires."""
    zero = Duration()

    def stats(name: str, count: int) -> ModelStats:
        return ModelStats(name, 1, 0, count, count, Duration(count, 1000 * count), zero, zero, zero, zero, zero, [])

    waiting = {"a": 2, "b": 3}
    collector = TritonMetrics(
        lambda: [stats("a", 5), stats("b", 7)], lambda m, v: waiting[m], lambda m: "other", cache=False
    )
    registry = CollectorRegistry()
    registry.register(collector)
    got = samples(generate_latest(registry))
    labels = (("model", "other"), ("version", "1"))
    assert got[("nv_inference_count", labels)] == 12
    assert got[("nv_inference_request_duration_us", labels)] == 12
    assert got[("nv_inference_pending_request_count", labels)] == 5
