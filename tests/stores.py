"""A test-only session store that keeps every session only as bytes.

Every ``save`` serializes with ``SessionState.to_bytes`` and every ``load`` decodes with ``from_bytes``, as a
network store (Redis) must; the session and API suites run against it as well as against the in-memory store
(``session_store`` fixture), which proves that a store holding nothing but bytes can plug in.
"""

from __future__ import annotations

from service.core.sessions import InMemorySessionStore, SessionState, register_store


class BytesSessionStore(InMemorySessionStore[bytes]):
    def __init__(self) -> None:
        super().__init__(hot=0)  # every save serialized, none kept as it is
        self.encoded = 0  # how many times a session was serialized (the tests check it is not zero)

    def _pack(self, s: SessionState) -> bytes:
        self.encoded += 1
        return s.to_bytes()

    def _unpack(self, record: bytes) -> SessionState:
        assert isinstance(record, bytes)
        return SessionState.from_bytes(record)


register_store("bytes", lambda url, settings: BytesSessionStore())
STORES = ("memory://", "bytes://")
