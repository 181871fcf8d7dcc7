"""The task protocol: what one kind of model (sentiment, charlm, forecast, ...) must provide to be served.

A task module defines one ``Task`` subclass and registers it (``service/core/tasks/__init__.py``). The registry
builds one instance per loaded model version, after ``check`` accepted its manifest; everything else in the
server looks the task up through ``manifest.task`` and never branches on its name (MLServer picks an ``MLModel``
by ``implementation`` the same way). A task:

- checks the manifest/graph contract at load (``check``) and names the symbolic state sizes (``symbols``);
- sizes a session's state and context (``session_nbytes``) and creates, advances and resets it: the context is
  a dict of named arrays that ``SessionState.to_bytes`` serializes like the recurrent state;
- runs requests: ``infer`` for the Open Inference Protocol, plus the typed calls of the capabilities it offers
  (``Classifier``, ``Generator``, ``Forecaster``) for our own API;
- describes its v2 tensor contract in transport-free terms (``contract``), which the KServe package maps to
  protobuf; inputs are checked against it here, once (``check_inputs``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncGenerator, Container, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from service.core.aio import inline_unless
from service.core.manifest import Manifest
from service.core.types import (
    CharStep,
    CompletionChunk,
    FloatArray,
    ForecastResult,
    InputTensor,
    SamplingParams,
    SentimentResult,
    SuggestResult,
    Tensor,
    TensorContract,
)
from service.errors import InvalidInput, echo, short
from service.settings import Settings

if TYPE_CHECKING:
    from service.core.batching import Batcher
    from service.core.prefixes import PrefixCache
    from service.core.runtime import Runtime
    from service.core.sessions.state import SessionState
    from service.core.stats import StatsBook
    from service.metrics import Metrics

Array = npt.NDArray[Any]


class ModelHandle(Protocol):
    """The loaded model version a task runs on (``service.core.registry.ModelEntry``)."""

    name: str
    version: int
    stats: StatsBook
    prefix_scope: int  # this loaded version's part of the prefix cache's keys
    facts: dict[str, object]  # what the task's ``inspect`` measured at load

    @property
    def manifest(self) -> Manifest: ...

    @property
    def label(self) -> str: ...

    @property
    def runtime(self) -> Runtime: ...

    @property
    def batcher(self) -> Batcher: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def prefixes(self) -> PrefixCache | None: ...


class TaskResult:
    """What ``Task.infer`` returns: every output of the contract by name, the inferences it counts (texts for a
    batch of texts) and, for stateful tasks, the steps behind the answer."""

    __slots__ = ("inferences", "outputs", "steps")

    def __init__(self, outputs: dict[str, Tensor], inferences: int = 1, steps: int | None = None) -> None:
        self.outputs = outputs
        self.inferences = inferences
        self.steps = steps


class Task:
    """Base class of every task. Subclasses set ``name`` and implement ``contract`` and ``infer``."""

    name: ClassVar[str] = ""
    stateful: ClassVar[bool] = False  # whether sessions (and v2 sequences) can carry this task's state
    # Whether a stateless v2 request's answer depends on its inputs alone (no sampling, no clock): then the
    # response cache (RESPONSE_CACHE_BYTES) may answer it again.
    deterministic: ClassVar[bool] = False

    def __init__(self, model: ModelHandle, settings: Settings) -> None:
        self.model = model
        self.settings = settings

    # --- load ---------------------------------------------------------------------------------------------
    @classmethod
    def check(cls, manifest: Manifest) -> None:
        """Raises ValueError (with what to fix) when ``manifest`` cannot be served by this task."""

    @classmethod
    def inspect(cls, manifest: Manifest, runtime: Runtime) -> dict[str, object]:
        """Facts measured on the loaded graph, in the loader's thread (blocking work stays off the event loop);
        the task instance reads them as ``model.facts``."""
        return {}

    @classmethod
    def warmup_input(cls, manifest: Manifest, rows: int) -> dict[str, Array] | None:
        """A valid input of ``rows`` rows for this task's graph (state inputs left out: zeros), which the loader runs
        before the model is READY (``settings.warmup``). None (the default): the model is not run at load."""
        return None

    @classmethod
    def symbols(cls, manifest: Manifest) -> dict[str, int]:
        """Sizes of symbolic state dimensions besides "batch" (e.g. ``{"features": 7}``)."""
        return {}

    # --- v2 inference ---------------------------------------------------------------------------------
    def contract(self) -> TensorContract:
        raise TypeError(f"task {self.name!r} ({type(self).__qualname__}) does not define contract()")

    async def infer(self, inputs: dict[str, Tensor], session: SessionState | None) -> TaskResult:
        """Runs one checked request; with ``session``, advances it in place (the caller saves it)."""
        raise TypeError(f"task {self.name!r} ({type(self).__qualname__}) does not define infer()")

    async def check_texts(self, texts: list[str], field: str) -> None:
        """Refuses a text request this task would refuse (InvalidInput), without running it: the response cache
        answers a classify request's kept texts without the task, and must refuse what the task would (the
        count here; a task with more limits checks them too)."""
        check_text_count(texts, field, self.settings.max_texts_per_request)

    # --- sessions -----------------------------------------------------------------------------------------
    def session_nbytes(self) -> int:
        """Bytes a session of this model reserves: its state plus the largest context it can hold."""
        return sum(int(v.nbytes) for v in self.model.runtime.zero_states(1).values())

    def initial_state(self) -> dict[str, Array]:
        """The state of a new (or reset) session: zeros, batch of one."""
        return self.model.runtime.zero_states(1)

    def context_shapes(self) -> dict[str, tuple[Container[int], ...]]:
        """What a session of this model may keep beside its state: name -> the lengths each axis may have; every
        value float32 and finite. An imported session must fit (``service.core.pinning.importable``)."""
        return {}

    def context_problem(self, context: dict[str, Array], steps: int) -> str:
        """Why an imported session's ``context``, each array of a shape ``context_shapes`` allows, still cannot
        continue on this model after ``steps`` steps (arrays that must agree with each other); "" when it can."""
        return ""

    def check_session(self) -> None:
        """Raises FailedPrecondition when this model version cannot hold sessions (stateless or unsupported)."""

    @property
    def prefix_cached(self) -> bool:
        """Whether calls without a session reuse the prefix cache's states (``service/core/prefixes.py``)."""
        return False

    def config_parameters(self) -> dict[str, str]:
        """What a client needs to know beyond the tensor shapes (ModelConfig ``parameters``): whether calls
        without a sequence reuse the prefix cache, and what a task adds."""
        return {"prefix_cache": "true" if self.prefix_cached else "false"}


