"""Metrics module: values after calls, label sets, bucket bounds, cardinality guard."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from service.metrics import LATENCY_BUCKETS, OTHER_MODEL, PREFIX_RESULTS, SERVER_ERROR_CODES, SESSION_EVENTS, Metrics

SVC = "seqserve.v1.Inference"


@pytest.fixture
def m() -> Metrics:
    metrics = Metrics(CollectorRegistry())
    metrics.model_loaded("charlm", 1, "CPUExecutionProvider", 0.25, ready=True)
    return metrics


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_registry_is_injected_and_separate() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg)
    assert m.registry is reg
    # A second instance on its own registry does not clash (no global state, no duplicate-timeseries error).
    Metrics(CollectorRegistry())
    assert reg.get_sample_value("process_start_time_seconds") is not None
    assert reg.get_sample_value("python_info", {**_python_info_labels(reg)}) == 1.0


def _python_info_labels(reg: CollectorRegistry) -> dict[str, str]:
    for family in reg.collect():
        if family.name == "python_info":
            return dict(family.samples[0].labels)
    raise AssertionError("python_info missing")


def test_rpc_counter_histogram_and_in_flight(m: Metrics) -> None:
    m.rpc_started(SVC, "Classify")
    m.rpc_started(SVC, "Classify")
    assert value(m, "seqserve_rpc_in_flight", service=SVC, method="Classify") == 2.0
    m.rpc_finished(SVC, "Classify", "charlm", "OK", 0.0003)
    m.rpc_finished(SVC, "Classify", "charlm", "INVALID_ARGUMENT", 0.02)
    assert value(m, "seqserve_rpc_in_flight", service=SVC, method="Classify") == 0.0
    ok = {"service": SVC, "method": "Classify", "model": "charlm", "code": "OK"}
    assert value(m, "seqserve_rpc_requests_total", **ok) == 1.0
    assert value(m, "seqserve_rpc_duration_seconds_count", **ok) == 1.0
    assert value(m, "seqserve_rpc_duration_seconds_sum", **ok) == pytest.approx(0.0003)
    # 0.3 ms falls in the 0.5 ms bucket, not in the 0.25 ms one: sub-millisecond latencies are resolved.
    assert value(m, "seqserve_rpc_duration_seconds_bucket", **ok, le="0.00025") == 0.0
    assert value(m, "seqserve_rpc_duration_seconds_bucket", **ok, le="0.0005") == 1.0
    bad = {**ok, "code": "INVALID_ARGUMENT"}
    assert value(m, "seqserve_rpc_requests_total", **bad) == 1.0


def test_server_side_error_series_exist_at_zero_from_a_methods_first_call(m: Metrics) -> None:
    """Each (service, method, model) that finished a call (or answered a stream's request) has the server-side codes
    the error-ratio alerts count at 0 from then on: a series born at its first INTERNAL lost that burst to
    ``rate()`` and ``increase()``, and so to SeqServeHighErrorRatio and the dashboard's errors panel."""
    m.rpc_finished(SVC, "Complete", "charlm", "OK", 0.001)
    m.stream_request("inference.GRPCInferenceService", "ModelStreamInfer", "charlm", "OK")
    for code in SERVER_ERROR_CODES:
        labels = {"service": SVC, "method": "Complete", "model": "charlm", "code": code}
        assert value(m, "seqserve_rpc_requests_total", **labels) == 0.0
        stream = {**labels, "service": "inference.GRPCInferenceService", "method": "ModelStreamInfer"}
        assert value(m, "seqserve_rpc_stream_requests_total", **stream) == 0.0
    assert value(m, "seqserve_rpc_duration_seconds_count", service=SVC, method="Complete", model="charlm",
                 code="INTERNAL") is None  # (counters only: no empty histograms)  # fmt: skip
    m.rpc_finished(SVC, "Complete", "charlm", "INTERNAL", 0.001)
    assert value(m, "seqserve_rpc_requests_total", service=SVC, method="Complete", model="charlm", code="INTERNAL") == 1
    assert (
        value(m, "seqserve_rpc_requests_total", service=SVC, method="Classify", model="charlm", code="INTERNAL") is None
    )


def test_unknown_model_names_collapse_to_one_label(m: Metrics) -> None:
    for name in ("typo1", "typo2", "x" * 100):
        m.rpc_finished(SVC, "Complete", name, "NOT_FOUND", 0.001)
    labels = {"service": SVC, "method": "Complete", "code": "NOT_FOUND"}
    assert value(m, "seqserve_rpc_requests_total", **labels, model=OTHER_MODEL) == 3.0
    assert value(m, "seqserve_rpc_requests_total", **labels, model="typo1") is None
    # RPCs without a model (health, ListModels) keep an empty label.
    m.rpc_finished("grpc.health.v1.Health", "Check", "", "OK", 0.0001)
    assert value(m, "seqserve_rpc_requests_total", service="grpc.health.v1.Health", method="Check", model="", code="OK")


def test_inference_observes_per_request_and_batch_size(m: Metrics) -> None:
    m.inference("charlm", 1, queue_seconds=0.001, compute_seconds=0.0002, batch_size=4)
    m.inference("charlm", 1, queue_seconds=0.0, compute_seconds=0.0001, batch_size=1)
    mv = {"model": "charlm", "version": "1"}
    assert value(m, "seqserve_inference_queue_seconds_count", **mv) == 5.0
    assert value(m, "seqserve_inference_compute_seconds_count", **mv) == 5.0
    assert value(m, "seqserve_inference_seconds_count", **mv) == 5.0
    assert value(m, "seqserve_inference_seconds_sum", **mv) == pytest.approx(4 * 0.0012 + 0.0001)
    assert value(m, "seqserve_inference_queue_seconds_sum", **mv) == pytest.approx(0.004)
    assert value(m, "seqserve_inference_batch_size_count", **mv) == 2.0
    assert value(m, "seqserve_inference_batch_size_sum", **mv) == 5.0
    assert value(m, "seqserve_inference_batch_size_bucket", **mv, le="2.0") == 1.0
    assert value(m, "seqserve_inference_batch_size_bucket", **mv, le="4.0") == 2.0
    m.inference("charlm", 1, 0.0, 0.0, 0)  # an empty batch records nothing and never raises into the batcher
    assert value(m, "seqserve_inference_batch_size_count", **mv) == 2.0
    # A batch of 64 rows from two requests (one of 63 texts): two observations per request histogram, 64 rows.
    m.model_loaded("sentiment", 1, "CPUExecutionProvider", 0.1, True)
    m.inference("sentiment", 1, queue_seconds=0.0, compute_seconds=0.03, batch_size=64, requests=2)
    sv = {"model": "sentiment", "version": "1"}
    assert value(m, "seqserve_inference_compute_seconds_count", **sv) == 2.0
    assert value(m, "seqserve_inference_compute_seconds_sum", **sv) == pytest.approx(0.06)
    assert value(m, "seqserve_inference_batch_size_sum", **sv) == 64.0


def test_batched_observations_match_one_by_one_observations() -> None:
    batched = Metrics(CollectorRegistry(), runtime_collectors=False)
    single = Metrics(CollectorRegistry(), runtime_collectors=False)
    for m in (batched, single):
        m.model_loaded("a", 1, "CPUExecutionProvider", 0.0, ready=True)
    for q, c, n in [(0.0, 0.00005, 3), (0.0001, 0.0004, 7), (0.003, 20.0, 2), (1.0, 0.0, 1)]:
        batched.inference("a", 1, q, c, n)
        for _ in range(n):
            single.inference("a", 1, q, c, 1)

    def histograms(m: Metrics) -> dict[tuple[str, str], float]:
        return {
            (s.name, s.labels.get("le", "")): s.value
            for fam in m.registry.collect()
            if fam.name in {"seqserve_inference_queue_seconds", "seqserve_inference_compute_seconds"}
            for s in fam.samples
            if not s.name.endswith("_created")
        }

    assert histograms(batched) == pytest.approx(histograms(single))
    # Values on a bucket bound land in that bucket (le is inclusive: 3 x 50 µs + 1 x 0 s); 20 s lands only in +Inf.
    assert (
        batched.registry.get_sample_value(
            "seqserve_inference_compute_seconds_bucket", {"model": "a", "version": "1", "le": "5e-05"}
        )
        == 4.0
    )
    assert (
        batched.registry.get_sample_value(
            "seqserve_inference_compute_seconds_bucket", {"model": "a", "version": "1", "le": "10.0"}
        )
        == 11.0
    )


def test_queue_depth_sessions_and_store(m: Metrics) -> None:
    assert value(m, "seqserve_queue_depth", model="charlm") == 0.0  # created at load, before any request
    m.watch_queue("charlm", 0, lambda: 7)
    assert value(m, "seqserve_queue_depth", model="charlm") == 7.0
    m.sessions_active("charlm", 3)
    assert value(m, "seqserve_sessions_active", model="charlm") == 3.0
    m.session_store_usage(sessions=3, capacity=10, bytes_used=4096, bytes_capacity=1 << 20)
    assert value(m, "seqserve_session_store_sessions") == 3.0
    assert value(m, "seqserve_session_store_capacity_sessions") == 10.0
    assert value(m, "seqserve_session_store_bytes") == 4096.0
    assert value(m, "seqserve_session_store_capacity_bytes") == float(1 << 20)


def test_session_events_preinitialised_and_validated(m: Metrics) -> None:
    for event in SESSION_EVENTS:
        assert value(m, "seqserve_session_events_total", model="charlm", event=event) == 0.0
    m.session_event("charlm", "created")
    m.session_event("charlm", "created")
    m.session_event("charlm", "evicted")
    assert value(m, "seqserve_session_events_total", model="charlm", event="created") == 2.0
    assert value(m, "seqserve_session_events_total", model="charlm", event="evicted") == 1.0
    with pytest.raises(ValueError, match="session event must be one of"):
        m.session_event("charlm", "exploded")


def test_streaming_chars_and_first_chunk(m: Metrics) -> None:
    m.chars_generated("charlm", 120)
    m.chars_generated("charlm", 5)
    assert value(m, "seqserve_generated_chars_total", model="charlm") == 125.0
    m.time_to_first_chunk("charlm", 0.004)
    assert value(m, "seqserve_time_to_first_chunk_seconds_count", model="charlm") == 1.0
    assert value(m, "seqserve_time_to_first_chunk_seconds_bucket", model="charlm", le="0.005") == 1.0
    assert value(m, "seqserve_time_to_first_chunk_seconds_bucket", model="charlm", le="0.0025") == 0.0
    with pytest.raises(ValueError, match="count must be >= 0"):
        m.chars_generated("charlm", -1)


def test_model_info_ready_and_load_time(m: Metrics) -> None:
    assert value(m, "seqserve_model_info", model="charlm", version="1", provider="CPUExecutionProvider") == 1.0
    assert value(m, "seqserve_model_ready", model="charlm", version="1") == 1.0
    assert value(m, "seqserve_model_load_seconds", model="charlm", version="1") == 0.25
    # Reloaded on another provider: the old info series goes away, one per (model, version).
    m.model_loaded("charlm", 1, "CUDAExecutionProvider", 0.5, ready=False)
    assert value(m, "seqserve_model_info", model="charlm", version="1", provider="CPUExecutionProvider") is None
    assert value(m, "seqserve_model_info", model="charlm", version="1", provider="CUDAExecutionProvider") == 1.0
    assert value(m, "seqserve_model_ready", model="charlm", version="1") == 0.0


def test_a_failed_reload_shows_until_the_version_loads_again(m: Metrics) -> None:
    """seqserve_model_reload_failed drives SeqServeModelReloadFailed: 0 once loaded, 1 while the version serves its
    old weights after its new files failed to load, and 0 again once a load of it succeeds."""
    assert value(m, "seqserve_model_reload_failed", model="charlm", version="1") == 0.0
    m.model_reload_failed_now("charlm", 1, True)
    assert value(m, "seqserve_model_reload_failed", model="charlm", version="1") == 1.0
    m.model_loaded("charlm", 1, "CPUExecutionProvider", 0.3, ready=True)
    assert value(m, "seqserve_model_reload_failed", model="charlm", version="1") == 0.0


def test_build_info(m: Metrics) -> None:
    (family,) = (f for f in m.registry.collect() if f.name == "seqserve_build_info")
    (sample,) = family.samples
    assert sample.value == 1.0
    assert sample.labels["version"] not in {"", "unknown"}  # the package is installed (editable) in the venv
    assert sample.labels["onnxruntime"][0].isdigit()


def test_buckets_resolve_sub_millisecond_latencies_and_batch_sizes() -> None:
    m = Metrics(CollectorRegistry(), runtime_collectors=False)
    m.model_loaded("a", 1, "CPUExecutionProvider", 0.0, ready=True)
    m.rpc_finished(SVC, "Classify", "a", "OK", 0.00007)  # a 70 µs call (one CPU RNN step)
    m.rpc_finished(SVC, "Classify", "a", "OK", 0.0003)
    m.inference("a", 1, 0.0, 0.0, 3)

    def bucket(name: str, le: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name + "_bucket", {**labels, "le": le})

    rpc = {"service": SVC, "method": "Classify", "model": "a", "code": "OK"}
    # 70 µs and 300 µs land in different buckets below 1 ms: the histogram tells them apart.
    assert [bucket("seqserve_rpc_duration_seconds", le, **rpc) for le in ("5e-05", "0.0001", "0.00025", "0.0005")] == [
        0.0, 1.0, 1.0, 2.0,
    ]  # fmt: skip
    assert bucket("seqserve_rpc_duration_seconds", "+Inf", **rpc) == 2.0
    batch = {"model": "a", "version": "1"}
    assert [bucket("seqserve_inference_batch_size", le, **batch) for le in ("2.0", "4.0")] == [0.0, 1.0]
    bounds = [
        float(s.labels["le"])
        for fam in m.registry.collect()
        if fam.name == "seqserve_rpc_duration_seconds"
        for s in fam.samples
        if s.name.endswith("_bucket") and s.labels["code"] == "OK"
    ]
    assert bounds == [*LATENCY_BUCKETS, float("inf")] and bounds == sorted(bounds)


def test_names_follow_conventions(m: Metrics) -> None:
    families = {fam.name: fam.type for fam in m.registry.collect()}
    ours = {n: t for n, t in families.items() if n.startswith("seqserve_")}
    assert set(ours) == {
        "seqserve_build_info",
        "seqserve_rpc_requests",
        "seqserve_rpc_duration_seconds",
        "seqserve_rpc_in_flight",
        "seqserve_rpc_stream_requests",
        "seqserve_frontend_engine_calls_waiting",
        "seqserve_frontend_restarts",
        "seqserve_inference_queue_seconds",
        "seqserve_inference_compute_seconds",
        "seqserve_inference_seconds",
        "seqserve_inference_batch_size",
        "seqserve_queue_depth",
        "seqserve_model_info",
        "seqserve_model_ready",
        "seqserve_model_load_seconds",
        "seqserve_model_reload_failed",
        "seqserve_sessions_active",
        "seqserve_session_events",
        "seqserve_session_store_sessions",
        "seqserve_session_store_capacity_sessions",
        "seqserve_session_store_bytes",
        "seqserve_session_store_capacity_bytes",
        "seqserve_session_store_up",
        "seqserve_session_store_info",
        "seqserve_session_store_operations",
        "seqserve_generated_chars",
        "seqserve_time_to_first_chunk_seconds",
        "seqserve_prefix_cache_lookups",
        "seqserve_prefix_cache_reused_chars",
        "seqserve_prefix_cache_bytes",
        "seqserve_prefix_cache_entries",
        "seqserve_prefix_cache_evictions",
        "seqserve_response_cache_lookups",
        "seqserve_response_cache_bytes",
        "seqserve_response_cache_entries",
        "seqserve_response_cache_evictions",
        "seqserve_forecast_observed_targets",
        "seqserve_forecast_targets_below",
        "seqserve_http_requests",
        "seqserve_http_request_duration_seconds",
        "seqserve_http_connections_closed",
        "seqserve_process_cpu_seconds",
        "seqserve_process_resident_memory_bytes",
        "seqserve_tls_certificate_expiry_timestamp_seconds",
        "seqserve_tls_reloads",
    }
    for name, kind in ours.items():
        if kind == "histogram" and name != "seqserve_inference_batch_size":
            assert name.endswith("_seconds"), name
        # Counter family names are stored without _total; the exposition adds it.
        assert not name.endswith("_total"), name
    for fam in m.registry.collect():
        for sample in fam.samples:
            assert not {"session", "session_id", "text", "request_id"} & set(sample.labels), sample


def test_prefix_cache_series(m: Metrics) -> None:
    m.prefix_cache_model("charlm")  # the series exist at 0 from the load on (before model_loaded knows the name)
    m.model_loaded("charlm", 1, "CPUExecutionProvider", 0.1, True)
    assert value(m, "seqserve_prefix_cache_lookups_total", model="charlm", result="partial") == 0.0
    assert value(m, "seqserve_prefix_cache_reused_chars_total", model="charlm") == 0.0
    m.prefix_lookup("charlm", "partial", 40)
    m.prefix_lookup("charlm", "hit", 41)
    m.prefix_lookup("charlm", "miss", 0)
    assert [value(m, "seqserve_prefix_cache_lookups_total", model="charlm", result=r) for r in PREFIX_RESULTS] == [
        1.0,
        1.0,
        1.0,
    ]
    assert value(m, "seqserve_prefix_cache_reused_chars_total", model="charlm") == 81.0
    m.prefix_cache_usage(5000, 3, 2)
    m.prefix_cache_usage(4000, 2, 3)  # the evictions of each call's stores add up
    m.prefix_cache_usage(4000, 2, 0)
    assert value(m, "seqserve_prefix_cache_evictions_total") == 5.0
    assert value(m, "seqserve_prefix_cache_bytes") == 4000.0 and value(m, "seqserve_prefix_cache_entries") == 2.0
    with pytest.raises(ValueError, match="result"):
        m.prefix_lookup("charlm", "maybe", 0)
    assert value(m, "seqserve_prefix_cache_lookups_total", model=OTHER_MODEL, result="miss") is None


def test_response_cache_series(m: Metrics) -> None:
    m.model_loaded("sentiment", 1, "CPUExecutionProvider", 0.1, True)
    for hit in (False, True, True):
        m.response_cache_lookup("sentiment", hit)
    assert value(m, "seqserve_response_cache_lookups_total", model="sentiment", result="hit") == 2.0
    assert value(m, "seqserve_response_cache_lookups_total", model="sentiment", result="miss") == 1.0
    m.response_cache_usage(3000, 3, 1)
    m.response_cache_usage(2000, 2, 1)  # the evictions of each store add up; the fill is the last one's
    assert value(m, "seqserve_response_cache_evictions_total") == 2.0
    assert value(m, "seqserve_response_cache_bytes") == 2000.0 and value(m, "seqserve_response_cache_entries") == 2.0


def test_queue_depth_is_the_sum_over_a_models_versions(m: Metrics) -> None:
    """Each version has its own batch queue: the model's gauge adds them up, and one version's report never
    replaces the other's."""
    m.model_loaded("charlm", 2, "CPUExecutionProvider", 0.1, ready=True)
    m.watch_queue("charlm", 1, lambda: 3)
    m.watch_queue("charlm", 2, lambda: 4)
    assert value(m, "seqserve_queue_depth", model="charlm") == 7.0
    m.watch_queue("charlm", 2, lambda: 0)
    assert value(m, "seqserve_queue_depth", model="charlm") == 3.0


def test_queue_depth_is_read_from_the_queues_at_scrape_time(m: Metrics) -> None:
    """Batchers register their queue's length instead of setting the gauge on every request: a scrape reads it
    then. A batcher starts before its model is announced, so the label is resolved at scrape time; a reload's
    new batcher replaces the old one's reader, and the old one stopping later leaves the new one watched."""
    queue: list[int] = [1, 2]
    m.watch_queue("sentiment", 1, queue.__len__)
    assert value(m, "seqserve_queue_depth", model=OTHER_MODEL) == 2.0  # not announced yet
    m.model_loaded("sentiment", 1, "CPUExecutionProvider", 0.1, ready=True)
    assert value(m, "seqserve_queue_depth", model="sentiment") == 2.0
    assert value(m, "seqserve_queue_depth", model=OTHER_MODEL) == 0.0
    queue.append(3)
    assert value(m, "seqserve_queue_depth", model="sentiment") == 3.0  # no call in between: read live
    reloaded: list[int] = []
    m.watch_queue("sentiment", 1, reloaded.__len__)
    m.unwatch_queue("sentiment", 1, queue.__len__)  # the old batcher stops after its replacement started
    reloaded += [1, 1, 1, 1, 1]
    assert value(m, "seqserve_queue_depth", model="sentiment") == 5.0
    m.unwatch_queue("sentiment", 1, reloaded.__len__)
    assert value(m, "seqserve_queue_depth", model="sentiment") == 0.0


def test_an_unloaded_version_leaves_no_info_ready_or_load_time_series(m: Metrics) -> None:
    """Dashboards and alerts (min(seqserve_model_ready)) must stop seeing a version once it left the server."""
    m.model_unloaded("charlm", 1)
    for name, labels in (("seqserve_model_info", {"provider": "CPUExecutionProvider"}), ("seqserve_model_ready", {}),
                         ("seqserve_model_load_seconds", {}), ("seqserve_model_reload_failed", {})):  # fmt: skip
        assert value(m, name, model="charlm", version="1", **labels) is None, name
    m.model_unloaded("charlm", 1)  # twice (or never loaded): no error


def test_session_store_up_follows_the_last_health_check(m: Metrics) -> None:
    """seqserve_session_store_up drives the SeqServeSessionStoreDown alert (== 0): it must drop to 0."""
    m.session_store_up(False)
    assert value(m, "seqserve_session_store_up") == 0.0
    m.session_store_up(True)
    assert value(m, "seqserve_session_store_up") == 1.0
