"""SessionState's binary form (round trip, every corruption refused) and the store protocol's bookkeeping:
leases in arrival order, optimistic revisions, LRU eviction that skips leased sessions, expiry from the heap,
usage counters, and that the bytes-only store really keeps bytes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from pathlib import Path

import numpy as np
import pytest

from service.core.dataplane import CoreDataPlane
from service.core.sessions import InMemorySessionStore, SessionDecodeError, SessionState, StaleSession, store_label
from service.core.types import ModelRef
from service.errors import Overloaded, SessionNotFound
from tests.stores import BytesSessionStore


def state(sid: str = "s1", model: str = "charlm", last_used: float = 100.0, ttl: float = 10.0) -> SessionState:
    rng = np.random.default_rng(0)
    return SessionState(
        id=sid,
        model=model,
        version=3,
        model_sha256="ab" * 32,
        task="charlm",
        state={"h0": rng.normal(size=(2, 1, 16)).astype(np.float32), "c0": np.zeros((2, 1, 16), np.float32)},
        context={"logits": rng.normal(size=(65,)).astype(np.float32), "ids": np.arange(5, dtype=np.int64)},
        steps=42,
        ttl_seconds=ttl,
        created_at=50.0,
        last_used_at=last_used,
        nbytes=1234,
        metadata={"task": "charlm", "note": "é\n"},
        owner="alice",
        revision=7,
    )


def test_round_trip_keeps_every_field_and_array_exactly() -> None:
    s = state()
    back = SessionState.from_bytes(s.to_bytes())
    for name in ("id", "model", "version", "model_sha256", "task", "steps", "ttl_seconds", "created_at"):
        assert getattr(back, name) == getattr(s, name)
    assert (back.last_used_at, back.nbytes, back.metadata, back.owner, back.revision) == (
        100.0,
        1234,
        {"task": "charlm", "note": "é\n"},
        "alice",
        7,
    )
    for group in ("state", "context"):
        mine, theirs = getattr(s, group), getattr(back, group)
        assert list(mine) == list(theirs)
        for k in mine:
            assert theirs[k].dtype == mine[k].dtype and theirs[k].shape == mine[k].shape
            np.testing.assert_array_equal(theirs[k], mine[k])
            assert theirs[k].flags.writeable  # a private copy, not a view of the bytes


def test_layout_is_a_small_header_and_aligned_little_endian_arrays() -> None:
    data = state().to_bytes()
    magic, fmt, flags, head_len = struct.unpack_from("<4sHHI", data)
    assert (magic, fmt, flags) == (b"SQSS", 1, 0)
    header = json.loads(data[12 : 12 + head_len])
    start = 12 + head_len + (-(12 + head_len)) % 8
    first = header["arrays"][0]
    assert first["dtype"] == "<f4" and first["offset"] % 8 == 0
    raw = np.frombuffer(data[start + first["offset"] : start + first["offset"] + first["nbytes"]], "<f4")
    np.testing.assert_array_equal(raw.reshape(first["shape"]), state().state["h0"])
    assert b"pickle" not in data and len(data) < 2 * sum(a["nbytes"] for a in header["arrays"]) + 1024


def _array(dtype: str = "<f4", shape: int = 2, offset: int = 0) -> dict[str, object]:
    return {
        "arrays": [{"group": "state", "name": "h", "dtype": dtype, "shape": [shape], "offset": offset, "nbytes": 8}]
    }


def _with_header(data: bytes, edit: dict[str, object]) -> bytes:
    _, _, _, head_len = struct.unpack_from("<4sHHI", data)
    header = json.loads(data[12 : 12 + head_len])
    header.update(edit)
    head = json.dumps(header).encode()
    pad = (-(12 + len(head))) % 8
    old_start = 12 + head_len + (-(12 + head_len)) % 8
    return struct.pack("<4sHHI", b"SQSS", 1, 0, len(head)) + head + b"\0" * pad + data[old_start:]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: d[:5], "at least 12 bytes"),
        (lambda d: b"XXXX" + d[4:], "bad magic"),
        (lambda d: d[:4] + struct.pack("<H", 9) + d[6:], "format 9 with flags 0x0 is from a newer seqserve"),
        (lambda d: d[:6] + struct.pack("<H", 2) + d[8:], "format 1 with flags 0x2 is from a newer seqserve"),
        (lambda d: d[:4] + struct.pack("<H", 0) + d[6:], "format 0 is not supported"),
        (lambda d: d[:8] + struct.pack("<I", 10**9) + d[12:], "does not fit"),
        (lambda d: d[:12] + b"}" + d[13:], "not valid JSON"),
        (lambda d: _with_header(d, {"version": "3"}), "'version' must be an integer"),
        (lambda d: _with_header(d, {"ttl_seconds": float("inf")}), "finite number"),
        (lambda d: _with_header(d, {"metadata": {"a": 1}}), "metadata must map strings"),
        (lambda d: _with_header(d, _array(dtype="|O")), "unsupported group"),
        (lambda d: _with_header(d, _array(shape=3)), "does not match 8 bytes"),
        (lambda d: _with_header(d, _array(offset=10**6)), "lies outside"),
        (lambda d: _with_header(d, {"owner": None}), "'owner' must be a string"),
        (lambda d: _with_header(d, {"arrays": "nope"}), "malformed"),
    ],
)
def test_corrupt_bytes_are_refused_with_a_reason(corrupt: object, message: str) -> None:
    assert callable(corrupt)
    with pytest.raises(SessionDecodeError, match=message):
        SessionState.from_bytes(corrupt(state().to_bytes()))


@pytest.mark.parametrize("kind", [InMemorySessionStore, BytesSessionStore])
async def test_store_revisions_leases_eviction_expiry_and_usage(kind: type[InMemorySessionStore[object]]) -> None:
    store = kind()
    for i in range(4):
        await store.add(state(f"s{i}", model="a" if i < 3 else "b", last_used=100.0 + i))
    assert await store.usage() == type(await store.usage())(4, 4 * 1234, {"a": 3, "b": 1})
    # Optimistic revisions: a copy loaded before someone else saved is stale.
    one, two = await store.load("s0"), await store.load("s0")
    assert one is not None and two is not None and one is not two
    one.steps = 43
    await store.save(one)
    with pytest.raises(StaleSession):
        await store.save(two)
    again = await store.load("s0")
    assert again is not None and again.steps == 43 and again.revision == two.revision + 1
    # Leases: the second holder waits for the first; eviction skips leased sessions and `keep`.
    order: list[str] = []

    async def hold(tag: str, pause: float) -> None:
        async with store.lease("s1"):
            order.append(tag)
            await asyncio.sleep(pause)

    first = asyncio.create_task(hold("first", 0.05))
    await asyncio.sleep(0)
    second = asyncio.create_task(hold("second", 0))
    await asyncio.sleep(0.01)
    victim = await store.evict_lru(keep="s2")  # LRU order: s1 (leased), s2 (kept), s3, s0 (saved last)
    assert victim is not None and victim.id == "s3"
    await asyncio.gather(first, second)
    assert order == ["first", "second"]
    # Expiry: s1 expired at 111, s2 at 112; s0 was saved with last_used 100 -> 110.
    assert [s.id for s in await store.pop_expired(111.5, 10)] == ["s0", "s1"]
    assert [s.id for s in await store.pop_expired(111.5, 10)] == []
    assert (await store.usage()).count == 1
    # A copy of an older incarnation of an id never matches the new one (a sequence restarted meanwhile).
    older = await store.load("s2")
    assert older is not None
    await store.add(state("s2", model="a", last_used=103.0))
    with pytest.raises(StaleSession):
        await store.save(older)
    assert await store.delete("s2") is not None and await store.delete("s2") is None
    assert await store.usage() == type(await store.usage())(0, 0, {})


async def test_usage_and_eviction_per_owner() -> None:
    store: InMemorySessionStore[SessionState] = InMemorySessionStore()
    for i, owner in enumerate(["alice", "bob", "alice", "bob"]):
        s = state(f"s{i}")
        s.owner = owner
        await store.add(s)
    alice = await store.owner_usage("alice")
    assert (alice.count, alice.bytes) == (2, 2 * 1234) and (await store.owner_usage("carol")).count == 0
    victim = await store.evict_lru(owner="bob")  # bob's least recently used, although alice's s0 is older
    assert victim is not None and victim.id == "s1"
    loaded = await store.load("s3")
    assert loaded is not None
    await store.save(loaded)  # s3 is now bob's most recent... and his only one
    assert (await store.evict_lru(owner="bob", keep="s3")) is None
    assert (await store.owner_usage("bob")).count == 1 and (await store.usage()).count == 3


async def test_idle_sessions_are_nothing_the_garbage_collector_walks() -> None:
    """A packed session and its bookkeeping are plain tuples of atomic values, which CPython stops tracking at its
    next collection: thousands of idle sessions add no tracked objects, so a full collection of a server holding
    250,000 of them costs what it costs without them (as class instances they were two each: ~300 ms more)."""
    import gc

    store: InMemorySessionStore[object] = InMemorySessionStore(hot=2)
    await store.add(state("s0"))  # the first one interns the layout and metadata every later one shares; the
    for _ in range(4):  # collector untracks nested tuples one level per collection: those after a few, once
        gc.collect()
    before = len(gc.get_objects())
    for i in range(1, 2000):
        await store.add(state(f"s{i}", last_used=100.0 + i))  # (each SessionState goes once packed)
    saved = await store.load("s7")
    assert saved is not None
    await store.save(saved)  # a saved session's bookkeeping is replaced, and stays untracked too
    del saved
    gc.collect()
    added = len(gc.get_objects()) - before
    assert -50 < added < 50, f"{added} tracked objects for 1,999 more idle sessions"
    assert not gc.is_tracked(store._records["s1"]) and not gc.is_tracked(store._meta["s7"])
    loaded = await store.load("s1")  # and they load back whole
    assert loaded is not None and (loaded.steps, loaded.owner, loaded.metadata) == (42, "alice", state().metadata)


async def test_recently_saved_sessions_are_kept_as_they_are_and_the_rest_compact() -> None:
    """The ``hot`` most recently saved sessions skip the pack: each load hands out a copy of its own and a caller
    changing its session after the save changes nothing stored; a save that makes ``hot + 1`` packs the one saved
    longest ago, which loads back the same; recency (eviction) follows use, not the hot order."""
    store: InMemorySessionStore[object] = InMemorySessionStore(hot=2)
    for sid in ("a", "b", "c"):
        await store.add(state(sid))
    assert all(type(store._records[sid]) is tuple for sid in "abc")  # created: compact until saved
    for sid in ("a", "b"):
        s = await store.load(sid)
        assert s is not None
        s.steps, s.state = 43, {**s.state, "h0": s.state["h0"] + 1}
        await store.save(s)
        s.steps, s.state["h0"] = 99, np.zeros(1)  # the caller's object, after its save
    assert list(store._hot) == ["a", "b"] and type(store._records["c"]) is tuple
    first = await store.load("a")
    assert first is not None and first.steps == 43 and first.state["h0"].shape == (2, 1, 16)
    np.testing.assert_array_equal(first.state["h0"], state().state["h0"] + 1)
    first.steps = 7
    first.metadata["note"] = "changed"
    again = await store.load("a")
    assert again is not None and (again.steps, again.metadata["note"]) == (43, "é\n")

    c = await store.load("c")
    assert c is not None
    await store.save(c)  # a third hot one: "a", saved longest ago, is packed in its place in the recency order
    assert list(store._hot) == ["b", "c"] and type(store._records["a"]) is tuple
    packed = await store.load("a")
    assert packed is not None and packed.steps == 43 and packed.revision == again.revision
    np.testing.assert_array_equal(packed.state["h0"], state().state["h0"] + 1)
    await store.save(packed)  # stale copies are still refused by revision, hot or packed
    with pytest.raises(StaleSession):
        await store.save(again)
    b1, b2 = await store.load("b"), await store.load("b")  # two loads of a hot one: the second save is stale
    assert b1 is not None and b2 is not None
    await store.save(b1)
    with pytest.raises(StaleSession):
        await store.save(b2)
    evicted = await store.evict_lru()
    assert evicted is not None and evicted.id == "c" and evicted.steps == 42  # least recently used: c
    assert list(store._hot) == ["a", "b"] and "c" not in store._records
    assert (await store.delete("a")) is not None and list(store._hot) == ["b"]
    assert (await store.usage()).count == 1


async def test_expiry_heap_stays_bounded_under_create_delete_churn() -> None:
    store: InMemorySessionStore[SessionState] = InMemorySessionStore()
    for i in range(5000):
        await store.add(state(f"s{i}"))
        await store.delete(f"s{i}")
    assert len(store._expiry) <= 1024 + 1  # rebuilt when stale entries dominate


async def test_the_bytes_store_really_serializes(dp: CoreDataPlane) -> None:
    s = await dp.create_session(ModelRef("charlm"))
    await dp.char_step(ModelRef("charlm"), "abc", session_id=s.id)
    store = dp.sessions.store
    if isinstance(store, BytesSessionStore):
        assert store.encoded >= 2  # created, then saved after the step
    assert (await dp.get_session(s.id)).steps == 3


async def test_begin_stores_only_a_first_step_that_succeeded(tmp_path: Path) -> None:
    """``SessionManager.begin``: the new session is stored when the block ends without an error, replacing the
    id's running one; a failed block or a refused replacement (too big for the store) leaves that one as it was."""
    from service.core.sessions import SessionManager
    from tests.service.core.conftest import RecordingMetrics, core_settings

    manager = SessionManager(
        core_settings(tmp_path, max_session_bytes=10_000),
        RecordingMetrics(),
        InMemorySessionStore(),
        clock=lambda: 100.0,
    )
    await manager.add(state("seq"))
    with pytest.raises(RuntimeError):
        async with manager.begin(state("seq")) as fresh:
            fresh.steps = 1
            raise RuntimeError("the first step was refused")
    assert (await manager.get("seq")).steps == 42
    big = state("seq")
    big.nbytes = 20_000
    with pytest.raises(Overloaded, match="max_session_bytes"):
        async with manager.begin(big) as fresh:
            fresh.steps = 1
    kept = await manager.get("seq")
    assert kept.steps == 42 and (await manager.usage()).count == 1
    async with manager.begin(state("seq")) as fresh:
        fresh.steps = 1
    assert (await manager.get("seq")).steps == 1 and (await manager.usage()).count == 1
    async with manager.begin(state("seq"), end=True) as fresh:  # a one-request sequence: ends the running one,
        fresh.steps = 1  # stores nothing
    with pytest.raises(SessionNotFound):
        await manager.get("seq")
    assert (await manager.usage()).count == 0


