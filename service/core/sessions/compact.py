"""How the in-memory store keeps an idle session: one ``bytes`` with every array, plus its scalars (``Compact``).

A ``SessionState`` kept as it is costs about 1.7 KiB of Python objects on top of a char LM's 4.3 KiB of state
(three dicts, an ndarray header per array, the record itself); this form keeps the arrays in one allocation,
the array layout and the metadata interned (every session of a model version shares them), and costs ~0.6 KiB.
``unpack`` hands out read-only numpy views of that buffer: nothing is copied, and sessions' arrays are never
changed in place anyway (a step replaces them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.core.sessions.state import SessionState

Layout = tuple[tuple[bool, str, np.dtype[Any], tuple[int, ...], int], ...]  # (context?, name, dtype, shape, offset)
_ALIGN = 8
_INTERNED: dict[Any, Any] = {}  # layouts and metadata items shared by every session that has them
_MAX_INTERNED = 4096


def _intern(value: Any) -> Any:
    found = _INTERNED.get(value)
    if found is None:
        if len(_INTERNED) >= _MAX_INTERNED:
            _INTERNED.clear()
        found = _INTERNED[value] = value
    return found


class Compact:
    __slots__ = ("blob", "created_at", "id", "last_used_at", "layout", "metadata", "model", "model_sha256",
                 "nbytes", "owner", "revision", "steps", "task", "ttl_seconds", "version")  # fmt: skip

    def __init__(self, s: SessionState, layout: Layout, blob: bytes) -> None:
        self.id, self.model, self.version, self.model_sha256, self.task = (
            s.id,
            s.model,
            s.version,
            s.model_sha256,
            s.task,
        )
        self.steps, self.ttl_seconds, self.created_at, self.last_used_at = (
            s.steps,
            s.ttl_seconds,
            s.created_at,
            s.last_used_at,
        )
        self.nbytes, self.owner, self.revision = s.nbytes, s.owner, s.revision
        self.metadata: tuple[tuple[str, str], ...] = _intern(tuple(s.metadata.items()))
        self.layout, self.blob = layout, blob


def pack(s: SessionState) -> Compact:
    spec: list[tuple[bool, str, np.dtype[Any], tuple[int, ...], int]] = []
    parts: list[bytes] = []
    offset = 0
    for is_context, table in ((False, s.state), (True, s.context)):
        for name, value in table.items():
            a = np.ascontiguousarray(value)
            pad = (-offset) % _ALIGN
            if pad:
                parts.append(b"\0" * pad)
                offset += pad
            spec.append((is_context, name, a.dtype, a.shape, offset))
            parts.append(a.tobytes())
            offset += a.nbytes
    return Compact(s, _intern(tuple(spec)), b"".join(parts))


def unpack(c: Compact) -> SessionState:
    state: dict[str, Any] = {}
    context: dict[str, Any] = {}
    for is_context, name, dtype, shape, offset in c.layout:
        a = np.ndarray(shape, dtype, buffer=c.blob, offset=offset)  # a read-only view of the buffer
        (context if is_context else state)[name] = a
    return SessionState(
        c.id, c.model, c.version, c.model_sha256, c.task, state, context, c.steps, c.ttl_seconds, c.created_at,
        c.last_used_at, c.nbytes, dict(c.metadata), c.owner, c.revision,
    )  # fmt: skip
