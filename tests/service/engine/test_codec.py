"""The engine link's error codec: a domain error crosses from the engine to a frontend with its status code,
message and ErrorInfo reason, a plugin's own subclass of a domain error included; anything else is INTERNAL.
Then the link's own rules, the frontend against a stand-in engine on a Unix socket (``_Engine``) and the engine's
side of a connection alone: the frontend's queue bound, control timeouts, a lost engine, CANCEL both ways, a lost
frontend, and the acknowledgement of a model change."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import msgpack
import numpy as np
import pytest

from service import errors, logs
from service.api.interceptors import error_reason, status_code_for
from service.core.context import mark_admitted, priority, set_priority
from service.core.dataplane import CoreDataPlane
from service.core.shm import Regions
from service.core.types import InferResult, ModelRef, SamplingParams, SharedRegion, Tensor
from service.engine import wire
from service.engine.client import RemoteDataPlane
from service.engine.codec import EngineError, error_payload, pack, pack_replies, raise_error, unpack
from service.engine.server import EngineServer, _Connection


class ForbiddenWord(errors.InvalidInput):
    """What a plugin task may raise (it is not in service.errors)."""


def _crossed(exc: BaseException) -> BaseException:
    """``exc`` as the frontend raises it after the payload went over the wire."""
    payload = unpack(pack(error_payload(exc)))
    with pytest.raises(BaseException) as info:
        raise_error(*payload)
    return info.value


@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (errors.SessionEvicted("gone"), grpc.StatusCode.NOT_FOUND, "SESSION_EVICTED"),
        (errors.QuotaExceeded("quota"), grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED"),
        (ForbiddenWord("texts[0] holds a forbidden word"), grpc.StatusCode.INVALID_ARGUMENT, "FORBIDDEN_WORD"),
    ],
)
def test_domain_errors_keep_status_message_and_reason(
    exc: errors.SeqServeError, code: grpc.StatusCode, reason: str
) -> None:
    back = _crossed(exc)
    assert isinstance(back, errors.SeqServeError) and back.message == exc.message
    assert (status_code_for(back), error_reason(back)) == (code, reason)
    assert type(_crossed(exc)) is type(back)  # one class per plugin error, not one per call


def test_the_retry_time_crosses_to_the_frontend() -> None:
    """A refusal that may be retried keeps its wait across the engine link (the frontend's edge puts it in the
    status as RetryInfo); a class's own default (ReplicaBehind) too; an error without one stays without."""
    assert cast(errors.SeqServeError, _crossed(errors.Overloaded("queue full", retry_after=0.1))).retry_after == 0.1
    assert (
        cast(errors.SeqServeError, _crossed(errors.ReplicaBehind("rolling update"))).retry_after == errors.RETRY_LATER
    )
    assert cast(errors.SeqServeError, _crossed(errors.InvalidInput("bad"))).retry_after is None


def test_a_refused_streamed_request_says_when_to_send_it_again() -> None:
    from service.api.gen.inference import grpc_service_pb2 as pb
    from service.api.kserve.servicer import KServeServicer

    request = pb.ModelInferRequest(model_name="charlm", id="r1")
    later = KServeServicer._stream_error(request, "queue full", "RESOURCE_EXHAUSTED", 0.1).infer_response
    assert later.parameters["seqserve_retry_after_ms"].int64_param == 100
    never = KServeServicer._stream_error(request, "bad", "INVALID_ARGUMENT").infer_response
    assert "seqserve_retry_after_ms" not in never.parameters and never.id == "r1"


def test_anything_else_is_an_engine_error() -> None:
    back = _crossed(RuntimeError("secret internals"))
    assert isinstance(back, EngineError) and "secret" not in str(back)
    with pytest.raises(EngineError):
        raise_error("NotAnError", "m", "NoSuchBase")


def test_an_answer_that_cannot_be_sent_fails_only_its_own_call() -> None:
    """A frame carries every answer of one loop iteration; one the codec cannot encode (an object from a plugin)
    becomes an internal error for that call, and the others still arrive as they were."""
    from service.engine import wire

    good = [7, wire.OK, {"n": 1}, "charlm", False]
    bad = [8, wire.OK, object(), "charlm", False]
    replies = unpack(pack_replies([good, bad, [9, wire.END, None, None, True]]))
    assert replies[0] == good and replies[2] == [9, wire.END, None, None, True]
    assert replies[1][:2] == [8, wire.ERROR]
    with pytest.raises(EngineError):
        raise_error(*replies[1][2])
    assert unpack(pack_replies([good])) == [good]


