"""Typed Python clients for the seqserve.v1 API: ``Client`` (blocking) and ``AsyncClient`` (asyncio, the same
methods to ``await``). They return the data-plane dataclasses, not protobuf.

    with Client("127.0.0.1:50051") as c:
        print(c.classify(["a fine film"])[0].label)
        for chunk in c.complete("ROMEO:", max_chars=100, seed=1):
            print(chunk.text, end="")
        with c.session("charlm") as s:
            print(c.suggest_once(s.id, "To be or no").suggestions)

    async with AsyncClient("127.0.0.1:50051") as c:   # e.g. in a web server relaying keystrokes
        print((await c.classify(["a fine film"]))[0].label)
        async for chunk in c.complete("ROMEO:", max_chars=100, seed=1):
            print(chunk.text, end="")
        async with c.session("charlm") as s:
            print((await c.suggest_once(s.id, "To be or no")).suggestions)

Every failed call raises ``ApiError`` with the status code, the server's message and its request id.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, TypeVar, Unpack

import grpc
import numpy as np
import numpy.typing as npt
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from service.api import converters as cv
from service.api.gen.seqserve.v1 import (
    autocomplete_pb2,
    autocomplete_pb2_grpc,
    common_pb2,
    forecast_pb2,
    forecast_pb2_grpc,
    sentiment_pb2,
    sentiment_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
)
from service.core.types import (
    CompletionChunk,
    ForecastResult,
    SentimentResult,
    SessionInfo,
    SuggestResult,
)

T = TypeVar("T")

# A (time, features) table: rows of numbers, oldest first, or a 2-D array of any float or integer dtype.
Table = Iterable[Sequence[float]] | npt.NDArray[np.floating[Any]] | npt.NDArray[np.integer[Any]]


MAX_RETRY_WAIT = 60.0  # seconds: a call with no deadline waits at most this long for one retry


class ApiError(Exception):
    """A failed RPC: ``code`` (grpc.StatusCode), ``message``, ``reason`` (ErrorInfo, e.g. MODEL_NOT_FOUND), the
    server's ``request_id`` (also in its log) and ``retry_after``: seconds after which the same request may
    succeed (RetryInfo: the server refused it before anything ran), or None."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str | None,
        request_id: str | None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.request_id = request_id
        self.retry_after = retry_after

    def __reduce__(
        self,
    ) -> tuple[type[ApiError], tuple[grpc.StatusCode, str, str | None, str | None, float | None]]:
        """Pickles (a worker process's failure reaches its pool as itself, not as a broken pool) and copies."""
        return type(self), (self.code, self.message, self.reason, self.request_id, self.retry_after)

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> ApiError:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        message = (err.details() if hasattr(err, "details") else None) or str(err)
        trailing = dict(err.trailing_metadata() or ()) if hasattr(err, "trailing_metadata") else {}
        request_id = trailing.get("x-request-id")
        reason, retry_after = None, None
        status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
        for detail in status.details if status is not None else ():
            info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                reason = info.reason
            elif detail.Unpack(retry):
                retry_after = retry.retry_delay.ToTimedelta().total_seconds()
        return cls(code, message, reason, request_id if isinstance(request_id, str) else None, retry_after)


@dataclass(frozen=True)
class SuggestEvent:
    """One typing event for ``Client.suggest``: text typed since the previous event."""

    appended: str
    reset: bool = False
    n: int = 3
    max_chars: int = 10
    beam: bool = True
    backspace: int = 0  # characters to take back first (the server's UNDO_CHARS must be on)


class CompleteOptions(TypedDict, total=False):
    """``complete``'s options besides the prompt and the timeout (keyword arguments; any left out takes the
    server's default)."""

    model: str  # "" = the server's default char LM
    version: int | None  # None = the newest
    session_id: str | None  # a session to read the prompt into (its state advances), else none
    max_chars: int | None
    temperature: float | None
    top_k: int
    seed: int | None
    stop: Sequence[str]


def channel_credentials(
    tls_ca: str | Path | None = None, tls_cert: str | Path | None = None, tls_key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials: ``tls_ca`` (PEM) verifies the server (None = the system's roots); ``tls_cert`` and
    ``tls_key`` (PEM) are this client's certificate for mTLS."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together (the client certificate and its private key)")

    def read(path: str | Path | None) -> bytes | None:
        return None if path is None else Path(path).read_bytes()

    return grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))


