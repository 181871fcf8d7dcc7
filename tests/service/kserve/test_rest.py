"""KServe v2 REST (``SEQSERVE_HTTP_PORT``): the stock ``tritonclient.http`` and raw HTTP against a real server.
A REST call answers what the same gRPC call answers (it is that call, forwarded over loopback), a sequence may
mix the two, and every bad request gets an HTTP status and ``{"error": ...}`` saying what to fix."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.kserve.tensors import serialize_bytes
from service.api.rest import message_json, route_of
from service.settings import Settings
from tests.conftest import ServerHandle

TEXTS = ["a fine , moving film", "dull and far too long"]
KEY = "rest-key-0123456789abcdef"


@pytest.fixture(scope="module")
def rest(tiny_models: Any) -> Any:
    from tests.conftest import server_settings

    handle = ServerHandle(server_settings(tiny_models, http_port=0, max_message_bytes=256 * 1024))
    yield handle
    handle.close()


@pytest.fixture(scope="module")
def keyed(tiny_models: Any) -> Any:
    from tests.conftest import server_settings

    handle = ServerHandle(server_settings(tiny_models, http_port=0, api_key=KEY))
    yield handle
    handle.close()


def url(handle: ServerHandle) -> str:
    return f"127.0.0.1:{handle.server.http_port}"


def http(
    handle: ServerHandle, path: str, body: bytes | None = None, method: str | None = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one raw request."""
    request = urllib.request.Request(f"http://{url(handle)}{path}", data=body, method=method)
    for key, value in headers.items():
        request.add_header(key.replace("_", "-"), value)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def error_of(reply: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
    status, headers, body = reply
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(body)["error"]


def grpc_stub(handle: ServerHandle) -> Any:
    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(handle.target))


def text_input(values: list[str], binary: bool = True) -> triton.InferInput:
    t = triton.InferInput("TEXT", [len(values)], "BYTES")
    t.set_data_from_numpy(np.array([v.encode() for v in values], dtype=object), binary_data=binary)
    return t


def grpc_sentiment(handle: ServerHandle, texts: list[str]) -> np.ndarray:
    request = pb.ModelInferRequest(model_name="sentiment")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts)])
    request.raw_input_contents.append(serialize_bytes([t.encode() for t in texts]))
    response = grpc_stub(handle).ModelInfer(request, timeout=30)
    index = [o.name for o in response.outputs].index("PROBABILITIES")
    return np.frombuffer(response.raw_output_contents[index], dtype="<f4").reshape(len(texts), 2)


# --- tritonclient.http ------------------------------------------------------------------------------------------


def test_tritonclient_http_reads_health_metadata_config_and_statistics(rest: ServerHandle) -> None:
    c = triton.InferenceServerClient(url(rest))
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("sentiment") and not c.is_model_ready("no-such-model")
    meta = c.get_server_metadata()
    assert meta["name"] == "seqserve"
    assert {"sequence", "logging", "statistics", "binary_tensor_data"} <= set(meta["extensions"])
    grpc_meta = grpc_stub(rest).ModelMetadata(pb.ModelMetadataRequest(name="forecaster"), timeout=30)
    assert c.get_model_metadata("forecaster") == {
        "name": "forecaster",
        "versions": list(grpc_meta.versions),
        "platform": "onnxruntime_onnx",
        "inputs": [  # numbers, not protobuf's strings
            {"name": "HISTORY", "datatype": "FP32", "shape": [-1, 7]},
            {"name": "COLUMNS", "datatype": "BYTES", "shape": [7]},
        ],
        "outputs": [
            {"name": "FORECAST", "datatype": "FP32", "shape": [12, 7]},
            {"name": "QUANTILES", "datatype": "FP32", "shape": [3, 12, 7]},
        ],
    }
    config = c.get_model_config("charlm")
    assert config["name"] == "charlm" and config["max_batch_size"] == 0  # zeros are written, as Triton does
    assert {i["name"] for i in config["input"]} == {"TEXT", "NUM_CHARS", "BACKSPACE"}
    assert config["sequence_batching"]["max_sequence_idle_microseconds"] > 0
    c.infer("sentiment", [text_input(TEXTS)])
    stats = c.get_inference_statistics("sentiment")["model_stats"]
    assert stats[0]["name"] == "sentiment" and stats[0]["inference_stats"]["success"]["count"] >= 1
    assert isinstance(stats[0]["inference_stats"]["success"]["ns"], int)
    index = c.get_model_repository_index()
    assert {"name": "charlm", "version": "1", "state": "READY", "reason": ""} in index
    with pytest.raises(InferenceServerException) as info:
        c.get_model_metadata("no-such-model")
    assert info.value.status() == "404" and "no-such-model" in info.value.message()


def test_a_load_that_fails_is_a_400_naming_the_version(
    serve: Callable[..., ServerHandle], tiny_models: Path, tmp_path: Path
) -> None:
    """POST /v2/repository/models/{m}/load through the stock tritonclient: a version whose files fail to load (a
    folder copied without its manifest's version changed) makes the load fail, as Triton's does (400 with what is
    wrong), while the model's other version serves."""
    repo = tmp_path / "models"
    shutil.copytree(tiny_models, repo)
    handle = serve(models=repo, http_port=0)
    broken = repo / "sentiment" / "2"
    shutil.copytree(repo / "sentiment" / "1", broken)
    c = triton.InferenceServerClient(url(handle))
    with pytest.raises(InferenceServerException) as info:
        c.load_model("sentiment")
    assert info.value.status() == "400"
    assert info.value.message().startswith(
        "model 'sentiment': version 2 failed to load: sentiment/2/manifest.json says sentiment/1 but lives in "
        "sentiment/2"
    )
    assert c.is_model_ready("sentiment") and c.is_model_ready("sentiment", "1")
    assert not c.is_model_ready("sentiment", "2")


