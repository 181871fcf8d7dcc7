"""All server settings: one pydantic-settings class, every field from ``SEQSERVE_<FIELD>`` env vars too.

Built once in ``service.cli`` (``seqserve serve``) and passed down through constructors; never a global.
"""

from __future__ import annotations

import difflib
import json
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MAX_SECONDS = 315_360_000.0  # ten years: any duration setting (a protobuf Timestamp, a Redis TTL in ms hold it)
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/?#@]+", re.IGNORECASE)  # a web origin: scheme://host[:port]
GRPC_MAX_SECONDS = (2**31 - 1) / 1000  # gRPC's time options are int32 milliseconds: about 24.8 days
GRPC_MAX_INT = 2**31 - 1  # gRPC's integer options (message sizes, ping strikes) are int32
# Rows of one ONNX Runtime run: each version's warm-up runs a sample this large before it is READY, which at 4,096
# rows took the committed models 373 s and 16.6 GB (and 65,536 the machine's memory); Triton's configs stay far
# below it.
MAX_BATCH_ROWS = 1024
MIN_FRONTEND_SILENT_SECONDS = 3.0  # a frontend says a word a second (its engine watchdog): a hung one says none
MAX_THREADS = 256  # ONNX Runtime threads per session (each version has its own pools)
MAX_DELAY_MS = 60_000.0  # the batching and inline thresholds: a minute (a batch that waits for its last row)
VERSION_POLICY_FORMS = 'all, latest, latest:N, specific:1,3, or Triton\'s JSON ({"latest": {"num_versions": 1}})'
_MAX_VERSION = 999_999_999  # version folders are positive integers of at most 9 digits


