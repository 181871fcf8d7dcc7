"""Defects 7 and 8: a client cancel is CANCELLED in the metrics, always (Complete, Suggest, ModelStreamInfer);
after a cancelled Complete the client learns exactly what the session holds (each chunk carries the session's
step count; Sessions.Get has the final one)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.seqserve.v1 import autocomplete_pb2
from service.client import Client
from tests.conftest import ServerHandle
from tests.service.security.conftest import eventually, infer_request, rpc_count, text_input

COMPLETE = ("seqserve.v1.Autocomplete", "Complete")
SUGGEST = ("seqserve.v1.Autocomplete", "Suggest")
STREAM_INFER = ("inference.GRPCInferenceService", "ModelStreamInfer")


@pytest.fixture
def handle(plain: ServerHandle) -> ServerHandle:
    return plain


def codes(handle: ServerHandle, call: tuple[str, str]) -> dict[str, float]:
    return {c: rpc_count(handle, *call, c, "charlm") for c in ("OK", "CANCELLED", "UNKNOWN", "INTERNAL")}


def test_cancelled_complete_streams_are_cancelled(handle: ServerHandle) -> None:
    before = codes(handle, COMPLETE)
    with Client(handle.target) as c:
        for i in range(10):
            with c.session("charlm") as s:
                chunks = c.complete("ab", session_id=s.id, max_chars=2000, seed=i)
                for n, _ in enumerate(chunks):
                    if n == i % 4:
                        break
                chunks.close()  # cancels the call (the client does it when the consumer stops early)
    want = {**before, "CANCELLED": before["CANCELLED"] + 10}
    assert eventually(lambda: codes(handle, COMPLETE) == want), codes(handle, COMPLETE)


class _Outbox:
    """The request side of a bidirectional stream, fed one message at a time."""

    def __init__(self) -> None:
        self._q: queue.Queue[bytes | None] = queue.Queue()

    def put(self, message: bytes) -> None:
        self._q.put(message)

    def close(self) -> None:
        self._q.put(None)

    def __iter__(self) -> Iterator[bytes]:
        while (m := self._q.get()) is not None:
            yield m


def _cancel_midway(target: str, method: str, first: bytes, slow: bytes) -> None:
    """Sends ``first``, reads its answer, sends ``slow`` and cancels while the server works on it."""
    outbox = _Outbox()
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(method)(iter(outbox), timeout=60)
        answers = iter(call)
        outbox.put(first)
        next(answers)
        outbox.put(slow)
        threading.Timer(0.05, call.cancel).start()
        with pytest.raises(grpc.RpcError):
            for _ in answers:
                pass
        outbox.close()


def _cancel_idle(target: str, method: str, first: bytes) -> None:
    """Sends ``first``, reads its answer, then cancels while the server waits for the next message."""
    outbox = _Outbox()
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(method)(iter(outbox), timeout=60)
        answers = iter(call)
        outbox.put(first)
        next(answers)
        call.cancel()
        outbox.close()


def test_cancelled_suggest_streams_are_cancelled(handle: ServerHandle) -> None:
    with Client(handle.target) as c:
        sid = c.create_session("charlm").id
    ask: Callable[[str, int], bytes] = lambda text, chars: autocomplete_pb2.SuggestRequest(  # noqa: E731
        session_id=sid, appended=text, n=10, max_chars=chars
    ).SerializeToString()
    before = codes(handle, SUGGEST)
    for _ in range(3):
        _cancel_idle(handle.target, "/seqserve.v1.Autocomplete/Suggest", ask("a", 1))
        _cancel_midway(handle.target, "/seqserve.v1.Autocomplete/Suggest", ask("b", 1), ask("c", 2000))
    want = {**before, "CANCELLED": before["CANCELLED"] + 6}
    assert eventually(lambda: codes(handle, SUGGEST) == want), codes(handle, SUGGEST)


def test_cancelled_model_stream_infer_is_cancelled(handle: ServerHandle) -> None:
    num = pb.ModelInferRequest.InferInputTensor(
        name="NUM_CHARS", datatype="INT32", shape=[1], contents=pb.InferTensorContents(int_contents=[2000])
    )
    quick = infer_request("charlm", text_input("ab")).SerializeToString()
    slow = infer_request("charlm", text_input("ab"), num).SerializeToString()
    before = codes(handle, STREAM_INFER)
    for _ in range(3):
        _cancel_idle(handle.target, "/inference.GRPCInferenceService/ModelStreamInfer", quick)
        _cancel_midway(handle.target, "/inference.GRPCInferenceService/ModelStreamInfer", quick, slow)
    want = {**before, "CANCELLED": before["CANCELLED"] + 6}
    assert eventually(lambda: codes(handle, STREAM_INFER) == want), codes(handle, STREAM_INFER)


def test_each_chunk_carries_the_sessions_step_count(handle: ServerHandle) -> None:
    with Client(handle.target) as c, c.session("charlm") as s:
        c.suggest_once(s.id, "xyz", n=1, max_chars=1)  # the session holds 3 characters already
        chunks = list(c.complete("ab", session_id=s.id, max_chars=6, seed=3))
        assert [ch.steps for ch in chunks] == [6, 7, 8, 9, 10, 11]
        assert c.get_session(s.id).steps == 11
        assert all(ch.steps == 0 for ch in c.complete("ab", max_chars=3, seed=3)), "no session, no steps"


def test_after_a_cancel_the_client_knows_exactly_what_the_session_holds(handle: ServerHandle) -> None:
    """The session holds the prompt and every chunk the server sent; the client compares its last chunk's
    ``steps`` with Sessions.Get and, with the seed, can even rebuild the characters it missed."""
    with Client(handle.target) as c:
        full = "".join(ch.text for ch in c.complete("ab", max_chars=400, seed=11))  # the same text, stateless
        with c.session("charlm") as s, c.session("charlm") as twin:
            chunks = c.complete("ab", session_id=s.id, max_chars=400, seed=11)
            seen = [next(chunks) for _ in range(5)]
            chunks.close()
            assert "".join(ch.text for ch in seen) == full[:5] and seen[-1].steps == 7
            held = c.get_session(s.id).steps  # waits for the cancelled call to let go of the session
            unseen = held - seen[-1].steps
            assert 0 <= unseen < 400
            # The session holds "ab" + the first (held - 2) generated characters, nothing else: the same state as
            # a fresh session fed exactly that text.
            expected = c.suggest_once(twin.id, "ab" + full[: held - 2], n=3, max_chars=2)
            got = c.suggest_once(s.id, "", n=3, max_chars=2)
            assert [x.text for x in got.suggestions] == [x.text for x in expected.suggestions]
            assert [x.logprob for x in got.suggestions] == pytest.approx([x.logprob for x in expected.suggestions])
            assert got.steps == expected.steps == held
