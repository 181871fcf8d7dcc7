"""The Lua scripts of the Redis session store: every change to a session or to the index is one atomic script.

A session is two keys with the same hash tag (one cluster slot): ``ss:{<id>}:v`` holds ``HEAD + state bytes``,
``ss:{<id>}:l`` the lease (the id of the replica that owns the session, with a TTL). ``HEAD`` is 32 ASCII hex
digits: the revision (16) and the index deadline in ms (16). A write names the revision it read (compare and
set) and the lease it holds (fencing): a replica that lost its lease, or wrote from a stale copy, is refused.

The index is spread over shards ``ss:{ix<k>}`` (and one per owner ``ss:{ow:<owner>}``), each three keys in one
slot: ``:z`` (sorted set: id -> deadline ms, after which the session is certainly expired), ``:m`` (hash: id ->
JSON {n: bytes, m: model, o: owner}) and ``:t`` (hash: n = sessions, b = bytes, m:<model> = sessions).
"""

from __future__ import annotations

import re

HEAD_CHARS = 32
_HEAD = re.compile(f"[0-9a-f]{{{HEAD_CHARS}}}")

# KEYS: value, lease. ARGV: replica, lease ms, revision the caller has cached ("" = none), create ("1"/"0").
# -> {1, head[, value]} owned (the value only when the cached revision is not the stored one);
#    {0, holder, pttl} another replica owns it; {2} no such session; {3} owned, no session yet (create).
ACQUIRE = """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
  return {0, holder, redis.call('PTTL', KEYS[2])}
end
local head = redis.call('GETRANGE', KEYS[1], 0, 31)
if head == '' then
  if ARGV[4] == '1' then
    redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
    return {3}
  end
  if holder then redis.call('DEL', KEYS[2]) end
  return {2}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if string.sub(head, 1, 16) == ARGV[3] then
  return {1, head}
end
return {1, head, redis.call('GET', KEYS[1])}
"""

# KEYS: value, lease. ARGV: replica, expected revision (16 hex), new value, value ms, lease ms, release ("1"/"0").
# -> 1 written; -1 another replica holds the lease; {-2, stored revision ("" = gone)} it is not the expected one.
# A value written under a lease this replica keeps lives at least as long as the lease (RENEW extends both while
# a call runs): a call longer than the session's TTL finds its value still there (a session in use is not idle).
SAVE = """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return -1 end
local stored = redis.call('GETRANGE', KEYS[1], 0, 15)
if stored ~= ARGV[2] then return {-2, stored} end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
if ARGV[6] == '1' then
  redis.call('DEL', KEYS[2])
else
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[5])
end
return 1
"""

# KEYS: value, lease[, eviction record]. ARGV: replica, new value, value ms, lease ms. Creates or replaces the
# session (and owns it); a record that an earlier session of the id was evicted goes.
# -> {1[, old value]}; {0, holder} another replica owns the id.
ADD = """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {0, holder} end
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4])
if KEYS[3] then redis.call('DEL', KEYS[3]) end
if old then return {1, old} end
return {1}
"""

# KEYS: value, lease. ARGV: replica[, hold ms]. Deletes the session unless another replica holds its lease; with
# a hold, the lease stays this replica's for that long (an eviction keeps it until the index forgot the session, so
# another replica evicting at once skips it instead of counting it a second time, as an expiry).
# -> {1[, old value]} removed; {0, holder} another replica holds the lease.
DELETE = """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {0, holder} end
local old = redis.call('GET', KEYS[1])
if ARGV[2] and ARGV[2] ~= '0' then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
else
  redis.call('DEL', KEYS[1], KEYS[2])
end
if old then return {1, old} end
return {1}
"""

# KEYS: lease. ARGV: replica, lease ms ("0" = release). -> 1 held (or released), 0 another replica holds it.
LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then
  if holder then redis.call('DEL', KEYS[1]) end
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""

# KEYS: value, lease. ARGV: replica, lease ms. Renews this replica's lease of a session in a long call (or holding
# unwritten steps), and keeps its value alive at least as long: -> 1 renewed; 0 another replica holds the lease;
# -1 the value is gone (Redis lost it: a restart without persistence, a failover): never re-created here.
RENEW = """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

_UNCOUNT = """
local function uncount(meta)
  local o = cjson.decode(meta)
  redis.call('HINCRBY', KEYS[3], 'n', -1)
  redis.call('HINCRBY', KEYS[3], 'b', -o.n)
  if redis.call('HINCRBY', KEYS[3], 'm:' .. o.m, -1) <= 0 then redis.call('HDEL', KEYS[3], 'm:' .. o.m) end
end
"""

# KEYS: z, m, t of one index shard. ARGV: id, deadline ms, meta JSON, mode ("put" replaces, "touch" moves the
# deadline of an indexed id and indexes it again if it is missing). -> 1
INDEX_PUT = (
    _UNCOUNT
    + """
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old and ARGV[4] == 'touch' then
  redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
  return 1
end
if old then uncount(old) end
local o = cjson.decode(ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HINCRBY', KEYS[3], 'n', 1)
redis.call('HINCRBY', KEYS[3], 'b', o.n)
redis.call('HINCRBY', KEYS[3], 'm:' .. o.m, 1)
return 1
"""
)

# KEYS: z, m, t. ARGV: id[, deadline ms: only if the id's deadline is still that]. -> the id's meta JSON, or nil
# when it was not indexed (or its deadline differs).
INDEX_DEL = (
    _UNCOUNT
    + """
local old = redis.call('HGET', KEYS[2], ARGV[1])
if not old then return nil end
if ARGV[2] and tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1])) ~= tonumber(ARGV[2]) then return nil end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
uncount(old)
return old
"""
)

# KEYS: z, m, t. ARGV: now ms, limit. Removes ids whose deadline passed. -> {id1, meta1, id2, meta2, ...}
INDEX_TRIM = (
    _UNCOUNT
    + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  local meta = redis.call('HGET', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
  if meta then
    redis.call('HDEL', KEYS[2], id)
    uncount(meta)
    table.insert(out, id)
    table.insert(out, meta)
  end
end
return out
"""
)

SCRIPTS = {
    "acquire": ACQUIRE,
    "save": SAVE,
    "add": ADD,
    "delete": DELETE,
    "lease": LEASE,
    "renew": RENEW,
    "index_put": INDEX_PUT,
    "index_del": INDEX_DEL,
    "index_trim": INDEX_TRIM,
}


def head(revision: int, deadline_ms: int) -> bytes:
    return b"%016x%016x" % (revision & (2**64 - 1), deadline_ms)


def parse_head(value: bytes) -> tuple[str, int]:
    """(revision as 16 hex digits, index deadline ms); ValueError when ``value`` has no valid head."""
    if len(value) < HEAD_CHARS:
        raise ValueError(f"a stored session needs at least {HEAD_CHARS} bytes, got {len(value)}")
    text = value[:HEAD_CHARS].decode("ascii")
    if not _HEAD.fullmatch(text):
        raise ValueError(f"a stored session starts with {HEAD_CHARS} hex digits, got {text!r}")
    return text[:16], int(text[16:], 16)