async def test_a_session_calls_facts_count_only_once_its_state_is_stored(tmp_path: Path) -> None:
    """``after_commit`` actions (the live coverage an Observe scored) run when the call's state was stored, and are
    dropped when it was not: a save refused as stale, a replacement refused for room. A call that failed before
    changing the session saves nothing, not even its idle time."""
    from service.core.context import after_commit
    from service.core.sessions import SessionManager
    from tests.service.core.conftest import RecordingMetrics, core_settings

    now = [100.0]
    store: InMemorySessionStore[object] = InMemorySessionStore()
    manager = SessionManager(
        core_settings(tmp_path, max_session_bytes=10_000), RecordingMetrics(), store, clock=lambda: now[0]
    )
    counted: list[str] = []
    await manager.add(state("s"))
    async with manager.use("s") as s:
        after_commit(lambda: counted.append("stored"))
        s.steps += 1
    with pytest.raises(SessionNotFound, match="deleted or replaced"):
        async with manager.use("s") as s:
            after_commit(lambda: counted.append("stale"))
            s.steps += 1
            replacement = state("s")
            replacement.owner = ""  # the anonymous principal's, as the manager made the first
            await store.add(replacement)  # replaced meanwhile: the save is refused
    big = state("t")
    big.nbytes = 20_000
    with pytest.raises(Overloaded):
        async with manager.begin(big) as fresh:
            after_commit(lambda: counted.append("refused start"))
            fresh.steps = 1
    assert counted == ["stored"]
    before = (await manager.get("s")).last_used_at
    now[0] = 105.0
    with pytest.raises(RuntimeError):
        async with manager.use("s"):
            raise RuntimeError("refused before any change")
    assert (await manager.get("s")).last_used_at == before