def test_tritonclient_http_sees_the_response_cache(serve: Callable[..., ServerHandle]) -> None:
    """RESPONSE_CACHE_BYTES over REST, through the stock tritonclient: the config enables the cache for sentiment,
    a repeated request (JSON or binary tensors: the same request) comes back the same from it, and the statistics
    count one miss and the hits."""
    handle = serve(http_port=0, response_cache_bytes=1 << 20)
    c = triton.InferenceServerClient(url(handle))
    assert c.get_model_config("sentiment")["response_cache"] == {"enable": True}
    assert "response_cache" not in c.get_model_config("charlm")
    answers = [c.infer("sentiment", [text_input(TEXTS, binary)]).as_numpy("PROBABILITIES") for binary in (True, False)]
    np.testing.assert_array_equal(answers[0], answers[1])
    (stats,) = c.get_inference_statistics("sentiment", "1")["model_stats"]
    s = stats["inference_stats"]
    assert (s["cache_miss"]["count"], s["cache_hit"]["count"], s["success"]["count"]) == (1, 1, 2)
    assert s["compute_infer"]["count"] == 1 and stats["execution_count"] >= 1


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_http_infer_answers_what_grpc_answers(rest: ServerHandle, binary: bool) -> None:
    """Binary tensors (tritonclient's default) and JSON tensors, in and out."""
    c = triton.InferenceServerClient(url(rest))
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("LABEL", "PROBABILITIES")]
    result = c.infer("sentiment", [text_input(TEXTS, binary)], outputs=outputs, request_id="r-1")
    np.testing.assert_array_equal(result.as_numpy("PROBABILITIES"), grpc_sentiment(rest, TEXTS))
    labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("LABEL")]
    assert set(labels) <= {"positive", "negative"} and len(labels) == 2
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_name"] == "sentiment"
    sent = [o.get("parameters", {}).get("binary_data_size") is not None for o in response["outputs"]]
    assert sent == [binary, binary]


def test_nested_data_that_follows_its_shape_answers_as_flat_data(rest: ServerHandle) -> None:
    rows = np.random.default_rng(0).normal(size=(24, 7)).astype(np.float32)
    answers = []
    for data in (rows.tolist(), rows.ravel().tolist()):
        status, _, body = http(rest, "/v2/models/forecaster/infer", infer_body(data, [24, 7], "FP32", "HISTORY"))
        assert status == 200, body
        answers.append(json.loads(body)["outputs"])
    assert answers[0] == answers[1]


def test_tritonclient_http_classification_and_forecast(rest: ServerHandle) -> None:
    c = triton.InferenceServerClient(url(rest))
    ranked = c.infer(
        "sentiment", [text_input(TEXTS)], outputs=[triton.InferRequestedOutput("PROBABILITIES", class_count=1)]
    ).as_numpy("PROBABILITIES")
    assert ranked.shape == (2, 1) and ranked[0, 0].decode().split(":")[2] in ("positive", "negative")
    history = triton.InferInput("HISTORY", [24, 7], "FP32")
    rows = np.sin(np.arange(24 * 7, dtype=np.float32)).reshape(24, 7)
    history.set_data_from_numpy(rows)
    rest_forecast = c.infer("forecaster", [history]).as_numpy("FORECAST")
    request = pb.ModelInferRequest(model_name="forecaster")
    request.inputs.add(name="HISTORY", datatype="FP32", shape=[24, 7])
    request.raw_input_contents.append(rows.tobytes())
    response = grpc_stub(rest).ModelInfer(request, timeout=30)
    assert rest_forecast.shape == (12, 7)
    np.testing.assert_array_equal(rest_forecast, np.frombuffer(response.raw_output_contents[0], "<f4").reshape(12, 7))


