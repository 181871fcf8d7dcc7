"""``SessionState``: a session as a plain record, and its versioned binary form (never pickle).

A session is a model's recurrent state (graph state input name -> ``[layers*dirs, 1(*features), hidden]``) plus
a task context (named arrays: the char LM's next-character logits, a forecaster's last rows), pinned to the
model version and weights (sha256) that produced it. Locks live in the store, not here.

Binary layout (``to_bytes``), all integers little-endian::

    b"SQSS" | u16 format (1) | u16 flags (0) | u32 header length | header (UTF-8 JSON) | zero padding to 8 bytes
    | raw arrays, each little-endian, C order, starting on an 8-byte boundary

The header holds the scalar fields and, per array, its group ("state" or "context"), name, dtype, shape,
offset (from the start of the array section) and size. ``from_bytes`` checks every one of them and raises
``SessionDecodeError`` (a ValueError) for anything it does not accept.

Compatibility across releases (old and new replicas share one store during a rolling update): ``from_bytes``
ignores header keys it does not know and keeps every context array, and a task rebuilds the context it needs on
each step, so a release may add data that an older replica drops without changing any answer (it writes the
session back without them; an import, stricter, refuses parts its model does not keep). Data whose loss would
change answers needs a new ``flags`` bit (a feature every reader must understand) or a new ``format``; a reader
refuses both when it does not know them with ``NewerSessionFormat``, which the stores answer as UNAVAILABLE
(retry: an updated replica reads it), never as a broken session. This release knows no flags.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from service.core.types import SessionInfo

Array = npt.NDArray[Any]
MAGIC = b"SQSS"
FORMAT = 1
KNOWN_FLAGS = 0  # the flags bits this release understands (none yet)
_PREFIX = struct.Struct("<4sHHI")
_ALIGN = 8
MAX_HEADER_BYTES = 1 << 20
_DTYPES = {"<f4", "<f8", "<f2", "<i8", "<i4", "<i2", "|i1", "|u1", "|b1"}
_GROUPS = ("state", "context")


class SessionDecodeError(ValueError):
    """A session's bytes are not a state this server can read (corrupt, foreign, or a newer format)."""


class NewerSessionFormat(SessionDecodeError):
    """A session written by a newer release: a format or a flags bit this one does not know."""


