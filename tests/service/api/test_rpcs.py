"""Happy path of every seqserve.v1 RPC, through real stubs against a real server over the tiny models."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from service.client import ApiError, Client, SuggestEvent
from tests.conftest import ServerHandle

TINY_WINDOW, TINY_HORIZON, FEATURES = 24, 12, 7  # export_tiny's forecaster


def history(rows: int, seed: int = 0) -> np.ndarray:
    """(rows, 7) plausible ETTh1-like values in original units."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows)[:, None]
    return (10 + 3 * np.sin(t / 4.0) + rng.normal(0, 0.5, (rows, FEATURES))).astype(np.float32)


def test_classify_returns_one_distribution_per_text(client: Client) -> None:
    texts = ["a good fun film", "this movie was terrible and boring", "it"]
    results = client.classify(texts)
    assert len(results) == len(texts)
    for r in results:
        assert r.labels == ["negative", "positive"]
        assert r.label == r.labels[int(np.argmax(r.probabilities))]
        assert abs(sum(r.probabilities) - 1.0) < 1e-4


def test_classify_result_does_not_depend_on_batch(client: Client) -> None:
    alone = client.classify(["a good film"])[0]
    batched = client.classify(["a good film", "this was a very very very long and boring terrible movie"])[0]
    np.testing.assert_allclose(alone.probabilities, batched.probabilities, atol=1e-5)


def test_complete_streams_chunks_and_finishes_with_length(client: Client) -> None:
    chunks = list(client.complete("ROMEO:", max_chars=40, temperature=0.0))
    assert chunks, "no chunks streamed"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == "length"
    assert len("".join(c.text for c in chunks)) == 40


def test_complete_same_seed_same_text(client: Client) -> None:
    a = "".join(c.text for c in client.complete("To be", max_chars=30, seed=7, top_k=5))
    b = "".join(c.text for c in client.complete("To be", max_chars=30, seed=7, top_k=5))
    assert a == b and len(a) == 30


def test_complete_with_session_continues_it(client: Client) -> None:
    with client.session("charlm") as s:
        text = "".join(c.text for c in client.complete("Hello", session_id=s.id, max_chars=10, temperature=0.0))
        assert client.get_session(s.id).steps == len("Hello") + len(text)


def test_cancelled_complete_stops_generating(client: Client) -> None:
    with client.session("charlm") as s:
        stream = client.complete("a", session_id=s.id, max_chars=2000, temperature=0.0)
        first = next(stream)
        stream.close()  # cancels the call on the server
        # The session is free again (the generation released it) and did not run on to 2000 characters.
        after = client.suggest_once(s.id, "b", n=1, max_chars=1)
        assert first.text and after.steps < 1 + 2000 + 1
        assert client.get_session(s.id).steps == after.steps


def reads_during_a_long_completion(target: str, read_at: str | None = None) -> None:
    """Sessions.Get and Export (sent to ``read_at``, else ``target``) answer while a Complete holds the session
    (they used to wait for its end): with the session as its last finished call left it, marked ``in_use``;
    after the call, the steps it kept."""
    with Client(target, timeout=60) as c, Client(read_at or target, timeout=60) as reader:
        sid = c.create_session("charlm").id
        assert c.suggest_once(sid, "abc", n=1, max_chars=1).steps == 3
        stream = c.complete("de", session_id=sid, max_chars=100_000, temperature=0.0)
        got = next(stream).text
        info = reader.get_session(sid, timeout=10)
        blob = reader.export_session(sid, timeout=10)
        got += next(stream).text  # the completion was still running after both reads
        stream.close()  # cancels it: the session keeps exactly what was streamed
        assert info.in_use and info.steps == 3
        assert reader.import_session(blob).steps == 3  # the export holds the finished state
        # The cancel reaches the server (with workers: the frontend, then the engine) a moment after close():
        # until then the Complete still holds the session and a read still says so.
        deadline = time.monotonic() + 10
        while (after := reader.get_session(sid)).in_use and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not after.in_use and 3 + 2 + len(got) <= after.steps < 3 + 2 + 100_000


def test_get_and_export_do_not_wait_behind_a_long_complete(start_server: Callable[..., ServerHandle]) -> None:
    server = start_server(max_generate_chars=100_000, session_signing_key="k" * 40)
    reads_during_a_long_completion(server.target)


