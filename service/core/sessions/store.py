"""Where sessions live: the async ``SessionStore`` protocol, and the in-memory store.

The protocol is what a network store (Redis) implements too. Callers pop, change and set: ``load`` returns a
working copy, ``save`` writes it back and fails (``StaleSession``) when the stored revision moved on (the
session was deleted or replaced meanwhile). ``lease`` makes calls on one session take turns, in arrival order;
eviction never takes a leased session. Counts and bytes are the store's own (``usage``), so limits hold for
every process sharing it.

In memory, every operation is O(1) or O(log n): an ``OrderedDict`` in recency order gives the LRU victim,
an expiry heap (one entry per session, lazily refreshed) gives the expired ones, and nothing is serialized.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, cast

from service.core.sessions import compact
from service.core.sessions.state import SessionState
from service.settings import Settings


class StaleSession(Exception):
    """``save`` of a session whose stored revision differs (deleted or replaced while it was in use)."""


@dataclass(frozen=True)
class StoreUsage:
    count: int
    bytes: int
    per_model: dict[str, int] = field(default_factory=dict)


class SessionStore(Protocol):
    async def load(self, session_id: str) -> SessionState | None:
        """A working copy of the session (the caller may change it and ``save`` it), or None."""
        ...

    async def add(self, session: SessionState) -> SessionState | None:
        """Stores a new session; a session with the same id is replaced and returned."""
        ...

    async def save(self, session: SessionState) -> None:
        """Writes back a loaded session and bumps its revision; ``StaleSession`` when the stored revision is
        not the one it was loaded with."""
        ...

    async def delete(self, session_id: str, hold: bool = False) -> SessionState | None:
        """Removes the session and returns it (None when there was none). ``hold``: a session about to be stored
        again under the same id (a replacement, under this call's lease): a shared store keeps the id's lease
        meanwhile, so another replica's call cannot take it and find no session in between."""
        ...

    def lease(self, session_id: str) -> AbstractAsyncContextManager[None]:
        """Exclusive use of one session; waiters are served in arrival order."""
        ...

    def in_use(self, session_id: str) -> bool:
        """A call in this process holds (or waits for) the session's lease."""
        ...

    async def evict_lru(self, keep: str | None = None, owner: str | None = None) -> SessionState | None:
        """Removes and returns the least recently used session that is not leased (nor ``keep``); with ``owner``,
        only among that owner's sessions (quotas never evict another principal's session)."""
        ...

    async def pop_expired(self, now: float, limit: int, check: str | None = None) -> list[SessionState]:
        """Removes and returns up to ``limit`` sessions idle past their TTL (never a leased one). ``check``: an
        owner ("" = anyone) whose sessions must be counted exactly now, as a refusing quota or a full store needs;
        a store that learns of expiries late (Redis: at an index deadline past the TTL) looks at them one by one."""
        ...

    async def usage(self) -> StoreUsage: ...

    async def owner_usage(self, owner: str) -> StoreUsage:
        """Sessions and bytes of one owner (``per_model`` may be left empty)."""
        ...

    async def check(self) -> str | None:
        """None when the store answers, else why it does not (health: the Sessions service, a metric)."""
        ...

    async def close(self) -> None:
        """Releases what this process holds (a network store writes back what it kept, hands over its leases)."""
        ...


class _Lease:
    """One session's lease while it is held: the calls waiting for it, in arrival order. Present in the store's
    table exactly while held (or waited for); the holder hands it straight to the next waiter on release."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: deque[asyncio.Future[None]] | None = None


class _Holding:
    """``async with store.lease(id)``: a plain class, not a generator context manager, because every call on a
    session enters one (the uncontended case neither suspends nor allocates a lock)."""

    __slots__ = ("_id", "_leases")

    def __init__(self, leases: dict[str, _Lease], session_id: str) -> None:
        self._leases, self._id = leases, session_id

    async def __aenter__(self) -> None:
        lease = self._leases.get(self._id)
        if lease is None:
            self._leases[self._id] = _Lease()
            return
        if lease.waiters is None:
            lease.waiters = deque()
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lease.waiters.append(turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self._release()  # handed over, but the caller went away before it could use it
            elif turn in lease.waiters:  # (a release may have dropped it already: a cancelled turn is skipped)
                lease.waiters.remove(turn)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        lease = self._leases[self._id]
        while lease.waiters:
            turn = lease.waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # the next caller holds it now
                return
        del self._leases[self._id]


# A session's bookkeeping: (revision, expires_at, nbytes, model, owner, incarnation), the incarnation being which
# add() created it (it tells stale heap entries apart). A plain tuple of atomic values, replaced by each save: the
# garbage collector stops tracking it, as it does the packed record (compact.py), so idle sessions add nothing to
# a full collection.
_Meta = tuple[int, float, int, str, str, int]


R = TypeVar("R")
HOT_SESSIONS = 256  # the most recently saved sessions the in-memory store keeps as they are (see its docstring)
_ABSENT = object()


class InMemorySessionStore(Generic[R]):
    """Sessions in this process. ``R`` is how a record is kept: ``compact.Compact`` here (the arrays in one
    buffer: ``compact.py``); a subclass may keep bytes instead (``_pack``/``_unpack``).

    The ``hot`` most recently saved sessions are kept as they are (a working copy each: own dicts, the arrays
    shared, which no step changes in place), so a session that steps again soon costs two dict copies instead of a
    pack and an unpack; the one saved longest ago is packed when a save would make them ``hot + 1``. Together they
    take at most ``hot`` x ~1.7 KiB more than packed, so a store of many idle sessions stays compact. ``hot=0``
    packs every save (a store that must keep bytes only)."""

    def __init__(self, hot: int = HOT_SESSIONS) -> None:
        self._records: OrderedDict[str, R | None] = OrderedDict()  # least recently used first; None: in _hot
        self._hot: OrderedDict[str, SessionState] = OrderedDict()  # least recently saved first
        self._hot_limit = hot
        self._meta: dict[str, _Meta] = {}
        self._expiry: list[tuple[float, int, str]] = []  # (expires_at, incarnation, id), lazily refreshed
        self._leases: dict[str, _Lease] = {}
        self._incarnations = itertools.count(1)
        self._bytes = 0
        self._per_model: dict[str, int] = {}
        self._owners: dict[str, OrderedDict[str, None]] = {}  # owner -> its sessions, least recently used first
        self._owner_bytes: dict[str, int] = {}

    # --- how a record is kept ---------------------------------------------------------------------------
    def _pack(self, s: SessionState) -> R:
        return compact.pack(s)  # type: ignore[return-value]

    def _unpack(self, record: R) -> SessionState:
        assert type(record) is tuple
        return compact.unpack(cast(compact.Compact, record))

    # --- protocol -------------------------------------------------------------------------------------
    async def load(self, session_id: str) -> SessionState | None:
        hot = self._hot.get(session_id)
        if hot is not None:
            return hot.copy()  # the caller's to change: the kept one changes only by save
        record = self._records.get(session_id)
        return None if record is None else self._unpack(record)

    async def add(self, session: SessionState) -> SessionState | None:
        old = self._remove(session.id)
        incarnation = next(self._incarnations)
        session.revision = incarnation << 32  # a new incarnation: no working copy of an older one matches it
        self._records[session.id] = self._pack(session)
        meta = (session.revision, session.expires_at, session.nbytes, session.model, session.owner, incarnation)
        self._meta[session.id] = meta
        self._owners.setdefault(session.owner, OrderedDict())[session.id] = None
        self._owner_bytes[session.owner] = self._owner_bytes.get(session.owner, 0) + session.nbytes
        heapq.heappush(self._expiry, (session.expires_at, incarnation, session.id))
        if len(self._expiry) > 2 * len(self._meta) + 1024:  # mostly deleted sessions' entries: rebuild, O(n)
            self._expiry = [(expires, inc, sid) for sid, (_, expires, _, _, _, inc) in self._meta.items()]
            heapq.heapify(self._expiry)
        self._bytes += session.nbytes
        self._per_model[session.model] = self._per_model.get(session.model, 0) + 1
        return old

    async def save(self, session: SessionState) -> None:
        meta = self._meta.get(session.id)
        if meta is None:
            raise StaleSession(session.id)
        revision, _, nbytes, model, owner, incarnation = meta
        if revision != session.revision:
            raise StaleSession(session.id)
        session.revision += 1
        self._meta[session.id] = (session.revision, session.expires_at, nbytes, model, owner, incarnation)
        self._records[session.id] = None
        self._records.move_to_end(session.id)
        hot = self._hot
        hot[session.id] = session.copy()  # the caller may go on changing its own
        hot.move_to_end(session.id)
        while len(hot) > self._hot_limit:
            sid, cold = hot.popitem(last=False)
            self._records[sid] = self._pack(cold)  # (keeps its place in the recency order)
        self._owners[owner].move_to_end(session.id)

    async def delete(self, session_id: str, hold: bool = False) -> SessionState | None:
        return self._remove(session_id)  # (leases are this process's: a delete never releases one)

    def lease(self, session_id: str) -> AbstractAsyncContextManager[None]:
        return _Holding(self._leases, session_id)

    def in_use(self, session_id: str) -> bool:
        return session_id in self._leases

    async def evict_lru(self, keep: str | None = None, owner: str | None = None) -> SessionState | None:
        order = self._records if owner is None else self._owners.get(owner, OrderedDict())
        for sid in order:  # oldest first; leased sessions are few, so this stops early
            if sid != keep and sid not in self._leases:
                return self._remove(sid)
        return None

    async def pop_expired(self, now: float, limit: int, check: str | None = None) -> list[SessionState]:
        out: list[SessionState] = []  # (exact for every owner: ``check`` adds nothing here)
        later: list[tuple[float, int, str]] = []
        while self._expiry and self._expiry[0][0] <= now and len(out) < limit:
            _, incarnation, sid = heapq.heappop(self._expiry)
            meta = self._meta.get(sid)
            if meta is None:
                continue  # deleted since: a stale entry
            _, expires_at, _, _, _, current = meta
            if current != incarnation:
                continue  # replaced since: a stale entry
            if expires_at > now or sid in self._leases:
                later.append((max(expires_at, now + 1.0), incarnation, sid))  # used since, or in use now
                continue
            s = self._remove(sid)
            if s is not None:
                out.append(s)
        for entry in later:
            heapq.heappush(self._expiry, entry)
        return out

    async def usage(self) -> StoreUsage:
        return StoreUsage(len(self._records), self._bytes, dict(self._per_model))

    async def owner_usage(self, owner: str) -> StoreUsage:
        return StoreUsage(len(self._owners.get(owner, ())), self._owner_bytes.get(owner, 0))

    async def check(self) -> str | None:
        return None

    async def close(self) -> None:
        self._records.clear()
        self._hot.clear()
        self._meta.clear()
        self._expiry.clear()
        self._owners.clear()
        self._owner_bytes.clear()

    def _remove(self, session_id: str) -> SessionState | None:
        record = self._records.pop(session_id, _ABSENT)
        if record is _ABSENT:
            return None
        _, _, nbytes, model, owner, _ = self._meta.pop(session_id)
        self._bytes -= nbytes
        self._per_model[model] -= 1
        if not self._per_model[model]:
            del self._per_model[model]
        mine = self._owners[owner]
        del mine[session_id]
        self._owner_bytes[owner] -= nbytes
        if not mine:
            del self._owners[owner], self._owner_bytes[owner]
        hot = self._hot.pop(session_id, None)
        return hot if hot is not None else self._unpack(cast(R, record))  # (not _ABSENT, not None: packed)


StoreFactory = Callable[[str, Settings], SessionStore]
"""Builds the store a URL names; the settings carry its options (durability, timeouts, cache size)."""
