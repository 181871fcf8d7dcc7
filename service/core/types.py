"""Transport-free request/response types of the data plane, and the data plane's interface.

Servicers (ours in ``service/api/servicers``, the KServe v2 one, the CLI client) convert protobuf to these
types, await one ``DataPlane`` call, and convert back. Nothing here knows about gRPC or protobuf.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


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
    """One piece of a streamed completion. The last chunk has ``finish_reason`` set (and may be empty)."""

    text: str
    finish_reason: Literal["length", "stop", "cancelled"] | None = None


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


class DataPlane(Protocol):
    """Everything a transport may ask of the core. Raises only ``service.errors.SeqServeError`` subclasses
    for caller mistakes; anything else is a bug and becomes INTERNAL at the edge."""

    def models(self) -> list[ModelInfo]: ...

    def model_info(self, model: ModelRef) -> ModelInfo: ...

    async def classify(self, model: ModelRef, texts: list[str]) -> list[SentimentResult]: ...

    def complete(
        self, model: ModelRef, prompt: str, params: SamplingParams, session_id: str | None = None
    ) -> AsyncIterator[CompletionChunk]:
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
    ) -> SuggestResult:
        """Advances the session by ``appended`` only (O(appended)), then returns the ``n`` most likely
        continuations of up to ``max_chars`` characters. Suggestions do not advance the session."""
        ...

    async def char_step(
        self, model: ModelRef, text: str, *, session_id: str | None = None, num_chars: int = 0
    ) -> CharStep: ...

    async def forecast(self, model: ModelRef, history: FloatArray) -> ForecastResult:
        """Stateless: ``history`` is (rows, features) in original units, oldest first."""
        ...

    async def observe(self, session_id: str, rows: FloatArray) -> ForecastResult:
        """Appends rows (original units) to a forecasting session and forecasts from its newest row."""
        ...

    async def create_session(
        self, model: ModelRef, ttl_seconds: float | None = None, session_id: str | None = None
    ) -> SessionInfo:
        """``session_id`` lets internal callers (KServe sequences) choose the key; the public API never
        passes it, so public ids are always random (>= 128 bits)."""
        ...

    async def get_session(self, session_id: str) -> SessionInfo: ...

    async def fork_session(self, session_id: str, ttl_seconds: float | None = None) -> SessionInfo: ...

    async def delete_session(self, session_id: str) -> None: ...

    async def reset_session(self, session_id: str) -> SessionInfo:
        """Back to the initial state, same id and model version."""
        ...
