"""KServe v2 tensors <-> numpy, for both input encodings (typed ``contents`` and ``raw_input_contents``).

Raw layout (what tritonclient sends and expects back): little-endian, row-major; a BYTES tensor is each
element as a 4-byte little-endian length followed by its bytes. Every error names the tensor.
"""

from __future__ import annotations

import struct
from math import prod
from typing import Any, NamedTuple

import numpy as np

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.kserve.params import held, integer
from service.core.shm import Regions
from service.core.types import SharedRegion, Tensor
from service.errors import InvalidInput, echo, short

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
MAX_DIMS = 16
MAX_DIM = 2**31 - 1


def deserialize_bytes(name: str, buf: bytes, count: int) -> list[bytes]:
    """Splits a raw BYTES tensor into its ``count`` elements (never walks past the ``count``-th: work is bounded
    by the declared shape, not by what the buffer holds)."""
    items: list[bytes] = []
    pos = 0
    while pos < len(buf):
        if len(items) == count:
            raise InvalidInput(
                f"input {short(name)}: raw BYTES content has {len(buf) - pos} bytes after its {count} elements"
            )
        if pos + 4 > len(buf):
            raise InvalidInput(
                f"input {short(name)}: raw BYTES content is truncated inside a length prefix at byte {pos}"
            )
        (n,) = _LEN.unpack_from(buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise InvalidInput(
                f"input {short(name)}: raw BYTES element {len(items)} declares {n} bytes, only {len(buf) - pos} remain"
            )
        items.append(buf[pos : pos + n])
        pos += n
    if len(items) != count:
        raise InvalidInput(f"input {short(name)}: raw BYTES content holds {len(items)} elements, shape needs {count}")
    return items


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(_LEN.pack(len(b)) + b for b in items)


# Encoded BYTES outputs that tasks hand out again and again as the same list object (a char LM's VOCAB): keyed
# by identity, holding the list so its id cannot be reused while cached; bounded.
_ENCODED: dict[int, tuple[list[bytes], bytes]] = {}
_ENCODED_MAX = 64
_ENCODED_MIN_ITEMS = 16


def serialize_cached(items: list[bytes]) -> bytes:
    """``serialize_bytes``, kept for a list handed out again and again (by identity; lists of 16 items or more)."""
    if len(items) < _ENCODED_MIN_ITEMS:
        return serialize_bytes(items)
    hit = _ENCODED.get(id(items))
    if hit is not None and hit[0] is items:
        return hit[1]
    raw = serialize_bytes(items)
    if len(_ENCODED) >= _ENCODED_MAX:
        _ENCODED.clear()
    _ENCODED[id(items)] = (items, raw)
    return raw


def _shape(t: pb.ModelInferRequest.InferInputTensor) -> tuple[int, ...]:
    """The declared shape, checked before anything is decoded: at most 16 dimensions, each 0..2**31-1."""
    shape = tuple(t.shape)  # int64 values: Python ints
    if len(shape) > MAX_DIMS:
        raise InvalidInput(f"input {short(t.name)}: shape has {len(shape)} dimensions, at most {MAX_DIMS}")
    if shape and (min(shape) < 0 or max(shape) > MAX_DIM):
        raise InvalidInput(f"input {short(t.name)}: shape {list(shape)[:8]} has a dimension outside 0..{MAX_DIM}")
    return shape


def _other_field(t: pb.ModelInferRequest.InferInputTensor, field: str) -> None:
    """InvalidInput when ``t``'s typed contents are in another field than its datatype's ``field`` (e.g. INT32
    values sent for a BYTES input): the mistake to name, rather than a count of 0."""
    others = [d.name for d, _ in t.contents.ListFields() if d.name != field]
    if others:
        raise InvalidInput(
            f"input {short(t.name)}: its values are in contents.{others[0]}, but {echo(t.datatype, 16)} values go in "
            f"contents.{field}"
        )


def _decode_one(
    t: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, shape: tuple[int, ...] | None = None
) -> Tensor:
    shape = _shape(t) if shape is None else shape
    count = prod(shape)
    if t.datatype == "BYTES":
        if raw is not None:
            items = deserialize_bytes(t.name, raw, count)
        else:
            if len(t.contents.bytes_contents) != count:  # counted before anything is copied
                _other_field(t, "bytes_contents")
                raise InvalidInput(
                    f"input {short(t.name)}: contents.bytes_contents has {len(t.contents.bytes_contents)} elements, "
                    f"shape {list(shape)} needs {count}"
                )
            items = list(t.contents.bytes_contents)
        return Tensor(t.name, t.datatype, shape, items=items)
    if t.datatype not in NUMERIC:
        raise InvalidInput(
            f"input {short(t.name)}: unsupported datatype {echo(t.datatype, 16)}; use one of "
            f"{', '.join([*NUMERIC, 'BYTES'])}"
        )
    dtype, field = NUMERIC[t.datatype]
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {short(t.name)}: raw content has {len(raw)} bytes, shape {list(shape)} of "
                f"{t.datatype} needs {count * dtype.itemsize}"
            )
        array = np.frombuffer(raw, dtype=dtype)
    else:
        values = getattr(t.contents, field)
        if len(values) != count:
            _other_field(t, field)
            raise InvalidInput(
                f"input {short(t.name)}: contents.{field} has {len(values)} values, shape {list(shape)} needs {count}"
            )
        array = np.asarray(values, dtype=dtype)
    return Tensor(t.name, t.datatype, shape, array=array.reshape(shape))


