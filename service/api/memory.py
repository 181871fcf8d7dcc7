"""Memory a burst of large requests can pin: a budget of bytes in flight, and giving freed heap back.

``ByteBudget`` admits large requests while their bytes fit (arrival order), lets as many again wait, and refuses
the rest at once (a waiting request pins its bytes too). ``Trimmer`` runs when the budget empties: a young
generation collection (frames of failed calls) and glibc's ``malloc_trim``, off the event loop, at most once a
second, so RSS returns to where it was after a burst instead of staying at its peak.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from service.errors import RETRY_SOON, Overloaded

TRIM_DELAY = 0.05  # after the last large request: its call has finished and dropped the decoded message


def _malloc_trim() -> Callable[[], None] | None:
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def run() -> None:
        trim(0)

    return run


class ByteBudget:
    """At most ``capacity`` bytes held at once; waiters are served in arrival order, and at most ``capacity``
    bytes may wait (more is refused at once: a waiting request pins its bytes too). ``on_idle`` runs when the
    last holder leaves."""

    def __init__(self, capacity: int, on_idle: Callable[[], None] | None = None) -> None:
        self.capacity = capacity
        self.used = 0
        self.waiting = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._on_idle = on_idle

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        n = min(nbytes, self.capacity)  # one request larger than the budget runs alone
        if (self._waiters or self.used + n > self.capacity) and self.waiting + n > self.capacity:
            raise Overloaded(
                f"large requests are over their memory budget: {self.used} bytes in flight (at most {self.capacity}, "
                f"max_large_bytes_in_flight) and {self.waiting} bytes waiting (at most as much again); this one "
                f"({nbytes} bytes) would wait past that; retry with backoff",
                retry_after=RETRY_SOON,
            )
        await self._acquire(n)
        try:
            yield
        finally:
            self._release(n)

    async def _acquire(self, n: int) -> None:
        if not self._waiters and self.used + n <= self.capacity:
            self.used += n
            return
        entry = (n, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        self.waiting += n
        try:
            await entry[1]
        except BaseException:
            if entry in self._waiters:
                self._waiters.remove(entry)
                self.waiting -= n
                self._release(0)  # the waiters behind it may fit now
            elif entry[1].done() and not entry[1].cancelled():
                self._release(n)  # granted, but the caller went away before it could use it
            raise

    def _release(self, n: int) -> None:
        """Gives ``n`` bytes back and admits the waiters at the head of the queue that now fit, in order."""
        self.used -= n
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            m, fut = self._waiters.popleft()
            self.waiting -= m
            if not fut.done():
                self.used += m
                fut.set_result(None)
        if self.used == 0 and self._on_idle is not None:
            self._on_idle()


class Trimmer:
    """Returns freed heap to the system after a burst of large requests: at most once a second, a moment after
    the last one ended (its call finished and dropped the decoded message), off the loop."""

    def __init__(self) -> None:
        self._trim = _malloc_trim()
        self._last = 0.0
        self._pending = False

    def __call__(self) -> None:
        if self._trim is None or self._pending:
            return
        loop = asyncio.get_running_loop()
        self._pending = True
        delay = max(TRIM_DELAY, self._last + 1.0 - time.monotonic())
        loop.call_later(delay, self._run, loop)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        self._last, self._pending = time.monotonic(), False
        gc.collect(1)  # the young generation only: frames and tracebacks of failed calls that still hold a message
        assert self._trim is not None
        loop.run_in_executor(None, self._trim)
