"""How the in-memory store keeps an idle session: one ``bytes`` with every array, plus its scalars (``Compact``).

A ``SessionState`` kept as it is costs about 1.7 KiB of Python objects on top of a char LM's 4.3 KiB of state
(three dicts, an ndarray header per array, the record itself); this form keeps the arrays in one allocation,
the array layout and the metadata interned (every session of a model version shares them), and costs ~0.6 KiB.
``unpack`` hands out read-only numpy views of that buffer: nothing is copied, and sessions' arrays are never
changed in place anyway (a step replaces them).

A record is a plain tuple of strings, numbers, bytes and tuples of them (numpy dtypes are not tracked either), not
a class instance: CPython's garbage collector stops tracking such a tuple at its first young collection, so idle
sessions add nothing to what every full collection walks. As instances they were one tracked object each (two
with the store's bookkeeping), and a full collection of an engine holding 250,000 sessions stalled its event loop
for ~300 ms (``bench.sessions``' p99 at that level).
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


# (id, model, version, model_sha256, task, steps, ttl_seconds, created_at, last_used_at, nbytes, owner, revision,
#  metadata items, layout, buffer)
Compact = tuple[
    str, str, int, str, str, int, float, float, float, int, str, int, tuple[tuple[str, str], ...], Layout, bytes
]


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
    return (
        s.id, s.model, s.version, s.model_sha256, s.task, s.steps, s.ttl_seconds, s.created_at, s.last_used_at,
        s.nbytes, s.owner, s.revision, _intern(tuple(s.metadata.items())), _intern(tuple(spec)), b"".join(parts),
    )  # fmt: skip


def unpack(c: Compact) -> SessionState:
    sid, model, version, sha, task, steps, ttl, created, used, nbytes, owner, revision, metadata, layout, blob = c
    state: dict[str, Any] = {}
    context: dict[str, Any] = {}
    for is_context, name, dtype, shape, offset in layout:
        a = np.ndarray(shape, dtype, buffer=blob, offset=offset)  # a read-only view of the buffer
        (context if is_context else state)[name] = a
    return SessionState(
        sid, model, version, sha, task, state, context, steps, ttl, created, used, nbytes, dict(metadata), owner,
        revision,
    )  # fmt: skip
