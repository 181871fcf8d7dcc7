"""KServe v2 ``infer``: one stateless inference, or one step of a sequence (Triton's sequence parameters).

A sequence is a session keyed by the caller's ``sequence_id`` (namespaced per principal): ``sequence_start``
creates it (or replaces a running one), each request advances it by one step and ``sequence_end`` deletes it
once answered. A running sequence that names no version stays on the version and weights it started with
(``_continue``: one lease, one load and one save per step). ``seqserve_export`` / ``seqserve_import`` carry a
sequence's state between servers as a signed blob.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Sequence

import numpy as np

from service.core import pinning
from service.core.context import note_model, principal
from service.core.registry import ModelEntry, ModelRegistry
from service.core.responses import ResponseCache, kept_result
from service.core.sessions import SessionManager, SessionState
from service.core.sessions.export import Exported, seal
from service.core.stats import CountedRequest
from service.core.tasks.base import TaskResult, check_and_decode, is_builtin
from service.core.types import (
    InferResult,
    InputTensor,
    ModelRef,
    SequenceRef,
    Tensor,
    TensorContract,
    TensorDef,
)
from service.errors import FailedPrecondition, InvalidInput, SeqServeError, SessionEvicted, SessionNotFound, echo
from service.settings import Settings


class V2Inference:
    """``CoreDataPlane.infer``'s implementation, over the data plane's registry and session manager."""

    def __init__(
        self, settings: Settings, registry: ModelRegistry, sessions: SessionManager, responses: ResponseCache
    ) -> None:
        self.settings, self.registry, self.sessions, self.responses = settings, registry, sessions, responses
        self._contracts: weakref.WeakKeyDictionary[ModelEntry, TensorContract] = weakref.WeakKeyDictionary()

    def _contract(self, entry: ModelEntry) -> TensorContract:
        """The task's v2 contract, built once per loaded version (not once per request), and with it its lookups
        by name (``TensorContract``'s cached properties)."""
        found = self._contracts.get(entry)
        if found is None:
            found = self._contracts[entry] = entry.task.contract()
        return found

    def _sequence_id(self, model: str, seq: SequenceRef) -> str:
        """The session key of a v2 sequence, namespaced per principal: two callers' sequence 1 never meet.
        (The session records its owner too; the namespace keeps a ``sequence_start`` from replacing another
        principal's sequence.)"""
        owner = principal()
        model = model.replace("%", "%25").replace(":", "%3A")  # a model named "a:b" never meets model "a"'s ids
        if not owner:
            return f"kserve:{model}:{seq.id}"
        return f"kserve:{hashlib.sha256(owner.encode()).hexdigest()[:24]}:{model}:{seq.id}"

    def _unknown_sequence(self, model: str, seq: SequenceRef, cause: SessionNotFound) -> SessionNotFound:
        if isinstance(cause, SessionEvicted):
            return SessionEvicted(
                f"sequence {echo(seq.id)} of model {model} was evicted to make room (the session store was full and "
                "it was the least recently used); send sequence_start=true to begin it again"
            )
        return SessionNotFound(
            f"sequence {echo(seq.id)} of model {model} is unknown or expired (sequences expire after "
            f"{self.settings.sequence_idle_seconds:g}s idle, end with sequence_end, and may be evicted when the "
            "session store is full); send sequence_start=true to begin it (as Triton says: a request must specify "
            "the START flag on the first request of the sequence)"
        )

    async def infer(
        self,
        model: ModelRef,
        inputs: Sequence[InputTensor],
        outputs: list[str] | None = None,
        sequence: SequenceRef | None = None,
        classes: dict[str, int] | None = None,
    ) -> InferResult:
        imported: Exported | None = None
        if sequence is not None and (sequence.export or sequence.import_blob is not None):
            pinning.signing_key(self.settings)  # refused before the sequence moves when export/import is off
        if sequence is not None and sequence.import_blob is not None:
            if not sequence.start:
                raise InvalidInput("parameter seqserve_import starts a sequence: send it with sequence_start=true")
            imported, entry = pinning.importable(
                self.registry, sequence.import_blob, pinning.signing_key(self.settings), self.registry.find(model).name
            )
            if model.version not in (None, entry.version):
                raise FailedPrecondition(
                    f"the session blob holds model {entry.name} version {entry.version}, but the request names "
                    f"version {model.version}; leave the version empty"
                )
        elif (
            sequence is not None
            and not sequence.start
            and model.version is None
            and self._contract(found := self.registry.find(model)).sequences
        ):
            # A running sequence stays on the version (and weights) it started with, even when a newer one loaded
            # since; FAILED_PRECONDITION when that version is gone or its weights changed. (A stateless model's
            # request goes on below, to be refused as such: it was told its sequence was unknown, "send
            # sequence_start=true", which it then refused as stateless.)
            return await self._continue(found.name, inputs, outputs, sequence, classes)
        else:
            entry = self.registry.resolve(model)
        note_model(entry.name)
        with CountedRequest(entry) as req:
            tensors, wanted = await self._checked(entry, inputs, outputs, sequence, classes)
            if sequence is None and self.responses.serves(entry):
                key = self.responses.key(entry.prefix_scope, principal(), tensors, wanted, classes or {})
                answer, hit = await self.responses.answer(
                    entry, key, lambda: self._stateless(entry, tensors, wanted, classes), kept_result
                )
                req.inferences = 0 if hit else answer.inferences  # Triton: a hit is no inference of the model's
                return answer
            blob = None
            if sequence is None:
                result = self._returned(entry, await entry.task.infer(tensors, None), wanted)
            else:
                result, blob = await self._infer_sequence(entry, tensors, wanted, sequence, imported)
            req.inferences = result.inferences
        return self._result(entry, result, wanted, classes, blob)

    async def _stateless(
        self, entry: ModelEntry, tensors: dict[str, Tensor], wanted: list[str], classes: dict[str, int] | None
    ) -> InferResult:
        return self._result(
            entry, self._returned(entry, await entry.task.infer(tensors, None), wanted), wanted, classes, None
        )

    def _returned(self, entry: ModelEntry, result: object, wanted: list[str]) -> TaskResult:
        """``result`` when it is what a task's ``infer`` must return, with every ``wanted`` output; else
        RuntimeError naming the task. Checked here, before the session is saved (checked after the save, a
        sequence had advanced when its request failed). A plugin's outputs are checked against its contract too
        (its bug was sent as a success); seqserve's own tasks build theirs from the contract, and their load checks
        hold the graph to the manifest: not on every step."""
        if not isinstance(result, TaskResult):
            raise RuntimeError(
                f"task {entry.task.name!r} of model {entry.label} returned {type(result).__name__} from infer(), "
                "not a TaskResult (docs/architecture.md, Writing one)"
            )
        missing = [n for n in wanted if n not in result.outputs]
        if missing:  # (a plugin task's bug: a bare KeyError in the log before)
            raise RuntimeError(
                f"task {entry.task.name!r} of model {entry.label} returned no output {', '.join(missing)} (it "
                f"returned {sorted(result.outputs)}; its contract declares {self._contract(entry).output_names})"
            )
        if not is_builtin(type(entry.task)):
            defs = self._contract(entry).outputs_by_name
            for name, t in result.outputs.items():
                d = defs.get(name)
                wrong = None if d is None else misfit(name, t, d)
                if d is not None and wrong is not None:
                    raise RuntimeError(
                        f"task {entry.task.name!r} of model {entry.label} returned output {name} with {wrong}; its "
                        f"contract declares {d.describe()} (its model's metadata says so): fix the task's infer() or "
                        "the model's manifest"
                    )
        return result

    def _result(
        self,
        entry: ModelEntry,
        result: TaskResult,
        wanted: list[str],
        classes: dict[str, int] | None,
        blob: bytes | None,
    ) -> InferResult:
        """The answer: the wanted outputs (``_returned`` checked that they are there), those named in ``classes``
        as their top classes."""
        tensors = [result.outputs[n] for n in wanted]
        if classes:
            defs = self._contract(entry).outputs_by_name
            tensors = [
                top_classes(t, classes[t.name], defs[t.name].labels) if t.name in classes else t for t in tensors
            ]
        return InferResult(entry.name, entry.version, tensors, result.inferences, result.steps, blob)

    async def _checked(
        self,
        entry: ModelEntry,
        inputs: Sequence[InputTensor],
        outputs: list[str] | None,
        seq: SequenceRef | None,
        classes: dict[str, int] | None = None,
    ) -> tuple[dict[str, Tensor], list[str]]:
        """The request checked against the version's contract: decoded inputs and the outputs to return."""
        contract = self._contract(entry)
        names, defs = contract.output_names, contract.outputs_by_name
        wanted = outputs or names
        for name in wanted:
            if name not in defs:
                raise InvalidInput(f"model {entry.name} has no output {echo(name)}; outputs are {', '.join(names)}")
        if len(set(wanted)) < len(wanted):
            twice = next(n for n in wanted if wanted.count(n) > 1)
            raise InvalidInput(f"output {echo(twice)} is requested twice; name each output once")
        for name in classes or ():
            if name in defs and defs[name].datatype == "BYTES":
                raise InvalidInput(
                    f"output {name} of model {entry.name} holds BYTES: the classification extension (parameter "
                    "classification, tritonclient's class_count) ranks numeric outputs only; request it without "
                    "classification"
                )
        if seq is not None and not contract.sequences:
            raise InvalidInput(
                f"model {entry.name} is stateless: it does not take sequence_id/sequence_start/sequence_end"
            )
        return await check_and_decode(entry.name, contract, inputs), wanted

    def _seal(self, seq: SequenceRef, s: SessionState) -> bytes | None:
        return seal(s, pinning.signing_key(self.settings), self.sessions.clock()) if seq.export else None

    async def _continue(
        self,
        name: str,
        inputs: Sequence[InputTensor],
        outputs: list[str] | None,
        seq: SequenceRef,
        classes: dict[str, int] | None,
    ) -> InferResult:
        """One step of a running sequence that names no version, under one lease: the session says which version
        serves it (``pinned``), the request is checked, the task advances the session and it is saved (or, with
        ``sequence_end``, deleted under the same lease). A request refused before the task ran leaves the session
        untouched (not even its idle time)."""
        sid = self._sequence_id(name, seq)
        use = self.sessions.use(sid, save=False, end=seq.end)
        counted: list[CountedRequest] = []  # (a list: mypyc mistypes an Optional narrowed in the try, in finally)
        ok = False
        try:
            async with use as s:
                entry = pinning.pinned(self.registry, s)
                note_model(entry.name)
                req = CountedRequest(entry)
                counted.append(req)
                tensors, wanted = await self._checked(entry, inputs, outputs, seq, classes)
                use.save = True  # from here on the session is saved (or ended) whatever the task does
                result = self._returned(entry, await entry.task.infer(tensors, s), wanted)
                req.inferences = result.inferences
                blob = self._seal(seq, s)
            ok = True
        except SessionNotFound as exc:
            raise self._unknown_sequence(name, seq, exc) from None
        finally:
            if not counted and not ok:  # refused before its version was known (an unknown sequence, a version gone)
                refused = self._refused(name)
                if refused is not None:
                    counted.append(refused)
            for r in counted:
                r.finish(ok)
        return self._result(entry, result, wanted, classes, blob)

    def _refused(self, name: str) -> CountedRequest | None:
        """A request for model ``name`` refused before it had a version: counted (a failure) on the version a new
        sequence would start on, as a request that named that version is; None when none serves."""
        try:
            return CountedRequest(self.registry.resolve(ModelRef(name)))
        except SeqServeError:
            return None

    async def _infer_sequence(
        self,
        entry: ModelEntry,
        tensors: dict[str, Tensor],
        wanted: list[str],
        seq: SequenceRef,
        imported: Exported | None,
    ) -> tuple[TaskResult, bytes | None]:
        """One step of a sequence; with ``seq.export`` also the signed blob of the state after it.

        A start (or an import) runs its first step on the new session before storing it, under the id's lease
        (``SessionManager.begin``): a refused start leaves a running sequence with that id as it was, and
        concurrent starts on one id each begin from the initial state."""
        sid = self._sequence_id(entry.name, seq)
        if imported is not None or seq.start:
            ttl = self.settings.sequence_idle_seconds
            if imported is not None:
                fresh, event = pinning.adopted(self.sessions, imported, entry, ttl, sid), "imported"
            else:
                fresh, event = pinning.new_session(self.sessions, entry, ttl, sid), "created"
            async with self.sessions.begin(fresh, event, end=seq.end) as s:
                result = self._returned(entry, await entry.task.infer(tensors, s), wanted)
                blob = self._seal(seq, s)
            return result, blob
        use = self.sessions.use(sid, save=False, end=seq.end)
        try:
            async with use as s:  # the request is counted by infer()
                # A running sequence reaches here only when the request names a version (``infer`` sends the others
                # to ``_continue``), and its id names the model (``_sequence_id``): only the version can differ.
                if s.version != entry.version:
                    raise FailedPrecondition(
                        f"sequence {echo(seq.id)} of model {entry.name} runs on version {s.version}, not "
                        f"{entry.version}; leave model_version empty or send {s.version}"
                    )
                pinning.fits(self.registry, s, None, None)
                use.save = True  # checked: from here on the session is saved (or ended) whatever the task does
                result = self._returned(entry, await entry.task.infer(tensors, s), wanted)
                blob = self._seal(seq, s)
            return result, blob
        except SessionNotFound as exc:
            raise self._unknown_sequence(entry.name, seq, exc) from None


def misfit(name: str, t: Tensor, d: TensorDef) -> str | None:
    """What is wrong with output ``t``, returned as ``name``, against its declaration ``d`` (name, datatype, rank,
    fixed sizes, and data that fills its shape), or None: a response must say what ModelMetadata promised, as
    Triton checks its outputs against the model's config. (Plain loops: it runs for every output of every step.)"""
    if t.name != name:
        return f"the tensor named {t.name!r}"
    if t.datatype != d.datatype:
        return f"datatype {t.datatype}"
    shape, want = t.shape, d.shape
    if len(shape) != len(want):
        return f"shape {list(shape)}"
    size = 1
    for i in range(len(want)):
        got = shape[i]
        # (0 fits any size: no rows yet, as a forecaster sequence's answer while its window fills, docs/kserve.md)
        if got != want[i] and want[i] != -1 and got != 0:
            return f"shape {list(shape)}"
        size *= got
    a = t.array
    if a is not None:
        if a.shape != shape and a.shape != tuple(shape):
            return f"shape {list(shape)} but an array of shape {list(a.shape)}"
    elif t.items is None or len(t.items) != size:
        return f"shape {list(shape)} but {0 if t.items is None else len(t.items)} items"
    return None


def top_classes(t: Tensor, count: int, labels: tuple[str, ...]) -> Tensor:
    """Triton's classification extension: a numeric output as its ``count`` highest values, each the string
    ``"<value>:<index>[:<label>]"`` (value as C's ``%f`` for floats), highest first, ties by index. An output of
    two or more dimensions is ranked per row of its first (one row per text or step): shape ``[rows, k]``; a
    one-dimensional output as a whole: ``[k]``. ``k`` is ``count``, at most the values a row holds."""
    assert t.array is not None
    a = t.array
    rows = a.reshape(a.shape[0], math.prod(a.shape[1:])) if a.ndim >= 2 else a.reshape(1, a.size)  # (0 rows too)
    k = min(count, rows.shape[1])
    fmt = "{:f}".format if a.dtype.kind == "f" else (lambda v: str(int(v)))
    items = []
    for row in rows:
        for i in np.argsort(-row.astype(np.float64), kind="stable")[:k].tolist():
            text = f"{fmt(row[i].item())}:{i}"
            items.append((f"{text}:{labels[i]}" if i < len(labels) else text).encode())
    shape = (rows.shape[0], k) if a.ndim >= 2 else (k,)
    return Tensor(t.name, "BYTES", shape, items=items)
