"""The session manager and store at their edges: limits are inclusive, an eviction notice lasts until the
session would have expired, concurrent creates on a store that suspends cannot overshoot a limit, leases are
first come first served and survive a waiter cancelled at its turn, deleted sessions give their bytes back.
(Each was unchecked until a mutation review.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.core.sessions import InMemorySessionStore, SessionManager, SessionState, SessionStore
from service.errors import RETRY_LATER, InvalidInput, ModelUnavailable, Overloaded, SessionEvicted, SessionNotFound
from tests.service.core.conftest import RecordingMetrics, core_settings, memory_dp


def state(sid: str, nbytes: int = 1000, ttl: float = 10.0, last_used: float = 100.0, owner: str = "") -> SessionState:
    return SessionState(
        id=sid, model="charlm", version=1, model_sha256="ab" * 32, task="charlm",
        state={"h": np.zeros(4, np.float32)}, context={}, steps=0, ttl_seconds=ttl, created_at=last_used,
        last_used_at=last_used, nbytes=nbytes, metadata={}, owner=owner, revision=0,
    )  # fmt: skip


def manager(
    tmp_path: Path, store: SessionStore | None = None, now: list[float] | None = None, **settings: object
) -> SessionManager:
    clock = (lambda: now[0]) if now is not None else (lambda: 100.0)
    return SessionManager(
        core_settings(tmp_path, **settings), RecordingMetrics(), store or InMemorySessionStore(), clock
    )


# --- manager.py -------------------------------------------------------------------------------------------------
async def test_limits_are_inclusive(tmp_path: Path) -> None:
    """The documented maxima are allowed (ttl == session_max_ttl_seconds, a 320-char id, a
    session of exactly max_session_bytes)."""
    m = manager(tmp_path, max_session_bytes=1000)
    assert m.ttl(m.settings.session_max_ttl_seconds) == m.settings.session_max_ttl_seconds
    assert m.new_id("x" * 320) == "x" * 320
    with pytest.raises(InvalidInput):
        m.new_id("x" * 321)
    await m.add(state("exact", nbytes=1000))  # fits exactly
    assert (await m.usage()).bytes == 1000


async def test_an_eviction_is_told_only_until_the_session_would_have_expired_and_not_after_a_restart(
    tmp_path: Path,
) -> None:
    """Past its TTL an evicted id is plain "unknown"; an id created again after an eviction and then
    deleted is plain "unknown" too, never "evicted"."""
    now = [100.0]
    m = manager(tmp_path, now=now, max_sessions=1, session_full_policy="evict_lru")
    await m.add(state("a", ttl=10.0))
    await m.add(state("b", ttl=10.0))  # evicts a
    with pytest.raises(SessionEvicted):
        await m.get("a")
    now[0] = 111.0  # a would have expired by now
    with pytest.raises(SessionNotFound) as info:
        await m.get("a")
    assert not isinstance(info.value, SessionEvicted)
    now[0] = 100.0
    m2 = manager(tmp_path, now=now, max_sessions=1, session_full_policy="evict_lru")
    await m2.add(state("a", ttl=10.0))
    await m2.add(state("b", ttl=10.0))  # evicts a
    await m2.add(state("a", ttl=10.0))  # the owner starts it again (evicts b)
    await m2.delete("a")
    with pytest.raises(SessionNotFound) as info:
        await m2.get("a")
    assert not isinstance(info.value, SessionEvicted)


class YieldingStore(InMemorySessionStore):  # type: ignore[type-arg]
    """A store whose reads suspend, as every call to a network store (Redis) does."""

    async def usage(self):  # type: ignore[no-untyped-def]
        found = await super().usage()
        await asyncio.sleep(0)  # the reply is on its way back
        return found

    async def owner_usage(self, owner):  # type: ignore[no-untyped-def]
        found = await super().owner_usage(owner)
        await asyncio.sleep(0)
        return found


@pytest.mark.parametrize("limit", [{"max_sessions": 3, "session_full_policy": "reject"}, {"quota_sessions": 3}])
async def test_concurrent_creates_cannot_overshoot_a_limit(tmp_path: Path, limit: dict[str, Any]) -> None:
    """The manager's _adding lock; without it concurrent creates on a network store all pass the check."""
    m = manager(tmp_path, store=YieldingStore(), **limit)
    results = await asyncio.gather(*(m.add(state(f"s{i}")) for i in range(8)), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 3
    assert all(isinstance(r, Overloaded) for r in results if isinstance(r, BaseException))
    assert (await m.usage()).count == 3


# --- store.py ---------------------------------------------------------------------------------------------------
async def test_a_session_in_a_call_longer_than_its_ttl_is_not_reaped() -> None:
    """In memory, as tests/redis/test_faults.py checks for Redis: pop_expired skips a leased session."""
    store: InMemorySessionStore[object] = InMemorySessionStore()
    await store.add(state("s", ttl=10.0, last_used=100.0))
    async with store.lease("s"):
        assert await store.pop_expired(200.0, 10) == []
        assert await store.load("s") is not None
    assert [s.id for s in await store.pop_expired(201.0, 10)] == ["s"]


async def test_lease_waiters_are_served_in_arrival_order() -> None:
    """Three waiters behind a holder get the lease first come, first served."""
    store: InMemorySessionStore[object] = InMemorySessionStore()
    order: list[int] = []
    hold = store.lease("s")
    await hold.__aenter__()

    async def wait(i: int) -> None:
        async with store.lease("s"):
            order.append(i)

    tasks = []
    for i in range(4):
        tasks.append(asyncio.create_task(wait(i)))
        await asyncio.sleep(0)
    await hold.__aexit__(None, None, None)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]


