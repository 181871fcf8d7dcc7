"""Sessions: a serializable ``SessionState``, the async ``SessionStore`` protocol with its in-memory store,
and the ``SessionManager`` that enforces ids, TTLs, limits and metrics on top of any store.

Stores are picked by the scheme of ``settings.session_store`` (``memory://`` by default; ``redis://``,
``rediss://`` and ``redis+cluster://`` for the shared Redis store) through one table; ``register_store`` adds a
scheme (tests add a bytes-only store this way).
"""

from __future__ import annotations

import os
import re
import socket

from service.core.sessions.manager import SessionManager, unknown_session
from service.core.sessions.state import SessionDecodeError, SessionState
from service.core.sessions.store import InMemorySessionStore, SessionStore, StaleSession, StoreFactory, StoreUsage
from service.settings import Settings


def _redis(url: str, settings: Settings) -> SessionStore:
    from service.core.sessions.redis_store import RedisSessionStore  # imports redis only when it is used

    return RedisSessionStore(url, settings)


STORES: dict[str, StoreFactory] = {
    "memory": lambda url, settings: InMemorySessionStore(),
    "redis": _redis,
    "rediss": _redis,
    "redis+cluster": _redis,
    "rediss+cluster": _redis,
}


def register_store(scheme: str, factory: StoreFactory) -> None:
    STORES[scheme] = factory


def open_store(url: str, settings: Settings) -> SessionStore:
    """The store ``url`` names (``memory://``, ``redis://host:port/db``, ``bytes://`` in tests, ...);
    ValueError for an unknown scheme, or a URL its store cannot read (a port out of range, a cluster URL without a
    node), naming the setting (the client library's own message alone names nothing)."""
    scheme = url.split("://", 1)[0] if "://" in url else url
    if scheme not in STORES:
        raise ValueError(f"session_store {redact(url)!r}: unknown scheme {scheme!r}; known: {sorted(STORES)}")
    try:
        return STORES[scheme](url, settings)
    except Exception as exc:  # (the store's constructor reads the URL; it connects later)
        why = str(exc).splitlines()[0].replace(url, redact(url)) if str(exc) else type(exc).__name__
        raise ValueError(f"session_store {redact(url)!r}: {why}") from exc


def store_label(url: str) -> str:
    """The store as ``seqserve_session_store_info`` names it: a network store's URL without its password (the same
    in every replica sharing it), ``memory://HOST/PID`` for a process's own (no two replicas share one)."""
    if url.split("://", 1)[0] == "memory":
        return f"memory://{socket.gethostname()}/{os.getpid()}"
    return redact(url)


def redact(url: str) -> str:
    """``url`` without its password, in every form redis-py reads one: ``redis://:secret@host`` (also with ``@``
    inside the password) -> ``redis://:***@host``, and ``?password=secret`` -> ``?password=***``: fit for logs
    and messages."""
    head, sep, rest = url.partition("://")
    if not sep:
        return url
    # The query's passwords first, so that an "@" in one is gone before the user part is looked for.
    rest = re.sub(r"([?&][^=&#@]*pass[^=&#@]*=)[^&#]*", r"\1***", rest, flags=re.IGNORECASE)
    if "@" in rest:  # everything up to the last "@" is the user and password (which may hold "@", "/", "?")
        auth, _, rest = rest.rpartition("@")
        rest = f"{auth.split(':', 1)[0]}:***@{rest}"
    return head + "://" + rest


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
    "redact",
    "register_store",
    "store_label",
    "unknown_session",
]
