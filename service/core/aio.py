"""Small asyncio helpers: the event loop a server process runs on (and its garbage collector's threshold), work
too large for the loop, and stopping background tasks."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from service.errors import DeadlineExceeded

log = logging.getLogger(__name__)

T = TypeVar("T")

# A server process's young-generation GC threshold (CPython's default is 700 net new container objects). Every call
# in flight holds a few dozen (its messages, coroutine, task, future, the batch's lists), so with tens of calls in
# flight the default collected every batch or so, and the calls' objects it promoted set off full collections of
# everything the process holds, its models' objects too: with 16 sequences in flight the engine collected 85 times
# in 1,600 steps (the test). Those collections find next to nothing to free (python_gc_objects_collected_total: a
# call's objects are freed when it ends, by reference counting), so collecting rarely loses nothing; what a failed
# large request leaves in reference cycles is collected by the edge's trimmer (service/api/memory.py) a moment
# after it ends. 10,000 measured the same on these workloads, but the worst ServerLive probe under bench.hostile
# took 92-203 ms (38-101 at 700, 41-54 at 3,000). docs/architecture.md, "The garbage collector".
SERVER_GC_THRESHOLD = 3_000


def stop_on_signals(stop: asyncio.Event, grace_seconds: float) -> None:
    """SIGTERM or SIGINT sets ``stop`` (the drain); another one while it drains says so in the log (it was silent,
    and an operator's second Ctrl-C seemed to do nothing): the drain goes on, SIGKILL ends it at once."""
    loop = asyncio.get_running_loop()

    def signalled(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning(
                "%s received again: still draining (calls in flight get up to %gs, GRACE_SECONDS); SIGKILL stops "
                "the server at once",
                sig.name,
                grace_seconds,
            )
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled, sig)


def server_gc() -> None:
    """Sets this server process's young-generation threshold (SERVER_GC_THRESHOLD); the older two as they are."""
    gc.set_threshold(SERVER_GC_THRESHOLD, *gc.get_threshold()[1:])


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``kind`` names (the ``event_loop`` setting): "asyncio" (the standard library's; None) or
    "uvloop" (libuv's: fewer CPU cycles per callback and socket event; the ``uvloop`` extra)."""
    if kind == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise ValueError(
            "event_loop 'uvloop' needs the uvloop package: pip install 'seqserve[uvloop]' (Linux, macOS), or set "
            "SEQSERVE_EVENT_LOOP=asyncio"
        ) from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], kind: str = "asyncio") -> T:
    """``asyncio.run(main)`` on the loop ``kind`` names (``loop_factory``)."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)


async def cancel_and_wait(task: asyncio.Task[object] | None, timeout: float = 5.0) -> bool:
    """Cancels ``task`` and waits, at most ``timeout`` seconds, for it to end. Returns True when it ended.

    A loop that retries on ``Exception`` can swallow one cancellation: redis-py (and other clients with their own
    timeouts) may turn a ``CancelledError`` that races the client's timeout into a ``TimeoutError``. A plain
    ``task.cancel(); await task`` then waits forever, and a server's stop hangs. So the cancel is repeated until
    the task ends (the next one lands on the loop's next ``await``), and the wait is bounded."""
    if task is None or task.done():
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        left = deadline - loop.time()
        if left <= 0:
            log.warning("background task %s did not end within %.1fs of being cancelled", task.get_name(), timeout)
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(0.2, left))
    if not task.cancelled() and task.exception() is not None:
        log.warning("background task %s ended with %r", task.get_name(), task.exception())
    return True


async def inline_unless(large: bool, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the event loop, or, when ``large``, in a worker thread: milliseconds of Python (decoding a
    large input, reading a long table, tokenizing many texts) would hold every other call of the process, where in
    a thread the loop takes its turns at the GIL meanwhile. (The arguments are passed, not closed over, so a failure
    pins nothing of them.)"""
    if not large:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


async def within_timeout(call: Awaitable[T], seconds: float, named: float | None = None) -> T:
    """``call``'s answer, or DeadlineExceeded once ``seconds`` (a KServe request's ``timeout`` parameter) have
    passed: the call is cancelled then, as by a gRPC deadline (a sequence step may or may not have been applied:
    the next answer's ``seqserve_steps`` says), and its model's statistics count a failure. ``named``: the limit
    the message names, when ``seconds`` is a backstop beyond it."""
    limit = asyncio.timeout(seconds)
    try:
        async with limit:
            return await call
    except TimeoutError:
        if not limit.expired():
            raise  # the call's own TimeoutError, not this limit's
        micros = (named or seconds) * 1e6
        raise DeadlineExceeded(
            f"not answered within the request's timeout parameter ({micros:.0f} microseconds); the server is busy "
            "or the limit is too short for this request: retry later or with a longer timeout"
        ) from None
