"""Hypothesis strategies for any protobuf request, built from its descriptor, and the table of every RPC the
server offers (both APIs, health and reflection), so the fuzz suite covers methods added later without edits.

Values lean towards what breaks servers: empty and huge strings, control characters, non-ASCII digits, the
loaded model names (so requests get past the first lookup), integer extremes, NaN and infinities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2  # noqa: F401  (registers the descriptors)
from grpc_reflection.v1alpha import reflection_pb2  # noqa: F401
from hypothesis import strategies as st

import service.api.gen.inference.grpc_service_pb2
import service.api.gen.seqserve.v1.autocomplete_pb2
import service.api.gen.seqserve.v1.forecast_pb2
import service.api.gen.seqserve.v1.sentiment_pb2
import service.api.gen.seqserve.v1.sessions_pb2  # noqa: F401

MODELS = ["charlm", "sentiment", "forecaster"]
SERVICES = [
    "seqserve.v1.Sentiment",
    "seqserve.v1.Autocomplete",
    "seqserve.v1.Forecast",
    "seqserve.v1.Sessions",
    "inference.GRPCInferenceService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
]
# Left out: Health/Watch never ends by design; the repository RPCs are fuzzed with names that are not loaded
# (unloading the models under test would only test the fuzz suite).
SKIP = {"/grpc.health.v1.Health/Watch"}
REPOSITORY = {
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
}


@dataclass(frozen=True)
class Rpc:
    path: str  # /package.Service/Method
    request: type[Message]
    client_streaming: bool
    server_streaming: bool


def rpcs() -> list[Rpc]:
    pool = descriptor_pool.Default()
    out: list[Rpc] = []
    for name in SERVICES:
        for m in pool.FindServiceByName(name).methods:
            path = f"/{name}/{m.name}"
            if path not in SKIP:
                out.append(Rpc(path, GetMessageClass(m.input_type), m.client_streaming, m.server_streaming))
    return out


_SURROGATES: tuple[Literal["Cs"]] = ("Cs",)  # typed: hypothesis takes its Literal category names
_TEXT = st.text(st.characters(exclude_categories=_SURROGATES), max_size=24)
STRINGS = st.one_of(
    _TEXT,
    st.sampled_from(["", "1", "0", "-1", "²", "١", "x" * 300, "a\n\x00\x1b[2J", "kserve:charlm:1", *MODELS]),
)
INT32 = st.one_of(st.integers(-3, 40), st.sampled_from([2**31 - 1, -(2**31), 2000, 2001, 257]))
INT64 = st.one_of(INT32, st.sampled_from([2**63 - 1, -(2**63), 2**62, 2**31]))
UINT32 = st.one_of(st.integers(0, 40), st.sampled_from([2**32 - 1, 2**31]))
UINT64 = st.one_of(UINT32, st.sampled_from([2**64 - 1, 2**63]))
FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)
DOUBLES = st.floats(allow_nan=True, allow_infinity=True)
BYTES = st.one_of(st.binary(max_size=24), st.sampled_from([b"\x02\x00\x00\x00ab", b"\xff\xff\xff\xff", b"\x00" * 8]))

T = FieldDescriptor
SCALARS: dict[int, st.SearchStrategy[Any]] = {
    T.TYPE_STRING: STRINGS,
    T.TYPE_BYTES: BYTES,
    T.TYPE_BOOL: st.booleans(),
    T.TYPE_INT32: INT32,
    T.TYPE_SINT32: INT32,
    T.TYPE_SFIXED32: INT32,
    T.TYPE_INT64: INT64,
    T.TYPE_SINT64: INT64,
    T.TYPE_SFIXED64: INT64,
    T.TYPE_UINT32: UINT32,
    T.TYPE_FIXED32: UINT32,
    T.TYPE_UINT64: UINT64,
    T.TYPE_FIXED64: UINT64,
    T.TYPE_FLOAT: FLOATS,
    T.TYPE_DOUBLE: DOUBLES,
}


def _message_type(f: FieldDescriptor) -> Descriptor:
    """The type of a TYPE_MESSAGE field (``message_type`` is None only for the other types)."""
    return cast(Descriptor, f.message_type)


def _is_map(f: FieldDescriptor) -> bool:
    return f.type == T.TYPE_MESSAGE and _message_type(f).GetOptions().map_entry


def _single(f: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if f.type == T.TYPE_MESSAGE:
        return messages(_message_type(f), depth + 1)
    if f.type == T.TYPE_ENUM:
        values = cast(EnumDescriptor, f.enum_type).values  # (set for every TYPE_ENUM field)
        return st.sampled_from([v.number for v in values] + [99])  # proto3 enums take unknown values
    return SCALARS[f.type]


def _field(f: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if _is_map(f):
        key, value = _message_type(f).fields_by_name["key"], _message_type(f).fields_by_name["value"]
        return st.dictionaries(_single(key, depth), _single(value, depth), max_size=3)
    if f.is_repeated:
        return st.lists(_single(f, depth), max_size=4)
    return _single(f, depth)


def _descriptor(cls: type[Message]) -> Descriptor:
    """A message class's descriptor. (The stubs also allow upb's Descriptor class; the objects upb makes are
    instances of ``descriptor.Descriptor`` all the same.)"""
    return cast(Descriptor, cls.DESCRIPTOR)


def messages(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of type ``desc``: each field set or not; past depth 3 nested messages stay empty."""
    cls = GetMessageClass(desc)
    if depth > 3:
        return st.just(cls())
    optional = {f.name: _field(f, depth) for f in desc.fields}
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: _build(cls, values))


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    msg = cls()
    for name, value in values.items():
        f = _descriptor(cls).fields_by_name[name]
        target = getattr(msg, name)
        if _is_map(f):
            for k, v in value.items():
                if _message_type(f).fields_by_name["value"].type == T.TYPE_MESSAGE:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif f.is_repeated:
            if f.type == T.TYPE_MESSAGE:
                for v in value:
                    target.add().CopyFrom(v)
            else:
                target.extend(value)
        elif f.type == T.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


def request_for(rpc: Rpc) -> st.SearchStrategy[Message]:
    strategy = messages(_descriptor(rpc.request))
    if rpc.path in REPOSITORY:
        return strategy.map(_not_loaded)
    return strategy


def _not_loaded(msg: Message) -> Message:
    name = getattr(msg, "model_name", "")
    if name in MODELS or not name:
        msg.model_name = f"fuzz-{name}"  # type: ignore[attr-defined]
    return msg


def mutate(data: bytes, how: list[tuple[int, int]]) -> bytes:
    """``data`` with each (position, byte) applied: position < len replaces, >= len appends; 256 truncates."""
    out = bytearray(data)
    for pos, byte in how:
        if byte == 256:
            del out[pos % (len(out) + 1) :]
        elif out and pos < len(out):
            out[pos] = byte
        else:
            out.append(byte)
    return bytes(out)
