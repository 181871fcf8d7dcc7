"""All server settings: one pydantic-settings class, every field from ``SEQSERVE_<FIELD>`` env vars too.

Built once in ``service.cli`` (``seqserve serve``) and passed down through constructors; never a global.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEQSERVE_", extra="ignore")

    # --- network ---------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    """Interface the gRPC and HTTP servers bind to. 0.0.0.0 inside a container."""
    port: int = Field(default=50051, ge=0, le=65535)
    """gRPC port (our API, KServe v2, health, reflection). 0 picks a free port."""
    metrics_port: int = Field(default=8002, ge=0, le=65535)
    """HTTP port for /metrics, /healthz and /readyz. 0 picks a free port."""
    api_key: str | None = None
    """When set, every RPC except health must send ``authorization: Bearer <api_key>``."""
    grace_seconds: float = Field(default=10.0, ge=0)
    """On SIGTERM: health goes NOT_SERVING, in-flight calls get this long to finish."""
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """Largest gRPC message accepted or sent."""

    # --- processes -------------------------------------------------------------------------------------
    workers: int = Field(default=0, ge=0)
    """gRPC frontend processes sharing ``port`` (SO_REUSEPORT), plus one engine process that owns the models,
    sessions and batchers. 0 (default) = one per available core (affinity and cgroup quota); 1 = everything in
    one process, no engine."""
    frontend_ports: bool = False
    """With workers > 1: each frontend also listens on a free port of its own, listed in the ready file (tests
    and debugging reach one frontend by it)."""

    # --- models ----------------------------------------------------------------------------------------
    models: Path = Path("models")
    """Model repository: ``<models>/<name>/<version>/{model.onnx,manifest.json}``."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when onnxruntime-gpu and a GPU are present, else CPU."""
    watch_models_seconds: float = Field(default=0.0, ge=0)
    """Poll the repository this often (0 = never): new version folders load and become the default, removed
    ones unload, a changed model.onnx reloads (``seqserve serve --watch-models``)."""
    plugins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Python modules imported at start-up that register extra tasks or session stores (comma-separated in the
    environment: ``SEQSERVE_PLUGINS=mypkg.tasks``)."""
    intra_op_threads: int = Field(default=1, ge=0)
    """ONNX Runtime threads per session (0 = ORT's default: one per core, spinning). 1 by measurement: recurrent
    steps are too small to split, and spinning pool threads take the cores the event loops need."""
    inter_op_threads: int = Field(default=1, ge=0)

    # --- batching --------------------------------------------------------------------------------------
    max_batch_size: int = Field(default=32, ge=1)
    """Requests (or sessions' steps) merged into one ORT run."""
    max_batch_delay_ms: float = Field(default=2.0, ge=0)
    """How long the first request of a batch waits for others."""
    max_queue_size: int = Field(default=1024, ge=1)
    """Requests waiting per model beyond which new ones get RESOURCE_EXHAUSTED."""
    inline_batch_tokens: int = Field(default=256, ge=0)
    """Batches of at most this many rows x time steps run ONNX Runtime inline on the event loop (cheaper than a
    thread hop for generation steps); bigger ones run in a worker thread. 0 = always a thread."""

    # --- sessions --------------------------------------------------------------------------------------
    session_store: str = "memory://"
    """Where sessions live: ``memory://`` (this process). Other schemes come from stores that register them."""
    session_ttl_seconds: float = Field(default=600.0, gt=0)
    """Default idle TTL of a session (a request may ask for another, up to ``session_max_ttl_seconds``)."""
    session_max_ttl_seconds: float = Field(default=86400.0, gt=0)
    max_sessions: int = Field(default=10000, ge=1)
    """Live sessions across all models."""
    max_session_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    """Bytes of recurrent state (and context) across all sessions."""
    session_full_policy: Literal["evict_lru", "reject"] = "evict_lru"
    """When the store is full: evict the least recently used session, or refuse with RESOURCE_EXHAUSTED."""
    reaper_interval_seconds: float = Field(default=1.0, gt=0)
    """How often expired sessions are swept."""
    sequence_idle_seconds: float = Field(default=60.0, gt=0)
    """KServe v2 sequences (Triton's max_sequence_idle_microseconds) expire after this idle time."""

    # --- request limits --------------------------------------------------------------------------------
    max_texts_per_request: int = Field(default=256, ge=1)
    max_chars_per_text: int = Field(default=4096, ge=1)
    max_generate_chars: int = Field(default=2000, ge=1)
    max_forecast_rows: int = Field(default=10000, ge=1)
    max_suggestions: int = Field(default=10, ge=1)

    # --- logging ---------------------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("plugins", mode="before")
    @classmethod
    def _split_plugins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
