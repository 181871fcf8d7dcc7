"""One ``/metrics`` for a multi-process server: the engine's own metrics plus the frontends' RPC metrics.

The engine never serves an RPC, so its RPC families stay empty; frontends serve nothing else. At each scrape
the engine reads every frontend's private ``/metrics`` (127.0.0.1, a free port each) and sums the RPC
families sample by sample (counters, histograms and the in-flight gauge all add up across processes), exposed in
a single process's order (each label set's samples together, buckets by increasing ``le``), so the OpenMetrics
format stays valid. ``_created`` timestamps do not add up and are left out. Frontends answer their samples as JSON
(``service.api.http.samples_document``: the engine parsed their OpenMetrics text in Python, five times the CPU
per scrape in ``python -m bench.scrape``, docs/architecture.md; any other endpoint is read as OpenMetrics), with
each latency bucket's exemplar (the trace id of a sampled call): the newest of the frontends' wins. A frontend
that does not answer in time is logged and counted with the values it reported last: leaving it out would shrink
the sums, which Prometheus reads as a counter reset (every rate and increase over that scrape would count the whole
history again).

With several engines (``--engines K``) the first engine sums the others' families of models, batches and
sessions the same way (``serve_engine_metrics``): one ``SummedFamilies`` per kind of process.
"""

from __future__ import annotations

import itertools
import json
import logging
import urllib.request
from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from service.api.http import SAMPLES_TYPE, sample_rows
from service.metrics import Metrics

log = logging.getLogger(__name__)
Key = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


def _rpc_families(m: Metrics) -> tuple[Collector, ...]:
    """The families the frontends keep (the RPCs, the REST port they serve) and the engine sums."""
    return (m.rpc_requests, m.rpc_duration, m.rpc_in_flight, m.rpc_stream_requests, m.engine_calls_waiting,
            m.http_requests, m.http_duration, m.http_closed)  # fmt: skip


def _engine_families(m: Metrics, store_per_engine: bool) -> tuple[Collector, ...]:
    """With several engines: the families each engine keeps for its own models, batches and sessions, which the
    first engine sums over all of them (``seqserve_model_ready``: the least, ``serve_engine_metrics``).
    ``store_per_engine``: each engine has a store of its own (memory://), so the store's gauges add up too; a shared
    store's are the same in every engine and are the first engine's."""
    families = (m.model_ready, m.model_reload_failed, m.inference_queue, m.inference_compute, m.inference_total,
                m.batch_size, m.queue, m.session_events, m.chars, m.first_chunk, m.prefix_lookups,
                m.prefix_reused, m.prefix_bytes, m.prefix_entries, m.prefix_evictions, m.response_lookups,
                m.response_bytes, m.response_entries, m.response_evictions, m.forecast_targets,
                m.forecast_below)  # fmt: skip
    # (live sessions per model too: every engine on a shared store counts all of its sessions, so a sum was K x)
    store = (m.sessions, m.store_sessions, m.store_capacity, m.store_bytes, m.store_capacity_bytes)
    return families + store if store_per_engine else families


# Our private ports answer the samples as JSON; any other Prometheus endpoint, OpenMetrics (its exemplars too).
_ACCEPT = {"Accept": f"{SAMPLES_TYPE}, {OPENMETRICS}"}