async def test_owner_bytes_are_given_back_on_delete(tmp_path: Path) -> None:
    """A principal that deletes its sessions gets its bytes quota back."""
    store: InMemorySessionStore[object] = InMemorySessionStore()
    await store.add(state("a", owner="alice"))
    await store.add(state("b", owner="alice"))
    await store.delete("a")
    u = await store.owner_usage("alice")
    assert (u.count, u.bytes) == (1, 1000)
    m = manager(tmp_path, quota_session_bytes=2000)
    await m.add(state("x"))
    await m.add(state("y"))
    await m.delete("x")
    await m.add(state("z"))  # room again


async def test_a_waiter_cancelled_just_after_its_turn_came_passes_the_lease_on() -> None:
    """The turn is handed to a waiter that is cancelled before it runs: the lease must not stay held."""
    store: InMemorySessionStore[object] = InMemorySessionStore()
    hold = store.lease("s")
    await hold.__aenter__()

    async def wait() -> None:
        async with store.lease("s"):
            pass

    waiter = asyncio.create_task(wait())
    await asyncio.sleep(0)  # it waits for its turn
    await hold.__aexit__(None, None, None)  # hands the turn over...
    waiter.cancel()  # ...and the waiter goes away before it could use it
    await asyncio.gather(waiter, return_exceptions=True)
    nxt = store.lease("s")
    await asyncio.wait_for(nxt.__aenter__(), 1.0)
    await nxt.__aexit__(None, None, None)
    assert not store.in_use("s")


async def test_a_full_store_says_when_a_retry_may_fit(tmp_path: Path) -> None:
    """Full, and its only session in use: the create is refused before anything ran, and may fit once that call
    ends (a retry time, RetryInfo at the edge). Full under the reject policy: only a delete or an expiry makes
    room, so no retry time."""
    m = manager(tmp_path, max_sessions=1, session_full_policy="evict_lru")
    await m.add(state("a"))
    async with m.use("a"):
        with pytest.raises(Overloaded, match="every session is in use") as busy:
            await m.add(state("b"))
    assert busy.value.retry_after == RETRY_LATER
    strict = manager(tmp_path, max_sessions=1, session_full_policy="reject")
    await strict.add(state("a"))
    with pytest.raises(Overloaded, match="delete sessions you no longer need") as full:
        await strict.add(state("b"))
    assert full.value.retry_after is None


async def test_a_model_still_loading_says_when_to_come_back(tmp_path: Path) -> None:
    """RepositoryModelLoad of a model not loaded yet: calls naming it are refused with a retry time meanwhile."""
    from service.core.registry import ModelRegistry
    from service.core.types import ModelRef
    from service.metrics import Metrics
    from service.settings import Settings

    registry = ModelRegistry(Settings(models=tmp_path), Metrics(runtime_collectors=False))
    registry._loading["late"] += 1  # what load_model() holds while it loads "late"
    with pytest.raises(ModelUnavailable, match="is loading") as loading:
        registry.find(ModelRef("late"))
    assert loading.value.retry_after == RETRY_LATER


async def test_a_model_none_of_whose_sessions_fits_is_named_in_a_warning_when_it_loads(
    tiny_models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """(It loaded without a word, and every Create of its sessions was refused.)"""
    dp = await memory_dp(tiny_models, max_session_bytes=100)
    try:
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "no session of" in r.message]
        needs = dp.registry.get("charlm", 1).task.session_nbytes()  # type: ignore[union-attr]
        assert f"no session of charlm/1 fits: one needs {needs} bytes, more than max_session_bytes=100; " in warned[0]
        assert sorted(m.split()[3] for m in warned) == ["charlm/1", "forecaster/1"]
    finally:
        await dp.stop()
