"""Which engine owns a session or a sequence, when several share the server (``SEQSERVE_ENGINES`` > 1): CRC-32 of
the id's text modulo the engine count, the same in every process and every run. Frontends route by it
(``service/engine/shards.py``); an engine draws the ids it creates until one is its own
(``SessionManager.new_id``)."""

from __future__ import annotations

import zlib


def shard_of(key: str, shards: int) -> int:
    """The engine (0-based, of ``shards``) that owns the session or sequence ``key`` names."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % shards if shards > 1 else 0