RECONNECT_BACKOFF = (0.25, 2.0)


KEEPALIVE_TIMEOUT = 20.0  # seconds a keepalive ping may go unanswered before the connection counts as gone


def _channel_options(
    reconnect_backoff: tuple[float, float], keepalive_seconds: float | None = None
) -> list[tuple[str, int]]:
    first, longest = reconnect_backoff
    if not 0.001 <= first <= longest <= 3600:  # (also refuses nan)
        raise ValueError(
            "reconnect_backoff: (first, longest) in seconds, 0.001 <= first <= longest <= 3600; "
            f"got {reconnect_backoff}"
        )
    options = [
        ("grpc.initial_reconnect_backoff_ms", round(first * 1000)),
        ("grpc.max_reconnect_backoff_ms", round(longest * 1000)),
        ("grpc.use_local_subchannel_pool", 1),  # a fresh Client connects at once, even while another backs off
    ]
    if keepalive_seconds is not None:
        if not 1 <= keepalive_seconds <= 86400:  # (gRPC pings no more often than once a second; also refuses nan)
            raise ValueError(f"keepalive_seconds: 1 to 86400 (a day), or None for no pings; got {keepalive_seconds}")
        options += [
            ("grpc.keepalive_time_ms", round(keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", round(KEEPALIVE_TIMEOUT * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),  # also through a long quiet spell of an open stream
        ]
    return options


class _Connection:
    """What both clients share: the settings, the channel's options and credentials, the stubs."""

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        *,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls: bool = False,
        reconnect_backoff: tuple[float, float] = RECONNECT_BACKOFF,
        retries: int = 0,
        keepalive_seconds: float | None = None,
    ) -> None:
        """``timeout``: default deadline in seconds per call (for streams: the whole stream; not for a Suggest
        stream fed by a generator or an async iterable, events that come as they are typed); None = none.
        TLS when ``tls`` or any ``tls_*`` file is given: ``tls_ca`` verifies the server (default: the system's
        roots), ``tls_cert``/``tls_key`` are the client certificate (mTLS).

        ``reconnect_backoff``: (first, longest) wait in seconds between attempts to reconnect once the server is
        unreachable (grpc's defaults, 1 s growing to 120 s, left a long-lived client failing for up to ~20 s after
        a restart). Each client has its own connection: a new one never inherits another's backoff.

        ``retries``: how many times a unary call is sent again when the server refused it before anything ran and
        said when to retry (``ApiError.retry_after``: a full queue, the rate quota, a model loading, a replica
        behind in a rolling update), after that wait and within the call's deadline (without one, a wait over
        ``MAX_RETRY_WAIT`` is not waited for). Refusals without a retry time (a bad request, a full session
        quota) are raised at once, as are streaming calls' refusals.

        ``keepalive_seconds``: ping the server after this long without a word, between calls too, so that a NAT or
        a proxy does not drop a quiet connection (an open Suggest stream while the user thinks) and a server that
        vanished is noticed within ``KEEPALIVE_TIMEOUT`` of the next ping. None (default) = no pings. seqserve
        accepts pings 10 s apart or more (``GRPC_MIN_PING_INTERVAL_SECONDS``); a server that allows fewer closes
        the connection after a few, failing its calls."""
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.retries = retries
        self.target = target
        self.timeout = timeout
        api_key = api_key.strip() if api_key else api_key  # (as the server strips it; a key file ends in "\n")
        if api_key and not (api_key.isascii() and api_key.isprintable()):
            # (grpc refuses such a header on every call with INTERNAL "Invalid metadata", naming nothing)
            raise ValueError("api_key: a key is printable ASCII (SEQSERVE_API_KEY, --api-key)")
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        options = _channel_options(reconnect_backoff, keepalive_seconds)
        secure = tls or tls_ca is not None or tls_cert is not None or tls_key is not None
        self._channel = self._open(target, channel_credentials(tls_ca, tls_cert, tls_key) if secure else None, options)
        self._sentiment = sentiment_pb2_grpc.SentimentStub(self._channel)
        self._autocomplete = autocomplete_pb2_grpc.AutocompleteStub(self._channel)
        self._forecast = forecast_pb2_grpc.ForecastStub(self._channel)
        self._sessions = sessions_pb2_grpc.SessionsStub(self._channel)

    def _open(self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, int]]) -> Any:
        raise NotImplementedError

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _events_timeout(self, events: object, timeout: float | None) -> float | None:
        """A Suggest stream's deadline: the client's per-call ``timeout`` for events given up front (a list, a
        tuple); none by default for events that come as they are typed (a generator, an async iterable: a relay),
        which a per-call deadline cut off after 30 s of typing."""
        if timeout is not None:
            return timeout
        return self.timeout if isinstance(events, Sequence) else None

    def _deadline(self, timeout: float | None) -> float | None:
        limit = self._timeout(timeout)
        return None if limit is None else time.monotonic() + limit

    def _retry_wait(self, error: ApiError, attempt: int, deadline: float | None) -> float | None:
        """Seconds to wait before sending a refused call again, or None: raise ``error``."""
        wait = error.retry_after
        if (
            wait is None
            or wait > MAX_RETRY_WAIT
            or attempt == self.retries
            or (deadline is not None and time.monotonic() + wait >= deadline)
        ):
            return None
        return wait


