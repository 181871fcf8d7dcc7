"""Request fields of the v2 protocol that are not tensors: model references, Triton's sequence parameters and its
``timeout`` and ``priority`` (the schedule-policy extension).

A request joins a sequence with the parameters ``sequence_id`` (uint64/int64 or string; 0 or "" = none),
``sequence_start`` and ``sequence_end`` (bool), and may export or import its state (``seqserve_export``,
``seqserve_import``). What a sequence *is* (a session keyed per model and id, pinned to the version it started
on) is the core's business; this module only parses.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping

from service.api.gen.inference import grpc_service_pb2 as pb
from service.core.types import ModelRef, SequenceRef
from service.errors import InvalidInput, echo

# Session export/import for sequences (needs SEQSERVE_SESSION_SIGNING_KEY): a request with bool parameter
# seqserve_export=true gets response parameter seqserve_session (base64 of the signed blob of the state after it);
# a sequence_start request with string parameter seqserve_import=<base64 blob> starts from that state.
EXPORT = "seqserve_export"
IMPORT = "seqserve_import"
SESSION_PARAMETER = "seqserve_session"
TIMEOUT = "timeout"
PRIORITY = "priority"
MAX_SEQUENCE_ID_CHARS = 200  # the session key adds "kserve:<principal tag>:<model>:"; the store allows 320
_VERSION = re.compile(r"[0-9]{1,9}")  # ASCII digits only: "²" and "١" are not versions


def model_ref(name: str, version: str) -> ModelRef:
    if not name:
        raise InvalidInput("model name is empty")
    if not version:
        return ModelRef(name)
    if not _VERSION.fullmatch(version) or int(version) < 1:
        raise InvalidInput(
            f"model version must be a positive integer of at most 9 digits, or empty (newest), got {echo(version)}"
        )
    return ModelRef(name, int(version))


_KINDS = {
    "bool_param": "a bool",
    "int64_param": "an int64",
    "uint64_param": "a uint64",
    "double_param": "a double",
    "string_param": "a string",
}


def held(p: pb.InferParameter) -> str:
    """What a parameter holds, in words that read the same over gRPC (its field) and REST (a JSON value): ``a
    double (1.5)``, ``a string ('yes')``."""
    kind = p.WhichOneof("parameter_choice")
    if kind is None:
        return "no value"
    value = getattr(p, kind)
    shown = echo(value, 40) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else value
    return f"{_KINDS.get(kind, kind)} ({shown})"


def _bool(params: Mapping[str, pb.InferParameter], key: str) -> bool:
    if key not in params:
        return False
    p = params[key]
    if p.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidInput(f"parameter {key} must be a bool, got {held(p)}")
    return p.bool_param


def parse_sequence(params: Mapping[str, pb.InferParameter]) -> SequenceRef | None:
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
            raise InvalidInput(f"parameter sequence_id must be an integer or a string, got {held(p)}")
    export = _bool(params, EXPORT)
    blob = _blob(params)
    if not seq_id:
        if start or end or export or blob is not None:
            raise InvalidInput(f"sequence_start/sequence_end/{EXPORT}/{IMPORT} need a non-zero, non-empty sequence_id")
        return None
    return SequenceRef(seq_id, start, end, blob, export)


def integer(
    params: Mapping[str, pb.InferParameter], name: str, what: str, where: str = "", minimum: int | None = None
) -> int | None:
    """Parameter ``name`` as an integer (int64_param or uint64_param, as tritonclient sends either), None when
    absent; InvalidInput saying it must be ``what`` (after ``where``: "output X: ") when it is another kind or
    below ``minimum``."""
    if name not in params:
        return None
    p = params[name]
    kind = p.WhichOneof("parameter_choice")
    value = int(getattr(p, kind)) if kind in ("int64_param", "uint64_param") else None
    if value is None or (minimum is not None and value < minimum):
        raise InvalidInput(f"{where}parameter {name} must be {what}, got {held(p)}")
    return value


def parse_timeout(params: Mapping[str, pb.InferParameter]) -> float | None:
    """Seconds the request may take to be answered: Triton's ``timeout`` parameter (int64 microseconds, what
    tritonclient's ``infer(timeout=...)`` sends; 0 = no limit), or None."""
    us = integer(params, TIMEOUT, "an integer number of microseconds")
    if us is None:
        return None
    if us < 0:
        raise InvalidInput(f"parameter {TIMEOUT} must be >= 0 microseconds (0: no limit), got {us}")
    return us / 1e6 if us else None


def parse_priority(params: Mapping[str, pb.InferParameter], levels: int) -> int | None:
    """The request's priority level: Triton's ``priority`` parameter (1 = highest .. ``levels``; 0 = the default
    level), or None for the default. With one level (``levels`` 0) any priority is accepted and has no effect, as
    on a Triton model without priority levels."""
    level = integer(params, PRIORITY, "an integer (1 = the highest level)")
    if level is None or not levels:
        return None
    if not 0 <= level <= levels:
        raise InvalidInput(
            f"parameter {PRIORITY} must be between 1 (the highest level) and {levels} (PRIORITY_LEVELS), or 0 for "
            f"the default level, got {level}"
        )
    return level or None


def _blob(params: Mapping[str, pb.InferParameter]) -> bytes | None:
    if IMPORT not in params:
        return None
    p = params[IMPORT]
    if p.WhichOneof("parameter_choice") != "string_param":
        raise InvalidInput(f"parameter {IMPORT} must be a string (base64 of a session blob), got {held(p)}")
    try:
        return base64.b64decode(p.string_param, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"parameter {IMPORT} is not valid base64") from None
