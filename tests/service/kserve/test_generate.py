"""Triton's generate extension on the REST port (``/generate``, ``/generate_stream`` as Server-Sent Events),
against a real server: a REST completion is the gRPC ``Complete`` it becomes (same text for the same seed, same
session), each piece streams as an event while it is generated, a client that leaves stops the generation, and
every bad request gets a status and ``{"error": ...}`` saying what to fix."""

from __future__ import annotations

import json
import time
from http.client import HTTPConnection, HTTPResponse
from typing import Any

import pytest

from service.client import Client
from tests.conftest import ServerHandle, server_settings
from tests.service.kserve.test_rest import error_of, http

LONG = 10**6  # characters: a generation that would run for minutes on the tiny model unless it is stopped


@pytest.fixture(scope="module")
def rest(tiny_models: Any) -> Any:
    handle = ServerHandle(server_settings(tiny_models, http_port=0, max_generate_chars=LONG))
    yield handle
    handle.close()


def post(handle: ServerHandle, path: str, document: object, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return http(handle, path, json.dumps(document).encode(), "POST", **headers)


def generate(handle: ServerHandle, document: object, model: str = "charlm") -> dict[str, Any]:
    status, headers, body = post(handle, f"/v2/models/{model}/generate", document)
    assert status == 200, body
    assert headers["Content-Type"] == "application/json"
    answer: dict[str, Any] = json.loads(body)
    return answer


def open_stream(handle: ServerHandle, document: object, **headers: str) -> HTTPResponse:
    connection = HTTPConnection("127.0.0.1", handle.server.http_port, timeout=30)
    connection.request("POST", "/v2/models/charlm/generate_stream", json.dumps(document).encode(), headers)
    return connection.getresponse()


def events(response: HTTPResponse) -> list[dict[str, Any]]:
    """Every event of a Server-Sent Events body, read to its end (each ``data:`` line, then a blank line)."""
    out, lines = [], response.read().decode().split("\n")
    assert lines[-2:] == ["", ""]  # (the body ends with an event's blank line)
    for line in lines[:-2]:
        if line:
            assert line.startswith("data: "), line
            out.append(json.loads(line.removeprefix("data: ")))
        else:
            assert out, "a blank line before any event"
    return out


def first_event(response: HTTPResponse) -> dict[str, Any]:
    line, blank = response.readline(), response.readline()
    assert line.startswith(b"data: ") and blank == b"\n", (line, blank)
    event: dict[str, Any] = json.loads(line.removeprefix(b"data: "))
    return event


def test_generate_answers_what_the_grpc_completion_answers(rest: ServerHandle) -> None:
    with Client(rest.target) as c:
        chunks = list(c.complete("To be, or ", max_chars=40, temperature=0.8, seed=7))
    assert chunks[0].model_version == 1 and all(chunk.model_version == 0 for chunk in chunks[1:])
    expected = "".join(chunk.text for chunk in chunks)
    options = {"max_tokens": 40, "temperature": 0.8, "seed": 7}
    nested = generate(rest, {"text_input": "To be, or ", "parameters": options})
    assert nested == {"model_name": "charlm", "model_version": "1", "text_output": expected, "finish_reason": "length"}
    beside = generate(rest, {"text_input": "To be, or ", **options, "stream": False})  # (as Triton passes them)
    assert beside == nested
    pinned = post(
        rest,
        "/v2/models/charlm/versions/1/generate",
        {"text_input": "To be, or ", "max_chars": 40, "seed": 7, "temperature": 0.8},
    )
    assert json.loads(pinned[2]) == nested
    assert len(expected) == 40


def test_a_stop_string_ends_the_generation(rest: ServerHandle) -> None:
    greedy = generate(rest, {"text_input": "ab", "max_tokens": 30, "temperature": 0})["text_output"]
    stop, never = greedy[3:5], next(s for s in ("@#@#", "~~~~", "}{}{") if s not in greedy)
    answer = generate(rest, {"text_input": "ab", "max_tokens": 30, "temperature": 0, "stop": [stop, never]})
    assert answer["finish_reason"] == "stop"
    assert greedy.startswith(answer["text_output"]) and answer["text_output"].endswith(stop)
    one = generate(rest, {"text_input": "ab", "parameters": {"max_tokens": 30, "temperature": 0, "stop": stop}})
    assert one == answer


def test_generate_stream_sends_each_piece_as_it_is_generated(rest: ServerHandle) -> None:
    document = {"text_input": "ROMEO:", "parameters": {"max_tokens": 25, "temperature": 0.5, "seed": 3}}
    whole = generate(rest, document)
    response = open_stream(rest, document, **{"X-Request-Id": "rest-stream-1"})
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream; charset=utf-8"
    assert (
        response.getheader("Transfer-Encoding") == "chunked" and response.getheader("X-Request-Id") == "rest-stream-1"
    )
    got = events(response)
    assert len(got) == 25  # one event per generated character
    assert all(e["model_name"] == "charlm" and e["model_version"] == "1" for e in got)
    assert "".join(e["text_output"] for e in got) == whole["text_output"]
    assert [e.get("finish_reason") for e in got] == [None] * 24 + ["length"]
    assert all("steps" not in e for e in got)  # (no session)


def test_generate_continues_a_session(rest: ServerHandle) -> None:
    with Client(rest.target) as c, c.session("charlm") as s:
        first = generate(rest, {"text_input": "Hello", "max_tokens": 10, "session_id": s.id, "seed": 1})
        assert first["steps"] == 5 + 10 == c.get_session(s.id).steps
        response = open_stream(rest, {"text_input": "", "max_tokens": 4, "session_id": s.id, "seed": 1})
        got = events(response)
        assert [e["steps"] for e in got] == [16, 17, 18, 19]  # what the session holds once each piece is in it
        assert c.get_session(s.id).steps == 19
        # the same session through gRPC goes on from there: REST and gRPC share it
        chunks = list(c.complete("", session_id=s.id, max_chars=2, seed=1))
        assert chunks[-1].steps == 21


def test_a_client_that_leaves_a_stream_stops_the_generation(rest: ServerHandle) -> None:
    with Client(rest.target) as c, c.session("charlm") as s:
        response = open_stream(rest, {"text_input": "x", "max_tokens": LONG, "session_id": s.id})
        assert response.status == 200
        assert first_event(response)["text_output"]
        response.close()  # the client goes away mid-stream
        deadline, seen = time.monotonic() + 20, -1
        while True:
            steps = c.get_session(s.id, timeout=20).steps
            if steps == seen:
                break
            assert time.monotonic() < deadline, f"the session still grows: {steps} steps"
            seen = steps
            time.sleep(0.5)
        assert 1 < steps < LONG // 10  # stopped soon after the client left, not at the end of the generation


def test_an_error_after_the_first_event_is_the_streams_last_event(tiny_models: Any) -> None:
    handle = ServerHandle(server_settings(tiny_models, http_port=0, max_generate_chars=LONG))
    try:
        response = open_stream(handle, {"text_input": "x", "max_tokens": LONG})
        assert response.status == 200
        assert "error" not in first_event(response)  # the stream is under way
        stopping = handle.begin_stop(0.2)  # a server that stops cancels it after its grace period
        got = events(response)  # (the rest, to the stream's end)
        assert "error" in got[-1] and got[-1]["error"]
        assert all("error" not in e for e in got[:-1])
        stopping.result(30)
    finally:
        handle.close()


@pytest.mark.parametrize(
    ("document", "status", "says"),
    [
        ([1], 400, "the generate request is a JSON object"),
        ({"max_tokens": 3}, 400, "text_input must be a string"),
        ({"text_input": 5}, 400, "text_input must be a string"),
        ({"text_input": "a", "parameters": [1]}, 400, "parameters must be a JSON object"),
        ({"text_input": "a", "temprature": 0.5}, 400, "unknown option 'temprature'"),
        (
            {"text_input": "a", "max_tokens": 3, "parameters": {"max_chars": 4}},
            400,
            "max_tokens is given twice (max_chars in parameters, max_tokens beside text_input); give it once",
        ),
        # the same key in both places said "max_tokens is given twice (as max_tokens too)": where were the two?
        (
            {"text_input": "a", "max_tokens": 3, "parameters": {"max_tokens": 4}},
            400,
            "max_tokens is given twice (max_tokens in parameters, max_tokens beside text_input); give it once",
        ),
        ({"text_input": "a", "max_tokens": 0}, 400, "max_tokens must be at least 1"),
        ({"text_input": "a", "max_tokens": 2**40}, 400, "max_tokens must be an integer that fits in 32 bits"),
        ({"text_input": "a", "max_tokens": "5"}, 400, "max_tokens must be an integer"),
        (
            {"text_input": "a", "seed": 1.5},
            400,
            "seed must be an integer between 0 and 9223372036854775807, got a number",
        ),
        # what the API's int64 carries: 2**63 was "must be an integer that fits in 64 bits", which it does
        (
            {"text_input": "a", "seed": 2**63},
            400,
            "seed must be an integer between 0 and 9223372036854775807, got 92233",
        ),
        ({"text_input": "a", "seed": -1}, 400, "seed must be an integer between 0 and 9223372036854775807, got -1"),
        ({"text_input": "a", "temperature": "hot"}, 400, "temperature must be a number"),
        ({"text_input": "a", "temperature": -1}, 400, "temperature must be a finite number between 0 and"),
        ({"text_input": "a", "top_k": 1000}, 400, "top_k must be between 0 and"),
        ({"text_input": "a", "stop": ["x", 1]}, 400, "stop must be a string or an array of strings"),
        ({"text_input": "a", "stream": True}, 400, "stream=true asks for /generate_stream"),
        ({"text_input": "a", "stream": "yes"}, 400, "stream must be true or false"),
        ({"text_input": "a", "session_id": 12}, 400, "session_id must be a string"),
        ({"text_input": "a", "session_id": "gone"}, 404, "is unknown, expired or was lost in a restart"),
        ({"text_input": "", "max_tokens": 3}, 400, "text_input is empty"),
        ({"text_input": "a\u4e2d"}, 400, "text_input: character '\u4e2d' is not in the model's vocabulary"),
        # the server's checks name the key the request used (the call's field is max_chars)
        ({"text_input": "a", "max_tokens": 10**9}, 400, "max_tokens must be between 1 and"),
        ({"text_input": "a", "parameters": {"max_chars": 10**9}}, 400, "max_chars must be between 1 and"),
    ],
)
def test_generate_refusals_say_what_to_fix(rest: ServerHandle, document: object, status: int, says: str) -> None:
    got_status, message = error_of(post(rest, "/v2/models/charlm/generate", document))
    assert (got_status, says in message) == (status, True), message
    if isinstance(document, dict) and document.get("stream") is not True:  # the same refusal before a stream
        response = open_stream(rest, document)
        assert response.status == status and response.getheader("Content-Type") == "application/json"
        assert says in json.loads(response.read())["error"]


def test_generate_refuses_what_is_not_a_generating_model(rest: ServerHandle) -> None:
    assert error_of(post(rest, "/v2/models/sentiment/generate", {"text_input": "a fine film"})) == (
        400,
        "model sentiment/1 is a 'sentiment' model; this call needs a character language model (task 'charlm')",
    )
    status, message = error_of(post(rest, "/v2/models/no-such-model/generate", {"text_input": "a"}))
    assert status == 404 and "no-such-model" in message
    status, message = error_of(post(rest, "/v2/models/charlm/versions/9/generate", {"text_input": "a"}))
    assert status == 404 and "has no version 9" in message
    status, message = error_of(post(rest, "/v2/models/charlm/versions/x1/generate", {"text_input": "a"}))
    assert status == 400 and "'x1' is not a version number" in message
    # Arabic-Indic one ("١", a decimal to str.isdecimal()) ran on version 1 here while the KServe routes refused it.
    status, message = error_of(post(rest, "/v2/models/charlm/versions/%D9%A1/generate", {"text_input": "a"}))
    assert status == 400 and "'\u0661' is not a version number" in message
    status, message = error_of(http(rest, "/v2/models/charlm/generate_stream"))
    assert status == 405 and message == "generate_stream takes POST"
    with Client(rest.target) as c, c.session("forecaster") as s:
        status, message = error_of(post(rest, "/v2/models/charlm/generate", {"text_input": "a", "session_id": s.id}))
    assert status == 400 and "forecaster" in message