class WireInput:
    """One input of a request: its header (checked against the model's contract by the core) and the data,
    decoded only when ``decode`` is called, after the header passed."""

    __slots__ = ("_pb", "_raw", "datatype", "name", "shape")

    def __init__(self, t: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> None:
        self._pb, self._raw = t, raw
        self.name: str = t.name
        self.datatype: str = t.datatype
        self.shape = _shape(t)

    def decode(self) -> Tensor:
        return _decode_one(self._pb, self._raw, self.shape)

    def to_wire(self) -> tuple[bytes, bytes | None]:
        """What crosses to the engine process: the tensor message (header and typed contents) and the raw bytes."""
        return self._pb.SerializeToString(), self._raw

    @classmethod
    def from_wire(cls, message: bytes, raw: bytes | None) -> WireInput:
        return cls(pb.ModelInferRequest.InferInputTensor.FromString(message), raw)


# Triton's system shared-memory extension: an input, or a requested output, that names a registered region
# (``service/core/shm.py``) instead of carrying its bytes.
SHM_REGION = "shared_memory_region"
SHM_BYTE_SIZE = "shared_memory_byte_size"
SHM_OFFSET = "shared_memory_offset"


class RegionRef(NamedTuple):
    region: str
    offset: int
    byte_size: int
    checked: SharedRegion | None = None  # an output's: the registration it was checked against, before the run


def _count_param(params: Any, key: str, what: str, required: bool) -> int:
    if key not in params:
        if required:
            raise InvalidInput(f"{what}: {SHM_REGION} needs {key} (how many bytes of the region it uses)")
        return 0
    return integer(params, key, "an integer >= 0", f"{what}: ", minimum=0) or 0


def region_ref(params: Any, what: str) -> RegionRef | None:
    """The shared-memory region a tensor's parameters name (None when they name none)."""
    if SHM_REGION not in params:
        if SHM_BYTE_SIZE in params or SHM_OFFSET in params:
            raise InvalidInput(f"{what}: {SHM_BYTE_SIZE} and {SHM_OFFSET} go with {SHM_REGION}, which is missing")
        return None
    p = params[SHM_REGION]
    if p.WhichOneof("parameter_choice") != "string_param" or not p.string_param:
        raise InvalidInput(
            f"{what}: parameter {SHM_REGION} must be a non-empty string (a registered region's name), got {held(p)}"
        )
    offset = _count_param(params, SHM_OFFSET, what, required=False)
    return RegionRef(p.string_param, offset, _count_param(params, SHM_BYTE_SIZE, what, required=True))


def read_inputs(request: pb.ModelInferRequest, regions: Regions | None = None) -> list[WireInput]:
    """The request's inputs, headers only. Raw contents, when present, must cover every input that does not name
    a shared-memory region (read from ``regions`` here: ``_read_shared``), in order."""
    raw = list(request.raw_input_contents)
    inputs = request.inputs
    for t in inputs:
        if t.parameters:  # (an input's own parameters: only shared memory's are read here)
            return _read_shared(inputs, raw, regions)
    if raw and len(raw) != len(inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries but the request has {len(inputs)} "
            "inputs; send one raw entry per input or use typed contents for all"
        )
    if raw:
        for t in inputs:
            if t.HasField("contents"):  # Triton refuses this too: which of the two would be the data?
                raise InvalidInput(
                    f"input {short(t.name)}: contents must not be set when raw_input_contents is used; send every "
                    "input's data in raw_input_contents or every input's in contents"
                )
    return [WireInput(t, raw[i] if raw else None) for i, t in enumerate(inputs)]


def _read_shared(inputs: Any, raw: list[bytes], regions: Regions | None) -> list[WireInput]:
    """``read_inputs`` when an input has parameters: those that name a region are read from it, the others take
    the raw entries in order (as tritonclient sends them: no raw entry for an input in shared memory)."""
    shared = [region_ref(t.parameters, f"input {short(t.name)}") for t in inputs]
    carried = shared.count(None)
    if raw and len(raw) != carried:
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries but the request has {carried} inputs that are not in "
            "shared memory; send one raw entry per such input or use typed contents for all"
        )
    out: list[WireInput] = []
    left = iter(raw)
    for t, ref in zip(inputs, shared, strict=True):
        if (raw or ref is not None) and t.HasField("contents"):  # Triton refuses this too: which is the data?
            where = "the input names a shared-memory region" if ref is not None else "raw_input_contents is used"
            raise InvalidInput(
                f"input {short(t.name)}: contents must not be set when {where}; send every input's data in one place"
            )
        if ref is None:
            out.append(WireInput(t, next(left, None)))
        elif regions is None:
            raise InvalidInput(f"input {short(t.name)}: shared memory is not read on this endpoint")
        else:
            out.append(WireInput(t, regions.read(ref.region, ref.offset, ref.byte_size, what=f"input {short(t.name)}")))
    return out


