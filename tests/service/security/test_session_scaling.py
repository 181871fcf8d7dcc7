"""Defect 1: creating a session, making room, evicting and expiring never walk the store. The in-memory store's
records (and its per-owner order) are counted as they are walked: with 20,000 live sessions, creating more walks
none of them, an idle sweep walks none, and an eviction walks only as far as its victim. (The rates:
``bench/sessions.py``.)"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry

from service.core.context import set_principal
from service.core.sessions import InMemorySessionStore, SessionManager, SessionState
from service.metrics import Metrics
from service.settings import Settings

LIVE = 20_000


class Walked(OrderedDict[str, Any]):
    """An OrderedDict that counts the keys it hands out when iterated."""

    steps = 0

    def __iter__(self) -> Iterator[str]:
        for key in super().__iter__():
            Walked.steps += 1
            yield key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def session(i: int, now: float) -> SessionState:
    return SessionState(
        id=f"s{i}", model="charlm", version=1, model_sha256="0" * 64, task="charlm", state={}, context={},
        steps=0, ttl_seconds=600.0 + i % 7, created_at=now, last_used_at=now, nbytes=100,
    )  # fmt: skip


async def test_creating_expiring_and_evicting_never_walk_the_store() -> None:
    clock = Clock()
    settings = Settings(max_sessions=LIVE + 1000, max_session_bytes=10**9, session_full_policy="evict_lru")
    store: InMemorySessionStore[SessionState] = InMemorySessionStore()
    store._records = Walked()
    store._owners["alice"] = Walked()  # the per-owner recency order, which eviction walks first
    manager = SessionManager(settings, Metrics(CollectorRegistry()), store, clock)
    set_principal("alice")
    for i in range(LIVE):
        await manager.add(session(i, clock.now))
    Walked.steps = 0

    for i in range(LIVE, LIVE + 1000):  # room left: nothing is walked
        await manager.add(session(i, clock.now))
    assert Walked.steps == 0

    clock.now += 300  # none expired yet: an idle sweep looks at the heap's head only
    assert await manager.sweep() == 0 and Walked.steps == 0

    for i in range(LIVE + 1000, LIVE + 1100):  # full: each create evicts, walking only to the oldest idle one
        await manager.add(session(i, clock.now))
    assert Walked.steps == 100
    assert (await manager.usage()).count == LIVE + 1000

    clock.now += 1000  # everything expired: the sweep removes them from the heap, never walks the records
    assert await manager.sweep() == LIVE + 1000 and Walked.steps == 100
