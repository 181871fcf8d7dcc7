"""Which loaded model version a session belongs to, and the session records made for one.

A session is pinned to the model version and the weights (sha256) it started on. Every call that continues it
finds that version again (``pinned``) and checks the session fits the call (``fits``); a new session
(``new_session``) or one continued from a signed blob (``importable`` + ``adopted``) records the pin. All of it
checks only: nothing here leases, loads or saves a session (``SessionManager`` does).
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import numpy as np

from service.core.context import note_model
from service.core.registry import ModelEntry, ModelRegistry
from service.core.sessions import SessionManager, SessionState
from service.core.sessions.export import Exported, unseal
from service.core.tasks import TASKS
from service.core.tasks.base import needs
from service.core.types import ModelRef
from service.errors import FailedPrecondition, ModelUnavailable, ReplicaBehind, echo, session_ref
from service.settings import Settings

# A session's step count, at most (a signed blob's too): 2^53 - 1, an integer every JSON reader holds exactly. No
# session steps that far (a million steps a second for 285 years); an imported 2^63 - 1 made its next step's count
# overflow the API's int64, failing every later call of that session.
MAX_IMPORTED_STEPS = 2**53 - 1


def pinned(registry: ModelRegistry, s: SessionState) -> ModelEntry:
    """The loaded model a session belongs to: the same version and the same weights, else a clear error."""
    entry = registry.get(s.model, s.version)
    if entry is None and (skipped := registry.skipped(s.model)):
        raise ModelUnavailable(
            f"session {session_ref(s.id)} is pinned to model {s.model} version {s.version}, which is not loaded: "
            f"{skipped}"
        )
    here = registry.behind(s.model, s.version) if entry is None else ""
    if here:
        raise ReplicaBehind(
            f"session {session_ref(s.id)} is pinned to model {s.model} version {s.version}, which this replica "
            f"does not serve ({here}): retry, an updated replica serves it (a rolling update); if that version was "
            "withdrawn, create a new session (KServe: start a new sequence)"
        )
    if entry is None and (policy := registry.left_out(s.model, s.version)):
        raise FailedPrecondition(
            f"session {session_ref(s.id)} is pinned to model {s.model} version {s.version}, which this server does not "
            f"serve now: the model's version_policy is {policy}; the session keeps its state until it expires, and "
            "goes on once a version_policy that chooses its version is back; to go on now, create a new session "
            "(KServe: start a new sequence)"
        )
    if entry is None or not entry.ready:
        raise FailedPrecondition(
            f"session {session_ref(s.id)} is pinned to model {s.model} version {s.version}, which is no longer loaded; "
            "the session keeps its state until it expires, and goes on if that version is loaded again with the same "
            "weights; to go on now, create a new session (KServe: start a new sequence)"
        )
    if entry.sha256 != s.model_sha256:
        raise FailedPrecondition(
            f"session {session_ref(s.id)} is pinned to model {s.model} version {s.version} with weights "
            f"{s.model_sha256[:12]}, which were replaced by {entry.sha256[:12]}; create a new session "
            "(KServe: start a new sequence)"
        )
    return entry


def fits(registry: ModelRegistry, s: SessionState, capability: str | None, model: ModelRef | None) -> ModelEntry:
    """The session's pinned model entry, once the session fits the call: capability, model (when named)."""
    note_model(s.model)
    entry = pinned(registry, s)
    if capability is not None and capability not in entry.capabilities:
        raise FailedPrecondition(
            f"session {session_ref(s.id)} belongs to {s.task!r} model {s.model}; this call needs a session "
            f"of {needs(capability)}"
        )
    if (
        model is not None
        and (model.name or model.version is not None)
        and (model.name not in ("", s.model) or model.version not in (None, s.version))
    ):
        named = (echo(model.name) if model.name else "its model") + (
            f" version {model.version}" if model.version is not None else ""
        )
        raise FailedPrecondition(
            f"session {session_ref(s.id)} belongs to model {s.model} version {s.version}, but the request "
            f"names {named}; omit the model or name the session's"
        )
    return entry


def new_session(sessions: SessionManager, entry: ModelEntry, ttl: float, session_id: str | None) -> SessionState:
    """A fresh session of ``entry`` (its task's initial state), not yet added to the store."""
    task = entry.task
    if not task.stateful:
        stateful = sorted(name for name, cls in TASKS.items() if cls.stateful)
        raise FailedPrecondition(
            f"model {entry.label} is a stateless {task.name!r} model; sessions are for models of the "
            f"stateful tasks ({', '.join(stateful)})"
        )
    task.check_session()
    now = sessions.clock()
    return SessionState(
        id=sessions.new_id(session_id),
        model=entry.name,
        version=entry.version,
        model_sha256=entry.sha256,
        task=task.name,
        state=task.initial_state(),
        context={},
        steps=0,
        ttl_seconds=ttl,
        created_at=now,
        last_used_at=now,
        nbytes=task.session_nbytes(),
        metadata={"task": task.name},
    )


def signing_key(settings: Settings) -> bytes:
    """The key that seals and opens session blobs; FAILED_PRECONDITION when export/import is off."""
    key = settings.session_signing_key
    if key is None:
        raise FailedPrecondition(
            "session export/import is off on this server: set SEQSERVE_SESSION_SIGNING_KEY (the same key on "
            "every server that should accept the blobs)"
        )
    return key.get_secret_value().encode()


