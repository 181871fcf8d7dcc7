"""``--workers 2 --engines 2`` on a shared Redis store: sessions alternate frontends and engines with the answers of
one process, and a per-principal session quota (allowed with several engines only on a shared store) holds for
the whole server, counted in Redis, although new sessions go to each engine in turn."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from service.client import ApiError, Client
from service.core.shards import shard_of
from tests.redis.servers import RedisServer
from tests.service.engine.test_workers import _frontends, _sessions_match
from tests.service.kserve.procs import start_server, stop_server


def test_sessions_and_a_quota_hold_across_engines_on_redis(
    tiny_models: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    (tmp_path / "multi").mkdir()
    (tmp_path / "single").mkdir()
    multi, info = start_server(
        tiny_models,
        tmp_path / "multi",
        SEQSERVE_WORKERS="2",
        SEQSERVE_ENGINES="2",
        SEQSERVE_FRONTEND_PORTS="true",
        SEQSERVE_SESSION_STORE=redis_server.url,
        SEQSERVE_QUOTA_SESSIONS="3",
    )
    single, single_info = start_server(tiny_models, tmp_path / "single", SEQSERVE_WORKERS="1")
    try:
        frontends = _frontends(info)
        _sessions_match(frontends, int(single_info["grpc_port"]))
        with Client(frontends[0], timeout=30) as c:
            ids = [c.create_session("charlm").id for _ in range(3)]
            assert {shard_of(i, 2) for i in ids} == {0, 1}  # both engines hold some
            with pytest.raises(ApiError) as err:
                c.create_session("charlm")
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota_sessions" in err.value.message
            c.delete_session(ids[0])
            assert c.create_session("charlm").id
    finally:
        stop_server(single)
        stop_server(multi)
