"""``SessionManager``: ids, TTLs, limits, eviction, expiry and metrics on top of any ``SessionStore``.

A session is pinned to the model version and weights that created it. The store is bounded by count
(``max_sessions``) and bytes (``max_session_bytes``); when full it evicts the least recently used session that
is not in use, or refuses (``session_full_policy``). Idle sessions expire after their TTL: a call finds them
gone at once, and a background reaper removes them from the store.

``use(id)`` is how every call that reads or advances a session runs: it takes the session's lease (calls on
one session take turns, in arrival order), loads a working copy, hands it to the caller, and saves it back
when the call ends, so the store always holds the last committed state.

Every session belongs to the principal that created it (``service.core.context.principal``, "" without auth):
to any other principal it does not exist (the same NOT_FOUND, word for word). Per principal, quotas bound live
sessions and their bytes (``quota_sessions``, ``quota_session_bytes``: RESOURCE_EXHAUSTED naming the quota).
When the whole store is full, eviction takes the caller's own least recently used session first and another
principal's only when the caller has none to give; an evicted session's owner is told so (its id is
remembered, bounded, until the session would have expired anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from service.core.aio import cancel_and_wait
from service.core.context import CommitScope, principal
from service.core.sessions.state import SessionState
from service.core.sessions.store import SessionStore, StaleSession, StoreUsage
from service.core.shards import shard_of
from service.core.tasks.base import builtin_task
from service.errors import (
    RETRY_LATER,
    InvalidInput,
    Overloaded,
    QuotaExceeded,
    SessionEvicted,
    SessionNotFound,
    StoreUnavailable,
    principal_ref,
    session_ref,
)
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)
Array = npt.NDArray[Any]
MIN_TTL_SECONDS = 1.0  # the shortest idle TTL a client may ask for (Create, Fork, Import)
MAX_SESSION_ID_CHARS = 320  # room for a KServe sequence key: "kserve:" + principal tag + model + 200-char id
REAP_BATCH = 1000  # sessions expired per reaper step before it yields the event loop
EVICTED_MEMORY = 10_000  # evicted session ids remembered to tell their owner (oldest forgotten first)


def unknown_session(session_id: str) -> SessionNotFound:
    return SessionNotFound(
        f"session {session_ref(session_id)} is unknown, expired or was lost in a restart; create a new one"
    )


@dataclass(frozen=True, slots=True)
class Eviction:
    """What is remembered of an evicted session: whose it was, until when it would have lived, and why it went."""

    owner: str
    model: str
    until: float
    why: str


def _who(owner: str) -> str:
    return principal_ref(owner) if owner else "the anonymous principal"


def engine_share(total: int, shard: tuple[int, int]) -> int:
    """Engine ``shard[0]``'s share of a limit split exactly among ``shard[1]`` engines: the shares add up to
    ``total`` (the first ``total % engines`` engines hold one more)."""
    index, engines = shard
    return total // engines + int(index < total % engines)


@dataclass(frozen=True, slots=True)
class StoreLimit:
    """One store limit as this engine enforces it: the setting's name, its configured value, and this engine's
    share of it (the whole value with one engine, or a store shared by every process)."""

    name: str
    configured: int
    engines: int
    share: int

    def __str__(self) -> str:
        if self.engines == 1:
            return f"{self.name}={self.configured}"
        return (
            f"{self.name}={self.configured} across {self.engines} engines: this engine holds its share of {self.share}"
        )


def store_limit(settings: Settings, shard: tuple[int, int], name: str) -> StoreLimit:
    """The store limit ``name`` (``max_sessions``, ``max_session_bytes``) as engine ``shard`` enforces it: with
    several engines and the in-memory store, its exact share; a shared store (Redis) counts across every process
    itself."""
    split = shard if settings.sessions_in_process else (0, 1)
    total = getattr(settings, name)
    return StoreLimit(name, total, split[1], engine_share(total, split))


def unfit_sessions(settings: Settings, shard: tuple[int, int], label: str, nbytes: int) -> list[str]:
    """Why sessions of model version ``label`` (``nbytes`` each) cannot work as the settings stand, one line per
    setting: none fits in ``max_session_bytes`` (this engine's share of it), so every create is refused; or, with a
    Redis store, none fits in the hot cache (``session_cache_bytes``), so each is handed back to Redis once idle
    and read from it again at its next step. Empty when they fit."""
    limit = store_limit(settings, shard, "max_session_bytes")
    out = []
    if nbytes > limit.share:
        out.append(
            f"no session of {label} fits: one needs {nbytes} bytes, more than {limit}; every create of one is "
            "refused: raise SEQSERVE_MAX_SESSION_BYTES"
        )
    if settings.session_store.startswith("redis") and nbytes > settings.session_cache_bytes:
        out.append(
            f"no session of {label} fits in the hot cache: one needs {nbytes} bytes, more than "
            f"session_cache_bytes={settings.session_cache_bytes}; one is handed back to Redis within a second of "
            "its last step and read from Redis again at its next: raise SEQSERVE_SESSION_CACHE_BYTES"
        )
    return out


class SessionManager:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        store: SessionStore,
        clock: Callable[[], float] = time.time,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.clock = clock
        self._shard = shard  # (this engine, of how many): the ids it draws route back to it (core/shards.py)
        # With several engines and the in-memory store, each engine holds its exact share of the store's limits
        # (they add up to the settings)
        self.max_sessions = store_limit(settings, shard, "max_sessions")
        self.max_session_bytes = store_limit(settings, shard, "max_session_bytes")
        self._reaper: asyncio.Task[None] | None = None
        self._models: set[str] = set()  # models whose active-sessions gauge we have set
        self._evicted: OrderedDict[str, Eviction] = OrderedDict()  # oldest first, at most EVICTED_MEMORY
        # Creates of this process check the limits and add one at a time; on a network store the check and the
        # add are separate round trips. Replicas sharing one Redis can still overshoot a limit by the creates
        # they run at the same instant (at most one per replica).
        self._adding = asyncio.Lock()

    # --- limits -----------------------------------------------------------------------------------------
    def check_fits(self, label: str, nbytes: int) -> None:
        """Logs a warning for each setting that leaves no room for one session of ``label`` (a model version
        just loaded; ``unfit_sessions``)."""
        for problem in unfit_sessions(self.settings, self._shard, label, nbytes):
            log.warning("%s", problem)

    def ttl(self, ttl_seconds: float | None) -> float:
        """The TTL to use: the default when None; InvalidInput outside [MIN_TTL_SECONDS, session_max_ttl_seconds]
        (a TTL of 1e-9 s made a session that was gone before the client's next call could reach it)."""
        if ttl_seconds is None:
            return min(self.settings.session_ttl_seconds, self.settings.session_max_ttl_seconds)
        limit = self.settings.session_max_ttl_seconds
        least = min(MIN_TTL_SECONDS, limit)
        if not math.isfinite(ttl_seconds) or ttl_seconds < least or ttl_seconds > limit:
            raise InvalidInput(
                f"ttl_seconds must be >= {least:g} and <= {limit:g} (session_max_ttl_seconds); got {ttl_seconds:g}"
                + (": a session idle that long is gone before the next call" if 0 < ttl_seconds < least else "")
            )
        return float(ttl_seconds)

    def new_id(self, session_id: str | None = None) -> str:
        if session_id is None:
            while True:  # with several engines, one of this engine's own (1 try in N on average): routed back here
                drawn = secrets.token_urlsafe(24)  # 192 random bits
                if shard_of(drawn, self._shard[1]) == self._shard[0]:
                    return drawn
        if not session_id or len(session_id) > MAX_SESSION_ID_CHARS:
            raise InvalidInput(f"session_id must have 1 to {MAX_SESSION_ID_CHARS} characters; got {len(session_id)}")
        return session_id

    async def _check_quota(self, owner: str, nbytes: int) -> None:
        """``QuotaExceeded`` when one more session of ``nbytes`` would take ``owner`` past a quota."""
        max_n, max_b = self.settings.quota_sessions, self.settings.quota_session_bytes
        if not max_n and not max_b:
            return
        mine = await self.store.owner_usage(owner)
        if max_n and mine.count + 1 > max_n:
            raise QuotaExceeded(
                f"session quota exceeded: {_who(owner)} holds {mine.count} live sessions, the limit is {max_n} "
                "(quota_sessions); delete sessions you no longer need or let them expire"
            )
        if max_b and mine.bytes + nbytes > max_b:
            raise QuotaExceeded(
                f"session bytes quota exceeded: {_who(owner)} holds {mine.bytes} bytes of sessions and this one "
                f"needs {nbytes}, the limit is {max_b} (quota_session_bytes); delete sessions you no longer need"
            )

    def _count_created(self, model: str, event: str) -> None:
        self.metrics.session_event(model, "created")  # a fork or an import is a creation too
        if event != "created":
            self.metrics.session_event(model, event)

    async def _check_quota_swept(self, owner: str, nbytes: int) -> bool:
        """``_check_quota``, once more after sweeping expired sessions if it fails; True when it swept."""
        try:
            await self._check_quota(owner, nbytes)
            return False
        except QuotaExceeded:
            if not await self.sweep(check=owner):  # the owner's sessions past their TTL no longer count
                raise
        await self._check_quota(owner, nbytes)
        return True

    async def _refuse_early(self, session: SessionState) -> None:
        """Before a start's first step runs (``begin``): refuses it when ``add`` would, so a full store or a
        used-up quota costs no model run. Evicts nothing; a start that replaces the id's session is left to
        ``add``, since the replaced one frees its own room."""
        st = self.settings
        if st.session_full_policy != "reject" and not st.quota_sessions and not st.quota_session_bytes:
            return
        if await self.store.load(session.id) is not None:
            return
        if st.session_full_policy == "reject":
            await self._make_room(principal(), session.nbytes, keep=session.id)  # refuses; never evicts here
        else:
            await self._check_quota_swept(principal(), session.nbytes)

    async def _make_room(self, owner: str, nbytes: int, keep: str | None) -> None:
        """Evicts least recently used idle sessions (or refuses) until one more session of ``nbytes`` fits:
        the owner's own first, another principal's only when the owner has none to give."""
        max_n, max_b = self.max_sessions.share, self.max_session_bytes.share
        if nbytes > max_b:
            raise Overloaded(f"a session of this model needs {nbytes} bytes, more than {self.max_session_bytes}")
        await self._check_quota_swept(owner, nbytes)
        usage = await self.store.usage()
        swept = False
        while usage.count + 1 > max_n or usage.bytes + nbytes > max_b:
            if not swept:  # sessions past their TTL that the reaper has not removed yet make room first
                swept = True
                # (a reject policy refuses on the count: make it exact; eviction finds expired values by itself)
                if await self.sweep(check="" if self.settings.session_full_policy == "reject" else None):
                    usage = await self.store.usage()
                    continue
            full = "max_sessions" if usage.count + 1 > max_n else "max_session_bytes"
            what = f"{usage.count} sessions ({self.max_sessions}), {usage.bytes} bytes ({self.max_session_bytes})"
            if self.settings.session_full_policy == "reject":
                raise Overloaded(f"session store is full: {what}; delete sessions you no longer need or retry later")
            victim = await self.store.evict_lru(keep, owner=owner)
            if victim is None:
                victim = await self.store.evict_lru(keep)
            if victim is None:
                raise Overloaded(
                    f"session store is full and every session is in use: {what}; retry later", retry_after=RETRY_LATER
                )
            if victim.expires_at <= self.clock():  # it had expired (a network store found its value gone)
                self.metrics.session_event(victim.model, "expired")
            else:
                await self._remember_eviction(victim, full)
                self.metrics.session_event(victim.model, "evicted")
                log.info(
                    "evicted a session of %s (least recently used, %s) to make room", victim.model, _who(victim.owner)
                )
            usage = await self.store.usage()

    async def _remember_eviction(self, victim: SessionState, full: str) -> None:
        self._evicted.pop(victim.id, None)
        self._evicted[victim.id] = Eviction(victim.owner, victim.model, victim.expires_at, full)
        while len(self._evicted) > EVICTED_MEMORY:
            self._evicted.popitem(last=False)
        note = getattr(self.store, "note_eviction", None)  # (a shared store's: every replica tells the owner)
        if note is not None:
            with contextlib.suppress(StoreUnavailable):  # (this replica still tells it)
                await note(victim.id, victim.owner, full, victim.expires_at - self.clock())

    async def _not_found(self, session_id: str) -> SessionNotFound:
        """Unknown, expired, another principal's, or evicted (told only to its owner, until it would have
        expired anyway: by any replica, when the store keeps a record of it)."""
        gone = self._evicted.get(session_id)
        why = gone.why if gone is not None and gone.owner == principal() and gone.until > self.clock() else None
        lookup = getattr(self.store, "eviction", None)
        if why is None and lookup is not None:
            with contextlib.suppress(StoreUnavailable):
                record = await lookup(session_id)
                if record is not None and record[0] == principal():
                    why = record[1]
        if why is not None:
            return SessionEvicted(
                f"session {session_ref(session_id)} was evicted to make room: the session store was full ({why}) and "
                "it was the least recently used; create a new one"
            )
        return unknown_session(session_id)

    async def usage(self) -> StoreUsage:
        return await self.store.usage()

    async def _report(self) -> None:
        usage = await self.store.usage()
        for model in self._models | set(usage.per_model):
            self.metrics.sessions_active(model, usage.per_model.get(model, 0))
        self._models |= set(usage.per_model)
        self.metrics.session_store_usage(
            usage.count, self.max_sessions.share, usage.bytes, self.max_session_bytes.share
        )

    # --- lifecycle ----------------------------------------------------------------------------------------
    async def add(
        self, session: SessionState, keep: str | None = None, event: str = "created", replacing: bool = False
    ) -> SessionState:
        """Stores a new session, owned by the calling principal. A caller-chosen id that exists replaces the old
        session; a caller that chooses ids uses ``begin`` instead, which does this under the id's lease
        (``replacing``)."""
        session.owner = principal()
        async with self._adding:  # counted and added as one step: concurrent creates cannot all pass the limits
            # (hold: between this delete and the add below, another replica's call on the id took its lease and
            # found no session: told NOT_FOUND, a sequence "unknown", while a sequence_start replaced it)
            old = await self.store.delete(session.id, hold=replacing)
            try:
                await self._make_room(session.owner, session.nbytes, keep)
            except BaseException:
                if old is not None:  # a refused replacement leaves the session it would have replaced
                    await self.store.add(old)
                elif replacing:  # (nothing to put back: let the held lease go, or a retry waits it out)
                    with contextlib.suppress(StoreUnavailable):
                        await self.store.delete(session.id)
                raise
            if old is not None:
                self.metrics.session_event(old.model, "deleted")
            await self.store.add(session)
        self._evicted.pop(session.id, None)
        self._count_created(session.model, event)
        await self._report()
        return session

    async def _live(self, session_id: str, expire: bool = True) -> SessionState:
        """The stored session, or ``SessionNotFound``; with ``expire`` (under its lease), one past its TTL is
        removed and reported as unknown."""
        s = await self.store.load(session_id)
        if s is not None and s.owner != principal():
            s = None  # another principal's: exactly as if it did not exist
        if expire and s is not None and s.expires_at <= self.clock():
            await self.store.delete(session_id)
            self.metrics.session_event(s.model, "expired")
            await self._report()
            s = None
        if s is None:
            raise await self._not_found(session_id)
        return s

    async def get(self, session_id: str) -> SessionState:
        """A copy of the live session, or ``SessionNotFound`` (unknown, deleted or expired); as ``read``."""
        return (await self.read(session_id))[0]

    async def read(self, session_id: str) -> tuple[SessionState, bool]:
        """A copy of the live session and whether a call is running on it, or ``SessionNotFound`` (unknown,
        deleted or expired). A session in use is read without its lease, as its last finished call stored it: a
        read never waits behind a long call (a Complete of thousands of characters). It is live (a running call
        keeps it so, as ``pop_expired`` does), and another principal's reads as unknown at once too, so the
        answer's timing says nothing about whose it is."""
        if self.store.in_use(session_id):
            return await self._live(session_id, expire=False), True
        async with self.store.lease(session_id):
            return await self._live(session_id), False

    def begin(self, session: SessionState, event: str = "created", end: bool = False) -> SessionStart:
        """Holds the lease of a caller-chosen id (a KServe sequence's) while the caller runs the first step on
        ``session``, which is not stored yet; when the block ends without an error the session is stored,
        replacing whatever had that id (``add``), still under the lease. A refused or failed first step stores
        nothing, and the id's running session (if any) stays as it was. With ``end``, the id's running session is
        ended instead and nothing is stored (a one-request sequence)."""
        return SessionStart(self, session, event, end)

    def use(self, session_id: str, save: bool = True, end: bool = False) -> SessionUse:
        """Leases the session and yields a working copy; whatever the caller left in it is saved when the call
        ends (also when it failed or was cancelled: tasks change a session only at consistent points).

        ``save=False``: nothing is saved unless the caller sets ``.save`` on the returned object inside the
        block (a call that checks its request under the lease first, and fails before changing anything, leaves
        the session exactly as it was, idle time included). With ``end``, the session is deleted instead of
        saved, still under the lease (a sequence's last request), so no later call on the id can slip in
        between."""
        return SessionUse(self, session_id, save, end)

    async def fork(
        self, session_id: str, ttl_seconds: float | None, check: Callable[[SessionState], None] | None = None
    ) -> SessionState:
        """A twin of the session under a new id. ``check``: raises when the source may not be forked (read under
        the same lease, no second load)."""
        ttl = self.ttl(ttl_seconds)
        async with self.use(session_id) as src:
            if check is not None:
                check(src)
            twin = src.clone(self.new_id(), ttl, self.clock())
        return await self.add(twin, keep=src.id, event="forked")  # making room never evicts the source

    async def delete(self, session_id: str) -> SessionState:
        """Removes the session and returns it (``SessionNotFound`` when unknown or expired)."""
        async with self.store.lease(session_id):
            s = await self._live(session_id)
            await self._remove(s)
        return s

    async def _remove(self, s: SessionState) -> None:
        """Deletes a live session the caller holds the lease of."""
        await self.store.delete(s.id)
        self.metrics.session_event(s.model, "deleted")
        await self._report()

    async def sweep(self, check: str | None = None) -> int:
        """Removes every session idle past its TTL; returns how many. ``check``: see ``SessionStore.pop_expired``."""
        n = 0
        while True:
            expired = await self.store.pop_expired(self.clock(), REAP_BATCH, check)
            for s in expired:
                self.metrics.session_event(s.model, "expired")
            n += len(expired)
            if len(expired) < REAP_BATCH:
                break
            await asyncio.sleep(0)  # a big sweep never holds the event loop for long
        if n:
            await self._report()
        return n

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reaper_interval_seconds)
            try:
                if n := await self.sweep():
                    log.info("expired %d idle sessions", n)
                else:  # a shared store changes under other replicas too: the gauges follow it on every tick
                    await self._report()
            except StoreUnavailable:
                pass  # said once by the store; the reaper tries again
            except Exception:  # the reaper must survive anything
                log.exception("session reaper failed")

    def start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap(), name="session-reaper")

    async def stop(self) -> None:
        if self._reaper is not None:
            await cancel_and_wait(self._reaper)
            self._reaper = None
        await self.store.close()


