"""Triton's sequence extension on top of our session store.

A request joins a sequence with the parameters ``sequence_id`` (uint64/int64 or string; 0 or "" = none),
``sequence_start`` and ``sequence_end`` (bool). A sequence is an ordinary session keyed
``kserve:<model>:<sequence_id>`` whose idle TTL is ``settings.sequence_idle_seconds`` (Triton's
max_sequence_idle_microseconds). Start (re)creates it, end deletes it after the request, anything in between
continues it; the core serializes concurrent requests of one session.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

from service.api.gen.inference import grpc_service_pb2 as pb
from service.core.types import DataPlane, ModelRef
from service.errors import InvalidInput, SessionNotFound
from service.settings import Settings

MAX_SEQUENCE_ID_CHARS = 200  # the session key adds "kserve:<model>:"; the store allows 256 characters


@dataclass(frozen=True)
class Sequence:
    id: str  # the caller's id, as text (uint64 7 and string "7" name the same sequence)
    start: bool
    end: bool

    def session_id(self, model: str) -> str:
        return f"kserve:{model}:{self.id}"


def _bool(params: Mapping[str, pb.InferParameter], key: str) -> bool:
    if key not in params:
        return False
    p = params[key]
    if p.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidInput(f"parameter {key} must be a bool, got {p.WhichOneof('parameter_choice')}")
    return p.bool_param


def parse_sequence(params: Mapping[str, pb.InferParameter]) -> Sequence | None:
    """The request's sequence, or None when it is not part of one."""
    start, end = _bool(params, "sequence_start"), _bool(params, "sequence_end")
    seq_id = ""
    if "sequence_id" in params:
        p = params["sequence_id"]
        kind = p.WhichOneof("parameter_choice")
        if kind == "int64_param":
            if p.int64_param < 0:
                raise InvalidInput(f"parameter sequence_id must be >= 0, got {p.int64_param}")
            seq_id = str(p.int64_param) if p.int64_param else ""
        elif kind == "uint64_param":
            seq_id = str(p.uint64_param) if p.uint64_param else ""
        elif kind == "string_param":
            seq_id = p.string_param
            if len(seq_id) > MAX_SEQUENCE_ID_CHARS:
                raise InvalidInput(
                    f"parameter sequence_id is {len(seq_id)} characters, at most {MAX_SEQUENCE_ID_CHARS}"
                )
        else:
            raise InvalidInput(f"parameter sequence_id must be an integer or a string, got {kind}")
    if not seq_id:
        if start or end:
            raise InvalidInput("sequence_start/sequence_end need a non-zero, non-empty sequence_id")
        return None
    return Sequence(seq_id, start, end)


class Sequences:
    """Opens, checks and closes the sessions behind sequences."""

    def __init__(self, dataplane: DataPlane, settings: Settings) -> None:
        self._dataplane = dataplane
        self._idle_seconds = settings.sequence_idle_seconds

    async def begin(self, model: ModelRef, name: str, seq: Sequence) -> str:
        """Returns the session id to run the request on; a start replaces any earlier state of that id."""
        sid = seq.session_id(name)
        if seq.start:  # creating under an existing caller-chosen id replaces that session (the core's contract)
            await self._dataplane.create_session(model, ttl_seconds=self._idle_seconds, session_id=sid)
        return sid

    async def version(self, name: str, seq: Sequence) -> int:
        """The model version a running sequence is pinned to; a clear error when there is no such sequence."""
        try:
            return (await self._dataplane.get_session(seq.session_id(name))).version
        except SessionNotFound:
            raise self.unknown(name, seq) from None

    def unknown(self, name: str, seq: Sequence) -> SessionNotFound:
        return SessionNotFound(
            f"sequence {seq.id!r} of model {name} is unknown or expired (sequences expire after "
            f"{self._idle_seconds:g}s idle, end with sequence_end, and may be evicted when the session store is "
            "full); send sequence_start=true to begin it"
        )

    async def end(self, sid: str) -> None:
        with contextlib.suppress(SessionNotFound):  # expired meanwhile: nothing to release
            await self._dataplane.delete_session(sid)