def importable(
    registry: ModelRegistry, blob: bytes, key: bytes, model: str | None = None
) -> tuple[Exported, ModelEntry]:
    """The verified blob and the loaded model version (same weights) that can continue it."""
    x = unseal(blob, key)
    if model is not None and model != x.model:
        raise FailedPrecondition(
            f"the session blob holds a session of model {x.model}, not of {echo(model)}; send it to {x.model}"
        )
    entry = registry.get(x.model, x.version)
    if entry is None and (skipped := registry.skipped(x.model)):
        raise ModelUnavailable(
            f"the session blob holds a session of model {x.model} version {x.version}, which is not loaded: {skipped}"
        )
    here = registry.behind(x.model, x.version) if entry is None else ""
    if here:
        raise ReplicaBehind(
            f"the session blob holds a session of model {x.model} version {x.version}, which this replica does "
            f"not serve ({here}): retry, an updated replica serves it (a rolling update), or load that version"
        )
    if entry is None and (policy := registry.left_out(x.model, x.version)):
        raise FailedPrecondition(
            f"the session blob holds a session of model {x.model} version {x.version}, which this server does not "
            f"serve: the model's version_policy is {policy}; import it where that version is served"
        )
    if entry is None or not entry.ready or entry.sha256 != x.model_sha256:
        raise FailedPrecondition(
            f"the session blob holds a session of model {x.model} version {x.version} with weights "
            f"{x.model_sha256[:12]}, which this server does not serve; load that version to import it"
        )
    if not entry.task.stateful:
        raise FailedPrecondition(f"model {entry.label} is stateless: it cannot hold an imported session")
    entry.task.check_session()
    want = {k: (v.shape, v.dtype) for k, v in entry.task.initial_state().items()}
    got = {k: (v.shape, v.dtype) for k, v in x.session.state.items()}
    if want != got:
        raise FailedPrecondition(f"the session blob's state does not fit model {entry.label}: {_misfit(want, got)}")
    for name, value in x.session.state.items():  # (a NaN state answered NaN probabilities, then failed INTERNAL)
        if not np.isfinite(value).all():
            raise FailedPrecondition(
                f"the session blob's state {echo(name)} holds NaN or infinite values: model {entry.label} cannot "
                "continue from it; start a new session (or export it again from a server that serves it)"
            )
    problem = _context_problem(entry.task.context_shapes(), x.session.context, x.session.steps)
    problem = problem or entry.task.context_problem(x.session.context, x.session.steps)
    if problem:
        raise FailedPrecondition(f"the session blob's context does not fit model {entry.label}: {problem}")
    return x, entry


def _misfit(want: dict[str, tuple[Any, Any]], got: dict[str, tuple[Any, Any]]) -> str:
    """How a blob's state arrays (name -> shape, dtype) differ from the model's (it said only "does not fit")."""
    if want.keys() != got.keys():
        extra, missing = sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys())
        return "; ".join(
            [*(["it holds " + ", ".join(map(echo, extra)) + ", which the model's state has not"] if extra else []),
             *(["it lacks " + ", ".join(missing)] if missing else [])]
        )  # fmt: skip
    name = next(k for k in want if want[k] != got[k])
    (ws, wd), (gs, gd) = want[name], got[name]
    return f"state {name} is {gd} {list(gs)}, the model's is {wd} {list(ws)}"


def _context_problem(shapes: dict[str, tuple[Container[int], ...]], context: dict[str, Any], steps: int) -> str:
    """Why a blob's context (signed, but possibly by another build sharing the key) cannot continue on this
    model; "" when it fits. Without this check the import succeeds and every later call fails INTERNAL."""
    if not 0 <= steps <= MAX_IMPORTED_STEPS:  # (2^63 - 1 imported, then every call failed INTERNAL: no int64 after it)
        return f"steps is {steps} (0 to {MAX_IMPORTED_STEPS:,})"
    for name, value in context.items():
        axes = shapes.get(name)
        if axes is None:
            return f"it holds {echo(name)}, which this model's sessions never keep"
        if not isinstance(value, np.ndarray) or value.dtype != np.float32:
            return f"{name} is not a float32 array"
        if value.ndim != len(axes) or any(n not in ok for n, ok in zip(value.shape, axes, strict=True)):
            return f"{name} has shape {list(value.shape)}"
        if not np.isfinite(value).all():
            return f"{name} holds NaN or infinite values"
    return ""


def adopted(
    sessions: SessionManager, x: Exported, entry: ModelEntry, ttl: float, session_id: str | None
) -> SessionState:
    """A new session (new id, TTL, times) holding the blob's state, context and steps."""
    now = sessions.clock()
    src = x.session
    return SessionState(
        id=sessions.new_id(session_id),
        model=entry.name,
        version=entry.version,
        model_sha256=entry.sha256,
        task=entry.task.name,
        state=dict(src.state),
        context=dict(src.context),
        steps=src.steps,
        ttl_seconds=ttl,
        created_at=now,
        last_used_at=now,
        nbytes=entry.task.session_nbytes(),
        metadata={"task": entry.task.name},  # the server's own annotations (new_session's), not the blob's
    )
