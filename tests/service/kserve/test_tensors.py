"""KServe v2 tensor codecs: raw and typed inputs decode to the same values; errors name the tensor."""

from __future__ import annotations

import numpy as np
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.kserve import tensors
from service.api.kserve.params import parse_sequence
from service.api.kserve.tensors import decode_inputs, deserialize_bytes, encode_outputs, serialize_bytes
from service.core.types import Tensor
from service.errors import InvalidInput

Input = pb.ModelInferRequest.InferInputTensor


def test_bytes_round_trip_including_empty_and_non_ascii() -> None:
    items = [b"", "héllo".encode(), b"\x00\x01"]
    assert deserialize_bytes("T", serialize_bytes(items), 3) == items


@pytest.mark.parametrize(
    ("buf", "count", "needle"),
    [(b"\x01\x00", 1, "length prefix"), (b"\x05\x00\x00\x00ab", 1, "declares 5 bytes"), (b"", 1, "holds 0")],
)
def test_bytes_errors_name_tensor(buf: bytes, count: int, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle) as info:
        deserialize_bytes("TEXT", buf, count)
    assert "input TEXT" in info.value.message


def test_raw_and_typed_decode_alike() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    typed = pb.ModelInferRequest(
        inputs=[
            Input(
                name="X", datatype="FP32", shape=[2, 3], contents=pb.InferTensorContents(fp32_contents=values.ravel())
            )
        ]
    )
    raw = pb.ModelInferRequest(
        inputs=[Input(name="X", datatype="FP32", shape=[2, 3])], raw_input_contents=[values.tobytes()]
    )
    a, b = decode_inputs(typed)["X"], decode_inputs(raw)["X"]
    assert a.array is not None and b.array is not None
    np.testing.assert_array_equal(a.array, values)
    np.testing.assert_array_equal(b.array, values)


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (pb.ModelInferRequest(inputs=[Input(name="X", datatype="FP16", shape=[1])]), "input X: unsupported datatype"),
        (pb.ModelInferRequest(inputs=[Input(name="X", datatype="INT32", shape=[-1])]), "input X: shape"),
        (pb.ModelInferRequest(inputs=[Input(name="X", datatype="INT32", shape=[2])]), "input X: contents.int_contents"),
        (
            pb.ModelInferRequest(
                inputs=[Input(name="X", datatype="INT32", shape=[1], contents=pb.InferTensorContents(int_contents=[1]))]
                * 2
            ),
            "input X appears twice",
        ),
        (  # values in the field of another datatype: named, not counted as none
            pb.ModelInferRequest(
                inputs=[Input(name="X", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(int_contents=[7]))]
            ),
            "^input X: its values are in contents.int_contents, but 'BYTES' values go in contents.bytes_contents$",
        ),
        (
            pb.ModelInferRequest(
                inputs=[
                    Input(name="X", datatype="FP32", shape=[2], contents=pb.InferTensorContents(fp64_contents=[1, 2]))
                ]
            ),
            "^input X: its values are in contents.fp64_contents, but 'FP32' values go in contents.fp32_contents$",
        ),
    ],
)
def test_decode_errors(request_: pb.ModelInferRequest, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        decode_inputs(request_)


def test_encode_outputs_is_raw_little_endian() -> None:
    response = pb.ModelInferResponse()
    p = Tensor("P", "FP32", (1, 2), array=np.array([[0.5, 1.5]], dtype=np.float32))
    encode_outputs(response, "m", 1, [p, Tensor("L", "BYTES", (1,), items=[b"ab"])])
    assert [(o.name, list(o.shape)) for o in response.outputs] == [("P", [1, 2]), ("L", [1])]
    assert np.frombuffer(response.raw_output_contents[0], dtype="<f4").tolist() == [0.5, 1.5]
    assert response.raw_output_contents[1] == b"\x02\x00\x00\x00ab"


def test_encode_outputs_matches_field_by_field_encoding_and_its_header_cache_stays_bounded() -> None:
    def outputs(rows: int) -> list[Tensor]:
        probs = np.arange(rows * 3, dtype=np.float64).reshape(rows, 3)[:, ::-1]  # float64, not contiguous
        return [Tensor("P", "FP32", (rows, 3), array=probs), Tensor("L", "BYTES", (rows,), items=[b"x"] * rows)]

    for rows in (1, 2, 1):  # the second answer of one signature comes from the cache
        fast = pb.ModelInferResponse(id="7")
        encode_outputs(fast, "m", 3, outputs(rows))
        slow = pb.ModelInferResponse(model_name="m", model_version="3", id="7")  # field by field
        for t in outputs(rows):
            slow.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        slow.raw_output_contents.extend(
            [np.ascontiguousarray(outputs(rows)[0].array, "<f4").tobytes(), b"\x01\x00\x00\x00x" * rows]
        )
        assert fast == slow
        assert np.frombuffer(fast.raw_output_contents[0], dtype="<f4").reshape(rows, 3)[0].tolist() == [2, 1, 0]
    for rows in range(1, 2 * tensors._HEADERS_MAX):  # a shape per call: the cache refills, it does not grow
        encode_outputs(pb.ModelInferResponse(), "m", 3, outputs(rows))
        assert len(tensors._HEADERS) <= tensors._HEADERS_MAX


def test_sequence_parameters() -> None:
    request = pb.ModelInferRequest()
    assert parse_sequence(request.parameters) is None
    request.parameters["sequence_id"].int64_param = 0  # 0 = not part of a sequence
    assert parse_sequence(request.parameters) is None
    request.parameters["sequence_id"].string_param = "abc"
    request.parameters["sequence_start"].bool_param = True
    seq = parse_sequence(request.parameters)
    assert seq is not None and seq.id == "abc" and seq.start and not seq.end
    request.parameters["sequence_end"].string_param = "yes"
    with pytest.raises(InvalidInput, match=r"sequence_end must be a bool, got a string \('yes'\)"):
        parse_sequence(request.parameters)
    request.parameters["sequence_end"].bool_param = False
    request.parameters["sequence_id"].double_param = 1.5  # (what a REST client's JSON 1.5 becomes)
    with pytest.raises(InvalidInput, match=r"sequence_id must be an integer or a string, got a double \(1\.5\)"):
        parse_sequence(request.parameters)
