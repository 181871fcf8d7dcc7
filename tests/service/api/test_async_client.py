"""``AsyncClient``: the blocking client's calls on asyncio (``grpc.aio``), against a real server over the tiny
models, checked against what ``Client`` gets for the same requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing

import grpc
import numpy as np
import pytest

from service.client import ApiError, AsyncClient, Client, SuggestEvent
from tests.conftest import ServerHandle
from tests.service.api.test_rpcs import FEATURES, TINY_HORIZON, TINY_WINDOW, history


@pytest.fixture
def target(serve: Callable[..., ServerHandle]) -> str:
    return serve(session_signing_key="k" * 40).target


@pytest.fixture
def blocking(target: str) -> Iterator[Client]:
    with Client(target, timeout=60) as c:
        yield c


async def test_unary_calls_answer_what_the_blocking_client_gets(target: str, blocking: Client) -> None:
    texts = ["a good fun film", "this movie was terrible and boring"]
    rows = history(40)
    async with AsyncClient(target, timeout=60) as c:
        assert await c.classify(texts) == blocking.classify(texts)
        got, want = await c.forecast(rows), blocking.forecast(rows)
        np.testing.assert_array_equal(got.point, want.point)
        np.testing.assert_array_equal(got.quantiles, want.quantiles)
        assert got.point.shape == (TINY_HORIZON, FEATURES) and got.rows_seen == 40


async def test_a_completion_streams_the_same_chunks(target: str, blocking: Client) -> None:
    options = {"max_chars": 30, "seed": 7, "top_k": 5}
    want = list(blocking.complete("To be", **options))  # type: ignore[arg-type]
    async with AsyncClient(target, timeout=60) as c:
        got = [chunk async for chunk in c.complete("To be", **options)]  # type: ignore[arg-type]
        assert got == want and got[-1].finish_reason == "length"
        with pytest.raises(TypeError, match="unexpected keyword argument 'max_char'"):
            c.complete("To be", max_char=3)  # type: ignore[call-arg]


async def test_sessions_live_their_whole_life_through_the_async_client(target: str) -> None:
    async with AsyncClient(target, timeout=60) as c:
        async with c.session("charlm") as s:
            text = "".join([x.text async for x in c.complete("Hello", session_id=s.id, max_chars=5, temperature=0)])
            assert (await c.get_session(s.id)).steps == 5 + len(text)
            fork = await c.fork_session(s.id)
            blob = await c.export_session(s.id)
            copy = await c.import_session(blob)
            assert fork.steps == copy.steps == 5 + len(text) and len({s.id, fork.id, copy.id}) == 3
            for sid in (fork.id, copy.id):
                await c.delete_session(sid)
        with pytest.raises(ApiError) as gone:  # the context manager deleted it on exit
            await c.get_session(s.id)
        assert gone.value.code == grpc.StatusCode.NOT_FOUND and gone.value.request_id
        rows = history(TINY_WINDOW + 6, seed=1)
        async with c.session("forecaster") as f:
            assert (await c.observe(f.id, rows[:10])).rows_seen == 10
            last = await c.observe(f.id, rows[10:])
            assert (await c.get_session(f.id)).steps == len(rows)
        whole = await c.forecast(rows[-TINY_WINDOW:])
        assert last.rows_seen == len(rows)
        np.testing.assert_allclose(last.point, whole.point, rtol=1e-4, atol=1e-4)


async def test_a_relay_sends_each_keystroke_as_it_comes_and_reads_each_answer(target: str, blocking: Client) -> None:
    """What a web server relaying a browser's keystrokes does: one open Suggest stream, fed from a queue; each
    answer is read before the next key is put, so the events cannot have been sent ahead in one batch."""
    keys: list[SuggestEvent | str] = ["To", " be", SuggestEvent(" or", n=2, max_chars=4)]
    with blocking.session("charlm") as ref:
        want = list(blocking.suggest(ref.id, keys))
    async with AsyncClient(target, timeout=60) as c, c.session("charlm") as s:
        queue: asyncio.Queue[SuggestEvent | str | None] = asyncio.Queue()

        async def typed() -> AsyncIterator[SuggestEvent | str]:
            while (key := await queue.get()) is not None:
                yield key

        got = []
        async with aclosing(c.suggest(s.id, typed())) as answers:
            for key in keys:
                await queue.put(key)
                got.append(await anext(answers))
                assert got[-1].steps == want[len(got) - 1].steps  # this key's answer, before the next key exists
            await queue.put(None)  # the user is done: the stream ends
            assert [r async for r in answers] == []
        assert got == want
        assert (await c.suggest_once(s.id, "!", n=1, max_chars=1)).steps == want[-1].steps + 1


async def test_a_suggest_stream_answers_each_send(target: str, blocking: Client) -> None:
    """``suggest_stream``: one open stream, ``send`` per keystroke returning its answer; the same answers as a
    whole list of events on the blocking client. Two sends at once wait their turn."""
    keys: list[SuggestEvent | str] = ["To", " be", SuggestEvent(" or", n=2, max_chars=4), " not"]
    with blocking.session("charlm") as ref:
        want = list(blocking.suggest(ref.id, keys))
    async with AsyncClient(target, timeout=60) as c, c.session("charlm") as s:
        async with c.suggest_stream(s.id) as stream:
            got = [await stream.send(k) for k in keys[:2]]
            got += await asyncio.gather(stream.send(keys[2]), stream.send(keys[3]))  # in order, one at a time
        assert got == want
        assert (await c.get_session(s.id)).steps == want[-1].steps and not (await c.get_session(s.id)).in_use
        async with c.suggest_stream("no-such-session") as lost:
            with pytest.raises(ApiError) as unknown:
                await lost.send("x")
            assert unknown.value.code == grpc.StatusCode.NOT_FOUND and unknown.value.request_id
        with pytest.raises(RuntimeError, match="relay gone"):  # leaving by an exception cancels the stream
            async with c.suggest_stream(s.id) as stream:
                await stream.send("!")
                raise RuntimeError("relay gone")
        assert (await c.get_session(s.id)).steps == want[-1].steps + 1


async def test_a_refused_event_ends_the_suggest_stream_and_later_sends_say_so(target: str) -> None:
    """A send after the refusal raised asyncio's InvalidStateError ("RPC already finished"), not an ApiError; the
    session keeps the earlier events, and a new stream goes on from there."""
    async with AsyncClient(target, timeout=60) as c, c.session("charlm") as s:
        async with c.suggest_stream(s.id) as stream:
            assert (await stream.send("To be")).steps == 5
            with pytest.raises(ApiError) as refused:
                await stream.send("\u4e2d")  # no character of the model's
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(ApiError) as ended:
                await stream.send("x")
            assert ended.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert ended.value.message == (
                f"this Suggest stream has ended (INVALID_ARGUMENT: {refused.value.message}); open a new one "
                "(suggest_stream) to send more events"
            )
            assert ended.value.request_id == refused.value.request_id
        async with c.suggest_stream(s.id) as again:
            assert (await again.send(" or")).steps == 8


async def test_errors_are_api_errors_and_the_callers_own_errors_stay_its_own(target: str) -> None:
    async with AsyncClient(target, timeout=60) as c:
        with pytest.raises(ApiError) as unknown:
            await c.classify(["fine"], model="no-such-model")
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND and unknown.value.reason == "MODEL_NOT_FOUND"
        assert "no-such-model" in unknown.value.message and unknown.value.request_id
        with pytest.raises(ApiError) as bad:
            [x async for x in c.complete("ROMEO:", max_chars=-1)]
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and "max_chars" in bad.value.message

        async def broken() -> AsyncIterator[str]:
            yield "To"
            raise KeyError("the caller's bug")

        async with c.session("charlm") as s:
            with pytest.raises(KeyError, match="the caller's bug"):
                [r async for r in c.suggest(s.id, broken())]
            assert (await c.get_session(s.id)).steps in (0, 2)  # the stream was cancelled, the session is usable
            assert (await c.suggest_once(s.id, "x")).steps >= 1


async def test_a_stream_closed_early_is_cancelled_on_the_server(target: str) -> None:
    async with AsyncClient(target, timeout=60) as c, c.session("charlm") as s:
        async with aclosing(c.complete("a", session_id=s.id, max_chars=2000, temperature=0)) as stream:
            first = await anext(stream)
        # The generation released the session and did not run on to 2,000 characters.
        after = await c.suggest_once(s.id, "b", n=1, max_chars=1)
        assert first.text and after.steps < 1 + 2000 + 1


async def test_a_cancelled_send_ends_the_suggest_stream_and_later_sends_say_so(target: str) -> None:
    """A send cancelled while it waited for its answer (``asyncio.wait_for`` timing out) cancels the gRPC call with
    it: the next send raised asyncio's InvalidStateError ("RPC already finished"), and leaving the block raised
    CancelledError out of ``finish()`` in a task nobody cancelled. Now the next send raises an ApiError that says
    why the stream ended, leaving the block is quiet, and a new stream goes on from what the session kept."""
    async with AsyncClient(target, timeout=60) as c, c.session("charlm") as s:
        async with c.suggest_stream(s.id) as stream:
            assert (await stream.send("To be")).steps == 5
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(stream.send(SuggestEvent(" O", n=10, max_chars=1500)), 0.01)
            with pytest.raises(ApiError) as ended:
                await stream.send("x")
            assert ended.value.code == grpc.StatusCode.CANCELLED
            assert "has ended" in ended.value.message and "a send was cancelled" in ended.value.message
            assert "the session keeps the events the server applied" in ended.value.message
        async with c.suggest_stream(s.id) as left:  # left without another send: finish() is quiet
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(left.send(SuggestEvent(" O", n=10, max_chars=1500)), 0.01)
        info = await c.get_session(s.id)
        assert info.steps in (5, 7, 9) and not info.in_use  # each cancelled event was applied, or not
        async with c.suggest_stream(s.id) as again:
            assert (await again.send("!")).steps == info.steps + 1


async def test_a_send_after_the_streams_deadline_raises_an_api_error(target: str) -> None:
    """A user who goes quiet past the stream's deadline: the next send raised asyncio's InvalidStateError ("RPC
    already finished") out of grpc.aio's write(), which a relay catching ApiError does not catch."""
    async with AsyncClient(target, timeout=60) as c, c.session("charlm") as s:
        async with c.suggest_stream(s.id, timeout=0.5) as stream:
            assert (await stream.send("To be")).steps == 5
            await asyncio.sleep(1.0)
            with pytest.raises(ApiError) as late:
                await stream.send(" or")
            assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(ApiError) as ended:
                await stream.send(" not")
            assert ended.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "has ended" in ended.value.message
        assert (await c.get_session(s.id)).steps == 5


async def test_a_send_whose_channel_closed_raises_an_api_error(target: str) -> None:
    """The client closed under a send: grpc.aio raised CancelledError in a task nobody cancelled."""
    c = AsyncClient(target, timeout=60)
    s = await c.create_session("charlm")
    async with c.suggest_stream(s.id) as stream:
        await stream.send("To")
        pending = asyncio.ensure_future(stream.send(SuggestEvent(" O", n=10, max_chars=1500)))
        await asyncio.sleep(0.05)
        await c.close()
        with pytest.raises(ApiError) as lost:
            await pending
        assert lost.value.code == grpc.StatusCode.CANCELLED and "channel closed" in lost.value.message


async def test_calls_of_a_closed_client_raise_api_errors_and_a_suggest_stream_outlives_the_call_timeout(
    target: str,
) -> None:
    """A send after the client closed, between sends, and a completion or a unary call under way when it closed
    raised a bare CancelledError (which asyncio reads as the task's own cancellation). A suggest_stream took the
    client's per-call timeout as its deadline: the README's relay lost its stream after 30 s of typing."""
    c = AsyncClient(target, timeout=1.0)
    s = await c.create_session("charlm")
    async with c.suggest_stream(s.id) as stream:
        assert (await stream.send("To be")).steps == 5
        await asyncio.sleep(1.5)  # past the client's timeout: the stream has none of its own
        assert (await stream.send(" or")).steps == 8
        await c.close()
        with pytest.raises(ApiError) as idle:
            await stream.send(" not")
        assert idle.value.code == grpc.StatusCode.CANCELLED, idle.value

    async def chunks(client: AsyncClient) -> int:
        n = 0
        async for _ in client.complete("To be", max_chars=2000, seed=1):
            n += 1
            if n == 2:
                await client.close()
        return n

    with pytest.raises(ApiError) as streaming:
        await chunks(AsyncClient(target, timeout=60))
    assert streaming.value.code == grpc.StatusCode.CANCELLED and "the client was closed" in streaming.value.message

    other = AsyncClient(target, timeout=60)
    pending = asyncio.ensure_future(other.classify(["a fine film"] * 256))
    await asyncio.sleep(0)
    await other.close()
    with pytest.raises(ApiError) as unary:
        await pending
    assert unary.value.code == grpc.StatusCode.CANCELLED and "the client was closed" in unary.value.message


async def test_suggest_relaying_events_as_they_come_outlives_the_call_timeout(target: str) -> None:
    """``suggest`` fed by an async generator (the relay its docstring shows) or, in the blocking client, by a
    generator took the client's per-call timeout as the whole stream's deadline: a user who paused past it lost the
    stream (DEADLINE_EXCEEDED). Events given as a list keep that deadline (they are all there at once)."""

    async def typed() -> AsyncIterator[str]:
        yield "To be"
        await asyncio.sleep(1.5)  # past the client's timeout
        yield " or"

    async with AsyncClient(target, timeout=1.0) as c, c.session("charlm") as s:
        async with aclosing(c.suggest(s.id, typed())) as results:
            assert [r.steps async for r in results] == [5, 8]
        assert c._events_timeout(["a"], None) == 1.0 and c._events_timeout(typed(), 3.0) == 3.0

    def typed_blocking() -> Iterator[str]:
        yield "To be"
        time.sleep(1.5)
        yield " or"

    with Client(target, timeout=1.0) as blocking, blocking.session("charlm") as session:
        assert [r.steps for r in blocking.suggest(session.id, typed_blocking())] == [5, 8]
