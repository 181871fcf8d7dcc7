"""The Redis store against a real redis-server, two store instances standing for two replicas: revisions and
fencing, hand-over between replicas, the hot cache (a step on an owned session reads nothing), counts and bytes
shared through Redis, eviction that skips leased sessions, expiry by Redis TTL, and undecodable state."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import numpy as np
import pytest

from service.core.sessions import StaleSession
from service.core.sessions.redis_store import RedisSessionStore
from service.core.sessions.state import SessionState
from service.errors import FailedPrecondition, ReplicaBehind, SessionConflict, session_ref
from tests.redis.conftest import MakeStore
from tests.redis.servers import RedisServer


def state(sid: str = "s1", model: str = "charlm", ttl: float = 60.0, owner: str = "") -> SessionState:
    return SessionState(
        id=sid,
        model=model,
        version=1,
        model_sha256="ab" * 32,
        task="charlm",
        state={"h0": np.arange(32, dtype=np.float32).reshape(2, 1, 16) / 4},  # steps add integers: exact
        context={},
        steps=0,
        ttl_seconds=ttl,
        created_at=1.0,
        last_used_at=1.0,
        nbytes=1000,
        owner=owner,
    )


async def step(store: RedisSessionStore, sid: str, n: int = 1) -> SessionState:
    """One call as the manager makes it: lease, load, advance, save."""
    async with store.lease(sid):
        s = await store.load(sid)
        assert s is not None
        s.steps += n
        s.state = {"h0": s.state["h0"] + n}
        await store.save(s)
        return s


async def test_a_step_on_an_owned_session_is_one_write_and_no_read(make_store: MakeStore) -> None:
    a = await make_store()
    await a.add(state())
    before = dict(a.counts)
    for _ in range(5):
        await step(a, "s1")
    assert a.counts["write"] - before["write"] == 5
    assert a.counts["read"] == before["read"] and a.counts["acquire"] == before["acquire"]
    b = await make_store()
    loaded = await b.load("s1")
    assert loaded is not None and loaded.steps == 5  # every step is in Redis (step durability)
    np.testing.assert_array_equal(loaded.state["h0"], state().state["h0"] + 5)


async def test_replicas_take_turns_and_hand_over(make_store: MakeStore) -> None:
    a, b = await make_store(), await make_store()
    await a.add(state())
    for i in range(6):  # alternate replicas: each call asks the other to hand the session over
        await step(a if i % 2 == 0 else b, "s1")
    assert b.counts["handoff"] >= 1 and a.counts["handoff"] >= 1
    # Both at once, many times: nothing is lost or applied twice.
    await asyncio.gather(*(step(a if i % 2 else b, "s1") for i in range(20)))
    final = await a.load("s1")
    assert final is not None and final.steps == 26
    np.testing.assert_array_equal(final.state["h0"], state().state["h0"] + 26)


async def test_a_replica_that_handed_a_session_over_lets_the_asker_have_it_first(
    make_store: MakeStore, redis_server: RedisServer
) -> None:
    """The replica that handed a session over at another's request took the free lease straight back for its own
    next call, while the asker was still between two polls, and kept it for as long as it had calls queued: with
    two callers on each of two replicas stepping one session, runs of 168-600 steps, the other replica's calls
    waiting seconds (a hand-over is "after its current call", docs/sessions.md). Now its next call leaves the lease
    to the asker for a moment, then asks for it back at once."""
    a, b = await make_store(), await make_store()
    await a.add(state())
    async with a.lease("s1"):
        a.leases.asked("s1")  # (as B's request over pub/sub: B wants the session, after this call)
    assert redis_server.client().get(a.keys("s1")[1]) is None  # handed over: the lease is free
    a_next = asyncio.ensure_future(step(a, "s1"))
    await asyncio.sleep(0.01)
    assert redis_server.client().get(a.keys("s1")[1]) is None and not a_next.done()  # left free for the asker
    assert (await step(b, "s1")).steps == 1  # the asker's call first
    assert (await a_next).steps == 2  # then A's, which asked B for it back
    assert a.counts["handoff"] >= 1


async def test_a_replacement_keeps_the_ids_lease_between_its_delete_and_add(
    make_store: MakeStore, redis_server: RedisServer
) -> None:
    """A sequence_start on a running sequence replaces its session: deleted, then added, under the call's lease.
    The delete released the lease, so another replica's step on the id took it in between and found no session:
    NOT_FOUND, "unknown or expired", for a sequence that existed before and after (4 of ~900 concurrent steps,
    two replicas). The delete of a replacement keeps the lease: the other replica's step waits, then steps the
    new session."""
    a, b = await make_store(), await make_store()
    await a.add(state())
    waiting: asyncio.Future[SessionState] | None = None
    async with a.lease("s1"):
        await a.delete("s1", hold=True)
        assert redis_server.client().get(a.keys("s1")[1]) == a.replica.encode()  # still this replica's
        waiting = asyncio.ensure_future(step(b, "s1"))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # B waits for the lease instead of finding no session
        fresh = state()
        fresh.steps = 100
        await a.add(fresh)
    assert (await asyncio.wait_for(waiting, 10)).steps == 101  # B stepped the replacement


@pytest.mark.parametrize(
    ("b_does", "refusal"),
    [("steps", SessionConflict), ("steps and lets go", SessionConflict), ("replaces", StaleSession)],
)
async def test_a_late_save_after_a_takeover_is_refused(
    make_store: MakeStore, redis_server: RedisServer, b_does: str, refusal: type[Exception]
) -> None:
    """A's lease runs out (a long pause) and B takes the session over. A's late save is refused: as a conflict
    (ABORTED, retry) when B stepped the same session, also when B had already let its lease go (that was
    "deleted or replaced", NOT_FOUND: the client would create a new session and lose its state); as stale
    (NOT_FOUND) when B replaced it by a new session under the same id (a restarted KServe sequence)."""
    a, b = await make_store(), await make_store()
    await a.add(state())
    async with a.lease("s1"):
        s = await a.load("s1")
        assert s is not None
        redis_server.client().delete(a.keys("s1")[1])
        a.cache.get("s1").owned_until = 0.0  # type: ignore[union-attr]
        if b_does == "replaces":
            await b.delete("s1")
            await b.add(state())
        await step(b, "s1", 10)
        if b_does != "steps":
            redis_server.client().delete(a.keys("s1")[1])
        s.steps += 1
        with pytest.raises(refusal) as refused:
            await a.save(s)
        assert refusal is StaleSession or "taken over by another replica" in str(refused.value)
    got = await b.load("s1")
    assert got is not None and got.steps == 10  # B's step stands, A's was not applied


async def test_a_call_whose_renewal_found_the_lease_taken_is_told_it_was_taken_over(
    make_store: MakeStore, redis_server: RedisServer
) -> None:
    """A replica paused past its lease under a long call (SIGSTOP, a stall); another takes the session over and
    steps it. The paused one's renewal finds the other's lease and drops its copy, so the call's save found nothing
    and said "deleted or replaced" (NOT_FOUND): the client would create a new session and leave the live one. It is
    a conflict (ABORTED: retry), as when the copy is still there."""
    a, b = await make_store(), await make_store()
    await a.add(state())
    async with a.lease("s1"):
        s = await a.load("s1")
        assert s is not None
        redis_server.client().delete(a.keys("s1")[1])  # A's lease ran out (the pause)
        a.cache.get("s1").owned_until = 0.0  # type: ignore[union-attr]
        await step(b, "s1", 10)  # B takes it over
        entry = a.cache.get("s1")
        assert entry is not None
        await a.leases.renew("s1", entry)  # A's maintenance, when it runs again: B holds the lease
        assert a.cache.get("s1") is None
        s.steps += 1
        with pytest.raises(SessionConflict, match="taken over by another replica while this call used it"):
            await a.save(s)
    assert a.counts["conflict"] == 1  # (seqserve_session_store_operations_total{op="conflict"})
    got = await b.load("s1")
    assert got is not None and got.steps == 10
    await b.delete("s1")
    await a.add(state())  # a session deleted meanwhile is still NOT_FOUND (stale) for a late save
    async with a.lease("s1"):
        s = await a.load("s1")
        assert s is not None
        redis_server.client().delete(*a.keys("s1"))
        entry = a.cache.get("s1")
        assert entry is not None
        await a.leases.renew("s1", entry)
        with pytest.raises(StaleSession):
            await a.save(s)


async def test_a_read_beside_a_hand_over_waits_for_the_lease_in_idle_mode(
    make_store: MakeStore, redis_server: RedisServer
) -> None:
    """idle mode: A holds steps in memory and pauses past its lease; B takes the session over and steps it. When A
    runs again, B's hand-over request has A write back (refused: B holds the lease) under the session's turn, and a
    Sessions.Get on A meanwhile saw the session "in use" and answered from A's cached copy without the lease: 3
    steps that were lost, and in_use true with no call running. A read beside a hand-over now takes the lease."""
    a, b = await make_store(session_durability="idle"), await make_store(session_durability="idle")
    await a.add(state())
    for _ in range(3):
        await step(a, "s1")
    redis_server.client().delete(a.keys("s1")[1])  # A's pause: its lease ran out
    a.cache.get("s1").owned_until = 0.0  # type: ignore[union-attr]
    assert (await step(b, "s1", 10)).steps == 10  # B read what Redis had (A never wrote its steps back)
    a.leases.asked("s1")  # B's hand-over request, which A reads when it runs again
    await asyncio.sleep(0)
    assert a.cache.in_use("s1") and not a.in_use("s1")  # A's hand-over holds the turn; no call does
    async with a.lease("s1"):
        s = await a.load("s1")
    assert s is not None and s.steps == 10  # B's, handed back over
    assert a.counts["lost"] == 1  # A's 3 unwritten steps (seqserve_session_store_operations_total{op="lost"})


async def test_an_eviction_record_is_shared_and_a_new_session_under_the_id_clears_it(make_store: MakeStore) -> None:
    a, b = await make_store(), await make_store()
    await a.note_eviction("s1", "alice", "max_sessions", 60)
    assert await b.eviction("s1") == ("alice", "max_sessions") and await b.eviction("s2") is None
    await b.add(state("s1"))  # a KServe sequence started again under the id
    assert await a.eviction("s1") is None
    await a.note_eviction("s3", "", "why", 0.05)  # kept until the session would have expired
    await asyncio.sleep(0.1)
    assert await a.eviction("s3") is None


async def test_a_stale_copy_is_refused_and_delete_wins(make_store: MakeStore) -> None:
    a = await make_store()
    await a.add(state())
    async with a.lease("s1"):
        s = await a.load("s1")
        assert s is not None
        assert (await a.delete("s1")) is not None
        with pytest.raises(StaleSession):
            await a.save(s)
    assert await a.load("s1") is None


async def test_counts_bytes_and_owners_are_shared(make_store: MakeStore) -> None:
    a, b = await make_store(session_index_shards=4), await make_store(session_index_shards=4)
    for i in range(6):
        await (a if i % 2 else b).add(state(f"s{i}", model="m" if i < 4 else "n", owner="alice" if i < 2 else ""))
    for store in (a, b):
        u = await store.usage()
        assert (u.count, u.bytes, u.per_model) == (6, 6000, {"m": 4, "n": 2})
        assert (await store.owner_usage("alice")).count == 2
    await b.delete("s0")  # owned by a: b asks for it first
    assert (await a.usage()).count == 5 and (await a.owner_usage("alice")).count == 1


async def test_eviction_takes_the_oldest_session_nobody_holds(make_store: MakeStore) -> None:
    a, b = await make_store(), await make_store()
    await a.add(state("old", ttl=30))
    await a.add(state("held", ttl=10))  # expires first, but b holds it
    await a.add(state("recent", ttl=20))  # a used it within its lease: not evicted either
    await b.add(state("young", ttl=60))
    a.cache.pop("old")
    await a.conn.script("lease", a.keys("old")[1:], [a.replica, 0])  # as after a's lease ran out
    async with b.lease("held"):
        victim = await b.evict_lru(keep=None)
        assert victim is not None and victim.id == "old" and victim.steps == 0
        assert (await b.evict_lru(keep="young")) is None
    assert (await a.usage()).count == 3
    assert await b.evict_lru(owner="nobody") is None


async def test_two_replicas_evicting_at_once_count_one_eviction(make_store: MakeStore) -> None:
    """Replica a deletes the oldest session's value; before a's index removal, replica b evicts too: b found the
    value gone, won the index removal and reported an expiry, while a reported the eviction (one session, counted
    twice). a now keeps the lease until its index removal: b skips the session."""
    a, b = await make_store(), await make_store()
    await a.add(state("old", ttl=30))
    await b.add(state("young", ttl=60))
    a.cache.pop("old")
    await a.conn.script("lease", a.keys("old")[1:], [a.replica, 0])  # as after a's lease ran out
    seen: list[SessionState | None] = []
    remove = a.index.remove

    async def b_evicts_first(sid: str) -> Any:
        seen.append(await b.evict_lru(keep="young"))
        return await remove(sid)

    a.index.remove = b_evicts_first  # type: ignore[method-assign,assignment]
    victim = await a.evict_lru(keep="young")
    assert victim is not None and victim.id == "old" and victim.expires_at == 31.0  # its state: evicted, by a
    assert seen == [None]  # b: nothing to evict, nothing counted
    assert (await a.usage()).count == 1 and await b.conn.command("EXISTS", *a.keys("old")) == 0  # lease handed back


async def test_eviction_reports_a_session_whose_value_expired_as_expired(
    make_store: MakeStore, redis_server: RedisServer
) -> None:
    """The index outlives a value's TTL by a margin; eviction that meets such a session drops it from the index
    and returns it as expired (the room it freed is enough: the manager counts an expiry, evicts nobody)."""
    a = await make_store()
    await a.add(state("lapsed", ttl=30))
    await a.add(state("live", ttl=60))
    a.cache.pop("lapsed")
    await a.conn.script("lease", a.keys("lapsed")[1:], [a.replica, 0])
    redis_server.client().delete(a.keys("lapsed")[0])  # as when its TTL ran out
    victim = await a.evict_lru()
    assert victim is not None and victim.id == "lapsed" and victim.expires_at <= time.time()
    assert (await a.usage()).count == 1 and await a.load("live") is not None


async def test_a_call_longer_than_the_ttl_keeps_its_session(make_store: MakeStore, redis_server: RedisServer) -> None:
    """A session in use is not idle: its value lives at least as long as the lease this replica holds (and renews
    during a long call), so a call longer than the session's TTL saves it. A value Redis lost (a restart without
    persistence) is never written back from a replica's copy: that session is gone for every replica alike."""
    a = await make_store(session_lease_seconds=0.8)
    await a.add(state("long", ttl=0.2))
    async with a.lease("long"):
        s = await a.load("long")
        assert s is not None
        await asyncio.sleep(2.0)  # ten TTLs and more than two leases: the lease is renewed while in use
        s.steps += 1
        await a.save(s)
    again = await a.load("long")
    assert again is not None and again.steps == 1
    async with a.lease("long"):
        s = await a.load("long")
        assert s is not None
        redis_server.client().delete(a.keys("long")[0])  # lost by Redis while in use
        s.steps += 1
        with pytest.raises(StaleSession):
            await a.save(s)
    assert await a.load("long") is None