@dataclass(slots=True)
class SessionState:
    """One session. Arrays are never changed in place: a step replaces them, so a shallow ``copy`` is safe."""

    id: str
    model: str
    version: int
    model_sha256: str
    task: str
    state: dict[str, Array]
    context: dict[str, Array]
    steps: int
    ttl_seconds: float
    created_at: float
    last_used_at: float
    nbytes: int  # bytes reserved in the store: the state plus the largest context this session can hold
    metadata: dict[str, str] = field(default_factory=dict)
    owner: str = ""
    revision: int = 0  # bumped by the store on every save (optimistic concurrency)

    @property
    def expires_at(self) -> float:
        return self.last_used_at + self.ttl_seconds

    def info(self, in_use: bool = False) -> SessionInfo:
        return SessionInfo(
            id=self.id,
            model=self.model,
            version=self.version,
            steps=self.steps,
            created_at=self.created_at,
            last_used_at=self.last_used_at,
            expires_at=self.expires_at,
            ttl_seconds=self.ttl_seconds,
            metadata=dict(self.metadata),
            in_use=in_use,
        )

    def copy(self) -> SessionState:
        """A working copy: own dicts, shared (immutable by convention) arrays. No serialization."""
        return SessionState(
            self.id,
            self.model,
            self.version,
            self.model_sha256,
            self.task,
            dict(self.state),
            dict(self.context),
            self.steps,
            self.ttl_seconds,
            self.created_at,
            self.last_used_at,
            self.nbytes,
            dict(self.metadata),
            self.owner,
            self.revision,
        )

    def clone(self, new_id: str, ttl_seconds: float, now: float) -> SessionState:
        """A fork: the same state and context under a new id; the two evolve independently from here."""
        twin = self.copy()
        twin.id, twin.ttl_seconds, twin.created_at, twin.last_used_at, twin.revision = new_id, ttl_seconds, now, now, 0
        return twin

    # --- binary form ----------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        arrays: list[dict[str, Any]] = []
        chunks: list[bytes] = []
        offset = 0
        for group, table in (("state", self.state), ("context", self.context)):
            for name, value in table.items():
                a = np.ascontiguousarray(value)
                a = a.astype(a.dtype.newbyteorder("<"), copy=False)
                raw = a.tobytes()
                pad = (-offset) % _ALIGN
                chunks.append(b"\0" * pad)
                offset += pad
                arrays.append(
                    {
                        "group": group,
                        "name": name,
                        "dtype": a.dtype.str,
                        "shape": list(a.shape),
                        "offset": offset,
                        "nbytes": len(raw),
                    }
                )
                chunks.append(raw)
                offset += len(raw)
        header = {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "model_sha256": self.model_sha256,
            "task": self.task,
            "steps": self.steps,
            "ttl_seconds": self.ttl_seconds,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "nbytes": self.nbytes,
            "metadata": self.metadata,
            "owner": self.owner,
            "revision": self.revision,
            "arrays": arrays,
        }
        head = json.dumps(header, separators=(",", ":")).encode()
        prefix = _PREFIX.pack(MAGIC, FORMAT, 0, len(head))
        pad = (-(len(prefix) + len(head))) % _ALIGN
        return b"".join([prefix, head, b"\0" * pad, *chunks])

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> SessionState:
        buf = memoryview(data)
        if len(buf) < _PREFIX.size:
            raise SessionDecodeError(f"a session needs at least {_PREFIX.size} bytes, got {len(buf)}")
        magic, fmt, flags, head_len = _PREFIX.unpack_from(buf, 0)
        if magic != MAGIC:
            raise SessionDecodeError("not a seqserve session (bad magic bytes)")
        if fmt > FORMAT or flags & ~KNOWN_FLAGS:
            raise NewerSessionFormat(
                f"session format {fmt} with flags {flags:#x} is from a newer seqserve (this one reads format "
                f"{FORMAT} with flags {KNOWN_FLAGS:#x})"
            )
        if fmt != FORMAT:
            raise SessionDecodeError(f"session format {fmt} is not supported (this server reads format {FORMAT})")
        if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > len(buf):
            raise SessionDecodeError(f"session header of {head_len} bytes does not fit in {len(buf)} bytes")
        try:
            header = json.loads(bytes(buf[_PREFIX.size : _PREFIX.size + head_len]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SessionDecodeError(f"session header is not valid JSON: {e}") from None
        start = _PREFIX.size + head_len
        start += (-start) % _ALIGN
        body = buf[start:]
        try:
            tables: dict[str, dict[str, Array]] = {"state": {}, "context": {}}
            for spec in header["arrays"]:
                group, name, dtype = spec["group"], spec["name"], spec["dtype"]
                shape = tuple(int(d) for d in spec["shape"])
                offset, nbytes = int(spec["offset"]), int(spec["nbytes"])
                if group not in _GROUPS or not isinstance(name, str) or dtype not in _DTYPES:
                    raise SessionDecodeError(f"array {name!r}: unsupported group {group!r} or dtype {dtype!r}")
                if any(d < 0 for d in shape) or math.prod(shape) * np.dtype(dtype).itemsize != nbytes:
                    raise SessionDecodeError(f"array {name!r}: shape {list(shape)} does not match {nbytes} bytes")
                if offset < 0 or offset + nbytes > len(body):
                    raise SessionDecodeError(f"array {name!r} lies outside the {len(body)} bytes of array data")
                a = np.frombuffer(body, dtype=np.dtype(dtype), count=math.prod(shape), offset=offset)
                tables[group][name] = a.reshape(shape).astype(a.dtype.newbyteorder("="))  # own, native copy
            metadata = header["metadata"]
            if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
            ):
                raise SessionDecodeError("metadata must map strings to strings")
            return cls(
                id=_str(header, "id"),
                model=_str(header, "model"),
                version=_int(header, "version"),
                model_sha256=_str(header, "model_sha256"),
                task=_str(header, "task"),
                state=tables["state"],
                context=tables["context"],
                steps=_int(header, "steps"),
                ttl_seconds=_float(header, "ttl_seconds"),
                created_at=_float(header, "created_at"),
                last_used_at=_float(header, "last_used_at"),
                nbytes=_int(header, "nbytes"),
                metadata=dict(metadata),
                owner=_str(header, "owner"),
                revision=_int(header, "revision"),
            )
        except SessionDecodeError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise SessionDecodeError(f"session header is malformed: {type(e).__name__}: {e}") from None


def _str(h: dict[str, Any], key: str) -> str:
    v = h[key]
    if not isinstance(v, str):
        raise SessionDecodeError(f"header field {key!r} must be a string")
    return v


def _int(h: dict[str, Any], key: str) -> int:
    v = h[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise SessionDecodeError(f"header field {key!r} must be an integer")
    return v


def _float(h: dict[str, Any], key: str) -> float:
    v = h[key]
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise SessionDecodeError(f"header field {key!r} must be a finite number")
    return float(v)
