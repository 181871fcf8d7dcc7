"""Prometheus metrics. Every metric is defined here, on an injected registry (no global state).

The methods below are what the core and the API layer call. The table of every metric is in ``docs/metrics.md``.

Naming: prefix ``seqserve_``, base units (seconds, bytes), counters end in ``_total``. Labels are low-cardinality
only: service/method/code come from the server's own method table, model names are the loaded models (any other
name a client sends is reported as ``model="_other"``), never a session id or any text.
"""

from __future__ import annotations

import bisect
import contextlib
import importlib.metadata
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from service.core.types import ModelStats
from service.tracing import sampled_trace_id
from service.triton_metrics import TritonMetrics

# What the Redis store counts (``Leases.counts``), exported as seqserve_session_store_operations_total{op}: acquire:
# lease tries; read: states read; write: states written; handoff: hand-over requests sent; flush: idle-mode
# write-backs; conflict: saves refused (another replica took the session over); lost: idle-mode sessions whose
# unwritten steps were dropped (taken over).
STORE_OPERATIONS = ("acquire", "read", "write", "handoff", "flush", "conflict", "lost")

# Latency buckets: 50 µs .. 10 s, roughly 1-2.5-5 per decade, so a CPU RNN step (~100 µs) is resolved as well as
# a long streamed completion. 18 buckets (+Inf) per label set keeps the series count modest.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Batch sizes are integers: powers of two up to the largest sensible max_batch_size.
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

SESSION_EVENTS: frozenset[str] = frozenset({"created", "expired", "evicted", "deleted", "forked", "imported"})
PREFIX_RESULTS: tuple[str, ...] = ("hit", "partial", "miss")
# Server-side status codes (deploy/prometheus/alerts.yml, SeqServeHighErrorRatio): each (service, method, model) that
# finishes a call has these series at 0 from then on, so the first burst of a code is not lost to rate().
SERVER_ERROR_CODES: tuple[str, ...] = (
    "INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "DATA_LOSS"
)  # fmt: skip
HTTP_CLOSE_REASONS: tuple[str, ...] = ("busy", "timeout")  # why an HTTP port closed a connection on its own
OTHER_MODEL = "_other"  # label value for model names that are not loaded (typos, probes): bounds cardinality
NO_MODEL = ""  # RPCs that name no model (health, ListModels): the label is empty, i.e. absent in PromQL


