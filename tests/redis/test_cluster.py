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

    def per_node() -> list[int]:  # session values on each node
        return [sum(1 for _ in n.client().scan_iter(match="ss:{*}:v", count=1000)) for n in cluster.nodes]

    # Random ids land on random slots: create at least 12, and more until every node holds one (a node left
    # empty by 12 random ids happens ~2% of the time; 60 make it ~1e-10).
    ids: list[str] = []
    while len(ids) < 12 or (min(per_node()) == 0 and len(ids) < 60):
        ids.append((ca if len(ids) % 2 else cb).create_session("charlm").id)
    refs = [ref.create_session("charlm").id for _ in ids[:12]]
    for i, (sid, rid) in enumerate(zip(ids[:12], refs, strict=True)):
        assert suggestions([ca, cb][i % 2], sid, TEXT[: 5 + i]) == suggestions(ref, rid, TEXT[: 5 + i])
        assert suggestions([cb, ca][i % 2], sid, "!") == suggestions(ref, rid, "!")  # the other replica
    nodes = per_node()
    assert sum(nodes) == len(ids) and all(k > 0 for k in nodes), nodes
    usage = a.run(a.server.dataplane.sessions.usage())
    assert (usage.count, usage.per_model) == (len(ids), {"charlm": len(ids)})
    cb.delete_session(ids[0])
    assert b.run(b.server.dataplane.sessions.usage()).count == len(ids) - 1