class Client(_Connection):
    """Blocking calls; streams are generators (see the module's docstring)."""

    def _open(self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, int]]) -> Any:
        if credentials is not None:
            return grpc.secure_channel(target, credentials, options=options)
        return grpc.insecure_channel(target, options=options)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                return method(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as err:
                error = ApiError.from_rpc_error(err)
            wait = self._retry_wait(error, attempt, deadline)
            if wait is None:
                raise error from None
            time.sleep(wait)
            attempt += 1

    # --- Sentiment ------------------------------------------------------------------------------------

    def classify(
        self, texts: Sequence[str], model: str = "", version: int | None = None, timeout: float | None = None
    ) -> list[SentimentResult]:
        request = sentiment_pb2.ClassifyRequest(model=_selector(model, version), texts=_texts(texts))
        return _sentiments(self._unary(self._sentiment.Classify, request, timeout))

    # --- Autocomplete ---------------------------------------------------------------------------------

    def complete(
        self, prompt: str, *, timeout: float | None = None, **options: Unpack[CompleteOptions]
    ) -> Generator[CompletionChunk, None, None]:
        """Yields chunks as the server streams them; leaving the loop early cancels the call on the server once
        the generator is closed: at once when the loop held the call (``for chunk in client.complete(...)``), or
        ``close()`` on a generator you kept. ``options``: ``CompleteOptions`` (model, version, session_id, max_chars,
        temperature, top_k, seed, stop)."""
        request = _complete_request(prompt, options)
        call = self._autocomplete.Complete(request, timeout=self._timeout(timeout), metadata=self._metadata)
        return _stream(call, cv.chunk_from_pb)

    def suggest(
        self, session_id: str, events: Iterable[SuggestEvent | str], timeout: float | None = None
    ) -> Generator[SuggestResult, None, None]:
        """One bidirectional stream: one result per event, in order (a ``str`` event = ``SuggestEvent(str)``).
        ``timeout``: the whole stream's deadline; by default the client's per-call one when ``events`` is a list or
        a tuple, none when it is a generator (events as they come: see ``_events_timeout``)."""

        failed: list[BaseException] = []  # an error of the caller's events, raised to the caller as itself

        def requests() -> Iterator[autocomplete_pb2.SuggestRequest]:
            try:
                for e in events:
                    yield _suggest_request(session_id, e)
            except Exception as exc:  # grpc's request thread would turn it into UNKNOWN "Exception iterating ..."
                failed.append(exc)
                raise

        call = self._autocomplete.Suggest(
            requests(), timeout=self._events_timeout(events, timeout), metadata=self._metadata
        )
        return _stream(call, cv.suggest_from_pb, failed)

    def suggest_once(self, session_id: str, appended: str, timeout: float | None = None, **event: Any) -> SuggestResult:
        """One event on a stream of its own; ``event``: the other ``SuggestEvent`` fields (n, max_chars, ...). The
        stream is read to its end, so the server counts the call OK (taking the first answer and dropping the
        stream cancelled it: every call counted CANCELLED)."""
        (result,) = self.suggest(session_id, [SuggestEvent(appended, **event)], timeout=timeout)  # (reads to the end)
        return result

    # --- Forecast -------------------------------------------------------------------------------------

    def forecast(
        self,
        rows: Table,
        model: str = "",
        version: int | None = None,
        timeout: float | None = None,
        columns: Sequence[str] | None = None,
    ) -> ForecastResult:
        """``rows``: (time, features) history in original units, oldest first. ``columns``: the names of each
        row's values (a CSV's header); the server takes the model's columns by name, in any order, and ignores the
        rest. Without it the values must be in the model's column order."""
        request = _forecast_request(rows, model, version, columns)
        return cv.forecast_from_pb(self._unary(self._forecast.Predict, request, timeout))

    def observe(
        self, session_id: str, rows: Table, timeout: float | None = None, columns: Sequence[str] | None = None
    ) -> ForecastResult:
        """Appends ``rows`` to a forecasting session; ``columns`` as for ``forecast``. Until the session holds the
        model's window of rows the result has no rows (``point`` of shape (0, features)): no forecast yet."""
        request = forecast_pb2.ObserveRequest(
            session_id=session_id, rows=_rows(rows, "rows"), columns=_columns(columns)
        )
        return cv.forecast_from_pb(self._unary(self._forecast.Observe, request, timeout))

    # --- Sessions -------------------------------------------------------------------------------------

    def create_session(
        self, model: str, version: int | None = None, ttl_seconds: float | None = None, timeout: float | None = None
    ) -> SessionInfo:
        request = sessions_pb2.CreateSessionRequest(model=_selector(model, version), ttl_seconds=ttl_seconds)
        return cv.session_from_pb(self._unary(self._sessions.Create, request, timeout))

    def get_session(self, session_id: str, timeout: float | None = None) -> SessionInfo:
        request = sessions_pb2.GetSessionRequest(session_id=session_id)
        return cv.session_from_pb(self._unary(self._sessions.Get, request, timeout))

    def fork_session(
        self, session_id: str, ttl_seconds: float | None = None, timeout: float | None = None
    ) -> SessionInfo:
        request = sessions_pb2.ForkSessionRequest(session_id=session_id, ttl_seconds=ttl_seconds)
        return cv.session_from_pb(self._unary(self._sessions.Fork, request, timeout))

    def delete_session(self, session_id: str, timeout: float | None = None) -> None:
        self._unary(self._sessions.Delete, sessions_pb2.DeleteSessionRequest(session_id=session_id), timeout)

    def export_session(self, session_id: str, timeout: float | None = None) -> bytes:
        """The session as an opaque signed blob (the server needs SEQSERVE_SESSION_SIGNING_KEY)."""
        request = sessions_pb2.ExportSessionRequest(session_id=session_id)
        return bytes(self._unary(self._sessions.Export, request, timeout).blob)

    def import_session(
        self, blob: bytes, ttl_seconds: float | None = None, timeout: float | None = None
    ) -> SessionInfo:
        """A new session holding what ``blob`` holds (on any server with the same key and model version)."""
        request = sessions_pb2.ImportSessionRequest(blob=blob, ttl_seconds=ttl_seconds)
        return cv.session_from_pb(self._unary(self._sessions.Import, request, timeout))

    @contextmanager
    def session(
        self, model: str, version: int | None = None, ttl_seconds: float | None = None
    ) -> Iterator[SessionInfo]:
        """A session that is deleted on exit (already-expired sessions are fine)."""
        info = self.create_session(model, version, ttl_seconds)
        try:
            yield info
        finally:
            try:
                self.delete_session(info.id)
            except ApiError as err:
                if err.code != grpc.StatusCode.NOT_FOUND:
                    raise


class AsyncClient(_Connection):
    """``Client``'s methods for asyncio (``grpc.aio``): the unary ones are awaited, the streaming ones are async
    generators, ``session`` is an async context manager. Made in a running event loop, used in that loop only.

    A stream left early is cancelled on the server when its generator is closed: at once with
    ``contextlib.aclosing(client.complete(...))``, else when the loop finalizes the dropped generator."""

    def _open(self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, int]]) -> Any:
        if credentials is not None:
            return grpc.aio.secure_channel(target, credentials, options=options)
        return grpc.aio.insecure_channel(target, options=options)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None) -> T:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                return await method(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as err:
                error = ApiError.from_rpc_error(err)
            except asyncio.CancelledError:
                if _cancelling():
                    raise
                raise _channel_closed() from None  # (grpc.aio cancels the calls of a channel closed under them)
            wait = self._retry_wait(error, attempt, deadline)
            if wait is None:
                raise error from None
            await asyncio.sleep(wait)
            attempt += 1

    async def classify(
        self, texts: Sequence[str], model: str = "", version: int | None = None, timeout: float | None = None
    ) -> list[SentimentResult]:
        request = sentiment_pb2.ClassifyRequest(model=_selector(model, version), texts=_texts(texts))
        return _sentiments(await self._unary(self._sentiment.Classify, request, timeout))

    def complete(
        self, prompt: str, *, timeout: float | None = None, **options: Unpack[CompleteOptions]
    ) -> AsyncGenerator[CompletionChunk, None]:
        """Yields chunks as the server streams them (``async for``); ``options`` as ``Client.complete``'s."""
        request = _complete_request(prompt, options)
        call = self._autocomplete.Complete(request, timeout=self._timeout(timeout), metadata=self._metadata)
        return _astream(call, cv.chunk_from_pb)

    def suggest(
        self,
        session_id: str,
        events: AsyncIterable[SuggestEvent | str] | Iterable[SuggestEvent | str],
        timeout: float | None = None,
    ) -> AsyncGenerator[SuggestResult, None]:
        """One bidirectional stream: one result per event, in order. ``events`` may be an async iterable: a
        relay hands each keystroke over as it comes (an ``asyncio.Queue`` read by an async generator) and reads
        each answer while the stream stays open. ``timeout``: as ``Client.suggest`` (none by default for events
        that come as they are typed)."""
        failed: list[BaseException] = []

        async def requests() -> AsyncIterator[autocomplete_pb2.SuggestRequest]:
            try:
                if isinstance(events, AsyncIterable):
                    async for e in events:
                        yield _suggest_request(session_id, e)
                else:
                    for e in events:
                        yield _suggest_request(session_id, e)
            except Exception as exc:  # grpc would end the call CANCELLED, naming nothing: raised as itself instead
                failed.append(exc)
                raise

        call = self._autocomplete.Suggest(
            requests(), timeout=self._events_timeout(events, timeout), metadata=self._metadata
        )
        return _astream(call, cv.suggest_from_pb, failed)

    @asynccontextmanager
    async def suggest_stream(self, session_id: str, timeout: float | None = None) -> AsyncIterator[SuggestStream]:
        """One open Suggest stream to send events on one at a time, each ``send`` returning that event's answer:
        the shape of a relay that forwards a user's keystrokes as they come. Leaving the block ends the stream
        (cancelled on the server if it left by an exception).

        ``timeout``: a deadline in seconds for the whole stream; none by default (not the client's per-call
        ``timeout``: a user typing for more than 30 s lost the stream to it). Bound each answer's wait with
        ``asyncio.wait_for(stream.send(...), ...)`` instead, and keep a quiet stream's connection with the client's
        ``keepalive_seconds``."""
        call = self._autocomplete.Suggest(timeout=timeout, metadata=self._metadata)
        stream = SuggestStream(session_id, call)
        try:
            yield stream
            await stream.finish()
        finally:
            call.cancel()  # (no-op when it finished)

    async def suggest_once(
        self, session_id: str, appended: str, timeout: float | None = None, **event: Any
    ) -> SuggestResult:
        """One event on a stream of its own, read to its end (see ``Client.suggest_once``)."""
        (result,) = [r async for r in self.suggest(session_id, [SuggestEvent(appended, **event)], timeout=timeout)]
        return result

    async def forecast(
        self,
        rows: Table,
        model: str = "",
        version: int | None = None,
        timeout: float | None = None,
        columns: Sequence[str] | None = None,
    ) -> ForecastResult:
        """As ``Client.forecast``."""
        request = _forecast_request(rows, model, version, columns)
        return cv.forecast_from_pb(await self._unary(self._forecast.Predict, request, timeout))

    async def observe(
        self, session_id: str, rows: Table, timeout: float | None = None, columns: Sequence[str] | None = None
    ) -> ForecastResult:
        request = forecast_pb2.ObserveRequest(
            session_id=session_id, rows=_rows(rows, "rows"), columns=_columns(columns)
        )
        return cv.forecast_from_pb(await self._unary(self._forecast.Observe, request, timeout))

    async def create_session(
        self, model: str, version: int | None = None, ttl_seconds: float | None = None, timeout: float | None = None
    ) -> SessionInfo:
        request = sessions_pb2.CreateSessionRequest(model=_selector(model, version), ttl_seconds=ttl_seconds)
        return cv.session_from_pb(await self._unary(self._sessions.Create, request, timeout))

    async def get_session(self, session_id: str, timeout: float | None = None) -> SessionInfo:
        request = sessions_pb2.GetSessionRequest(session_id=session_id)
        return cv.session_from_pb(await self._unary(self._sessions.Get, request, timeout))

    async def fork_session(
        self, session_id: str, ttl_seconds: float | None = None, timeout: float | None = None
    ) -> SessionInfo:
        request = sessions_pb2.ForkSessionRequest(session_id=session_id, ttl_seconds=ttl_seconds)
        return cv.session_from_pb(await self._unary(self._sessions.Fork, request, timeout))

    async def delete_session(self, session_id: str, timeout: float | None = None) -> None:
        await self._unary(self._sessions.Delete, sessions_pb2.DeleteSessionRequest(session_id=session_id), timeout)

    async def export_session(self, session_id: str, timeout: float | None = None) -> bytes:
        request = sessions_pb2.ExportSessionRequest(session_id=session_id)
        return bytes((await self._unary(self._sessions.Export, request, timeout)).blob)

    async def import_session(
        self, blob: bytes, ttl_seconds: float | None = None, timeout: float | None = None
    ) -> SessionInfo:
        request = sessions_pb2.ImportSessionRequest(blob=blob, ttl_seconds=ttl_seconds)
        return cv.session_from_pb(await self._unary(self._sessions.Import, request, timeout))

    @asynccontextmanager
    async def session(
        self, model: str, version: int | None = None, ttl_seconds: float | None = None
    ) -> AsyncIterator[SessionInfo]:
        """A session that is deleted on exit (already-expired sessions are fine)."""
        info = await self.create_session(model, version, ttl_seconds)
        try:
            yield info
        finally:
            try:
                await self.delete_session(info.id)
            except ApiError as err:
                if err.code != grpc.StatusCode.NOT_FOUND:
                    raise


class SuggestStream:
    """An open Suggest stream of ``AsyncClient.suggest_stream``: ``await send(event)`` sends one event and returns
    its answer. One event at a time: a second ``send`` waits for the first's answer (the server answers in order).

    A ``send`` cancelled before its answer came (``asyncio.wait_for`` timing out, its task cancelled) cancels the
    whole gRPC call, as grpc.aio does: the stream has ended, and the session keeps the events the server applied
    (the cancelled one, or not: ``get_session(...).steps`` says how far it went)."""

    def __init__(self, session_id: str, call: Any) -> None:
        self.session_id = session_id
        self._call = call
        self._turn = asyncio.Lock()
        self._failed: ApiError | None = None  # why the stream ended: a send's refusal, or a cancelled send

    async def send(self, event: SuggestEvent | str) -> SuggestResult:
        """Raises ``ApiError``: the event's refusal, which ends the stream (the session keeps what earlier events
        did), or, for a send after the stream ended (a refusal, a cancelled send), an error saying so, with the
        code of what ended it."""
        async with self._turn:
            if self._failed is not None:
                e = self._failed
                raise ApiError(
                    e.code,
                    f"this Suggest stream has ended ({e.code.name}: {e.message}); open a new one (suggest_stream) "
                    "to send more events",
                    e.reason,
                    e.request_id,
                )
            try:
                await self._call.write(_suggest_request(self.session_id, event))
                answer = await self._call.read()
            except grpc.RpcError as err:
                self._failed = ApiError.from_rpc_error(err)
                raise self._failed from None
            except asyncio.InvalidStateError:  # the call ended while no send waited (its deadline, the server)
                self._failed = await self._ended()
                raise self._failed from None
            except asyncio.CancelledError:  # (grpc.aio cancelled the call with it)
                if not _cancelling():
                    raise self._lost() from None
                self._failed = ApiError(
                    grpc.StatusCode.CANCELLED,
                    "a send was cancelled before its answer came, which cancels the gRPC call; the session keeps "
                    "the events the server applied",
                    None,
                    None,
                )
                raise  # the caller's own cancellation, as itself
            if answer is grpc.aio.EOF:  # (a stream that ends with an error raises it in read())
                raise ApiError(
                    grpc.StatusCode.UNKNOWN, "the server ended the Suggest stream without answering", None, None
                )
            return cv.suggest_from_pb(answer)

    async def finish(self) -> None:
        """Ends the stream (no more events) and waits for the server to close it; raises ``ApiError`` when it
        ended with an error that no ``send`` raised. A cancellation raised here is the caller's own."""
        async with self._turn:
            if self._failed is not None:
                return
            try:
                await self._call.done_writing()
                while await self._call.read() is not grpc.aio.EOF:
                    pass  # (no event is left unanswered: each send read its answer)
            except grpc.RpcError as err:
                raise ApiError.from_rpc_error(err) from None
            except asyncio.CancelledError:
                if _cancelling():
                    raise
                raise self._lost() from None

    async def _ended(self) -> ApiError:
        """Why a call that ended while no send waited ended: grpc.aio's ``write()`` says only "RPC already
        finished" (asyncio's InvalidStateError); a ``read()`` of the ended call raises its status."""
        try:
            await self._call.read()
        except grpc.RpcError as err:
            return ApiError.from_rpc_error(err)
        except asyncio.CancelledError:  # (the channel closed under it)
            if _cancelling():
                raise
            return self._lost()
        return ApiError(grpc.StatusCode.UNKNOWN, "the server ended the Suggest stream without answering", None, None)

    def _lost(self) -> ApiError:
        """The error for a call cancelled on this side by no cancellation of the caller's task (the channel
        closed, say): grpc.aio raises ``CancelledError`` for it, which would read as the caller's own."""
        self._failed = ApiError(
            grpc.StatusCode.CANCELLED,
            "the Suggest call was cancelled on this side (the client's channel closed?); the session keeps the "
            "events the server applied",
            None,
            None,
        )
        return self._failed


def _channel_closed() -> ApiError:
    """A call of an ``AsyncClient`` closed while it ran: grpc.aio raises ``CancelledError`` for it, which asyncio
    (and ``except Exception``) reads as the caller's own task being cancelled."""
    return ApiError(
        grpc.StatusCode.CANCELLED,
        "the call was cancelled on this side: the client was closed while it ran (the server may have done its work)",
        None,
        None,
    )


def _cancelling() -> bool:
    """Whether the running task has been asked to stop (its own cancellation, not a grpc call's)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _sentiments(response: sentiment_pb2.ClassifyResponse) -> list[SentimentResult]:
    return [cv.sentiment_from_pb(r) for r in response.results]


def _complete_request(prompt: str, options: CompleteOptions) -> autocomplete_pb2.CompleteRequest:
    unknown = sorted(set(options) - set(CompleteOptions.__annotations__))
    if unknown:  # (a caller without a type checker gets what a parameter list would have said)
        raise TypeError(f"complete() got an unexpected keyword argument {unknown[0]!r}")
    return autocomplete_pb2.CompleteRequest(
        model=_selector(options.get("model", ""), options.get("version")),
        prompt=_utf8(prompt, "prompt"),
        session_id=options.get("session_id"),
        max_chars=options.get("max_chars"),
        temperature=options.get("temperature"),
        top_k=options.get("top_k", 0),
        seed=options.get("seed"),
        stop=[_utf8(t, f"stop[{i}]") for i, t in enumerate(options.get("stop", ()))],
    )


def _suggest_request(session_id: str, event: SuggestEvent | str) -> autocomplete_pb2.SuggestRequest:
    ev = SuggestEvent(event) if isinstance(event, str) else event
    return autocomplete_pb2.SuggestRequest(
        session_id=session_id,
        appended=_utf8(ev.appended, "appended"),
        reset=ev.reset,
        n=ev.n,
        max_chars=ev.max_chars,
        beam=ev.beam,
        backspace=ev.backspace,
    )


def _forecast_request(
    rows: Table, model: str, version: int | None, columns: Sequence[str] | None
) -> forecast_pb2.PredictRequest:
    return forecast_pb2.PredictRequest(
        model=_selector(model, version), history=_rows(rows, "history"), columns=_columns(columns)
    )


def _texts(texts: Sequence[str]) -> list[str]:
    """Caller mistakes Python would otherwise turn into a confusing request (a str is a sequence of characters)
    or an obscure TypeError; what the server checks (empty, too many, too long) is left to the server. Bytes are
    decoded as UTF-8 here, so a text that is not UTF-8 is named (protobuf's own error named no text)."""
    if isinstance(texts, str | bytes):
        raise TypeError("texts is a list of texts, got one string: pass [text]")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str | bytes):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        out[i] = _utf8(t, f"texts[{i}]")
    return out


def _utf8(t: str | bytes, name: str) -> str:
    """``t`` as a str that can be sent (bytes decoded as UTF-8), or a ValueError naming ``name``: protobuf's own
    error for a lone surrogate (as ``errors="surrogateescape"`` and the shell's argv make) named no field."""
    try:
        out = t.decode("utf-8") if isinstance(t, bytes) else t
        out.encode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError) as e:
        at = f"byte {e.start}" if isinstance(t, bytes) else f"character {e.start}"
        raise ValueError(
            f"{name} is not valid UTF-8 text ({e.reason} at {at}): decode it with the encoding it was written in, "
            "or pass a str"
        ) from None
    return out