# --- capabilities: the typed calls of our own API -------------------------------------------------------------
@runtime_checkable
class Classifier(Protocol):
    async def classify(self, texts: list[str]) -> list[SentimentResult]: ...


@runtime_checkable
class Generator(Protocol):
    """A character language model: streamed completion, keystroke suggestions, one step with its distribution."""

    def complete(
        self, session: SessionState | None, prompt: str, params: SamplingParams
    ) -> AsyncGenerator[CompletionChunk, None]: ...

    async def suggest(
        self, session: SessionState, appended: str, reset: bool, n: int, max_chars: int, beam: bool, backspace: int = 0
    ) -> SuggestResult: ...

    async def char_step(self, session: SessionState | None, text: str, num_chars: int) -> CharStep: ...


@runtime_checkable
class Forecaster(Protocol):
    async def predict(self, history: FloatArray, columns: Sequence[str] | None = None) -> ForecastResult: ...

    async def observe(
        self, session: SessionState, rows: FloatArray, columns: Sequence[str] | None = None
    ) -> ForecastResult: ...


# Capability name -> protocol. Servicers name the capability they need; health and errors use these names.
CAPABILITIES: dict[str, type] = {"classify": Classifier, "generate": Generator, "forecast": Forecaster}
CAPABILITY_NOUNS = {
    "classify": "a text classifier",
    "generate": "a character language model",
    "forecast": "a forecaster",
}


def capabilities_of(task: Task) -> frozenset[str]:
    return frozenset(name for name, proto in CAPABILITIES.items() if isinstance(task, proto))


def needs(capability: str) -> str:
    """ "a text classifier (task 'sentiment')": what a call needs, naming the registered tasks that offer it."""
    offering = sorted(name for name, cls in TASKS.items() if issubclass(cls, CAPABILITIES[capability]))
    tasks = ", ".join(repr(t) for t in offering) or "none loaded"
    return f"{CAPABILITY_NOUNS[capability]} (task {tasks})"


# --- validation shared by every task: one message per rule ----------------------------------------------------
DECODE_INLINE_ELEMENTS = 1 << 16  # inputs with more elements than this are decoded in a worker thread


async def check_and_decode(model: str, contract: TensorContract, inputs: Sequence[InputTensor]) -> dict[str, Tensor]:
    """``check_inputs`` with the decoding of large inputs moved off the event loop."""
    checked = check_header(model, contract, inputs)
    elements = sum(math.prod(t.shape) for t in checked.values())
    return await inline_unless(elements > DECODE_INLINE_ELEMENTS, _decode_all, checked)


def _decode_all(checked: dict[str, InputTensor]) -> dict[str, Tensor]:
    return {name: t.decode() for name, t in checked.items()}


def check_inputs(model: str, contract: TensorContract, inputs: Sequence[InputTensor]) -> dict[str, Tensor]:
    """Names, datatypes and shapes of v2 inputs against ``contract`` (before any data is decoded), then the
    decoded tensors by name. Every error names the tensor."""
    return _decode_all(check_header(model, contract, inputs))


