"""Server-side sessions through the API: feeding text in chunks equals feeding it whole, concurrent calls on
one session are serialized (no lost steps), and forks evolve independently."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import grpc
import numpy as np
import pytest

from service.client import ApiError, Client, SuggestEvent
from service.core.types import Suggestion
from tests.conftest import ServerHandle

TEXT = "To be, or not to be: that is the question."


def texts(suggestions: list[Suggestion]) -> list[tuple[str, float]]:
    return [(s.text, round(s.logprob, 4)) for s in suggestions]


def test_suggest_in_chunks_equals_whole(client: Client) -> None:
    with client.session("charlm") as whole, client.session("charlm") as pieces:
        once = client.suggest_once(whole.id, TEXT, n=3, max_chars=6)
        cuts = [0, 1, 7, 8, 20, 33, len(TEXT)]
        events = [SuggestEvent(TEXT[a:b], n=3, max_chars=6) for a, b in pairwise(cuts)]
        last = list(client.suggest(pieces.id, events))[-1]
    assert once.steps == last.steps == len(TEXT)
    assert texts(once.suggestions) == texts(last.suggestions)


def test_complete_after_chunked_session_equals_stateless_prompt(client: Client) -> None:
    stateless = "".join(c.text for c in client.complete(TEXT, max_chars=25, temperature=0.0))
    with client.session("charlm") as s:
        for piece in (TEXT[:5], TEXT[5:30], TEXT[30:]):
            client.suggest_once(s.id, piece)
        stateful = "".join(c.text for c in client.complete("", session_id=s.id, max_chars=25, temperature=0.0))
    assert stateful == stateless


def test_concurrent_calls_on_one_session_lose_no_steps(client: Client) -> None:
    with client.session("charlm") as s:

        def feed(i: int) -> int:
            return client.suggest_once(s.id, "ab", n=1, max_chars=2).steps

        with ThreadPoolExecutor(max_workers=8) as pool:
            seen = sorted(pool.map(feed, range(16)))
        # Each call saw the session after its own 2 characters and nobody else's in between.
        assert seen == [2 * (i + 1) for i in range(16)]
        assert client.get_session(s.id).steps == 32


def test_fork_is_independent(client: Client) -> None:
    with client.session("charlm") as parent:
        client.suggest_once(parent.id, "Hello, ")
        with client.session("charlm") as reference:
            client.suggest_once(reference.id, "Hello, ")
            child = client.fork_session(parent.id)
            try:
                # Advance only the child; the parent must still match an identical, untouched session.
                client.suggest_once(child.id, "zzzzzz")
                p = client.suggest_once(parent.id, "wor")
                r = client.suggest_once(reference.id, "wor")
                c = client.get_session(child.id)
            finally:
                client.delete_session(child.id)
    assert p.steps == r.steps == len("Hello, wor")
    assert texts(p.suggestions) == texts(r.suggestions)
    assert c.steps == len("Hello, zzzzzz")


def test_forecast_fork_is_independent(client: Client) -> None:
    rng = np.random.default_rng(3)
    rows = (10 + rng.normal(0, 1, (30, 7))).astype(np.float32)
    with client.session("forecaster") as s, client.session("forecaster") as reference:
        client.observe(s.id, rows[:24])
        fork = client.fork_session(s.id)
        try:
            moved = client.observe(fork.id, rows[24:])  # only the fork sees rows 24..29
            parent = client.observe(s.id, rows[24:25])
            expected = client.observe(reference.id, rows[:25])
        finally:
            client.delete_session(fork.id)
    assert moved.rows_seen == 30 and parent.rows_seen == expected.rows_seen == 25
    np.testing.assert_allclose(parent.point, expected.point, rtol=1e-5, atol=1e-5)


def test_complete_on_a_session_checks_a_named_version(client: Client) -> None:
    """A Complete on a session runs on the session's model; a version named without a name must be the session's
    (it was ignored), and version 0 is refused as without a session."""
    with client.session("charlm") as s:
        for kwargs, code in (({"version": 7}, grpc.StatusCode.FAILED_PRECONDITION),
                             ({"model": "charlm", "version": 0}, grpc.StatusCode.INVALID_ARGUMENT),
                             ({"version": 0}, grpc.StatusCode.INVALID_ARGUMENT)):  # fmt: skip
            with pytest.raises(ApiError) as info:
                list(client.complete("a", session_id=s.id, max_chars=2, **kwargs))
            assert info.value.code == code, (kwargs, info.value)
        assert client.get_session(s.id).steps == 0  # nothing ran
        assert len(list(client.complete("a", session_id=s.id, max_chars=2, version=1))) == 2


def test_suggest_once_takes_a_timeout(client: Client) -> None:
    """Like every other client call (it went into SuggestEvent and raised TypeError)."""
    with client.session("charlm") as s:
        assert client.suggest_once(s.id, "abc", timeout=30, n=2, max_chars=1).steps == 3


def test_a_session_of_a_model_left_out_of_load_models_says_how_to_load_it(
    start_server: Callable[..., ServerHandle],
) -> None:
    """A blob of a model this server was told not to load (load_models) is not a rolling update: UNAVAILABLE
    naming the setting and RepositoryModelLoad, with no retry time (waiting would not help); unloading such a
    model is a no-op, as Triton's unload of a model it never loaded; once loaded on request the blob imports."""
    from service.api.gen.inference import grpc_service_pb2 as kpb
    from service.api.gen.inference import grpc_service_pb2_grpc as kpb_grpc

    key = "k" * 32
    everything, subset = (
        start_server(session_signing_key=key),
        start_server(session_signing_key=key, load_models=["charlm"]),
    )
    with Client(everything.target) as a, Client(subset.target, retries=3) as b:
        s = a.create_session("forecaster")
        blob = a.export_session(s.id)
        started = time.monotonic()
        with pytest.raises(ApiError) as info:
            b.import_session(blob)
        assert time.monotonic() - started < 0.9  # refused at once, not retried
        err = info.value
        assert err.code == grpc.StatusCode.UNAVAILABLE and err.retry_after is None, err.message
        assert "the session blob holds a session of model forecaster version 1, which is not loaded: this server " \
               "loads ['charlm'] (load_models); load it with RepositoryModelLoad" in err.message  # fmt: skip
        with grpc.insecure_channel(subset.target) as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            stub.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="forecaster"), timeout=30)
            stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="forecaster"), timeout=60)
        assert b.import_session(blob).model == "forecaster"
