"""One connection to Redis (a server, or a cluster through any node), its scripts, and the one place where
Redis errors become domain errors: no answer, or refusing writes -> ``StoreUnavailable`` naming the store (gRPC
UNAVAILABLE), out of memory -> ``Overloaded``. A command is retried once, at once, on a broken connection, never
on a timeout: a call fails fast and the client decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import unquote, urlparse

import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.core.sessions.redis_scripts import SCRIPTS
from service.errors import Overloaded, StoreUnavailable

log = logging.getLogger(__name__)

# Errors that mean "Redis did not answer (in time)": connection refused or reset, timeouts, a cluster that is
# down or moving slots, a server still loading its AOF, a read-only replica after a failover.
UNAVAILABLE = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.MasterDownError,
    rex.ReadOnlyError,
    rex.RedisClusterException,
    OSError,
    asyncio.TimeoutError,
)
Arg = str | bytes | int
# Answers of a Redis that is up but will not write: a failed RDB snapshot or AOF write (a full disk), too few
# replicas for min-replicas-to-write, an ACL that denies the command.
# A command inside one of our scripts that an ACL denies comes back as a plain ERR with this text (Redis 7), not as
# NOPERM: the same refusal.
REFUSES_WRITES = ("MISCONF", "NOREPLICAS", "NOPERM", "can't run this command or subcommand")


def refuses_writes(e: rex.ResponseError) -> bool:
    return isinstance(e, rex.NoPermissionError) or any(word in str(e) for word in REFUSES_WRITES)


MAX_CONNECTIONS = 256  # per Redis node, per replica


def tag(text: str) -> str:
    """``text`` fit to stand between ``{`` and ``}`` in a key: braces (and the escape) are escaped, so the
    hash tag is always exactly this text and every key of one session lands in one cluster slot."""
    return text.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def _client_url(url: str) -> tuple[str, bool]:
    scheme, _, rest = url.partition("://")
    if scheme.endswith("+cluster"):
        return f"{scheme.removesuffix('+cluster')}://{rest}", True
    return url, False


def _check_url(client_url: str, cluster: bool) -> None:
    """What redis-py would misread or echo: a password holding an unencoded '/', '?', '#' (the rest reads as the
    port or the database, and redis-py's "Port could not be cast to integer value as ..." quoted a piece of the
    password), or a database that is not a number (``redis://host:6379/x``: redis-py uses database 0 without a
    word)."""
    parsed = urlparse(client_url)
    encode = "write '/' as %2F, '?' as %3F, '#' as %23 and '@' as %40 in the password"
    try:
        parsed.port  # noqa: B018 (urllib reads the port when asked)
    except ValueError as e:
        if "@" not in client_url or "out of range" in str(e):
            raise  # (no piece of a password in it: urllib's own message, naming the port)
        raise ValueError(f"the port after the host is not a number, or the password is not encoded: {encode}") from None
    path = unquote(parsed.path).replace("/", "")
    if cluster or not path or "db" in parse_url(client_url):
        return
    if "@" in path:  # (not echoed: it holds part of the password)
        raise ValueError(f"the database after the host is not a number, or the password is not encoded: {encode}")
    raise ValueError(
        f"the database after the host must be a number (redis://HOST:PORT/DB, 0 if left out), got {path!r}"
    )


class RedisConn:
    def __init__(self, url: str, name: str, timeout: float) -> None:
        self.name = name  # the URL without a password, for messages
        client_url, self.cluster = _client_url(url)
        _check_url(client_url, self.cluster)
        self.tls = client_url.startswith("rediss://")
        options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        # One immediate retry on a broken connection (a pooled connection to a Redis that restarted since);
        # none on a timeout, so a Redis that does not answer costs one timeout, not several.
        options["retry"] = Retry(NoBackoff(), 1, supported_errors=(rex.ConnectionError,))
        if self.cluster:
            self.client: Any = RedisCluster.from_url(client_url, max_connections=MAX_CONNECTIONS, **options)
        else:  # a call waits (up to the timeout) for a free connection rather than failing when all are busy
            pool = aioredis.BlockingConnectionPool.from_url(
                client_url, max_connections=MAX_CONNECTIONS, timeout=timeout, **options
            )
            self.client = aioredis.Redis(connection_pool=pool)
        self._scripts = {name: self.client.register_script(lua) for name, lua in SCRIPTS.items()}
        self.up = True  # the last command got an answer; flips are logged once
        self._oom_logged = -60.0  # when an out-of-memory answer was last logged (time.monotonic)

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        try:
            yield
        except rex.OutOfMemoryError as e:
            now = time.monotonic()
            if now - self._oom_logged >= 60:  # (Redis' own words, once a minute while it is full)
                self._oom_logged = now
                log.warning("session store %s is out of memory (maxmemory): %s", self.name, e)
            raise Overloaded(
                f"session store {self.name} is out of memory (its maxmemory is reached and it evicts nothing): new "
                "sessions and steps are refused until it has room; retry later (operators: raise maxmemory, or "
                "lower MAX_SESSIONS or SEQUENCE_IDLE_SECONDS)"
            ) from None
        except rex.AuthenticationError as e:  # (a ConnectionError to redis-py, but a setting to fix, not an outage)
            self._mark(False, e)
            raise StoreUnavailable(
                f"session store {self.name} refuses this server's credentials ({type(e).__name__}: {e}); calls that "
                "need no session still work; set the password (and user) Redis expects in session_store "
                "(SEQSERVE_SESSION_STORE: redis://USER:PASSWORD@HOST:PORT/DB)"
            ) from None
        except UNAVAILABLE as e:
            self._mark(False, e)
            if "CERTIFICATE_VERIFY_FAILED" in str(e):  # (a setting to fix too, not an outage)
                raise StoreUnavailable(
                    f"session store {self.name} presents a TLS certificate this server does not trust ({e}); calls "
                    "that need no session still work; give its CA in session_store (rediss://HOST:PORT/DB?"
                    "ssl_ca_certs=/path/ca.pem) and name the host its certificate is for"
                ) from None
            raise StoreUnavailable(
                f"session store {self.name} is unavailable ({type(e).__name__}: {e}); calls that need no session "
                f"still work; retry when it is back{self._tls_hint(e)}"
            ) from None
        except rex.ResponseError as e:
            if "DB index is out of range" in str(e):  # (SELECT, as a connection opens: a setting to fix)
                self._mark(False, e)
                raise StoreUnavailable(
                    f"session store {self.name} has no such database ({e}: a Redis has 16, 0-15, unless its "
                    "`databases` setting says more); calls that need no session still work; name one it has in "
                    "session_store (SEQSERVE_SESSION_STORE: redis://HOST:PORT/DB)"
                ) from None
            if not refuses_writes(e):
                raise
            self._mark(False, e)
            raise StoreUnavailable(
                f"session store {self.name} refuses writes ({e}); calls that need no session still work; retry "
                "when its operator has fixed it"
            ) from None
        self._mark(True)

    def _tls_hint(self, e: BaseException) -> str:
        """What a timeout may mean when the URL asks for TLS: a Redis that does not serve TLS on that port never
        answers the client's handshake, which looks exactly like an outage (redis-py says only TimeoutError)."""
        if not self.tls or not isinstance(e, rex.TimeoutError | asyncio.TimeoutError):
            return ""
        return (
            ". The URL asks for TLS (rediss://): a Redis that does not serve TLS on that port never answers the "
            "handshake and times out just like this; if it serves plain connections, use redis://"
        )

    def _mark(self, up: bool, error: BaseException | None = None) -> None:
        if up != self.up:
            self.up = up
            if up:
                log.warning("session store %s answers again", self.name)
            else:
                log.warning("session store %s is unavailable: %s: %s", self.name, type(error).__name__, error)

    async def script(self, name: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        async with self.guard():
            return await self._scripts[name](keys=list(keys), args=list(args))

    async def command(self, *args: Arg) -> Any:
        async with self.guard():
            return await self.client.execute_command(*args)

    async def batch(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Several commands in one pipeline (one round trip per node they touch); answers in order."""
        async with self.guard():
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(await pipe.execute())

    async def scripts(self, name: str, calls: Sequence[tuple[Sequence[str], Sequence[Arg]]]) -> list[Any]:
        """One script over many key sets, pipelined (the index shards)."""
        sha = self._scripts[name].sha
        commands = [("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]
        try:
            return await self.batch(commands)
        except rex.NoScriptError:  # a node that has not seen the script yet (a fresh or restarted Redis)
            async with self.guard():
                await self.client.script_load(SCRIPTS[name])
            return await self.batch(commands)

    async def publish(self, channel: str, message: str) -> None:
        async with self.guard():
            await self.client.publish(channel, message)

    async def ping(self, probe: str) -> str | None:
        """None when Redis answers and accepts a write (``probe``: a key to set for a second), else why not. A
        Redis out of memory answers: it is up, and writes get RESOURCE_EXHAUSTED (``Overloaded``) call by call."""
        try:
            async with self.guard():
                await self.client.ping()
                await self.client.set(probe, b"1", px=1000)
        except StoreUnavailable as e:
            return e.message
        except Overloaded:
            pass
        return None

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()