def test_a_sequence_may_alternate_rest_and_grpc_requests(rest: ServerHandle) -> None:
    """One sequence stepped alternately through REST and gRPC gives what a gRPC-only sequence gives."""
    c = triton.InferenceServerClient(url(rest))
    stub = grpc_stub(rest)
    pieces = ["To be", ", or", " not", " to be"]

    def grpc_step(piece: str, seq: str, i: int) -> np.ndarray:
        r = pb.ModelInferRequest(model_name="charlm")
        r.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
        r.raw_input_contents.append(serialize_bytes([piece.encode()]))
        r.parameters["sequence_id"].string_param = seq
        r.parameters["sequence_start"].bool_param = i == 0
        r.parameters["sequence_end"].bool_param = i == len(pieces) - 1
        return np.frombuffer(stub.ModelInfer(r, timeout=30).raw_output_contents[0], dtype="<f4")

    def rest_step(piece: str, seq: str, i: int) -> np.ndarray:
        t = triton.InferInput("TEXT", [1], "BYTES")
        t.set_data_from_numpy(np.array([piece.encode()], dtype=object))
        result = c.infer("charlm", [t], sequence_id=seq, sequence_start=i == 0, sequence_end=i == len(pieces) - 1)
        assert result.get_response()["parameters"]["seqserve_steps"] == len("".join(pieces[: i + 1]))
        return np.asarray(result.as_numpy("NEXT_CHAR_PROBS"))

    mixed = [(rest_step if i % 2 == 0 else grpc_step)(p, "mixed-1", i) for i, p in enumerate(pieces)]
    alone = [grpc_step(p, "alone-1", i) for i, p in enumerate(pieces)]
    for a, b in zip(mixed, alone, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    t = triton.InferInput("TEXT", [1], "BYTES")
    t.set_data_from_numpy(np.array([b"x"], dtype=object))
    with pytest.raises(InferenceServerException) as info:  # ended through REST: gone for gRPC and REST alike
        c.infer("charlm", [t], sequence_id="mixed-1")
    assert info.value.status() == "404"


def test_log_settings_and_repository_calls(rest: ServerHandle, log_state: Callable[..., Any]) -> None:
    log_state("INFO")
    c = triton.InferenceServerClient(url(rest))
    assert c.get_log_settings()["log_format"] == "text"
    assert c.update_log_settings({"log_verbose_level": 1})["log_verbose_level"] == 1
    with pytest.raises(InferenceServerException) as info:
        c.update_log_settings({"log_info": "yes"})
    assert info.value.status() == "400" and "log_info" in info.value.message()
    assert c.update_log_settings({"log_verbose_level": 0})["log_verbose_level"] == 0
    c.unload_model("forecaster")
    assert not c.is_model_ready("forecaster")
    c.load_model("forecaster")
    assert c.is_model_ready("forecaster")
    with pytest.raises(InferenceServerException) as info:
        c.load_model("no-such-model")
    assert info.value.status() == "404"


# --- raw HTTP: what each bad request gets ----------------------------------------------------------------------


def infer_body(data: object, shape: Sequence[object], datatype: str = "BYTES", name: str = "TEXT") -> bytes:
    return json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}).encode()


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/models/sentiment/infer", b"{not json", 400, "the body is not JSON"),
        # A member named twice: Python kept the last, Triton the first (a proxy could read the request otherwise).
        ("/v2/models/sentiment/infer", b'{"inputs": [], "inputs": [1]}', 400, "an object names 'inputs' twice"),
        (  # found in one pass: a scan of the names before each member took 40,000 of them 9 s of CPU
            "/v2/models/sentiment/infer",
            b"{" + b",".join(b'"k%d": 0' % i for i in range(15_000)) + b', "k14999": 1}',
            400,
            "an object names 'k14999' twice",
        ),
        ("/v2/models/forecaster/infer", b'{"x": ' + b"1" * 5000 + b"}", 400, "a number has more than 4,300 digits"),
        ("/v2/models/sentiment/infer", b"[]", 400, "the inference request must be a JSON object, got an array"),
        (  # binary output flags are JSON booleans, as Triton reads them: "yes" was read as false, unsaid
            "/v2/models/sentiment/infer",
            b'{"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["fine"]}], '
            b'"parameters": {"binary_data_output": "yes"}}',
            400,
            "the request: parameter binary_data_output must be true or false, got a string",
        ),
        (
            "/v2/models/sentiment/infer",
            b'{"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["fine"]}], '
            b'"outputs": [{"name": "PROBABILITIES", "parameters": {"binary_data": "true"}}]}',
            400,
            "output 'PROBABILITIES': parameter binary_data must be true or false, got a string",
        ),
        ("/v2/models/sentiment/infer", b"{}", 400, "inputs must be a non-empty array"),
        ("/v2/models/sentiment/infer", b"[" * 100_000 + b"]" * 100_000, 400, "nest too deeply"),
        ("/v2/models/forecaster/infer", infer_body([10**400], [1], "FP32", "HISTORY"), 400, "outside FP32's range"),
        (  # a JSON number within float64's range but past float32's is refused, not read as inf
            "/v2/models/forecaster/infer",
            infer_body([1.0] * 13 + [1e39], [2, 7], "FP32", "HISTORY"),
            400,
            "input 'HISTORY': a value is outside FP32's range -3.4028235e+38..3.4028235e+38",
        ),
        (
            "/v2/models/sentiment/infer",
            infer_body(["a", "b"], [3]),
            400,
            "input 'TEXT': data has 2 elements, its shape holds 3",
        ),
        ("/v2/models/sentiment/infer", infer_body([1, 2], [2]), 400, "input 'TEXT': BYTES data are JSON strings"),
        # Nested data that does not nest as its shape: the element count alone let these through, answered from
        # values in the wrong places (a table sent column by column; rows of 6 and 8 values).
        (
            "/v2/models/forecaster/infer",
            infer_body([[0.5] * 4] * 7, [4, 7], "FP32", "HISTORY"),
            400,
            "input 'HISTORY': nested data must follow its shape [4, 7] (row-major): a list at depth 1 holds 7 items "
            "where dimension 0 is 4; or send the values flat",
        ),
        (
            "/v2/models/forecaster/infer",
            infer_body([[0.5] * 7, [0.5] * 6, [0.5] * 8], [3, 7], "FP32", "HISTORY"),
            400,
            "a list at depth 2 holds 6 items where dimension 1 is 7",
        ),
        (
            "/v2/models/forecaster/infer",
            infer_body([[0.5] * 7, [0.5] * 6 + [[0.5]]], [2, 7], "FP32", "HISTORY"),
            400,
            "a list at depth 2 mixes lists and values",
        ),
        (
            "/v2/models/forecaster/infer",
            infer_body([[[0.5]] * 7] * 2, [2, 7], "FP32", "HISTORY"),
            400,
            "it nests deeper than its 2 dimensions",
        ),
        ("/v2/models/sentiment/infer", infer_body([["a"], "b"], [2]), 400, "a list at depth 1 mixes lists and values"),
        ("/v2/models/sentiment/infer", infer_body([["a"], ["b"]], [2]), 400, "it nests deeper than its 1 dimensions"),
        (
            "/v2/models/sentiment/infer",
            infer_body(["a"], ["1"]),
            400,
            "input 'TEXT': shape must be an array of integers",
        ),
        ("/v2/models/sentiment/infer", infer_body(["a"], [-1]), 400, "has a dimension outside 0..2147483647"),
        # as the gRPC call says it (it said "data has 1 elements, its shape holds 4611686018427387904")
        ("/v2/models/sentiment/infer", infer_body(["a"], [2**62]), 400, "has a dimension outside 0..2147483647"),
        ("/v2/models/charlm/infer", infer_body([2**40], [1], "INT32", "NUM_CHARS"), 400, "outside INT32's range"),
        ("/v2/models/charlm/infer", infer_body([1.5], [1], "INT32", "NUM_CHARS"), 400, "INT32 data are JSON integers"),
        ("/v2/models/charlm/infer", infer_body([1], [1], "FP16", "NUM_CHARS"), 400, "datatype 'FP16' has no JSON form"),
        (
            "/v2/models/sentiment/infer",
            json.dumps({"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES"}]}).encode(),
            400,
            "no data",
        ),
        (
            "/v2/models/sentiment/infer",
            json.dumps(
                {
                    "inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                    "parameters": {"x": [1]},
                }
            ).encode(),
            400,
            "parameter 'x' must be a bool, a number or a string, got an array",
        ),
        (
            "/v2/models/sentiment/infer",
            infer_body(["a"], [1], "BYTES", "WRONG"),
            400,
            "WRONG",
        ),  # the server's own check
        ("/v2/models/no-such-model/infer", infer_body(["a"], [1]), 404, "no-such-model"),
        ("/v2/models/sentiment/versions/99/infer", infer_body(["a"], [1]), 404, "99"),
        ("/v2/models/sentiment/nonsense", None, 404, "no such endpoint: 'nonsense'"),
        ("/v2/nowhere", None, 404, "no such endpoint: GET '/v2/nowhere'"),
        ("/metrics", None, 404, "the KServe v2 REST API is under /v2"),
        ("/v2/models/sentiment/infer", None, 405, "infer takes POST"),
        ("/v2/logging", b'{"log_info": 7}', 400, "'log_info' takes a bool"),
        ("/v2/logging", b'{"log_info": null}', 400, "takes a bool, an unsigned 32-bit integer or a string"),
        ("/v2/repository/index", b'{"ready": 1}', 400, '{"ready": true|false}'),
    ],
)
def test_a_bad_request_gets_a_status_and_what_to_fix(
    rest: ServerHandle, path: str, body: bytes | None, status: int, message: str
) -> None:
    got, text = error_of(http(rest, path, body))
    assert (got, message in text) == (status, True), text
    assert http(rest, "/v2/health/ready")[0] == 200  # and the server goes on


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "BREW"])
def test_other_methods_get_405_in_json(rest: ServerHandle, method: str) -> None:
    status, headers, body = http(rest, "/v2/models/sentiment/infer", b"{}", method=method)
    assert (status, headers["Allow"], headers["Server"]) == (405, "GET, HEAD, POST, OPTIONS", "seqserve")
    assert json.loads(body)["error"] == (
        f"method '{method}' is not served: the KServe v2 REST API takes GET, HEAD and POST"
    )
    assert http(rest, "/v2/health/live")[0] == 200


