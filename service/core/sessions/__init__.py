"""Sessions: a serializable ``SessionState``, the async ``SessionStore`` protocol with its in-memory store,
and the ``SessionManager`` that enforces ids, TTLs, limits and metrics on top of any store.

Stores are picked by the scheme of ``settings.session_store`` (``memory://`` by default) through one table;
``register_store`` adds a scheme (tests add a bytes-only store this way).
"""

from __future__ import annotations

from service.core.sessions.manager import SessionManager, unknown_session
from service.core.sessions.state import SessionDecodeError, SessionState
from service.core.sessions.store import InMemorySessionStore, SessionStore, StaleSession, StoreFactory, StoreUsage

STORES: dict[str, StoreFactory] = {"memory": lambda url: InMemorySessionStore()}


def register_store(scheme: str, factory: StoreFactory) -> None:
    STORES[scheme] = factory


def open_store(url: str) -> SessionStore:
    """The store ``url`` names (``memory://``, ``bytes://`` in tests, ...); ValueError for an unknown scheme."""
    scheme = url.split("://", 1)[0] if "://" in url else url
    if scheme not in STORES:
        raise ValueError(f"session_store {url!r}: unknown scheme {scheme!r}; known: {sorted(STORES)}")
    return STORES[scheme](url)


__all__ = [
    "STORES",
    "InMemorySessionStore",
    "SessionDecodeError",
    "SessionManager",
    "SessionState",
    "SessionStore",
    "StaleSession",
    "StoreUsage",
    "open_store",
    "register_store",
    "unknown_session",
]
