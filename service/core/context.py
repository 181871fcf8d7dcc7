"""Request-scoped facts: what the edge tells the core (the caller's principal) and what the core learns while
serving one call, for the edge to read afterwards (the model it served, whether the call was admitted).

A transport opens a scope (``call_scope``) around each call; the core notes the model it resolved
(``note_model``), which the request itself may not name: calls addressed by a session id, or that use the
default model. The gRPC edge's metrics use it as the ``model`` label. A plain ``ContextVar``: no
transport types here, and a call outside any scope notes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING

from service.errors import PermissionDenied, principal_ref

if TYPE_CHECKING:
    from service.core.traces import Trace

_CALL_MODEL: ContextVar[list[str] | None] = ContextVar("seqserve_call_model", default=None)


def call_scope() -> list[str]:
    """Starts a scope for the current call (its own asyncio task / context); returns the holder to read."""
    holder: list[str] = []
    _CALL_MODEL.set(holder)
    return holder


def note_model(name: str) -> None:
    """Records the model serving the current call (the first one noted wins)."""
    holder = _CALL_MODEL.get()
    if holder is not None and not holder:
        holder.append(name)


# --- who is calling -------------------------------------------------------------------------------------------
# The principal the edge authenticated (an API key's name, an mTLS subject); "" = anonymous (no auth configured).
# The session manager stamps it on every session it creates and answers "unknown" to every other principal.
_PRINCIPAL: ContextVar[str] = ContextVar("seqserve_principal", default="")


def set_principal(name: str) -> None:
    """Called by the transport once per call, before the core runs."""
    _PRINCIPAL.set(name)


def principal() -> str:
    return _PRINCIPAL.get()


def check_admin(admins: Sequence[str], action: str, also: str | None = None) -> None:
    """Model management and log and trace settings change what every caller sees: the anonymous principal (no
    credentials configured) or one of ``admins`` (``ADMIN_PRINCIPALS``) only, else ``PermissionDenied``. The core
    checks each such call; a frontend may check first too, before it reads the request's details. ``also``: the
    other setting whose principals ``admins`` holds too (named in the refusal)."""
    who = principal()
    if who and who not in admins:
        other = f"{also} (SEQSERVE_{also.upper()}) or " if also else ""
        raise PermissionDenied(
            f"{principal_ref(who)} may not {action}; list it in {other}admin_principals (SEQSERVE_ADMIN_PRINCIPALS) "
            "to allow it"
        )


# --- priority level (Triton's schedule-policy extension) -------------------------------------------------------
# The level the edge resolved for this call's requests (1 = highest); None = the server's default level. The
# batcher queues a request ahead of every waiting request of a lower level (a higher number).
_PRIORITY: ContextVar[int | None] = ContextVar("seqserve_priority", default=None)


def set_priority(level: int | None) -> Token[int | None]:
    return _PRIORITY.set(level)


def reset_priority(token: Token[int | None]) -> None:
    with contextlib.suppress(ValueError):  # (reset from another context: nothing of this call's to undo)
        _PRIORITY.reset(token)


def priority() -> int | None:
    return _PRIORITY.get()


# --- admission ------------------------------------------------------------------------------------------------
# A call that passed admission (its first queued step was accepted) is never refused a later step for a full
# queue: a stream, once admitted, runs to its end or its deadline. Set in the call's own context.
_ADMITTED: ContextVar[bool] = ContextVar("seqserve_admitted", default=False)


def admitted() -> bool:
    return _ADMITTED.get()


def mark_admitted() -> None:
    if not _ADMITTED.get():
        _ADMITTED.set(True)


# --- what a session call commits ------------------------------------------------------------------------------
# Facts a task learns from a session step that count only once the step is stored (the live interval coverage of
# the rows an Observe scored): the session manager opens a scope around each session call and runs them after the
# save (or the sequence's end) went through; a refused or failed call drops them, so a retried call counts once.
_AFTER_COMMIT: ContextVar[list[Callable[[], None]] | None] = ContextVar("seqserve_after_commit", default=None)


def after_commit(action: Callable[[], None]) -> None:
    """Runs ``action`` once the current session call's state is stored (at once outside a session call)."""
    pending = _AFTER_COMMIT.get()
    if pending is None:
        action()
    else:
        pending.append(action)


class CommitScope:
    """One session call's scope: opened when the call has its session, closed with whether its state was stored
    (then the actions noted meanwhile run; else they are dropped)."""

    __slots__ = ("_pending", "_token")

    def __init__(self) -> None:
        self._pending: list[Callable[[], None]] = []
        self._token = _AFTER_COMMIT.set(self._pending)

    def close(self, committed: bool) -> None:
        with contextlib.suppress(ValueError):  # closed from another context (an abandoned stream finalized elsewhere)
            _AFTER_COMMIT.reset(self._token)
        if committed:
            for action in self._pending:
                action()


# --- model runs of the request being counted -----------------------------------------------------------------
# A request (``stats.CountedRequest``) counts in queue and compute statistics once if any of its steps went to a
# batcher, with the time its runs added here, and only when it succeeds (as Triton's statistics: a failed request
# counts in ``fail`` alone). Shared by tasks it spawns. It also carries the request's trace (``traces.Trace``),
# when it is traced, for the batcher to stamp its runs.
class Runs:
    __slots__ = ("count", "infer_ns", "input_ns", "output_ns", "queue_ns", "trace")

    def __init__(self, trace: Trace | None = None) -> None:
        self.count = 0
        self.queue_ns = self.input_ns = self.infer_ns = self.output_ns = 0
        self.trace = trace


_RUNS: ContextVar[Runs | None] = ContextVar("seqserve_runs", default=None)


def count_runs(trace: Trace | None = None) -> tuple[Runs, Token[Runs | None]]:
    """Starts counting this context's steps: (the counter, the token that ends it)."""
    runs = Runs(trace)
    return runs, _RUNS.set(runs)


def end_runs(token: Token[Runs | None]) -> None:
    """Stops counting (``count_runs``' token); nothing to undo when the request ends in another context."""
    with contextlib.suppress(ValueError):
        _RUNS.reset(token)


def note_run() -> Runs | None:
    """A step of the current request was queued for a model run (``Batcher.submit``): the request's counter, to
    which the batcher adds the run's times (None outside a counted request: a warm-up)."""
    runs = _RUNS.get()
    if runs is not None:
        runs.count += 1
    return runs