CLASS_COUNT = "an integer >= 1 (how many classes to return, tritonclient's class_count)"


def requested_outputs(request: pb.ModelInferRequest) -> tuple[list[str] | None, dict[str, int] | None]:
    """The outputs a request names (None: every output), and the class count of those that ask for Triton's
    classification extension (tritonclient's ``class_count``: parameter ``classification``, an integer >= 1)."""
    names = []
    classes: dict[str, int] | None = None
    for o in request.outputs:
        if "classification" in o.parameters:  # (the message's prefix is built only then)
            count = integer(o.parameters, "classification", CLASS_COUNT, f"output {short(o.name)}: ", minimum=1)
            classes = classes or {}
            classes[o.name] = count or 0  # (present: an int >= 1)
        names.append(o.name)
    return names or None, classes


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, Tensor]:
    """Every input decoded, by name (no contract: for tools and tests)."""
    out: dict[str, Tensor] = {}
    for w in read_inputs(request):
        if w.name in out:
            raise InvalidInput(f"input {short(w.name)} appears twice")
        out[w.name] = w.decode()
    return out


def _raw(t: Tensor) -> bytes:
    """An output's raw contents: numeric arrays row-major little-endian, BYTES length-prefixed."""
    if t.datatype == "BYTES":
        return serialize_cached(t.items or [])
    assert t.array is not None
    dtype, _ = NUMERIC[t.datatype]
    a = t.array
    if a.dtype != dtype or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a, dtype=dtype)
    return a.tobytes()


# A response's model, version and output headers, serialized once per distinct set (a model answers with the same
# outputs and shapes step after step) and merged into each response as one message: building them field by field
# cost ~3 µs per response. Bounded: shapes that vary (batch sizes, class counts) only refill it.
_HEADERS: dict[tuple[object, ...], bytes] = {}
_HEADERS_MAX = 256


def output_regions(request: pb.ModelInferRequest, regions: Regions) -> dict[str, RegionRef] | None:
    """The requested outputs that name a shared-memory region to be written into, checked against the regions
    before the model runs (None: none does)."""
    placed: dict[str, RegionRef] | None = None
    for o in request.outputs:
        if o.parameters:
            what = f"output {short(o.name)}"
            ref = region_ref(o.parameters, what)
            if ref is not None:
                checked = regions.check(ref.region, ref.offset, ref.byte_size, what=what)
                placed = placed or {}
                placed[o.name] = ref._replace(checked=checked)
    return placed


def place_outputs(
    response: pb.ModelInferResponse, tensors: list[Tensor], placed: dict[str, RegionRef], regions: Regions
) -> None:
    """``encode_outputs``'s data part when outputs go into shared memory: such an output's bytes are written into
    its region, its ``raw_output_contents`` entry stays empty (every output keeps one, as in Triton) and its
    parameters say where it is and how many bytes it took."""
    for i, t in enumerate(tensors):
        data = _raw(t)
        ref = placed.get(t.name)
        if ref is None:
            response.raw_output_contents.append(data)
            continue
        what = f"output {short(t.name)} (the model ran)"
        regions.write(ref.region, ref.offset, ref.byte_size, data, what=what, checked=ref.checked)
        response.raw_output_contents.append(b"")
        params = response.outputs[i].parameters
        params[SHM_REGION].string_param = ref.region
        params[SHM_BYTE_SIZE].int64_param = len(data)
        if ref.offset:
            params[SHM_OFFSET].int64_param = ref.offset


def encode_outputs(
    response: pb.ModelInferResponse,
    model: str,
    version: int,
    tensors: list[Tensor],
    placed: dict[str, RegionRef] | None = None,
    regions: Regions | None = None,
) -> None:
    """Sets ``response``'s model name and version and appends ``tensors``: each one's header in ``outputs``, its
    data in ``raw_output_contents`` (``_raw``), or in the shared-memory region ``placed`` names for it."""
    key = (model, version, *[(t.name, t.datatype, t.shape) for t in tensors])
    header = _HEADERS.get(key)
    if header is None:
        m = pb.ModelInferResponse(model_name=model, model_version=str(version))
        for t in tensors:
            m.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        if len(_HEADERS) >= _HEADERS_MAX:
            _HEADERS.clear()
        header = _HEADERS[key] = m.SerializeToString()
    response.MergeFromString(header)
    if placed and regions is not None:
        place_outputs(response, tensors, placed, regions)
    else:
        response.raw_output_contents.extend([_raw(t) for t in tensors])
