"""``RedisSessionStore``: sessions in Redis, shared by every replica; any replica resumes any session.

The ``SessionStore`` protocol on top of three parts: ``Leases`` (``redis_leases``: which replica owns a session,
the hot cache that makes a step read nothing, fenced compare-and-set writes, hand-over between replicas,
write-back), ``SessionIndex`` (``redis_index``: counts, bytes and expiry order shared by every replica) and
``RedisConn`` (``redis_conn``: the connection, the Lua scripts of ``redis_scripts``, Redis errors as domain
errors). Within a replica, calls on a session take turns in arrival order (as in memory); across replicas the
lease makes them take turns.

Durability. ``step`` (default): ``save`` returns only after the new state is in Redis: one round trip per
step, nothing acknowledged is ever lost. ``idle``: ``save`` only updates the hot cache; the state is written
when the session goes idle, at least every ``session_flush_seconds``, on hand-over and on ``close`` (SIGTERM),
so a crash loses at most those seconds of steps. Either way the step counter in the stored state says where a
resumed session stands.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from service.core.sessions.redis_conn import Arg, RedisConn
from service.core.sessions.redis_index import Indexed, SessionIndex
from service.core.sessions.redis_leases import (
    OWNED,
    Leases,
    eviction_key,
    incarnation,
    session_keys,
    taken_over,
)
from service.core.sessions.state import SessionState
from service.core.sessions.store import StaleSession, StoreUsage
from service.errors import FailedPrecondition, StoreUnavailable
from service.settings import Settings


class RedisSessionStore:
    keys = staticmethod(session_keys)

    def __init__(self, url: str, settings: Settings) -> None:
        from service.core.sessions import redact

        self.name = redact(url)
        self.conn = RedisConn(url, self.name, settings.session_store_timeout_seconds)
        self.index = SessionIndex(self.conn, settings.session_index_shards)
        self.leases = Leases(self.conn, self.index, settings)
        self.replica = self.leases.replica
        self.cache = self.leases.cache
        self.counts = self.leases.counts
        self.idle_mode = self.leases.idle_mode
        self.lease_s = self.leases.lease_s

    # --- protocol -----------------------------------------------------------------------------------------
    async def load(self, session_id: str) -> SessionState | None:
        self.leases.start()
        e = self.cache.get(session_id)
        if e is not None and (e.owned_until > time.monotonic() or e.dirty_since is not None):
            return e.state.copy()
        raw = await self.conn.command("GET", self.keys(session_id)[0])
        if raw is None:
            return None
        self.counts["read"] += 1
        return self.leases.decode(session_id, raw)[0]

    async def add(self, session: SessionState) -> SessionState | None:
        self.leases.start()
        sid = session.id
        session.revision = incarnation()
        deadline, _ = self.leases.deadline(None, session)
        args: list[Arg] = [
            self.replica,
            self.leases.value(session, deadline),
            self.leases.value_ms(session, keeps_lease=True),  # the add takes the lease
            self.leases.lease_ms,
        ]
        while True:
            t0 = time.monotonic()
            r = await self.conn.script("add", [*self.keys(sid), eviction_key(sid)], args)
            if int(r[0]) == 1:
                break
            self.leases.disown(sid)
            await self.leases.own(sid, create=True)
        self.counts["write"] += 1
        await self.index.put(Indexed(sid, session.nbytes, session.model, session.owner), deadline)
        e = self.cache.put(sid, session.copy(), f"{session.revision:016x}", deadline)
        e.owned_until = t0 + OWNED * self.lease_s
        return self.leases.decode(sid, r[1])[0] if len(r) > 1 else None

    async def save(self, session: SessionState) -> None:
        e = self.cache.get(session.id)
        if e is None and self.leases.taken.pop(session.id, None) is not None:
            self.counts["conflict"] += 1
            raise taken_over(session.id)  # (its renewal found another replica's lease and dropped the entry)
        if e is None or e.state.revision != session.revision:
            raise StaleSession(session.id)
        new = session.copy()
        new.revision += 1
        if self.idle_mode:
            e.state = new
            e.dirty_since = e.dirty_since or time.monotonic()
        else:
            async with e.io:
                await self.leases.write(session.id, e, new, release=False)
                e.state = new
        e.used = time.monotonic()
        session.revision = new.revision

    async def delete(self, session_id: str, hold: bool = False) -> SessionState | None:
        self.leases.start()
        args: list[Arg] = [self.replica, self.leases.lease_ms] if hold else [self.replica]
        while True:
            r = await self.conn.script("delete", self.keys(session_id), args)
            if int(r[0]) == 1:
                break
            self.leases.disown(session_id)
            await self.leases.own(session_id, create=True)
        e = self.cache.pop(session_id)
        if len(r) == 1:
            return None
        await self.index.remove(session_id)
        if e is not None and e.dirty_since is not None:
            return e.state.copy()
        try:
            return self.leases.decode(session_id, r[1])[0]
        except FailedPrecondition:
            return None

    def lease(self, session_id: str) -> AbstractAsyncContextManager[None]:
        return self._lease(session_id)

    def in_use(self, session_id: str) -> bool:
        # A call's, not a hand-over's: a read beside a hand-over waits for its lease (its cached copy may be one
        # another replica has taken over since: a replica paused past its lease answered steps it had lost).
        return self.cache.serving(session_id)

    @asynccontextmanager
    async def _lease(self, session_id: str) -> AsyncIterator[None]:
        self.leases.start()
        async with self.cache.turn(session_id):
            await self.leases.own(session_id)
            try:
                yield
            finally:
                e = self.cache.get(session_id)
                if e is not None:
                    e.used = time.monotonic()
                    if e.wanted:
                        with contextlib.suppress(StoreUnavailable):
                            await self.leases.flush(session_id, release=True)

    async def evict_lru(self, keep: str | None = None, owner: str | None = None) -> SessionState | None:
        for _, sid in await self.index.oldest(8, owner or None):
            if sid == keep or self.cache.in_use(sid):
                continue
            keys = self.keys(sid)
            # The lease stays ours until the index forgot the session: another replica evicting at once meets it
            # held and moves on, where it found the value gone, won the index removal and counted an expiry too.
            r = await self.conn.script("delete", keys, [self.replica, EVICTION_HOLD_MS])
            if int(r[0]) == 0:
                continue  # another replica holds it
            self.cache.pop(sid)
            try:
                gone = await self.index.remove(sid)
            finally:
                with contextlib.suppress(StoreUnavailable):  # (else it lapses after EVICTION_HOLD_MS)
                    await self.conn.script("lease", keys[1:], [self.replica, 0])
            if len(r) > 1:
                try:
                    return self.leases.decode(sid, r[1])[0]
                except FailedPrecondition:
                    return _stub(gone or Indexed(sid, 0, "", ""))
            if gone is not None:  # its value had expired already: dropping it from the index made the room
                return _stub(gone)
        return None

    async def pop_expired(self, now: float, limit: int, check: str | None = None) -> list[SessionState]:
        try:
            gone = await self.index.trim(int(time.time() * 1000), limit)
        except StoreUnavailable:
            return []  # said once in the log by the connection; the reaper tries again
        expired = await self._forgotten(gone)
        if check is not None:
            with contextlib.suppress(StoreUnavailable):  # then the index's count stands, as before
                expired += await self._pop_gone(check, limit)
        return expired

    async def _pop_gone(self, owner: str, limit: int) -> list[SessionState]:
        """Up to ``limit`` of ``owner``'s ("": anyone's) sessions whose value has expired though their index
        deadline (up to a quarter of the TTL later) has not come: forgotten now. Looks at the soonest deadlines
        first, ``GONE_BATCH`` at a time, and goes on only while a whole batch was gone: the rest are younger, so a
        refusal costs one batch of EXISTS when nothing has expired."""
        out: list[SessionState] = []
        per_shard = GONE_BATCH if owner else max(1, GONE_BATCH // self.index.shards)
        while len(out) < limit:
            oldest = sorted(await self.index.oldest(per_shard, owner or None))[:GONE_BATCH]
            candidates = []
            for deadline, sid in oldest:
                e = self.cache.get(sid)
                if e is None or (e.dirty_since is None and not self.cache.in_use(sid)):
                    candidates.append((int(deadline), sid))
            if not candidates:
                break
            exists = await self.conn.batch([("EXISTS", self.keys(sid)[0]) for _, sid in candidates])
            gone = 0
            for (deadline, sid), n in zip(candidates, exists, strict=True):
                if not int(n) and (g := await self.index.forget(sid, deadline)) is not None:
                    self.cache.pop(sid)
                    out.append(_stub(g))
                    gone += 1
            if gone < len(oldest):  # something live (or busy) among the oldest: the rest are younger
                break
        return out

    async def _forgotten(self, gone: list[Indexed]) -> list[SessionState]:
        """What the index trimmed, minus sessions in a call longer than their TTL (indexed again)."""
        expired = []
        for g in gone:
            e = self.cache.get(g.id)
            if e is not None and self.cache.in_use(g.id):  # in a call longer than its TTL: not idle, index it again
                deadline, _ = self.leases.deadline(None, e.state)
                await self.index.put(Indexed(g.id, g.nbytes, g.model, g.owner), deadline)
                continue
            if e is not None and e.dirty_since is None:
                self.cache.pop(g.id)
            expired.append(_stub(g))
        return expired

    async def note_eviction(self, session_id: str, owner: str, why: str, seconds: float) -> None:
        """Records, for every replica, that ``session_id`` was evicted, for ``seconds`` (until it would have
        expired): its owner's next call is told so wherever it lands (``eviction``), also after a restart."""
        record = json.dumps({"owner": owner, "why": why})
        await self.conn.command("SET", eviction_key(session_id), record, "PX", max(1, int(seconds * 1000)))

    async def eviction(self, session_id: str) -> tuple[str, str] | None:
        """(owner, why) of ``session_id``'s eviction record, or None."""
        raw = await self.conn.command("GET", eviction_key(session_id))
        if raw is None:
            return None
        try:
            got = json.loads(raw)
            return str(got["owner"]), str(got["why"])
        except (ValueError, KeyError, TypeError):
            return None

    async def usage(self) -> StoreUsage:
        return await self.index.usage()

    async def owner_usage(self, owner: str) -> StoreUsage:
        """An owner's sessions; owner "" (no principals) is everybody."""
        return await self.index.usage(owner or None)

    async def check(self) -> str | None:
        return await self.conn.ping(f"ss:probe:{self.replica}")

    async def advice(self) -> str | None:
        """A warning when this Redis evicts keys once full (a ``maxmemory`` with a ``maxmemory-policy`` other than
        ``noeviction``): it drops sessions and the index keys that count them, without a word to anyone. None when
        it does not, or does not say (``CONFIG`` refused: an ACL, a managed Redis; Redis unreachable)."""
        try:
            got = await self.conn.command("CONFIG", "GET", "maxmemory*")
        except Exception:
            return None
        if not isinstance(got, dict):
            return None
        values = {_text(k): _text(v) for k, v in got.items()}
        policy, limit = values.get("maxmemory-policy", "noeviction"), values.get("maxmemory", "0")
        if policy == "noeviction" or limit == "0":
            return None
        return (
            f"Redis at {self.name} has maxmemory-policy {policy}: once full it evicts keys, sessions and the index "
            "that counts them included, and their clients get 'unknown session' while the counts still hold them; "
            "set maxmemory-policy noeviction (a full Redis then refuses new sessions and steps with "
            "RESOURCE_EXHAUSTED, and MAX_SESSIONS evicts the least recently used session, telling its owner)"
        )

    async def close(self) -> None:
        """Writes back what this replica kept (idle mode) and hands every lease back, so other replicas take
        its sessions over at once; then stops."""
        await self.leases.stop()
        await self.conn.close()


EVICTION_HOLD_MS = 10_000  # the longest an evicting replica that died keeps the evicted id's lease
GONE_BATCH = 32  # index entries a refusing quota or full store checks at a time (one pipelined EXISTS each)


def _stub(g: Indexed) -> SessionState:
    """What is left of a session the index forgot (its state expired with it): enough for metrics, and expired
    (``expires_at`` 0), so an ``evict_lru`` that finds one reports an expiry, not an eviction."""
    return SessionState(g.id, g.model, 0, "", "", {}, {}, 0, 0.0, 0.0, 0.0, g.nbytes, owner=g.owner)


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