def check_header(model: str, contract: TensorContract, inputs: Sequence[InputTensor]) -> dict[str, InputTensor]:
    """Names, datatypes, shapes and size limits of v2 inputs against ``contract``; nothing is decoded."""
    known = contract.inputs_by_name
    seen: dict[str, InputTensor] = {}
    for t in inputs:
        if t.name not in known:
            expected = ", ".join(d.describe() for d in contract.inputs)
            raise InvalidInput(f"model {model} has no input {echo(t.name)}; inputs are {expected}")
        if t.name in seen:
            raise InvalidInput(f"input {t.name} appears twice")
        seen[t.name] = t
    for d in contract.inputs:
        found = seen.get(d.name)
        if found is None:
            if d.optional:
                continue
            raise InvalidInput(f"model {model}: missing input {d.describe()}")
        t = found
        if t.datatype != d.datatype and t.datatype not in d.also_accepts:
            allowed = " or ".join((d.datatype, *d.also_accepts))
            raise InvalidInput(f"input {d.name}: datatype must be {allowed}, got {short(t.datatype, 16)}")
        ok = len(t.shape) == len(d.shape) and all(w in (-1, s) for w, s in zip(d.shape, t.shape, strict=True))
        if not ok:
            raise InvalidInput(f"input {d.name}: shape must be {list(d.shape)} (-1 = any), got {list(t.shape)[:8]}")
        for i, (limit, size) in enumerate(zip(d.max_shape, t.shape, strict=False)):
            if limit and size > limit:
                why = f" ({d.limit_name})" if d.limit_name else ""
                raise InvalidInput(f"input {d.name}: dimension {i} is {size}; at most {limit}{why}")
    return seen


def utf8_items(t: Tensor) -> list[str]:
    try:
        return [b.decode("utf-8") for b in t.items or []]
    except UnicodeDecodeError as e:
        raise InvalidInput(f"input {t.name}: element is not valid UTF-8 ({e.reason} at byte {e.start})") from e


def bytes_tensor(name: str, values: list[str]) -> Tensor:
    return Tensor(name, "BYTES", (len(values),), items=[v.encode() for v in values])


def fp32_tensor(name: str, value: npt.NDArray[Any]) -> Tensor:
    array = np.ascontiguousarray(value, dtype=np.float32)
    return Tensor(name, "FP32", tuple(int(d) for d in array.shape), array=array)


def check_int(value: int, field: str, lo: int, hi: int, hint: str = "") -> None:
    if not lo <= value <= hi:
        raise InvalidInput(f"{field} must be between {lo} and {hi}{hint}; got {value}")


def check_float(value: float, field: str, lo: float, hi: float) -> None:
    if not math.isfinite(value) or not lo <= value <= hi:
        raise InvalidInput(f"{field} must be a finite number between {lo:g} and {hi:g}; got {value}")


def check_text_count(texts: Sequence[str], field: str, limit: int) -> None:
    """A request's number of texts: at least one, at most ``limit`` (``max_texts_per_request``)."""
    if not texts:
        raise InvalidInput(f"{field} is empty; send between 1 and {limit} texts")
    if len(texts) > limit:
        raise InvalidInput(f"{field} has {len(texts)} texts; the limit is {limit} (max_texts_per_request)")


def check_text(text: str, field: str, max_chars: int, allow_empty: bool = False) -> None:
    if len(text) > max_chars:
        raise InvalidInput(f"{field} has {len(text)} characters; the limit is {max_chars} (max_chars_per_text)")
    if not allow_empty and not text.strip():
        raise InvalidInput(f"{field} is empty; send at least one non-blank character")


# --- the table: manifest.task -> Task class ----------------------------------------------------------------
TASKS: dict[str, type[Task]] = {}
log = logging.getLogger(__name__)


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: makes ``cls`` serve manifests whose ``task`` is ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} needs a non-empty name")
    old = TASKS.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        log.warning(  # (a module imported again registers its own class again: not worth a word)
            "task %r: %s.%s replaces %s.%s, registered before under that name: every model whose manifest says "
            "task %r is now served by it; give the new task another name unless it is meant to replace the old",
            cls.name, cls.__module__, cls.__qualname__, old.__module__, old.__qualname__, cls.name,
        )  # fmt: skip
    TASKS[cls.name] = cls
    return cls


_OWN = __name__.rpartition(".")[0] + "."  # "service.core.tasks.": seqserve's own tasks' package


def is_builtin(cls: type) -> bool:
    """Whether a task class is one of seqserve's own (defined in this package), not a plugin's."""
    return cls.__module__.startswith(_OWN)


def builtin_task(name: str) -> bool:
    """Whether the task registered as ``name`` is one of seqserve's own (not a plugin's, nor one replacing it)."""
    cls = TASKS.get(name)
    return cls is not None and is_builtin(cls)


def task_class(name: str) -> type[Task]:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"manifest.task {name!r} is not a task this server knows ({', '.join(sorted(TASKS))}); "
            "fix the manifest, or load the module that registers it (SEQSERVE_PLUGINS)"
        ) from None
