"""The wire format between frontends and the engine: msgpack, with extension types for what the data plane
passes around (never pickle: a frontend and the engine trust each other's code, not each other's bytes).

Each value msgpack does not know travels as an array whose first element is a marker, an empty extension of its
kind, packed in place by the frame's one ``packb`` and rebuilt by the unpacker's ``list_hook``. (It used to be an
extension holding a nested ``packb`` per value: ``python -m bench.codec`` on 2026-12-05 put the engine's share of
one char-LM step at 29.2 µs then, 24 of them packing its answer, and at 12.0 µs with this encoding; a frontend's
at 15.3 and 12.6 µs.)

- ``service.core.types`` dataclasses (ModelRef, SequenceRef, Tensor, InferResult, CharStep, ModelStats, ...):
  marker 1, ``[type name, *field values]``; tuple-typed fields come back as tuples.
- numpy arrays: marker 2, ``[dtype, shape, raw bytes]`` (little-endian C order; decoded into an own, writable copy:
  the arrays here are a few hundred bytes, a copy costs less than the care a shared buffer would need).
- sets: marker 3. KServe inputs (``WireInput``): marker 4, ``[InferInputTensor bytes, raw contents or None]``, so
  the engine checks headers before it decodes data, exactly as in one process.
- the items of a BYTES ``Tensor`` of 16 elements or more, when the same list was sent before: marker 5, ``[count,
  serialized contents]``, decoded into the same list for the same contents (``_interned``).
- errors: ``SeqServeError`` subclasses travel as (class name, message, nearest ``service.errors`` base) and are
  raised again on the other side.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from service import errors
from service.api.kserve.tensors import WireInput, deserialize_bytes, serialize_cached  # (the KServe inputs' form)
from service.core import types
from service.engine.wire import ERROR as ERROR_REPLY

log = logging.getLogger(__name__)

_DATACLASSES: dict[str, type] = {
    name: obj for name, obj in vars(types).items() if isinstance(obj, type) and dataclasses.is_dataclass(obj)
}
_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _DATACLASSES.values()
}
_TUPLES: dict[type, tuple[int, ...]] = {
    cls: tuple(i for i, f in enumerate(dataclasses.fields(cls)) if str(f.type).startswith("tuple"))
    for cls in _DATACLASSES.values()
}
_DATACLASS, _ARRAY, _SET, _WIRE_INPUT, _ITEMS = 1, 2, 3, 4, 5
_MARKS = {code: msgpack.ExtType(code, b"") for code in (_DATACLASS, _ARRAY, _SET, _WIRE_INPUT, _ITEMS)}
# The items of a BYTES tensor of at least this many elements that the engine sends again, the same list (a char
# LM's VOCAB, in every answer), cross as their serialized contents, one bin, serialized once per list; the
# frontend gets back the same list object for the same contents (``_INTERNED``), whose serialized form its
# response encoding keeps (``tensors.serialize_cached``): instead of 65 small bins packed, unpacked and
# serialized again at every step. A list sent once (``_SENT``: by identity, held so that ids stay unique) and
# lists whose contents change with every answer travel as msgpack's own arrays.
_ITEMS_MIN = 16
_TENSOR_ITEMS = _FIELDS[types.Tensor].index("items")
_SENT: dict[int, list[bytes]] = {}
_INTERNED: dict[bytes, list[bytes]] = {}
_KEPT_MAX = 64
_ERRORS: dict[str, type[errors.SeqServeError]] = {
    name: obj for name, obj in vars(errors).items() if isinstance(obj, type) and issubclass(obj, errors.SeqServeError)
}


class _Mark:
    """A marker as the unpacker sees it (``_ext``), before ``_rebuild`` turns its array into the value."""

    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code


_SEEN = {code: _Mark(code) for code in _MARKS}


def _default(obj: Any) -> Any:
    cls = type(obj)
    fields = _FIELDS.get(cls)
    if fields is not None:
        values = [getattr(obj, f) for f in fields]
        items = obj.items if cls is types.Tensor else None
        if items is not None and len(items) >= _ITEMS_MIN:
            if id(items) in _SENT and _SENT[id(items)] is items:  # (held: its id is no other list's)
                values[_TENSOR_ITEMS] = [_MARKS[_ITEMS], len(items), serialize_cached(items)]
            else:
                if len(_SENT) >= _KEPT_MAX:
                    _SENT.clear()
                _SENT[id(items)] = items
        return [_MARKS[_DATACLASS], cls.__name__, *values]
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        return [_MARKS[_ARRAY], a.dtype.str, list(a.shape), a.tobytes()]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, set | frozenset):
        return [_MARKS[_SET], *sorted(obj)]
    if isinstance(obj, WireInput):
        return [_MARKS[_WIRE_INPUT], *obj.to_wire()]
    raise TypeError(f"cannot send {cls.__name__} between frontend and engine")


def _ext(code: int, data: bytes) -> Any:
    mark = _SEEN.get(code)
    if mark is None or data:
        raise ValueError(f"unknown extension {code} in a frame")
    return mark


def _rebuild(values: list[Any]) -> Any:
    """``list_hook``: an array that starts with a marker becomes its value; any other stays a list."""
    if not values or type(values[0]) is not _Mark:
        return values
    code = values[0].code
    if code == _DATACLASS:
        cls = _DATACLASSES[values[1]]
        fields = values[2:]
        for i in _TUPLES[cls]:
            if isinstance(fields[i], list):
                fields[i] = tuple(fields[i])
        return cls(*fields)
    if code == _ARRAY:
        _, dtype, shape, raw = values
        return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
    if code == _SET:
        return set(values[1:])
    if code == _ITEMS:
        return _interned(values[1], values[2])
    return WireInput.from_wire(values[1], values[2])


def _interned(count: int, serialized: bytes) -> list[bytes]:
    """The items of a serialized BYTES tensor: the same list for the same contents, while they are kept."""
    items = _INTERNED.get(serialized)
    if items is None:
        items = deserialize_bytes("(engine answer)", serialized, count)
        if len(_INTERNED) >= _KEPT_MAX:
            _INTERNED.clear()
        _INTERNED[serialized] = items
    return items


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, default=_default, use_bin_type=True)
    return data


def unpack(data: bytes | memoryview) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext, list_hook=_rebuild, raw=False, strict_map_key=False)


def pack_replies(replies: list[list[Any]], failed: Callable[[int], None] | None = None) -> bytes:
    """The engine's replies of one loop iteration as one frame's payload. A reply that cannot be sent (a value
    no codec knows, e.g. from a plugin) is replaced by an internal error for its call alone: the other calls'
    answers in the frame still leave, and no caller waits for an answer that never comes. ``failed`` hears the
    call's id (the engine stops a stream whose answer could not leave), and that call's later replies in the frame
    are dropped: its caller already has its error."""
    try:
        return pack(replies)
    except (TypeError, ValueError, OverflowError):
        fixed = []
        dead: set[int] = set()
        for reply in replies:
            if reply[0] in dead:
                continue
            try:
                pack(reply)
            except (TypeError, ValueError, OverflowError):
                log.exception("engine: the answer to call %s cannot be sent to the frontend", reply[0])
                reply = [reply[0], ERROR_REPLY, error_payload(RuntimeError()), None, False]
                dead.add(reply[0])
                if failed is not None:
                    failed(reply[0])
            fixed.append(reply)
        return pack(fixed)


def error_payload(exc: BaseException) -> tuple[str, str, str, float | None]:
    """(class name, message, the nearest class of ``service.errors`` it derives from, retry_after) of a domain
    error; anything else is an internal error. A plugin's own subclass (``class ForbiddenWord(InvalidInput)``)
    keeps its name, which is its ErrorInfo reason, and its base's status code."""
    if isinstance(exc, errors.SeqServeError):
        base = next(c.__name__ for c in type(exc).__mro__ if _ERRORS.get(c.__name__) is c)
        return type(exc).__name__, exc.message, base, exc.retry_after
    return "", "internal error in the engine; see its log", "", None


_PLUGIN_ERRORS: dict[tuple[str, str], type[errors.SeqServeError]] = {}


def raise_error(name: str, message: str, base: str = "", retry_after: float | None = None) -> None:
    cls = _ERRORS.get(name)
    if cls is None and base in _ERRORS and name.isidentifier():
        cls = _PLUGIN_ERRORS.get((name, base))
        if cls is None:  # the same name under the same base: the edge derives status and reason from them
            cls = _PLUGIN_ERRORS[name, base] = type(name, (_ERRORS[base],), {"__module__": __name__})
    if cls is None:
        raise EngineError(message)
    raise cls(message) if retry_after is None else cls(message, retry_after=retry_after)


class EngineError(RuntimeError):
    """The engine failed in a way that is not a caller's mistake (becomes INTERNAL at the edge)."""