async def test_expired_sessions_vanish_and_the_index_forgets_them(make_store: MakeStore) -> None:
    a = await make_store()
    await a.add(state("short", ttl=0.3))
    await a.add(state("long", ttl=60))
    b = await make_store()
    # Bounded waits (a loaded machine only makes them longer): Redis expires the value by itself, and the index
    # forgets the session a quarter of its TTL later.
    for _ in range(200):
        if await b.load("short") is None:
            break
        await asyncio.sleep(0.05)
    assert await b.load("short") is None
    gone: list[SessionState] = []
    for _ in range(200):
        gone += await b.pop_expired(0.0, 100)
        if gone:
            break
        await asyncio.sleep(0.05)
    assert [g.id for g in gone] == ["short"] and gone[0].model == "charlm"
    assert (await a.usage()).count == 1


async def test_undecodable_state_fails_naming_the_session(make_store: MakeStore, redis_server: RedisServer) -> None:
    a = await make_store()
    await a.add(state("bad"))
    await a.close()
    redis_server.client().set(a.keys("bad")[0], b"0" * 32 + b"not a session")
    b = await make_store()
    with pytest.raises(FailedPrecondition, match=re.escape(f"session {session_ref('bad')} cannot be read")):
        async with b.lease("bad"):
            pass
    body = state("bad").to_bytes()
    for head in (b"z" * 16 + b"0" * 16, b"+" + b"0" * 31, b"0_" * 16):  # a damaged revision: not 16 hex digits
        redis_server.client().set(a.keys("bad")[0], head + body)
        c = await make_store()
        with pytest.raises(FailedPrecondition, match=re.escape(f"session {session_ref('bad')} cannot be read")):
            async with c.lease("bad"):
                pass
        await c.close()


