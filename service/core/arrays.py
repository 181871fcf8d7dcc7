"""Small array helpers shared by serving and training (numpy only: no torch, no grpc).

One implementation each of what both sides need, so they cannot drift apart: the zero state of a manifest's
state tensors, right-padding of token sequences, softmax, and character sampling (serving's Complete and
``seqserve-train sample`` draw the same characters for the same seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from service.core.manifest import Dim, StateSpec

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
DTYPES: dict[str, type[np.generic]] = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


def resolve_shape(shape: Sequence[Dim], sizes: dict[str, int]) -> tuple[int, ...]:
    """``[2, "batch*features", 64]`` with ``{"batch": 3, "features": 7}`` -> ``(2, 21, 64)``."""
    out: list[int] = []
    for dim in shape:
        if isinstance(dim, int):
            out.append(dim)
            continue
        size = 1
        for sym in dim.split("*"):
            sym = sym.strip()
            if sym not in sizes:
                raise ValueError(f"dimension {dim!r} uses unknown symbol {sym!r} (known: {sorted(sizes)})")
            size *= sizes[sym]
        out.append(size)
    return tuple(out)


def zero_states(states: Sequence[StateSpec], sizes: dict[str, int]) -> dict[str, npt.NDArray[Any]]:
    """Zeros for every state input, keyed by graph input name: ``[layers*dirs, batch(*features), hidden]``."""
    return {s.input: np.zeros(resolve_shape(s.shape, sizes), dtype=DTYPES[s.dtype]) for s in states}


def right_pad(seqs: Sequence[I64], pad: int) -> tuple[I64, I64]:
    """Token sequences -> ``ids`` (batch, longest) right-padded with ``pad``, and ``lengths`` (batch,).

    An empty sequence gets length 1 (one pad token), so every row has a valid last position."""
    lengths = np.array([max(1, len(s)) for s in seqs], dtype=np.int64)  # (batch,)
    ids = np.full((len(seqs), int(lengths.max()) if len(seqs) else 0), pad, dtype=np.int64)  # (batch, time)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = s
    return ids, lengths


def log_softmax(logits: npt.NDArray[np.floating[Any]], axis: int = -1) -> F64:
    """Numerically stable log-probabilities, float64 so sums over many characters stay exact enough."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    out: F64 = z - np.log(np.exp(z).sum(axis=axis, keepdims=True))
    return out


def softmax(logits: npt.NDArray[np.floating[Any]], axis: int = -1) -> F64:
    """Probabilities in float64 (one exp per element: this runs once per served character)."""
    e = np.exp(logits.astype(np.float64) - logits.max(axis=axis, keepdims=True))
    out: F64 = e / e.sum(axis=axis, keepdims=True)
    return out


def sample(logits: npt.NDArray[np.floating[Any]], temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """One token id from ``logits`` (vocab,). temperature 0 = greedy (argmax, lowest id on ties); otherwise
    softmax(logits / T) over exactly the ``top_k`` highest logits (0 = all; ties at the cut are broken by
    ``argpartition``, so exactly ``top_k`` ids stay eligible)."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < len(z):
        keep = np.argpartition(z, -top_k)[-top_k:]
        masked = np.full_like(z, -np.inf)
        masked[keep] = z[keep]
        z = masked
    p = softmax(z)
    return int(rng.choice(len(p), p=p))


def read_only_copy(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """An owned, read-only copy for a cache: a view would keep its whole batch alive, and nothing may write into an
    array other calls get (a write raises instead of changing another call's answer)."""
    out = np.array(a, copy=True)
    out.flags.writeable = False
    return out