class SummedFamilies(Collector):
    def __init__(
        self,
        ports: Callable[[], list[int]],
        families: tuple[Collector, ...],
        timeout: float = 2.0,
        token: str | None = None,
        local: tuple[Collector, ...] = (),
        least: frozenset[str] = frozenset(),
    ) -> None:
        """Sums the families ``families`` collect (their names and kinds: this process's own) over the processes on
        ``ports``: the frontends' RPC families; with several engines, in a second one, the engines' own.
        ``local``: this process's own metrics of summed families (its metrics port's closed connections, or the
        first engine's families), added in. ``least``: gauges of those that are the least over the processes
        instead, 0 where one lacks the series (a model version is ready where every engine has it ready)."""
        self.ports = ports
        self.local = local
        self.least = least
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout
        self._kinds = {f.name: (f.documentation, f.type) for m in families for f in m.collect()}
        self._names = set(self._kinds)
        self._last: dict[int, list[tuple[str, Key, float]]] = {}  # port -> its last good samples
        self._exemplars: dict[Key, Exemplar] = {}  # a bucket's newest exemplar, from whichever frontend
        self._retired: dict[str, dict[Key, float]] = {n: {} for n in self._names}  # frontends gone: their counts
        self._unread: set[int] = set()  # ports whose last read failed (warned once)

    def retire(self, port: int) -> None:
        """The frontend on ``port`` is gone and another takes its place: its counters and histograms keep their
        last reading in the sums (which must never go down), its gauges (calls in flight, waiting) leave."""
        for name, key, value in self._last.pop(port, []):
            if self._kinds[name][1] in ("counter", "histogram"):
                table = self._retired[name]
                table[key] = table.get(key, 0.0) + value

    def _read(self, port: int) -> list[tuple[str, Key, float]]:
        """The summed families' samples of one process (a frontend, or another engine); its last good reading
        when it does not answer."""
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={**self._headers, **_ACCEPT})
            with urllib.request.urlopen(request, timeout=self.timeout) as r:
                body, kind = r.read(), r.headers.get_content_type()
            if kind == SAMPLES_TYPE:
                families = json.loads(body)
            else:
                families = sample_rows(text_string_to_metric_families(body.decode()))  # type: ignore[no-untyped-call]
        except (OSError, ValueError) as exc:
            if port not in self._unread:  # once until it answers again (a drain stopped frontends: once a scrape)
                self._unread.add(port)
                log.warning(
                    "metrics on port %d (a frontend or engine) not read (its last reading is used until it answers): "
                    "%s",
                    port,
                    exc,
                )
            return self._last.get(port, [])
        self._unread.discard(port)
        samples = []
        for family, values in families:  # (service.api.http.samples_document)
            if family not in self._names:
                continue
            for name, labels, value, exemplar in values:
                key = (name, tuple(sorted(labels.items())))
                samples.append((family, key, float(value)))
                if exemplar is not None:
                    kept = self._exemplars.get(key)
                    if kept is None or float(exemplar[2] or 0) >= float(kept.timestamp or 0):
                        self._exemplars[key] = Exemplar(*exemplar)
        self._last[port] = samples
        return samples

    def collect(self) -> Iterator[Metric]:
        sums: dict[str, dict[Key, float]] = {n: dict(self._retired[n]) for n in self._names}
        samples = [
            (family.name, (s.name, tuple(sorted(s.labels.items()))), s.value)
            for metric in self.local
            for family in metric.collect()
            for s in family.samples
            if family.name in self._names and not s.name.endswith("_created")
        ]
        sources = [samples] if self.local else []
        sources += [self._read(port) for port in self.ports()]
        held: dict[tuple[str, Key], int] = {}  # a ``least`` series: how many processes have it
        for name, key, value in itertools.chain.from_iterable(sources):
            table = sums[name]
            if name in self.least:
                table[key] = min(table.get(key, value), value)
                held[name, key] = held.get((name, key), 0) + 1
            else:
                table[key] = table.get(key, 0.0) + value
        for (name, key), n in held.items():
            if n < len(sources):
                sums[name][key] = 0.0
        for name in sorted(self._names):
            doc, kind = self._kinds[name]
            metric = Metric(name, doc, kind)
            for key, value in sorted(sums[name].items(), key=_exposition_order):
                metric.add_sample(key[0], dict(key[1]), value, exemplar=self._exemplars.get(key))
            yield metric


_SUFFIX_RANK = {"_bucket": 0, "_count": 1, "_sum": 2}


def _exposition_order(item: tuple[Key, float]) -> tuple[object, ...]:
    """Each label set's samples together (OpenMetrics requires it), a histogram's buckets by increasing ``le``
    (``+Inf`` last), then its ``_count`` and ``_sum``: the order a single process exposes."""
    (sample, labels), _ = item
    series = tuple(kv for kv in labels if kv[0] != "le")
    le = dict(labels).get("le")
    rank = next((r for suffix, r in _SUFFIX_RANK.items() if sample.endswith(suffix)), 0)
    return series, rank, float(le) if le is not None else 0.0, sample


def _replace_by_sums(
    metrics: Metrics,
    own: tuple[Collector, ...],
    families: tuple[Collector, ...],
    local: tuple[Collector, ...],
    ports: Callable[[], list[int]],
    token: str | None,
    least: frozenset[str] = frozenset(),
) -> SummedFamilies:
    """``own`` (on ``metrics``' registry) replaced by the sums of ``families`` over the processes on ``ports``
    plus ``local`` (``least``: those gauges' least instead)."""
    for family in own:
        metrics.registry.unregister(family)
    collector = SummedFamilies(ports, families, token=token, local=local, least=least)
    metrics.registry.register(collector)
    return collector


def serve_frontend_rpc_metrics(
    metrics: Metrics, ports: Callable[[], list[int]], token: str | None = None
) -> SummedFamilies:
    """Replaces the engine's (empty) RPC families on its registry with the frontends' sums; ``token``: what their
    private ports ask for."""
    own = _rpc_families(metrics)
    return _replace_by_sums(metrics, own, own, (metrics.http_closed,), ports, token)


def serve_engine_metrics(
    metrics: Metrics, ports: Callable[[], list[int]], token: str, store_per_engine: bool
) -> SummedFamilies:
    """With several engines, on the first engine's registry: its own families of models, batches and sessions
    replaced by their sums over every engine (the others' read from their private ports at each scrape, as the
    frontends' are). Triton's names: the per-version families summed, the machine's exported once. A version's
    ``seqserve_model_ready`` is the least over the engines: 1 where every engine has it ready, as ``ModelReady``
    answers (``shards.merged``), so an alert on 0 sees a version that failed in one engine."""
    own = _engine_families(metrics, store_per_engine)
    least = frozenset(f.name for f in metrics.model_ready.collect())
    triton = metrics.triton
    if triton is None:
        return _replace_by_sums(metrics, own, own, own, ports, token, least)
    summed = (*own, triton.part(models=True, machine=False))
    collector = _replace_by_sums(metrics, (*own, triton), summed, summed, ports, token, least)
    metrics.registry.register(triton.part(models=False, machine=True))
    return collector
