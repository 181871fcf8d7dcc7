"""OpenAI's completions API on the REST port (``/v1/completions``, ``/v1/models``), driven by the real ``openai``
SDK against a real server: a completion is the gRPC ``Complete`` it becomes (same text for the same seed, same
session), a stream ends as the SDK expects, usage counts characters, and every option the server cannot honour is
refused as OpenAI's API refuses, in its error shape."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest

from service.client import Client
from tests.conftest import ServerHandle, server_settings
from tests.service.kserve.test_rest import http

LONG = 10**6


@pytest.fixture(scope="module")
def rest(tiny_models: Any) -> Any:
    handle = ServerHandle(server_settings(tiny_models, http_port=0, max_generate_chars=LONG))
    yield handle
    handle.close()


def sdk(handle: ServerHandle, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{handle.server.http_port}/v1", api_key=key, max_retries=0)


def grpc_text(handle: ServerHandle, prompt: str, **options: Any) -> str:
    with Client(handle.target) as c:
        return "".join(chunk.text for chunk in c.complete(prompt, **options))


def test_the_sdk_lists_and_retrieves_models(rest: ServerHandle) -> None:
    client = sdk(rest)
    assert [m.id for m in client.models.list()] == ["charlm", "forecaster", "sentiment"]
    assert client.models.retrieve("charlm").owned_by == "seqserve"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4")
    assert "'gpt-4' does not exist; served models: ['charlm', 'forecaster', 'sentiment']" in err.value.message
    # A name with its version, as completions take it (model="charlm/1"), was "does not exist".
    assert client.models.retrieve("charlm/1").id == "charlm/1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("charlm/9")


def test_a_completion_is_the_grpc_completion(rest: ServerHandle) -> None:
    want = grpc_text(rest, "To be, or ", max_chars=30, temperature=0.8, seed=3)
    got = sdk(rest).completions.create(model="charlm", prompt="To be, or ", max_tokens=30, temperature=0.8, seed=3)
    assert got.object == "text_completion" and got.model == "charlm" and got.id.startswith("cmpl-")
    assert abs(got.created - time.time()) < 60 and got.system_fingerprint == "seqserve-charlm-1"
    (choice,) = got.choices
    assert (choice.text, choice.index, choice.finish_reason, choice.logprobs) == (want, 0, "length", None)
    assert got.usage is not None  # a char LM's tokens are characters
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (10, 30, 40)
    pinned = sdk(rest).completions.create(
        model="charlm/1", prompt=["To be, or "], max_tokens=30, temperature=0.8, seed=3
    )
    assert pinned.choices[0].text == want and pinned.model == "charlm/1"
    default = sdk(rest).completions.create(model="charlm", prompt="a", temperature=0)
    assert len(default.choices[0].text) == 16  # OpenAI's default max_tokens
    greedy = sdk(rest).completions.create(model="charlm", prompt="ab", max_tokens=20, extra_body={"top_k": 1})
    assert greedy.choices[0].text == grpc_text(rest, "ab", max_chars=20, temperature=0)


def test_prompt_tokens_are_the_characters_the_model_reads(rest: ServerHandle) -> None:
    """A CRLF is one line break to a char model, which reads it as one LF: the usage counts it once, as the steps
    of a session given the same prompt do (it used to count 2)."""
    prompt = "To be,\r\nor not"
    got = sdk(rest).completions.create(model="charlm", prompt=prompt, max_tokens=4, temperature=0)
    with Client(rest.target) as c:
        session = c.create_session("charlm")
        *_, last = c.complete(prompt, session_id=session.id, max_chars=4, temperature=0)
    assert got.usage is not None and last.steps == len(prompt) - 1 + 4
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(prompt) - 1, 4)


def test_a_stop_string_ends_the_completion_and_is_left_out_of_it(rest: ServerHandle) -> None:
    """As OpenAI answers: the text stops before the stop string (the gRPC ``Complete`` includes it), streamed or
    not; a stream holds back what may still become a stop string, and says nothing it would take back."""
    sampled = {"max_chars": 30, "temperature": 0.8, "seed": 3}
    text = grpc_text(rest, "To be, or ", **sampled)
    stop = next(text[i : i + 3] for i in range(5, 28) if text.index(text[i : i + 3]) == i)  # first seen at i >= 5

    def create(stops: str | list[str], max_tokens: int = 30, stream: bool = False) -> Any:
        return sdk(rest).completions.create(
            model="charlm", prompt="To be, or ", max_tokens=max_tokens, temperature=0.8, seed=3, stop=stops,
            stream=stream,
        )  # fmt: skip

    for stops in ([stop], ["never", stop, stop[-2:]]):  # several: the text ends where the first one ended it
        full = grpc_text(rest, "To be, or ", **sampled, stop=stops)  # (gRPC: the stop string included)
        matched = max((s for s in stops if full.endswith(s)), key=len)
        before = full[: len(full) - len(matched)]
        if stops == [stop]:
            assert (full, before) == (text[: text.index(stop) + 3], text[: text.index(stop)]) and before
        got = create(stops)
        assert (got.choices[0].finish_reason, got.choices[0].text) == ("stop", before), stops
        assert got.usage.completion_tokens == len(full)  # (what was generated)
        pieces = list(create(stops, stream=True))  # an event per generated character; a stop string's never sent
        assert "".join(c.choices[0].text for c in pieces) == before and len(pieces) == len(full)
        assert [c.choices[0].finish_reason for c in pieces][-1] == "stop"
    unstopped = create("zzzz", max_tokens=8)
    assert (unstopped.choices[0].finish_reason, unstopped.choices[0].text) == ("length", text[:8])
    streamed = create("zzzz", max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:8]  # (what was held back comes at the end)
    # A character that cannot begin a stop string is sent at once: the stream held the last len(stop) - 1
    # characters whatever they were, so each event came three characters late (the first three empty).
    absent = next(c for c in "QXZqxz" if c not in text[:8])
    at_once = create(absent * 4, max_tokens=8, stream=True)
    assert [c.choices[0].text for c in at_once] == list(text[:8])


def test_a_stream_ends_as_the_sdk_expects(rest: ServerHandle) -> None:
    want = grpc_text(rest, "ROMEO:", max_chars=12, temperature=0.5, seed=9)
    stream = sdk(rest).completions.create(
        model="charlm",
        prompt="ROMEO:",
        max_tokens=12,
        temperature=0.5,
        seed=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)  # (the SDK stops at data: [DONE])
    pieces, tail = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in pieces) == want and len(pieces) == 12
    assert [c.choices[0].finish_reason for c in pieces] == [None] * 11 + ["length"]
    assert len({c.id for c in chunks}) == 1 and all(c.object == "text_completion" for c in chunks)
    assert tail.choices == [] and tail.usage is not None and tail.usage.completion_tokens == 12
    plain = list(sdk(rest).completions.create(model="charlm", prompt="ROMEO:", max_tokens=3, stream=True))
    assert len(plain) == 3 and all(c.usage is None for c in plain)


def test_raw_stream_framing(rest: ServerHandle) -> None:
    body = json.dumps({"model": "charlm", "prompt": "a", "max_tokens": 2, "stream": True}).encode()
    status, headers, raw = http(rest, "/v1/completions", body, "POST")
    assert status == 200 and headers["Content-Type"] == "text/event-stream; charset=utf-8"
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and len(events) == 4


def test_a_session_goes_on_through_completions(rest: ServerHandle) -> None:
    with Client(rest.target) as c, c.session("charlm") as s:
        sdk(rest).completions.create(model="charlm", prompt="Hello", max_tokens=4, extra_body={"session_id": s.id})
        assert c.get_session(s.id).steps == 5 + 4
        sdk(rest).completions.create(model="charlm", prompt="", max_tokens=3, extra_body={"session_id": s.id})
        assert c.get_session(s.id).steps == 12


@pytest.mark.parametrize(
    ("options", "error", "says", "param"),
    [
        ({"n": 2}, openai.BadRequestError, "n=2 is not supported by this server", "n"),
        ({"best_of": 3}, openai.BadRequestError, "best_of=3 is not supported", "best_of"),
        ({"echo": True}, openai.BadRequestError, "echo=true is not supported", "echo"),
        ({"logprobs": 2}, openai.BadRequestError, "logprobs=2 is not supported", "logprobs"),
        ({"suffix": "x"}, openai.BadRequestError, 'suffix="x" is not supported', "suffix"),
        ({"top_p": 0.9}, openai.BadRequestError, "top_p=0.9 is not supported", "top_p"),
        ({"presence_penalty": 1}, openai.BadRequestError, "presence_penalty=1 is not supported", "presence_penalty"),
        ({"logit_bias": {"5": 1}}, openai.BadRequestError, "logit_bias=", "logit_bias"),
        ({"max_tokens": 0}, openai.BadRequestError, "max_tokens must be at least 1", "max_tokens"),
        ({"max_tokens": 2**40}, openai.BadRequestError, "max_tokens must be an integer that fits in 32", "max_tokens"),
        ({"prompt": [1, 2]}, openai.BadRequestError, "prompt must be a string", "prompt"),
        ({"prompt": ["a", "b"]}, openai.BadRequestError, "prompt must be a string", "prompt"),
        ({"model": "charlm/x"}, openai.BadRequestError, "after '/' comes a version number", "model"),
        ({"model": "charlm/7"}, openai.NotFoundError, "model 'charlm' has no version 7", None),
        ({"model": "gpt-4"}, openai.NotFoundError, "model 'gpt-4' is not in the repository", None),
        ({"model": "sentiment"}, openai.BadRequestError, "this call needs a character language model", "model"),
        (
            {"temperature": -1},
            openai.BadRequestError,
            "temperature must be a finite number between 0 and",
            "temperature",
        ),
        ({"max_tokens": 10**9}, openai.BadRequestError, "max_tokens must be between 1 and", "max_tokens"),
        ({"extra_body": {"top_k": 999}}, openai.BadRequestError, "top_k must be between 0 and", "top_k"),
        ({"extra_body": {"temprature": 1}}, openai.BadRequestError, "argument supplied: 'temprature'", "temprature"),
        ({"extra_body": {"session_id": "gone"}}, openai.NotFoundError, "is unknown, expired", None),
        ({"prompt": "a\u4e2d"}, openai.BadRequestError, "is not in the model's vocabulary", "prompt"),
    ],
)
def test_refusals_in_openais_shape(
    rest: ServerHandle, options: dict[str, Any], error: type[openai.APIError], says: str, param: str | None
) -> None:
    request: dict[str, Any] = {"model": "charlm", "prompt": "a", "max_tokens": 3, **options}
    with pytest.raises(error) as err:
        sdk(rest).completions.create(**request)
    assert says in err.value.message
    body = err.value.body
    assert (
        isinstance(body, dict)
        and body["param"] == param
        and body["type"] in ("invalid_request_error", "not_found_error")
    )


def test_raw_errors_are_openais_error_object(rest: ServerHandle, start_server: Any) -> None:
    status, _, raw = http(rest, "/v1/chat/completions", b"{}", "POST")
    assert status == 404 and json.loads(raw)["error"]["message"].startswith("no such endpoint: POST '/v1/chat/")
    status, _, raw = http(rest, "/v1/completions", b"not json", "POST")
    error = json.loads(raw)["error"]
    assert status == 400 and error["type"] == "invalid_request_error" and error["message"].startswith("the body is not")
    status, _, raw = http(rest, "/v1/completions")
    assert status == 405 and json.loads(raw)["error"]["message"] == "/v1/completions takes POST"
    keyed = start_server(http_port=0, api_key="completions-key-0123456789")
    with pytest.raises(openai.AuthenticationError) as err:
        sdk(keyed).completions.create(model="charlm", prompt="a", max_tokens=2)
    assert "wrong API key" in err.value.message
    ok = sdk(keyed, key="completions-key-0123456789").completions.create(model="charlm", prompt="a", max_tokens=2)
    assert len(ok.choices[0].text) == 2  # the SDK's Bearer key is the server's API key


def test_an_error_after_the_first_chunk_reaches_the_sdk(tiny_models: Any) -> None:
    handle = ServerHandle(server_settings(tiny_models, http_port=0, max_generate_chars=LONG))
    try:
        stream = sdk(handle).completions.create(model="charlm", prompt="x", max_tokens=LONG, stream=True)
        chunks = iter(stream)
        assert next(chunks).choices[0].text  # under way
        stopping = handle.begin_stop(0.2)  # a server that stops cancels it after its grace period
        with pytest.raises(openai.APIError):
            for _ in chunks:
                pass
        stopping.result(30)
    finally:
        handle.close()