def _check_state(s: SessionState, before: dict[str, Array], context: dict[str, Array], steps: int) -> None:
    """RuntimeError, with the session put back as it was (``before``, ``context``, ``steps``), when the call's
    task left it a state that is not its model's: other names, shapes or dtypes than the state it had. Saved, such
    a state failed every later step of the session in ONNX Runtime, with an error that named no task. (For plugins'
    tasks: seqserve's own take their states from the graph's runs, ``builtin_task``.)"""
    new = s.state
    wrong = None
    if not isinstance(new, dict) or new.keys() != before.keys():
        wrong = f"the states {sorted(new) if isinstance(new, dict) else type(new).__name__} (not {sorted(before)})"
    else:
        for name, a in new.items():
            b = before[name]
            if not isinstance(a, np.ndarray) or a.shape != b.shape or a.dtype != b.dtype:
                got = f"{a.dtype} {list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
                wrong = f"state {name} as {got} (not {b.dtype} {list(b.shape)})"
                break
    if wrong is not None:
        s.state, s.context, s.steps = before, context, steps
        raise RuntimeError(
            f"task {s.task!r} of model {s.model}/{s.version} left session {session_ref(s.id)} {wrong}; the session "
            "is kept as it was before this call: fix the task's infer()"
        )


class SessionUse:
    """``async with manager.use(id) as s``: lease, load, and save back on the way out (see ``SessionManager.use``).
    A plain class rather than a generator context manager: every session call enters one."""

    __slots__ = ("_before", "_end", "_id", "_kept", "_lease", "_manager", "_scope", "_session", "save")

    def __init__(self, manager: SessionManager, session_id: str, save: bool, end: bool) -> None:
        self._manager, self._id, self.save, self._end = manager, session_id, save, end
        self._lease = manager.store.lease(session_id)
        self._session: SessionState | None = None

    async def __aenter__(self) -> SessionState:
        await self._lease.__aenter__()
        try:
            s = self._session = await self._manager._live(self._id)
        except BaseException:
            await self._lease.__aexit__(None, None, None)
            raise
        self._before = (s.state, s.context, s.steps)  # a task replaces these when it commits a step
        # A plugin's task: its state's arrays as they were, kept apart from the dict it may change in place
        # (``s.state["h"] = ...`` left ``s.state is state``, and a wrong state was saved unchecked).
        self._kept = None if builtin_task(s.task) else dict(s.state)
        self._scope = CommitScope()
        return s

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        committed = False
        try:
            s = self._session
            if self.save and s is not None:
                state, context, steps = self._before
                if exc_type is not None and s.state is state and s.context is context and s.steps == steps:
                    return  # refused or failed before the task changed anything: not even its idle time moves
                if exc_type is not None and self._kept is not None:  # a plugin's task failed (or broke its
                    s.state, s.context, s.steps = self._kept, context, steps  # contract): the session stays as it was
                    return
                m = self._manager
                if self._end:
                    await m._remove(s)
                    committed = True
                    return
                if self._kept is not None:
                    _check_state(s, self._kept, context, steps)
                s.last_used_at = m.clock()
                try:
                    await m.store.save(s)
                except StaleSession:
                    raise SessionNotFound(
                        f"session {session_ref(self._id)} was deleted or replaced while this call used it"
                    ) from None
                committed = True
        finally:
            self._scope.close(committed)
            self._session = None
            await self._lease.__aexit__(None, None, None)