@pytest.mark.parametrize("newer", [(2, 0), (1, 1)], ids=["format-2", "unknown-flag"])
async def test_a_session_from_a_newer_release_is_retried_not_given_up(
    make_store: MakeStore, redis_server: RedisServer, newer: tuple[int, int]
) -> None:
    """Mid rolling update, a record with a format or a must-understand flag this release does not know answers
    UNAVAILABLE (retry: an updated replica reads it), not FAILED_PRECONDITION (create a new session); the record
    stays as it was."""
    a = await make_store()
    await a.add(state("new"))
    await a.close()
    key = a.keys("new")[0]
    raw = redis_server.client().get(key)
    assert isinstance(raw, bytes)  # (the client does not decode responses)
    fmt, flags = newer
    patched = raw[:36] + fmt.to_bytes(2, "little") + flags.to_bytes(2, "little") + raw[40:]  # after head + magic
    redis_server.client().set(key, patched)
    b = await make_store()
    with pytest.raises(
        ReplicaBehind,
        match=re.escape(f"session {session_ref('new')} was written by a newer seqserve") + f".*format {fmt} with flags",
    ):
        async with b.lease("new"):
            pass
    await b.close()
    assert redis_server.client().get(key) == patched


@pytest.mark.parametrize("limit", ["quota_sessions", "max_sessions"])
async def test_concurrent_creates_never_pass_a_limit(make_store: MakeStore, limit: str) -> None:
    """Twenty creates at once against a limit of three: the check and the add are separate round trips on Redis,
    so they are made one step per process; three sessions live, the rest are refused."""
    from service.core.sessions import SessionManager
    from service.errors import Overloaded
    from service.metrics import Metrics
    from service.settings import Settings

    fields: dict[str, Any] = {limit: 3, "session_full_policy": "reject"}
    settings = Settings(**fields)
    manager = SessionManager(settings, Metrics(runtime_collectors=False), await make_store())
    results = await asyncio.gather(*(manager.add(state(f"c{i}")) for i in range(20)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 17 and all(isinstance(r, Overloaded) for r in refused)
    assert (await manager.usage()).count == 3


@pytest.mark.parametrize(
    ("limit", "owner"), [("quota_sessions", "alice"), ("quota_sessions", ""), ("max_sessions", "")]
)
async def test_expired_sessions_stop_counting_when_their_ttl_ends(
    make_store: MakeStore, limit: str, owner: str
) -> None:
    """The index learns of an expiry only at its deadline, a quarter of the TTL after it (so a step rarely has to
    move it). A principal whose sessions had all expired was still refused by its quota until then (up to 150 s
    with the default TTL), and could not even delete them (NOT_FOUND). A refusal now checks the sessions first."""
    from service.core.context import set_principal
    from service.core.sessions import SessionManager
    from service.errors import Overloaded
    from service.metrics import Metrics
    from service.settings import Settings

    set_principal(owner)  # (this test's own context)
    fields: dict[str, Any] = {limit: 2, "session_full_policy": "reject"}
    settings = Settings(**fields)
    manager = SessionManager(settings, Metrics(runtime_collectors=False), await make_store())
    for i in range(2):
        await manager.add(state(f"old{i}", ttl=4.0))
    with pytest.raises(Overloaded):
        await manager.add(state("early", ttl=4.0))
    await asyncio.sleep(4.2)  # their values have expired; their index deadlines are 1 s away
    await manager.add(state("new", ttl=60.0))
    assert (await manager.usage()).count == 1


async def test_the_index_forgets_an_entry_only_if_its_deadline_has_not_moved(make_store: MakeStore) -> None:
    """(The id may have been created again between finding its value gone and forgetting it.)"""
    from service.core.sessions.redis_index import Indexed

    store = await make_store()
    entry = Indexed("s", 1000, "charlm", "alice")
    await store.index.put(entry, 5_000)
    assert await store.index.forget("s", 4_999) is None
    assert (await store.index.usage("alice")).count == 1 and (await store.index.usage()).count == 1
    assert await store.index.forget("s", 5_000) == entry
    assert (await store.index.usage("alice")).count == 0 and (await store.index.usage()).count == 0


async def test_a_refusal_checks_one_batch_of_sessions(make_store: MakeStore, redis_server: RedisServer) -> None:
    """The exact count a refusing quota needs looked up every indexed session (one EXISTS each, up to 1,000 per
    shard), and a full store under evict_lru did the same on every create: 40x slower creates at 10,000 sessions.
    Now one batch of the soonest deadlines, more only while a whole batch had expired; none for eviction."""
    from service.core.sessions import SessionManager
    from service.core.sessions.redis_store import GONE_BATCH
    from service.errors import Overloaded
    from service.metrics import Metrics
    from service.settings import Settings

    def exists_calls() -> int:
        stats = redis_server.client().info("commandstats")
        return int(stats.get("cmdstat_exists", {}).get("calls", 0))

    refusing = SessionManager(Settings(quota_sessions=100), Metrics(runtime_collectors=False), await make_store())
    for i in range(100):
        await refusing.add(state(f"q{i}"))
    before = exists_calls()
    with pytest.raises(Overloaded):
        await refusing.add(state("one-more"))
    assert 0 < exists_calls() - before <= GONE_BATCH
    full = SessionManager(Settings(max_sessions=200), Metrics(runtime_collectors=False), await make_store())
    for i in range(100):  # (the other replica's 100 are leased to it: eviction takes this one's own)
        await full.add(state(f"f{i}"))
    before = exists_calls()
    await full.add(state("evicts-one"))  # evict_lru: the oldest goes, no lookups
    assert exists_calls() == before and (await full.usage()).count == 200


@pytest.mark.parametrize("lease_key", ["still held", "expired too"])
async def test_a_long_call_whose_renewal_came_late_keeps_its_session(
    make_store: MakeStore, redis_server: RedisServer, lease_key: str
) -> None:
    """The background renewal of a session in a long call ran only while the time this replica counts as its own
    had not passed: once its loop was held up past it (a loaded machine), the lease and then the value expired and
    the call's save found the session "deleted or replaced". A late renewal still renews while no other replica
    holds the lease."""
    a = await make_store()
    await a.add(state(ttl=1.0))
    r = redis_server.client()
    value, lease = a.keys("s1")
    async with a.lease("s1"):
        s = await a.load("s1")
        assert s is not None
        e = a.cache.get("s1")
        assert e is not None
        e.owned_until = time.monotonic() - 0.1  # this replica's loop was held up past it
        if lease_key == "expired too":
            r.delete(lease)
        r.pexpire(value, 300)  # the value's TTL nearly run out
        await a.leases.maintain_once()
        assert e.owned_until > time.monotonic()
        assert r.get(lease) == a.replica.encode() and r.pttl(value) > 1000
        s.steps += 1
        await a.save(s)
    loaded = await (await make_store()).load("s1")
    assert loaded is not None and loaded.steps == 1
