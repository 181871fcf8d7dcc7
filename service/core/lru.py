"""A byte-budgeted LRU map: what the prefix cache and the response cache keep, least recently used evicted first.

Keys are tuples whose first item names the model version they belong to (its cache scope), so that an unload
drops that version's entries at once (``drop``). Values are kept as given (callers store read-only copies) with
the bytes they are charged. Thread-safe: one lock around each dictionary operation.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Generic, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[Any, ...], tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[Any, ...]) -> V | None:
        """The value under ``key`` (now the most recently used), or None."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            self._entries.move_to_end(key)
            return found[0]

    def put(self, key: tuple[Any, ...], value: V, nbytes: int) -> int:
        """Keeps ``value``, charged ``nbytes``, evicting the least recently used entries beyond ``max_bytes``;
        returns how many it evicted. A value larger than the whole budget is not kept."""
        if nbytes > self.max_bytes:
            return 0
        evicted = 0
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._entries[key] = (value, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                _, (_, gone) = self._entries.popitem(last=False)
                self.bytes -= gone
                evicted += 1
            self.evictions += evicted
        return evicted

    def drop(self, head: object) -> int:
        """Forgets every entry whose key starts with ``head`` (a model version that unloads); returns how many."""
        with self._lock:
            doomed = [k for k in self._entries if k[0] == head]
            for k in doomed:
                self.bytes -= self._entries.pop(k)[1]
            return len(doomed)