class SessionStart:
    """``async with manager.begin(session) as s`` (see ``SessionManager.begin``)."""

    __slots__ = ("_end", "_event", "_lease", "_manager", "_scope", "_session", "_state")

    def __init__(self, manager: SessionManager, session: SessionState, event: str, end: bool) -> None:
        self._manager, self._session, self._event, self._end = manager, session, event, end
        self._state = session.state  # the model's initial state: a first step's state must have its shapes
        self._lease = manager.store.lease(session.id)

    async def __aenter__(self) -> SessionState:
        await self._lease.__aenter__()
        try:
            self._session.owner = principal()
            if not self._end:  # a one-request sequence stores nothing: no quota or full store refuses it
                await self._manager._refuse_early(self._session)
        except BaseException:
            await self._lease.__aexit__(None, None, None)
            raise
        self._scope = CommitScope()
        return self._session

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        committed = False
        try:
            if exc_type is not None:
                return  # refused or failed: nothing stored, the running session (if any) untouched
            m, s = self._manager, self._session
            if self._end:  # a one-request sequence: it began and ended here (counted so), nothing is stored
                old = await m.store.delete(s.id)
                if old is not None:
                    m.metrics.session_event(old.model, "deleted")
                m._count_created(s.model, self._event)
                m.metrics.session_event(s.model, "deleted")
                await m._report()
            else:
                if s.state is not self._state and not builtin_task(s.task):
                    _check_state(s, self._state, s.context, s.steps)
                s.last_used_at = m.clock()
                await m.add(s, event=self._event, replacing=True)
            committed = True
        finally:
            self._scope.close(committed)
            await self._lease.__aexit__(None, None, None)
