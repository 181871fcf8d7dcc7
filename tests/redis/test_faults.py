"""Redis faults, one in-process replica: Redis restarted with its AOF keeps every session; Redis stopped in the
middle of a stream of steps makes the calls that need a session fail fast with UNAVAILABLE naming the store
(never INTERNAL, never a hang), stateless calls keep working, health says so; when Redis is back the same
server serves the sessions again, and no acknowledged step was lost."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import preflight
from service.client import ApiError, Client
from service.settings import Settings
from tests.conftest import ServerHandle
from tests.redis.servers import RedisServer, execute
from tests.redis.test_replicas import suggestions

TEXT = "O, that this too too solid flesh would melt"
SESSIONS = "seqserve.v1.Sessions"


def health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        status: int = (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        )
        return status


def wait_for(check: Callable[[], bool], seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_aof_restart_and_an_outage_mid_load(
    private_redis: Callable[..., RedisServer], start_replica: Callable[..., ServerHandle]
) -> None:
    r = private_redis(aof=True)
    server = start_replica(r.url, session_store_timeout_seconds=0.5)
    c = Client(server.target, timeout=5)
    ref = Client(start_replica("memory://").target)
    sid, rid = c.create_session("charlm").id, ref.create_session("charlm").id
    assert suggestions(c, sid, TEXT[:10]) == suggestions(ref, rid, TEXT[:10])

    r.stop()  # Redis restarts from its AOF: the session is there, exactly
    r.start()
    assert suggestions(c, sid, TEXT[10:20]) == suggestions(ref, rid, TEXT[10:20])

    acked, failures, stop = [20], [], threading.Event()

    def load() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                acked.append(c.suggest_once(sid, "x", n=1, max_chars=1).steps)
            except ApiError as e:
                failures.append((e.code, e.message, time.monotonic() - t0))
                time.sleep(0.02)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        assert wait_for(lambda: len(acked) > 5)
        r.stop()  # mid-load
        assert wait_for(lambda: len(failures) >= 5)
        assert c.classify(["a fine film"])[0].label  # stateless calls keep working
        assert wait_for(lambda: health(server.target, SESSIONS) == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert health(server.target, "") == health_pb2.HealthCheckResponse.SERVING
        r.start()  # back: the same server serves the session again, without a restart
        n = len(acked)
        assert wait_for(lambda: len(acked) > n + 3)
        assert wait_for(lambda: health(server.target, SESSIONS) == health_pb2.HealthCheckResponse.SERVING)
    finally:
        stop.set()
        worker.join()
    for code, message, seconds in failures:
        assert code == grpc.StatusCode.UNAVAILABLE, (code, message)
        assert f"session store {r.url} is unavailable" in message
        assert seconds < 3.0  # fails fast: well inside the 5 s deadline
    # Every acknowledged step is in the session; a call cut off by the outage may have landed or not, and
    # the step counter says which.
    steps = c.get_session(sid).steps
    assert acked == sorted(acked) and acked[-1] == steps
    assert steps - 20 <= len(acked) - 1 + len(failures)


def test_rediss_tls(private_redis: Callable[..., RedisServer], start_replica: Callable[..., ServerHandle]) -> None:
    r = private_redis(tls=True)  # TLS only, a self-signed certificate given as ssl_ca_certs in the URL
    assert r.url.startswith("rediss://")
    a, b = Client(start_replica(r.url).target), Client(start_replica(r.url).target)
    ref = Client(start_replica("memory://").target)
    sid, rid = a.create_session("charlm").id, ref.create_session("charlm").id
    assert suggestions(a, sid, TEXT[:8]) == suggestions(ref, rid, TEXT[:8])
    assert suggestions(b, sid, TEXT[8:16]) == suggestions(ref, rid, TEXT[8:16])  # the other replica
    assert r.client().dbsize() > 0


def test_a_redis_certificate_that_does_not_verify_says_to_fix_the_setting(
    private_redis: Callable[..., RedisServer], start_replica: Callable[..., ServerHandle]
) -> None:
    """rediss:// without the CA of a self-signed certificate, or with a host name the certificate is not for: the
    refusal read as an outage ("retry when it is back"), which no retry fixes."""
    r = private_redis(tls=True)
    for url in (r.url.partition("?")[0], r.url.replace("127.0.0.1", "localhost")):
        server = start_replica(url, session_store_timeout_seconds=0.5)
        with pytest.raises(ApiError) as info:
            Client(server.target, timeout=10).create_session("charlm")
        message = info.value.message
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in message
        assert "presents a TLS certificate this server does not trust" in message and "retry" not in message
        assert "ssl_ca_certs=/path/ca.pem) and name the host its certificate is for" in message


def _writes_refused(c: Client, sid: str, store: str) -> None:
    """A step and a create both fail UNAVAILABLE saying the store (its URL contains ``store``) refuses writes."""
    for call in (lambda: c.suggest_once(sid, ", or", n=1, max_chars=1), lambda: c.create_session("charlm")):
        try:
            call()
            raise AssertionError("a write went through")
        except ApiError as e:
            assert e.code == grpc.StatusCode.UNAVAILABLE and "refuses writes" in e.message and store in e.message, e


def test_a_redis_that_refuses_writes_is_unavailable_not_internal(
    private_redis: Callable[..., RedisServer], start_replica: Callable[..., ServerHandle]
) -> None:
    """A Redis that answers but will not write (here min-replicas-to-write without replicas: NOREPLICAS; a failed
    snapshot or AOF write gives MISCONF the same way) fails session calls with UNAVAILABLE naming the store, and
    health says so; once it writes again, the same server serves the session on."""
    r = private_redis()
    server = start_replica(r.url, session_store_timeout_seconds=0.5)
    c = Client(server.target, timeout=5)
    sid = c.create_session("charlm").id
    assert c.suggest_once(sid, "To be", n=1, max_chars=1).steps == 5
    r.client().config_set("min-replicas-to-write", 1)
    try:
        _writes_refused(c, sid, r.url)
        assert c.classify(["a fine film"])[0].label  # stateless calls keep working
        assert wait_for(lambda: health(server.target, SESSIONS) == health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        r.client().config_set("min-replicas-to-write", 0)
    assert wait_for(lambda: health(server.target, SESSIONS) == health_pb2.HealthCheckResponse.SERVING)
    assert c.suggest_once(sid, ", or", n=1, max_chars=1).steps == 9  # the refused step changed nothing


def test_an_acl_that_denies_writes_is_unavailable_not_internal(
    private_redis: Callable[..., RedisServer], start_replica: Callable[..., ServerHandle]
) -> None:
    """An ACL that takes writes away from seqserve's Redis user: the commands inside our scripts are denied with a
    plain ERR ("The user executing the script can't run this command"), not NOPERM, and every session call
    answered INTERNAL. Now UNAVAILABLE saying the store refuses writes, as for NOPERM; back when the ACL is."""
    r = private_redis()
    admin = r.client()
    execute(admin, "ACL", "SETUSER", "app", "on", ">app-password-0123", "~*", "&*", "+@all")
    url = r.url.replace("redis://", "redis://app:app-password-0123@", 1)
    server = start_replica(url, session_store_timeout_seconds=0.5)
    c = Client(server.target, timeout=5)
    sid = c.create_session("charlm").id
    assert c.suggest_once(sid, "To be", n=1, max_chars=1).steps == 5
    execute(admin, "ACL", "SETUSER", "app", "-@write")
    try:
        _writes_refused(c, sid, "redis://")
    finally:
        execute(admin, "ACL", "SETUSER", "app", "+@all")
    assert c.suggest_once(sid, ", or", n=1, max_chars=1).steps == 9  # the refused step changed nothing


def test_a_complete_longer_than_the_session_ttl_keeps_the_session(
    redis_server: RedisServer, start_replica: Callable[..., ServerHandle]
) -> None:
    """A session in a call is not idle: a Complete that runs past the session's TTL (its Redis value's TTL, and
    the index's deadline that the reaper trims by) saves it, as in memory, instead of "deleted or replaced"."""
    # A TTL of 2 s: the Get right after the Complete must come within it, and the call's lease renewals must keep
    # up with it, also on a busy 2-core CI machine (with 0.5 s, a Get came too late; with 1 s, an event loop held
    # up for most of a second lost the session mid-call once in a fresh-clone CI run).
    most = 100_000  # the server's max_generate_chars, and so the most this test asks for
    server = start_replica(redis_server.url, max_generate_chars=most, reaper_interval_seconds=0.1)
    c = Client(server.target, timeout=120)
    # As many characters as this machine generates in ~6 s (a fixed 30,000 took 22 s on a slow day), from a
    # Complete without a session timed first.
    t0 = time.monotonic()
    list(c.complete("To be", max_chars=2_000, seed=1))
    chars = min(most, max(4_000, round(2_000 * 6.0 / (time.monotonic() - t0))))
    sid = c.create_session("charlm", ttl_seconds=2.0).id
    t0 = time.monotonic()
    chunks = list(c.complete("To be", session_id=sid, max_chars=chars, seed=1))
    took = time.monotonic() - t0
    assert took > 3.0, f"the Complete took {took:.2f} s, not well past the TTL: nothing was tested"
    assert chunks[-1].finish_reason == "length" and chunks[-1].steps == 5 + chars
    assert c.get_session(sid).steps == 5 + chars