def test_complete_stop_string(client: Client) -> None:
    # Greedy text from an untrained model: find a character it does produce, then stop on it.
    free = "".join(c.text for c in client.complete("abc", max_chars=20, temperature=0.0))
    stop = free[5]
    chunks = list(client.complete("abc", max_chars=20, temperature=0.0, stop=[stop]))
    text = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop"
    assert text.endswith(stop) and text == free[: free.index(stop) + 1]


def test_suggest_stream_one_result_per_event(client: Client) -> None:
    with client.session("charlm") as s:
        results = list(client.suggest(s.id, ["To", " be", SuggestEvent(" or", n=2, max_chars=4)]))
    assert [r.steps for r in results] == [2, 5, 8]
    assert len(results[2].suggestions) == 2
    for r in results:
        assert r.suggestions
        assert all(len(x.text) <= 10 and x.logprob <= 0 for x in r.suggestions)
        logprobs = [x.logprob for x in r.suggestions]
        assert logprobs == sorted(logprobs, reverse=True)


def test_suggest_reset(client: Client) -> None:
    with client.session("charlm") as s:
        fresh = client.suggest_once(s.id, "abc")
        client.suggest_once(s.id, "something else")
        again = client.suggest_once(s.id, "abc", reset=True)
    assert again.steps == 3
    assert [x.text for x in again.suggestions] == [x.text for x in fresh.suggestions]


def test_forecast_predict_shapes_and_quantile_order(client: Client) -> None:
    result = client.forecast(history(TINY_WINDOW))
    assert result.columns == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    assert result.point.shape == (TINY_HORIZON, FEATURES)
    assert result.quantile_levels == [0.1, 0.5, 0.9]
    assert result.quantiles.shape == (3, TINY_HORIZON, FEATURES)
    assert np.all(np.isfinite(result.point))
    assert result.rows_seen == TINY_WINDOW


def test_forecast_takes_columns_as_any_sequence_of_names(client: Client) -> None:
    """A data scientist passes ``df.columns`` or ``df.columns.values``: numpy's array raised "truth value ...
    ambiguous" in the client (``columns or ()``). Any sequence of names answers as the list does."""
    names = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    rows = history(TINY_WINDOW)[:, ::-1]
    want = client.forecast(rows, columns=names[::-1]).point
    for columns in (np.array(names[::-1]), tuple(names[::-1])):
        np.testing.assert_array_equal(client.forecast(rows, columns=columns).point, want)  # type: ignore[arg-type]


def test_forecast_observe_in_pieces_equals_predict(client: Client) -> None:
    rows = history(TINY_WINDOW + 6, seed=1)
    with client.session("forecaster") as s:
        warming = client.observe(s.id, rows[:10])  # fewer rows than the window: no forecast yet
        assert warming.rows_seen == 10 and warming.point.shape == (0, FEATURES)
        last = client.observe(s.id, rows[10:])
        assert client.get_session(s.id).steps == len(rows)
    whole = client.forecast(rows[-TINY_WINDOW:])
    assert last.rows_seen == len(rows)
    np.testing.assert_allclose(last.point, whole.point, rtol=1e-4, atol=1e-4)


def test_sessions_create_get_fork_delete(client: Client) -> None:
    info = client.create_session("charlm", version=1, ttl_seconds=30)
    assert len(info.id) >= 22 and info.model == "charlm" and info.version == 1 and info.steps == 0
    assert info.ttl_seconds == 30 and info.expires_at >= info.created_at
    client.suggest_once(info.id, "abcd")
    got = client.get_session(info.id)
    assert got.steps == 4 and got.last_used_at >= info.created_at
    fork = client.fork_session(info.id)
    assert fork.id != info.id and fork.steps == 4
    client.delete_session(info.id)
    client.delete_session(fork.id)


