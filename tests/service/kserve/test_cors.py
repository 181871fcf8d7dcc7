"""CORS on the REST port (``SEQSERVE_CORS_ORIGINS``), against a real server: a web page of a listed origin gets
its preflight answered and may read every answer (errors and Server-Sent Events included, with the headers a
client needs: ``X-Request-Id``, ``Retry-After``); any other page's preflight is refused saying why; with the
setting unset (the default) no answer lets a page read it, and a preflight says which setting to set."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import ValidationError

from service.settings import Settings
from tests.conftest import ServerHandle, server_settings
from tests.service.kserve.test_rest import KEY, error_of, http, infer_body

PAGE = "https://app.example.com"
INFER = "/v2/models/sentiment/infer"


def preflight(
    handle: ServerHandle, origin: str, method: str = "POST", headers: str | None = None, path: str = INFER
) -> tuple[int, dict[str, str], bytes]:
    """What a browser sends before a cross-origin POST with a JSON body or an Authorization header."""
    extra = {"Origin": origin, "Access_Control_Request_Method": method}
    if headers is not None:
        extra["Access_Control_Request_Headers"] = headers
    return http(handle, path, None, "OPTIONS", **extra)


@pytest.fixture(scope="module")
def page_server(tiny_models: Path) -> Iterator[ServerHandle]:
    handle = ServerHandle(
        server_settings(tiny_models, http_port=0, cors_origins=f"{PAGE}, HTTP://LocalHost:3000", api_key=KEY)
    )
    yield handle
    handle.close()


def test_a_listed_page_gets_its_preflight_and_reads_answers_and_errors(page_server: ServerHandle) -> None:
    # The headers of OpenAI's JavaScript SDK (its X-Stainless-* ones mean nothing here, but a preflight that left
    # them out would fail the SDK's every call).
    asked = "authorization,content-type,x-request-id,x-stainless-os,x-stainless-retry-count,openai-organization"
    status, headers, body = preflight(page_server, PAGE, headers=asked)
    assert (status, body) == (204, b"")
    assert headers["Access-Control-Allow-Origin"] == PAGE and headers["Vary"] == "Origin"
    assert headers["Access-Control-Allow-Methods"] == "GET, HEAD, POST"
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert set(asked.split(",")) <= allowed
    assert int(headers["Access-Control-Max-Age"]) > 0
    # The preflight needs no API key (a browser sends none with it); the request it announces does.
    body = infer_body(["a fine film"], [1])
    status, headers, answer = http(page_server, INFER, body, Origin=PAGE, Authorization=f"Bearer {KEY}")
    assert status == 200 and json.loads(answer)["outputs"], answer
    assert headers["Access-Control-Allow-Origin"] == PAGE and "Origin" in headers["Vary"]
    exposed = {h.strip() for h in headers["Access-Control-Expose-Headers"].split(",")}
    assert {"X-Request-Id", "Retry-After", "WWW-Authenticate"} <= exposed and headers["X-Request-Id"]
    # An error is readable too: the page can show "missing API key" instead of an opaque network failure.
    status, headers, answer = http(page_server, INFER, body, Origin=PAGE)
    assert status == 401 and headers["Access-Control-Allow-Origin"] == PAGE
    assert "authorization" in json.loads(answer)["error"].lower()
    # Origins compare as browsers write them (scheme and host in lower case), whatever case the setting used.
    status, headers, _ = http(
        page_server, "/v2/health/ready", Origin="http://localhost:3000", Authorization=f"Bearer {KEY}"
    )
    assert (status, headers["Access-Control-Allow-Origin"]) == (200, "http://localhost:3000")


def test_a_streamed_completion_and_a_compressed_answer_are_readable(page_server: ServerHandle) -> None:
    connection = HTTPConnection("127.0.0.1", page_server.server.http_port, timeout=30)
    document = json.dumps({"text_input": "ab", "max_tokens": 3}).encode()
    headers = {"Origin": PAGE, "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    connection.request("POST", "/v2/models/charlm/generate_stream", document, headers)
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type", "").startswith("text/event-stream")
    assert response.getheader("Access-Control-Allow-Origin") == PAGE
    assert response.read().count(b"data: ") == 3
    connection.close()
    status, headers, _ = http(
        page_server, "/v2/models/stats", Origin=PAGE, Authorization=f"Bearer {KEY}", Accept_Encoding="gzip"
    )
    assert (status, headers["Content-Encoding"]) == (200, "gzip")
    assert {v.strip() for v in headers["Vary"].split(",")} == {"Origin", "Accept-Encoding"}  # one header, both
    assert headers["Access-Control-Allow-Origin"] == PAGE


def test_a_preflight_keeps_the_connection_for_the_request_it_announces(page_server: ServerHandle) -> None:
    connection = HTTPConnection("127.0.0.1", page_server.server.http_port, timeout=30)
    connection.request("OPTIONS", INFER, headers={"Origin": PAGE, "Access-Control-Request-Method": "POST"})
    first = connection.getresponse()
    first.read()
    assert first.status == 204 and first.getheader("Connection") != "close"
    sock = connection.sock
    connection.request("GET", "/v2/health/live", headers={"Origin": PAGE, "Authorization": f"Bearer {KEY}"})
    second = connection.getresponse()
    second.read()
    assert second.status == 200 and connection.sock is sock  # the same connection served both
    connection.close()


@pytest.mark.parametrize(
    ("origin", "method", "headers", "status", "message"),
    [
        ("https://evil.example", "POST", None, 403, "'https://evil.example' is not in SEQSERVE_CORS_ORIGINS"),
        ("https://app.example.com:8443", "POST", None, 403, "is not in SEQSERVE_CORS_ORIGINS"),  # another port
        ("http://app.example.com", "POST", None, 403, "is not in SEQSERVE_CORS_ORIGINS"),  # another scheme
        (PAGE, "DELETE", None, 405, "method 'DELETE' is not served"),
        (PAGE, "POST", "content-type, x debug", 400, "names 'x debug', which is no header name"),
        (PAGE, "POST", ",".join(f"x-h{i}" for i in range(65)), 400, "names 65 headers; at most 64"),
        (PAGE, "POST", ",,,", 400, "Access-Control-Request-Headers ',,,' names no header"),  # was 204
    ],
)
def test_a_refused_preflight_says_why(
    page_server: ServerHandle, origin: str, method: str, headers: str | None, status: int, message: str
) -> None:
    reply = preflight(page_server, origin, method, headers)
    got, text = error_of(reply)
    assert (got, message in text) == (status, True), text
    if origin != PAGE:
        assert "Access-Control-Allow-Origin" not in reply[1]
        # Its real requests are answered (CORS is no access control) but without the header a browser needs.
        status, answer_headers, _ = http(page_server, "/v2/health/live", Origin=origin, Authorization=f"Bearer {KEY}")
        assert status == 200 and "Access-Control-Allow-Origin" not in answer_headers
        assert answer_headers["Vary"] == "Origin"
    assert http(page_server, "/v2/health/live", Authorization=f"Bearer {KEY}")[0] == 200  # and the port goes on


def test_off_by_default_a_preflight_names_the_setting(serve: Callable[..., ServerHandle]) -> None:
    handle = serve(http_port=0)
    status, text = error_of(preflight(handle, PAGE))
    assert status == 403 and "SEQSERVE_CORS_ORIGINS" in text and PAGE in text, text
    status, headers, _ = http(handle, "/v2/health/live", Origin=PAGE)
    assert status == 200 and not any(h.startswith("Access-Control") for h in headers)
    # A plain OPTIONS (no preflight) says what the port takes.
    status, headers, body = http(handle, INFER, None, "OPTIONS")
    assert (status, headers["Allow"], body) == (204, "GET, HEAD, POST, OPTIONS", b"")


def test_any_origin_with_a_star(serve: Callable[..., ServerHandle]) -> None:
    handle = serve(http_port=0, cors_origins="*")
    status, headers, _ = preflight(handle, "https://anyone.example", headers="content-type")
    assert (status, headers["Access-Control-Allow-Origin"]) == (204, "*")
    status, headers, _ = http(handle, "/v2/models/sentiment", Origin="http://localhost:5173")
    assert (status, headers["Access-Control-Allow-Origin"]) == (200, "*")
    assert "Vary" not in headers  # the answer is the same for every origin


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("https://app.example.com/", "is not an origin"),  # a path (even "/")
        ("app.example.com", "is not an origin"),  # no scheme
        ("null", "is not an origin"),
        ("*, https://app.example.com", "either '*' or a list of origins"),
    ],
)
def test_the_setting_refuses_what_is_no_origin(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match="cors_origins") as info:
        Settings(cors_origins=cast(Any, value))
    assert message in str(info.value)


def test_the_setting_reads_a_comma_separated_list() -> None:
    s = Settings(cors_origins=cast(Any, "https://App.Example.com, http://[::1]:8080,chrome-extension://abcdef"))
    assert s.cors_origins == ["https://app.example.com", "http://[::1]:8080", "chrome-extension://abcdef"]
    assert Settings().cors_origins == []
