"""KServe v2 through our own generated stubs: typed ``contents`` (tritonclient always sends raw), uint64
sequence ids, malformed raw payloads and status codes. Same real server process as the tritonclient tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypedDict, cast

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.kserve.tensors import serialize_bytes
from service.client import Client
from tests.conftest import ServerHandle
from tests.service.kserve.procs import scrape
from tests.service.security.conftest import eventually

Input = pb.ModelInferRequest.InferInputTensor


@pytest.fixture(scope="module")
def stub(kserve_server: dict[str, int]) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{kserve_server['grpc_port']}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


class Outputs(TypedDict, total=False):
    """The outputs of the models these tests call, by name: FP32 ones as arrays, BYTES ones as lists."""

    NEXT_CHAR_PROBS: npt.NDArray[np.float32]
    COMPLETION: list[bytes]
    LABEL: list[bytes]
    PROBABILITIES: npt.NDArray[np.float32]
    FORECAST: npt.NDArray[np.float32]
    QUANTILES: npt.NDArray[np.float32]


def _outputs(r: pb.ModelInferResponse) -> Outputs:
    """Decodes raw outputs: numeric as float32 arrays in their shape, BYTES as lists."""
    out: dict[str, np.ndarray | list[bytes]] = {}
    for t, raw in zip(r.outputs, r.raw_output_contents, strict=True):
        if t.datatype == "BYTES":
            items, pos = [], 0
            while pos < len(raw):
                n = int.from_bytes(raw[pos : pos + 4], "little")
                items.append(raw[pos + 4 : pos + 4 + n])
                pos += 4 + n
            out[t.name] = items
        else:
            assert t.datatype == "FP32"
            out[t.name] = np.frombuffer(raw, dtype="<f4").reshape(tuple(t.shape))
    return cast(Outputs, out)


def _seq(request: pb.ModelInferRequest, seq_id: int, *, start: bool = False, end: bool = False) -> None:
    request.parameters["sequence_id"].uint64_param = seq_id
    request.parameters["sequence_start"].bool_param = start
    request.parameters["sequence_end"].bool_param = end


def _charlm_typed(text: str, num_chars: int | None = None) -> pb.ModelInferRequest:
    inputs = [
        Input(name="TEXT", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[text.encode()]))
    ]
    if num_chars is not None:
        inputs.append(
            Input(
                name="NUM_CHARS", datatype="INT32", shape=[1], contents=pb.InferTensorContents(int_contents=[num_chars])
            )
        )
    return pb.ModelInferRequest(model_name="charlm", inputs=inputs)


def _charlm_raw(text: str) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="charlm",
        inputs=[Input(name="TEXT", datatype="BYTES", shape=[1])],
        raw_input_contents=[serialize_bytes([text.encode()])],
    )


def _status(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=60)
    return info.value.code(), info.value.details()


def test_typed_and_raw_encodings_agree(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    typed = _outputs(stub.ModelInfer(_charlm_typed("Hello there", num_chars=5), timeout=60))
    raw = _outputs(stub.ModelInfer(_charlm_raw("Hello there"), timeout=60))
    np.testing.assert_allclose(typed["NEXT_CHAR_PROBS"], raw["NEXT_CHAR_PROBS"], atol=1e-6)
    assert len(typed["COMPLETION"][0]) == 5 and raw["COMPLETION"] == [b""]

    texts = [b"great fun", b"dull and awful"]
    sent_typed = pb.ModelInferRequest(
        model_name="sentiment",
        inputs=[Input(name="TEXT", datatype="BYTES", shape=[2], contents=pb.InferTensorContents(bytes_contents=texts))],
    )
    sent_raw = pb.ModelInferRequest(
        model_name="sentiment",
        inputs=[Input(name="TEXT", datatype="BYTES", shape=[2])],
        raw_input_contents=[serialize_bytes(texts)],
    )
    a, b = _outputs(stub.ModelInfer(sent_typed, timeout=60)), _outputs(stub.ModelInfer(sent_raw, timeout=60))
    assert a["LABEL"] == b["LABEL"]
    np.testing.assert_allclose(a["PROBABILITIES"], b["PROBABILITIES"], atol=1e-6)

    rows = np.random.default_rng(1).normal(10, 3, size=(30, 7)).astype(np.float32)
    fc_typed = pb.ModelInferRequest(
        model_name="forecaster",
        inputs=[
            Input(
                name="HISTORY",
                datatype="FP32",
                shape=[30, 7],
                contents=pb.InferTensorContents(fp32_contents=rows.ravel()),
            )
        ],
    )
    fc_raw = pb.ModelInferRequest(
        model_name="forecaster",
        inputs=[Input(name="HISTORY", datatype="FP32", shape=[30, 7])],
        raw_input_contents=[rows.tobytes()],
    )
    f1, f2 = _outputs(stub.ModelInfer(fc_typed, timeout=60)), _outputs(stub.ModelInfer(fc_raw, timeout=60))
    assert f1["FORECAST"].shape == (12, 7)
    np.testing.assert_allclose(f1["FORECAST"], f2["FORECAST"], atol=1e-6)
    np.testing.assert_allclose(f1["QUANTILES"], f2["QUANTILES"], atol=1e-6)


def test_uint64_sequence_matches_whole_text(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    whole = _outputs(stub.ModelInfer(_charlm_raw("abc def ghi"), timeout=60))["NEXT_CHAR_PROBS"]
    seq_id = 2**63 + 5  # only representable as uint64
    pieces = ["abc", " def", " ghi"]
    last = None
    for i, piece in enumerate(pieces):
        request = _charlm_typed(piece)
        _seq(request, seq_id, start=i == 0, end=i == len(pieces) - 1)
        last = _outputs(stub.ModelInfer(request, timeout=60))["NEXT_CHAR_PROBS"]
    assert last is not None
    np.testing.assert_allclose(last, whole, atol=1e-5)
    after = _charlm_typed("x")
    _seq(after, seq_id)
    code, details = _status(stub, after)
    assert code == grpc.StatusCode.NOT_FOUND and str(seq_id) in details and "sequence_start" in details


@pytest.mark.parametrize(
    ("request_", "code", "needle"),
    [
        (pb.ModelInferRequest(model_name="nope", inputs=[Input(name="TEXT", datatype="BYTES", shape=[1])]),
         grpc.StatusCode.NOT_FOUND, "nope"),
        (pb.ModelInferRequest(model_name="charlm", model_version="x"), grpc.StatusCode.INVALID_ARGUMENT, "version"),
        (pb.ModelInferRequest(model_name="charlm", model_version="9"), grpc.StatusCode.NOT_FOUND, "charlm"),
        # typed contents whose length does not match the shape
        (pb.ModelInferRequest(model_name="sentiment", inputs=[Input(name="TEXT", datatype="BYTES", shape=[3],
         contents=pb.InferTensorContents(bytes_contents=[b"a"]))]), grpc.StatusCode.INVALID_ARGUMENT, "TEXT"),
        # raw BYTES with a length prefix that overruns the buffer
        (pb.ModelInferRequest(model_name="charlm", inputs=[Input(name="TEXT", datatype="BYTES", shape=[1])],
         raw_input_contents=[b"\xff\x00\x00\x00ab"]), grpc.StatusCode.INVALID_ARGUMENT, "TEXT"),
        # raw FP32 of the wrong byte length
        (pb.ModelInferRequest(model_name="forecaster", inputs=[Input(name="HISTORY", datatype="FP32", shape=[2, 7])],
         raw_input_contents=[b"\x00" * 12]), grpc.StatusCode.INVALID_ARGUMENT, "HISTORY"),
        # fewer raw entries than inputs
        (pb.ModelInferRequest(model_name="charlm", inputs=[Input(name="TEXT", datatype="BYTES", shape=[1]),
         Input(name="NUM_CHARS", datatype="INT32", shape=[1])], raw_input_contents=[serialize_bytes([b"a"])]),
         grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents"),
        # invalid UTF-8
        (pb.ModelInferRequest(model_name="charlm", inputs=[Input(name="TEXT", datatype="BYTES", shape=[1])],
         raw_input_contents=[serialize_bytes([b"\xff\xfe"])]), grpc.StatusCode.INVALID_ARGUMENT, "UTF-8"),
        # NaN history
        (pb.ModelInferRequest(model_name="forecaster", inputs=[Input(name="HISTORY", datatype="FP32", shape=[1, 7],
         contents=pb.InferTensorContents(fp32_contents=[float("nan")] * 7))]), grpc.StatusCode.INVALID_ARGUMENT,
         "HISTORY"),
        # typed contents beside raw contents (Triton refuses this too)
        (pb.ModelInferRequest(model_name="forecaster", inputs=[Input(name="HISTORY", datatype="FP32", shape=[24, 7],
         contents=pb.InferTensorContents(fp32_contents=[0.0] * 168))],
         raw_input_contents=[np.ones((24, 7), "<f4").tobytes()]), grpc.StatusCode.INVALID_ARGUMENT, "must not be set"),
        # finite values no forecast survives (their z-scores overflow float32 in the graph)
        (pb.ModelInferRequest(model_name="forecaster", inputs=[Input(name="HISTORY", datatype="FP32", shape=[24, 7])],
         raw_input_contents=[(np.resize([3e38, -3e38], (24, 7))).astype("<f4").tobytes()]),
         grpc.StatusCode.INVALID_ARGUMENT, "standard deviations"),
        # an output named twice
        (pb.ModelInferRequest(model_name="charlm", inputs=[Input(name="TEXT", datatype="BYTES", shape=[1])],
         raw_input_contents=[serialize_bytes([b"a"])], outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(
             name="NEXT_CHAR_PROBS")] * 2), grpc.StatusCode.INVALID_ARGUMENT, "twice"),
        # Triton's classification extension (tritonclient's class_count): a count that is no int64 >= 1, or a
        # BYTES output to rank
        *[(pb.ModelInferRequest(model_name="sentiment", inputs=[Input(name="TEXT", datatype="BYTES", shape=[1])],
           raw_input_contents=[serialize_bytes([b"good"])], outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(
               name=name, parameters={"classification": param})]), grpc.StatusCode.INVALID_ARGUMENT, needle)
          for name, param, needle in [
              ("PROBABILITIES", pb.InferParameter(int64_param=0), "must be an integer >= 1 (how many classes to "
               "return, tritonclient's class_count), got an int64 (0)"),
              ("PROBABILITIES", pb.InferParameter(int64_param=-2), "got an int64 (-2)"),
              ("PROBABILITIES", pb.InferParameter(bool_param=True), "integer >= 1 (how many classes to return, "
               "tritonclient's class_count), got a bool (true)"),
              ("PROBABILITIES", pb.InferParameter(string_param="2"), "got a string ('2')"),
              ("PROBABILITIES", pb.InferParameter(double_param=2.0), "got a double (2.0)"),
              ("LABEL", pb.InferParameter(int64_param=1), "holds BYTES: the classification extension (parameter "
               "classification, tritonclient's class_count) ranks numeric outputs only; request it without "
               "classification")]],
    ],
)  # fmt: skip
def test_bad_requests(
    stub: pb_grpc.GRPCInferenceServiceStub, request_: pb.ModelInferRequest, code: grpc.StatusCode, needle: str
) -> None:
    got, details = _status(stub, request_)
    assert got == code, details
    assert needle in details


def test_a_class_count_may_come_as_uint64(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """The classification count is an integer: int64 (tritonclient, a REST client's JSON number) or uint64."""
    answers = []
    for param in (pb.InferParameter(int64_param=2), pb.InferParameter(uint64_param=2)):
        request = pb.ModelInferRequest(model_name="sentiment", raw_input_contents=[serialize_bytes([b"good"])])
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
        request.outputs.add(name="PROBABILITIES", parameters={"classification": param})
        out = stub.ModelInfer(request, timeout=60).outputs[0]
        answers.append((out.datatype, list(out.shape)))
    assert answers == [("BYTES", [1, 2])] * 2


def test_bad_sequence_parameters(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = _charlm_typed("a")
    request.parameters["sequence_start"].bool_param = True  # start without an id
    code, details = _status(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sequence_id" in details
    request = _charlm_typed("a")
    request.parameters["sequence_id"].double_param = 1.5
    code, details = _status(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sequence_id" in details


def _stream_requests(metrics_port: int) -> dict[tuple[str, str], float]:
    """seqserve_rpc_stream_requests_total of ModelStreamInfer as the server exposes it: (model, code) -> count."""
    samples = scrape(metrics_port).get("seqserve_rpc_stream_requests_total", {})
    return {
        (labels["model"], labels["code"]): value
        for labels, value in ((dict(k), v) for k, v in samples.items())
        if labels["method"] == "ModelStreamInfer"
    }


def test_each_request_of_a_stream_is_counted_by_its_outcome(
    stub: pb_grpc.GRPCInferenceServiceStub, kserve_server: dict[str, int]
) -> None:
    """A stream is one RPC, counted OK in seqserve_rpc_requests_total however many of its requests were refused
    inline: an error-rate alert never saw them. Each request now counts by its own status, summed across
    frontends."""
    before = _stream_requests(kserve_server["metrics_port"])
    bad_input = _charlm_raw("hi")
    bad_input.inputs[0].datatype = "FP32"
    unknown = _charlm_raw("hi")
    unknown.model_name = "no-such-model"
    requests = [_charlm_raw("a"), bad_input, _charlm_raw("b"), unknown, _charlm_raw("c")]
    responses = list(stub.ModelStreamInfer(iter(requests), timeout=60))
    assert [r.infer_response.parameters["seqserve_error_code"].string_param for r in responses] == [
        "", "INVALID_ARGUMENT", "", "NOT_FOUND", ""
    ]  # fmt: skip
    after = _stream_requests(kserve_server["metrics_port"])
    added = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    assert added == {("charlm", "OK"): 3, ("charlm", "INVALID_ARGUMENT"): 1, ("_other", "NOT_FOUND"): 1}


def test_stream_reports_errors_inline(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """An error is one response of the stream, which goes on. Every response, error or not, carries Triton's
    triton_final_response=true (each request has one response), and an error echoes the request's whole id."""
    long_id = "bad-" + "x" * 300
    bad = pb.ModelInferRequest(model_name="charlm", id=long_id, inputs=[Input(name="TEXT", datatype="FP32",
                               shape=[1])], raw_input_contents=[b"\x00" * 4])  # fmt: skip
    good = _charlm_raw("hi")
    good.id = "good"
    responses = list(stub.ModelStreamInfer(iter([bad, good]), timeout=60))
    assert [r.infer_response.id for r in responses] == [long_id, "good"]
    assert "TEXT" in responses[0].error_message and "BYTES" in responses[0].error_message
    assert responses[1].error_message == "" and len(responses[1].infer_response.outputs) == 3
    assert all(r.infer_response.parameters["triton_final_response"].bool_param for r in responses)
    # The status a unary call would have got, machine-readable (the stream's own status stays OK).
    assert responses[0].infer_response.parameters["seqserve_error_code"].string_param == "INVALID_ARGUMENT"
    assert "seqserve_error_code" not in responses[1].infer_response.parameters


def test_statistics_for_one_model(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    before = stub.ModelStatistics(pb.ModelStatisticsRequest(name="forecaster"), timeout=60).model_stats[0]
    rows = np.zeros((30, 7), dtype=np.float32)
    request = pb.ModelInferRequest(
        model_name="forecaster", inputs=[Input(name="HISTORY", datatype="FP32", shape=[30, 7])],
        raw_input_contents=[rows.tobytes()],
    )  # fmt: skip
    stub.ModelInfer(request, timeout=60)
    (after,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="forecaster", version="1"), timeout=60).model_stats
    assert after.name == "forecaster" and after.version == "1"
    assert after.execution_count - before.execution_count == 1
    assert after.inference_count - before.inference_count == 1
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelStatistics(pb.ModelStatisticsRequest(name="nope"), timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_generation_counts_once_in_queue_and_compute(
    stub: pb_grpc.GRPCInferenceServiceStub, kserve_server: dict[str, int]
) -> None:
    """A request with NUM_CHARS=20 runs the model 20 times; it was counted 20 times in queue and compute, so
    perf_analyzer (duration / count) showed one run's time and called the rest "overhead". Now once, with all
    its runs' time, as Triton counts a request."""

    def stats() -> pb.ModelStatistics:
        request = pb.ModelStatisticsRequest(name="charlm", version="1")
        response: pb.ModelStatisticsResponse = stub.ModelStatistics(request, timeout=60)
        (one,) = response.model_stats
        return one

    def generated() -> float:  # (KServe completions were not counted in it: our API's calls were)
        import urllib.request

        url = f"http://127.0.0.1:{kserve_server['metrics_port']}/metrics"
        text = urllib.request.urlopen(url, timeout=30).read().decode()
        line = 'seqserve_generated_chars_total{model="charlm"} '
        return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))

    before, chars = stats(), generated()
    for i in range(3):  # three texts: the same one again would take its prompt from the prefix cache (19 runs)
        request = _charlm_raw(f"Counting runs {i}")
        request.model_version = "1"
        request.inputs.append(Input(name="NUM_CHARS", datatype="INT32", shape=[1]))
        request.raw_input_contents.append(np.array([20], dtype=np.int32).tobytes())
        stub.ModelInfer(request, timeout=60)
    after = stats()
    assert generated() - chars == 3 * 20
    counts = {
        name: getattr(after.inference_stats, name).count - getattr(before.inference_stats, name).count
        for name in ("success", "queue", "compute_input", "compute_infer", "compute_output")
    }
    assert counts == dict.fromkeys(counts, 3)
    assert after.execution_count - before.execution_count == 3 * 20  # every run is still an execution
    infer_ns = after.inference_stats.compute_infer.ns - before.inference_stats.compute_infer.ns
    success_ns = after.inference_stats.success.ns - before.inference_stats.success.ns
    assert 0 < infer_ns < success_ns  # its runs' time: part of the request's, never more
    # A request that ran and then failed (here: cancelled mid-generation) counts in fail alone, as Triton's: its
    # runs are executions (batch_stats), not queue or compute time of a request (which once made compute_infer
    # larger than the requests' own time).
    with Client(f"127.0.0.1:{kserve_server['grpc_port']}") as c:
        for _ in range(2):
            for i, _chunk in enumerate(c.complete("To be", model="charlm", version=1, max_chars=2000, seed=1)):
                if i == 300:
                    break
    # The engine records a cancelled request when its task ends, a moment after the client has left.
    assert eventually(lambda: stats().inference_stats.fail.count - after.inference_stats.fail.count >= 2)
    final = stats()
    for name in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(final.inference_stats, name) == getattr(after.inference_stats, name), name
    assert final.inference_stats.fail.count - after.inference_stats.fail.count == 2
    assert final.execution_count - after.execution_count >= 2 * 300


def test_concurrent_requests_of_one_sequence_are_serialized(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """Eight requests of one sequence in flight at once, each appending "ab": whatever order they run in, the
    sequence must have consumed all of them (no lost update): its step count and state match the whole text."""
    start = _charlm_raw("ab")
    _seq(start, 515, start=True)
    stub.ModelInfer(start, timeout=60)
    futures = []
    for _ in range(8):
        request = _charlm_raw("ab")
        _seq(request, 515)
        futures.append(stub.ModelInfer.future(request, timeout=60))
    for f in futures:
        f.result()
    last = _charlm_raw("ab")
    _seq(last, 515, end=True)
    response = stub.ModelInfer(last, timeout=60)
    assert response.parameters["seqserve_steps"].int64_param == 20  # 10 requests x 2 characters, none lost
    whole = _outputs(stub.ModelInfer(_charlm_raw("ab" * 10), timeout=60))["NEXT_CHAR_PROBS"]
    np.testing.assert_allclose(_outputs(response)["NEXT_CHAR_PROBS"], whole, atol=1e-5)


def test_sequence_stays_on_its_model_version(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """Started on charlm version 1, a sequence continues on version 1 although 2 is newest."""
    v1_whole = _charlm_raw("one two")
    v1_whole.model_version = "1"
    expected = _outputs(stub.ModelInfer(v1_whole, timeout=60))["NEXT_CHAR_PROBS"]
    newest = _outputs(stub.ModelInfer(_charlm_raw("one two"), timeout=60))["NEXT_CHAR_PROBS"]
    assert float(np.max(np.abs(newest - expected))) > 1e-4  # the versions really differ
    start = _charlm_raw("one")
    start.model_version = "1"
    _seq(start, 616, start=True)
    stub.ModelInfer(start, timeout=60)
    step = _charlm_raw(" two")  # no version named
    _seq(step, 616)
    response = stub.ModelInfer(step, timeout=60)
    assert response.model_version == "1"
    np.testing.assert_allclose(_outputs(response)["NEXT_CHAR_PROBS"], expected, atol=1e-5)
    wrong = _charlm_raw("x")
    wrong.model_version = "2"
    _seq(wrong, 616, end=True)
    code, details = _status(stub, wrong)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "version 1" in details
    more = _charlm_raw("!")  # the refused request's sequence_end ended nothing
    _seq(more, 616, end=True)
    assert stub.ModelInfer(more, timeout=60).parameters["seqserve_steps"].int64_param == 8


def _steps(stub: pb_grpc.GRPCInferenceServiceStub, text: str, seq_id: int, **flags: bool) -> int:
    request = _charlm_raw(text)
    _seq(request, seq_id, **flags)
    return int(stub.ModelInfer(request, timeout=60).parameters["seqserve_steps"].int64_param)


def test_a_refused_start_changes_nothing(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """A start whose text the model cannot read is refused before anything is stored: a running sequence with
    that id keeps its state, and a new id stays unknown."""
    assert _steps(stub, "To be, ", 717, start=True) == 7
    refused = _charlm_raw("\u4e2d")  # outside the char LM's vocabulary, and nothing in it stands for it
    _seq(refused, 717, start=True)
    code, details = _status(stub, refused)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "TEXT" in details
    step = _charlm_raw("or")
    _seq(step, 717, end=True)
    response = stub.ModelInfer(step, timeout=60)
    assert response.parameters["seqserve_steps"].int64_param == 9  # 7 + 2: the old state went on
    whole = _outputs(stub.ModelInfer(_charlm_raw("To be, or"), timeout=60))["NEXT_CHAR_PROBS"]
    np.testing.assert_allclose(_outputs(response)["NEXT_CHAR_PROBS"], whole, atol=1e-5)
    _seq(refused, 718, start=True)
    assert _status(stub, refused)[0] == grpc.StatusCode.INVALID_ARGUMENT
    after = _charlm_raw("x")
    _seq(after, 718)
    code, details = _status(stub, after)
    assert code == grpc.StatusCode.NOT_FOUND and "must specify the START flag on the first request" in details


def test_concurrent_starts_on_one_id_each_begin_fresh(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """Starts are atomic: four in flight on one id each answer from the initial state (never one on top of
    another), and the sequence then holds one of them."""
    for _ in range(5):
        futures = []
        for _ in range(4):
            request = _charlm_raw("abc" * 20)
            _seq(request, 719, start=True)
            futures.append(stub.ModelInfer.future(request, timeout=60))
        assert [int(f.result().parameters["seqserve_steps"].int64_param) for f in futures] == [60] * 4
        assert _steps(stub, "d", 719) == 61


def test_a_start_with_end_answers_and_ends_the_running_sequence(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert _steps(stub, "abcd", 720, start=True) == 4
    assert _steps(stub, "xy", 720, start=True, end=True) == 2  # a fresh one-request sequence
    gone = _charlm_raw("z")
    _seq(gone, 720)
    assert _status(stub, gone)[0] == grpc.StatusCode.NOT_FOUND


def test_model_config_says_which_models_reuse_prefixes(
    stub: pb_grpc.GRPCInferenceServiceStub, kserve_server: dict[str, int]
) -> None:
    """Parameter ``prefix_cache``: true for the char LM (calls without a sequence reuse the prefix cache), false for
    models that have none; never Triton's ``response_cache`` (perf_analyzer would take it for a cache of whole
    responses and print a cache breakdown for sequences, which never use it). Its lookups go to Prometheus, not to
    Triton's ``cache_hit`` / ``cache_miss``, which belong to that response cache (perf_analyzer flags them as
    inconsistent otherwise): a repeated stateless text is one hit there, and none in ModelStatistics."""
    config = {
        name: stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=60).config for name in ("charlm", "sentiment")
    }
    assert config["charlm"].parameters["prefix_cache"].string_value == "true"
    assert config["sentiment"].parameters["prefix_cache"].string_value == "false"
    assert all("response_cache" not in {f.name for f, _ in c.ListFields()} for c in config.values())

    def hits() -> tuple[float, float]:
        samples = scrape(kserve_server["metrics_port"]).get("seqserve_prefix_cache_lookups_total", {})
        found = {dict(k)["result"]: v for k, v in samples.items() if dict(k)["model"] == "charlm"}
        return found.get("hit", 0.0), found.get("miss", 0.0) + found.get("partial", 0.0)

    def triton_cache() -> list[int]:
        (one,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="charlm", version="2"), timeout=60).model_stats
        s = one.inference_stats
        return [s.cache_hit.count, s.cache_hit.ns, s.cache_miss.count, s.cache_miss.ns]

    before = hits()
    request = _charlm_raw("A text sent twice, with no sequence")
    first, second = stub.ModelInfer(request, timeout=60), stub.ModelInfer(request, timeout=60)
    assert first.raw_output_contents == second.raw_output_contents  # the same bytes from the cache
    after = hits()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
    # A sequence that starts with that text starts from the kept state (one more hit), with the same answer.
    start = _charlm_raw("A text sent twice, with no sequence")
    _seq(start, 91_001, start=True, end=True)
    assert stub.ModelInfer(start, timeout=60).raw_output_contents == first.raw_output_contents
    assert hits()[0] - after[0] == 1
    assert triton_cache() == [0, 0, 0, 0]


def test_a_forecasters_config_names_its_columns(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """KServe's HISTORY rows carry no names: ModelConfig says which column each value is (``columns``) and which
    the forecast holds (``targets``), as JSON lists; other models say nothing of the kind."""
    import json

    config = stub.ModelConfig(pb.ModelConfigRequest(name="forecaster"), timeout=60).config
    names = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    assert json.loads(config.parameters["columns"].string_value) == names
    assert json.loads(config.parameters["targets"].string_value) == names
    assert config.input[0].dims == [-1, len(names)]
    other = stub.ModelConfig(pb.ModelConfigRequest(name="charlm"), timeout=60).config
    assert "columns" not in other.parameters and "targets" not in other.parameters


def test_a_forecaster_takes_history_columns_by_name(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """Optional input COLUMNS names HISTORY's columns: rows in another order of the model's columns give the
    model's-order forecast; a name the model lacks is INVALID_ARGUMENT naming the missing column."""
    names = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    rows = np.random.default_rng(4).normal(10, 3, size=(30, 7)).astype(np.float32)
    order = [6, 4, 2, 0, 1, 3, 5]

    def request(table: np.ndarray, cols: list[str] | None) -> pb.ModelInferRequest:
        r = pb.ModelInferRequest(model_name="forecaster")
        r.inputs.add(name="HISTORY", datatype="FP32", shape=list(table.shape))
        r.raw_input_contents.append(table.tobytes())
        if cols is not None:
            r.inputs.add(name="COLUMNS", datatype="BYTES", shape=[len(cols)])
            r.raw_input_contents.append(serialize_bytes([c.encode() for c in cols]))
        return r

    want = _outputs(stub.ModelInfer(request(rows, None), timeout=60))
    shuffled = np.ascontiguousarray(rows[:, order])
    got = _outputs(stub.ModelInfer(request(shuffled, [names[i] for i in order]), timeout=60))
    np.testing.assert_array_equal(got["FORECAST"], want["FORECAST"])
    np.testing.assert_array_equal(got["QUANTILES"], want["QUANTILES"])
    # Refusals name the input as the KServe request did (input COLUMNS), not as the Forecast API's field.
    named = [names[i] for i in order]
    for cols, message in [
        ([*named[:-1], "humidity"], "input COLUMNS lacks 'LULL': model forecaster/"),
        ([*named[:-1], named[0]], f"input COLUMNS names '{named[0]}' more than once"),
    ]:
        code, details = _status(stub, request(shuffled, cols))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details


def test_the_response_cache_answers_a_repeated_request_and_triton_counts_it(
    serve: Callable[..., ServerHandle],
) -> None:
    """RESPONSE_CACHE_BYTES on: ModelConfig says ``response_cache { enable: true }`` for the deterministic models
    only, a repeated sentiment request gets the same bytes without a model run, and ModelStatistics counts one
    cache_miss and one cache_hit (what perf_analyzer reads when the config enables the cache)."""
    handle = serve(response_cache_bytes=1 << 20)
    with grpc.insecure_channel(handle.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        enabled = {
            name: stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=60).config.response_cache.enable
            for name in ("sentiment", "forecaster", "charlm")
        }
        assert enabled == {"sentiment": True, "forecaster": True, "charlm": False}
        request = pb.ModelInferRequest(
            model_name="sentiment",
            inputs=[Input(name="TEXT", datatype="BYTES", shape=[2])],
            raw_input_contents=[serialize_bytes([b"good film", b"bad"])],
        )
        first, second = stub.ModelInfer(request, timeout=60), stub.ModelInfer(request, timeout=60)
        assert first.raw_output_contents == second.raw_output_contents
        (s,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="sentiment"), timeout=60).model_stats
        i = s.inference_stats
        assert (i.cache_hit.count, i.cache_miss.count, i.success.count, s.execution_count) == (1, 1, 2, 1)
        assert (i.queue.count, i.compute_infer.count) == (2, 1)  # Triton's: queue for all, compute for runs
        assert i.cache_hit.ns > 0 and s.inference_count == 2  # the model's two texts, once
