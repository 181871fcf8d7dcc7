"""KServe v2 REST's JSON and Triton's binary tensors <-> the gRPC messages (``infer_request``,
``infer_response``), and protobuf messages as JSON (``message_json``)."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.generate import json_kind
from service.api.kserve.tensors import MAX_DIM, NUMERIC, SHM_REGION, deserialize_bytes, serialize_bytes
from service.api.rest.common import HEADER_LENGTH, HttpError
from service.argtypes import INT64_MAX
from service.errors import echo

REST_ONLY = ("binary_data", "binary_data_size", "binary_data_output")  # parameters the gRPC call does not carry
BINARY_FLAGS = ("binary_data", "binary_data_output")  # JSON booleans, as Triton reads them
UINT64_MAX = 2**64 - 1


def message_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's REST JSON: its proto field names, every field (zeros too), 64-bit integers
    as numbers (protobuf's own JSON writes them as strings), enums by name, bytes in base64."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        one: Any = field
        singular_message = one.type == FieldDescriptor.TYPE_MESSAGE and not one.is_repeated
        if (one.containing_oneof is not None or singular_message) and not message.HasField(one.name):
            continue
        value = getattr(message, one.name)
        if one.is_repeated and one.message_type is not None and one.message_type.GetOptions().map_entry:
            value_field = one.message_type.fields_by_name["value"]
            out[one.name] = {key: _scalar(value_field, v) for key, v in value.items()}
        elif one.is_repeated:
            out[one.name] = [_scalar(one, v) for v in value]
        else:
            out[one.name] = _scalar(one, value)
    return out


def _scalar(field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    return value


def parameter_value(param: Any) -> Any:
    """An InferParameter / SettingValue / ModelRepositoryParameter as its JSON value (None when unset)."""
    which = param.WhichOneof("parameter_choice")
    if which is None:
        return None
    value = getattr(param, which)
    return base64.b64encode(value).decode("ascii") if isinstance(value, bytes) else value


def fill_parameters(target: Any, params: object, where: str, skip: tuple[str, ...] = REST_ONLY) -> None:
    """JSON ``parameters`` (an object of bool, integer, number or string values) into a protobuf parameter map:
    bool -> bool_param, integer -> int64_param (uint64_param above int64), number -> double_param, string ->
    string_param."""
    if params is None:
        return
    if not isinstance(params, dict):
        raise HttpError(400, f"{where}: parameters must be a JSON object, got {json_kind(params)}")
    for key, value in params.items():
        if key in BINARY_FLAGS and not isinstance(value, bool):  # ("yes" or "true" was read as false, unsaid)
            raise HttpError(400, f"{where}: parameter {key} must be true or false, got {json_kind(value)}")
        if key in skip:
            continue
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            if not -INT64_MAX - 1 <= value <= UINT64_MAX:
                raise HttpError(400, f"{where}: parameter {echo(key)} = {value} does not fit in 64 bits")
            if value > INT64_MAX:
                slot.uint64_param = value
            else:
                slot.int64_param = value
        elif isinstance(value, float):
            slot.double_param = value
        elif isinstance(value, str):
            slot.string_param = value
        else:
            raise HttpError(
                400, f"{where}: parameter {echo(key)} must be a bool, a number or a string, got {json_kind(value)}"
            )


def _flatten(data: Any) -> list[Any]:
    """Nested JSON arrays, row-major, as one list (without recursion: nesting depth costs no stack)."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _nesting_problem(data: Any, shape: list[int]) -> str:
    """Why nested ``data`` does not follow ``shape`` ("" when it does, or when it is flat). The element count alone
    let a transposed table ([7][96] for shape [96, 7]) or ragged rows (6 values, then 8) through, answered from
    values in the wrong places. Nested data must nest as the shape does, level by level, down to its values."""
    if not isinstance(data, list) or not any(isinstance(x, list) for x in data):
        return ""
    level, depth = [data], 0
    while True:
        if depth == len(shape):
            return f"it nests deeper than its {len(shape)} dimensions"
        for items in level:
            if len(items) != shape[depth]:
                return f"a list at depth {depth + 1} holds {len(items)} items where dimension {depth} is {shape[depth]}"
        children = [x for items in level for x in items]
        nested = {isinstance(x, list) for x in children}
        if not children:  # (a dimension of 0)
            return ""
        if nested == {True}:
            level, depth = children, depth + 1
        elif nested == {True, False}:
            return f"a list at depth {depth + 1} mixes lists and values"
        elif depth + 1 < len(shape):
            return f"its lists stop at depth {depth + 1} of {len(shape)}"
        else:
            return ""


