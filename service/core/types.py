"""Transport-free request/response types of the data plane, and the data plane's interface.

Servicers (ours in ``service/api/servicers``, the KServe v2 one, the CLI client) convert protobuf to these
types, await one ``DataPlane`` call, and convert back. Nothing here knows about gRPC or protobuf.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from service.core.shm import Regions

FloatArray = npt.NDArray[np.float32]
FinishReason = Literal["length", "stop"]


@dataclass(frozen=True)
class ModelRef:
    """A model by name; ``version=None`` means the newest loaded version."""

    name: str
    version: int | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    task: str
    ready: bool
    provider: str  # e.g. "CPUExecutionProvider"
    error: str | None = None  # why it failed to load, when not ready
    load_seconds: float = 0.0


@dataclass(frozen=True)
class SharedRegion:
    """A system shared-memory region (Triton's extension, ``core/shm.py``): ``byte_size`` bytes from ``offset`` of
    the POSIX shared-memory object ``key``, registered as ``name`` by principal ``owner`` (whose region it is:
    ``Regions.register`` sets it)."""

    name: str
    key: str
    offset: int
    byte_size: int
    owner: str = ""


@dataclass(frozen=True)
class SentimentResult:
    label: str
    labels: list[str]  # class names, in the order of ``probabilities``
    probabilities: list[float]


@dataclass(frozen=True)
class SamplingParams:
    max_chars: int = 200
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None  # same seed + same inputs = same text
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class CompletionChunk:
    """One piece of a streamed completion. The last chunk has ``finish_reason`` set (and may be empty).
    ``steps``: with a session, what the session has consumed in total once this chunk is in it (0 without).
    ``model_version``: on the first chunk, the version of the model that generates (0 on the others)."""

    text: str
    finish_reason: FinishReason | None = None
    steps: int = 0
    model_version: int = 0


@dataclass(frozen=True)
class Suggestion:
    text: str
    logprob: float  # natural-log probability of ``text`` given the session's state


@dataclass(frozen=True)
class SuggestResult:
    suggestions: list[Suggestion]
    steps: int  # characters the session has consumed in total


@dataclass(frozen=True)
class CharStep:
    """The char LM's view after consuming some text (KServe ``charlm`` contract)."""

    probabilities: FloatArray  # (vocab,) distribution of the next character
    vocab: list[str]
    completion: str  # greedy continuation (does not advance any session)
    steps: int


@dataclass(frozen=True)
class ForecastResult:
    columns: list[str]
    point: FloatArray  # (horizon, features), original units
    quantile_levels: list[float]  # e.g. [0.1, 0.5, 0.9]
    quantiles: FloatArray  # (len(quantile_levels), horizon, features), original units
    rows_seen: int  # rows of history behind this forecast (a session's total)


@dataclass(frozen=True)
class SessionInfo:
    id: str
    model: str
    version: int
    steps: int  # characters or rows consumed so far
    created_at: float  # unix seconds
    last_used_at: float
    expires_at: float
    ttl_seconds: float
    metadata: dict[str, str] = field(default_factory=dict)
    in_use: bool = False  # a call is running on it: the rest is as its last finished call left it


@dataclass(frozen=True, slots=True)
class Tensor:
    """A named tensor in Open Inference Protocol (KServe v2) terms, free of any transport.

    ``datatype`` is a v2 datatype name ("FP32", "INT64", "BYTES", ...). Numeric tensors carry ``array``
    (already shaped); BYTES tensors carry ``items`` (flat, row-major) and their ``shape``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: npt.NDArray[Any] | None = None
    items: list[bytes] | None = None

    def decode(self) -> Tensor:
        return self


class InputTensor(Protocol):
    """An input as a transport hands it over: the header is read first (name, datatype, shape are checked
    against the model's contract), the data is decoded only after that (``decode``)."""

    @property
    def name(self) -> str: ...

    @property
    def datatype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    def decode(self) -> Tensor: ...


@dataclass(frozen=True)
class TensorDef:
    """One tensor of a task's v2 contract. ``-1`` in ``shape`` = any size, up to ``max_shape`` (same length;
    0 = no limit) when given: inputs are checked against both before any data is decoded."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False
    also_accepts: tuple[str, ...] = ()  # other datatypes taken for this input (e.g. INT64 for an INT32 count)
    max_shape: tuple[int, ...] = ()
    limit_name: str = ""  # the setting behind max_shape, named in the error message
    labels: tuple[str, ...] = ()  # an output's class names along its last dimension (Triton's label file)

    def describe(self) -> str:
        return f"{self.name} ({self.datatype} {list(self.shape)})"


@dataclass(frozen=True)
class TensorContract:
    """What a task's model takes and returns over the v2 protocol, and whether it keeps sequences."""

    inputs: tuple[TensorDef, ...]
    outputs: tuple[TensorDef, ...]
    sequences: bool

    # Looked up on every request: built once per contract (a frozen dataclass keeps its cached properties).
    @functools.cached_property
    def inputs_by_name(self) -> dict[str, TensorDef]:
        return {d.name: d for d in self.inputs}

    @functools.cached_property
    def outputs_by_name(self) -> dict[str, TensorDef]:
        return {d.name: d for d in self.outputs}

    @functools.cached_property
    def output_names(self) -> list[str]:
        return list(self.outputs_by_name)


@dataclass(frozen=True)
class ModelMetadata:
    """A loaded model version as a protocol adapter describes it (v2 ModelMetadata / ModelConfig)."""

    name: str
    version: int
    versions: list[int]  # every loaded version of this model, ascending
    task: str
    platform: str  # "onnxruntime_onnx"
    contract: TensorContract
    parameters: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"  # where its runs execute: "cpu" or "gpu" (its ONNX Runtime provider)
    response_cache: bool = False  # whether the response cache answers its stateless requests (RESPONSE_CACHE_BYTES)
    batch_delay_ms: float = 2.0  # its batcher's MAX_BATCH_DELAY_MS (the server's, or its serving.json's)
    instances: int = 1  # its MODEL_INSTANCES (likewise)
    version_policy: str = "all"  # which of its versions are served (VERSION_POLICY, canonical: settings.version_policy)


@dataclass(frozen=True)
class SequenceRef:
    """Triton's sequence extension: ``id`` (as text), start and end flags."""

    id: str
    start: bool = False
    end: bool = False
    import_blob: bytes | None = None  # start from this signed session blob (Sessions.Export) instead of zeros
    export: bool = False  # return the signed blob of the state after this request


@dataclass(frozen=True)
class InferResult:
    """One v2 inference: the outputs asked for, how many inferences it counted (texts for a batch of texts)
    and, for stateful models, the steps behind the answer (a sequence's running total)."""

    model: str
    version: int
    outputs: list[Tensor]
    inferences: int
    steps: int | None = None
    session_blob: bytes | None = None  # the sequence's state after the request, signed (when asked to export)


@dataclass(frozen=True)
class Duration:
    count: int = 0
    ns: int = 0

    def __add__(self, other: Duration) -> Duration:
        return Duration(self.count + other.count, self.ns + other.ns)


@dataclass(frozen=True)
class BatchStats:
    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True)
class ModelStats:
    """Triton's statistics extension for one model version (cumulative since it loaded)."""

    name: str
    version: int
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batches: list[BatchStats]
    cache_hit: Duration = Duration()
    cache_miss: Duration = Duration()


class DataPlane(Protocol):
    """Everything a transport may ask of the core. Raises only ``service.errors.SeqServeError`` subclasses
    for caller mistakes; anything else is a bug and becomes INTERNAL at the edge."""

    async def ready(self) -> bool:
        """True once started with at least one model loaded, false again while stopping."""
        ...

    async def capabilities(self) -> set[str]:
        """What the ready models can do ("classify", "generate", "forecast"): per-service health."""
        ...

    async def store_up(self) -> bool:
        """Whether the session store answered its last check (health of the Sessions service)."""
        ...

    async def models(self) -> list[ModelInfo]: ...

    async def unloaded(self) -> list[str]:
        """Models unloaded on request (shown as UNAVAILABLE by a repository index)."""
        ...

    async def model_info(self, model: ModelRef) -> ModelInfo: ...

    async def model_metadata(self, model: ModelRef) -> ModelMetadata: ...

    async def statistics(self, model: ModelRef | None) -> list[ModelStats]:
        """All versions of ``model`` (or one when it names a version); every loaded version when None."""
        ...

    async def load_model(self, name: str, serving: dict[str, object] | None = None) -> None:
        """(Re)loads every version of ``name`` from the repository; changed weights are reloaded. ``serving``:
        per-model settings over its serving.json until the next load (a load's config)."""
        ...

    async def unload_model(self, name: str) -> None:
        """Stops new requests to ``name``, lets in-flight ones finish, then frees every version."""
        ...

    async def log_settings(self, changes: dict[str, Any] | None = None) -> dict[str, bool | int | str]:
        """The log settings by Triton's names (logging extension); ``changes`` are checked, then applied in every
        process of the server (changing them needs an admin principal)."""
        ...

    async def trace_settings(
        self, model: str | None = None, changes: dict[str, list[str] | None] | None = None
    ) -> dict[str, list[str]]:
        """The trace settings by Triton's names (trace extension), of ``model`` or (None) the server's; ``changes``
        (an empty value clears one) are checked, then applied (changing them needs an admin principal)."""
        ...

    @property
    def regions(self) -> Regions:
        """This process's system shared-memory regions, opened (``core/shm.py``): the tensors of a request that
        names one are read from and written into it here."""
        ...

    async def register_region(self, region: SharedRegion) -> None:
        """Registers a system shared-memory region in every process of the server (needs an admin principal)."""
        ...

    async def unregister_region(self, name: str | None) -> None:
        """Unregisters ``name`` (None: every region) in every process of the server (needs an admin principal)."""
        ...

    async def infer(
        self,
        model: ModelRef,
        inputs: Sequence[InputTensor],
        outputs: list[str] | None = None,
        sequence: SequenceRef | None = None,
        classes: dict[str, int] | None = None,
        timeout: float | None = None,
    ) -> InferResult:
        """The v2 inference: inputs checked against the task's contract (then decoded), ``outputs`` (None = all,
        in the contract's order). With ``sequence`` the model's state lives on between calls (Triton's sequence
        extension). ``classes`` (output name -> count): those outputs come back as their top classes (Triton's
        classification extension). ``timeout`` (seconds; Triton's request parameter): not answered within it, the
        request's work is cancelled and it fails DeadlineExceeded (counted a failure, as for a gRPC deadline)."""
        ...

    async def classify(self, model: ModelRef, texts: list[str]) -> list[SentimentResult]: ...

    def complete(
        self, model: ModelRef, prompt: str, params: SamplingParams, session_id: str | None = None
    ) -> AsyncGenerator[CompletionChunk, None]:
        """Streams generated text. With a session, the prompt advances the session's state first and the
        generated text is appended to it too, so the next call continues the conversation."""
        ...

    async def suggest(
        self,
        session_id: str,
        appended: str,
        *,
        reset: bool = False,
        n: int = 3,
        max_chars: int = 10,
        beam: bool = True,
        backspace: int = 0,
    ) -> SuggestResult:
        """Advances the session by ``appended`` only (O(appended)), after taking ``backspace`` characters back,
        then returns ``n`` continuations of up to ``max_chars`` characters, likeliest first (a beam search of width
        ``n``: approximate, so the first can change with ``n``). Suggestions do not advance the session."""
        ...

    async def char_step(
        self, model: ModelRef, text: str, *, session_id: str | None = None, num_chars: int = 0
    ) -> CharStep: ...

    async def forecast(
        self, model: ModelRef, history: FloatArray, *, columns: Sequence[str] | None = None
    ) -> ForecastResult:
        """Stateless: ``history`` is (rows, features) in original units, oldest first; ``columns``: the names of
        its values (the model takes its own by name, in any order), None = the model's order."""
        ...

    async def observe(
        self, session_id: str, rows: FloatArray, *, columns: Sequence[str] | None = None
    ) -> ForecastResult:
        """Appends rows (original units) to a forecasting session and forecasts from its newest row."""
        ...

    async def create_session(self, model: ModelRef, ttl_seconds: float | None = None) -> SessionInfo:
        """A new session with a random id (192 bits)."""
        ...

    async def get_session(self, session_id: str) -> SessionInfo: ...

    async def fork_session(self, session_id: str, ttl_seconds: float | None = None) -> SessionInfo: ...

    async def delete_session(self, session_id: str) -> None: ...

    async def export_session(self, session_id: str) -> tuple[bytes, SessionInfo]:
        """The session as a signed blob (and its info); FailedPrecondition when no signing key is set."""
        ...

    async def import_session(self, blob: bytes, ttl_seconds: float | None = None) -> SessionInfo:
        """A new session from a blob ``export_session`` made here or on a server with the same key and model."""
        ...
