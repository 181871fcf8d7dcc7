"""KServe v2 tensors <-> numpy, for both input encodings (typed ``contents`` and ``raw_input_contents``).

Raw layout (what tritonclient sends and expects back): little-endian, row-major; a BYTES tensor is each
element as a 4-byte little-endian length followed by its bytes. Every error names the tensor.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
import numpy.typing as npt

from service.api.gen.inference import grpc_service_pb2 as pb
from service.errors import InvalidInput

# Numeric datatypes: numpy dtype (little-endian) and the typed-contents field that carries them.
NUMERIC: dict[str, tuple[np.dtype[Any], str]] = {
    "BOOL": (np.dtype("?"), "bool_contents"),
    "UINT8": (np.dtype("<u1"), "uint_contents"),
    "UINT16": (np.dtype("<u2"), "uint_contents"),
    "UINT32": (np.dtype("<u4"), "uint_contents"),
    "UINT64": (np.dtype("<u8"), "uint64_contents"),
    "INT8": (np.dtype("<i1"), "int_contents"),
    "INT16": (np.dtype("<i2"), "int_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
}
_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class Tensor:
    """A decoded input. ``array`` is set for numeric datatypes (already reshaped), ``items`` for BYTES."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: npt.NDArray[Any] | None = None
    items: list[bytes] | None = None


def deserialize_bytes(name: str, buf: bytes, count: int) -> list[bytes]:
    """Splits a raw BYTES tensor into its ``count`` elements."""
    items: list[bytes] = []
    pos = 0
    while pos < len(buf):
        if pos + 4 > len(buf):
            raise InvalidInput(f"input {name}: raw BYTES content is truncated inside a length prefix at byte {pos}")
        (n,) = _LEN.unpack_from(buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise InvalidInput(
                f"input {name}: raw BYTES element {len(items)} declares {n} bytes, only {len(buf) - pos} remain"
            )
        items.append(buf[pos : pos + n])
        pos += n
    if len(items) != count:
        raise InvalidInput(f"input {name}: raw BYTES content holds {len(items)} elements, shape needs {count}")
    return items


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(_LEN.pack(len(b)) + b for b in items)


def _shape(t: pb.ModelInferRequest.InferInputTensor) -> tuple[int, ...]:
    if any(d < 0 for d in t.shape):
        raise InvalidInput(f"input {t.name}: shape {list(t.shape)} has a negative dimension")
    return tuple(int(d) for d in t.shape)


def _decode_one(t: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    shape = _shape(t)
    count = prod(shape)
    if t.datatype == "BYTES":
        if raw is not None:
            items = deserialize_bytes(t.name, raw, count)
        else:
            items = list(t.contents.bytes_contents)
            if len(items) != count:
                raise InvalidInput(
                    f"input {t.name}: contents.bytes_contents has {len(items)} elements, "
                    f"shape {list(shape)} needs {count}"
                )
        return Tensor(t.name, t.datatype, shape, items=items)
    if t.datatype not in NUMERIC:
        raise InvalidInput(
            f"input {t.name}: unsupported datatype {t.datatype!r}; use one of {', '.join([*NUMERIC, 'BYTES'])}"
        )
    dtype, field = NUMERIC[t.datatype]
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {t.name}: raw content has {len(raw)} bytes, shape {list(shape)} of "
                f"{t.datatype} needs {count * dtype.itemsize}"
            )
        array = np.frombuffer(raw, dtype=dtype)
    else:
        values = getattr(t.contents, field)
        if len(values) != count:
            raise InvalidInput(
                f"input {t.name}: contents.{field} has {len(values)} values, shape {list(shape)} needs {count}"
            )
        array = np.asarray(values, dtype=dtype)
    return Tensor(t.name, t.datatype, shape, array=array.reshape(shape))


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, Tensor]:
    """All inputs of a request by name. Raw contents, when present, must cover every input, in order."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries but the request has {len(request.inputs)} "
            "inputs; send one raw entry per input or use typed contents for all"
        )
    out: dict[str, Tensor] = {}
    for i, t in enumerate(request.inputs):
        if t.name in out:
            raise InvalidInput(f"input {t.name} appears twice")
        out[t.name] = _decode_one(t, raw[i] if raw else None)
    return out


def encode_output(
    response: pb.ModelInferResponse, name: str, datatype: str, value: npt.NDArray[Any] | list[bytes]
) -> None:
    """Appends one output to ``response`` as raw contents (numeric arrays row-major little-endian)."""
    tensor = response.outputs.add(name=name, datatype=datatype)
    if datatype == "BYTES":
        assert isinstance(value, list)
        tensor.shape.append(len(value))
        response.raw_output_contents.append(serialize_bytes(value))
        return
    assert isinstance(value, np.ndarray)
    dtype, _ = NUMERIC[datatype]
    tensor.shape.extend(int(d) for d in value.shape)
    response.raw_output_contents.append(np.ascontiguousarray(value, dtype=dtype).tobytes())
