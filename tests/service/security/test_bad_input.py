"""Defect 3: inputs that used to be INTERNAL are INVALID_ARGUMENT naming the field; defect 13: an id from before
a restart is "unknown, expired or was lost in a restart"."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.gen.seqserve.v1 import autocomplete_pb2, autocomplete_pb2_grpc
from service.client import ApiError, Client
from tests.conftest import ServerHandle
from tests.service.security.conftest import Input, infer_request, text_input

Code = grpc.StatusCode


def status(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    try:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return Code.OK, ""


@pytest.mark.parametrize("version", ["²", "١", "1.0", "-1", "0", " 1", "9" * 30])
@pytest.mark.parametrize("rpc", ["ModelInfer", "ModelMetadata", "ModelReady", "ModelConfig", "ModelStatistics"])
def test_non_ascii_or_malformed_model_version_names_the_field(plain: ServerHandle, rpc: str, version: str) -> None:
    requests = {
        "ModelInfer": infer_request("charlm", text_input("a"), version=version),
        "ModelMetadata": pb.ModelMetadataRequest(name="charlm", version=version),
        "ModelReady": pb.ModelReadyRequest(name="charlm", version=version),
        "ModelConfig": pb.ModelConfigRequest(name="charlm", version=version),
        "ModelStatistics": pb.ModelStatisticsRequest(name="charlm", version=version),
    }
    with grpc.insecure_channel(plain.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        code, message = status(lambda: getattr(stub, rpc)(requests[rpc], timeout=10))
    assert code == Code.INVALID_ARGUMENT, message
    assert "model version" in message


def test_negative_seed_names_the_field(plain: ServerHandle) -> None:
    with grpc.insecure_channel(plain.target) as channel:
        stub = autocomplete_pb2_grpc.AutocompleteStub(channel)
        request = autocomplete_pb2.CompleteRequest(prompt="a", seed=-1, max_chars=3)
        code, message = status(lambda: stub.Complete(request, timeout=10))
    assert code == Code.INVALID_ARGUMENT and "seed" in message


def _infer(target: str, request: pb.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return status(lambda: stub.ModelInfer(request, timeout=10))


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ([2**62, 0], ["TEXT", "dimension outside"]),
        ([1] * 70, ["TEXT", "70 dimensions"]),
        ([-1], ["TEXT", "dimension outside"]),
    ],
)
def test_absurd_shapes_are_refused_before_decoding(plain: ServerHandle, shape: list[int], words: list[str]) -> None:
    request = infer_request("charlm", Input(name="TEXT", datatype="BYTES", shape=shape))
    code, message = _infer(plain.target, request)
    assert code == Code.INVALID_ARGUMENT
    assert all(w in message for w in words), message


def test_inputs_are_checked_against_the_contract_before_their_data(plain: ServerHandle) -> None:
    """A 1-element TEXT whose raw content claims 4 MiB of empty elements: refused by count, never walked."""
    request = infer_request("charlm", Input(name="TEXT", datatype="BYTES", shape=[1]))
    request.raw_input_contents.append(b"\0\0\0\0" * (1 << 20))
    code, message = _infer(plain.target, request)
    assert code == Code.INVALID_ARGUMENT and "TEXT" in message and "after its 1 elements" in message
    history = Input(name="HISTORY", datatype="FP32", shape=[480_000, 7])
    code, message = _infer(plain.target, infer_request("forecaster", history))
    assert code == Code.INVALID_ARGUMENT and "HISTORY" in message and "max_forecast_rows" in message


def test_an_empty_input_name_is_shown_as_such(plain: ServerHandle) -> None:
    """(found by a random-request sweep: the messages read "input : shape ..." and "has no input ''")"""
    code, message = _infer(plain.target, infer_request("charlm", Input(name="", datatype="BYTES", shape=[-1])))
    assert code == Code.INVALID_ARGUMENT and message.startswith("input '': shape [-1]"), message


def test_an_unknown_input_name_is_echoed_bounded_and_escaped(plain: ServerHandle) -> None:
    name = "X\n2026-12-01 00:00:00,000 ERROR forged" + "y" * 10_000
    code, message = _infer(plain.target, infer_request("charlm", text_input("a", name=name)))
    assert code == Code.INVALID_ARGUMENT
    assert "\n" not in message and "\\n" in message and "characters)" in message and len(message) < 600


def test_too_long_sequence_id_names_the_parameter(plain: ServerHandle) -> None:
    request = infer_request("charlm", text_input("a"), sequence_id="s" * 201, sequence_start=True)
    code, message = _infer(plain.target, request)
    assert code == Code.INVALID_ARGUMENT and "sequence_id" in message


def test_model_selector_version_zero_names_the_field(plain: ServerHandle) -> None:
    with Client(plain.target) as c, pytest.raises(ApiError) as info:
        c.classify(["good"], version=0)
    assert info.value.code == Code.INVALID_ARGUMENT and "model.version" in info.value.message
    with Client(plain.target) as c, pytest.raises(ApiError) as info:
        c.classify(["good"], version=2**62)
    assert info.value.code == Code.NOT_FOUND, "a huge version is just an unknown one"


def test_an_id_from_before_a_restart(serve: Callable[..., ServerHandle]) -> None:
    first = serve()
    with Client(first.target) as c:
        old = c.create_session("charlm").id
    first.stop()
    second = serve()
    with Client(second.target) as c, pytest.raises(ApiError) as info:
        c.get_session(old)
    assert info.value.code == Code.NOT_FOUND
    assert "unknown, expired or was lost in a restart" in info.value.message
    assert "TTL" not in info.value.message
