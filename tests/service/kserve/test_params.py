"""Triton's ``timeout`` and ``priority`` request parameters, parsed (``params``), the timeout applied
(``service.core.aio.within_timeout``, in the data plane), in this process: the subprocess tests
(``tests/service/engine/test_workers.py``) drive them end to end."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import grpc
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.kserve.params import parse_priority, parse_timeout
from service.api.kserve.tensors import serialize_bytes
from service.core.aio import within_timeout
from service.core.shm import Regions
from service.errors import DeadlineExceeded, InvalidInput
from service.settings import Settings
from tests.conftest import ServerHandle


def _params(name: str = "timeout", /, **values: object) -> pb.ModelInferRequest:
    """A request whose parameter ``name`` is set as ``values`` says (``int64_param=5``)."""
    r = pb.ModelInferRequest()
    for kind, value in values.items():
        setattr(r.parameters[name], kind, value)
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
        ({"string_param": "5s"}, "parameter timeout must be an integer number of microseconds, got a string ('5s')"),
        ({"bool_param": True}, "got a bool (true)"),
    ],
)
def test_a_bad_timeout_says_what_to_send(values: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        parse_timeout(_params(**values).parameters)


async def test_within_answers_in_time_or_ends_the_call_at_its_limit() -> None:
    async def answer(after: float) -> str:
        await asyncio.sleep(after)
        return "done"

    assert await within_timeout(answer(0.0), 5.0) == "done"
    started = asyncio.get_running_loop().time()
    with pytest.raises(DeadlineExceeded, match=r"timeout parameter \(50000 microseconds\)"):
        await within_timeout(answer(30.0), 0.05)
    assert asyncio.get_running_loop().time() - started < 5.0
    with pytest.raises(DeadlineExceeded, match=r"timeout parameter \(40000 microseconds\)"):
        await within_timeout(answer(30.0), 0.05, 0.04)  # a backstop past the limit names the limit


async def test_a_timeout_error_of_the_call_itself_is_not_the_requests_limit() -> None:
    async def fails() -> None:
        raise TimeoutError("the store did not answer")

    with pytest.raises(TimeoutError, match="the store did not answer"):
        await within_timeout(fails(), 5.0)


def _priority(**values: object) -> pb.ModelInferRequest:
    return _params("priority", **values)


@pytest.mark.parametrize(
    ("values", "levels", "level"),
    [
        ({}, 3, None),
        ({"int64_param": 0}, 3, None),  # 0: the default level
        ({"int64_param": 1}, 3, 1),  # tritonclient's infer(priority=...) sends uint64 or int64
        ({"uint64_param": 3}, 3, 3),
        ({"int64_param": 7}, 0, None),  # one level: accepted, no effect (a Triton model without levels)
        ({"int64_param": -7}, 0, None),
    ],
)
def test_the_priority_is_a_level(values: dict[str, object], levels: int, level: int | None) -> None:
    request = _priority(**values) if values else pb.ModelInferRequest()
    assert parse_priority(request.parameters, levels) == level


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"int64_param": 4}, "parameter priority must be between 1 (the highest level) and 3 (PRIORITY_LEVELS), "
         "or 0 for the default level, got 4"),
        ({"int64_param": -1}, "got -1"),
        ({"string_param": "high"},
         "parameter priority must be an integer (1 = the highest level), got a string ('high')"),
        ({"double_param": 1.5}, "got a double (1.5)"),
    ],
)  # fmt: skip
def test_a_bad_priority_says_what_to_send(values: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        parse_priority(_priority(**values).parameters, 3)


def test_priority_levels_are_configured_reported_and_checked(start_server: Callable[..., ServerHandle]) -> None:
    """PRIORITY_LEVELS: the schedule-policy extension is claimed, ModelConfig reports the levels as Triton's
    dynamic batcher does, a request names a level within them, and a level out of range is refused whole."""
    handle = start_server(priority_levels=3, default_priority_level=2)
    with grpc.insecure_channel(handle.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert "schedule_policy" in stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=30).extensions
        config = stub.ModelConfig(pb.ModelConfigRequest(name="sentiment"), timeout=30).config
        assert (config.dynamic_batching.priority_levels, config.dynamic_batching.default_priority_level) == (3, 2)
        request = pb.ModelInferRequest(model_name="sentiment")
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(serialize_bytes([b"a fine film"]))
        request.parameters["priority"].int64_param = 1
        assert [o.name for o in stub.ModelInfer(request, timeout=30).outputs] == ["LABEL", "PROBABILITIES"]
        request.parameters["priority"].int64_param = 4
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "between 1 (the highest level) and 3 (PRIORITY_LEVELS)" in str(info.value.details())
    with pytest.raises(ValueError, match=r"default_priority_level \(4\) is above priority_levels \(3\)"):
        Settings(priority_levels=3, default_priority_level=4)
    plain = start_server()
    with grpc.insecure_channel(plain.target) as channel:  # one level: no levels in the config
        config = pb_grpc.GRPCInferenceServiceStub(channel).ModelConfig(pb.ModelConfigRequest(name="sentiment"))
        assert config.config.dynamic_batching.priority_levels == 0


async def test_the_servicer_gives_a_requests_steps_its_level_and_no_more() -> None:
    """The level holds while the request's steps queue (the data plane's call), then the context is as before."""
    from service.api.kserve.servicer import KServeServicer
    from service.core.context import priority
    from service.core.types import InferResult

    seen: list[int | None] = []

    class Plane:
        regions = Regions(False)

        async def infer(self, *args: object, **kwargs: object) -> InferResult:
            seen.append(priority())
            return InferResult(model="sentiment", version=1, outputs=[], inferences=1)

    servicer = KServeServicer(Plane(), Settings(priority_levels=3))  # type: ignore[arg-type]
    for level in (2, 0):
        request = _priority(int64_param=level)
        request.model_name = "sentiment"
        await servicer._infer(request)
        assert priority() is None
    assert seen == [2, None]
