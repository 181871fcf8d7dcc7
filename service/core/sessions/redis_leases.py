"""Leases of the Redis store: which replica owns which session, and everything that follows from owning one.

A replica that uses a session takes its *lease* (a key holding the replica's id, with a TTL of
``session_lease_seconds``) and keeps it while the session stays in use: the session is then in this replica's
hot cache (``redis_cache``) and a step reads nothing from Redis. Every write is one Lua script that checks the
lease (fencing: a replica that lost it is refused, ``SessionConflict``) and the revision it read (compare and
set: a stale copy is refused, ``StaleSession``). A replica that needs a session another one owns asks it over
pub/sub to hand it over (the owner writes back what it kept and drops the lease after its current call) and
polls until the lease is free; if the owner died, its lease expires.

In the background: hand-over requests are answered, leases of sessions in long calls (or holding unwritten
steps) are renewed, and in ``idle`` durability unwritten steps are written back (idle, every
``session_flush_seconds``, when the cache needs room).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Coroutine
from typing import Any

from service.core.aio import cancel_and_wait
from service.core.sessions.redis_cache import Entry, HotCache
from service.core.sessions.redis_conn import Arg, RedisConn, tag
from service.core.sessions.redis_index import Indexed, SessionIndex
from service.core.sessions.redis_scripts import HEAD_CHARS, head, parse_head
from service.core.sessions.state import NewerSessionFormat, SessionState
from service.core.sessions.store import StaleSession
from service.errors import FailedPrecondition, ReplicaBehind, SessionConflict, StoreUnavailable, session_ref
from service.metrics import STORE_OPERATIONS
from service.settings import Settings

log = logging.getLogger(__name__)
OWNED = 0.8  # of the lease's TTL this replica counts as its own (the rest absorbs round trips and clock drift)
POLL_MAX = 0.05  # seconds between two tries for a lease another replica holds (doubling from 2 ms)
ASK_EVERY = 0.25  # seconds between two hand-over requests to the holder
# After handing a session over to a replica that asked, this replica's own next call on it waits this long before
# it tries for the lease: long enough for the asker's poll (at most POLL_MAX apart) to take it first. Without it
# the next call queued here took the lease straight back, and a replica with calls queued kept the session for as
# long as it had any, the asker's calls waiting seconds.
HANDOVER_GRACE = 2 * POLL_MAX
TAKEN_KEPT = 3600.0  # seconds a lease another replica took under a call here is remembered, for that call's save


def incarnation() -> int:
    """The revision of a session stored under its id for the first time (``RedisSessionStore.add``): 48 random
    bits, shifted, so that no copy of an older session with that id matches it; each save adds 1."""
    return secrets.randbits(48) << 8


def stepped_elsewhere(expected: str, stored: bytes) -> bool:
    """Whether the ``stored`` revision (16 hex digits, empty when the session is gone) is a later save of the same
    session as ``expected``: another replica stepped it. A session created again under its id (a restarted KServe
    sequence) starts from a new ``incarnation()``, no small step above the old revision."""
    try:
        return 0 < int(stored, 16) - int(expected, 16) < 2**32
    except ValueError:
        return False


def taken_over(session_id: str) -> SessionConflict:
    return SessionConflict(
        f"session {session_ref(session_id)} was taken over by another replica while this call used it; nothing was "
        "saved: retry the call"
    )


def session_keys(session_id: str) -> list[str]:
    """[value, lease]: one hash tag, one cluster slot."""
    t = tag(session_id)
    return [f"ss:{{{t}}}:v", f"ss:{{{t}}}:l"]


def eviction_key(session_id: str) -> str:
    """The record that the session was evicted (whose it was, why), in its slot, until it would have expired."""
    return f"ss:{{{tag(session_id)}}}:x"


class Leases:
    def __init__(self, conn: RedisConn, index: SessionIndex, settings: Settings) -> None:
        self.conn = conn
        self.index = index
        self.replica = secrets.token_hex(12)  # a new id per process: a restarted replica owns nothing
        self.idle_mode = settings.session_durability == "idle"
        self.lease_s = settings.session_lease_seconds
        self.lease_ms = int(self.lease_s * 1000)
        self.flush_s = settings.session_flush_seconds
        self.idle_s = settings.session_idle_seconds
        # Redis keeps a value this much past its TTL in idle mode: the state in the cache may be newer.
        self.slack_s = self.flush_s + self.idle_s + self.lease_s if self.idle_mode else 0.0
        self.cache = HotCache(settings.session_cache_bytes)
        # What this replica asked of Redis, and what it lost to another (seqserve_session_store_operations_total).
        self.counts: dict[str, int] = dict.fromkeys(STORE_OPERATIONS, 0)
        self.tasks: list[asyncio.Task[None]] = []
        self._handing: set[str] = set()
        self._given: dict[str, float] = {}  # session -> when this replica handed it to a replica that asked
        self.taken: dict[str, float] = {}  # session -> when a renewal found another replica holding its lease
        self._stopping = False

    # --- keys -----------------------------------------------------------------------------------------
    @staticmethod
    def keys(session_id: str) -> list[str]:
        return session_keys(session_id)

    @staticmethod
    def channel(replica: str) -> str:
        return f"ss:handoff:{replica}"

    def value(self, s: SessionState, deadline_ms: int) -> bytes:
        return head(s.revision, deadline_ms) + s.to_bytes()

    def ttl_ms(self, s: SessionState) -> int:
        return max(1, int((s.ttl_seconds + self.slack_s) * 1000))

    def value_ms(self, s: SessionState, keeps_lease: bool) -> int:
        """The TTL of a value written now: one written under a lease the writer keeps outlives that lease, so a
        call longer than the session's TTL finds it (RENEW extends both while the call runs)."""
        return max(self.ttl_ms(s), self.lease_ms) if keeps_lease else self.ttl_ms(s)

    def deadline(self, e: Entry | None, s: SessionState) -> tuple[int, bool]:
        """(index deadline, whether the index must learn it): moved only when the TTL runs past it."""
        need = int(time.time() * 1000) + self.ttl_ms(s)
        if e is not None and need <= e.deadline_ms:
            return e.deadline_ms, False
        return need + int(s.ttl_seconds * 250), True

    def decode(self, session_id: str, raw: bytes) -> tuple[SessionState, str, int]:
        try:
            revision, deadline = parse_head(raw)
            s = SessionState.from_bytes(memoryview(raw)[HEAD_CHARS:])
        except NewerSessionFormat as e:
            raise ReplicaBehind(
                f"session {session_ref(session_id)} was written by a newer seqserve ({e}): retry, an updated replica "
                "reads it (a rolling update); after a rollback, create a new session"
            ) from None
        except ValueError as e:
            raise FailedPrecondition(
                f"session {session_ref(session_id)} cannot be read from the session store ({e}); it was written by an "
                "incompatible server or damaged: create a new session"
            ) from None
        s.revision = int(revision, 16)
        return s, revision, deadline

    # --- ownership --------------------------------------------------------------------------------------
    async def own(self, session_id: str, create: bool = False) -> bool:
        """Takes the session's lease (asking its holder to hand it over) and brings the cache up to date.
        False when there is no such session (with ``create``: owned anyway, for ``add``)."""
        e = self.cache.get(session_id)
        if e is not None and e.owned_until > time.monotonic():
            return True
        given = self._given.pop(session_id, None)
        if given is not None:
            await self._after_handover(session_id, given + HANDOVER_GRACE)
        delay, asked = 0.002, -1e9
        while True:
            e = self.cache.get(session_id)
            t0 = time.monotonic()
            args: list[Arg] = [self.replica, self.lease_ms, e.stored if e else "", "1" if create else "0"]
            r = await self.conn.script("acquire", self.keys(session_id), args)
            self.counts["acquire"] += 1
            kind = int(r[0])
            if kind == 1:
                if len(r) > 2 or e is None:
                    if len(r) <= 2:
                        continue  # dropped meanwhile: ask again, for the value this time
                    if e is not None and e.dirty_since is not None:
                        self.counts["lost"] += 1
                        log.warning("session %s: steps kept in memory were lost (taken over)", session_ref(session_id))
                    s, revision, deadline = self.decode(session_id, r[2])
                    self.counts["read"] += 1
                    e = self.cache.put(session_id, s, revision, deadline)
                e.owned_until = t0 + OWNED * self.lease_s
                self.taken.pop(session_id, None)
                return True
            if kind in (2, 3):
                self.forget(session_id)
                return kind == 3
            holder = r[1].decode()
            if time.monotonic() - asked > ASK_EVERY:
                await self.conn.publish(self.channel(holder), session_id)
                self.counts["handoff"] += 1
                asked = time.monotonic()
            await asyncio.sleep(delay)
            delay = min(2 * delay, POLL_MAX)

    async def _after_handover(self, session_id: str, until: float) -> None:
        """Leaves the lease of a session just handed over free for the replica that asked, until it takes it (then
        this call asks for it back at once) or ``until``."""
        lease = self.keys(session_id)[1]
        while time.monotonic() < until:
            if await self.conn.command("GET", lease) not in (None, self.replica.encode()):
                return
            await asyncio.sleep(min(0.005, max(0.0, until - time.monotonic())))

    def disown(self, session_id: str) -> None:
        """Redis says another replica holds the lease: stop believing this one does."""
        e = self.cache.get(session_id)
        if e is not None:
            e.owned_until = 0.0

    def forget(self, session_id: str) -> None:
        e = self.cache.pop(session_id)
        if e is not None and e.dirty_since is not None:
            self.counts["lost"] += 1
            log.warning("session %s: steps kept in memory were dropped", session_ref(session_id))

    async def write(self, session_id: str, e: Entry, s: SessionState, release: bool) -> None:
        """Writes ``s`` (the entry's state now) over the revision the entry was read at."""
        deadline, touch = self.deadline(e, s)
        t0 = time.monotonic()
        args: list[Arg] = [
            self.replica, e.stored, self.value(s, deadline), self.value_ms(s, not release), self.lease_ms,
        ]  # fmt: skip
        try:
            got = await self.conn.script("save", self.keys(session_id), [*args, "1" if release else "0"])
        except StoreUnavailable:
            if not self.idle_mode:
                self.cache.pop(session_id)  # did it land? the next call asks Redis
            raise
        self.counts["write"] += 1
        if got != 1:
            self.forget(session_id)
            if got == -1 or stepped_elsewhere(e.stored, got[1]):  # held by another, or stepped by one since
                self.counts["conflict"] += 1
                raise taken_over(session_id)
            raise StaleSession(session_id)
        e.stored, e.deadline_ms = f"{s.revision:016x}", deadline
        e.owned_until = 0.0 if release else t0 + OWNED * self.lease_s
        if e.state is s:
            e.dirty_since = None
        if touch:
            self.spawn(self.index.put(Indexed(session_id, s.nbytes, s.model, s.owner), deadline, touch=True))

    async def flush(self, session_id: str, release: bool = False) -> None:
        e = self.cache.get(session_id)
        if e is None:
            if release:
                await self.conn.script("lease", self.keys(session_id)[1:], [self.replica, 0])
            return
        async with e.io:  # one write of an entry at a time
            if e.dirty_since is not None:
                self.counts["flush"] += 1
                try:
                    await self.write(session_id, e, e.state, release)
                except (SessionConflict, StaleSession):  # (counted by forget)
                    log.warning("session %s: steps kept in memory were lost (taken over)", session_ref(session_id))
            elif release:
                await self.conn.script("lease", self.keys(session_id)[1:], [self.replica, 0])
                e.owned_until = 0.0
        if release:
            if e.wanted:
                self._given[session_id] = time.monotonic()
            e.wanted = False

    # --- background: hand-over requests, lease renewal, write-back ----------------------------------------
    def start(self) -> None:
        self._stopping = False
        if not self.tasks:
            self.tasks = [
                asyncio.create_task(self.listen(), name="session-handoff"),
                asyncio.create_task(self.maintain(), name="session-maintain"),
            ]

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        async def run() -> None:
            with contextlib.suppress(StoreUnavailable):
                await coro

        task = asyncio.create_task(run())
        self.tasks.append(task)

        def done(t: asyncio.Task[None]) -> None:
            if t in self.tasks:
                self.tasks.remove(t)

        task.add_done_callback(done)

    async def listen(self) -> None:
        delay = 0.05
        while not self._stopping:
            pubsub = self.conn.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel(self.replica))
                delay = 0.05
                while not self._stopping:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        data = msg["data"]
                        self.asked(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis gone: listen again when it is back
                log.debug("hand-over listener: %s: %s", type(e).__name__, e)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def asked(self, session_id: str) -> None:
        """Another replica wants ``session_id``: hand it over now, or after the call that is using it."""
        e = self.cache.get(session_id)
        if e is not None:
            e.wanted = True
        if not self.cache.in_use(session_id):
            self._hand_back(session_id, only_if_wanted=True)

    def _hand_back(self, session_id: str, only_if_wanted: bool) -> None:
        """Writes the session back and drops its lease in the background, in the session's turn: never under a
        call on it (a step acknowledged meanwhile would stay unwritten on a replica without the lease)."""
        if session_id in self._handing:
            return
        self._handing.add(session_id)

        async def hand_over() -> None:
            try:
                async with self.cache.turn(session_id, call=False):
                    now = self.cache.get(session_id)
                    if now is None or now.wanted or not only_if_wanted:
                        await self.flush(session_id, release=True)
            finally:
                self._handing.discard(session_id)

        self.spawn(hand_over())

    async def maintain(self) -> None:
        tick = min(self.lease_s / 4, self.idle_s / 2 if self.idle_mode else 1.0, 0.5)
        while not self._stopping:
            await asyncio.sleep(tick)
            try:
                await self.maintain_once()
            except StoreUnavailable:
                pass
            except Exception:
                log.exception("session store maintenance failed")

    async def maintain_once(self) -> None:
        now = time.monotonic()
        for kept, age in ((self._given, HANDOVER_GRACE), (self.taken, TAKEN_KEPT)):
            for sid in [sid for sid, t in kept.items() if now - t > age]:
                del kept[sid]
        jobs = []
        for sid, e in self.cache.items():
            if e.dirty_since is not None and (now - e.used >= self.idle_s or now - e.dirty_since >= self.flush_s):
                jobs.append(self.flush(sid))
            elif (
                e.owned_until > 0
                and e.owned_until - now < self.lease_s / 2
                and (self.cache.in_use(sid) or e.dirty_since is not None)
            ):  # also once the time this replica counts as its own has passed (this loop was held up): the script
                # renews only while no other replica holds the lease and the value exists, and a save after a
                # takeover is refused by its revision anyway; skipping it let a long call lose its session
                jobs.append(self.renew(sid, e))
        for sid in self.cache.over_budget():  # the hot cache needs room: hand idle sessions back, in their turn
            if not self.cache.in_use(sid):
                self._hand_back(sid, only_if_wanted=False)
        await asyncio.gather(*jobs, return_exceptions=True)
        for sid in self.cache.over_budget():
            victim = self.cache.get(sid)
            if victim is not None and victim.dirty_since is None and victim.owned_until <= time.monotonic():
                self.cache.pop(sid)

    async def renew(self, session_id: str, e: Entry) -> None:
        t0 = time.monotonic()
        ok = await self.conn.script("renew", self.keys(session_id), [self.replica, self.lease_ms])
        if int(ok) == 1:
            e.owned_until = t0 + OWNED * self.lease_s
        else:
            self.forget(session_id)
            if int(ok) == 0:  # another replica holds the lease (this one paused past it): the call's save is told so
                self.taken[session_id] = time.monotonic()

    async def stop(self) -> None:
        """Stops the background tasks, writes back what this replica kept and hands every lease back."""
        # redis-py's get_message timeout can turn a cancellation that races its own timeout into a TimeoutError,
        # which the listener would retry: cancel_and_wait cancels again, and the flag ends the loops in any case.
        self._stopping = True
        await asyncio.gather(*(cancel_and_wait(t) for t in list(self.tasks)))
        self.tasks.clear()
        owned = [sid for sid, e in self.cache.items() if e.owned_until > 0 or e.dirty_since is not None]
        results = await asyncio.gather(*(self.flush(sid, release=True) for sid in owned), return_exceptions=True)
        lost = sum(1 for r in results if isinstance(r, BaseException))
        if lost:
            log.warning("closing: %d of %d sessions could not be written back or handed over", lost, len(owned))
        self.cache.clear()
