"""Defect 11: with a full queue a stream is refused at its start or runs to its end, never dies midway."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from service.client import ApiError, Client
from tests.conftest import ServerHandle

STREAMS, CHARS = 16, 40


def test_streams_are_admitted_once_and_then_run_to_the_end(serve: Callable[..., ServerHandle]) -> None:
    handle = serve(max_queue_size=1, max_batch_size=2, max_batch_delay_ms=5.0)
    outcomes: list[tuple[int, str]] = []  # (chunks received, how it ended)
    lock = threading.Lock()

    def stream(seed: int, session: bool) -> None:
        got, end = 0, "finished"
        with Client(handle.target, timeout=120) as c:
            try:
                sid = c.create_session("charlm").id if session else None
                for chunk in c.complete("ab", session_id=sid, max_chars=CHARS, seed=seed, temperature=1.0):
                    got += 1
                    if chunk.finish_reason is not None:
                        end = chunk.finish_reason
            except ApiError as err:
                end = err.code.name
        with lock:
            outcomes.append((got, end))

    threads = [threading.Thread(target=stream, args=(i, i % 2 == 0)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == STREAMS
    for got, end in outcomes:
        if end == grpc.StatusCode.RESOURCE_EXHAUSTED.name:
            assert got == 0, f"a stream died after {got} chunks"
        else:
            assert (got, end) == (CHARS, "length"), (got, end)
    assert any(end == "length" for _, end in outcomes)