def _version(package: str) -> str:
    """Installed version of ``package`` without importing it ("unknown" when not installed)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _observe_many(child: Histogram, value: float, n: int) -> None:
    """``n`` observations of the same value. prometheus_client has no weighted observe and a loop costs ~2 µs per
    observation (0.6 ms for a 256-row batch), so bump the matching bucket by ``n`` directly; the private fields
    are checked and the public loop is the fallback if a future prometheus_client changes them."""
    buckets, bounds, total = (getattr(child, a, None) for a in ("_buckets", "_upper_bounds", "_sum"))
    if buckets is None or bounds is None or total is None or len(buckets) != len(bounds):
        for _ in range(n):
            child.observe(value)
        return
    total.inc(value * n)
    buckets[bisect.bisect_left(bounds, value)].inc(n)  # first bound >= value, as Histogram.observe does


class ServerProcesses(Collector):
    """CPU seconds and resident memory of every process of the server, labelled ``process``: ``server`` for one
    process; ``engine`` and ``frontend-1`` .. ``frontend-N`` with ``--workers N``, and ``engine-2`` .. ``engine-K``
    with ``--engines K`` (the first engine's ``/metrics`` is the only endpoint, so its ``process_*`` series
    describe it alone; sum these for the whole server).
    Read from ``/proc`` by prometheus_client's process collector, one process at a time."""

    def __init__(self) -> None:
        self.processes: Callable[[], list[tuple[str, int]]] = lambda: [("server", os.getpid())]
        self._readers: dict[int, ProcessCollector] = {}  # pid -> its reader (it reads the boot time once)

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily(
            "seqserve_process_cpu_seconds", "User and system CPU seconds of each server process.", labels=["process"]
        )
        rss = GaugeMetricFamily(
            "seqserve_process_resident_memory_bytes", "Resident memory of each server process.", labels=["process"]
        )
        for name, pid in self.processes():
            reader = self._readers.get(pid)
            if reader is None:
                reader = self._readers[pid] = ProcessCollector(pid=lambda pid=pid: pid, registry=None)  # type: ignore[misc]
            for family in reader.collect():
                if family.name == "process_cpu_seconds":
                    cpu.add_metric([name], family.samples[0].value)
                elif family.name == "process_resident_memory_bytes":
                    rss.add_metric([name], family.samples[0].value)
        yield cpu
        yield rss


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, runtime_collectors: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if runtime_collectors:
            # process_* (cpu, rss, fds, start time), python_info, python_gc_* on *our* registry, not the global one.
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.processes = ServerProcesses()  # seqserve_process_*{process}: every process of the server
        if runtime_collectors:
            r.register(self.processes)
        self._lock = threading.Lock()
        self.build_info = Gauge(
            "seqserve_build_info",
            "Always 1; labels carry the seqserve and ONNX Runtime versions of this process.",
            ("version", "onnxruntime"),
            registry=r,
        )
        self.build_info.labels(_version("seqserve"), _version("onnxruntime")).set(1)
        self._models: set[str] = set()  # names seen by model_loaded: the only model label values besides _other
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # labels() results of hot-path metrics
        self._model_info: dict[tuple[str, str], str] = {}  # (model, version) -> provider currently exported
        # (model, version) -> its batch queue's length, read at scrape time (``watch_queue``): nothing per request
        self._queues: dict[tuple[str, int], Callable[[], int]] = {}
        self.triton: TritonMetrics | None = None  # Triton's names (export_triton)

        # --- API layer --------------------------------------------------------------------------------
        rpc = ("service", "method", "model", "code")
        self.rpc_requests = Counter(
            "seqserve_rpc_requests", "Finished RPCs by gRPC service, method, model and status code.", rpc, registry=r
        )
        self.rpc_duration = Histogram(
            "seqserve_rpc_duration_seconds",
            "RPC latency from receipt to the last response message (whole stream for streaming RPCs).",
            rpc,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rpc_in_flight = Gauge(
            "seqserve_rpc_in_flight", "RPCs started and not yet finished.", ("service", "method"), registry=r
        )
        self.engine_calls_waiting = Gauge(
            "seqserve_frontend_engine_calls_waiting",
            "Calls the frontends sent to the engine and wait for (--workers N; each frontend refuses new ones past "
            "max_queue_size). A backlog here with short model queues (seqserve_queue_depth) is the engine's loop.",
            registry=r,
        )
        self.frontend_restarts = Counter(
            "seqserve_frontend_restarts",
            "Frontend processes (--workers N) that died (OOM killer, a crash) and were replaced; their calls in "
            "flight failed, sessions lived on. 0 in one process.",
            registry=r,
        )
        self.tls_expiry = Gauge(
            "seqserve_tls_certificate_expiry_timestamp_seconds",
            "When the TLS certificate this server presents expires (Unix time), by its subject; absent without TLS. "
            "Changed files are reloaded without a restart: alert well before this (SeqServeCertificateExpiresSoon).",
            ("subject",),
            registry=r,
        )
        self.tls_reloads = Counter(
            "seqserve_tls_reloads",
            "Times changed TLS files were loaded without a restart (by the process serving the metrics port; every "
            "frontend reloads them too). Files that changed but did not load are logged and not counted.",
            registry=r,
        )
        self.rpc_stream_requests = Counter(
            "seqserve_rpc_stream_requests",
            "Requests answered one by one inside a stream (KServe ModelStreamInfer) by the status each got; a refusal "
            "goes back inline (error_message) and the stream itself counts once in seqserve_rpc_requests_total.",
            rpc,
            registry=r,
        )

        # --- core: inference --------------------------------------------------------------------------
        mv = ("model", "version")
        self.inference_queue = Histogram(
            "seqserve_inference_queue_seconds",
            "Per request: time waiting in the model's batch queue before its batch ran.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_compute = Histogram(
            "seqserve_inference_compute_seconds",
            "Per request: ONNX Runtime time of the batch the request ran in.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_total = Histogram(
            "seqserve_inference_seconds",
            "Per request: queue wait plus compute.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "seqserve_inference_batch_size",
            "Requests (or sessions' steps) merged into one ONNX Runtime run, one observation per batch.",
            mv,
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.queue = Gauge(
            "seqserve_queue_depth", "Requests waiting in the model's batch queue now.", ("model",), registry=r
        )

        # --- core: models -----------------------------------------------------------------------------
        self.model_info = Gauge(
            "seqserve_model_info",
            "Always 1 for each loaded model version; labels carry its execution provider.",
            ("model", "version", "provider"),
            registry=r,
        )
        self.model_ready = Gauge(
            "seqserve_model_ready", "1 when the model version is loaded and serving, else 0.", mv, registry=r
        )
        self.model_load = Gauge(
            "seqserve_model_load_seconds", "Seconds it took to load the model version.", mv, registry=r
        )
        self.model_reload_failed = Gauge(
            "seqserve_model_reload_failed",
            "1 while the model version serves the weights it loaded before because the files that replaced them on "
            "disk failed to load (the log and a RepositoryModelLoad's answer say why), else 0.",
            mv,
            registry=r,
        )

        # --- core: sessions ---------------------------------------------------------------------------
        self.sessions = Gauge("seqserve_sessions_active", "Live streaming sessions per model.", ("model",), registry=r)
        self.session_events = Counter(
            "seqserve_session_events",
            "Session lifecycle events: created, expired (TTL), evicted (store full), deleted, forked, imported.",
            ("model", "event"),
            registry=r,
        )
        self.store_sessions = Gauge("seqserve_session_store_sessions", "Sessions held in the store.", registry=r)
        self.store_capacity = Gauge(
            "seqserve_session_store_capacity_sessions", "Most sessions the store holds (max_sessions).", registry=r
        )
        self.store_bytes = Gauge(
            "seqserve_session_store_bytes", "Bytes of recurrent state and context held in the store.", registry=r
        )
        self.store_capacity_bytes = Gauge(
            "seqserve_session_store_capacity_bytes", "Most bytes the store holds (max_session_bytes).", registry=r
        )

        self.store_up = Gauge(
            "seqserve_session_store_up", "1 when the session store answers (Redis reachable), else 0.", registry=r
        )
        self.store_operations = Counter(
            "seqserve_session_store_operations",
            "What a shared session store (Redis) did for this server: acquire (lease tries), read (states read), "
            "write (states written), handoff (hand-over requests sent to another replica), flush (idle-mode "
            "write-backs), conflict (saves refused: another replica took the session over), lost (idle-mode "
            "sessions whose unwritten steps were dropped: taken over).",
            ("op",),
            registry=r,
        )
        self._store_ops_seen: dict[str, int] = {}
        for op in STORE_OPERATIONS:  # (at 0 from the start, also on a store that has none: memory://)
            self.store_operations.labels(op)
        self.store_info = Gauge(
            "seqserve_session_store_info",
            "The session store this server uses (=1): store is the Redis URL (password hidden), the same in every "
            "replica sharing it, or memory://HOST/PID, this process's own. Sum the store-wide session gauges over "
            "distinct stores: sum(max by (store) (gauge * on(job, instance) group_left(store) this)).",
            ("store",),
            registry=r,
        )

        # --- core: streaming --------------------------------------------------------------------------
        self.chars = Counter(
            "seqserve_generated_chars", "Characters generated by completions and suggestions.", ("model",), registry=r
        )
        self.first_chunk = Histogram(
            "seqserve_time_to_first_chunk_seconds",
            "Streamed completions: time from request start to the first chunk sent.",
            ("model",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        # --- core: the prefix cache of calls without a session ------------------------------------------
        self.prefix_lookups = Counter(
            "seqserve_prefix_cache_lookups",
            "Char-LM calls without a session (or from a session that starts from nothing) that asked the prefix "
            "cache, by what it had: hit (the whole text's state), partial (a beginning of it), miss.",
            ("model", "result"),
            registry=r,
        )
        self.prefix_reused = Counter(
            "seqserve_prefix_cache_reused_chars",
            "Prompt characters that calls without a session did not feed again: their state came from the cache.",
            ("model",),
            registry=r,
        )
        self.prefix_bytes = Gauge(
            "seqserve_prefix_cache_bytes", "Bytes the prefix cache holds (at most prefix_cache_bytes).", registry=r
        )
        self.prefix_entries = Gauge("seqserve_prefix_cache_entries", "Prefix states the cache holds.", registry=r)
        self.prefix_evictions = Counter(
            "seqserve_prefix_cache_evictions",
            "Prefix states dropped, least recently used first, to keep within prefix_cache_bytes.",
            registry=r,
        )

        # --- core: the response cache of stateless KServe requests -----------------------------------------
        self.response_lookups = Counter(
            "seqserve_response_cache_lookups",
            "Stateless requests (KServe infer, Classify, Predict) to a deterministic model that asked the response "
            "cache (RESPONSE_CACHE_BYTES), by result: hit (answered from it, no model run) or miss.",
            ("model", "result"),
            registry=r,
        )
        self.response_bytes = Gauge(
            "seqserve_response_cache_bytes",
            "Bytes the response cache holds (at most response_cache_bytes).",
            registry=r,
        )
        self.response_entries = Gauge(
            "seqserve_response_cache_entries", "Answers the response cache holds.", registry=r
        )
        self.response_evictions = Counter(
            "seqserve_response_cache_evictions",
            "Answers dropped, least recently used first, to keep within response_cache_bytes.",
            registry=r,
        )

        # --- HTTP ports: the REST gateway's answers, connections the ports closed on their own ----------------
        self.http_requests = Counter(
            "seqserve_http_requests",
            "Answers of the REST port (KServe v2 REST, generate, OpenAI's API) by method, route (the path, names as "
            "{model}) and HTTP status, the gateway's own refusals included (a stream: the status it began with).",
            ("method", "route", "code"),
            registry=r,
        )
        self.http_duration = Histogram(
            "seqserve_http_request_duration_seconds",
            "REST port: from a request's first line to the end of its answer (a stream: its last event).",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http_closed = Counter(
            "seqserve_http_connections_closed",
            "Connections an HTTP port (rest, metrics) closed on its own: busy = every slot was taken "
            "(HTTP_MAX_CONNECTIONS, METRICS_MAX_CONNECTIONS), closed at once; timeout = a request not done three "
            "idle timeouts after it began (a client dripping bytes, an answer streamed that long). Idle ones are not "
            "counted.",
            ("port", "reason"),
            registry=r,
        )

        # --- core: forecast intervals, scored as the truth arrives ---------------------------------------
        self.forecast_targets = Counter(
            "seqserve_forecast_observed_targets",
            "Target values a forecast session observed after it had forecast them: each is scored against the "
            "quantiles the session's previous forecast gave for it.",
            ("model", "version"),
            registry=r,
        )
        self.forecast_below = Counter(
            "seqserve_forecast_targets_below",
            "Of the observed targets, those at or below the previous forecast's quantile at this level (its share "
            "should be the level).",
            ("model", "version", "level"),
            registry=r,
        )

    def tls_loaded(self, files: Any) -> None:
        """TLS files were loaded (``service.api.tls.TlsFiles``): at start (generation 0) or on a change."""
        if files.generation:
            self.tls_reloads.inc()
        self.tls_expiry.clear()  # (one series: the certificate in use)
        if files.expires_at is not None:
            self.tls_expiry.labels(files.subject).set(files.expires_at)

    def know_models(self, names: Iterable[str]) -> None:
        """Allows ``names`` as model label values without creating any series (a frontend process labels the
        RPCs of models that its engine loaded)."""
        with self._lock:
            self._models.update(names)

    def _model(self, model: str) -> str:
        """The label value for a model name: itself when loaded, "" when none, else OTHER_MODEL."""
        if model == NO_MODEL or model in self._models:
            return model
        return OTHER_MODEL

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """``metric.labels(*labels)``, remembered: prometheus_client's lookup costs ~5 µs, and the hot path asks
        for the same few series on every request or batch. Only for series that are never removed."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _coded(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """``_child`` of a counter labelled (..., code): the first time its other labels are seen, the series of the
        server-side codes (``SERVER_ERROR_CODES``) are made at 0 beside it (a series born at its first error loses
        that error to ``rate()``, and so to the error-ratio alerts)."""
        child = self._children.get((id(metric), labels))
        if child is None:
            child = self._child(metric, labels)
            for other in SERVER_ERROR_CODES:
                self._child(metric, (*labels[:-1], other))
        return child

    # --- API layer (the edge) ----------------------------------------------------------------------
    def rpc_started(self, service: str, method: str) -> None:
        """In-flight gauge +1."""
        self._child(self.rpc_in_flight, (service, method)).inc()

    def rpc_finished(
        self, service: str, method: str, model: str, code: str, seconds: float, traceparent: str = ""
    ) -> None:
        """In-flight gauge -1; request counter and latency histogram (labels: service, method, model, code). A call
        whose caller sampled its trace (``traceparent``, parsed) leaves its trace id as the bucket's exemplar
        (OpenMetrics: Grafana links the latency panel to the trace)."""
        self._child(self.rpc_in_flight, (service, method)).dec()
        labels = (service, method, self._model(model), code)
        self._coded(self.rpc_requests, labels).inc()
        child = self._child(self.rpc_duration, labels)
        trace_id = sampled_trace_id(traceparent)
        if trace_id:
            child.observe(max(seconds, 0.0), {"trace_id": trace_id})
        else:
            _observe_many(child, max(seconds, 0.0), 1)  # observe(), by bisection

    def http_answered(self, method: str, route: str, status: int, seconds: float) -> None:
        """One answer of the REST port (``route``: a path template, so the label stays small)."""
        self._child(self.http_requests, (method, route, str(status))).inc()
        self._child(self.http_duration, (route,)).observe(max(seconds, 0.0))

    def http_port_serving(self, port: str) -> None:
        """An HTTP port (``rest``, ``metrics``) listens: its closed-connection series exist at 0 from now, so
        ``rate()`` and ``increase()`` (the alert SeqServeHttpConnectionsRefused) see the first burst of closes."""
        for reason in HTTP_CLOSE_REASONS:
            self._child(self.http_closed, (port, reason))

    def http_connection_closed(self, port: str, reason: str) -> None:
        self._child(self.http_closed, (port, reason)).inc()

    def stream_request(self, service: str, method: str, model: str, code: str) -> None:
        """One request answered inside a stream, OK or refused inline (labels: service, method, model, code)."""
        self._coded(self.rpc_stream_requests, (service, method, self._model(model), code)).inc()

    # --- core: inference -----------------------------------------------------------------------------
    def inference(
        self,
        model: str,
        version: int,
        queue_seconds: float,
        compute_seconds: float,
        batch_size: int,
        requests: int | None = None,
    ) -> None:
        """One executed batch of ``batch_size`` rows from ``requests`` requests (default: a row each): queue wait,
        compute and total time per request; batch size (rows) histogram.

        The batcher calls this once per batch; the per-request histograms get ``requests`` observations (every
        request of the batch saw the same compute time; ``queue_seconds`` is the batch's mean wait). A request of
        64 texts is one observation, not 64: counted per row, its compute time went in 64 times. A request sent as
        several items (a Classify request's length groups) is one too: its longest texts' batch observes it.
        """
        if batch_size < 1:  # nothing ran; never let a metrics call fail the batch
            return
        n = batch_size if requests is None else requests  # (0: a batch of the later parts of split requests)
        labels = (self._model(model), str(version))
        q, c = max(queue_seconds, 0.0), max(compute_seconds, 0.0)
        if n > 0:
            _observe_many(self._child(self.inference_queue, labels), q, n)
            _observe_many(self._child(self.inference_compute, labels), c, n)
            _observe_many(self._child(self.inference_total, labels), q + c, n)
        self._child(self.batch_size, labels).observe(batch_size)

    def watch_queue(self, model: str, version: int, length: Callable[[], int]) -> None:
        """The queue depth gauge reads ``length()`` of every watched queue at scrape time, summed over the model's
        versions (each version has its own batcher): requests cost it nothing (it was a gauge set under a lock on
        every submit and batch, ~5% of a char-LM step's CPU in the core). The model's label is resolved at scrape
        time too: a batcher starts before its model is announced (``model_loaded``). A new ``length`` for the same
        version replaces the old one (a reload)."""
        with self._lock:
            self._queues[(model, version)] = length
        self._watch_label(self._model(model))

    def queue_length(self, model: str, version: int) -> int:
        """Requests waiting in the batch queue of ``model`` ``version`` now (0 when none is watched)."""
        with self._lock:
            length = self._queues.get((model, version))
        return length() if length is not None else 0

    def export_triton(self, stats: Callable[[], list[ModelStats]], cache: bool) -> None:
        """Triton's metric names too (``SEQSERVE_TRITON_METRICS``; ``service.triton_metrics``), read at scrape time
        from ``stats()``, every loaded version's statistics."""
        self.triton = TritonMetrics(stats, self.queue_length, self._model, cache)
        self.registry.register(self.triton)

    def unwatch_queue(self, model: str, version: int, length: Callable[[], int]) -> None:
        """Stops reading ``length`` (its batcher stopped); a replacement registered since is kept (bound methods of
        one object compare equal)."""
        with self._lock:
            if self._queues.get((model, version)) == length:
                del self._queues[(model, version)]

    def _watch_label(self, label: str) -> None:
        self._child(self.queue, (label,)).set_function(lambda: self._depth(label))

    def _depth(self, label: str) -> float:
        with self._lock:
            lengths = [length for (model, _), length in self._queues.items() if self._model(model) == label]
        return float(sum(length() for length in lengths))

    # --- core: models ---------------------------------------------------------------------------------
    def model_loaded(self, model: str, version: int, provider: str, load_seconds: float, ready: bool) -> None:
        """Model info gauge (name, version, execution provider) and load time.

        Also registers ``model`` as a known label value and creates its zero-valued series (session events,
        queue depth, active sessions) so that ``rate()`` and alerts see them before the first event.
        """
        v = str(version)
        with self._lock:
            self._models.add(model)
            old = self._model_info.get((model, v))
            if old is not None and old != provider:
                self.model_info.remove(model, v, old)  # reloaded on another provider: one info series per version
            self._model_info[(model, v)] = provider
        self.model_info.labels(model, v, provider).set(1)
        self.model_ready.labels(model, v).set(1 if ready else 0)
        self.model_load.labels(model, v).set(max(load_seconds, 0.0))
        self.model_reload_failed.labels(model, v).set(0)  # what it serves now is what its files hold
        for event in sorted(SESSION_EVENTS):
            self.session_events.labels(model, event)
        self._watch_label(model)  # (its batcher's queue was counted under OTHER_MODEL until now)
        self.sessions.labels(model)
        self.chars.labels(model)

    def model_reload_failed_now(self, model: str, version: int, failed: bool) -> None:
        """Whether a serving version's files on disk failed to load since it loaded (it serves its old weights)."""
        self.model_reload_failed.labels(model, str(version)).set(1 if failed else 0)

    def model_unloaded(self, model: str, version: int) -> None:
        """A version left the server: its info, ready, load-time and reload series go away (dashboards stop showing
        it)."""
        v = str(version)
        with self._lock:
            provider = self._model_info.pop((model, v), None)
        for gauge, labels in ((self.model_info, (model, v, provider)), (self.model_ready, (model, v)),
                              (self.model_load, (model, v)), (self.model_reload_failed, (model, v))):  # fmt: skip
            if None not in labels:
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)

    # --- core: sessions -------------------------------------------------------------------------------
    def sessions_active(self, model: str, count: int) -> None:
        """Live sessions of a model now."""
        self.sessions.labels(self._model(model)).set(count)

    def session_event(self, model: str, event: str) -> None:
        """event in {"created", "expired", "evicted", "deleted", "forked"}: counter +1."""
        if event not in SESSION_EVENTS:
            raise ValueError(f"session event must be one of {sorted(SESSION_EVENTS)}, got {event!r}")
        self.session_events.labels(self._model(model), event).inc()

    def session_store_usage(self, sessions: int, capacity: int, bytes_used: int, bytes_capacity: int) -> None:
        """Store fill level, for the 'near capacity' alert."""
        self.store_sessions.set(sessions)
        self.store_capacity.set(capacity)
        self.store_bytes.set(bytes_used)
        self.store_capacity_bytes.set(bytes_capacity)

    def session_store_info(self, store: str) -> None:
        """Names the session store (``store_label``), so dashboards count a shared store once."""
        self.store_info.clear()
        self.store_info.labels(store).set(1)

    def session_store_operations(self, counts: Mapping[str, int]) -> None:
        """The store's running counts (``Leases.counts``), added as they grew since the last call."""
        for op, n in counts.items():
            self.store_operations.labels(op).inc(max(0, n - self._store_ops_seen.get(op, 0)))
            self._store_ops_seen[op] = n

    def session_store_up(self, up: bool) -> None:
        """Whether the session store answered its last health check."""
        self.store_up.set(1 if up else 0)

    # --- core: streaming ------------------------------------------------------------------------------
    def chars_generated(self, model: str, count: int) -> None:
        """Characters produced by Complete/Suggest/KServe completions."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self._child(self.chars, (self._model(model),)).inc(count)

    # --- core: prefix cache --------------------------------------------------------------------------------
    def prefix_lookup(self, model: str, result: str, reused_chars: int) -> None:
        """One prefix cache lookup: result in {"hit", "partial", "miss"}; ``reused_chars`` not fed again."""
        if result not in PREFIX_RESULTS or reused_chars < 0:
            raise ValueError(f"prefix_lookup: result must be one of {PREFIX_RESULTS} and reused_chars >= 0")
        name = self._model(model)
        self._child(self.prefix_lookups, (name, result)).inc()
        if reused_chars:
            self._child(self.prefix_reused, (name,)).inc(reused_chars)

    def prefix_cache_model(self, model: str) -> None:
        """A model the prefix cache serves loaded: its lookup series exist at 0, so ``rate()`` sees the first. (Called
        while the model loads, before ``model_loaded`` knows its name: labelled with the name as given.)"""
        for result in PREFIX_RESULTS:
            self._child(self.prefix_lookups, (model, result))
        self._child(self.prefix_reused, (model,))

    def prefix_cache_usage(self, nbytes: int, entries: int, evicted: int) -> None:
        """The cache's fill after a call stored states, and how many entries those stores evicted."""
        self.prefix_bytes.set(nbytes)
        self.prefix_entries.set(entries)
        if evicted:
            self.prefix_evictions.inc(evicted)

    # --- core: response cache ------------------------------------------------------------------------------
    def response_cache_lookup(self, model: str, hit: bool) -> None:
        self._child(self.response_lookups, (self._model(model), "hit" if hit else "miss")).inc()

    def response_cache_model(self, model: str) -> None:
        """A model the response cache serves loaded: its lookup series exist at 0, so ``rate()`` sees the first."""
        for result in ("hit", "miss"):
            self._child(self.response_lookups, (self._model(model), result))

    def response_cache_usage(self, nbytes: int, entries: int, evicted: int) -> None:
        """The cache's fill after it kept (or dropped) answers, and how many answers that evicted."""
        self.response_bytes.set(nbytes)
        self.response_entries.set(entries)
        if evicted:
            self.response_evictions.inc(evicted)

    # --- core: forecast intervals ------------------------------------------------------------------------
    def forecast_levels(self, model: str, version: int, levels: Iterable[float]) -> None:
        """A forecaster with intervals loaded: its scoring series exist at 0, so ``increase()`` sees them."""
        v = str(version)
        self.forecast_targets.labels(model, v)
        for level in levels:
            self.forecast_below.labels(model, v, f"{level:g}")

    def forecast_scored(self, model: str, version: int, targets: int, below: dict[float, int]) -> None:
        """``targets`` observed values scored against their forecast's quantiles; ``below``: level -> how many
        were at or below that quantile."""
        if targets < 0 or any(not 0 <= n <= targets for n in below.values()):
            raise ValueError(f"forecast_scored: counts must lie in 0..targets={targets}, got {below}")
        v = str(version)
        self._child(self.forecast_targets, (self._model(model), v)).inc(targets)
        for level, n in below.items():
            self._child(self.forecast_below, (self._model(model), v, f"{level:g}")).inc(n)

    def time_to_first_chunk(self, model: str, seconds: float) -> None:
        """Complete: from request start to the first streamed chunk."""
        self.first_chunk.labels(self._model(model)).observe(max(seconds, 0.0))
