"""Every caller mistake gets its status code and a message naming the field and the limit; each error carries
a google.rpc.ErrorInfo reason and the request id (also echoed when the caller sends one)."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from service.api.gen.seqserve.v1 import common_pb2, sentiment_pb2, sentiment_pb2_grpc
from service.client import ApiError, Client, SuggestEvent
from service.errors import session_ref
from tests.conftest import ServerHandle, server_settings

Code = grpc.StatusCode


def fails(code: grpc.StatusCode, *words: str, from_server: bool = True) -> Callable[[Callable[[], Any]], ApiError]:
    """Runs the call, asserts it fails with ``code`` and a message containing every word; returns the error.
    ``from_server``: the status came from our server (not the client library), so it has a request id."""

    def run(call: Callable[[], Any]) -> ApiError:
        with pytest.raises(ApiError) as info:
            result = call()
            if hasattr(result, "__next__"):
                list(result)  # streaming calls fail while iterating
        err = info.value
        assert err.code == code, f"{err.code}: {err.message}"
        for w in words:
            assert w in err.message, f"{w!r} not in {err.message!r}"
        if from_server:
            assert err.request_id, "every server error carries the request id"
        return err

    return run


def test_unknown_model(client: Client) -> None:
    err = fails(Code.NOT_FOUND, "nosuch")(lambda: client.classify(["good"], model="nosuch"))
    assert err.reason == "MODEL_NOT_FOUND"


def test_unknown_version(client: Client) -> None:
    fails(Code.NOT_FOUND, "sentiment", "7")(lambda: client.classify(["good"], version=7))


def test_model_of_the_wrong_task(client: Client) -> None:
    fails(Code.INVALID_ARGUMENT, "charlm", "sentiment")(lambda: client.classify(["good"], model="charlm"))


def test_unknown_session(client: Client) -> None:
    err = fails(Code.NOT_FOUND, session_ref("nope"))(lambda: client.get_session("nope"))
    assert err.reason == "SESSION_NOT_FOUND"
    fails(Code.NOT_FOUND)(lambda: client.suggest_once("nope", "abc"))
    fails(Code.NOT_FOUND)(lambda: client.delete_session("nope"))


def test_empty_session_id_names_the_field(client: Client) -> None:
    fails(Code.INVALID_ARGUMENT, "session_id")(lambda: client.get_session(""))


def test_session_of_the_wrong_task(client: Client) -> None:
    with client.session("charlm") as s:
        err = fails(Code.FAILED_PRECONDITION, session_ref(s.id), "forecast")(
            lambda: client.observe(s.id, np.ones((3, 7)))
        )
    assert err.reason == "FAILED_PRECONDITION"


def test_stateless_model_has_no_sessions(client: Client) -> None:
    fails(Code.FAILED_PRECONDITION, "sentiment")(lambda: client.create_session("sentiment"))


def test_session_needs_a_model_name(client: Client) -> None:
    fails(Code.INVALID_ARGUMENT, "model.name")(lambda: client.create_session(""))


def test_empty_inputs(client: Client) -> None:
    fails(Code.INVALID_ARGUMENT, "texts", "256")(lambda: client.classify([]))
    fails(Code.INVALID_ARGUMENT, "texts[0]")(lambda: client.classify(["   "]))
    fails(Code.INVALID_ARGUMENT, "history", "empty")(lambda: client.forecast(np.zeros((0, 7))))


def test_oversized_inputs(client: Client) -> None:
    fails(Code.INVALID_ARGUMENT, "texts", "256")(lambda: client.classify(["good"] * 257))
    fails(Code.INVALID_ARGUMENT, "4096")(lambda: client.classify(["good " * 1000]))
    fails(Code.INVALID_ARGUMENT, "max_chars", "2000")(lambda: client.complete("a", max_chars=2001))
    fails(Code.INVALID_ARGUMENT, "history", "10000")(lambda: client.forecast(np.ones((10001, 7))))
    with client.session("charlm") as s:
        fails(Code.INVALID_ARGUMENT, "n", "10")(lambda: client.suggest_once(s.id, "a", n=11))


def test_non_finite_inputs(client: Client) -> None:
    rows = np.ones((24, 7), dtype=np.float32)
    rows[5, 2] = math.nan
    fails(Code.INVALID_ARGUMENT, "history[5][2]", "finite")(lambda: client.forecast(rows))
    fails(Code.INVALID_ARGUMENT, "temperature")(lambda: client.complete("a", temperature=math.inf))


def test_wrong_shapes(client: Client) -> None:
    fails(Code.INVALID_ARGUMENT, "history", "7")(lambda: client.forecast(np.ones((24, 5))))
    ragged = [[1.0] * 7, [1.0] * 6]
    fails(Code.INVALID_ARGUMENT, "history[1]", "6 values")(lambda: client.forecast(ragged))


def test_client_deadline_exceeded(client: Client) -> None:
    # A long completion with a deadline far shorter than generating 2000 characters takes.
    with client.session("charlm") as s:
        call = lambda: client.complete("a", session_id=s.id, max_chars=2000, timeout=0.05)  # noqa: E731
        fails(Code.DEADLINE_EXCEEDED, from_server=False)(call)
        # The server stopped generating: the session is no longer locked by the abandoned call.
        assert client.suggest_once(s.id, "b").steps < 2000
    client.classify(["the server is still fine"])


def test_rich_status_details_and_request_id_through_raw_stub(server: ServerHandle) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = sentiment_pb2_grpc.SentimentStub(channel)
        request = sentiment_pb2.ClassifyRequest(model=common_pb2.ModelSelector(name="nosuch"), texts=["good"])
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(request, metadata=(("x-request-id", "req-123"),))
    err: Any = info.value
    assert err.code() == Code.NOT_FOUND
    assert dict(err.trailing_metadata())["x-request-id"] == "req-123"
    status = rpc_status.from_call(err)
    assert status is not None and status.message == err.details()
    detail = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(detail)
    assert (detail.reason, detail.domain, detail.metadata["request_id"]) == ("MODEL_NOT_FOUND", "seqserve", "req-123")


def test_successful_call_returns_request_id(server: ServerHandle) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = sentiment_pb2_grpc.SentimentStub(channel)
        _, call = stub.Classify.with_call(sentiment_pb2.ClassifyRequest(texts=["good"]))
    assert len(dict(call.trailing_metadata())["x-request-id"]) == 32


def test_store_full_with_reject_policy(start_server: Callable[..., ServerHandle]) -> None:
    handle = start_server(max_sessions=2, session_full_policy="reject")
    with Client(handle.target) as c:
        c.create_session("charlm")
        c.create_session("charlm")
        err = fails(Code.RESOURCE_EXHAUSTED, "full")(lambda: c.create_session("charlm"))
        assert err.reason == "OVERLOADED"


def test_auth_missing_wrong_and_right(start_server: Callable[..., ServerHandle]) -> None:
    handle = start_server(api_key="s3cret-0123456789ab")
    with Client(handle.target) as anonymous:
        err = fails(Code.UNAUTHENTICATED, "authorization", "Bearer")(lambda: anonymous.classify(["good"]))
        assert err.reason == "UNAUTHENTICATED"
        fails(Code.UNAUTHENTICATED, "authorization")(lambda: anonymous.complete("a", max_chars=3))
    with Client(handle.target, api_key="wrong") as wrong:
        fails(Code.UNAUTHENTICATED, "wrong API key")(lambda: wrong.create_session("charlm"))
    with Client(handle.target, api_key="s3cret-0123456789ab") as right:
        assert right.classify(["good"])[0].label in ("negative", "positive")
        with right.session("charlm") as s:
            assert list(right.suggest(s.id, ["ab", "c"]))[-1].steps == 3


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda c: c.classify("a fine film"), TypeError, "texts is a list of texts, got one string: pass [text]"),
        (lambda c: c.classify(["good", None]), TypeError, "texts[1] must be a str, got NoneType"),
        (
            lambda c: c.forecast(np.zeros(96, np.float32)),
            ValueError,
            "history must be a 2-D table (time, features), got an array of shape (96,)",
        ),
        (
            lambda c: c.forecast(np.zeros((1, 96, 7), np.float32)),
            ValueError,
            "history must be a 2-D table (time, features), got an array of shape (1, 96, 7)",
        ),
        (lambda c: c.forecast([1.0, 2.0]), TypeError, "history[0] must be a row of numbers"),
        # protobuf's float32 made it inf, and the server said "history[0][0] (column 'HUFL') is inf"
        (
            lambda c: c.forecast(np.full((96, 7), 1e300)),
            ValueError,
            "history[0][0] is 1e+300, beyond float32's range (about ±3.4e38), which the API carries; scale the series",
        ),
        (lambda c: c.observe("s", [[1.0, 2.0], [3.0, -4e38]]), ValueError, "rows[1][1] is -4e+38, beyond float32's"),
        (lambda c: c.observe("s", [[1.0, "x"]]), TypeError, "rows must hold numbers only: could not convert"),
        (lambda c: c.observe("s", iter([[1.0], 2.0])), TypeError, "rows[1] must be a row of numbers"),
        # bytes that are not UTF-8 raised protobuf's UnicodeDecodeError, naming no text
        (
            lambda c: c.classify(["good", b"\xff\xfe bad"]),
            ValueError,
            "texts[1] is not valid UTF-8 text (invalid start byte at byte 0): decode it with the encoding",
        ),
        (
            lambda c: c.classify(["bad \udce9 x"]),
            ValueError,
            "texts[0] is not valid UTF-8 text (surrogates not allowed at character 4)",
        ),
        # a prompt or stop string with a lone surrogate raised protobuf's bare UnicodeEncodeError
        (
            lambda c: c.complete("ROMEO:\ud800"),
            ValueError,
            "prompt is not valid UTF-8 text (surrogates not allowed at character 6)",
        ),
        (
            lambda c: c.complete("ROMEO:", stop=["\n", "x\udce9"]),
            ValueError,
            "stop[1] is not valid UTF-8 text (surrogates not allowed at character 1)",
        ),
        # df.columns (pandas) or numpy's array raised "truth value ... is ambiguous"; a str was split in characters
        (
            lambda c: c.forecast(np.zeros((96, 2), np.float32), columns="HUFL,OT"),
            TypeError,
            "columns is a list of names, got one string: pass [name] or the header's list",
        ),
        (lambda c: c.observe("s", np.zeros((1, 2)), columns=[1, 2]), TypeError, "columns[0] must be a str"),
    ],
)
def test_client_library_names_a_caller_mistake_before_sending(
    call: Callable[[Client], Any], error: type[Exception], message: str
) -> None:
    """Before: a str was sent as one text per character ("texts[1] is empty" for its first blank), a 1-D array
    failed inside protobuf ("must assign iterable"), a 3-D one with "must be real number, not list". Nothing is
    sent (the target has no server)."""
    with Client("127.0.0.1:1", timeout=1.0) as client, pytest.raises(error) as info:
        call(client)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("method", "words"),
    [
        (
            "/inference.GRPCInferenceService/ModelGenerate",
            ["no method '/inference.GRPCInferenceService/ModelGenerate' on this server", "reflection"],
        ),
        ("/seqserve.v1.Sentiment/Clasify", ["no method '/seqserve.v1.Sentiment/Clasify' on this server", "reflection"]),
    ],
)
def test_a_method_no_service_has_says_what_to_do_instead(
    start_server: Callable[..., ServerHandle], method: str, words: list[str]
) -> None:
    """grpc's own answer is UNIMPLEMENTED 'Method not found!'; ours names the method and where to find the ones
    there are. Whatever the call's shape, with or without credentials (nothing is served), and the server keeps
    serving."""
    handle = start_server(api_key="s3cret-0123456789ab")
    with grpc.insecure_channel(handle.target) as channel:
        unary = channel.unary_unary(method)
        streaming = channel.stream_stream(method)
        for call in (lambda: unary(b"\x08\x01", timeout=10), lambda: list(streaming(iter([b"", b""]), timeout=10))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == Code.UNIMPLEMENTED
            for w in words:
                assert w in info.value.details()
            assert re.fullmatch(r"[0-9a-f]{32}", dict(info.value.trailing_metadata())["x-request-id"])
        with pytest.raises(grpc.RpcError) as info:  # the caller's own id comes back, as for any other call
            unary(b"", timeout=10, metadata=(("x-request-id", "trace-42"),))
        assert dict(info.value.trailing_metadata())["x-request-id"] == "trace-42"
    with Client(handle.target, api_key="s3cret-0123456789ab") as client:
        assert client.classify(["good"])[0].label in ("negative", "positive")


def test_client_library_sends_rows_given_as_an_iterator(client: Client) -> None:
    """The row check reads an iterator once and sends what it read: the server sees the rows (and says a row of
    one feature is too narrow), not an empty history."""
    fails(Code.INVALID_ARGUMENT, "history has 1 features per row")(
        lambda: client.forecast(iter([[1.0], [2.0]]), model="forecaster")
    )


def test_the_callers_own_mistake_in_a_suggest_stream_reaches_the_caller_as_itself(client: Client) -> None:
    """Suggest's events are turned into messages on grpc's request thread: a bad event, or an events iterator
    that raised, came back as ApiError(UNKNOWN, "Exception iterating requests!"), the cause lost; as Complete's do,
    they now raise the caller's own exception."""
    sid = client.create_session("charlm").id
    with pytest.raises(ValueError, match="out of range"):
        client.suggest_once(sid, "to", n=2**40)
    with pytest.raises(ValueError, match=r"appended is not valid UTF-8 text \(invalid start byte at byte 0\)"):
        list(client.suggest(sid, [SuggestEvent(b"\xff")]))  # type: ignore[arg-type]

    def events() -> Iterator[str]:
        yield "to be"
        raise KeyError("the caller's own bug")

    answers = client.suggest(sid, events())
    with pytest.raises(KeyError, match="the caller's own bug"):
        list(answers)
    assert client.suggest_once(sid, ", or").steps >= 4  # the session and the client still work