async def test_a_stream_whose_answer_cannot_be_sent_is_stopped() -> None:
    """The caller of a stream got an internal error for an item the codec could not encode; the engine stops that
    stream's task (it would go on generating for nobody) and drops the call's later replies in the frame, while
    another call's task and answers are untouched."""
    import asyncio

    from service.engine import wire
    from service.engine.server import EngineServer, _Connection

    class Transport:
        def __init__(self) -> None:
            self.frames: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.frames.append(data)

    conn = _Connection(EngineServer.__new__(EngineServer))
    transport = Transport()
    conn.transport = transport  # type: ignore[assignment]
    stream, other = (asyncio.create_task(asyncio.sleep(60)) for _ in range(2))
    conn.tasks = {5: stream, 6: other}
    conn.outbox = [
        [5, wire.ITEM, "fine", None, False],
        [5, wire.ITEM, object(), None, False],
        [6, wire.OK, 1, None, False],
        [5, wire.ITEM, "after", None, False],
    ]
    conn.flush()
    await asyncio.sleep(0)
    assert stream.cancelled() and not other.done() and set(conn.tasks) == {6}
    (frame,) = transport.frames
    replies = unpack(frame[4:])
    assert [r[:2] for r in replies] == [[5, wire.ITEM], [5, wire.ERROR], [6, wire.OK]]
    other.cancel()


def test_every_kind_of_value_crosses_as_it_was() -> None:
    """Dataclasses (nested, tuple fields back as tuples), arrays, sets and KServe inputs travel as marked arrays
    inside the frame's one packb; plain lists, whatever they hold, stay lists; an unknown extension makes the frame
    unreadable (the connection is closed, as for any bad frame)."""
    from service.api.gen.inference import grpc_service_pb2 as pb
    from service.api.kserve.tensors import WireInput

    probs = np.arange(6, dtype=np.float32).reshape(2, 3)
    result = InferResult(
        model="charlm",
        version=2,
        outputs=[Tensor("P", "FP32", (2, 3), array=probs), Tensor("V", "BYTES", (2,), items=[b"a", b""])],
        inferences=2,
        steps=7,
    )
    t = pb.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])
    sent = [result, {"k", "j"}, [[], [1, [2]], "x"], SharedRegion("r", "/k", 0, 8), WireInput(t, b"raw"), None]
    back = unpack(pack(sent))
    got, kinds, plain, region, wired, none = back
    assert (got.model, got.version, got.inferences, got.steps) == ("charlm", 2, 2, 7)
    assert got.outputs[0].shape == (2, 3) and isinstance(got.outputs[0].shape, tuple)
    np.testing.assert_array_equal(got.outputs[0].array, probs)
    assert got.outputs[1].items == [b"a", b""] and got.outputs[1].array is None
    assert kinds == {"j", "k"} and plain == [[], [1, [2]], "x"] and region == SharedRegion("r", "/k", 0, 8)
    assert (wired.name, wired.shape, wired.to_wire()) == ("TEXT", (1,), (t.SerializeToString(), b"raw"))
    assert none is None
    with pytest.raises(ValueError, match="unknown extension 9"):
        unpack(msgpack.packb([msgpack.ExtType(9, b"")]))


def test_a_long_bytes_output_sent_again_arrives_as_the_same_list() -> None:
    """A BYTES tensor of 16 elements or more whose list the engine sends again (the char LM's VOCAB, in every
    answer) crosses as its serialized contents from its second time on; the frontend gets the same list for the
    same contents, so encoding the response finds its serialized form kept. A list sent once, a new list each time
    (contents that change with every answer) and a short one arrive as lists of their own."""
    from service.api.kserve.tensors import serialize_bytes, serialize_cached

    vocab = [bytes([c]) for c in range(32, 97)] + [b"", b"\xe2\x80\x94"]
    sent = Tensor("VOCAB", "BYTES", (len(vocab),), items=list(vocab))
    first, second, third = (unpack(pack(sent)).items for _ in range(3))
    assert first == second == third == vocab
    assert first is not second and second is third
    assert serialize_cached(second) is serialize_cached(third) == serialize_bytes(vocab)
    fresh = [unpack(pack(Tensor("L", "BYTES", (len(vocab),), items=list(vocab)))).items for _ in range(2)]
    assert fresh[0] == fresh[1] == vocab
    assert fresh[0] is not fresh[1] and fresh[0] is not second
    short = Tensor("C", "BYTES", (2,), items=[b"a", b"b"])
    again = [unpack(pack(short)).items for _ in range(2)]
    assert again[0] == again[1] == [b"a", b"b"] and again[0] is not again[1]