def _columns(columns: Sequence[str] | None) -> list[str]:
    """Column names as a list: any sequence of str (a list, a tuple, numpy's array or pandas' ``df.columns``,
    whose truth value raised in ``columns or ()``); one str is refused (it is a sequence of characters)."""
    if columns is None:
        return []
    if isinstance(columns, str | bytes):
        raise TypeError("columns is a list of names, got one string: pass [name] or the header's list")
    out = list(columns)
    for i, c in enumerate(out):
        if not isinstance(c, str):
            raise TypeError(f"columns[{i}] must be a str (a column's name), got {type(c).__name__}")
    return out


def _rows(rows: Table, name: str) -> list[common_pb2.Row]:
    """A (time, features) table as rows; a table that is not 2-D, or a row that is not numbers, is the caller's
    mistake, named here. Rows of different lengths are sent as they are: the server says what it expects."""
    if isinstance(rows, np.ndarray) and rows.ndim != 2:
        raise ValueError(f"{name} must be a 2-D table (time, features), got an array of shape {rows.shape}")
    if not isinstance(rows, np.ndarray):
        rows = list(rows)  # once: an iterator is read here, not emptied by the check
        for i, row in enumerate(rows):
            if isinstance(row, str | bytes) or not isinstance(row, Iterable):
                raise TypeError(
                    f"{name}[{i}] must be a row of numbers (a 2-D table, oldest row first), got {row!r:.40}"
                )
    try:
        out = cv.rows_to_pb(rows)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must hold numbers only: {e}") from None
    # protobuf's float32 makes a finite value beyond its range inf, which the server then refused as "is inf"; a row
    # with an inf in it (rare: map and max loop in C) is looked at value by value
    for i, sent in enumerate(out):
        if not sent.values or not math.isinf(max(map(abs, sent.values))):
            continue
        for j, v in enumerate(sent.values):
            if math.isinf(v) and math.isfinite(given := float(rows[i][j])):
                raise ValueError(
                    f"{name}[{i}][{j}] is {given:g}, beyond float32's range (about ±3.4e38), which the API carries; "
                    "scale the series"
                )
    return out


