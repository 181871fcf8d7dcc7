"""The session index in Redis: counts and bytes (``max_sessions``/``max_session_bytes`` hold for every replica),
sessions per model and per owner, and the order of expiry (eviction takes the session that expires first).

Sessions expire by their own Redis TTL; the index only has to forget them. Each entry carries a *deadline*
after which its session is certainly gone (its TTL plus slack); the reaper trims entries past it
(``trim``), and a session's deadline is moved forward only when its TTL has run past it, so most steps never
touch the index. The index is sharded (``ss:{ix<k>}``, ``settings.session_index_shards``) so no single key or
cluster node carries it all; a principal's sessions also get one shard of their own (``ss:{ow:<owner>}``).
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.core.sessions.redis_conn import Arg, RedisConn, tag
from service.core.sessions.store import StoreUsage


@dataclass(frozen=True, slots=True)
class Indexed:
    id: str
    nbytes: int
    model: str
    owner: str


def _keys(shard: str) -> list[str]:
    return [f"ss:{{{shard}}}:z", f"ss:{{{shard}}}:m", f"ss:{{{shard}}}:t"]


def _meta(raw: bytes | str) -> tuple[int, str, str]:
    m = json.loads(raw)
    return int(m["n"]), str(m["m"]), str(m["o"])


class SessionIndex:
    def __init__(self, conn: RedisConn, shards: int) -> None:
        self.conn = conn
        self.shards = shards
        self._shard_keys = [_keys(f"ix{k}") for k in range(shards)]

    def shard(self, session_id: str) -> list[str]:
        return self._shard_keys[zlib.crc32(session_id.encode()) % self.shards]

    @staticmethod
    def owner_keys(owner: str) -> list[str]:
        return _keys(f"ow:{tag(owner)}")

    def _all(self, session_id: str, owner: str) -> list[list[str]]:
        return [self.shard(session_id), *([self.owner_keys(owner)] if owner else [])]

    async def put(self, s: Indexed, deadline_ms: int, touch: bool = False) -> None:
        """Indexes ``s`` (replacing an entry with its id); ``touch``: only moves an indexed entry's deadline."""
        meta = json.dumps({"n": s.nbytes, "m": s.model, "o": s.owner}, separators=(",", ":"))
        args: list[Arg] = [s.id, deadline_ms, meta, "touch" if touch else "put"]
        await asyncio.gather(*(self.conn.script("index_put", keys, args) for keys in self._all(s.id, s.owner)))

    async def remove(self, session_id: str) -> Indexed | None:
        raw = await self.conn.script("index_del", self.shard(session_id), [session_id])
        if raw is None:
            return None
        nbytes, model, owner = _meta(raw)
        if owner:
            await self.conn.script("index_del", self.owner_keys(owner), [session_id])
        return Indexed(session_id, nbytes, model, owner)

    async def forget(self, session_id: str, deadline_ms: int) -> Indexed | None:
        """Forgets a session found gone before its deadline, unless its entry has moved since (the id was
        created again, or its deadline moved): then None and nothing changes."""
        args: list[Arg] = [session_id, deadline_ms]
        raw = await self.conn.script("index_del", self.shard(session_id), args)
        if raw is None:
            return None
        nbytes, model, owner = _meta(raw)
        if owner:
            await self.conn.script("index_del", self.owner_keys(owner), args)
        return Indexed(session_id, nbytes, model, owner)

    async def trim(self, now_ms: int, limit: int) -> list[Indexed]:
        """Forgets up to ``limit`` sessions per shard whose deadline has passed; returns them."""
        replies = await self.conn.scripts("index_trim", [(keys, [now_ms, limit]) for keys in self._shard_keys])
        gone: list[Indexed] = []
        for flat in replies:
            for i in range(0, len(flat), 2):
                sid = flat[i].decode() if isinstance(flat[i], bytes) else str(flat[i])
                gone.append(Indexed(sid, *_meta(flat[i + 1])))
        owned = [g for g in gone if g.owner]
        await asyncio.gather(*(self.conn.script("index_del", self.owner_keys(g.owner), [g.id]) for g in owned))
        return gone

    async def usage(self, owner: str | None = None) -> StoreUsage:
        shards = self._shard_keys if not owner else [self.owner_keys(owner)]
        totals = await self.conn.batch([("HGETALL", keys[2]) for keys in shards])
        count = nbytes = 0
        per_model: dict[str, int] = {}
        for t in totals:
            for k, v in _pairs(t):
                if k == "n":
                    count += int(v)
                elif k == "b":
                    nbytes += int(v)
                elif k.startswith("m:") and int(v) > 0:
                    per_model[k[2:]] = per_model.get(k[2:], 0) + int(v)
        return StoreUsage(count, nbytes, per_model if not owner else {})

    async def oldest(self, n: int, owner: str | None = None) -> list[tuple[float, str]]:
        """Up to ``n`` (deadline, id) per shard, the soonest to expire first across shards."""
        shards = self._shard_keys if not owner else [self.owner_keys(owner)]
        replies = await self.conn.batch([("ZRANGE", keys[0], 0, n - 1, "WITHSCORES") for keys in shards])
        out: list[tuple[float, str]] = []
        for flat in replies:
            for k, v in _pairs(flat):
                out.append((float(v), k))
        out.sort()
        return out


def _pairs(reply: Sequence[Any] | dict[bytes, bytes] | None) -> list[tuple[str, str]]:
    """A flat [k1, v1, k2, v2] or a dict reply as (str, str) pairs."""
    if not reply:
        return []
    if isinstance(reply, dict):
        items = list(reply.items())
    elif isinstance(reply[0], list | tuple):  # [[member, score], ...] (RESP3, or a client-side callback)
        items = [(pair[0], pair[1]) for pair in reply]
    else:
        items = [(reply[i], reply[i + 1]) for i in range(0, len(reply), 2)]
    return [(_text(k), _text(v)) for k, v in items]


def _text(v: bytes | str | float | int) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
