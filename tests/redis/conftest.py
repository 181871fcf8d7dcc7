"""Fixtures for the Redis store tests: one real ``redis-server`` for the whole session (emptied before each
test), and factories for private servers (AOF, restarts) and stores."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.core.sessions.redis_store import RedisSessionStore
from service.settings import Settings
from tests.redis.servers import RedisServer


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_server(shared_redis: RedisServer) -> RedisServer:
    """The shared server, empty."""
    if shared_redis.proc is None or shared_redis.proc.poll() is not None:
        shared_redis.start()
    shared_redis.client().flushall()
    return shared_redis


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """``private_redis(aof=True)``: a server of this test's own (it may stop, kill and restart it)."""
    made: list[RedisServer] = []

    def make(**kw: Any) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(made)}", **kw)
        made.append(server)
        return server

    yield make
    for s in made:
        s.stop()


MakeStore = Callable[..., Awaitable[RedisSessionStore]]


@pytest.fixture
async def make_store(redis_server: RedisServer) -> AsyncIterator[MakeStore]:
    """``await make_store(url=None, **settings)``: a store (one "replica"), closed when the test ends."""
    made: list[RedisSessionStore] = []

    async def make(url: str | None = None, **overrides: Any) -> RedisSessionStore:
        values: dict[str, Any] = {"session_lease_seconds": 2.0, "session_store_timeout_seconds": 1.0}
        values.update(overrides)
        store = RedisSessionStore(url or redis_server.url, Settings(**values))
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()
