"""``RedisSessionStore``: sessions in Redis, shared by every replica; any replica resumes any session.

Ownership. A replica that uses a session takes its *lease* (a key holding the replica's id, with a TTL of
``session_lease_seconds``) and keeps it while the session stays in use: the session is then in this replica's
hot cache and a step reads nothing from Redis. Every write is one Lua script that checks the lease (fencing: a
replica that lost it is refused, ``SessionConflict``) and the revision it read (compare and set: a stale copy
is refused, ``StaleSession``), so two calls on one session never interleave, on one replica or on several.
A replica that needs a session another one owns asks it over pub/sub to hand it over (the owner writes back
what it kept and drops the lease after its current call) and polls until the lease is free; if the owner died,
its lease expires. Within a replica, calls on a session take turns in arrival order (as in memory).

Durability. ``step`` (default): ``save`` returns only after the new state is in Redis: one round trip per
step, nothing acknowledged is ever lost. ``idle``: ``save`` only updates the hot cache; the state is written
when the session goes idle, at least every ``session_flush_seconds``, on hand-over and on ``close`` (SIGTERM),
so a crash loses at most those seconds of steps. Either way the step counter in the stored state says where a
resumed session stands.

Layout: ``redis_scripts`` (keys and scripts), ``redis_index`` (counts, bytes, expiry order), ``redis_conn``
(connection and error mapping), ``redis_lease`` (the hot cache and its bookkeeping).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from service.core.sessions.redis_conn import Arg, RedisConn, tag
from service.core.sessions.redis_index import Indexed, SessionIndex
from service.core.sessions.redis_lease import Entry, HotCache
from service.core.sessions.redis_scripts import head, parse_head
from service.core.sessions.state import SessionState
from service.core.sessions.store import StaleSession, StoreUsage
from service.errors import FailedPrecondition, SessionConflict, StoreUnavailable, echo
from service.settings import Settings

log = logging.getLogger(__name__)
OWNED = 0.8  # of the lease's TTL this replica counts as its own (the rest absorbs round trips and clock drift)
POLL_MAX = 0.05  # seconds between two tries for a lease another replica holds (doubling from 2 ms)
ASK_EVERY = 0.25  # seconds between two hand-over requests to the holder


class RedisSessionStore:
    def __init__(self, url: str, settings: Settings) -> None:
        from service.core.sessions import redact

        self.name = redact(url)
        self.conn = RedisConn(url, self.name, settings.session_store_timeout_seconds)
        self.index = SessionIndex(self.conn, settings.session_index_shards)
        self.replica = secrets.token_hex(12)  # a new id per process: a restarted replica owns nothing
        self.idle_mode = settings.session_durability == "idle"
        self.lease_s = settings.session_lease_seconds
        self.flush_s = settings.session_flush_seconds
        self.idle_s = settings.session_idle_seconds
        # Redis keeps a value this much past its TTL in idle mode: the state in the cache may be newer.
        self.slack_s = self.flush_s + self.idle_s + self.lease_s if self.idle_mode else 0.0
        self.cache = HotCache(settings.session_cache_bytes)
        self.counts: dict[str, int] = dict.fromkeys(("acquire", "read", "write", "handoff", "flush"), 0)
        self._tasks: list[asyncio.Task[None]] = []
        self._handing: set[str] = set()

    # --- keys -----------------------------------------------------------------------------------------
    @staticmethod
    def keys(session_id: str) -> list[str]:
        t = tag(session_id)
        return [f"ss:{{{t}}}:v", f"ss:{{{t}}}:l"]

    @staticmethod
    def channel(replica: str) -> str:
        return f"ss:handoff:{replica}"

    def _value(self, s: SessionState, deadline_ms: int) -> bytes:
        return head(s.revision, deadline_ms) + s.to_bytes()

    def _ttl_ms(self, s: SessionState) -> int:
        return max(1, int((s.ttl_seconds + self.slack_s) * 1000))

    def _deadline(self, e: Entry | None, s: SessionState) -> tuple[int, bool]:
        """(index deadline, whether the index must learn it): moved only when the TTL runs past it."""
        need = int(time.time() * 1000) + self._ttl_ms(s)
        if e is not None and need <= e.deadline_ms:
            return e.deadline_ms, False
        return need + int(s.ttl_seconds * 250), True

    def _decode(self, session_id: str, raw: bytes) -> tuple[SessionState, str, int]:
        try:
            revision, deadline = parse_head(raw)
            s = SessionState.from_bytes(memoryview(raw)[32:])
        except ValueError as e:
            raise FailedPrecondition(
                f"session {echo(session_id)} cannot be read from the session store ({e}); it was written by an "
                "incompatible server or damaged: create a new session"
            ) from None
        s.revision = int(revision, 16)
        return s, revision, deadline

    # --- ownership --------------------------------------------------------------------------------------
    async def _own(self, session_id: str, create: bool = False) -> bool:
        """Takes the session's lease (asking its holder to hand it over) and brings the cache up to date.
        False when there is no such session (with ``create``: owned anyway, for ``add``)."""
        e = self.cache.get(session_id)
        if e is not None and e.owned_until > time.monotonic():
            return True
        delay, asked = 0.002, -1e9
        while True:
            e = self.cache.get(session_id)
            t0 = time.monotonic()
            args: list[Arg] = [self.replica, int(self.lease_s * 1000), e.stored if e else "", "1" if create else "0"]
            r = await self.conn.script("acquire", self.keys(session_id), args)
            self.counts["acquire"] += 1
            kind = int(r[0])
            if kind == 1:
                if len(r) > 2 or e is None:
                    if len(r) <= 2:
                        continue  # dropped meanwhile: ask again, for the value this time
                    if e is not None and e.dirty_since is not None:
                        log.warning("session %s: steps kept in memory were lost (taken over)", echo(session_id))
                    s, revision, deadline = self._decode(session_id, r[2])
                    self.counts["read"] += 1
                    e = self.cache.put(session_id, s, revision, deadline)
                e.owned_until = t0 + OWNED * self.lease_s
                return True
            if kind in (2, 3):
                self._forget(session_id)
                return kind == 3
            holder = r[1].decode()
            if time.monotonic() - asked > ASK_EVERY:
                await self.conn.publish(self.channel(holder), session_id)
                self.counts["handoff"] += 1
                asked = time.monotonic()
            await asyncio.sleep(delay)
            delay = min(2 * delay, POLL_MAX)

    def _disown(self, session_id: str) -> None:
        """Redis says another replica holds the lease: stop believing this one does."""
        e = self.cache.get(session_id)
        if e is not None:
            e.owned_until = 0.0

    def _forget(self, session_id: str) -> None:
        e = self.cache.pop(session_id)
        if e is not None and e.dirty_since is not None:
            log.warning("session %s: steps kept in memory were dropped", echo(session_id))

    async def _write(self, session_id: str, e: Entry, s: SessionState, release: bool) -> None:
        """Writes ``s`` (the entry's state now) over the revision the entry was read at."""
        deadline, touch = self._deadline(e, s)
        t0 = time.monotonic()
        args: list[Arg] = [self.replica, e.stored, self._value(s, deadline), self._ttl_ms(s), int(self.lease_s * 1000)]
        try:
            r = int(await self.conn.script("save", self.keys(session_id), [*args, "1" if release else "0"]))
        except StoreUnavailable:
            if not self.idle_mode:
                self.cache.pop(session_id)  # did it land? the next call asks Redis
            raise
        self.counts["write"] += 1
        if r != 1:
            self._forget(session_id)
            if r == -1:
                raise SessionConflict(
                    f"session {echo(session_id)} was taken over by another replica while this call used it; "
                    "nothing was saved: retry the call"
                )
            raise StaleSession(session_id)
        e.stored, e.deadline_ms = f"{s.revision:016x}", deadline
        e.owned_until = 0.0 if release else t0 + OWNED * self.lease_s
        if e.state is s:
            e.dirty_since = None
        if touch:
            self._spawn(self.index.put(Indexed(session_id, s.nbytes, s.model, s.owner), deadline, touch=True))

    async def _flush(self, session_id: str, release: bool = False) -> None:
        e = self.cache.get(session_id)
        if e is None:
            if release:
                await self.conn.script("lease", self.keys(session_id)[1:], [self.replica, 0])
            return
        async with e.io:  # one write of an entry at a time
            if e.dirty_since is not None:
                self.counts["flush"] += 1
                try:
                    await self._write(session_id, e, e.state, release)
                except (SessionConflict, StaleSession):
                    log.warning("session %s: steps kept in memory were lost (taken over)", echo(session_id))
            elif release:
                await self.conn.script("lease", self.keys(session_id)[1:], [self.replica, 0])
                e.owned_until = 0.0
        if release:
            e.wanted = False

    # --- protocol -----------------------------------------------------------------------------------------
    async def load(self, session_id: str) -> SessionState | None:
        self._start()
        e = self.cache.get(session_id)
        if e is not None and (e.owned_until > time.monotonic() or e.dirty_since is not None):
            return e.state.copy()
        raw = await self.conn.command("GET", self.keys(session_id)[0])
        if raw is None:
            return None
        self.counts["read"] += 1
        return self._decode(session_id, raw)[0]

    async def add(self, session: SessionState) -> SessionState | None:
        self._start()
        sid = session.id
        session.revision = secrets.randbits(48) << 8  # a new incarnation: no copy of an older one matches it
        deadline, _ = self._deadline(None, session)
        args: list[Arg] = [
            self.replica,
            self._value(session, deadline),
            self._ttl_ms(session),
            int(self.lease_s * 1000),
        ]
        while True:
            t0 = time.monotonic()
            r = await self.conn.script("add", self.keys(sid), args)
            if int(r[0]) == 1:
                break
            self._disown(sid)
            await self._own(sid, create=True)
        self.counts["write"] += 1
        await self.index.put(Indexed(sid, session.nbytes, session.model, session.owner), deadline)
        e = self.cache.put(sid, session.copy(), f"{session.revision:016x}", deadline)
        e.owned_until = t0 + OWNED * self.lease_s
        return self._decode(sid, r[1])[0] if len(r) > 1 else None

    async def save(self, session: SessionState) -> None:
        e = self.cache.get(session.id)
        if e is None or e.state.revision != session.revision:
            raise StaleSession(session.id)
        new = session.copy()
        new.revision += 1
        if self.idle_mode:
            e.state = new
            e.dirty_since = e.dirty_since or time.monotonic()
        else:
            async with e.io:
                await self._write(session.id, e, new, release=False)
                e.state = new
        e.used = time.monotonic()
        session.revision = new.revision

    async def delete(self, session_id: str) -> SessionState | None:
        self._start()
        while True:
            r = await self.conn.script("delete", self.keys(session_id), [self.replica])
            if int(r[0]) == 1:
                break
            self._disown(session_id)
            await self._own(session_id, create=True)
        e = self.cache.pop(session_id)
        if len(r) == 1:
            return None
        await self.index.remove(session_id)
        if e is not None and e.dirty_since is not None:
            return e.state.copy()
        try:
            return self._decode(session_id, r[1])[0]
        except FailedPrecondition:
            return None

    def lease(self, session_id: str) -> AbstractAsyncContextManager[None]:
        return self._lease(session_id)

    @asynccontextmanager
    async def _lease(self, session_id: str) -> AsyncIterator[None]:
        self._start()
        async with self.cache.turn(session_id):
            await self._own(session_id)
            try:
                yield
            finally:
                e = self.cache.get(session_id)
                if e is not None:
                    e.used = time.monotonic()
                    if e.wanted:
                        with contextlib.suppress(StoreUnavailable):
                            await self._flush(session_id, release=True)

    async def evict_lru(self, keep: str | None = None, owner: str | None = None) -> SessionState | None:
        for _, sid in await self.index.oldest(8, owner or None):
            if sid == keep or self.cache.in_use(sid):
                continue
            r = await self.conn.script("delete", self.keys(sid), [self.replica])
            if int(r[0]) == 0:
                continue  # another replica holds it
            self.cache.pop(sid)
            gone = await self.index.remove(sid)
            if len(r) > 1:
                try:
                    return self._decode(sid, r[1])[0]
                except FailedPrecondition:
                    return _stub(gone or Indexed(sid, 0, "", ""))
        return None

    async def pop_expired(self, now: float, limit: int) -> list[SessionState]:
        try:
            gone = await self.index.trim(int(time.time() * 1000), limit)
        except StoreUnavailable:
            return []  # said once in the log by the connection; the reaper tries again
        for g in gone:
            e = self.cache.get(g.id)
            if e is not None and e.dirty_since is None:
                self.cache.pop(g.id)
        return [_stub(g) for g in gone]

    async def usage(self) -> StoreUsage:
        return await self.index.usage()

    async def owner_usage(self, owner: str) -> StoreUsage:
        """An owner's sessions; owner "" (no principals) is everybody."""
        return await self.index.usage(owner or None)

    async def check(self) -> str | None:
        return await self.conn.ping()

    async def close(self) -> None:
        """Writes back what this replica kept (idle mode) and hands every lease back, so other replicas take
        its sessions over at once; then stops."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        owned = [sid for sid, e in self.cache.items() if e.owned_until > 0 or e.dirty_since is not None]
        results = await asyncio.gather(*(self._flush(sid, release=True) for sid in owned), return_exceptions=True)
        lost = sum(1 for r in results if isinstance(r, BaseException))
        if lost:
            log.warning("closing: %d of %d sessions could not be written back or handed over", lost, len(owned))
        self.cache.clear()
        await self.conn.close()

    # --- background: hand-over requests, lease renewal, write-back ----------------------------------------
    def _start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._listen(), name="session-handoff"),
                asyncio.create_task(self._maintain(), name="session-maintain"),
            ]

    def _spawn(self, coro: object) -> None:
        async def run() -> None:
            with contextlib.suppress(StoreUnavailable):
                await coro  # type: ignore[misc]

        task = asyncio.create_task(run())
        self._tasks.append(task)

        def done(t: asyncio.Task[None]) -> None:
            if t in self._tasks:
                self._tasks.remove(t)

        task.add_done_callback(done)

    async def _listen(self) -> None:
        delay = 0.05
        while True:
            pubsub = self.conn.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel(self.replica))
                delay = 0.05
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        data = msg["data"]
                        self._asked(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis gone: listen again when it is back
                log.debug("hand-over listener: %s: %s", type(e).__name__, e)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _asked(self, session_id: str) -> None:
        """Another replica wants ``session_id``: hand it over now, or after the call that is using it."""
        e = self.cache.get(session_id)
        if e is not None:
            e.wanted = True
        if self.cache.in_use(session_id) or session_id in self._handing:
            return
        self._handing.add(session_id)

        async def hand_over() -> None:
            try:
                async with self.cache.turn(session_id):
                    now = self.cache.get(session_id)
                    if now is None or now.wanted:
                        await self._flush(session_id, release=True)
            finally:
                self._handing.discard(session_id)

        self._spawn(hand_over())

    async def _maintain(self) -> None:
        tick = min(self.lease_s / 4, self.idle_s / 2 if self.idle_mode else 1.0, 0.5)
        while True:
            await asyncio.sleep(tick)
            try:
                await self._maintain_once()
            except StoreUnavailable:
                pass
            except Exception:
                log.exception("session store maintenance failed")

    async def _maintain_once(self) -> None:
        now = time.monotonic()
        jobs = []
        for sid, e in self.cache.items():
            if e.dirty_since is not None and (now - e.used >= self.idle_s or now - e.dirty_since >= self.flush_s):
                jobs.append(self._flush(sid))
            elif 0 < e.owned_until - now < self.lease_s / 2 and (self.cache.in_use(sid) or e.dirty_since is not None):
                jobs.append(self._renew(sid, e))
        for sid in self.cache.over_budget():
            jobs.append(self._flush(sid, release=True))
        await asyncio.gather(*jobs, return_exceptions=True)
        for sid in self.cache.over_budget():
            victim = self.cache.get(sid)
            if victim is not None and victim.dirty_since is None and victim.owned_until <= time.monotonic():
                self.cache.pop(sid)

    async def _renew(self, session_id: str, e: Entry) -> None:
        t0 = time.monotonic()
        ok = await self.conn.script("lease", self.keys(session_id)[1:], [self.replica, int(self.lease_s * 1000)])
        if int(ok) == 1:
            e.owned_until = t0 + OWNED * self.lease_s
        else:
            self._forget(session_id)


def _stub(g: Indexed) -> SessionState:
    """What is left of a session the index forgot (its state expired with it): enough for metrics."""
    return SessionState(g.id, g.model, 0, "", "", {}, {}, 0, 0.0, 0.0, 0.0, g.nbytes, owner=g.owner)
