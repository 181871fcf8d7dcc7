"""Prefix cache: the recurrent state after recent prompts of calls without a session (and of sessions that start
from nothing: a new one's first text, a reset, a KServe sequence's start), so that a caller that re-sends a growing
text (a stateless autocomplete client, a KServe request without a sequence, a shared preamble in front of many
prompts) pays for the characters it added, not for the whole text again.

An RNN's state after a prefix is a few KiB whatever the prefix's length, and feeding the rest from that state gives
bit-for-bit the answer of feeding the whole text (ONNX Runtime's recurrent kernels run step by step; checked on the
committed char LMs by ``tests/service/core/test_prefixes.py``), so a hit changes only the time a call takes.

What is kept, per model version and principal (one tenant's prompts never answer, or time, another's):
- the state after each prompt a call fed, under its whole length;
- on the way, the state at every multiple of ``checkpoint`` characters (the feeding is cut there; a long text at
  every second, fourth, ... one, so that a call runs the model ``MAX_RUNS`` times at most), so prompts that share a
  long beginning find it even when they differ near their end.

A lookup tries the whole text, then each of the ``lookback`` shorter lengths (a client that typed a few characters
since its last call), then the checkpoints below, longest first. Keys are a 16-byte BLAKE2b chain over the token
ids (one digest per checkpoint block, each covering the one before), so a key costs the same at any length and a
lookup hashes each character about once. Entries are evicted least recently used first, within ``max_bytes``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from service.core.arrays import read_only_copy
from service.core.lru import ByteLRU

Array = npt.NDArray[Any]
DIGEST_BYTES = 16
MAX_RUNS = 8  # model runs one call may be cut into (a 4,000-character text: checkpoints every 512)
# Bytes per entry beyond its arrays' data: the key, the OrderedDict slot, the Hit, its dict and the array objects
# (tracemalloc: ~910 B per char-LM entry; tests/service/core/test_prefixes.py checks the budget is not exceeded).
ENTRY_OVERHEAD = 1024


@dataclass(frozen=True)
class Hit:
    """What the cache holds for one prefix: the state after it (read-only arrays, batch of one) and the logits of
    the character that follows it."""

    state: dict[str, Array]
    logits: Array
    nbytes: int


class PrefixKeys:
    """The cache keys of one prompt's prefixes: ``key(length)`` for any length up to ``len(ids)``."""

    def __init__(self, scope: tuple[Any, ...], ids: npt.NDArray[np.int64], checkpoint: int) -> None:
        self.scope, self.ids, self.checkpoint = scope, ids, checkpoint
        self._chain: list[bytes] = [b""]  # _chain[k]: the digest of the first k checkpoint blocks

    def _block_digest(self, k: int) -> bytes:
        while len(self._chain) <= k:
            i = len(self._chain) - 1
            block = self.ids[i * self.checkpoint : (i + 1) * self.checkpoint].tobytes()
            self._chain.append(hashlib.blake2b(self._chain[-1] + block, digest_size=DIGEST_BYTES).digest())
        return self._chain[k]

    def key(self, length: int) -> tuple[Any, ...]:
        k, rest = divmod(length, self.checkpoint)
        digest = self._block_digest(k)
        if rest:
            tail = self.ids[k * self.checkpoint : length].tobytes()
            digest = hashlib.blake2b(digest + tail, digest_size=DIGEST_BYTES).digest()
        return (*self.scope, length, digest)

    def candidates(self, lookback: int) -> Iterator[int]:
        """Lengths a lookup tries, longest first: the whole text, ``lookback`` shorter ones, then checkpoints."""
        n = len(self.ids)
        low = max(n - lookback, 1)
        yield from range(n, low - 1, -1)
        top = (low - 1) // self.checkpoint * self.checkpoint
        yield from range(top, 0, -self.checkpoint)

    def segments(self, start: int, most: int = MAX_RUNS) -> Iterator[int]:
        """Where feeding from ``start`` stops to store a state: the checkpoints after ``start``, then the end, in
        ``most`` runs at most (each run waits its turn in the batch queue): a long text keeps every second, fourth,
        ... checkpoint, multiples of ``checkpoint`` all the same, so lookups find them."""
        n = len(self.ids)
        stride = self.checkpoint
        while (n - 1) // stride - start // stride > most - 1:
            stride *= 2
        nxt = (start // stride + 1) * stride
        while nxt < n:
            yield nxt
            nxt += stride
        yield n


class PrefixCache(ByteLRU[Hit]):
    """States after prompt prefixes, least recently used evicted first (``ByteLRU``)."""

    def __init__(self, max_bytes: int, checkpoint: int = 128, lookback: int = 16) -> None:
        if checkpoint < 1 or lookback < 0:
            raise ValueError(f"checkpoint must be >= 1 and lookback >= 0, got {checkpoint} and {lookback}")
        super().__init__(max_bytes)
        self.checkpoint, self.lookback = checkpoint, lookback

    def keys(self, scope: tuple[Any, ...], ids: npt.NDArray[np.int64]) -> PrefixKeys:
        return PrefixKeys(scope, ids, self.checkpoint)

    def lookup(self, keys: PrefixKeys) -> tuple[int, Hit | None]:
        """The longest cached prefix among ``keys.candidates``: (its length, what is kept), or (0, None)."""
        if not self._entries:
            return 0, None
        for length in keys.candidates(self.lookback):
            hit = self.get(keys.key(length))
            if hit is not None:
                return length, hit
        return 0, None

    def store(self, keys: PrefixKeys, length: int, state: dict[str, Array], logits: Array) -> int:
        """Keeps the state after the first ``length`` ids (copied, read-only), evicting the least recently used
        entries beyond ``max_bytes``; returns how many it evicted. An entry larger than the whole cache is not
        kept."""
        kept = {name: read_only_copy(v) for name, v in state.items()}
        last = read_only_copy(logits)
        nbytes = sum(v.nbytes for v in kept.values()) + last.nbytes + ENTRY_OVERHEAD
        if nbytes > self.max_bytes:
            return 0
        return self.put(keys.key(length), Hit(kept, last, nbytes), nbytes)
