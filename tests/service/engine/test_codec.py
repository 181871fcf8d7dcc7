"""The engine link's error codec: a domain error crosses from the engine to a frontend with its status code,
message and ErrorInfo reason, a plugin's own subclass of a domain error included; anything else is INTERNAL."""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest

from service import errors
from service.api.interceptors import error_reason, status_code_for
from service.engine.codec import EngineError, error_payload, pack, pack_replies, raise_error, unpack


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


def test_decoded_arrays_are_writable_copies() -> None:
    from service.engine.codec import pack, unpack

    out = unpack(pack(np.arange(4, dtype=np.float32)))
    assert out.flags.writeable and out.flags.owndata


def test_an_oversized_frame_header_is_refused() -> None:
    from service.engine.wire import MAX_FRAME, Framer

    with pytest.raises(ValueError, match="larger than"):
        list(Framer().feed(struct.pack("<I", MAX_FRAME + 1)))
