"""Server-side sessions: a model's recurrent state (and a little context) kept between calls.

A session is pinned to the model *version* that created it (a state means nothing to another version). The
store is bounded by count (``max_sessions``) and bytes (``max_session_bytes``); when full it evicts the least
recently used idle session or refuses (``session_full_policy``). Idle sessions expire after their TTL; a
background reaper sweeps them. Each session has an ``asyncio.Lock``: two calls on one session run one after the
other, never interleaved. ``SessionStore`` is the small interface a Redis-backed store would implement.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.core.runtime import Array
from service.core.types import FloatArray, SessionInfo
from service.errors import InvalidInput, Overloaded, SessionNotFound
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)
MAX_SESSION_ID_CHARS = 256


@dataclass
class Session:
    """``state``: graph state input name -> array ``[layers*dirs, 1(*features), hidden]`` (batch of one).
    ``rows``: forecaster context, the last ``window`` rows in original units ``(n, features)``.
    ``logits``: char LM context, ``(vocab,)`` logits of the next character after everything consumed, so
    Suggest/Complete can start without recomputing anything."""

    id: str
    model: str
    version: int
    task: str
    state: dict[str, Array]
    nbytes: int  # bytes reserved in the store: state plus the largest context this session can hold
    ttl_seconds: float
    created_at: float
    last_used_at: float
    rows: FloatArray | None = None
    logits: FloatArray | None = None
    steps: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def expires_at(self) -> float:
        return self.last_used_at + self.ttl_seconds

    def info(self) -> SessionInfo:
        return SessionInfo(
            id=self.id,
            model=self.model,
            version=self.version,
            steps=self.steps,
            created_at=self.created_at,
            last_used_at=self.last_used_at,
            expires_at=self.expires_at,
            ttl_seconds=self.ttl_seconds,
            metadata=dict(self.metadata),
        )

    def reset(self) -> None:
        """Back to the initial (zero) state with no context."""
        self.state = {k: np.zeros_like(v) for k, v in self.state.items()}
        self.rows, self.logits, self.steps = None, None, 0

    def clone(self, new_id: str, ttl_seconds: float, now: float) -> Session:
        """Deep copy under a new id (a fork): the two evolve independently from here."""
        return Session(
            id=new_id,
            model=self.model,
            version=self.version,
            task=self.task,
            state={k: v.copy() for k, v in self.state.items()},
            nbytes=self.nbytes,
            ttl_seconds=ttl_seconds,
            created_at=now,
            last_used_at=now,
            rows=None if self.rows is None else self.rows.copy(),
            logits=None if self.logits is None else self.logits.copy(),
            steps=self.steps,
            metadata=copy.deepcopy(self.metadata),
        )


class SessionStore(Protocol):
    """Where sessions live. The in-memory one below; a Redis one can implement the same five methods."""

    def get(self, session_id: str) -> Session | None: ...

    def put(self, session: Session) -> None: ...

    def pop(self, session_id: str) -> Session | None: ...

    def touch(self, session_id: str) -> None: ...

    def by_recency(self) -> Iterator[Session]:
        """Least recently used first."""
        ...


class InMemorySessionStore:
    def __init__(self) -> None:
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # LRU order: oldest first

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def put(self, session: Session) -> None:
        self._sessions[session.id] = session
        self._sessions.move_to_end(session.id)

    def pop(self, session_id: str) -> Session | None:
        return self._sessions.pop(session_id, None)

    def touch(self, session_id: str) -> None:
        if session_id in self._sessions:
            self._sessions.move_to_end(session_id)

    def by_recency(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))


class SessionManager:
    """Ids, limits, TTLs, eviction, locking and metrics on top of a ``SessionStore``."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        store: SessionStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store: SessionStore = store if store is not None else InMemorySessionStore()
        self.clock = clock
        self.count = 0
        self.bytes_used = 0
        self._per_model: dict[str, int] = {}
        self._reaper: asyncio.Task[None] | None = None

    # --- bookkeeping ----------------------------------------------------------------------------------
    def _added(self, s: Session) -> None:
        self.count += 1
        self.bytes_used += s.nbytes
        self._per_model[s.model] = self._per_model.get(s.model, 0) + 1
        self._report(s.model)

    def _removed(self, s: Session, event: str) -> None:
        self.count -= 1
        self.bytes_used -= s.nbytes
        self._per_model[s.model] -= 1
        self.metrics.session_event(s.model, event)
        self._report(s.model)

    def _report(self, model: str) -> None:
        self.metrics.sessions_active(model, self._per_model.get(model, 0))
        self.metrics.session_store_usage(
            self.count, self.settings.max_sessions, self.bytes_used, self.settings.max_session_bytes
        )

    def ttl(self, ttl_seconds: float | None) -> float:
        """The TTL to use: the default when None; InvalidInput outside (0, session_max_ttl_seconds]."""
        if ttl_seconds is None:
            return min(self.settings.session_ttl_seconds, self.settings.session_max_ttl_seconds)
        limit = self.settings.session_max_ttl_seconds
        if not math.isfinite(ttl_seconds) or ttl_seconds <= 0 or ttl_seconds > limit:
            raise InvalidInput(f"ttl_seconds must be > 0 and <= {limit:g} (session_max_ttl_seconds); got {ttl_seconds}")
        return float(ttl_seconds)

    def _make_room(self, nbytes: int, keep: str | None = None) -> None:
        """Evicts LRU idle sessions (or refuses) until one more session of ``nbytes`` fits."""
        max_n, max_b = self.settings.max_sessions, self.settings.max_session_bytes
        if nbytes > max_b:
            raise Overloaded(f"a session of this model needs {nbytes} bytes, more than max_session_bytes={max_b}")
        victims = self.store.by_recency()
        while self.count + 1 > max_n or self.bytes_used + nbytes > max_b:
            what = f"{self.count} sessions (max_sessions={max_n}), {self.bytes_used} bytes (max_session_bytes={max_b})"
            if self.settings.session_full_policy == "reject":
                raise Overloaded(f"session store is full: {what}; delete sessions you no longer need or retry later")
            victim = next((s for s in victims if not s.lock.locked() and s.id != keep), None)
            if victim is None:
                raise Overloaded(f"session store is full and every session is in use: {what}; retry later")
            self.store.pop(victim.id)
            self._removed(victim, "evicted")
            log.info("evicted session of %s (least recently used) to make room", victim.model)

    # --- lifecycle ------------------------------------------------------------------------------------
    def new_id(self, session_id: str | None) -> str:
        if session_id is None:
            return secrets.token_urlsafe(24)  # 192 random bits
        if not session_id or len(session_id) > MAX_SESSION_ID_CHARS:
            raise InvalidInput(f"session_id must have 1 to {MAX_SESSION_ID_CHARS} characters; got {len(session_id)}")
        return session_id

    def add(self, session: Session, keep: str | None = None) -> Session:
        """Stores a new session. A caller-chosen id that exists replaces the old session (a KServe sequence
        restarted with the same correlation id)."""
        old = self.store.pop(session.id)
        if old is not None:
            self._removed(old, "deleted")
        self._make_room(session.nbytes, keep)
        self.store.put(session)
        self._added(session)
        self.metrics.session_event(session.model, "created")
        return session

    def get(self, session_id: str) -> Session:
        """The live session or ``SessionNotFound`` (unknown, deleted or expired)."""
        s = self.store.get(session_id)
        if s is not None and s.expires_at <= self.clock() and not s.lock.locked():
            self.store.pop(s.id)
            self._removed(s, "expired")
            s = None
        if s is None:
            raise SessionNotFound(
                f"session {session_id!r} does not exist or has expired (idle longer than its TTL); create a new one"
            )
        return s

    @contextlib.asynccontextmanager
    async def use(self, session_id: str) -> AsyncIterator[Session]:
        """Holds the session's lock for the duration; calls on one session are serialized in arrival order."""
        s = self.get(session_id)
        async with s.lock:
            if self.store.get(session_id) is not s:
                raise SessionNotFound(f"session {session_id!r} was deleted while this call waited for it")
            try:
                yield s
            finally:
                s.last_used_at = self.clock()
                self.store.touch(s.id)

    async def fork(self, session_id: str, ttl_seconds: float | None) -> Session:
        ttl = self.ttl(ttl_seconds)
        async with self.use(session_id) as src:
            twin = src.clone(self.new_id(None), ttl, self.clock())
        self.add(twin, keep=src.id)  # making room never evicts the session being forked
        self.metrics.session_event(twin.model, "forked")
        return twin

    def delete(self, session_id: str) -> Session:
        """Removes the session and returns it (``SessionNotFound`` when unknown or expired)."""
        s = self.get(session_id)
        self.store.pop(s.id)
        self._removed(s, "deleted")
        return s

    def sweep(self) -> int:
        """Drops every expired idle session; returns how many."""
        now, n = self.clock(), 0
        for s in self.store.by_recency():
            if s.expires_at <= now and not s.lock.locked():
                self.store.pop(s.id)
                self._removed(s, "expired")
                n += 1
        return n

    def sessions(self) -> list[Session]:
        return list(self.store.by_recency())

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reaper_interval_seconds)
            try:
                if n := self.sweep():
                    log.info("expired %d idle sessions", n)
            except Exception:  # the reaper must survive anything
                log.exception("session reaper failed")

    def start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap(), name="session-reaper")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
