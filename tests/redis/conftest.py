"""Fixtures for the Redis store tests: one real ``redis-server`` for the whole session (emptied before each
test), and factories for private servers (AOF, restarts) and stores."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.core.sessions.redis_store import RedisSessionStore
from service.settings import Settings
from tests.conftest import ServerHandle, server_settings
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


@pytest.fixture
def start_replica(tiny_models: Path) -> Iterator[Callable[..., ServerHandle]]:
    """``start_replica(url, **settings)``: an in-process server whose sessions live in Redis at ``url`` (a short
    lease, so a dead replica's sessions move on within a second); stopped when the test ends."""
    handles: list[ServerHandle] = []

    def start(url: str, **overrides: Any) -> ServerHandle:
        models = overrides.pop("models", tiny_models)
        values: dict[str, Any] = {"session_store": url, "session_lease_seconds": 1.0}
        values.update(overrides)
        handle = ServerHandle(server_settings(models, **values))
        handles.append(handle)
        return handle

    yield start
    for h in handles:
        h.close()
