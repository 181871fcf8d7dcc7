"""Two replicas (in-process servers), one Redis: a client that alternates replicas step by step gets exactly what
one replica gives; two replicas racing on one session end in the state of the calls run in the order they
committed; max_sessions holds across replicas (the counts live in Redis)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.client import ApiError, Client
from tests.conftest import ServerHandle
from tests.redis.servers import RedisServer
from tests.service.api.test_rpcs import backspace_across, reads_during_a_long_completion
from tests.service.core.conftest import add_version
from tests.service.sessions.v2 import charlm_request, probs

TEXT = "Shall I compare thee to a summer's day?"


def suggestions(c: Client, sid: str, text: str) -> list[tuple[str, float]]:
    return [(s.text, round(s.logprob, 5)) for s in c.suggest_once(sid, text, n=3, max_chars=4).suggestions]


def test_alternating_replicas_equal_one_replica(
    redis_server: RedisServer, start_replica: Callable[..., ServerHandle]
) -> None:
    a, b = start_replica(redis_server.url), start_replica(redis_server.url)
    single = start_replica("memory://")
    chunks = [TEXT[i : i + 4] for i in range(0, len(TEXT), 4)]
    channels = [grpc.insecure_channel(h.target) for h in (a, b, single)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
    for i, chunk in enumerate(chunks):  # KServe v2 sequence: replica a, b, a, b, ...
        got = stubs[i % 2].ModelInfer(charlm_request(chunk, "seq", sequence_start=i == 0), timeout=30)
        want = stubs[2].ModelInfer(charlm_request(chunk, "seq", sequence_start=i == 0), timeout=30)
        assert got.parameters["seqserve_steps"].int64_param == want.parameters["seqserve_steps"].int64_param
        np.testing.assert_allclose(probs(got), probs(want), atol=1e-6)
    for c in channels:
        c.close()
    # Our API: a session created on one replica, Suggest alternating.
    ca_, cb_, cs_ = Client(a.target), Client(b.target), Client(single.target)
    s, r = ca_.create_session("charlm"), cs_.create_session("charlm")
    for i, chunk in enumerate(chunks):
        assert suggestions([ca_, cb_][i % 2], s.id, chunk) == suggestions(cs_, r.id, chunk)
    assert ca_.get_session(s.id).steps == cb_.get_session(s.id).steps == len(TEXT)
    assert ca_.fork_session(s.id).steps == len(TEXT)  # fork, get and delete go through Redis too
    cb_.delete_session(s.id)


def test_racing_replicas_end_as_the_calls_in_commit_order(
    redis_server: RedisServer, start_replica: Callable[..., ServerHandle]
) -> None:
    a, b = start_replica(redis_server.url), start_replica(redis_server.url)
    clients = [Client(a.target), Client(b.target)]
    sid = clients[0].create_session("charlm").id
    letters = "abcdefghijklmnopqrstuvwx"
    committed: list[tuple[int, str]] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for ch in letters[k::4]:  # 4 threads, two per replica, each with its own letters
            steps = clients[k % 2].suggest_once(sid, ch, n=1, max_chars=1).steps
            with lock:
                committed.append((steps, ch))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Every call saw the session right after its own character: no step was lost or applied twice...
    assert sorted(s for s, _ in committed) == list(range(1, len(letters) + 1))
    order = "".join(ch for _, ch in sorted(committed))
    # ...and the final state is the one of the calls run one after another in that order.
    ref = Client(start_replica("memory://").target)
    rid = ref.create_session("charlm").id
    ref.suggest_once(rid, order, n=1, max_chars=1)
    assert suggestions(clients[1], sid, "") == suggestions(ref, rid, "")


def test_limits_hold_across_replicas(redis_server: RedisServer, start_replica: Callable[..., ServerHandle]) -> None:
    limits = {"max_sessions": 3, "session_full_policy": "reject"}
    a, b = (
        Client(start_replica(redis_server.url, **limits).target),
        Client(start_replica(redis_server.url, **limits).target),
    )
    first = [a.create_session("charlm").id, a.create_session("charlm").id, b.create_session("charlm").id]
    with pytest.raises(ApiError, match=r"3 sessions \(max_sessions=3\)") as err:
        b.create_session("charlm")  # b holds one session, but the store holds three
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    a.delete_session(first[2])  # a deletes b's session: room again, for either replica
    assert b.create_session("charlm").steps == 0


def test_the_owner_of_a_session_evicted_by_another_replica_is_told_so_by_any_replica(
    redis_server: RedisServer, start_replica: Callable[..., ServerHandle]
) -> None:
    """The record of an eviction lived in the evicting process: the owner's next call on another replica (or after
    a restart) got "unknown, expired or was lost in a restart" (SESSION_NOT_FOUND), not SESSION_EVICTED as README's
    Errors and docs/security.md say. A session created again under the id is not told so."""
    a, b = (Client(start_replica(redis_server.url, max_sessions=2).target) for _ in range(2))
    old = a.create_session("charlm").id
    kept = a.create_session("charlm").id
    time.sleep(1.3)  # a's leases lapse (1 s): the sessions can be evicted by another replica
    a.suggest_once(kept, "x", n=1, max_chars=1)  # now the more recently used
    b.create_session("charlm")  # evicts the least recently used: a's first
    for c in (a, b, Client(start_replica(redis_server.url, max_sessions=2).target)):  # also one started since
        with pytest.raises(ApiError) as gone:
            c.suggest_once(old, "x", n=1, max_chars=1)
        assert (gone.value.code, gone.value.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_EVICTED")
        assert "was evicted to make room: the session store was full (max_sessions) and it was the least" in (
            gone.value.message
        )
    assert a.get_session(kept).steps == 1


def test_every_replica_reports_the_shared_store(
    redis_server: RedisServer, start_replica: Callable[..., ServerHandle]
) -> None:
    """The session gauges of each replica follow the shared store, not only what that replica did last: a replica
    that created three sessions reports one once another replica deleted two (its alert on store capacity and a
    dashboard's sum read the store, not a stale snapshot)."""
    handles = [start_replica(redis_server.url, reaper_interval_seconds=0.1) for _ in range(2)]
    a, b = (Client(h.target) for h in handles)
    made = [a.create_session("charlm").id for _ in range(3)]
    for sid in made[:2]:
        b.delete_session(sid)

    def gauges() -> list[float | None]:
        return [
            h.server.metrics.registry.get_sample_value(name, labels)
            for h in handles
            for name, labels in (
                ("seqserve_session_store_sessions", {}),
                ("seqserve_sessions_active", {"model": "charlm"}),
            )
        ]

    deadline = time.monotonic() + 10
    while gauges() != [1.0] * 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gauges() == [1.0] * 4
    # ... so each names the store, the same in both, for a dashboard to count its sessions once
    for h in handles:
        assert (
            h.server.metrics.registry.get_sample_value("seqserve_session_store_info", {"store": redis_server.url}) == 1
        )


def test_each_replica_reports_what_the_store_did_for_it(
    redis_server: RedisServer, start_replica: Callable[..., ServerHandle]
) -> None:
    """Hand-overs between replicas (a client moving between them) and takeovers were only in the store's own
    counts and the log; seqserve_session_store_operations_total{op} exports them."""
    handles = [start_replica(redis_server.url) for _ in range(2)]
    a, b = (Client(h.target) for h in handles)
    sid = a.create_session("charlm").id
    for i in range(4):
        (a if i % 2 else b).suggest_once(sid, "ab", n=1, max_chars=1)  # each call moves the session

    def ops(h: ServerHandle) -> dict[str, float]:
        registry = h.server.metrics.registry
        return {
            op: registry.get_sample_value("seqserve_session_store_operations_total", {"op": op}) or 0.0
            for op in ("acquire", "read", "write", "handoff", "conflict", "lost")
        }

    deadline = time.monotonic() + 10
    while min(ops(h)["handoff"] for h in handles) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    for h in handles:
        got = ops(h)
        assert got["handoff"] >= 1 and got["write"] >= 2 and got["read"] >= 1 and got["acquire"] >= 2, got
        assert got["conflict"] == got["lost"] == 0, got


def test_idle_write_back_for_cache_room_never_loses_an_acknowledged_step(
    redis_server: RedisServer, start_replica: Callable[..., ServerHandle]
) -> None:
    """Idle durability with a hot cache too small for one session: the write-back that makes room runs in the
    session's turn, so a step acknowledged meanwhile is never left on a replica that no longer holds the lease
    (the other replica then continued from the older value: a gap in the step counts)."""
    small = {"session_durability": "idle", "session_cache_bytes": 1}
    a, b = (Client(start_replica(redis_server.url, **small).target, timeout=30) for _ in range(2))
    gaps: list[tuple[int, int]] = []
    steps = [0, 0, 0, 0]  # per thread: each of the four sessions must keep stepping
    failures: list[BaseException] = []

    def work(k: int) -> None:
        try:
            sid, n = a.create_session("charlm").id, 0
            end = time.monotonic() + 6
            i = 0
            while time.monotonic() < end:
                got = (b if i % 4 == 3 else a).suggest_once(sid, "x", n=1, max_chars=1).steps
                if got != n + 1:
                    gaps.append((n, got))
                n, i = got, i + 1
                steps[k] += 1
        except BaseException as e:  # an error must fail the test, not end one thread quietly
            failures.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and gaps == []
    assert min(steps) > 50, steps


def test_mid_rolling_update_an_old_replica_says_retry_for_a_newer_version(
    redis_server: RedisServer, start_replica: Callable[..., ServerHandle], tiny_models: Path, tmp_path: Path
) -> None:
    """The new release adds charlm/2 (the default for new sessions); a call on such a session that lands on a
    replica still running the old release gets UNAVAILABLE (REPLICA_BEHIND: retry), never FAILED_PRECONDITION
    (create a new session), and the session goes on intact on the updated replica. So does its blob on import."""
    repo = tmp_path / "models"
    shutil.copytree(tiny_models, repo)
    add_version(repo, "charlm", 1, 2)
    key = "k" * 32
    old = start_replica(redis_server.url, session_signing_key=key)
    new = start_replica(redis_server.url, models=repo, session_signing_key=key)
    c_old, c_new = Client(old.target), Client(new.target)
    s = c_new.create_session("charlm")
    assert s.version == 2
    c_new.suggest_once(s.id, "abc", n=1, max_chars=1)
    with pytest.raises(ApiError) as e:
        c_old.suggest_once(s.id, "d", n=1, max_chars=1)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and e.value.reason == "REPLICA_BEHIND"
    assert "version 2, which this replica does not serve (it serves versions [1]): retry" in e.value.message
    assert c_old.get_session(s.id).steps == 3  # Get needs no model: any replica answers it
    blob = c_new.export_session(s.id)
    with pytest.raises(ApiError) as e:
        c_old.import_session(blob)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "does not serve (it serves versions [1])" in e.value.message
    assert c_new.suggest_once(s.id, "d", n=1, max_chars=1).steps == 4  # nothing was lost on the old replica
    # A version this replica served and then lost (withdrawn) stays FAILED_PRECONDITION: retrying cannot help.
    shutil.rmtree(repo / "charlm" / "2")
    with grpc.insecure_channel(new.target) as ch:  # RepositoryModelLoad: re-reads charlm's folders
        pb_grpc.GRPCInferenceServiceStub(ch).RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="charlm"), timeout=60
        )
    with pytest.raises(ApiError) as e:
        c_new.suggest_once(s.id, "e", n=1, max_chars=1)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "no longer loaded" in e.value.message


