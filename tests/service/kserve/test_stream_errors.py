"""A request inside a ModelStreamInfer stream that fails unexpectedly (a bug, not a refusal): the stream answers
it INTERNAL, inline, without the exception's text, counts it, and goes on with the next request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.kserve.servicer import KServeServicer
from service.core.shm import Regions
from service.core.types import InferResult, ModelRef
from service.metrics import Metrics
from service.settings import Settings


class FailsOnce:
    """Stands in for the data plane's ``infer`` only: the first call raises what a bug would raise."""

    regions = Regions(False)

    def __init__(self) -> None:
        self.calls = 0

    async def infer(self, model: ModelRef, *request: object) -> InferResult:
        self.calls += 1
        if self.calls == 1:
            raise KeyError("secret internals")
        return InferResult(model.name, 1, [], 1)


async def test_an_unexpected_error_inside_a_stream_is_internal_counted_and_the_stream_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics(runtime_collectors=False)
    metrics.know_models(["charlm"])
    servicer = KServeServicer(FailsOnce(), Settings(), metrics)  # type: ignore[arg-type]

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        for rid in ("r1", "r2"):
            yield pb.ModelInferRequest(model_name="charlm", id=rid)

    context: Any = None  # the stream handler never touches its context
    out = [r async for r in servicer.ModelStreamInfer(requests(), context)]
    assert [r.infer_response.id for r in out] == ["r1", "r2"]
    assert out[0].error_message.startswith("internal error (request id ") and "secret" not in out[0].error_message
    assert out[0].infer_response.parameters["seqserve_error_code"].string_param == "INTERNAL"
    assert out[1].error_message == "" and out[1].infer_response.model_name == "charlm"
    assert any(r.exc_info and "unexpected error" in r.getMessage() for r in caplog.records)
    labels = {"service": "inference.GRPCInferenceService", "method": "ModelStreamInfer", "model": "charlm"}
    count = metrics.registry.get_sample_value
    assert count("seqserve_rpc_stream_requests_total", {**labels, "code": "INTERNAL"}) == 1.0
    assert count("seqserve_rpc_stream_requests_total", {**labels, "code": "OK"}) == 1.0