async def test_a_full_redis_is_up_and_refuses_writes_call_by_call(private_redis: Callable[..., RedisServer]) -> None:
    """maxmemory reached with noeviction: the store still answers (health up; the server starts), and writes get
    RESOURCE_EXHAUSTED per call."""
    from service.core.sessions.redis_store import RedisSessionStore
    from service.errors import Overloaded
    from service.settings import Settings
    from tests.redis.test_store import state

    r = private_redis()
    r.client().config_set("maxmemory", 1)
    store = RedisSessionStore(r.url, Settings(session_lease_seconds=2.0))
    try:
        assert await store.check() is None
        try:
            await store.add(state("full"))
            raise AssertionError("a write went through a full Redis")
        except Overloaded as e:
            assert "out of memory" in e.message and "raise maxmemory" in e.message
            assert "script" not in e.message and "user_script" not in e.message  # (Redis' Lua internals: logged)
    finally:
        await store.close()


def test_a_redis_password_never_shows_in_logs_or_messages(
    private_redis: Callable[..., RedisServer],
    start_replica: Callable[..., ServerHandle],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """redis-py also reads the password from the query (``?password=``), and a password may hold "@": the store's
    name in logs and in UNAVAILABLE messages showed such a password, whole or in part."""
    from service.core.sessions import redact

    assert redact("redis://h:1/0?db=0&password=p4ss") == "redis://h:1/0?db=0&password=***"
    assert redact("redis://:se@cr/et@h:1/0") == "redis://:***@h:1/0"
    assert redact("redis://app:p4ss@h:1/0") == "redis://app:***@h:1/0"
    r = private_redis()
    r.client().config_set("requirepass", "Pw-in-the-query@0123")
    url = f"{r.url}?password=Pw-in-the-query%400123"
    server = start_replica(url, session_store_timeout_seconds=0.5)
    c = Client(server.target, timeout=10)
    sid = c.create_session("charlm").id
    r.stop(signal.SIGKILL)
    with pytest.raises(ApiError) as info:
        c.suggest_once(sid, "To be", n=1, max_chars=1)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "password=***" in info.value.message
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "password=***" in logged
    for secret in ("Pw-in-the-query", "0123"):
        assert secret not in info.value.message and secret not in logged


def test_a_wrong_redis_password_says_to_fix_the_setting_not_to_retry(
    private_redis: Callable[..., RedisServer], start_replica: Callable[..., ServerHandle]
) -> None:
    """redis-py's AuthenticationError is a ConnectionError: a wrong or missing password read as an outage,
    "retry when it is back", which no retry fixes."""
    r = private_redis()
    r.client().config_set("requirepass", "the-right-one-0123")
    for url in (r.url.replace("redis://", "redis://:wrong-guess-4567@", 1), r.url):
        server = start_replica(url, session_store_timeout_seconds=0.5)
        with pytest.raises(ApiError) as info:
            Client(server.target, timeout=10).create_session("charlm")
        message = info.value.message
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "refuses this server's credentials" in message
        assert "set the password (and user) Redis expects in session_store (SEQSERVE_SESSION_STORE" in message
        assert "retry" not in message and "wrong-guess" not in message and "the-right-one" not in message


def test_a_database_redis_does_not_have_says_to_fix_the_setting(
    private_redis: Callable[..., RedisServer], start_replica: Callable[..., ServerHandle]
) -> None:
    """redis://host:port/16 on a Redis of 16 databases: redis-py's ResponseError ("DB index is out of range") went
    out of the store as a traceback, and the server stopped at start."""
    r = private_redis()
    server = start_replica(r.url.removesuffix("/0") + "/16", session_store_timeout_seconds=0.5)
    c = Client(server.target, timeout=10)
    with pytest.raises(ApiError) as info:
        c.create_session("charlm")
    message = info.value.message
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "has no such database (DB index is out of range" in message
    assert "name one it has in session_store (SEQSERVE_SESSION_STORE: redis://HOST:PORT/DB)" in message
    assert c.classify(["still serves what needs no session"])[0].label


def test_a_redis_that_evicts_keys_when_full_is_warned_of(
    private_redis: Callable[..., RedisServer],
    start_replica: Callable[..., ServerHandle],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A maxmemory-policy that evicts (allkeys-lru, volatile-lru...) drops sessions and the index keys that count
    them once Redis is full: their clients got "unknown session" and the session gauges kept counting them, and
    nothing said why. `seqserve check` warns, and so does the server at start; noeviction is quiet."""
    r = private_redis()
    r.client().config_set("maxmemory", "64mb")
    for policy, warned in (("allkeys-lru", True), ("noeviction", False)):
        r.client().config_set("maxmemory-policy", policy)
        finding = asyncio.run(preflight.check(Settings(session_store=r.url, models=Path("/nonexistent"))))[-1]
        assert finding.part == "sessions" and (finding.status, finding.detail.startswith("answers")) == (
            ("warn", True) if warned else ("ok", True)
        ), finding
        caplog.clear()
        start_replica(r.url)
        logged = [m.getMessage() for m in caplog.records if "maxmemory-policy" in m.getMessage()]
        assert len(logged) == warned
        for text in (finding.detail, *logged):
            assert ("has maxmemory-policy allkeys-lru: once full it evicts keys" in text) == warned
            assert ("set maxmemory-policy noeviction" in text) == warned


def test_tls_to_a_plain_redis_says_the_url_asks_for_tls(
    private_redis: Callable[..., RedisServer], start_replica: Callable[..., ServerHandle]
) -> None:
    """rediss:// to a Redis that serves no TLS: the handshake gets no answer, and redis-py's TimeoutError read as an
    outage ("retry when it is back"), which no retry fixes. The message now says what the URL asked for."""
    r = private_redis()
    server = start_replica(r.url.replace("redis://", "rediss://", 1), session_store_timeout_seconds=0.5)
    with pytest.raises(ApiError) as info:
        Client(server.target, timeout=10).create_session("charlm")
    message = info.value.message
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "TimeoutError" in message
    assert "The URL asks for TLS (rediss://): a Redis that does not serve TLS on that port" in message
    assert "if it serves plain connections, use redis://" in message