def version_policy(value: object) -> str:
    """Triton's ``version_policy`` in its canonical text, ``all``, ``latest:N`` or ``specific:V,...`` (ascending),
    from that text (``latest`` = ``latest:1``; case and spaces do not matter) or Triton's JSON object
    (``{"all": {}}``, ``{"latest": {"num_versions": N}}``, ``{"specific": {"versions": [...]}}``); ValueError
    saying what to write otherwise."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"version_policy is not JSON ({exc}); write {VERSION_POLICY_FORMS}") from None
    if isinstance(value, Mapping):
        kind, body = _one_choice(value)
        if kind == "all":
            return "all"
        if kind == "latest":
            return _latest(body.get("num_versions", 1) if isinstance(body, Mapping) else body)
        versions = body.get("versions") if isinstance(body, Mapping) else body
        if not isinstance(versions, list) or not versions:
            raise ValueError(f"version_policy specific needs a non-empty list of versions, got {versions!r}")
        return _specific(versions)
    if not isinstance(value, str):
        raise ValueError(f"version_policy must be {VERSION_POLICY_FORMS}; got {value!r}")
    kind, _, arg = value.replace(" ", "").lower().partition(":")
    if kind == "all" and not arg:
        return "all"
    if kind == "latest":
        return _latest(arg or "1")
    if kind == "specific" and arg:
        return _specific(arg.split(","))
    raise ValueError(f"version_policy must be {VERSION_POLICY_FORMS}; got {value!r}")


def _one_choice(value: Mapping[Any, Any]) -> tuple[str, Any]:
    if len(value) != 1 or next(iter(value)) not in ("all", "latest", "specific"):
        raise ValueError(f"version_policy as JSON holds exactly one of all, latest and specific; got {dict(value)!r}")
    kind = next(iter(value))
    return kind, value[kind]


def _count(value: object, what: str) -> int:
    text = str(value)
    if isinstance(value, bool) or not (isinstance(value, int) or text.isdigit()) or not 1 <= int(text) <= _MAX_VERSION:
        raise ValueError(f"version_policy: {what} must be a whole number from 1 to {_MAX_VERSION}; got {value!r}")
    return int(text)


def _latest(n: object) -> str:
    return f"latest:{_count(n, 'the count of latest versions')}"


def _specific(versions: list[Any]) -> str:
    return "specific:" + ",".join(str(v) for v in sorted({_count(v, "each specific version") for v in versions}))


# The setting's type: its text or Triton's JSON object, read into the canonical text (per model too: serving.py).
VersionPolicy = Annotated[str, BeforeValidator(version_policy)]


def named_versions(policy: str) -> set[int] | None:
    """The versions a ``specific`` policy (canonical, ``version_policy``) names, whether on disk or not; None for
    the other kinds."""
    kind, _, arg = policy.partition(":")
    return {int(v) for v in arg.split(",")} if kind == "specific" else None


def chosen_versions(policy: str, versions: list[int]) -> list[int]:
    """The versions of ``versions`` (a model's on disk) that ``policy`` (canonical, ``version_policy``) serves,
    ascending."""
    kind, _, arg = policy.partition(":")
    if kind == "latest":
        return sorted(versions)[-int(arg) :]
    wanted = named_versions(policy)
    return sorted(v for v in versions if wanted is None or v in wanted)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEQSERVE_", extra="ignore", allow_inf_nan=False)

    # --- network ---------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    """Interface the gRPC and HTTP servers bind to. 0.0.0.0 inside a container."""
    port: int = Field(default=50051, ge=0, le=65535)
    """gRPC port (our API, KServe v2, health, reflection). 0 picks a free port."""
    metrics_port: int = Field(default=8002, ge=0, le=65535)
    """HTTP port for /metrics, /healthz and /readyz. 0 picks a free port."""
    http_port: int | None = Field(default=None, ge=0, le=65535)
    """KServe v2 REST (HTTP/JSON, Triton's binary tensor extension) on this port, a gateway to the gRPC port
    (``service.api.rest``); unset (default) = no REST. 0 picks a free port. With ``tls_cert``, TLS only."""
    api_key: str | None = None
    """When set, every RPC except health and reflection must send ``authorization: Bearer <api_key>``; its
    principal is named ``default``."""
    api_keys: str | None = None
    """Named API keys, one principal each: a file (one ``name:key`` per line, ``#`` comments) or a list of
    ``name:key`` pairs separated by commas. Names: 1-64 of ``A-Za-z0-9._@-``; keys: at least 16 characters."""
    admin_principals: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Principals allowed to load and unload models (KServe RepositoryModelLoad/Unload) and to change the log and
    trace settings (LogSettings, TraceSetting; anyone may read them), comma-separated in the
    environment; semicolon-separated when they are mTLS subjects, which hold commas themselves (any value with
    ``=`` in it: ``O=acme,CN=alice;san=spiffe://acme/ops``). Without credentials configured everyone is the
    anonymous principal and may; with API keys or mTLS, only the principals listed here may (none by default)."""
    tls_cert: Path | None = None
    """PEM certificate chain of the server: with ``tls_key`` the gRPC, metrics and REST ports speak TLS only."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    tls_client_ca: Path | None = None
    """PEM CA bundle: clients must present a certificate it signed (mTLS, every port; the metrics port's
    /healthz and /readyz excepted). Without API keys the certificate's subject is the caller's principal."""
    grace_seconds: float = Field(default=10.0, ge=0, le=MAX_SECONDS)
    """On SIGTERM: health goes NOT_SERVING, in-flight calls get this long to finish."""
    grpc_keepalive_seconds: float = Field(default=7200.0, gt=0, le=GRPC_MAX_SECONDS)
    """The server pings a connection that has been quiet this long; one that does not answer within
    ``grpc_keepalive_timeout_seconds`` is closed and its calls cancelled (a peer that vanished without closing
    its connection). gRPC's and Triton's default: two hours."""
    grpc_keepalive_timeout_seconds: float = Field(default=20.0, gt=0, le=GRPC_MAX_SECONDS)
    """How long the server waits for the answer to its keepalive ping."""
    grpc_keepalive_permit_without_calls: bool = True
    """Clients may send keepalive pings on a connection with no call in flight (and the server pings such a
    connection too). gRPC's default (false) counts each such ping as a strike against the client."""
    grpc_min_ping_interval_seconds: float = Field(default=10.0, ge=0, le=GRPC_MAX_SECONDS)
    """The shortest interval between a client's pings, while the server sends it nothing, that is not a strike;
    after ``grpc_max_ping_strikes`` strikes the server closes the connection (GOAWAY ``too_many_pings``), which
    fails every call on it, open streams included. 10 s accepts the keepalive most clients allow (gRPC's Go and
    Java clients raise anything shorter to 10 s); under gRPC's and Triton's default, 300 s, a client's stream
    fails a few of its ping intervals into a quiet spell."""
    grpc_max_ping_strikes: int = Field(default=2, ge=0, le=GRPC_MAX_INT)
    """Pings too close together that the server tolerates before closing the connection; 0 = any number."""
    grpc_max_connection_age_seconds: float = Field(default=0.0, ge=0, le=GRPC_MAX_SECONDS)
    """0 (default) = connections live as long as their clients keep them. Otherwise a connection older than this
    (give or take gRPC's 10% jitter) is asked to close (GOAWAY): its client connects again, through the load
    balancer, so long-lived clients spread over replicas added since. Calls in flight then get
    ``grpc_max_connection_age_grace_seconds`` to finish; a KServe stream that is cut off opens again and its
    sequence carries on, on any frontend of this server, on another replica only with a shared (Redis) session
    store."""
    grpc_max_connection_age_grace_seconds: float = Field(default=0.0, ge=0, le=GRPC_MAX_SECONDS)
    """After ``grpc_max_connection_age_seconds``: how long the calls in flight on the old connection may still
    take before they are cancelled; 0 (default) = as long as they take."""
    grpc_max_connection_idle_seconds: float = Field(default=0.0, ge=0, le=GRPC_MAX_SECONDS)
    """Close a connection that has had no call in flight for this long (its client connects again when it next
    calls); 0 (default) = never."""
    grpc_max_concurrent_streams: int = Field(default=0, ge=0, le=2**31 - 1)
    """Calls (unary or streams) one connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS): a
    client past it waits, in its own library, for one of its calls to end; other connections are not held up.
    0 (default) = gRPC's own: no limit."""
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=GRPC_MAX_INT)
    """Largest gRPC message accepted or sent (by the methods that carry bulk data: Classify, Predict, Observe,
    ModelInfer, ModelStreamInfer, and methods this server does not list as small)."""
    max_small_message_bytes: int = Field(default=64 * 1024, ge=1024)
    """Largest request of the methods that carry no bulk data (sessions, Complete, Suggest, metadata, health)."""
    large_request_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Requests above this size count against ``max_large_bytes_in_flight``."""
    max_large_bytes_in_flight: int = Field(default=32 * 1024 * 1024, ge=1024)
    """Bytes of large requests being decoded and served at once; more wait their turn (bounded by their
    deadline). Bounds the memory a burst of near-limit requests can pin."""

    # --- processes -------------------------------------------------------------------------------------
    workers: int = Field(default=0, ge=0)
    """gRPC frontend processes sharing ``port`` (SO_REUSEPORT), plus one engine process that owns the models,
    sessions and batchers. 0 (default) = one per available core (affinity and cgroup quota); 1 = everything in
    one process, no engine."""
    engines: int = Field(default=1, ge=1, le=64)
    """With workers > 1: engine processes, each owning a share of the sessions and KServe sequences (by a hash of
    their id) and running its own batches on its own event loop; frontends send each call to the engine that owns
    what it names, and calls that name no session to their own engine (frontend i to engine i mod K: more engines
    than frontends serve only sessions). 1 (default) = one engine for the whole server. With the in-memory
    session store, ``max_sessions`` and ``max_session_bytes`` are split exactly among the engines: the shares add up
    to the settings, and a limit below ``engines`` is refused (per-principal session quotas need a shared store
    then: each engine would count only its own)."""
    frontend_ports: bool = False
    """With workers > 1: each frontend also listens on a free port of its own, listed in the ready file (tests
    and debugging reach one frontend by it)."""
    frontend_restarts: int = Field(default=5, ge=0)
    """With workers > 1: frontends that die (a crash, the OOM killer) are replaced, at most this many times within
    ``frontend_restart_window_seconds``; the next exit stops the whole server with exit code 1, for its
    orchestrator to restart it. 0 = the first frontend exit stops the server."""
    frontend_restart_window_seconds: float = Field(default=60.0, gt=0)
    """The window ``frontend_restarts`` counts frontend exits in."""
    engine_silent_seconds: float = Field(default=5.0, ge=0.5, le=300)
    """With workers > 1: each frontend asks its engine every second whether it answers; an engine that has not
    answered for this long (stopped, wedged) turns the frontend's health NOT_SERVING (readiness: the whole server
    and every service; ServerReady, /v2/health/ready at once), and for six times as long its liveness
    (``grpc.health.v1.Health``) too, for the orchestrator to restart it. Health follows the engine again once it
    answers."""

    frontend_silent_seconds: float = Field(default=30.0, ge=0, le=3600)
    """With workers > 1: a frontend that has sent its engine nothing for this long (its event loop sends every
    engine a heartbeat each second) is stopped or wedged: the engine kills it (SIGKILL) and starts a new one on the
    same port, as for a frontend that dies (it counts against ``frontend_restarts``). Its calls in flight fail; its
    share of new connections, which the kernel kept sending it, goes to the others meanwhile. 0 = never (a
    frontend under a debugger); else at least 3."""

    # --- models ----------------------------------------------------------------------------------------
    models: Path = Path("models")
    """Model repository: ``<models>/<name>/<version>/{model.onnx,manifest.json}``."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when onnxruntime-gpu and a GPU are present, else CPU."""
    watch_models_seconds: float = Field(default=0.0, ge=0, le=MAX_SECONDS)
    """Poll the repository this often (0 = never): new version folders load and become the default, removed
    ones unload, a changed model.onnx reloads (``seqserve serve --watch-models``)."""
    warmup: bool = True
    """Run each model version on a sample input of one row and of ``max_batch_size`` rows while it loads, before it
    is READY (Triton's ``model_warmup``): a graph that loads but fails to run, or answers NaN, is UNAVAILABLE with
    the reason instead of READY and failing its callers, and ONNX Runtime's first runs (on CUDA, its library set-up)
    are not a caller's. Tasks that give no input for it (``Task.warmup_input``) are not run."""
    version_policy: VersionPolicy = "all"
    """Which versions of each model are served (Triton's ``version_policy``): ``all`` (the default: every version
    folder, so a client that pins an older version keeps working), ``latest:N`` (the N newest; ``latest`` = 1,
    Triton's own default) or ``specific:1,3``. A model may set its own (serving.json, also as Triton's JSON
    ``{"latest": {"num_versions": 1}}``, or a load's config). Versions left out are not loaded, so their memory stays
    free; a call naming one gets NOT_FOUND saying why. With ``latest:1`` and ``--watch-models`` a new version folder
    loads, and the version before it unloads once the new one is ready (it serves on while the new one fails)."""
    load_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Load only these models at start (comma-separated; empty = every model in the repository), like Triton's
    ``--model-control-mode=explicit --load-model``: the others are listed by RepositoryIndex as UNAVAILABLE and
    load on request (RepositoryModelLoad); ``--watch-models`` follows the loaded ones only (``seqserve serve
    --load-model``). A name that is not in the repository stops the server at start."""
    exit_on_error: bool = False
    """Stop the server at start (exit 1, naming each version and why) when a model version fails to load (or the
    repository is not a folder: without this, a warning and a server that serves nothing), as Triton's
    ``--exit-on-error`` does (``seqserve serve --exit-on-error``): a deployment with a bad model then fails instead
    of serving the rest. Off by default, unlike Triton's: one model's bad files should not take the others down
    (the failed version is UNAVAILABLE, ServerReady false and ``SeqServeModelNotReady`` fires). Loads after the
    start answer for themselves (RepositoryModelLoad's error)."""
    plugins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Python modules imported at start-up that register extra tasks or session stores (comma-separated in the
    environment: ``SEQSERVE_PLUGINS=mypkg.tasks``)."""
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"
    """The event loop of every server process (frontends and engine). uvloop (the ``uvloop`` extra) spends less CPU
    per request under load but costs a lone request its queue-skipping path (its run queue is out of sight): one
    worker on 2 cores, sentiment c=64 +19-21%, char-LM unary c=16 +9-12%, streams +2-7%, c=1 -5-9%. asyncio by
    measurement: the lone keystroke comes first; the README's settings table has the numbers."""
    compiled: bool = True
    """Run the hot path's modules compiled with mypyc (``service/compiled.py``; ``make serve`` and ``make test``
    build them, ``python -m service.compile status`` says whether they are in use) when they are built and match
    their sources; false runs their Python source. Read when the ``service`` package is imported, before the
    settings are: set it in the environment. Compiled, the core spends 9-14% less CPU per char-LM step and one
    worker streams up to 20% more steps at c=16 (the README's *The compiled hot path*)."""
    intra_op_threads: int = Field(default=1, ge=0, le=MAX_THREADS)
    """ONNX Runtime threads per session (0 = ORT's default: one per core, spinning). 1 by measurement: spinning pool
    threads take the cores the event loops need, and a second thread speeds up only big sentiment batches in ORT
    alone (``make bench``'s threads table), not the served throughput, which the event loop limits."""
    inter_op_threads: int = Field(default=1, ge=0, le=MAX_THREADS)

    # --- batching --------------------------------------------------------------------------------------
    max_batch_size: int = Field(default=32, ge=1, le=MAX_BATCH_ROWS)
    """Requests (or sessions' steps) merged into one ORT run."""
    max_batch_delay_ms: float = Field(default=2.0, ge=0, le=MAX_DELAY_MS)
    """How long the first request of a batch waits for others."""
    max_queue_size: int = Field(default=1024, ge=1)
    """Requests waiting per model beyond which new ones get RESOURCE_EXHAUSTED."""
    model_instances: int = Field(default=1, ge=1, le=64)
    """Batches of one model version that may run at once (Triton's ``instance_group`` count): while one runs in a
    worker thread, the next forms and starts on another, so a step that arrives meanwhile does not wait for it.
    1 (default) = one batch at a time. On 16 cores that was the engine's limit (docs/architecture.md); on 2 cores,
    where the event loop and ONNX Runtime already share both, more buys nothing."""
    priority_levels: int = Field(default=0, ge=0, le=1000)
    """Triton's priority levels (the schedule-policy extension): a KServe request's ``priority`` 1 (highest) to
    this; a waiting request of a higher level runs before every lower one of its model. 0 (default) = one level:
    ``priority`` is accepted and has no effect, as on a Triton model without levels."""
    default_priority_level: int = Field(default=0, ge=0, le=1000)
    """The level of requests that name none (``priority`` 0, our own API, sessions); 0 = the lowest level."""
    inline_batch_tokens: int = Field(default=256, ge=0)
    """Batches of at most this many rows x time steps run ONNX Runtime inline on the event loop (cheaper than a
    thread hop for generation steps); bigger ones run in a worker thread. 0 = always a thread."""
    inline_batch_ms: float = Field(default=0.6, ge=0, le=MAX_DELAY_MS)
    """...and only when the model's last run of a batch that size took at most this long: a longer run goes to
    the worker thread, where the event loop serves other calls meanwhile (a batch with nothing queued behind it
    that is not full has none to serve: ``alone_inline_ms`` bounds it instead). 0.6 by measurement on 2 cores: every
    char-LM step batch (up to 32 rows, ~0.5 ms) stays inline, a sentiment batch of two sentences (~0.8 ms) does
    not (one worker, 64 calls in flight: 1,271 -> ~1,850 sentences/s, the README's settings table)."""
    pad_split_tokens: int = Field(default=64, ge=0)
    """A batch of right-padded requests (sentiment texts) is padded to its longest, and ONNX Runtime's recurrent
    kernels compute every padded step. The batcher sorts such a batch by length and splits it into runs of similar
    lengths when a split saves at least this many padded rows x time steps and a quarter of the batch's. On real
    SST-2 dev sentences (one thread, ``python -m bench.runtime``): 64 sentences 1.44x faster, 16 1.26x, 4 unchanged
    (seldom split). 64 by a sweep: 16 also splits batches of 4 (5% slower), 256 leaves most batches of 16 whole.
    0 = never."""
    alone_inline_ms: float = Field(default=2.0, ge=0, le=MAX_DELAY_MS)
    """A lone request (nothing queued or running, no recent company, nothing else ready on the event loop) runs
    ONNX Runtime inline, skipping the queue, when the model's last run of its size took at most this long; the
    worker thread's hop buys nothing when no other call is there to serve meanwhile. 2.0 by measurement on 2 cores:
    one SST-2 sentence (~0.6 ms in ORT) at c=1, p50 1.71 -> 1.51 ms. The same bound holds for a batch that took
    every queued request and is not full (the requests of the next batch are not here yet): ``charlm/2``'s 16-row
    steps (~1-1.6 ms) stay inline. 0 = lone requests and such batches follow inline_batch_ms."""

    # --- sessions --------------------------------------------------------------------------------------
    session_store: str = "memory://"
    """Where sessions live: ``memory://`` (this process), ``redis://host:port/db``, ``rediss://`` (TLS) or
    ``redis+cluster://host:port`` (Redis Cluster; any node): shared by every replica, sessions survive restarts.
    Other schemes come from stores that register them."""
    session_durability: Literal["step", "idle"] = "step"
    """Redis stores only. ``step``: a step is acknowledged after its new state is in Redis (a crash loses
    nothing acknowledged). ``idle``: hot sessions stay in this process and are written back when idle
    (``session_idle_seconds``), at least every ``session_flush_seconds``, when another replica asks for them and
    on SIGTERM; a crash (kill -9, power loss) loses up to that many seconds of steps per session."""
    session_flush_seconds: float = Field(default=5.0, gt=0, le=MAX_SECONDS)
    """``idle`` durability: the longest a step stays only in this process's memory."""
    session_idle_seconds: float = Field(default=0.5, gt=0, le=MAX_SECONDS)
    """``idle`` durability: a session unused this long is written back."""
    session_lease_seconds: float = Field(default=5.0, gt=0, le=MAX_SECONDS)
    """Redis stores: a replica owns a session it used within this time (it reads nothing from Redis before a
    step); another replica asks it to hand over. After a crash its sessions move on once this has passed."""
    session_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    """Redis stores: bytes of recently used sessions each replica keeps in memory (hot cache)."""
    session_store_timeout_seconds: float = Field(default=1.0, gt=0, le=MAX_SECONDS)
    """Redis stores: a command that gets no answer this soon fails the call with UNAVAILABLE."""
    session_index_shards: int = Field(default=16, ge=1, le=4096)
    """Redis stores: keys the session index (counts, bytes, expiry order) is spread over; in a cluster at
    least the number of primaries, so no node holds the whole index."""
    session_signing_key: SecretStr | None = None
    """HMAC-SHA256 key that signs ``Sessions.Export`` blobs (at least 32 characters; the same on every replica
    and cluster that should accept each other's blobs). Unset: Export and Import are refused."""
    session_ttl_seconds: float = Field(default=600.0, gt=0, le=MAX_SECONDS)
    """Default idle TTL of a session (a request may ask for another, up to ``session_max_ttl_seconds``)."""
    session_max_ttl_seconds: float = Field(default=86400.0, gt=0, le=MAX_SECONDS)
    max_sessions: int = Field(default=10000, ge=1)
    """Live sessions across all models."""
    max_session_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    """Bytes of recurrent state (and context) across all sessions."""
    session_full_policy: Literal["evict_lru", "reject"] = "evict_lru"
    """When the store is full: evict the least recently used session, or refuse with RESOURCE_EXHAUSTED."""
    reaper_interval_seconds: float = Field(default=1.0, gt=0, le=MAX_SECONDS)
    """How often expired sessions are swept."""
    sequence_idle_seconds: float = Field(default=60.0, gt=0, le=MAX_SECONDS)
    """KServe v2 sequences (Triton's max_sequence_idle_microseconds) expire after this idle time."""
    prefix_cache_bytes: int = Field(default=32 * 1024 * 1024, ge=0)
    """Char-LM calls without a session (KServe without a sequence, ``Complete`` without ``session_id``) keep the
    state after their prompt, and every 128 characters on the way (fewer in a long prompt), in a cache of this
    many bytes (all models, least recently used first), so a caller that re-sends a growing text pays for what it
    added. Per principal. A session that starts from nothing (new, reset, a KServe sequence's start) feeds its
    first text the same way. 0 = off (every call feeds its whole text)."""
    response_cache_bytes: int = Field(default=0, ge=0)
    """Triton's response cache: whole answers of stateless requests (KServe over gRPC and REST, our ``Classify`` and
    ``Predict``) to deterministic models (sentiment, forecasters; not the char LM, whose calls sample or carry
    state), kept in this many bytes (all models, least recently used first, per principal), so that a request seen
    before is answered without running the model. ``ModelStatistics`` reports its ``cache_hit`` and
    ``cache_miss``. 0 (default) = off, as a Triton model is without ``response_cache``."""
    shared_memory: Literal["off", "system"] = "off"
    """Triton's system shared-memory extension (``system``): a client on the server's host registers POSIX
    shared-memory objects (tritonclient ``register_system_shared_memory``, perf_analyzer ``--shared-memory
    system``) and its inputs and outputs name them instead of carrying their bytes (``service/core/shm.py``).
    Registering needs an admin principal (or one of ``shared_memory_principals``) when credentials are configured;
    a region is its registering principal's alone. Off by default (Triton has it on): a registration makes the
    server open a file of its host that the caller names, and only a caller on the same host (in Docker, with the
    server's IPC namespace) can use it."""
    shared_memory_principals: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Principals allowed to register and unregister shared-memory regions besides ``admin_principals`` (which may
    also load models and change settings): a same-host client that needs nothing more, separated as
    ``admin_principals`` are. None by default."""

    # --- per-principal quotas (0 = no limit) ------------------------------------------------------------
    quota_sessions: int = Field(default=0, ge=0)
    """Live sessions (and v2 sequences) one principal may hold."""
    quota_session_bytes: int = Field(default=0, ge=0)
    """Bytes of session state one principal may hold."""
    quota_requests_per_second: float = Field(default=0.0, ge=0, le=1e9)
    """Requests per second per principal (token bucket). Unary calls over it get RESOURCE_EXHAUSTED; messages
    of client streams (Suggest, ModelStreamInfer) are paced to it."""
    quota_request_burst: int = Field(default=0, ge=0)
    """Bucket size of ``quota_requests_per_second`` (0 = one second's worth, at least 1)."""

    # --- request limits --------------------------------------------------------------------------------
    max_texts_per_request: int = Field(default=256, ge=1)
    max_chars_per_text: int = Field(default=4096, ge=1)
    max_words_per_request: int = Field(default=32768, ge=1)
    """Tokens of all the texts of one classify request together (256 x 128 by default: the most a request could
    hold when texts were cut at the training window). A batch runs them all before the model's next one, so this
    bounds how long one request can hold up everyone else's sentiment calls."""
    max_generate_chars: int = Field(default=2000, ge=1)
    max_forecast_rows: int = Field(default=10000, ge=1)
    max_suggestions: int = Field(default=10, ge=1)
    undo_chars: int = Field(default=0, ge=0, le=4096)
    """Backspace in char-LM sessions (``SuggestRequest.backspace``): each session keeps two checkpoints of its
    state and the characters since the older one, so at least this many characters can be taken back without
    re-feeding the text (``service/core/tasks/undo.py``). Costs each session two states, two logits and 2x
    this many characters; 0 (default) = off, nothing kept."""
    fold_chars: bool = True
    """A char model reads a character outside its vocabulary as the one it stands for, one for one (curly quotes
    and dashes as ASCII, full-width and accented letters as plain ones, a line break as LF, any other space as a
    space), and a CRLF as one LF (a session's steps count it once); false = refuse the text (INVALID_ARGUMENT) as
    for a character nothing stands for. A word model (sentiment) reads curly quotes and long dashes as ASCII, as
    its training text has them; false = as they are (mostly unknown words)."""

    # --- logging ---------------------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json", "iso8601"] = "text"
    """text: one escaped line per record; iso8601: the same with ISO 8601 UTC times (Triton's ``ISO8601``);
    json: one JSON object per line with request_id, method, model, code and duration_ms where known."""
    access_log: bool = False
    """Log one line per finished RPC (logger ``seqserve.access``, INFO)."""
    log_errors_per_second: float = Field(default=20.0, ge=0, le=1e6)
    """Per process, the refused-request lines (``-> NOT_FOUND: ...``) logged per second, in bursts of up to five
    seconds' worth; the rest are counted and reported in one WARNING line once lines flow again (the RPC metrics
    count every one). INTERNAL errors are always logged. 0 = every line."""
    triton_metrics: bool = False
    """Also export Triton's metric names on /metrics (``nv_inference_request_success``, ``nv_inference_count``,
    ``nv_inference_exec_count``, ``nv_inference_*_duration_us``, ``nv_inference_pending_request_count``,
    ``nv_cache_*_per_model``, ``nv_cpu_*``; labels model and version; the numbers ModelStatistics reports), so
    dashboards and alerts written for Triton work unchanged (``service/triton_metrics.py``). Off by default: they
    repeat the ``seqserve_*`` series under names Prometheus' conventions flag (``_us``, ``_count`` on a gauge)."""
    metrics_idle_timeout_seconds: float = Field(default=10.0, gt=0, le=MAX_SECONDS)
    """The metrics port closes a connection that sends nothing for this long (a half-sent request included)."""
    metrics_max_connections: int = Field(default=64, ge=1)
    """Connections the metrics port serves at once; more are closed at once."""
    http_idle_timeout_seconds: float = Field(default=10.0, gt=0, le=MAX_SECONDS)
    """The REST port closes a connection that sends nothing for this long; a request gets at most three of these
    from its first byte to its answer."""
    http_max_connections: int = Field(default=64, ge=1)
    """Connections the REST port serves at once (per frontend process with --workers N); more are closed at once."""
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Web pages that may call the REST port from a browser (CORS): their origins, ``scheme://host[:port]``,
    comma-separated, or ``*`` for any page. Empty (default): none; a browser's preflight is answered 403 saying
    to set this. CORS only tells browsers what they may read: it is no access control (API keys are)."""

    # --- tracing (Triton's trace extension) ----------------------------------------------------------------
    trace_level: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["OFF"])
    """Triton's trace level: ``OFF`` (default), or ``TIMESTAMPS`` and/or ``TENSORS`` (comma-separated). Then every
    ``trace_rate``-th inference request of a model is traced into ``trace_file`` as Triton's JSON trace: when it
    started, queued, and ran its model runs (input, run, output) and ended (TIMESTAMPS), and the tensors each run
    was fed and gave back (TENSORS). Changed while the server runs, for all models or one, through the trace
    extension (tritonclient's ``update_trace_settings``, ``POST /v2[/models/<name>]/trace/setting``)."""
    trace_file: str = ""
    """Where traces are written (needed with a level other than OFF; its folder must exist and take a new file,
    checked at start): with ``trace_log_frequency`` 0, the whole
    JSON array when the server stops (or the file setting changes); else ``<trace_file>.0``, ``.1``, ... each
    time that many traces are collected."""
    trace_rate: int = Field(default=1000, ge=1)
    """Trace every this-many-th inference request (per model that sets its own settings, else across models)."""
    trace_count: int = Field(default=-1, ge=-1)
    """Traces still to collect; -1 = no limit. Counts down as traces are taken (the settings show what is left)."""
    trace_log_frequency: int = Field(default=0, ge=0)
    """Write the traces every this many (into numbered files); 0 = only when the server stops."""
    trace_dir: str = ""
    """The folder in which callers of the trace extension may name a ``trace_file`` (a relative name is taken
    there; one outside is refused). Empty (default): the file is set at start only (``TRACE_FILE``), so a
    caller can never make the server write elsewhere."""

    @property
    def default_level(self) -> int:
        """The priority level of requests that name none: ``default_priority_level``, its 0 meaning the lowest
        (``priority_levels``; 0 too with one level)."""
        return self.default_priority_level or self.priority_levels

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both (SEQSERVE_TLS_CERT, SEQSERVE_TLS_KEY)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key: the server must speak TLS first")
        if self.default_priority_level > self.priority_levels:
            raise ValueError(
                f"default_priority_level ({self.default_priority_level}) is above priority_levels "
                f"({self.priority_levels}): levels run from 1 (highest) to priority_levels"
            )
        return self

    @model_validator(mode="after")
    def _no_silent_limits(self) -> Settings:
        """Combinations that would switch a limit off without a word."""
        if self.large_request_bytes > self.max_message_bytes and "large_request_bytes" not in self.model_fields_set:
            self.large_request_bytes = self.max_message_bytes  # the default follows a smaller message limit
        if self.large_request_bytes > self.max_message_bytes:
            raise ValueError(
                f"large_request_bytes ({self.large_request_bytes}) is above max_message_bytes "
                f"({self.max_message_bytes}): no request would count against max_large_bytes_in_flight; to allow "
                "more large requests at once, raise max_large_bytes_in_flight instead"
            )
        small = self.max_small_message_bytes
        if small > self.max_message_bytes and "max_small_message_bytes" not in self.model_fields_set:
            self.max_small_message_bytes = small = self.max_message_bytes  # the default follows a smaller limit
        if small > self.max_message_bytes:
            raise ValueError(
                f"max_small_message_bytes ({small}) is above max_message_bytes ({self.max_message_bytes}): no "
                "request may be larger than max_message_bytes, so the small methods' limit would be that one; "
                "lower max_small_message_bytes or raise max_message_bytes"
            )
        if self.quota_request_burst and not self.quota_requests_per_second:
            raise ValueError(
                "quota_request_burst is set but quota_requests_per_second is 0 (no rate quota): set the rate too, "
                "or leave the burst unset"
            )
        return self

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value.strip():  # (gRPC read "" as every interface: an unset variable in a compose file exposed the
            raise ValueError(  # server on all of them)
                "is empty: set 127.0.0.1 to listen on this machine only, or 0.0.0.0 for every interface"
            )
        return value

    @field_validator("frontend_silent_seconds")
    @classmethod
    def _frontend_silent(cls, value: float) -> float:
        if 0 < value < MIN_FRONTEND_SILENT_SECONDS:  # (a frontend's watchdog says a word a second, when it can)
            raise ValueError(
                f"is {value:g}: a frontend sends its engines a heartbeat every second; set at least "
                f"{MIN_FRONTEND_SILENT_SECONDS:g} (seconds without a word that mean it "
                "hangs), or 0 never to replace a silent frontend"
            )
        return value

    @field_validator("trace_dir")
    @classmethod
    def _trace_dir(cls, value: str) -> str:
        if value and not Path(value).is_dir():  # (every trace_file a caller named there was refused)
            raise ValueError("is not an existing folder: create it, or leave TRACE_DIR empty")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: Any) -> Any:
        """Any case, and Python's and Triton's other names of the two levels (debug, WARN, CRITICAL as ERROR)."""
        if not isinstance(value, str):
            return value
        word = value.strip().upper()
        word = {"WARN": "WARNING", "CRITICAL": "ERROR", "FATAL": "ERROR"}.get(word, word)
        return word if word in ("DEBUG", "INFO", "WARNING", "ERROR") else value  # (a refusal quotes it as given)

    @field_validator("trace_level", mode="before")
    @classmethod
    def _trace_level(cls, value: Any) -> Any:
        from service.core.traces import parse_level  # (no model code imported before a setting is read)

        try:
            return list(parse_level(value.split(",") if isinstance(value, str) else value))
        except Exception as exc:
            raise ValueError(f"trace_level: {getattr(exc, 'message', exc)}") from None

    @property
    def sessions_in_process(self) -> bool:
        """The session store lives in each server process (``memory://``), not shared between processes (Redis):
        with several engines, each has its own."""
        return self.session_store.startswith("memory:")

    @model_validator(mode="after")
    def _engines(self) -> Settings:
        if self.engines > 1 and self.workers == 1:
            raise ValueError(
                f"engines={self.engines} needs frontend processes: set workers to 2 or more (or 0, one per core); "
                "workers=1 serves everything in one process"
            )
        for name in ("max_sessions", "max_session_bytes"):
            value = getattr(self, name)
            if self.engines > 1 and self.sessions_in_process and value < self.engines:
                raise ValueError(
                    f"{name}={value} is too small for engines={self.engines}: with the in-memory session store each "
                    f"engine holds its share of {name}, and {value} leaves some engine none; raise {name} to at least "
                    f"{self.engines}, lower engines, or use a shared session store (redis://)"
                )
        quotas = self.quota_sessions or self.quota_session_bytes
        if self.engines > 1 and quotas and self.sessions_in_process:
            raise ValueError(
                "per-principal session quotas (quota_sessions, quota_session_bytes) with several engines need a shared "
                "session store: with memory:// each engine would count only its own sessions; set session_store to "
                "a redis:// URL, or engines=1"
            )
        return self

    @model_validator(mode="after")
    def _trace_file(self) -> Settings:
        if self.trace_level != ["OFF"] and not self.trace_file:
            raise ValueError(
                f"trace_level is {','.join(self.trace_level)} but trace_file is empty: set SEQSERVE_TRACE_FILE to "
                "where the traces go"
            )
        folder = Path(self.trace_file).parent
        if self.trace_level != ["OFF"] and not folder.is_dir():  # (the traces were lost at stop, with a traceback)
            raise ValueError(
                f"trace_file {self.trace_file!r}: its folder {str(folder)!r} does not exist; create it or set "
                "SEQSERVE_TRACE_FILE to a file in an existing folder"
            )
        if self.trace_level != ["OFF"]:  # (a read-only folder lost every trace at stop, after a start that said ok)
            try:
                with tempfile.NamedTemporaryFile(dir=folder, prefix=".seqserve-write-check-"):
                    pass
            except OSError as exc:
                raise ValueError(
                    f"trace_file {self.trace_file!r}: the server cannot write into its folder {str(folder)!r} "
                    f"({exc.strerror or exc}); set SEQSERVE_TRACE_FILE to a file in a writable folder"
                ) from None
        return self

    @model_validator(mode="after")
    def _ports(self) -> Settings:
        named = [("port", self.port), ("metrics_port", self.metrics_port), ("http_port", self.http_port)]
        given = [(name, p) for name, p in named if p]  # (0: a free port each; None: no REST port)
        for i, (name, p) in enumerate(given):
            other = next((o for o, q in given[i + 1 :] if q == p), None)
            if other is not None:  # (it failed to bind, blaming "another process" that was this one)
                raise ValueError(f"{name} and {other} are both {p}: each port needs its own number")
        return self

    @model_validator(mode="after")
    def _ttls(self) -> Settings:
        if self.session_ttl_seconds > self.session_max_ttl_seconds:  # (it was used as the maximum without a word)
            raise ValueError(
                f"session_ttl_seconds {self.session_ttl_seconds:g} is above session_max_ttl_seconds "
                f"{self.session_max_ttl_seconds:g}: lower the default or raise the maximum"
            )
        return self

    @field_validator("session_signing_key")
    @classmethod
    def _long_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("session_signing_key must have at least 32 characters (e.g. `openssl rand -hex 32`)")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        if "*" in value and len(value) > 1:
            raise ValueError("cors_origins: '*' lets every page in; give either '*' or a list of origins, not both")
        for origin in value:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"cors_origins: {origin!r} is not an origin; write scheme://host[:port] with no path, as a "
                    "browser sends it (e.g. https://app.example.com or http://localhost:3000)"
                )
        return [origin.lower() for origin in value]  # (browsers send scheme and host in lower case)

    @field_validator(
        "plugins", "admin_principals", "shared_memory_principals", "load_models", "cors_origins", mode="before"
    )
    @classmethod
    def _split_plugins(cls, value: Any) -> Any:
        if isinstance(value, str):
            separator = ";" if "=" in value else ","  # mTLS subjects ("O=acme,CN=alice") hold commas
            return [part.strip() for part in value.split(separator) if part.strip()]
        return value


CLIENT_VARIABLES = {"SEQSERVE_TARGET", "SEQSERVE_TLS_CA", "SEQSERVE_TLS_CLIENT_CERT", "SEQSERVE_TLS_CLIENT_KEY"}


SECRET_SETTINGS = frozenset(
    {"api_key", "api_keys"} | {name for name, f in Settings.model_fields.items() if "SecretStr" in str(f.annotation)}
)  # settings whose value is never printed (session_store is printed with its password hidden: sessions.redact)
_K8S_SERVICE_LINK = re.compile(r"(tcp|udp|sctp)://", re.IGNORECASE)  # SEQSERVE_X_PORT=tcp://10.0.0.7:6379


def misspelt(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable, the setting it was probably meant to be) for each ``SEQSERVE_*`` variable that is no setting but
    nearly spells one (``SEQSERVE_WOKERS``), or names one with a word too many or too few, every word a settings'
    word (``SEQSERVE_MAX_WORKERS``, ``SEQSERVE_SESSION_CACHE``): pydantic-settings ignores unknown names, so such a
    typo would leave its setting at the default without a word. Names that resemble none (Kubernetes' service
    links inject ``SEQSERVE_SERVICE_HOST``, ``SEQSERVE_REDIS_PORT=tcp://...`` and the like) are left alone."""
    known = sorted(name.upper() for name in Settings.model_fields)
    out = []
    for name in sorted(environ):
        if name.startswith("SEQSERVE_") and name[9:] not in known and name not in CLIENT_VARIABLES:
            close = _near(name[9:], known) if not _K8S_SERVICE_LINK.match(environ[name]) else None
            if close:
                out.append((name, f"SEQSERVE_{close}"))
    return out


def _near(name: str, known: list[str]) -> str | None:
    """The setting ``name`` (upper case, no prefix) nearly spells, or is one word off from; None if none or
    several are."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
    if close:
        return close[0]
    words = name.split("_")
    vocabulary = {word for setting in known for word in setting.split("_")}
    if not all(words) or not set(words) <= vocabulary:  # (a word of no setting: another program's variable)
        return None
    fewer = {"_".join(words[:i] + words[i + 1 :]) for i in range(len(words))}  # a word too many
    candidates = {k for k in known if k in fewer or _one_word_less(k.split("_"), words)}
    return candidates.pop() if len(candidates) == 1 else None


def _one_word_less(setting: list[str], words: list[str]) -> bool:
    return len(setting) == len(words) + 1 and any(setting[:i] + setting[i + 1 :] == words for i in range(len(setting)))