def test_an_api_error_pickles_and_copies(client: Client) -> None:
    """A failed call in a worker process reaches its pool as the ApiError (unpicklable, it broke the pool)."""
    import copy
    import pickle

    with pytest.raises(ApiError) as info:
        client.classify(["a fine film"], model="nosuch")
    retryable = ApiError(Code.RESOURCE_EXHAUSTED, "queue full", "OVERLOADED", "r1", retry_after=0.1)
    for error in (info.value, retryable):
        for again in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
            assert isinstance(again, ApiError) and str(again) == str(error)
            assert (again.code, again.message, again.reason, again.request_id, again.retry_after) == (
                error.code, error.message, error.reason, error.request_id, error.retry_after,
            )  # fmt: skip


def test_suggest_once_is_counted_ok_by_the_server(server: ServerHandle, client: Client) -> None:
    """suggest_once took the first answer and dropped its stream, which cancelled the call: every one was counted
    CANCELLED in seqserve_rpc_requests_total. It reads its stream to the end now."""
    import re
    import urllib.request

    def counted(code: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        pattern = rf'seqserve_rpc_requests_total\{{code="{code}",method="Suggest",[^}}]*\}} ([0-9.e+]+)'
        return sum(float(v) for v in re.findall(pattern, text))

    sid = client.create_session("charlm").id
    ok, cancelled = counted("OK"), counted("CANCELLED")
    for piece in ("To", " be", ", or"):
        client.suggest_once(sid, piece)
    assert counted("OK") - ok == 3 and counted("CANCELLED") == cancelled


def test_an_api_key_no_header_can_carry_is_refused_by_name() -> None:
    """A non-ASCII key or one with a control character failed every call with INTERNAL "Invalid metadata" (a
    status the docs reserve for server bugs) and named nothing. Surrounding spaces and the newline a key file ends
    in are stripped, as the server strips what it receives."""
    for key in ("clé-0123456789abcdef", "key-0123\t456789abcdef"):
        with pytest.raises(ValueError, match="api_key: a key is printable ASCII"):
            Client("127.0.0.1:1", api_key=key)
    for key in ("key-0123456789abcdef\n", " key-0123456789abcdef "):
        with Client("127.0.0.1:1", api_key=key) as c:
            assert c._metadata == (("authorization", "Bearer key-0123456789abcdef"),)


def test_a_long_lived_client_is_back_soon_after_the_server_restarts(tiny_models: Path) -> None:
    """With grpc's reconnect defaults (1 s growing to 120 s between attempts, subchannels shared per process) a
    Client kept failing UNAVAILABLE for up to ~20 s after the server was back on its address, and a new Client in
    the same process failed too (it shared the old one's backoff). Now a Client waits at most 2 s between
    attempts and has its own connection."""
    first = ServerHandle(server_settings(tiny_models))
    port = first.port
    with Client(first.target, timeout=5) as c:
        assert c.classify(["fine"])[0].label
        first.close()
        away = time.monotonic()
        while time.monotonic() - away < 6:  # a service keeps calling while its backend restarts
            with pytest.raises(ApiError) as info:
                c.classify(["fine"])
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            time.sleep(0.1)
        second = ServerHandle(server_settings(tiny_models, port=port))
        try:
            back = time.monotonic()
            with Client(second.target, timeout=5) as fresh:
                assert fresh.classify(["fine"])[0].label  # at once, whatever the other Client's backoff
            while True:
                try:
                    assert c.classify(["fine"])[0].label
                    break
                except ApiError as err:
                    assert err.code == grpc.StatusCode.UNAVAILABLE
                    assert time.monotonic() - back < 4, "the long-lived client did not reconnect within 4 s"
                    time.sleep(0.05)
        finally:
            second.close()


def test_reconnect_backoff_is_checked() -> None:
    for bad in ((0.0, 1.0), (2.0, 1.0), (1.0, float("nan")), (1.0, 7200.0)):
        with pytest.raises(ValueError, match="reconnect_backoff"):
            Client("127.0.0.1:1", reconnect_backoff=bad)
    with Client("127.0.0.1:1", reconnect_backoff=(0.5, 10)) as c:
        assert c.target == "127.0.0.1:1"


def test_a_request_the_model_cannot_run_is_internal_and_the_server_goes_on(
    tiny_models: Path, tmp_path: Path, serve: Callable[..., ServerHandle]
) -> None:
    """ONNX Runtime failing on one request (a word the graph's embedding lacks: its manifest's vocabulary is one
    word longer) is the server's fault, not the caller's: INTERNAL with a request id and nothing of the runtime's
    message, batched requests unaffected (tests/service/core/test_batching.py), later calls answered."""
    repo = tmp_path / "models"
    shutil.copytree(tiny_models, repo)
    path = repo / "sentiment" / "1" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["tokenizer"]["vocab"].append("zzzunseen")
    path.write_text(json.dumps(manifest))
    with Client(serve(models=repo).target, timeout=30) as c:
        err = fails(Code.INTERNAL, "internal error (request id")(lambda: c.classify(["zzzunseen film"]))
        assert "onnxruntime" not in err.message.lower() and err.reason == "INTERNAL"
        assert c.classify(["good film"])[0].label in {"positive", "negative"}


def test_a_principal_is_named_as_the_settings_spell_it() -> None:
    """An mTLS subject with an escaped comma: the refusal said 'CN=ev,O=acme\\\\, inc' (repr's doubled backslash),
    which does not match when copied into SEQSERVE_ADMIN_PRINCIPALS; the one that does has one backslash."""
    import contextvars

    from service.core.context import check_admin, set_principal
    from service.errors import PermissionDenied

    subject = "CN=ev,O=acme\\, inc"

    def refused() -> str:
        set_principal(subject)
        with pytest.raises(PermissionDenied) as info:
            check_admin(["CN=admin"], "unload models")
        check_admin([subject], "unload models")  # the spelling the message shows is the one that works
        return str(info.value)

    message = contextvars.copy_context().run(refused)
    assert message.startswith("principal 'CN=ev,O=acme\\, inc' may not unload models; list it in admin_principals")