def _json_elements(name: str, datatype: str, data: Any, shape: list[int]) -> bytes:
    """An input's JSON ``data`` (flat, or nested as its ``shape``, row-major) as raw tensor bytes, every element
    checked."""
    problem = _nesting_problem(data, shape)
    if problem:
        raise HttpError(
            400,
            f"input {echo(name)}: nested data must follow its shape {shape} (row-major): {problem}; or send the "
            "values flat",
        )
    count = math.prod(shape)
    flat = _flatten(data)
    if len(flat) != count:
        raise HttpError(400, f"input {echo(name)}: data has {len(flat)} elements, its shape holds {count}")
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise HttpError(400, f"input {echo(name)}: BYTES data are JSON strings")
        return serialize_bytes([x.encode("utf-8", "surrogatepass") for x in flat])
    if datatype not in NUMERIC:
        raise HttpError(
            400,
            f"input {echo(name)}: datatype {echo(datatype, 16)} has no JSON form here; use one of "
            f"{', '.join([*NUMERIC, 'BYTES'])} (the model's metadata, GET /v2/models/<model>, names the one each "
            "input takes)",
        )
    dtype = NUMERIC[datatype][0]
    if datatype == "BOOL":
        ok = all(isinstance(x, bool) for x in flat)
    elif dtype.kind == "f":
        ok = all(isinstance(x, int | float) and not isinstance(x, bool) for x in flat)
    else:
        ok = all(isinstance(x, int) and not isinstance(x, bool) for x in flat)
    if not ok:
        wanted = {"BOOL": "true or false"}.get(datatype, "numbers" if dtype.kind == "f" else "integers")
        raise HttpError(400, f"input {echo(name)}: {datatype} data are JSON {wanted}")
    try:
        with np.errstate(over="raise"):  # a number past a float type's largest would become inf: refused the same
            array = np.array(flat, dtype=dtype)  # (NaN and Infinity, where the JSON has them, pass)
    except (OverflowError, ValueError, FloatingPointError):
        raise HttpError(400, f"input {echo(name)}: a value is outside {datatype}'s range{_span(dtype)}") from None
    return array.tobytes()


def _span(dtype: np.dtype[Any]) -> str:
    if dtype.kind == "f":
        return f" {np.finfo(dtype).min:.8g}..{np.finfo(dtype).max:.8g}"
    if dtype.kind in "iu":
        return f" {np.iinfo(dtype).min}..{np.iinfo(dtype).max}"
    return ""


def _shape(name: str, shape: object) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise HttpError(400, f"input {echo(name)}: shape must be an array of integers")
    if any(not 0 <= d <= MAX_DIM for d in shape):  # (as the gRPC call says it; a 2^62 dimension read as a count)
        raise HttpError(400, f"input {echo(name)}: shape {shape[:8]} has a dimension outside 0..{MAX_DIM}")
    return shape