def test_decoded_arrays_are_writable_copies() -> None:
    from service.engine.codec import pack, unpack

    out = unpack(pack(np.arange(4, dtype=np.float32)))
    assert out.flags.writeable and out.flags.owndata


def test_an_oversized_frame_header_is_refused() -> None:
    from service.engine.wire import MAX_FRAME, Framer

    with pytest.raises(ValueError, match="larger than"):
        list(Framer().feed(struct.pack("<I", MAX_FRAME + 1)))


class _Engine(asyncio.Protocol):
    """Stands in for the engine on a frontend's Unix socket: records every message the frontend sends, writes
    ``greeting`` (reply lists) when the frontend connects and ``answer(message)`` (reply lists) for each message.
    The default answers nothing: a stalled or overloaded engine."""

    def __init__(self, greeting: list[list[object]] | None = None, answer: Any = None) -> None:
        self.framer, self.received = wire.Framer(), RECEIVED
        self.greeting, self.answer = greeting, answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (a Unix socket's: it writes)
        if self.greeting:
            self.transport.write(wire.frame(pack_replies(self.greeting)))

    def data_received(self, data: bytes) -> None:
        for payload in self.framer.feed(data):
            for m in unpack(payload):
                self.received.append(m)
                replies = self.answer(m) if self.answer else None
                if replies:
                    self.transport.write(wire.frame(pack_replies(replies)))


RECEIVED: list[list[Any]] = []  # what the frontend sent the current test's _Engine (cleared by _engine)


@contextlib.asynccontextmanager
async def _engine(**engine: Any) -> AsyncIterator[str]:
    """The path of a Unix socket served by an ``_Engine(**engine)`` (a short path: sun_path holds 108 bytes,
    pytest's tmp_path can be longer)."""
    RECEIVED.clear()
    folder = tempfile.mkdtemp(prefix="seqserve-test-")
    path = f"{folder}/engine.sock"
    server = await asyncio.get_running_loop().create_unix_server(lambda: _Engine(**engine), path)
    try:
        yield path
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


def _sent(kind: int) -> list[list[Any]]:
    """The messages of one kind (CALL, STREAM, CANCEL, ACK...) the frontend sent, as [kind, call id]."""
    return [m[:2] for m in RECEIVED if m[0] == kind]


async def test_a_frontend_refuses_the_call_past_max_queue_size_but_never_an_admitted_step() -> None:
    """--workers N: a frontend has at most max_queue_size calls waiting for the engine; the next one fails at
    once (RESOURCE_EXHAUSTED), not one later, while a stream's admitted later step still goes through."""
    async with _engine() as path:
        plane = RemoteDataPlane(path, max_pending=2)
        await plane.start()
        waiting = [asyncio.create_task(plane.get_session(f"s{i}")) for i in range(2)]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in waiting)
        with pytest.raises(errors.Overloaded, match="max_queue_size=2") as refused:
            await asyncio.wait_for(plane.get_session("third"), 2)
        assert refused.value.retry_after == errors.RETRY_SOON

        async def admitted_step() -> object:
            mark_admitted()
            return await plane.get_session("later step")

        later = asyncio.create_task(admitted_step())
        await asyncio.sleep(0.05)
        assert not later.done()  # waiting for the engine, not refused
        for t in [*waiting, later]:
            t.cancel()
        await asyncio.gather(*waiting, later, return_exceptions=True)
        await plane.stop()


async def test_control_calls_to_a_stalled_engine_fail_after_control_timeout() -> None:
    """Health and model-table calls never wait forever: readiness says not ready, the others are UNAVAILABLE,
    after control_timeout seconds."""
    async with _engine() as path:
        plane = RemoteDataPlane(path, control_timeout=0.2)
        await plane.start()
        assert await asyncio.wait_for(plane.ready(), 5) is False
        with pytest.raises(errors.ModelUnavailable, match=r"did not answer models within 0\.2 s"):
            await asyncio.wait_for(plane.models(), 5)
        await plane.stop()


