"""Defect 4: corrupt protobuf and invalid UTF-8 are INVALID_ARGUMENT (never UNKNOWN or INTERNAL), streams
included, and every one is counted in the RPC metrics. Defect 5 (last resort): requests larger than their
method accepts are refused before they are parsed."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.seqserve.v1 import autocomplete_pb2, sessions_pb2
from service.client import Client
from tests.conftest import ServerHandle
from tests.service.security.conftest import KSERVE, eventually, infer_request, raw_unary, rpc_count, text_input

CORRUPT = b"\n\x01\xff"  # field 1, length 1, then a byte that is not valid UTF-8 (and a truncated message)
SUGGEST = ("seqserve.v1.Autocomplete", "Suggest")
BAD_UTF8 = sessions_pb2.GetSessionRequest(session_id="x").SerializeToString().replace(b"x", b"\xff")


@pytest.fixture
def handle(plain: ServerHandle) -> ServerHandle:
    return plain


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: grpc.Call = info.value
    return err.code(), err.details() or ""


@pytest.mark.parametrize("payload", [CORRUPT, BAD_UTF8, b"\xff" * 7])
def test_corrupt_unary_request_is_invalid_argument_and_counted(handle: ServerHandle, payload: bytes) -> None:
    before = rpc_count(handle, "seqserve.v1.Sessions", "Get", "INVALID_ARGUMENT")
    code, message = code_of(lambda: raw_unary(handle.target, "/seqserve.v1.Sessions/Get", payload))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid seqserve.v1.GetSessionRequest message" in message
    assert "DecodeError" not in message and "Unexpected" not in message
    assert eventually(lambda: rpc_count(handle, "seqserve.v1.Sessions", "Get", "INVALID_ARGUMENT") == before + 1)


def test_invalid_utf8_in_a_string_field_names_utf8(handle: ServerHandle) -> None:
    code, message = code_of(lambda: raw_unary(handle.target, "/seqserve.v1.Sessions/Get", BAD_UTF8))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in message


@pytest.mark.parametrize(
    "method",
    [
        KSERVE + "ModelInfer",
        KSERVE + "ModelMetadata",
        "/seqserve.v1.Sentiment/Classify",
        "/seqserve.v1.Forecast/Predict",
        "/grpc.health.v1.Health/Check",
    ],
)
def test_every_kind_of_unary_method_decodes_inside_the_call(handle: ServerHandle, method: str) -> None:
    code, _ = code_of(lambda: raw_unary(handle.target, method, CORRUPT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def _stream(target: str, method: str, messages: list[bytes]) -> tuple[list[bytes], grpc.StatusCode, str]:
    """Sends raw messages on a bidirectional stream; returns the responses and the final status."""
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(method)(iter(messages), timeout=30)
        got: list[bytes] = []
        try:
            for response in call:
                got.append(response)
        except grpc.RpcError:
            pass
        return got, call.code(), call.details() or ""


def test_corrupt_suggest_message_ends_the_stream_with_invalid_argument(handle: ServerHandle) -> None:
    with Client(handle.target) as c:
        s = c.create_session("charlm")
    good = autocomplete_pb2.SuggestRequest(session_id=s.id, appended="ab", n=1, max_chars=1).SerializeToString()
    before = rpc_count(handle, *SUGGEST, "INVALID_ARGUMENT", "charlm")
    got, code, message = _stream(handle.target, "/seqserve.v1.Autocomplete/Suggest", [good, CORRUPT, good])
    assert len(got) == 1, "the message before the corrupt one is answered"
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "SuggestRequest" in message
    assert eventually(lambda: rpc_count(handle, *SUGGEST, "INVALID_ARGUMENT", "charlm") == before + 1)
    with Client(handle.target) as c:
        assert c.get_session(s.id).steps == 2, "the session holds what the good message sent, nothing more"


def test_corrupt_model_stream_infer_message_is_invalid_argument(handle: ServerHandle) -> None:
    good = infer_request("charlm", text_input("ab"))
    stream_infer = ("inference.GRPCInferenceService", "ModelStreamInfer", "INVALID_ARGUMENT", "charlm")
    before = rpc_count(handle, *stream_infer)
    got, code, _ = _stream(handle.target, KSERVE + "ModelStreamInfer", [good.SerializeToString(), CORRUPT])
    assert len(got) == 1 and pb.ModelStreamInferResponse.FromString(got[0]).error_message == ""
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert eventually(lambda: rpc_count(handle, *stream_infer) == before + 1)


def test_a_stream_can_be_read_while_the_client_is_still_writing(handle: ServerHandle) -> None:
    """Decoding message by message keeps a bidirectional stream interactive (one answer per message)."""
    with Client(handle.target) as c:
        s = c.create_session("charlm")
    outbox: queue.Queue[bytes | None] = queue.Queue()

    def ask(text: str) -> autocomplete_pb2.SuggestRequest:
        return autocomplete_pb2.SuggestRequest(session_id=s.id, appended=text, n=1, max_chars=1)

    def source() -> Iterator[bytes]:
        while (m := outbox.get()) is not None:
            yield m

    with grpc.insecure_channel(handle.target) as channel:
        call = channel.stream_stream("/seqserve.v1.Autocomplete/Suggest")(source(), timeout=30)
        answers = iter(call)
        for i, text in enumerate(["a", "bc", "d"]):
            outbox.put(ask(text).SerializeToString())
            steps = autocomplete_pb2.SuggestResponse.FromString(next(answers)).steps
            assert steps == [1, 3, 4][i]
        outbox.put(None)


def test_oversized_request_of_a_small_method_is_refused_before_parsing(handle: ServerHandle) -> None:
    """A 1 MiB session id (the campaign sent 15 MiB): RESOURCE_EXHAUSTED naming the limit, small trailers."""
    payload = sessions_pb2.GetSessionRequest(session_id="x" * (1 << 20)).SerializeToString()
    with grpc.insecure_channel(handle.target) as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/seqserve.v1.Sessions/Get")(payload, timeout=10)
    err: grpc.Call = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_small_message_bytes" in (err.details() or "") and "65536" in (err.details() or "")
    assert sum(len(k) + len(v) for k, v in err.trailing_metadata() or ()) < 2048


@pytest.mark.parametrize("algorithm", [grpc.Compression.Gzip, grpc.Compression.Deflate])
def test_a_compressed_request_is_limited_by_what_it_inflates_to(handle: ServerHandle, algorithm: object) -> None:
    """Requests compressed by gRPC (tritonclient's ``compression_algorithm``) a few KiB on the wire: a 1 MiB session
    id is refused by the method's own limit, naming it; one past MAX_MESSAGE_BYTES (16 MiB) by gRPC while it
    inflates. The server serves on."""
    small = sessions_pb2.GetSessionRequest(session_id="x" * (1 << 20)).SerializeToString()
    huge = sessions_pb2.GetSessionRequest(session_id="x" * (17 << 20)).SerializeToString()
    with grpc.insecure_channel(handle.target, options=[("grpc.max_send_message_length", -1)]) as channel:
        get = channel.unary_unary("/seqserve.v1.Sessions/Get")
        code, message = code_of(lambda: get(small, timeout=30, compression=algorithm))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_small_message_bytes" in message
        code, message = code_of(lambda: get(huge, timeout=30, compression=algorithm))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in message, message
        live = pb.ServerLiveResponse.FromString(
            channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=10)
        )
        assert live.live


def test_concurrent_corrupt_streams_leave_the_server_serving(handle: ServerHandle) -> None:
    codes: list[grpc.StatusCode] = []

    def one() -> None:
        codes.append(_stream(handle.target, KSERVE + "ModelStreamInfer", [CORRUPT])[1])

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 8
    with Client(handle.target) as c:
        assert c.classify(["still fine"])[0].label