def infer_request(model: str, version: str, header: object, binary: bytes) -> tuple[pb.ModelInferRequest, bool]:
    """A REST inference request (JSON header and the binary tail of Triton's extension) as the ModelInferRequest
    it means, every input in ``raw_input_contents``; and whether outputs are wanted in binary by default."""
    if not isinstance(header, dict):
        raise HttpError(400, f"the inference request must be a JSON object, got {json_kind(header)}")
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if "id" in header:
        if not isinstance(header["id"], str):
            raise HttpError(400, f"id must be a string, got {json_kind(header['id'])}")
        request.id = header["id"]
    params = header.get("parameters")
    fill_parameters(request.parameters, params, "the request")
    binary_default = isinstance(params, dict) and params.get("binary_data_output") is True
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise HttpError(400, "inputs must be a non-empty array of {name, shape, datatype, data} objects")
    offset = 0
    for i, item in enumerate(inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise HttpError(400, f"inputs[{i}] must be an object with a string name")
        name = item["name"]
        datatype = item.get("datatype")
        if not isinstance(datatype, str):
            raise HttpError(400, f"input {echo(name)}: datatype must be a string (FP32, BYTES, ...)")
        shape = _shape(name, item.get("shape"))
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        own = item.get("parameters")
        fill_parameters(tensor.parameters, own, f"input {echo(name)}")
        size = own.get("binary_data_size") if isinstance(own, dict) else None
        if isinstance(own, dict) and SHM_REGION in own:  # read from the region by the gRPC call
            if "data" in item or size is not None:
                raise HttpError(400, f"input {echo(name)}: give data, binary_data_size or {SHM_REGION}, one of them")
        elif size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise HttpError(400, f"input {echo(name)}: binary_data_size must be a non-negative integer")
            if "data" in item:
                raise HttpError(400, f"input {echo(name)}: give data or binary_data_size, not both")
            if offset + size > len(binary):
                raise HttpError(
                    400,
                    f"input {echo(name)}: binary_data_size {size} passes the end of the binary data "
                    f"({len(binary) - offset} bytes left after {HEADER_LENGTH})",
                )
            request.raw_input_contents.append(binary[offset : offset + size])
            offset += size
        elif "data" in item:
            request.raw_input_contents.append(_json_elements(name, datatype, item["data"], list(shape)))
        else:
            raise HttpError(
                400,
                f"input {echo(name)}: no data (give data, binary_data_size with binary data, or {SHM_REGION})",
            )
    if offset != len(binary):
        raise HttpError(400, f"{len(binary) - offset} bytes of binary data after the inputs' binary_data_size")
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list):
        raise HttpError(400, "outputs must be an array of {name, parameters} objects")
    for i, item in enumerate(outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise HttpError(400, f"outputs[{i}] must be an object with a string name")
        wanted = request.outputs.add(name=item["name"])
        fill_parameters(wanted.parameters, item.get("parameters"), f"output {echo(item['name'])}")
    return request, binary_default


def _binary_wanted(header: dict[str, Any], name: str, default: bool) -> bool:
    for item in header.get("outputs", []):
        if item.get("name") == name and isinstance(item.get("parameters"), dict):
            choice = item["parameters"].get("binary_data")
            if isinstance(choice, bool):
                return choice
    return default


def _output_raw(response: pb.ModelInferResponse, i: int) -> bytes:
    if i < len(response.raw_output_contents):
        return bytes(response.raw_output_contents[i])
    t = response.outputs[i]
    if t.datatype == "BYTES":
        return serialize_bytes(list(t.contents.bytes_contents))
    dtype, field = NUMERIC[t.datatype]
    return np.array(getattr(t.contents, field), dtype=dtype).tobytes()


def _output_data(datatype: str, name: str, raw: bytes, count: int) -> list[Any]:
    if datatype == "BYTES":
        return [b.decode("utf-8", "replace") for b in deserialize_bytes(name, raw, count)]
    return list(np.frombuffer(raw, dtype=NUMERIC[datatype][0]).tolist())


def infer_response(response: pb.ModelInferResponse, header: dict[str, Any], binary_default: bool) -> tuple[bytes, int]:
    """The REST answer: JSON body (then the binary outputs' bytes) and the JSON part's length, for the
    ``Inference-Header-Content-Length`` header when there is binary data."""
    body: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        body["id"] = response.id
    if response.parameters:
        body["parameters"] = {k: parameter_value(v) for k, v in response.parameters.items()}
    tail: list[bytes] = []
    body["outputs"] = []
    for i, t in enumerate(response.outputs):
        out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        params = {k: parameter_value(v) for k, v in t.parameters.items()}
        raw = _output_raw(response, i)
        if SHM_REGION in params:  # written into its region: as Triton's, neither data nor parameters (Triton's C++
            params = {}  # client reads a binary_data_size from any output that has parameters)
        elif _binary_wanted(header, t.name, binary_default):
            params["binary_data_size"] = len(raw)
            tail.append(raw)
        else:
            out["data"] = _output_data(t.datatype, t.name, raw, math.prod(t.shape))
        if params:
            out["parameters"] = params
        body["outputs"].append(out)
    head = json.dumps(body, separators=(",", ":"), allow_nan=True).encode()
    return head + b"".join(tail), len(head)
