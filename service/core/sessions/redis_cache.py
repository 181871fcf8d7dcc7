"""The hot cache of the Redis store: the sessions this replica used recently, what it knows about each (the
revision Redis holds, whether it owns the lease, unwritten steps), and the turns that local calls on one
session take (in arrival order, as in the in-memory store).

An entry's state is the last committed one (a private copy; arrays are never changed in place). While this
replica owns the lease (``owned_until``, monotonic) nobody else writes the session, so the entry is the truth
and a step reads nothing from Redis; after that it is validated by revision when the lease is taken again.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from service.core.sessions.state import SessionState


class Entry:
    __slots__ = ("deadline_ms", "dirty_since", "io", "owned_until", "state", "stored", "used", "wanted")

    def __init__(self, state: SessionState, stored: str, deadline_ms: int) -> None:
        self.state = state
        self.stored = stored  # the revision of the value in Redis (16 hex digits): what the next write expects
        self.deadline_ms = deadline_ms  # the index deadline written with it
        self.owned_until = 0.0  # monotonic time until which this replica holds the lease for sure
        self.dirty_since: float | None = None  # idle durability: when the first unwritten step was saved
        self.used = 0.0  # monotonic time of the last call
        self.wanted = False  # another replica asked for it: hand it over after the current call
        self.io = asyncio.Lock()  # one write of this entry at a time


class _Turns:
    __slots__ = ("calls", "lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()  # FIFO: asyncio wakes waiters in arrival order
        self.users = 0  # holding or waiting for the turn
        self.calls = 0  # of them, the server's calls (not this store's own hand-overs)


class HotCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._turns: dict[str, _Turns] = {}

    def get(self, session_id: str) -> Entry | None:
        e = self._entries.get(session_id)
        if e is not None:
            self._entries.move_to_end(session_id)
        return e

    def put(self, session_id: str, state: SessionState, stored: str, deadline_ms: int) -> Entry:
        self.pop(session_id)
        e = self._entries[session_id] = Entry(state, stored, deadline_ms)
        self.bytes += state.nbytes
        return e

    def pop(self, session_id: str) -> Entry | None:
        e = self._entries.pop(session_id, None)
        if e is not None:
            self.bytes -= e.state.nbytes
        return e

    def items(self) -> list[tuple[str, Entry]]:
        return list(self._entries.items())

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @asynccontextmanager
    async def turn(self, session_id: str, call: bool = True) -> AsyncIterator[None]:
        """This process's exclusive use of one session; waiters are served in arrival order. ``call``: for one of
        the server's calls (or reads), not the store's own work (a hand-over)."""
        t = self._turns.get(session_id)
        if t is None:
            t = self._turns[session_id] = _Turns()
        t.users += 1
        t.calls += call
        try:
            async with t.lock:
                yield
        finally:
            t.users -= 1
            t.calls -= call
            if t.users == 0:
                del self._turns[session_id]

    def in_use(self, session_id: str) -> bool:
        """Held or awaited, by a call or by the store's own work."""
        return session_id in self._turns

    def serving(self, session_id: str) -> bool:
        """Held or awaited by one of the server's calls."""
        t = self._turns.get(session_id)
        return t is not None and t.calls > 0

    def over_budget(self) -> list[str]:
        """Least recently used sessions not in use whose removal brings the cache under its byte budget."""
        out: list[str] = []
        excess = self.bytes - self.budget
        for sid, e in self._entries.items():
            if excess <= 0:
                break
            if sid not in self._turns:
                out.append(sid)
                excess -= e.state.nbytes
        return out