def backspace_across(targets: list[str]) -> None:
    """Typing with backspaces over one Suggest stream per target, alternating (the session's checkpoints travel
    with it): each answer equals that of a fresh session sent the text as it now stands."""
    clients = [Client(t, timeout=60) for t in targets]
    try:
        sid = clients[0].create_session("charlm").id
        text = ""
        events = [("To be, or not to be", 0), ("", 3), (" b", 0), ("", 6), ("that is", 0), ("", 7), ("", 1)]
        for i, (typed, back) in enumerate(events):
            c = clients[i % len(clients)]
            got = c.suggest_once(sid, typed, backspace=back, n=2, max_chars=3)
            text = (text[:-back] if back else text) + typed
            assert got.steps == len(text)
            with c.session("charlm") as fresh:
                want = c.suggest_once(fresh.id, text, n=2, max_chars=3)
            assert [s.text for s in got.suggestions] == [s.text for s in want.suggestions]
            np.testing.assert_allclose([s.logprob for s in got.suggestions], [s.logprob for s in want.suggestions],
                                       atol=1e-4)  # fmt: skip
        assert text == "To be, or n" and clients[-1].get_session(sid).steps == len(text)
    finally:
        for c in clients:
            c.close()


def test_suggest_backspace_takes_characters_back(start_server: Callable[..., ServerHandle]) -> None:
    server = start_server(undo_chars=8)
    backspace_across([server.target])
    with Client(server.target) as c, c.session("charlm") as s:
        assert c.suggest_once(s.id, "To be, or not to be!", n=1, max_chars=1).steps == 20  # checkpoints at 8, 16
        with pytest.raises(ApiError) as err:  # past what it keeps: refused, saying how far it can go
            c.suggest_once(s.id, "", backspace=13, n=1, max_chars=1)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "at most 12 characters" in err.value.message
        with pytest.raises(ApiError) as err:  # more than the session holds: a bad request
            c.suggest_once(s.id, "", backspace=21, n=1, max_chars=1)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "backspace" in err.value.message
        assert c.get_session(s.id).steps == 20  # both refusals changed nothing


def test_input_backspace_without_undo_names_the_setting(start_server: Callable[..., ServerHandle]) -> None:
    """With SEQSERVE_UNDO_CHARS off (the default), a Triton client's BACKSPACE on a new sequence was told "between
    0 and 0 (the characters the sequence holds)", naming no setting (Suggest's backspace said what to turn on)."""
    from service.api.gen.inference import grpc_service_pb2 as pb
    from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
    from tests.service.sessions.v2 import charlm_request

    server = start_server()
    request = charlm_request("To be", "no-undo", sequence_start=True)
    request.inputs.add(name="BACKSPACE", datatype="INT32", shape=[1], contents=pb.InferTensorContents(int_contents=[1]))
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "input BACKSPACE" in err.value.details() and "SEQSERVE_UNDO_CHARS" in err.value.details()


def test_a_kserve_sequence_takes_characters_back_with_input_backspace(
    start_server: Callable[..., ServerHandle],
) -> None:
    """The same for Triton clients: the optional INT32 input BACKSPACE on a sequence's request."""
    from service.api.gen.inference import grpc_service_pb2 as pb
    from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
    from tests.service.sessions.v2 import charlm_request, probs

    def step(text: str, seq: str, back: int = 0, **params: bool | str) -> pb.ModelInferRequest:
        request = charlm_request(text, seq, **params)
        if back:
            contents = pb.InferTensorContents(int_contents=[back])
            request.inputs.add(name="BACKSPACE", datatype="INT32", shape=[1], contents=contents)
        return request

    server = start_server(undo_chars=8)
    with grpc.insecure_channel(server.target) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        infer(step("To be, or not to be", "typed", sequence_start=True), timeout=30)
        got = infer(step("e", "typed", back=4), timeout=30)  # "To be, or not t" + "e"
        want = infer(step("To be, or not te", "whole", sequence_start=True), timeout=30)
        assert got.parameters["seqserve_steps"].int64_param == want.parameters["seqserve_steps"].int64_param == 16
        np.testing.assert_allclose(probs(got), probs(want), atol=1e-6)
        with pytest.raises(grpc.RpcError) as err:  # without a sequence there is nothing to take back from
            infer(pb.ModelInferRequest(model_name="charlm", inputs=step("a", "x", back=1).inputs), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sequence_id" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # past what the sequence keeps
            infer(step("", "typed", back=15), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "input BACKSPACE" in err.value.details()