async def test_a_lost_engine_fails_waiting_calls_and_streams_unavailable() -> None:
    """The engine connection closes (the engine stopped or crashed): a waiting call and a waiting Complete stream
    fail UNAVAILABLE at once instead of hanging until their deadline."""
    async with _engine() as path:
        plane = RemoteDataPlane(path)
        await plane.start()
        call = asyncio.create_task(plane.get_session("s"))

        async def stream() -> list[object]:
            return [c async for c in plane.complete(ModelRef("charlm"), "ab", SamplingParams(max_chars=3))]

        streamed = asyncio.create_task(stream())
        await asyncio.sleep(0.05)
        assert plane._transport is not None
        plane._transport.close()  # as when the engine goes away (connection_lost follows)
        for task in (call, streamed):
            with pytest.raises(errors.ModelUnavailable, match="not reachable"):
                await asyncio.wait_for(task, 2)


async def test_a_cancel_from_a_frontend_stops_the_engines_task() -> None:
    """CANCEL (the gRPC client went away, or a consumer left a Complete stream early) cancels the engine's task
    for that call: it must not go on generating, or committing to the session, for nobody."""
    conn = _Connection(EngineServer.__new__(EngineServer))
    task = asyncio.create_task(asyncio.sleep(60))
    conn.tasks = {5: task}
    conn.dispatch(wire.CANCEL, 5, "", (), {})
    await asyncio.sleep(0)
    assert task.cancelled() and conn.tasks == {}


async def test_a_frontend_that_goes_away_stops_its_calls_and_acknowledges_nothing() -> None:
    """The engine side of a frontend's connection closes (the frontend crashed or was killed): the engine cancels
    the tasks of that frontend's calls (a Complete would go on generating for nobody) and stops waiting for the
    frontend to acknowledge a model change (a load would wait EVENT_ACK_SECONDS for it)."""
    engine = EngineServer.__new__(EngineServer)
    engine.connections = set()
    conn = _Connection(engine)
    engine.connections.add(conn)
    work = asyncio.create_task(asyncio.sleep(60))
    ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    conn.tasks, conn.acks = {3: work}, {1: ack}
    conn.connection_lost(None)
    await asyncio.sleep(0)
    assert work.cancelled() and ack.done() and conn not in engine.connections


async def test_a_cancelled_call_tells_the_engine_to_stop_it() -> None:
    """A caller that stops waiting (its gRPC client went away, its deadline passed) sends CANCEL for its call id,
    so that the engine stops that work too instead of finishing it (and committing it to a session) for nobody."""
    async with _engine() as path:
        plane = RemoteDataPlane(path)
        await plane.start()
        call = asyncio.create_task(plane.get_session("s"))
        await asyncio.sleep(0.05)
        ((_, call_id),) = _sent(wire.CALL)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(0.05)
        assert _sent(wire.CANCEL) == [[wire.CANCEL, call_id]]
        await plane.stop()


async def test_a_consumer_that_leaves_a_complete_stream_early_cancels_it_on_the_engine() -> None:
    """The gRPC client of a Complete went away after a chunk: the frontend's generator closes and sends CANCEL
    for the stream, so the engine stops generating (and committing characters to the session) for nobody."""

    def one_chunk(m: list[Any]) -> list[list[object]] | None:  # then the stream stays open
        return [[m[1], wire.ITEM, "x", "charlm", True]] if m[0] == wire.STREAM else None

    async with _engine(answer=one_chunk) as path:
        plane = RemoteDataPlane(path)
        await plane.start()
        stream = plane.complete(ModelRef("charlm"), "ab", SamplingParams(max_chars=2000))
        first: object = await asyncio.wait_for(anext(stream), 5)  # what the stand-in sent: a bare "x"
        assert first == "x"
        await stream.aclose()
        await asyncio.sleep(0.05)
        ((_, stream_id),) = _sent(wire.STREAM)
        assert _sent(wire.CANCEL) == [[wire.CANCEL, stream_id]]
        await plane.stop()


