"""Prometheus metrics. Every metric is defined here, on an injected registry (no global state).

INTERFACE FROZEN for the other modules: the method names and signatures below are what the core and the
API layer call. Implementation: see issue 5.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()

    # --- API layer (interceptor) -------------------------------------------------------------------
    def rpc_started(self, service: str, method: str) -> None:
        """In-flight gauge +1."""

    def rpc_finished(self, service: str, method: str, model: str, code: str, seconds: float) -> None:
        """In-flight gauge -1; request counter and latency histogram (labels: service, method, model, code)."""

    # --- core: inference -----------------------------------------------------------------------------
    def inference(
        self, model: str, version: int, queue_seconds: float, compute_seconds: float, batch_size: int
    ) -> None:
        """One executed batch: queue wait, compute and total time per request; batch size histogram."""

    def queue_depth(self, model: str, depth: int) -> None:
        """Requests waiting in the model's batch queue now."""

    # --- core: models ---------------------------------------------------------------------------------
    def model_loaded(self, model: str, version: int, provider: str, load_seconds: float, ready: bool) -> None:
        """Model info gauge (name, version, execution provider) and load time."""

    # --- core: sessions -------------------------------------------------------------------------------
    def sessions_active(self, model: str, count: int) -> None:
        """Live sessions of a model now."""

    def session_event(self, model: str, event: str) -> None:
        """event in {"created", "expired", "evicted", "deleted", "forked"}: counter +1."""

    def session_store_usage(self, sessions: int, capacity: int, bytes_used: int, bytes_capacity: int) -> None:
        """Store fill level, for the 'near capacity' alert."""

    # --- core: streaming ------------------------------------------------------------------------------
    def chars_generated(self, model: str, count: int) -> None:
        """Characters produced by Complete/Suggest/KServe completions."""

    def time_to_first_chunk(self, model: str, seconds: float) -> None:
        """Complete: from request start to the first streamed chunk."""
