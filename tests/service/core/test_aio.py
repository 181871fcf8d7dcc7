"""``cancel_and_wait``: a background loop that swallows a cancellation (as redis-py can, turning a cancel that
races its own timeout into ``TimeoutError``) must not hang a server's stop. ``run``/``loop_factory``: the event loop
the ``event_loop`` setting names."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from service.core.aio import cancel_and_wait, loop_factory, run


async def test_a_loop_that_swallows_one_cancel_still_ends() -> None:
    swallowed = 0

    async def watch() -> None:  # the shape of the store watch and the session reaper
        nonlocal swallowed
        while True:
            try:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    if swallowed == 0:
                        swallowed += 1
                        raise TimeoutError("the client's timeout won the race") from None
                    raise
            except Exception:  # the loop survives anything
                pass

    task = asyncio.create_task(watch())
    await asyncio.sleep(0.01)
    started = time.monotonic()
    assert await cancel_and_wait(task, timeout=5.0) is True
    assert task.cancelled()
    assert swallowed == 1  # the first cancel was eaten; a plain `cancel(); await task` would wait forever
    assert time.monotonic() - started < 2.0


async def test_a_task_that_never_ends_is_given_up_after_the_timeout() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0.01)
    started = time.monotonic()
    assert await cancel_and_wait(task, timeout=0.5) is False
    assert 0.45 <= time.monotonic() - started < 3.0
    assert not task.done()
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.done()


async def test_none_and_finished_tasks_are_fine() -> None:
    assert await cancel_and_wait(None) is True
    task = asyncio.create_task(asyncio.sleep(0))
    await task
    assert await cancel_and_wait(task) is True


def test_loop_factory_names_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    assert loop_factory("asyncio") is None
    assert run(_loop_name(), "asyncio") == "_UnixSelectorEventLoop"
    uvloop = pytest.importorskip("uvloop")
    factory = loop_factory("uvloop")
    assert factory is not None and run(_loop_name(), "uvloop") == uvloop.Loop.__name__
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if the uvloop extra were not installed
    with pytest.raises(ValueError, match=r"needs the uvloop package: pip install 'seqserve\[uvloop\]'"):
        loop_factory("uvloop")


async def _loop_name() -> str:
    return type(asyncio.get_running_loop()).__name__