def _selector(name: str, version: int | None) -> common_pb2.ModelSelector:
    return common_pb2.ModelSelector(name=name, version=version)


def _stream(
    call: Any, convert: Callable[[Any], T], failed: list[BaseException] | None = None
) -> Generator[T, None, None]:
    """Iterates a streaming call, converting each message, turning grpc errors into ApiError and cancelling
    the call when the caller stops early (closes the iterator or drops it). ``failed``: where the request side
    records an error of the caller's own (a bad event, an iterator that raised), re-raised here as it was."""
    try:
        for message in call:
            yield convert(message)
    except grpc.RpcError as err:
        if failed:
            raise failed[0]  # noqa: B904 (the caller's own error, with its own traceback)
        raise ApiError.from_rpc_error(err) from None
    finally:
        call.cancel()  # no-op when the call already finished


async def _astream(
    call: Any, convert: Callable[[Any], T], failed: list[BaseException] | None = None
) -> AsyncGenerator[T, None]:
    """``_stream`` for a ``grpc.aio`` call. grpc.aio cancels a call whose request iterator raised, and reading it
    then raises ``CancelledError``: with ``failed`` set that is the caller's error, raised as itself."""
    try:
        async for message in call:
            yield convert(message)
    except grpc.RpcError as err:
        if failed:
            raise failed[0]  # noqa: B904 (the caller's own error, with its own traceback)
        raise ApiError.from_rpc_error(err) from None
    except asyncio.CancelledError:
        if failed:
            raise failed[0]  # noqa: B904
        if _cancelling():
            raise
        raise _channel_closed() from None  # (not the caller's task: the client closed under the call)
    finally:
        call.cancel()
