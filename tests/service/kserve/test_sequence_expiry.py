"""Idle sequences expire after settings.sequence_idle_seconds; continuing one then is a clear NOT_FOUND.
The server's session clock is injected: the test moves time instead of sleeping."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.kserve.tensors import serialize_bytes
from tests.clock import FakeClock
from tests.conftest import ServerHandle


def _step(text: str, seq_id: str, *, start: bool = False) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name="charlm",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])],
        raw_input_contents=[serialize_bytes([text.encode()])],
    )
    request.parameters["sequence_id"].string_param = seq_id
    request.parameters["sequence_start"].bool_param = start
    return request


def test_idle_sequence_expires(start_server: Callable[..., ServerHandle]) -> None:
    clock = FakeClock()
    handle = start_server(clock=clock, sequence_idle_seconds=1.0)
    with grpc.insecure_channel(handle.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        config = stub.ModelConfig(pb.ModelConfigRequest(name="charlm"), timeout=60).config
        assert config.sequence_batching.max_sequence_idle_microseconds == 1_000_000
        stub.ModelInfer(_step("abc", "idle-1", start=True), timeout=60)
        clock.advance(0.9)
        stub.ModelInfer(_step("d", "idle-1"), timeout=60)  # used again: the idle time starts over
        clock.advance(0.9)
        stub.ModelInfer(_step("e", "idle-1"), timeout=60)
        clock.advance(1.5)  # past the 1 s idle limit
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(_step("f", "idle-1"), timeout=60)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'idle-1'" in info.value.details() and "expire after 1s idle" in info.value.details()
        # A new start under the same id works again.
        response = stub.ModelInfer(_step("def", "idle-1", start=True), timeout=60)
        assert [o.name for o in response.outputs] == ["NEXT_CHAR_PROBS", "VOCAB", "COMPLETION"]
        assert response.parameters["seqserve_steps"].int64_param == 3
