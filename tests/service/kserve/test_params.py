"""Triton's ``timeout`` request parameter, parsed (``params.parse_timeout``) and applied (``servicer._within``),
in this process: the subprocess tests (``tests/service/engine/test_workers.py``) drive it end to end."""

from __future__ import annotations

import asyncio
import re

import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.kserve.params import parse_timeout
from service.api.kserve.servicer import _within
from service.errors import DeadlineExceeded, InvalidInput


def _params(**values: object) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest()
    for kind, value in values.items():
        setattr(r.parameters["timeout"], kind, value)
    return r


@pytest.mark.parametrize(
    ("values", "seconds"),
    [
        ({}, None),
        ({"int64_param": 0}, None),  # 0: no limit, as in Triton
        ({"int64_param": 250_000}, 0.25),  # tritonclient's infer(timeout=...) sends int64 microseconds
        ({"uint64_param": 2_000_000}, 2.0),
    ],
)
def test_the_timeout_is_microseconds(values: dict[str, object], seconds: float | None) -> None:
    request = _params(**values) if values else pb.ModelInferRequest()
    assert parse_timeout(request.parameters) == seconds


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"int64_param": -1}, "parameter timeout must be >= 0 microseconds (0: no limit), got -1"),
        ({"string_param": "5s"}, "parameter timeout must be an integer number of microseconds, got string_param"),
        ({"bool_param": True}, "got bool_param"),
    ],
)
def test_a_bad_timeout_says_what_to_send(values: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        parse_timeout(_params(**values).parameters)


async def test_within_answers_in_time_or_ends_the_call_at_its_limit() -> None:
    async def answer(after: float) -> str:
        await asyncio.sleep(after)
        return "done"

    assert await _within(answer(0.0), 5.0) == "done"
    started = asyncio.get_running_loop().time()
    with pytest.raises(DeadlineExceeded, match=r"timeout parameter \(50000 microseconds\)"):
        await _within(answer(30.0), 0.05)
    assert asyncio.get_running_loop().time() - started < 5.0


async def test_a_timeout_error_of_the_call_itself_is_not_the_requests_limit() -> None:
    async def fails() -> None:
        raise TimeoutError("the store did not answer")

    with pytest.raises(TimeoutError, match="the store did not answer"):
        await _within(fails(), 5.0)