def test_unknown_models_carry_the_request_id_the_caller_sent(rest: ServerHandle) -> None:
    status, headers, body = http(rest, "/v2/models/nope", X_Request_Id="trace-42")
    assert status == 404 and headers["X-Request-Id"] == "trace-42" and "nope" in json.loads(body)["error"]


TEXT_INPUT = '"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["a fine film"]}]'


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v2/models/sentiment/infer", '{"id": "\\ud800", ' + TEXT_INPUT + "}"),
        ("/v2/models/sentiment/infer", '{"parameters": {"x": "a\\udfffb"}, ' + TEXT_INPUT + "}"),
        (
            "/v2/models/sentiment/infer",
            '{"inputs": [{"name": "\\ud800", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}',
        ),
        (
            "/v2/models/sentiment/infer",
            '{"inputs": [{"name": "TEXT", "shape": [1], "datatype": "\\uDABC", "data": ["a"]}]}',
        ),
        (
            "/v2/models/sentiment/infer",
            '{"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["\\ud800"]}]}',
        ),
        ("/v2/models/sentiment/infer", "{" + TEXT_INPUT + ', "outputs": [{"name": "\\ud800"}]}'),
        ("/v2/logging", '{"log_info": "\\ud800"}'),
        ("/v2/repository/models/sentiment/load", '{"parameters": {"config": "\\ud800"}}'),
        ("/v2/models/charlm/generate", '{"text_input": "a\\ud800"}'),
        ("/v2/models/charlm/generate_stream", '{"text_input": "a", "stop": ["\\udc00"]}'),
        ("/v2/models/charlm/generate", '{"text_input": "a", "session_id": "\\ud800"}'),
    ],
)
def test_a_lone_surrogate_in_any_string_is_a_400_not_a_500(rest: ServerHandle, path: str, body: str) -> None:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"), which is no text: it failed as an internal error (500,
    a traceback in the log) wherever the gateway put it into a protobuf string."""
    status, message = error_of(http(rest, path, body.encode(), "POST"))
    assert status == 400 and "a string holds the lone surrogate" in message, message


def test_escaped_text_that_is_no_lone_surrogate_still_reads(rest: ServerHandle) -> None:
    """A surrogate pair is one character, and an escaped backslash before "ud800" is no escape at all."""
    for text in ("\\ud83d\\ude00 a fine film", "a fine film \\\\ud800"):
        body = '{"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["' + text + '"]}]}'
        status, _, answer = http(rest, "/v2/models/sentiment/infer", body.encode(), "POST")
        assert status == 200, answer


def test_the_http_servers_own_refusals_are_json_too(rest: ServerHandle) -> None:
    """A request line over 64 KiB, more than 100 headers or a header line over 64 KiB are refused by the stdlib's
    HTTP parser before the gateway sees them: they came back as its HTML error page, not ``{"error": ...}``."""
    import socket

    requests = {
        414: b"GET /v2/models/" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
        431: b"GET /v2 HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(150)) + b"\r\n",
    }
    for status, raw in [*requests.items(), (431, b"GET /v2 HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")]:
        with socket.create_connection(("127.0.0.1", rest.server.http_port), timeout=10) as conn:
            conn.sendall(raw)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status) and b"Content-Type: application/json" in head, head
        assert json.loads(body)["error"].endswith("(KServe v2 REST: see docs/kserve.md)")


def test_binary_data_must_add_up(rest: ServerHandle) -> None:
    raw = serialize_bytes([b"a fine film"])
    header = {
        "inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}]
    }
    head = json.dumps(header).encode()
    ok = http(rest, "/v2/models/sentiment/infer", head + raw, Inference_Header_Content_Length=str(len(head)))
    assert ok[0] == 200 and json.loads(ok[2])["outputs"][0]["data"][0] in ("positive", "negative")
    short = http(rest, "/v2/models/sentiment/infer", head + raw[:-2], Inference_Header_Content_Length=str(len(head)))
    assert error_of(short) == (
        400,
        f"input 'TEXT': binary_data_size {len(raw)} passes the end of the binary data ({len(raw) - 2} bytes left "
        "after Inference-Header-Content-Length)",
    )
    extra = http(rest, "/v2/models/sentiment/infer", head + raw + b"xx", Inference_Header_Content_Length=str(len(head)))
    assert error_of(extra) == (400, "2 bytes of binary data after the inputs' binary_data_size")
    bad = http(rest, "/v2/models/sentiment/infer", head + raw, Inference_Header_Content_Length="99999")
    assert error_of(bad)[0] == 400 and "must be a number up to the body's" in error_of(bad)[1]
    cut = http(rest, "/v2/models/sentiment/infer", head + raw, Inference_Header_Content_Length=str(len(head) - 5))
    assert error_of(cut)[0] == 400  # a header length that cuts the JSON: said, not only "Expecting value"
    assert error_of(cut)[1].startswith(
        f"the JSON header (the body's first {len(head) - 5} bytes, Inference-Header-Content-Length) is not JSON"
    ), error_of(cut)
    torn = struct.pack("<I", 50) + b"short"
    header["inputs"][0]["parameters"] = {"binary_data_size": len(torn)}
    head = json.dumps(header).encode()
    got = http(rest, "/v2/models/sentiment/infer", head + torn, Inference_Header_Content_Length=str(len(head)))
    assert error_of(got)[0] == 400 and "declares 50 bytes" in error_of(got)[1]  # the server's check, forwarded


def test_bodies_over_the_limit_compressed_or_chunked(rest: ServerHandle) -> None:
    body = infer_body(["a fine film"], [1])
    status, _, answer = http(rest, "/v2/models/sentiment/infer", gzip.compress(body), Content_Encoding="gzip")
    assert status == 200 and json.loads(answer)["outputs"][0]["name"] == "LABEL"
    assert error_of(http(rest, "/v2/models/sentiment/infer", b"\x1f\x8bnot gzip", Content_Encoding="gzip"))[0] == 400
    assert error_of(http(rest, "/v2/models/sentiment/infer", body, Content_Encoding="br")) == (
        415,
        "Content-Encoding 'br' is not accepted: send gzip, deflate or none",
    )
    big = infer_body(["x" * 1000] * 300, [300])  # 300 KB against the 256 KiB message limit of this server
    assert error_of(http(rest, "/v2/models/sentiment/infer", big)) == (
        413,
        f"the request body has {len(big)} bytes, the limit is {256 * 1024} (SEQSERVE_MAX_MESSAGE_BYTES)",
    )
    bomb = gzip.compress(infer_body(["x" * 1000] * 1000, [1000]))  # small on the wire, 1 MB inflated
    assert error_of(http(rest, "/v2/models/sentiment/infer", bomb, Content_Encoding="gzip")) == (
        413,
        f"the request body decompresses past the limit of {256 * 1024} bytes",
    )
    chunked = urllib.request.Request(f"http://{url(rest)}/v2/models/sentiment/infer", data=iter([body]), method="POST")
    chunked.add_header("Transfer-Encoding", "chunked")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(chunked, timeout=30)
    assert info.value.code == 411 and "Content-Length" in json.loads(info.value.read())["error"]


def raw_exchange(handle: ServerHandle, request: bytes, timeout: float = 20) -> bytes:
    """What the REST port answers ``request`` on one connection, until it closes it."""
    import socket

    with socket.create_connection(("127.0.0.1", handle.server.http_port), timeout=timeout) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(
    "length",
    [b"abc", b"-5", "\u00b2".encode(), b"46\r\nContent-Length: 2", b"5, 5"],
    ids=["letters", "negative", "superscript-two", "two-values", "a-list"],
)
def test_a_content_length_that_is_not_one_number_ends_the_connection(rest: ServerHandle, length: bytes) -> None:
    """Where such a request ends is unknown, so nothing after it may be read as a next request (RFC 9112, 6.3): its
    body, a GET here, was answered as one (request smuggling behind a proxy that reads the length otherwise), and
    '\u00b2', a digit to str.isdigit(), failed as a 500."""
    smuggled = b"GET /v2/models/sentiment HTTP/1.1\r\nHost: x\r\n\r\n"
    head = b"POST /v2/models/sentiment/infer HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n"
    answer = raw_exchange(rest, head + smuggled)
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"Connection: close" in answer and b"is not one number" in answer, answer


@pytest.mark.parametrize(
    "header",
    [
        b"X-Foo : bar",
        b"X-Foo\t: bar",
        b"NoColonHere",
        b"Transfer-Encoding: identity",
        b"Transfer-Encoding: chunked, gzip",
    ],
    ids=["space-before-colon", "tab-before-colon", "no-colon", "identity-coding", "chunked-not-last"],
)
def test_a_header_line_that_is_no_header_ends_the_connection(rest: ServerHandle, header: bytes) -> None:
    """The standard library stopped reading headers at such a line, dropping the Content-Length after it: the
    request was answered as having no body (400 "not JSON") and its body, a POST /v2/logging here, was then run as a
    next request (request smuggling). A Transfer-Encoding that does not end in chunked was ignored for the
    Content-Length beside it (RFC 9112 6.1: 400, and close)."""
    smuggled = b'POST /v2/logging HTTP/1.1\r\nHost: x\r\nContent-Length: 18\r\n\r\n{"log_info":false}'
    head = b"POST /v2/models/sentiment/infer HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(smuggled)
    answer = raw_exchange(rest, head + smuggled)
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"Connection: close" in answer and (
        b"is not 'Name: value'" in answer or b"does not end in chunked" in answer
    )
    assert b'"log_info":false' not in answer


@pytest.mark.parametrize(
    ("line", "status"),
    [(b"HELLO", b"400"), (b"PRI * HTTP/2.0", b"505"), (b"GET / HTTP/x", b"400")],
    ids=["one-word", "http2-preface", "bad-version"],
)
def test_a_malformed_request_line_gets_a_status_line_and_headers(
    rest: ServerHandle, line: bytes, status: bytes
) -> None:
    """Such a request was answered as HTTP/0.9: the JSON error alone, with no status line or headers (curl: "empty
    reply from server")."""
    answer = raw_exchange(rest, line + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer
    assert b"Content-Type: application/json" in answer and b"Connection: close" in answer, answer


def test_a_repeated_content_length_of_one_value_is_one_length(rest: ServerHandle) -> None:
    body = infer_body(["a fine film"], [1])
    head = b"POST /v2/models/sentiment/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    head += b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(body), len(body))
    assert raw_exchange(rest, head + body).startswith(b"HTTP/1.1 200 ")


def test_raw_surrogate_bytes_are_no_utf8_and_get_a_400(rest: ServerHandle) -> None:
    """The UTF-8-like bytes of a surrogate (ED A0 80) passed ``json.loads`` (which decodes bytes with
    "surrogatepass") and failed as a 500 where the gateway made a protobuf string of them."""
    for path, body in [
        ("/v2/models/charlm/generate", b'{"text_input": "RO\xed\xa0\x80", "max_tokens": 3}'),
        ("/v2/models/sentiment/infer", b'{"id": "\xed\xa0\x80", ' + TEXT_INPUT.encode() + b"}"),
        ("/v1/completions", b'{"model": "charlm", "prompt": "a\xed\xb0\x80"}'),
    ]:
        status, _, answer = http(rest, path, body, "POST")
        error = json.loads(answer)["error"]
        message = error["message"] if isinstance(error, dict) else error  # (OpenAI's error object under /v1)
        at = body.index(b"\xed")
        assert (status, message) == (400, f"the body is not UTF-8 (at byte {at}); send JSON as UTF-8 text")


def test_compressed_bodies_are_read_whole(rest: ServerHandle) -> None:
    """A gzip body cut before its CRC and size, or with bytes after it, was read as if whole; one of several gzip
    members (RFC 1952, what ``cat a.gz b.gz`` makes) was refused as broken JSON."""
    body = infer_body(["a fine film"], [1])
    packed = gzip.compress(body)
    cut = error_of(http(rest, "/v2/models/sentiment/infer", packed[:-8], Content_Encoding="gzip"))
    assert cut == (400, "the gzip body ends before its compressed data does (cut short, or corrupt)")
    tail = error_of(http(rest, "/v2/models/sentiment/infer", packed + b"garbage", Content_Encoding="gzip"))
    assert tail == (400, "the gzip body has 7 bytes after its compressed data that are no gzip member"), tail
    broken = packed[:10] + b"\xff" * 20 + packed[30:]  # a second member whose data is corrupt
    second = error_of(http(rest, "/v2/models/sentiment/infer", packed + broken, Content_Encoding="gzip"))
    assert second[0] == 400 and second[1].startswith("member 2 of the gzip body is not gzip data ("), second
    junk = error_of(http(rest, "/v2/models/sentiment/infer", b"not gzip at all", Content_Encoding="gzip"))
    assert junk[0] == 400 and junk[1].startswith("the gzip body is not gzip data (incorrect header check)"), junk
    extra = error_of(http(rest, "/v2/models/sentiment/infer", zlib.compress(body) + b"x", Content_Encoding="deflate"))
    assert extra == (400, "the deflate body has 1 bytes after its compressed data")
    members = gzip.compress(body[:20]) + gzip.compress(body[20:])
    status, _, answer = http(rest, "/v2/models/sentiment/infer", members, Content_Encoding="gzip")
    assert status == 200 and json.loads(answer)["outputs"][0]["name"] == "LABEL"
    empty = gzip.compress(b"")  # 20 bytes a decompressor each: a bounded count
    many = error_of(http(rest, "/v2/models/sentiment/infer", gzip.compress(body) + empty * 16, Content_Encoding="gzip"))
    assert many == (400, "the gzip body has more than 16 members; compress it as one")


def test_a_body_that_stops_arriving_is_a_408(start_server: Callable[..., ServerHandle]) -> None:
    """It failed as a 500 (the read's TimeoutError) once the connection's idle timeout passed."""
    handle = start_server(http_port=0, http_idle_timeout_seconds=0.5)
    head = b"POST /v2/models/sentiment/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    answer = raw_exchange(handle, head + b'{"inputs"')
    assert answer.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in answer, answer
    assert b"the request body stopped arriving before its 100 bytes (Content-Length) were in" in answer


def test_a_stream_to_an_http_1_0_client_is_not_chunked(rest: ServerHandle) -> None:
    """HTTP/1.0 has no chunked coding (RFC 9112, 6.1): such a client read the chunk sizes as part of the events."""
    body = b'{"text_input": "a", "max_tokens": 3, "temperature": 0}'
    request = b"POST /v2/models/charlm/generate_stream HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body)
    head, _, events = raw_exchange(rest, request + body).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding" not in head, head
    lines = [line for line in events.split(b"\n") if line]
    assert len(lines) == 3 and all(line.startswith(b"data: {") for line in lines), events


def test_the_gateways_own_refusals_carry_a_request_id(rest: ServerHandle) -> None:
    """Its refusals before any call (a body that is no JSON, an unknown path, a wrong method) came without one."""
    status, headers, _ = http(rest, "/v2/models/sentiment/infer", b"{bad", X_Request_Id="abc-123")
    assert (status, headers["X-Request-Id"]) == (400, "abc-123")
    for path, body, method in [("/v2/nothing", None, None), ("/v2/models/sentiment/infer", b"{}", "DELETE")]:
        status, headers, _ = http(rest, path, body, method)
        assert status in (404, 405) and len(headers["X-Request-Id"]) == 32, headers


@pytest.mark.parametrize(
    ("path", "method", "allow"),
    [
        ("/v2/health/live", "POST", "GET, HEAD"),
        ("/v2/health/ready", "POST", "GET, HEAD"),
        ("/v2", "POST", "GET, HEAD"),
        ("/v2/repository/index", "GET", "POST"),
    ],
)
def test_a_wrong_method_on_a_fixed_route_is_a_405(rest: ServerHandle, path: str, method: str, allow: str) -> None:
    """These answered 404 "no such endpoint", as if the path did not exist."""
    status, headers, body = http(rest, path, b"{}" if method == "POST" else None, method)
    assert (status, headers["Allow"], json.loads(body)["error"]) == (405, allow, f"{path} takes {allow.split(',')[0]}")


def test_api_keys_quotas_and_retry_after(start_server: Callable[..., ServerHandle]) -> None:
    handle = start_server(http_port=0, api_key=KEY, quota_requests_per_second=1, quota_request_burst=1)
    body = infer_body(["a fine film"], [1])
    status, headers, answer = http(handle, "/v2/models/sentiment/infer", body)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(answer)["error"] == (  # an HTTP caller sends a header, not gRPC metadata
        "missing credentials: this server needs header 'Authorization: Bearer <api key>'"
    )
    status, _, answer = http(handle, "/v2/models/sentiment/infer", body, Authorization="Bearer wrong-0123456789abcd")
    assert json.loads(answer)["error"] == "wrong API key in header 'Authorization' (expected 'Bearer <api key>')"
    assert http(handle, "/v2/models/sentiment/infer", body, Authorization=f"Bearer {KEY}")[0] == 200
    status, headers, answer = http(handle, "/v2/models/sentiment/infer", body, Authorization=f"Bearer {KEY}")
    assert status == 429 and int(headers["Retry-After"]) == 1, answer  # the bucket's wait, rounded up
    c = triton.InferenceServerClient(url(handle))
    with pytest.raises(InferenceServerException) as info:
        c.get_model_metadata("sentiment")
    assert info.value.status() == "401"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("POST", "/v2/models/sentiment/infer", b"{}", 400, "inputs must be a non-empty array"),
        ("POST", "/v2/models/sentiment/infer", b"{not json", 400, "the body is not JSON"),
        ("GET", "/v2/nowhere", None, 404, "no such endpoint"),
        ("GET", "/v2/models/sentiment/infer", None, 405, "infer takes POST"),
        ("POST", "/v2/models/charlm/generate", b'{"text_input": "a", "temprature": 1}', 400, "unknown option"),
        ("POST", "/v1/completions", b'{"model": "charlm"}', 400, "prompt"),
        ("PUT", "/v2/models/sentiment/infer", b"{}", 405, "is not served: the KServe v2 REST API takes GET"),
    ],
)
def test_with_api_keys_the_gateways_own_refusals_answer_keyed_callers_only(
    keyed: ServerHandle, method: str, path: str, body: bytes | None, status: int, message: str
) -> None:
    """A caller without a valid key learns nothing from the gateway's own checks (which run before the call that
    checks the key): it gets the 401 the gRPC port would give, as a gRPC caller does."""
    for credentials in ({}, {"Authorization": "Bearer wrong-key-0123456789abcdef"}):
        got, headers, answer = http(keyed, path, body, method, **credentials)
        assert (got, headers["WWW-Authenticate"].startswith("Bearer")) == (401, True), answer
        assert message not in answer.decode()
    got, _, answer = http(keyed, path, body, method, Authorization=f"Bearer {KEY}")
    assert got == status and message in answer.decode(), answer


