"""``idle`` durability: steps stay in the replica that made them until the session is handed over, goes idle,
or the replica stops (SIGTERM path); then Redis holds exactly what was acknowledged. A crash (kill -9) loses
the steps not written yet, exactly as documented, and the step counter tells the client where the session
stands. (``step`` durability, the default, writes every step before answering: test_store, test_failover.)"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from service.client import Client
from service.core.sessions.redis_store import RedisSessionStore
from service.core.sessions.state import SessionState
from tests.conftest import ServerHandle
from tests.redis.servers import RedisServer
from tests.redis.test_faults import wait_for
from tests.redis.test_replicas import suggestions
from tests.service.kserve.procs import start_server, stop_server

TEXT = "Friends, Romans, countrymen, lend me your ears"


def stored_steps(redis_server: RedisServer, sid: str) -> int:
    raw = redis_server.client().get(RedisSessionStore.keys(sid)[0])
    assert isinstance(raw, bytes)
    return SessionState.from_bytes(raw[32:]).steps


def test_idle_mode_writes_back_on_hand_over_sigterm_and_idleness(
    redis_server: RedisServer, start_replica: Callable[..., ServerHandle]
) -> None:
    lazy = {"session_durability": "idle", "session_idle_seconds": 60, "session_flush_seconds": 60}
    a, b = start_replica(redis_server.url, **lazy), start_replica(redis_server.url, **lazy)
    ca, cb = Client(a.target), Client(b.target)
    ref = Client(start_replica("memory://").target)
    sid, rid = ca.create_session("charlm").id, ref.create_session("charlm").id
    assert suggestions(ca, sid, TEXT[:10]) == suggestions(ref, rid, TEXT[:10])
    assert stored_steps(redis_server, sid) == 0  # acknowledged, but only in replica a's memory
    # Replica b asks for the session: a writes it back, then hands it over.
    assert suggestions(cb, sid, TEXT[10:20]) == suggestions(ref, rid, TEXT[10:20])
    assert stored_steps(redis_server, sid) == 10
    b.stop(grace=1.0)  # as on SIGTERM: b writes back what it kept
    assert stored_steps(redis_server, sid) == 20
    # A replica that writes back once a session is idle for 0.2 s.
    c = start_replica(redis_server.url, session_durability="idle", session_idle_seconds=0.2)
    cc = Client(c.target)
    assert suggestions(cc, sid, TEXT[20:30]) == suggestions(ref, rid, TEXT[20:30])
    assert wait_for(lambda: stored_steps(redis_server, sid) == 30, 5.0)
    assert cc.get_session(sid).steps == 30


def test_idle_mode_crash_loses_the_unwritten_steps_and_the_counter_says_so(
    tiny_models: Path, tmp_path: Path, redis_server: RedisServer, start_replica: Callable[..., ServerHandle]
) -> None:
    env = {"SEQSERVE_SESSION_STORE": redis_server.url, "SEQSERVE_SESSION_DURABILITY": "idle"}
    env |= {"SEQSERVE_SESSION_IDLE_SECONDS": "60", "SEQSERVE_SESSION_FLUSH_SECONDS": "60"}
    proc, ports = start_server(tiny_models, tmp_path, SEQSERVE_SESSION_LEASE_SECONDS="1", **env)
    try:
        a = Client(f"127.0.0.1:{ports['grpc_port']}")
        sid = a.create_session("charlm").id
        assert a.suggest_once(sid, TEXT[:10]).steps == 10  # acknowledged, kept in a's memory only
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        stop_server(proc)
    b = Client(start_replica(redis_server.url).target)
    assert b.get_session(sid).steps == 0  # the crash lost the 10 unwritten steps; the counter says so
    ref = Client(start_replica("memory://").target)
    rid = ref.create_session("charlm").id
    assert suggestions(b, sid, TEXT[:12]) == suggestions(ref, rid, TEXT[:12])  # the client re-sends from there