def test_a_store_url_is_redacted_whatever_its_password_holds() -> None:
    """``redact``: the password of a session store URL, in the user part or in the query (which redis-py reads
    too), never shows, also when it holds "@", "/" or "?" (a query password with "@" showed its end)."""
    from service.core.sessions import redact

    cases = {
        "redis://h:1/0?password=a@b": "redis://h:1/0?password=***",
        "redis://h:1/0?db=0&password=p4ss@x&ssl=1": "redis://h:1/0?db=0&password=***&ssl=1",
        "redis://app:p4ss@h:1/0?password=q@r": "redis://app:***@h:1/0?password=***",
        "redis://:se@cr/et@h:1/0": "redis://:***@h:1/0",
        "redis://:se?cr@h:1/0": "redis://:***@h:1/0",
        "redis://h:1/0": "redis://h:1/0",
        "memory://": "memory://",
    }
    assert {url: redact(url) for url in cases} == cases
    for url in cases:
        assert not any(secret in redact(url) for secret in ("p4ss", "se@", "cr/et", "se?cr", "a@b", "@b", "q@r"))


def test_the_store_label_is_shared_by_replicas_of_one_redis_and_never_by_two_memory_stores() -> None:
    """``seqserve_session_store_info``'s label: dashboards count a shared store once and add distinct ones."""
    assert store_label("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"  # no password in a label
    assert store_label("memory://") == f"memory://{socket.gethostname()}/{os.getpid()}"