def test_two_authorization_headers_are_refused_as_over_grpc(keyed: ServerHandle) -> None:
    """docs/security.md: two authorization headers are UNAUTHENTICATED whatever they hold. Over REST the first one
    alone decided (a proxy's key put in front of the client's won); one that is not ASCII was dropped, so the other
    authenticated the call."""
    host, port = url(keyed).rsplit(":", 1)
    for first, second in ((KEY, KEY), (KEY, "wrong-key-0123456789abcdef"), ("caf\u00e9-key", KEY)):
        conn = HTTPConnection(host, int(port), timeout=30)
        conn.putrequest("GET", "/v2/models/sentiment/ready")
        for key in (first, second):
            conn.putheader("Authorization", f"Bearer {key}".encode("latin-1"))
        conn.endheaders()
        answer = conn.getresponse()
        body = answer.read().decode()
        conn.close()
        assert answer.status == 401, (first, second, body)
        if first.isascii():
            assert "header 'Authorization' appears 2 times: send one API key" in body
    assert http(keyed, "/v2/models/sentiment/ready", Authorization=f"Bearer {KEY}")[0] == 200


def test_headers_too_long_for_grpc_are_what_the_server_would_make_of_them(keyed: ServerHandle) -> None:
    """A 20,000-character X-Request-Id or traceparent, or Authorization, went on to gRPC, whose metadata limit (16 KiB)
    answered RESOURCE_EXHAUSTED: 429 Too Many Requests, which tells a client to retry what never succeeds, even on
    a health probe that needs no key. The server reads no such id or traceparent, and no key is that long."""
    long = "r" * 20_000
    for header in ("X_Request_Id", "traceparent"):
        given: dict[str, str] = {header: long}
        status, headers, _ = http(keyed, "/v2/health/live", None, None, **given)
        assert status == 200 and headers["X-Request-Id"] != long
        status, _, body = http(keyed, "/v2/models/sentiment", None, None, Authorization=f"Bearer {KEY}", **given)
        assert status == 200, body
    status, headers, body = http(keyed, "/v2/models/sentiment", Authorization="Bearer " + long)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), body
    assert http(keyed, "/v2/health/live", Authorization="Bearer " + long * 2)[0] == 200