async def test_a_frontend_acknowledges_a_model_change_after_its_hooks_ran() -> None:
    """EVENT "models" (the engine loaded or unloaded a model): the frontend runs its hooks (its health follows)
    and then answers ACK with the event's id; without the ACK every RepositoryModelLoad/Unload would wait
    EVENT_ACK_SECONDS for it."""
    hooked: list[int] = []

    async def hook() -> None:
        hooked.append(len(_sent(wire.ACK)))  # acks sent before the hook ran

    async with _engine(greeting=[[0, wire.EVENT, [wire.MODELS_CHANGED, 7], None, False]]) as path:
        plane = RemoteDataPlane(path)
        plane.on_models_changed(hook)
        await plane.start()
        for _ in range(100):
            if _sent(wire.ACK):
                break
            await asyncio.sleep(0.01)
        assert hooked == [0]
        assert _sent(wire.ACK) == [[wire.ACK, 7]]
        await plane.stop()


async def test_a_frontend_applies_the_engines_log_settings_and_acknowledges_a_change(
    log_state: Callable[[str], io.StringIO],
) -> None:
    """EVENT "logs": the engine changed the log settings (LogSettings through any frontend); this frontend takes
    them and answers ACK, so the call returns once every process writes alike. Event 0 (the engine's greeting
    after HELLO) is taken too, without an ACK."""
    log_state("INFO")
    greeting = {**logs.current(), "log_warning": False}
    change = {**greeting, "log_verbose_level": 2, "log_format": "json"}
    events = [[0, wire.EVENT, [wire.LOGS_CHANGED, 0, greeting], None, False]]
    async with _engine(greeting=events) as path:
        plane = RemoteDataPlane(path)
        await plane.start()
        for _ in range(100):
            if logs.current() == greeting:
                break
            await asyncio.sleep(0.01)
        assert logs.current() == greeting
        assert _sent(wire.ACK) == []
        plane._answer(0, wire.EVENT, [wire.LOGS_CHANGED, 8, change], None, False)
        assert logs.current() == change
        for _ in range(100):
            if _sent(wire.ACK):
                break
            await asyncio.sleep(0.01)
        assert _sent(wire.ACK) == [[wire.ACK, 8]]
        await plane.stop()


async def test_the_engine_greets_each_frontend_with_the_log_settings_in_force(
    log_state: Callable[[str], io.StringIO],
) -> None:
    """A frontend that connects after a change (it started later) must write what the others write: the engine
    answers its HELLO with the settings now in force."""
    log_state("INFO")
    logs.update({"log_info": False, "log_verbose_level": 1})
    conn = _Connection(_greeter(Regions(False)))
    conn.dispatch(wire.HELLO, 0, "", (), {})
    assert conn.link
    assert conn.outbox == [[0, wire.EVENT, [wire.LOGS_CHANGED, 0, logs.current()], None, False]]
    assert conn.outbox[0][2][2]["log_info"] is False


def _greeter(regions: Regions) -> EngineServer:
    engine = EngineServer.__new__(EngineServer)
    engine.dataplane = cast(CoreDataPlane, SimpleNamespace(regions=regions))
    return engine


async def test_the_engine_greets_each_frontend_with_the_shared_memory_regions(tmp_path: Path) -> None:
    """With SHARED_MEMORY=system, a frontend that connects after a registration maps the regions registered
    before it started: the HELLO's answer carries the engine's table too (event 0: no ACK)."""
    (tmp_path / "obj").write_bytes(bytes(32))
    regions = Regions(True, root=str(tmp_path))
    region = SharedRegion("r", "/obj", 0, 32)
    regions.register(region)
    conn = _Connection(_greeter(regions))
    conn.dispatch(wire.HELLO, 0, "", (), {})
    assert conn.outbox[1] == [0, wire.EVENT, [wire.REGIONS_CHANGED, 0, [region]], None, False]
    assert unpack(pack(conn.outbox[1][2][2])) == [region]  # (crosses the link as it is)
    regions.close()


def test_the_calls_priority_level_reaches_the_engines_task() -> None:
    """A KServe request's priority level (set by the servicer) travels in the call's context to the engine, whose
    batcher queues by it; a call without one leaves the engine's default."""
    from service.engine.client import _context

    def frontend(level: int | None) -> bytes:
        set_priority(level)
        return pack(_context())

    def engine(sent: bytes) -> int | None:
        EngineServer._enter(unpack(sent))
        return priority()

    for level in (1, 7, None):
        sent = contextvars.copy_context().run(frontend, level)
        assert contextvars.copy_context().run(engine, sent) == level
