"""A three-node Redis Cluster on loopback ports (started here): sessions of two replicas spread over all three
nodes by their ``{id}`` hash tag, the sharded index counts them across nodes, and outputs equal a single
in-memory server's."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.client import Client
from tests.conftest import ServerHandle
from tests.redis.servers import RedisCluster
from tests.redis.test_replicas import suggestions

TEXT = "If music be the food of love, play on"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    c = RedisCluster(tmp_path / "cluster")
    yield c
    c.stop()


def test_sessions_spread_over_three_nodes(cluster: RedisCluster, start_replica: Callable[..., ServerHandle]) -> None:
    a = start_replica(cluster.url, session_index_shards=6)
    b = start_replica(cluster.url, session_index_shards=6)
    ca, cb = Client(a.target), Client(b.target)
    ref = Client(start_replica("memory://").target)
    ids = [(ca if i % 2 else cb).create_session("charlm").id for i in range(12)]
    refs = [ref.create_session("charlm").id for _ in ids]
    for i, (sid, rid) in enumerate(zip(ids, refs, strict=True)):
        assert suggestions([ca, cb][i % 2], sid, TEXT[: 5 + i]) == suggestions(ref, rid, TEXT[: 5 + i])
        assert suggestions([cb, ca][i % 2], sid, "!") == suggestions(ref, rid, "!")  # the other replica
    per_node = [
        sum(1 for _ in n.client().scan_iter(match="ss:{*}:v", count=1000)) for n in cluster.nodes
    ]  # session values on each node
    assert sum(per_node) == 12 and all(k > 0 for k in per_node), per_node
    usage = a.run(a.server.dataplane.sessions.usage())
    assert (usage.count, usage.per_model) == (12, {"charlm": 12})
    cb.delete_session(ids[0])
    assert b.run(b.server.dataplane.sessions.usage()).count == 11
