"""Request-scoped facts the core learns while serving one call, for the edge to read afterwards.

A transport opens a scope (``call_scope``) around each call; the core notes the model it resolved
(``note_model``), which the request itself may not name: calls addressed by a session id, or that use the
default model. The gRPC metrics interceptor uses it as the ``model`` label. A plain ``ContextVar``: no
transport types here, and a call outside any scope notes nothing.
"""

from __future__ import annotations

from contextvars import ContextVar

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