def test_a_replica_told_not_to_load_a_model_says_so_for_its_shared_sessions(
    redis_server: RedisServer, start_replica: Callable[..., ServerHandle]
) -> None:
    """A replica started with load_models leaves a model out: a shared session of that model reaching it is not a
    rolling update (no REPLICA_BEHIND, no retry time) but UNAVAILABLE naming the setting and RepositoryModelLoad;
    the replica that serves the model goes on with the session untouched."""
    full = start_replica(redis_server.url)
    subset = start_replica(redis_server.url, load_models=["sentiment"])
    with Client(full.target) as a, Client(subset.target, retries=3) as b:
        s = a.create_session("charlm")
        a.suggest_once(s.id, "abc", n=1, max_chars=1)
        with pytest.raises(ApiError) as e:
            b.suggest_once(s.id, "d", n=1, max_chars=1)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and e.value.reason == "MODEL_UNAVAILABLE"
        assert e.value.retry_after is None
        assert "is pinned to model charlm version 1, which is not loaded: this server loads ['sentiment']" in (
            e.value.message
        )
        assert a.suggest_once(s.id, "d", n=1, max_chars=1).steps == 4


def test_reads_do_not_wait_behind_a_long_complete_on_their_replica(
    redis_server: RedisServer, start_replica: Callable[..., ServerHandle]
) -> None:
    """As in memory (tests/service/api/test_rpcs.py): on the replica running the Complete, Get and Export answer
    at once, from the session as its last finished call stored it."""
    server = start_replica(redis_server.url, max_generate_chars=100_000, session_signing_key="k" * 40)
    reads_during_a_long_completion(server.target)


def test_backspace_alternating_replicas(redis_server: RedisServer, start_replica: Callable[..., ServerHandle]) -> None:
    """A session's checkpoints and recent characters live in its Redis value: typed on one replica, taken back on
    the other, with the answers of the text fed whole (tests/service/api/test_rpcs.py)."""
    a, b = (start_replica(redis_server.url, undo_chars=8) for _ in range(2))
    backspace_across([a.target, b.target])
