"""The batcher on uvloop (``SEQSERVE_EVENT_LOOP=uvloop``). uvloop does not show its run queue,
so a lone request cannot know that other calls are about to arrive: it always takes the queue (without waiting
for company it has no reason to expect), and requests that arrive together batch."""

from __future__ import annotations

import asyncio

import pytest

from tests.service.core.conftest import MakeDP, recorded
from tests.service.core.test_batching import (
    LM,
    _queue,
    test_a_failing_lone_step_fails_only_its_caller,
    test_a_lone_generation_never_holds_the_loop,
    test_a_lone_request_does_not_wait_for_company,
)

uvloop = pytest.importorskip("uvloop")

# The asyncio module's tests, collected again here, where the loop is uvloop's (this folder's conftest).
__all__ = [
    "test_a_failing_lone_step_fails_only_its_caller",
    "test_a_lone_generation_never_holds_the_loop",
    "test_a_lone_request_does_not_wait_for_company",
]


async def test_the_tests_here_run_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_on_uvloop_a_lone_step_takes_the_queue_and_company_batches(make_dp: MakeDP) -> None:
    dp = await make_dp(max_batch_size=8, max_batch_delay_ms=50)
    await asyncio.sleep(0.01)
    await dp.char_step(LM, "abc")  # through the queue (a Future, the flush task), not on the caller
    count, waited = await _queue(dp)
    assert recorded(dp).batch_sizes("charlm") == [1] and count == 1 and waited > 0
    # ...without waiting for company: far below max_batch_delay_ms, as nothing recent had company
    assert waited < 0.045e9
    # requests that arrive together meet in one run
    await asyncio.gather(*(dp.char_step(LM, t) for t in ("xyz", "Hel", "q q")))
    assert recorded(dp).batch_sizes("charlm") == [1, 3]
