"""``Client(retries=N)`` against a server that refuses slowly: every attempt gets only what is left of the call's
one deadline, never the whole timeout again.

The server here is a stand-in made for the client's side of the contract (a Sentiment service that takes its time,
then refuses with google.rpc.RetryInfo as seqserve does); the real server's refusals are tested in
``tests/service/security/test_principals.py`` and ``tests/redis/test_replicas.py``."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from concurrent import futures
from typing import NoReturn

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.api.gen.seqserve.v1 import sentiment_pb2, sentiment_pb2_grpc
from service.client import ApiError, AsyncClient, Client

SLOW = 0.3  # seconds each attempt takes before it is refused
WAIT = 0.05  # the retry time the refusal names


class SlowRefusals(sentiment_pb2_grpc.SentimentServicer):
    def __init__(self) -> None:
        self.remaining: list[float] = []  # each attempt's deadline, as the server saw it

    def Classify(self, request: sentiment_pb2.ClassifyRequest, context: grpc.ServicerContext) -> NoReturn:
        remaining = context.time_remaining()  # (about 9.2e18 without a deadline)
        self.remaining.append(float("inf") if remaining is None or remaining > 1e9 else remaining)
        time.sleep(SLOW)
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=int(WAIT * 1e9))))
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="queue full", details=[detail])
        context.abort_with_status(rpc_status.to_status(status))
        raise AssertionError("unreachable: abort_with_status always raises")  # (grpc has no type stubs to say so)


@pytest.fixture
def slow() -> Iterator[tuple[str, SlowRefusals]]:
    servicer = SlowRefusals()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    sentiment_pb2_grpc.add_SentimentServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_each_retry_gets_what_is_left_of_the_one_deadline(slow: tuple[str, SlowRefusals]) -> None:
    target, servicer = slow
    with Client(target, retries=10, timeout=1.0) as client:
        started = time.monotonic()
        with pytest.raises(ApiError) as info:
            client.classify(["a fine film"])
        took = time.monotonic() - started
    within_the_deadline(info.value, took, servicer.remaining)


async def test_the_async_client_retries_within_the_one_deadline_too(slow: tuple[str, SlowRefusals]) -> None:
    target, servicer = slow
    async with AsyncClient(target, retries=10, timeout=1.0) as client:
        started = time.monotonic()
        with pytest.raises(ApiError) as info:
            await client.classify(["a fine film"])
        took = time.monotonic() - started
    within_the_deadline(info.value, took, servicer.remaining)
    servicer.remaining.clear()
    async with AsyncClient(target, retries=2, timeout=None) as client:
        with pytest.raises(ApiError) as counted:
            await client.classify(["a fine film"])
    assert counted.value.retry_after == pytest.approx(WAIT) and servicer.remaining == [float("inf")] * 3


def within_the_deadline(error: ApiError, took: float, seen: list[float]) -> None:
    # Attempts at ~0, ~0.35 and ~0.7 s; the third is cut by the deadline at 1 s (or refused, its successor's wait
    # then passing the deadline): never ten attempts of 0.3 s each.
    assert error.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert took < 1.0 + SLOW, f"the call took {took:.2f} s with a 1 s timeout"
    assert 2 <= len(seen) <= 4, seen
    # (gRPC may round the grpc-timeout header up, src/core/lib/transport/timeout_encoding.h: seen once at 1.009)
    assert seen[0] <= 1.05
    for before, after in itertools.pairwise(seen):
        assert after <= before - SLOW, f"a retry got the deadline back: {seen}"


def test_without_a_deadline_the_retries_are_counted(slow: tuple[str, SlowRefusals]) -> None:
    target, servicer = slow
    with Client(target, retries=2, timeout=None) as client, pytest.raises(ApiError) as info:
        client.classify(["a fine film"])
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.retry_after == pytest.approx(WAIT)
    assert servicer.remaining == [float("inf")] * 3  # the first call and two retries, none with a deadline
