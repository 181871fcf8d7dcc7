"""A bounded fuzz suite over every RPC of both APIs (plus health and reflection): structured requests with
hostile values, corrupt bytes, and concurrent calls racing on one session. Whatever comes in, the server answers
with a status that is never UNKNOWN or INTERNAL, within the deadline, and a control session stays exactly as it
was. Examples are few (a few hundred in all, some tens of seconds) and the same each run (tests/conftest.py's
"repeatable" profile; HYPOTHESIS_PROFILE=explore draws new ones)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api.gen.inference import grpc_service_pb2 as pb
from service.client import ApiError, Client
from service.core.types import SuggestResult
from tests.conftest import ServerHandle, server_settings
from tests.fuzz.messages import Rpc, mutate, request_for, rpcs

DEADLINE = 20.0
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}
RPCS = rpcs()
FUZZ = settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Target:
    """The server under fuzz, a raw channel to it, and the control session that must never change."""

    def __init__(self, handle: ServerHandle) -> None:
        self.handle = handle
        self.channel = grpc.insecure_channel(handle.target)
        self.client = Client(handle.target, timeout=DEADLINE)
        self.control = self.client.create_session("charlm").id
        self.client.suggest_once(self.control, "To be, or not", n=1, max_chars=1)
        self.expected = self.look()

    def look(self) -> tuple[int, SuggestResult]:
        """The control session's steps and its suggestions (which read its state without changing it)."""
        fork = self.client.fork_session(self.control)
        try:
            return self.client.get_session(self.control).steps, self.client.suggest_once(fork.id, "", n=3, max_chars=3)
        finally:
            self.client.delete_session(fork.id)

    def call(self, rpc: Rpc, payloads: list[bytes]) -> grpc.StatusCode:
        """Sends raw request bytes (one message, or a stream of them); returns the final status."""
        kw: dict[str, Any] = {"timeout": DEADLINE}
        try:
            if rpc.client_streaming:
                call = self.channel.stream_stream(rpc.path)(iter(payloads), **kw)
                for _ in call:
                    pass
            elif rpc.server_streaming:
                for _ in self.channel.unary_stream(rpc.path)(payloads[0], **kw):
                    pass
            else:
                self.channel.unary_unary(rpc.path)(payloads[0], **kw)
        except grpc.RpcError as err:
            return err.code()
        return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def target(tiny_models: Path) -> Iterator[Target]:
    handle = ServerHandle(server_settings(tiny_models, session_store="memory://", max_generate_chars=300))
    t = Target(handle)
    yield t
    t.client.close()
    t.channel.close()
    handle.close()


def check(code: grpc.StatusCode, what: str) -> None:
    assert code not in FORBIDDEN, f"{what}: {code.name}"


@pytest.mark.parametrize("rpc", RPCS, ids=[r.path.rsplit(".", 1)[-1] for r in RPCS])
def test_structured_requests(target: Target, rpc: Rpc) -> None:
    @FUZZ
    @given(st.lists(request_for(rpc), min_size=1, max_size=3))
    def run(requests: list[Any]) -> None:
        check(target.call(rpc, [r.SerializeToString() for r in requests]), rpc.path)

    run()


@pytest.mark.parametrize("rpc", RPCS, ids=[r.path.rsplit(".", 1)[-1] for r in RPCS])
def test_corrupt_bytes(target: Target, rpc: Rpc) -> None:
    edits = st.lists(st.tuples(st.integers(0, 64), st.integers(0, 256)), min_size=1, max_size=4)

    @FUZZ
    @given(request_for(rpc), edits, st.binary(max_size=48))
    def run(valid: Any, how: list[tuple[int, int]], noise: bytes) -> None:
        for payload in (mutate(valid.SerializeToString(), how), noise):
            check(target.call(rpc, [payload]), rpc.path)

    run()


OPS = ["suggest", "complete", "cancel", "fork", "delete", "get", "observe", "infer"]


def _race_op(target: Target, op: str, sid: str) -> grpc.StatusCode:
    c = target.client
    try:
        if op == "suggest":
            c.suggest_once(sid, "ab", n=2, max_chars=3)
        elif op == "complete":
            list(c.complete("x", session_id=sid, max_chars=20, seed=1))
        elif op == "cancel":
            stream = c.complete("x", session_id=sid, max_chars=200, seed=1)
            next(stream, None)
            stream.close()
        elif op == "fork":
            c.delete_session(c.fork_session(sid).id)
        elif op == "delete":
            c.delete_session(sid)
        elif op == "get":
            c.get_session(sid)
        elif op == "observe":
            c.observe(sid, np.ones((2, 7)))
        else:  # a v2 sequence named like the session: another namespace, never the session itself
            text = pb.InferTensorContents(bytes_contents=[b"q"])
            tensor = pb.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1], contents=text)
            request = pb.ModelInferRequest(model_name="charlm", inputs=[tensor])
            request.parameters["sequence_id"].string_param = sid
            request.parameters["sequence_start"].bool_param = True
            target.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(
                request.SerializeToString(), timeout=DEADLINE
            )
    except ApiError as err:
        return err.code
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_concurrent_calls_racing_on_one_session(target: Target) -> None:
    @settings(FUZZ, max_examples=40)
    @given(st.lists(st.sampled_from(OPS), min_size=2, max_size=6))
    def run(ops: list[str]) -> None:
        sid = target.client.create_session("charlm").id
        codes: list[tuple[str, grpc.StatusCode]] = []
        failures: list[tuple[str, BaseException]] = []  # anything but a status must reach the test

        def race(op: str) -> None:
            try:
                codes.append((op, _race_op(target, op, sid)))
            except BaseException as e:
                failures.append((op, e))

        threads = [threading.Thread(target=race, args=(op,)) for op in ops]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=2 * DEADLINE)
        assert not any(t.is_alive() for t in threads), "a call hung"
        assert failures == [] and len(codes) == len(ops), (failures, codes)
        for op, code in codes:
            check(code, op)
        try:  # the session, if it survived, is still usable: one more character advances it by one step
            first = target.client.suggest_once(sid, "a", n=1, max_chars=1).steps
            assert target.client.suggest_once(sid, "b", n=1, max_chars=1).steps == first + 1
        except ApiError as err:
            assert err.code == grpc.StatusCode.NOT_FOUND and "delete" in ops

    run()


def test_the_control_session_is_unchanged(target: Target) -> None:
    steps, suggestions = target.look()
    assert steps == target.expected[0]
    assert [s.text for s in suggestions.suggestions] == [s.text for s in target.expected[1].suggestions]
    assert [s.logprob for s in suggestions.suggestions] == pytest.approx(
        [s.logprob for s in target.expected[1].suggestions]
    )
    assert target.client.classify(["the server still answers"])[0].label
