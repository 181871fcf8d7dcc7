"""Triton's generate extension on the REST port, for a model that generates text (a char LM):
``POST /v2/models/{m}[/versions/{v}]/generate`` answers one JSON object, ``.../generate_stream`` the same objects
as Server-Sent Events, one per generated piece, as they are generated.

A request is ``{"text_input": "...", "parameters": {...}}``; the sampling options may also stand beside
``text_input`` (Triton passes such keys on as parameters). Each request becomes one ``Autocomplete.Complete`` call
(the gateway's forwarding: same checks, quotas, sessions and metrics as over gRPC). Unlike Triton, which hands
keys it does not know to the model, a key that is not one of ``OPTIONS`` is refused, naming the ones there are,
so a misspelt ``temprature`` does not silently sample at 1.0.
"""

from __future__ import annotations

import json
from typing import Any

from service.api.gen.seqserve.v1 import autocomplete_pb2, common_pb2
from service.errors import echo

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
# request key -> CompleteRequest field (two spellings of the length: LLM servers' max_tokens, our max_chars)
OPTIONS = {
    "max_tokens": "max_chars",
    "max_chars": "max_chars",
    "temperature": "temperature",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
    "session_id": "session_id",
    "stream": "stream",
}
FINISH = {
    autocomplete_pb2.FINISH_REASON_LENGTH: "length",
    autocomplete_pb2.FINISH_REASON_STOP: "stop",
    autocomplete_pb2.FINISH_REASON_CANCELLED: "cancelled",
}
USAGE = '{"text_input": "...", "parameters": {"max_tokens": 40, "temperature": 0.8, ...}}'


class GenerateError(ValueError):
    """A generate request the gateway refuses before any call (HTTP 400): what to fix."""


def complete_request(name: str, version: str, document: object, *, stream: bool) -> autocomplete_pb2.CompleteRequest:
    """The ``Autocomplete.Complete`` call a generate request means. ``stream``: which endpoint was called (a
    ``stream`` option that says otherwise is refused)."""
    if not isinstance(document, dict):
        raise GenerateError(f"the generate request is a JSON object: {USAGE}")
    text = document.get("text_input")
    if not isinstance(text, str):
        raise GenerateError(f"text_input must be a string, the text to continue: {USAGE}")
    params = document.get("parameters", {})
    if not isinstance(params, dict):
        raise GenerateError(f"parameters must be a JSON object: {USAGE}")
    beside = {key: value for key, value in document.items() if key not in ("text_input", "parameters")}
    chosen: dict[str, tuple[str, Any]] = {}  # field -> (the key that set it, its value)
    for key, value in [*params.items(), *beside.items()]:
        field = OPTIONS.get(key)
        if field is None:
            raise GenerateError(f"unknown option {echo(key)}: generate takes text_input and {', '.join(OPTIONS)}")
        if field in chosen:
            raise GenerateError(f"{key} is given twice (as {chosen[field][0]} too); give it once")
        chosen[field] = (key, value)
    request = autocomplete_pb2.CompleteRequest(prompt=text, model=_model(name, version))
    for field, (key, value) in chosen.items():
        if field == "stream":
            if not isinstance(value, bool):
                raise GenerateError(f"stream must be true or false, got {json_kind(value)}")
            if value != stream:
                where = "generate_stream" if value else "generate"
                raise GenerateError(f"stream={json.dumps(value)} asks for /{where}: send the request there")
        elif field == "temperature":
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise GenerateError(f"temperature must be a number (0 = greedy), got {json_kind(value)}")
            request.temperature = value
        elif field in ("max_chars", "top_k", "seed"):
            top = INT64_MAX if field == "seed" else INT32_MAX
            if not isinstance(value, int) or isinstance(value, bool) or not -top - 1 <= value <= top:
                raise GenerateError(f"{key} must be an integer that fits in {64 if top == INT64_MAX else 32} bits")
            if field == "max_chars" and value < 1:
                raise GenerateError(f"{key} must be at least 1 (the characters to generate), got {value}")
            setattr(request, field, value)
        elif field == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise GenerateError("stop must be a string or an array of strings")
            request.stop.extend(stops)
        else:  # session_id
            if not isinstance(value, str):
                raise GenerateError(f"session_id must be a string (Sessions.Create's id), got {json_kind(value)}")
            request.session_id = value
    return request


def _model(name: str, version: str) -> common_pb2.ModelSelector:
    if not version:
        return common_pb2.ModelSelector(name=name)
    if not version.isdecimal() or not 1 <= int(version) <= INT64_MAX:
        raise GenerateError(f"model version {echo(version, 40)} is not a version number (1, 2, ...)")
    return common_pb2.ModelSelector(name=name, version=int(version))


def answer(
    name: str, version: int, text: str, last: autocomplete_pb2.CompleteChunk | None, session: bool
) -> dict[str, Any]:
    """One generate response object: Triton's ``model_name``, ``model_version`` and ``text_output``; with
    ``finish_reason`` (length, stop or cancelled) once the completion ends, and ``steps`` (what the session has
    consumed, as ``CompleteChunk.steps``) for a session's completion."""
    body: dict[str, Any] = {"model_name": name, "model_version": str(version), "text_output": text}
    if last is not None and last.finish_reason in FINISH:
        body["finish_reason"] = FINISH[last.finish_reason]
    if session and last is not None:
        body["steps"] = last.steps
    return body


def event(document: dict[str, Any]) -> bytes:
    """One Server-Sent Event carrying ``document`` (JSON on one line: its newlines are escaped)."""
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


def json_kind(value: object) -> str:
    """What JSON type ``value`` is, for a message: "an object", "an array", "a string", ..."""
    return {dict: "an object", list: "an array", type(None): "null", str: "a string", bool: "a bool"}.get(
        type(value), "a number"
    )