def test_with_api_keys_liveness_and_readiness_need_no_key_as_in_triton(keyed: ServerHandle) -> None:
    """Probes written for Triton (REST /v2/health/live and /ready, KServe ServerLive and ServerReady over gRPC) need
    no key, as Triton's health endpoints need none; ModelReady and everything else still do, and the gateway's own
    refusals still answer keyed callers only (``test_with_api_keys_the_gateways_own_refusals_...``)."""
    assert http(keyed, "/v2/health/live")[:1] == http(keyed, "/v2/health/ready")[:1] == (200,)
    c = triton.InferenceServerClient(url(keyed))
    assert c.is_server_live() and c.is_server_ready()
    status, headers, answer = http(keyed, "/v2/models/sentiment/ready")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), answer
    assert http(keyed, "/v2/models/sentiment/ready", Authorization=f"Bearer {KEY}")[0] == 200
    with grpc.insecure_channel(keyed.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
        for call, request in [
            (stub.ModelReady, pb.ModelReadyRequest(name="sentiment")),
            (stub.ServerMetadata, pb.ServerMetadataRequest()),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        keyed_call = stub.ModelReady(
            pb.ModelReadyRequest(name="sentiment"), metadata=[("authorization", f"Bearer {KEY}")], timeout=30
        )
        assert keyed_call.ready


def test_a_grpc_port_that_does_not_answer_is_a_503_that_says_so() -> None:
    """The gateway's forwarded call finds nothing listening (the server is stopping, or its gRPC port is not up):
    503 with Retry-After and a sentence about the server, not gRPC's connection error."""
    import socket

    from service.api.server import start_rest

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    gateway = start_rest(Settings(host="127.0.0.1", http_port=0), closed)
    try:
        for path in ("/v2/health/ready", "/v2/models/sentiment"):
            request = urllib.request.Request(f"http://127.0.0.1:{gateway.bound_port}{path}")
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=30)
            assert (info.value.code, info.value.headers["Retry-After"]) == (503, "1")
            message = json.loads(info.value.read())["error"]
            assert message.startswith("the server behind this REST port does not answer (it is shutting down"), message
    finally:
        gateway.stop()


def test_the_rest_port_is_off_by_default(rest: ServerHandle, start_server: Callable[..., ServerHandle]) -> None:
    assert Settings().http_port is None
    handle = start_server()
    assert handle.server.http_port is None


def test_message_json_writes_every_field_with_64_bit_integers_as_numbers() -> None:
    stats = pb.ModelStatisticsResponse()
    model = stats.model_stats.add(name="m", version="1", inference_count=2**40)
    assert message_json(stats) == {
        "model_stats": [
            {
                "name": "m",
                "version": "1",
                "last_inference": 0,
                "inference_count": 2**40,
                "execution_count": 0,
                "batch_stats": [],
            }
        ]
    }
    model.inference_stats.success.count = 3
    assert message_json(model)["inference_stats"]["success"] == {"count": 3, "ns": 0}
    setting = pb.LogSettingsResponse()
    setting.settings["log_info"].bool_param = False
    assert message_json(setting) == {"settings": {"log_info": {"bool_param": False}}}


def test_answers_are_compressed_when_the_client_accepts_it(rest: ServerHandle) -> None:
    body = infer_body(["T"], [1], "BYTES")
    plain = http(rest, "/v2/models/charlm/infer", body)
    assert plain[0] == 200 and "Content-Encoding" not in plain[1] and len(plain[2]) >= 1024
    for accept, encoding, inflate in (
        ("gzip", "gzip", gzip.decompress),
        ("br, deflate;q=0.5", "deflate", zlib.decompress),
        ("identity, gzip;q=0", None, bytes),
    ):
        status, headers, answer = http(rest, "/v2/models/charlm/infer", body, Accept_Encoding=accept)
        assert (status, headers.get("Content-Encoding")) == (200, encoding)
        assert json.loads(inflate(answer)) == json.loads(plain[2])
    small = http(rest, "/v2/health/ready", Accept_Encoding="gzip")  # (short answers leave as they are)
    assert small[0] == 200 and "Content-Encoding" not in small[1]
    c = triton.InferenceServerClient(url(rest))
    t = triton.InferInput("TEXT", [1], "BYTES")
    t.set_data_from_numpy(np.array([b"T"], dtype=object))
    for algorithm in ("gzip", "deflate"):
        result = c.infer("charlm", [t], response_compression_algorithm=algorithm)
        np.testing.assert_array_equal(
            result.as_numpy("NEXT_CHAR_PROBS"), np.asarray(json.loads(plain[2])["outputs"][0]["data"], np.float32)
        )


def _exchange(handle: ServerHandle, parts: list[bytes], pause: float = 0.2) -> bytes:
    """Sends ``parts`` on one connection, ``pause`` seconds apart, then reads until the server closes."""
    import socket
    import time

    host, port = url(handle).rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for part in parts:
            sock.sendall(part)
            time.sleep(pause)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    return got


def test_a_refused_body_still_gets_its_answer(rest: ServerHandle) -> None:
    """A body the gateway refuses unread (chunked: 411; too large: 413) may still be on its way when the answer
    leaves. The gateway answers, closes its side and reads what is left before it closes (a lingering close), so
    the client reads the status instead of a reset, and the rest of the body is never taken for a next request."""
    body = infer_body(["a fine film"], [1])
    head = b"POST /v2/models/sentiment/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    chunked = _exchange(
        rest, [head + b"Transfer-Encoding: chunked\r\n\r\n", b"%x\r\n%s\r\n" % (len(body), body), b"0\r\n\r\n"]
    )
    assert chunked.startswith(b"HTTP/1.1 411 ") and chunked.count(b"HTTP/1.1 ") == 1, chunked[:300]
    assert b"Connection: close" in chunked
    big = b"x" * (300 * 1024)  # over this server's 256 KiB limit, sent after the answer left
    over = _exchange(rest, [head + b"Content-Length: %d\r\n\r\n" % len(big), big[:100_000], big[100_000:]])
    assert over.startswith(b"HTTP/1.1 413 ") and over.count(b"HTTP/1.1 ") == 1, over[:300]


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/v2", "/v2"),
        ("/v2/", "/v2"),
        ("/v2/health/ready?x=1", "/v2/health/ready"),
        ("/v2/models/sentiment", "/v2/models/{model}"),
        ("/v2/models/sentiment/versions/3/infer", "/v2/models/{model}/infer"),
        ("/v2/models/charlm/generate_stream", "/v2/models/{model}/generate_stream"),
        ("/v2/models/charlm/explode", "other"),
        ("/v2/repository/models/charlm/unload", "/v2/repository/models/{model}/unload"),
        ("/v2/trace/setting", "/v2/trace/setting"),
        ("/v2/models/charlm/trace/setting", "/v2/models/{model}/trace/setting"),
        ("/v2/models/charlm/trace/settings", "other"),
        ("/v1/completions", "/v1/completions"),
        ("/v1/models/charlm", "/v1/models/{model}"),
        ("/wp-login.php", "other"),
        ("/v2/models/" + "x" * 5000, "/v2/models/{model}"),
    ],
)
def test_the_metrics_route_label_names_no_model_and_no_stray_path(path: str, route: str) -> None:
    """seqserve_http_requests_total's route label: a few dozen values, whatever paths clients send."""
    assert route_of(path) == route
