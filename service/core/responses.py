"""Response cache (Triton's ``response_cache``): whole answers of stateless KServe requests to deterministic tasks
(sentiment, forecast without a sequence), so that a request seen before is answered without queueing or running
the model.

A key is a 16-byte BLAKE2b digest of the request as the model's contract decoded it (every input's name,
datatype, shape and data, the outputs asked for and their ``class_count``), under a scope of the loaded version
(a reload never reads the last weights' answers) and the caller's principal (one tenant's requests never answer,
or time, another's). Requests that fail are never kept. Entries are evicted least recently used first, within
``max_bytes`` (``RESPONSE_CACHE_BYTES``; 0 = off, as in Triton, where each model opts in).

A kept answer is one the model gave to that request; a fresh run could differ in the last bits of a float when
its batch is shaped otherwise (batching already varies that much), never more.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from service.core.types import InferResult, Tensor

DIGEST_BYTES = 16
ENTRY_OVERHEAD = 1024  # the key, the OrderedDict slot, the result and its tensor objects beyond their data (~880 B
# for a sentiment answer, tracemalloc: tests/service/core/test_response_cache.py checks the budget holds)


def _frozen(t: Tensor) -> Tensor:
    """An owned, read-only copy of an output: a view would keep its whole batch alive, and nothing may write into
    an answer other callers get."""
    if t.array is None:
        return dataclasses.replace(t, items=list(t.items or ()))
    array = np.array(t.array, copy=True)
    array.flags.writeable = False
    return dataclasses.replace(t, array=array)


def _nbytes(t: Tensor) -> int:
    return t.array.nbytes if t.array is not None else sum(len(b) for b in t.items or ())


class ResponseCache:
    """Answers by request digest, least recently used evicted first. Thread-safe (one lock)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, str, bytes], tuple[InferResult, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(
        scope: int, principal: str, inputs: Mapping[str, Tensor], outputs: Sequence[str], classes: Mapping[str, int]
    ) -> tuple[int, str, bytes]:
        """The key of a decoded request (inputs in any order: the same request is the same key)."""
        h = hashlib.blake2b(digest_size=DIGEST_BYTES)
        for name in sorted(inputs):
            t = inputs[name]
            h.update(f"{name}\0{t.datatype}\0{t.shape}\0".encode())
            if t.array is not None:
                h.update(np.ascontiguousarray(t.array).tobytes())
            else:
                for item in t.items or ():
                    h.update(len(item).to_bytes(8, "little"))
                    h.update(item)
            h.update(b"\1")
        h.update(repr((list(outputs), sorted(classes.items()))).encode())
        return scope, principal, h.digest()

    def get(self, key: tuple[int, str, bytes]) -> InferResult | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            self._entries.move_to_end(key)
            return found[0]

    def put(self, key: tuple[int, str, bytes], result: InferResult) -> int:
        """Keeps ``result`` (its outputs copied, read-only), evicting the least recently used entries beyond
        ``max_bytes``; returns how many it evicted. An answer larger than the whole cache is not kept."""
        kept = dataclasses.replace(result, outputs=[_frozen(t) for t in result.outputs], session_blob=None)
        nbytes = sum(_nbytes(t) for t in kept.outputs) + ENTRY_OVERHEAD
        if nbytes > self.max_bytes:
            return 0
        evicted = 0
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._entries[key] = (kept, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                _, (_, gone) = self._entries.popitem(last=False)
                self.bytes -= gone
                evicted += 1
            self.evictions += evicted
        return evicted

    def drop(self, scope: int) -> int:
        """Forgets every answer of one loaded version (it unloads); returns how many."""
        with self._lock:
            doomed = [k for k in self._entries if k[0] == scope]
            for k in doomed:
                self.bytes -= self._entries.pop(k)[1]
            return len(doomed)
