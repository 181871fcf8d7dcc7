"""OpenAI's completions API on the REST port, for a model that generates text (a char LM): ``POST /v1/completions``
answers one completion object, or with ``"stream": true`` streams completion chunks as Server-Sent Events ending
in ``data: [DONE]``; ``GET /v1/models`` lists the served models. What the OpenAI SDKs and the tools built on them
call (``OpenAI(base_url="http://host:8000/v1").completions.create(...)``).

Each request is one ``Autocomplete.Complete`` call through the REST gateway, as Triton's generate endpoints
(``service.api.generate``): same checks, quotas, sessions and metrics as gRPC. A char LM's tokens are characters,
so ``max_tokens`` and ``usage`` count characters. Options a char LM with one continuation per request cannot honour
(``n`` > 1, ``logprobs``, ``echo``, ``suffix``, ``top_p`` < 1, penalties, ``logit_bias``) are refused naming the
value that would be accepted, rather than ignored; so is any key OpenAI's API does not have, as OpenAI does.
Extensions, sent through the SDKs' ``extra_body``: ``top_k`` and ``session_id`` (continue a session).
As in OpenAI's API, the text leaves out the ``stop`` string that ended it (``Complete`` includes it): a stream holds
back the characters that may still become one (``StopCut``).
"""

from __future__ import annotations

import json
from typing import Any

from service.api.converters import finish_reason_from_pb
from service.api.gen.seqserve.v1 import autocomplete_pb2
from service.api.generate import RequestError, json_kind, model_selector, set_option
from service.errors import echo

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
# keys a request may carry that must keep the value that changes nothing (a char LM, one continuation)
NEUTRAL: dict[str, Any] = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": None,
    "suffix": None,
    "top_p": 1,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": {},
}
# request key -> CompleteRequest field (service.api.generate.set_option checks and sets it)
OPTIONS = {"max_tokens": "max_chars"} | {k: k for k in ("temperature", "top_k", "seed", "stop", "session_id")}
KEYS = {"model", "prompt", "stream", "stream_options", "user", *OPTIONS, *NEUTRAL}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
}
ERROR_TYPES |= {413: "invalid_request_error", 429: "rate_limit_error"}


def error_object(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object (what its SDKs read into ``APIError.message``), for an answer of ``status``."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    return json.dumps(error_object(status, message, param)).encode()


def completion_request(document: object) -> tuple[autocomplete_pb2.CompleteRequest, bool, bool]:
    """The ``Autocomplete.Complete`` call a completions request means; whether it streams, and whether the stream
    ends with a usage chunk (``stream_options.include_usage``)."""
    if not isinstance(document, dict):
        raise RequestError(f"the request body must be a JSON object, got {json_kind(document)}")
    unknown = sorted(set(document) - KEYS)
    if unknown:
        raise RequestError(f"Unrecognized request argument supplied: {echo(unknown[0])}", unknown[0])
    for key, neutral in NEUTRAL.items():
        value = document.get(key)
        if value is not None and value != neutral:
            raise RequestError(
                f"{key}={json.dumps(value)[:40]} is not supported by this server (a character model, one "
                f"continuation per request); leave it out or send {json.dumps(neutral)}",
                key,
            )
    model = document.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model is required: a served model's name (GET /v1/models), e.g. charlm", "model")
    name, _, version = model.partition("/")
    selector = model_selector(name, version, f"model {echo(model)}: after '/' comes a version number (charlm/1)")
    prompt = document.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("prompt must be a string (or a list of one string; not token ids)", "prompt")
    request = autocomplete_pb2.CompleteRequest(model=selector, prompt=prompt, max_chars=DEFAULT_MAX_TOKENS)
    for key, field in OPTIONS.items():
        if document.get(key) is not None:
            set_option(request, field, key, document[key])
    if document.get("user") is not None and not isinstance(document["user"], str):
        raise RequestError("user must be a string", "user")
    stream = document.get("stream", False)
    if not isinstance(stream, bool | None):
        raise RequestError(f"stream must be true or false, got {json_kind(stream)}", "stream")
    options = document.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise RequestError('stream_options is {"include_usage": true|false}, with stream=true', "stream_options")
    usage = bool(options and options.get("include_usage"))
    return request, bool(stream), usage


def completion(
    ident: str, created: int, model: str, version: int, text: str, last: autocomplete_pb2.CompleteChunk | None
) -> dict[str, Any]:
    """A completion object, or one chunk of a stream: one choice, ``finish_reason`` once it ends (``last``: the
    chunk that says so); ``system_fingerprint`` names the model version that generated."""
    finish = finish_reason_from_pb(last.finish_reason) if last is not None else None
    return {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": f"seqserve-{model.partition('/')[0]}-{version}",
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
    }


class StopCut:
    """A completion's text without the stop string that ended it, as OpenAI answers (``Complete`` includes it).
    Streamed, ``feed`` returns what may be sent so far: all but the last characters that could still begin a stop
    string (the longest end of the text that begins one); the chunk that ends the generation gives the rest, its
    stop string cut off."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = sorted({s for s in stops if s}, key=len, reverse=True)  # longest first: the earliest match
        self.hold = max(len(self.stops[0]) - 1, 0) if self.stops else 0
        self.pending = ""

    def feed(self, text: str, chunk: autocomplete_pb2.CompleteChunk) -> str:
        """What of ``text`` (and of the text held back) may be sent now; ``chunk``: the chunk that brought it (the
        last one of the call, for the whole text), whose finish reason says whether the generation ended, and how."""
        self.pending += text
        finish = finish_reason_from_pb(chunk.finish_reason)
        if finish is None:
            keep = self._beginning()
            out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
            return out
        out, self.pending = self.pending, ""
        if finish == "stop":
            matched = next((s for s in self.stops if out.endswith(s)), "")
            out = out[: len(out) - len(matched)]
        return out

    def _beginning(self) -> int:
        """How many of the last characters held could still begin a stop string (a "\n" that begins none is sent
        at once: holding ``hold`` characters always delayed every character by them)."""
        for k in range(min(self.hold, len(self.pending)), 0, -1):
            tail = self.pending[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


def usage(prompt: str, generated: int) -> dict[str, int]:
    """A char LM's tokens are characters: the prompt's and the generated ones. A CRLF is one token: the char
    models read it as the one LF it is (``service.core.tokenizers.Encoder``, as a session's steps count it)."""
    read = len(prompt) - prompt.count("\r\n")
    return {"prompt_tokens": read, "completion_tokens": generated, "total_tokens": read + generated}


def models_list(names: list[str]) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(name) for name in names]}


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "seqserve"}
