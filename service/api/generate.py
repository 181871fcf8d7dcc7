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

from service.api.converters import finish_reason_from_pb
from service.api.gen.seqserve.v1 import autocomplete_pb2, common_pb2
from service.argtypes import INT32_MAX, INT64_MAX
from service.errors import echo

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
USAGE = '{"text_input": "...", "parameters": {"max_tokens": 40, "temperature": 0.8, ...}}'


class RequestError(ValueError):
    """A completion request (generate, OpenAI's completions) the gateway refuses before any call (HTTP 400): what
    to fix; ``param``: the request key at fault, as OpenAI's error object names it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def complete_request(name: str, version: str, document: object, *, stream: bool) -> autocomplete_pb2.CompleteRequest:
    """The ``Autocomplete.Complete`` call a generate request means. ``stream``: which endpoint was called (a
    ``stream`` option that says otherwise is refused)."""
    if not isinstance(document, dict):
        raise RequestError(f"the generate request is a JSON object: {USAGE}")
    text = document.get("text_input")
    if not isinstance(text, str):
        raise RequestError(f"text_input must be a string, the text to continue: {USAGE}")
    params = document.get("parameters", {})
    if not isinstance(params, dict):
        raise RequestError(f"parameters must be a JSON object: {USAGE}")
    beside = {key: value for key, value in document.items() if key not in ("text_input", "parameters")}
    chosen: dict[str, tuple[str, Any]] = {}  # field -> (the key that set it, its value)
    places = [(key, value, "in parameters") for key, value in params.items()]
    places += [(key, value, "beside text_input") for key, value in beside.items()]
    stood: dict[str, str] = {}  # field -> where its key stood
    for key, value, place in places:
        field = OPTIONS.get(key)
        if field is None:
            raise RequestError(f"unknown option {echo(key)}: generate takes text_input and {', '.join(OPTIONS)}")
        if field in chosen:
            first = f"{chosen[field][0]} {stood[field]}"
            raise RequestError(f"{key} is given twice ({first}, {key} {place}); give it once")
        chosen[field], stood[field] = (key, value), place
    request = autocomplete_pb2.CompleteRequest(
        prompt=text,
        model=model_selector(name, version, f"model version {echo(version, 40)} is not a version number (1, 2, ...)"),
    )
    for field, (key, value) in chosen.items():
        if field == "stream":
            if not isinstance(value, bool):
                raise RequestError(f"stream must be true or false, got {json_kind(value)}")
            if value != stream:
                where = "generate_stream" if value else "generate"
                raise RequestError(f"stream={json.dumps(value)} asks for /{where}: send the request there")
        else:
            set_option(request, field, key, value)
    return request


def caller_keys(document: dict[str, Any], options: dict[str, str], named: dict[str, str]) -> dict[str, str]:
    """``CompleteRequest`` field -> the request key that set it (``max_chars`` -> ``max_tokens``), for a checked
    request (``document``, its keys beside and in ``parameters``; ``options``: key -> field), over ``named``
    (those the request always has: ``prompt`` -> ``text_input``)."""
    keys = dict(named)
    for where in (document, document.get("parameters")):
        if isinstance(where, dict):
            keys |= {options[key]: key for key in where if key in options}
    return keys


def spelled_as(message: str, keys: dict[str, str]) -> tuple[str, str | None]:
    """The server's refusal of a field (``max_chars must be between 1 and 2000 ...``, ``prompt: character ...``)
    in the words of the request the caller sent (``max_tokens must be ...``), and that key; else as it was."""
    for field, key in keys.items():
        if message.startswith(field) and message[len(field) : len(field) + 1] in (" ", ":", "["):
            return key + message[len(field) :], key
    return message, None


def set_option(request: autocomplete_pb2.CompleteRequest, field: str, key: str, value: object) -> None:
    """One sampling option of a JSON request into ``request.<field>`` (max_chars, temperature, top_k, seed, stop
    or session_id), checked as JSON types go; ``key`` is how the caller spelt it (``max_tokens``). The ranges the
    server checks (temperature, top_k, max_chars up to the limit) are left to it."""
    if field == "temperature":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise RequestError(f"temperature must be a number (0 = greedy), got {json_kind(value)}", key)
        request.temperature = value
    elif field == "seed":
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= INT64_MAX:
            shown = (
                value if isinstance(value, int) and not isinstance(value, bool) and -(2**64) < value < 2**64 else None
            )
            got = json_kind(value) if shown is None else shown
            raise RequestError(f"{key} must be an integer between 0 and {INT64_MAX}, got {got}", key)
        request.seed = value
    elif field in ("max_chars", "top_k"):
        if not isinstance(value, int) or isinstance(value, bool) or not -INT32_MAX - 1 <= value <= INT32_MAX:
            raise RequestError(f"{key} must be an integer that fits in 32 bits", key)
        if field == "max_chars" and value < 1:
            raise RequestError(f"{key} must be at least 1 (the characters to generate), got {value}", key)
        setattr(request, field, value)
    elif field == "stop":
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise RequestError("stop must be a string or an array of strings", key)
        request.stop.extend(stops)
    elif field == "session_id":
        if not isinstance(value, str):
            raise RequestError(f"session_id must be a string (Sessions.Create's id), got {json_kind(value)}", key)
        request.session_id = value
    else:
        raise AssertionError(f"no option {field!r}")


def model_selector(name: str, version: str, refusal: str) -> common_pb2.ModelSelector:
    """``name`` at ``version`` (ASCII digits, 1 or more; empty = the newest); ``refusal``: the message otherwise."""
    if not version:
        return common_pb2.ModelSelector(name=name)
    if not (version.isascii() and version.isdecimal()) or not 1 <= int(version) <= INT64_MAX:  # (not "١")
        raise RequestError(refusal, "model")
    return common_pb2.ModelSelector(name=name, version=int(version))


def answer(
    name: str, version: int, text: str, last: autocomplete_pb2.CompleteChunk | None, session: bool
) -> dict[str, Any]:
    """One generate response object: Triton's ``model_name``, ``model_version`` and ``text_output``; with
    ``finish_reason`` (length or stop) once the completion ends, and ``steps`` (what the session has
    consumed, as ``CompleteChunk.steps``) for a session's completion."""
    body: dict[str, Any] = {"model_name": name, "model_version": str(version), "text_output": text}
    finish = finish_reason_from_pb(last.finish_reason) if last is not None else None
    if finish is not None:
        body["finish_reason"] = finish
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
