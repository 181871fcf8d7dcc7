"""gRPC connection settings on a real server: a client's keepalive pings against the server's ping policy, and
connection ages (a client is moved to a new connection; the calls in flight on the old one finish)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.server import grpc_options
from service.client import ApiError, Client
from service.settings import Settings
from tests.conftest import ServerHandle
from tests.service.kserve.procs import CLIENT_SCRIPT, start_server, stop_server

# A client that pings every second (gRPC's C core pings no more often), also between calls and without waiting
# for data: what mobile and NAT-traversing clients configure, at longer intervals (10 s and more).
PINGING = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def test_options_follow_the_settings() -> None:
    default = dict(grpc_options(Settings()))
    assert default["grpc.keepalive_time_ms"] == 7_200_000 and default["grpc.keepalive_timeout_ms"] == 20_000
    assert default["grpc.keepalive_permit_without_calls"] == 1
    assert default["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert default["grpc.http2.max_ping_strikes"] == 2
    assert not {
        "grpc.max_connection_age_ms",
        "grpc.max_connection_age_grace_ms",
        "grpc.max_connection_idle_ms",
        "grpc.max_concurrent_streams",
    } & set(default)  # gRPC's own default: no limit
    tuned = dict(
        grpc_options(
            Settings(
                grpc_min_ping_interval_seconds=0,
                grpc_max_ping_strikes=0,
                grpc_keepalive_permit_without_calls=False,
                grpc_max_connection_age_seconds=1800,
                grpc_max_connection_age_grace_seconds=0.0005,
                grpc_max_connection_idle_seconds=600,
                grpc_max_concurrent_streams=100,
            )
        )
    )
    assert tuned["grpc.max_concurrent_streams"] == 100
    assert tuned["grpc.http2.min_ping_interval_without_data_ms"] == 0 and tuned["grpc.http2.max_ping_strikes"] == 0
    assert tuned["grpc.keepalive_permit_without_calls"] == 0
    assert tuned["grpc.max_connection_age_ms"] == 1_800_000 and tuned["grpc.max_connection_idle_ms"] == 600_000
    assert tuned["grpc.max_connection_age_grace_ms"] == 1  # never rounded down to 0


def test_settings_refuse_what_grpc_cannot_hold() -> None:
    with pytest.raises(ValueError, match="grpc_max_connection_age_seconds"):
        Settings(grpc_max_connection_age_seconds=30 * 86400)  # beyond int32 milliseconds
    with pytest.raises(ValueError, match="grpc_keepalive_seconds"):
        Settings(grpc_keepalive_seconds=0)


def test_one_connection_past_its_stream_limit_waits_and_others_do_not(serve: Callable[..., ServerHandle]) -> None:
    """GRPC_MAX_CONCURRENT_STREAMS=1: while a stream is open on a connection, another call on that connection waits
    (here past its deadline) and a call on another connection is answered; once the stream ends, the waiting
    connection calls again. Without the limit the same call is answered at once (the setting reaches gRPC)."""
    for limit, blocked in ((1, True), (0, False)):
        server = serve(grpc_max_concurrent_streams=limit)
        own = [("grpc.use_local_subchannel_pool", 1)]  # two connections (channels alike would share one)
        with grpc.insecure_channel(server.target, own) as busy, grpc.insecure_channel(server.target, own) as other:
            stream = Stream(busy)
            try:
                assert not stream.step(3, start=True).error_message  # the stream is open on `busy`
                live = pb_grpc.GRPCInferenceServiceStub(busy).ServerLive
                if blocked:
                    with pytest.raises(grpc.RpcError) as info:
                        live(pb.ServerLiveRequest(), timeout=1.0)
                    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                else:
                    assert live(pb.ServerLiveRequest(), timeout=5.0).live
                assert pb_grpc.GRPCInferenceServiceStub(other).ServerLive(pb.ServerLiveRequest(), timeout=5).live
            finally:
                stream.close()
            # The stream ended: its slot is free again.
            assert pb_grpc.GRPCInferenceServiceStub(busy).ServerLive(pb.ServerLiveRequest(), timeout=5).live


def _step(sequence: int, start: bool) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="charlm")
    r.parameters["sequence_id"].int64_param = sequence
    if start:
        r.parameters["sequence_start"].bool_param = True
    r.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"e")
    return r


class Stream:
    """One KServe ModelStreamInfer stream that sends a step when told and returns its answer."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._out: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
        self._answers = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(self._requests())

    def _requests(self) -> Iterator[pb.ModelInferRequest]:
        while (r := self._out.get()) is not None:
            yield r

    def step(self, sequence: int, start: bool = False) -> pb.ModelStreamInferResponse:
        self._out.put(_step(sequence, start))
        answer: pb.ModelStreamInferResponse = next(self._answers)
        return answer

    def close(self) -> None:
        self._out.put(None)


def _idle_stream(target: str) -> tuple[pb.ModelStreamInferResponse, int | grpc.RpcError]:
    """A stream's first step, then 6 s without a word while the client pings, then its second step: (the first
    answer, the second answer's step count or the stream's error). Against a policy it breaks, the third strike
    closes the connection after about 4 s."""
    with grpc.insecure_channel(target, options=PINGING) as channel:
        stream = Stream(channel)
        try:
            first = stream.step(7, start=True)
            time.sleep(6)
            try:
                return first, stream.step(7).infer_response.parameters["seqserve_steps"].int64_param
            except grpc.RpcError as exc:
                return first, exc
        finally:
            stream.close()


def test_an_idle_stream_survives_the_pings_the_policy_allows(serve: Callable[..., ServerHandle]) -> None:
    server = serve(grpc_min_ping_interval_seconds=0.5)
    first, second = _idle_stream(server.target)
    assert not first.error_message and second == 2  # the same sequence, one step further


def test_pings_faster_than_the_policy_allows_end_the_connection(serve: Callable[..., ServerHandle]) -> None:
    """The same client against gRPC's default policy (one ping in 300 s while the server sends nothing): the
    server closes the connection, and the open stream with it. (What the default of 10 s avoids for clients
    that ping every 10 s or more.)"""
    server = serve(grpc_min_ping_interval_seconds=300)
    first, second = _idle_stream(server.target)
    assert not first.error_message
    assert isinstance(second, grpc.RpcError) and second.code() == grpc.StatusCode.UNAVAILABLE
    assert "ping" in (second.details() or "").lower()


def test_an_aged_connection_is_replaced_while_its_stream_finishes(serve: Callable[..., ServerHandle]) -> None:
    """With a connection age of 1 s: a client calling for 4 s is moved to new connections (its channel becomes
    ready again) and no call fails; a stream opened on the first connection keeps answering past the age, its
    sequence intact (the grace period is unlimited by default)."""
    server = serve(grpc_max_connection_age_seconds=1.0)
    ready = 0
    seen = threading.Lock()

    def watch(state: grpc.ChannelConnectivity) -> None:
        nonlocal ready
        if state == grpc.ChannelConnectivity.READY:
            with seen:
                ready += 1

    with grpc.insecure_channel(server.target) as streaming, grpc.insecure_channel(server.target) as calling:
        calling.subscribe(watch, try_to_connect=True)
        unary = pb_grpc.GRPCInferenceServiceStub(calling)
        stream = Stream(streaming)
        try:
            steps = [stream.step(9, start=True).infer_response.parameters["seqserve_steps"].int64_param]
            deadline = time.monotonic() + 4.0
            while time.monotonic() < deadline:
                assert unary.ServerLive(pb.ServerLiveRequest(), timeout=10).live
                steps.append(stream.step(9).infer_response.parameters["seqserve_steps"].int64_param)
                time.sleep(0.05)
        finally:
            stream.close()
            calling.unsubscribe(watch)
    assert steps == list(range(1, len(steps) + 1))
    with seen:
        assert ready >= 2, f"the calling channel connected {ready} time(s) in 4 s with a 1 s connection age"


def test_a_stream_cut_off_after_the_grace_period_carries_on_in_a_new_one(serve: Callable[..., ServerHandle]) -> None:
    """Age 1 s and grace 1 s: the stream on the old connection ends within a few seconds; the client opens
    another and the sequence continues from its last answered step (the state is the server's, not the
    stream's)."""
    server = serve(grpc_max_connection_age_seconds=1.0, grpc_max_connection_age_grace_seconds=1.0)
    with grpc.insecure_channel(server.target) as channel:
        stream = Stream(channel)
        try:
            answered = stream.step(11, start=True).infer_response.parameters["seqserve_steps"].int64_param
            deadline = time.monotonic() + 10.0
            with pytest.raises(grpc.RpcError) as cut:
                while time.monotonic() < deadline:
                    answered = stream.step(11).infer_response.parameters["seqserve_steps"].int64_param
                    time.sleep(0.05)
        finally:
            stream.close()
        assert cut.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), cut.value
        again = Stream(channel)  # the channel has connected again by now, or does so for this stream
        try:
            after = again.step(11).infer_response
        finally:
            again.close()
    # The step in flight when the stream was cut may or may not have been applied (as after any deadline):
    # the next answer says where the sequence is.
    assert after.parameters["seqserve_steps"].int64_param in (answered + 1, answered + 2)
    assert answered >= 2


def _thinking_user(client: Client) -> list[int] | ApiError:
    """A Suggest stream whose user types, thinks for 6 s, and types again: the steps of both answers, or the
    stream's error."""

    def events() -> Iterator[str]:
        yield "To be"
        time.sleep(6)
        yield ", or"

    with client.session("charlm") as s:
        try:
            return [r.steps for r in client.suggest(s.id, events())]
        except ApiError as exc:
            return exc


@pytest.mark.parametrize(("policy", "survives"), [(0.5, True), (300.0, False)])
def test_the_client_pings_a_quiet_stream_when_asked(
    serve: Callable[..., ServerHandle], policy: float, survives: bool
) -> None:
    """``Client(keepalive_seconds=1)`` pings through the user's pause: a server that allows it answers both
    events; one with gRPC's default policy closes the connection (which it would not do to a client that never
    pings: that is how the test knows the pings were sent)."""
    server = serve(grpc_min_ping_interval_seconds=policy)
    with Client(server.target, keepalive_seconds=1) as client:
        outcome = _thinking_user(client)
    if survives:
        assert outcome == [5, 9]
    else:
        assert isinstance(outcome, ApiError) and outcome.code == grpc.StatusCode.UNAVAILABLE, outcome


def test_the_client_checks_its_keepalive() -> None:
    for bad in (0.5, 0, -1, float("nan"), 86401):
        with pytest.raises(ValueError, match="keepalive_seconds"):
            Client("127.0.0.1:1", keepalive_seconds=bad)
    with Client("127.0.0.1:1", keepalive_seconds=10):
        pass


@pytest.mark.parametrize(("policy", "survives"), [(0.5, True), (300.0, False)])
def test_tritonclient_with_keepalive_options(serve: Callable[..., ServerHandle], policy: float, survives: bool) -> None:
    """The stock tritonclient with ``KeepAliveOptions`` pinging every second, its stream quiet for 6 s between two
    steps of a sequence (in its own interpreter: ``tests/service/kserve/triton_client.py``)."""
    server = serve(grpc_min_ping_interval_seconds=policy)
    done = subprocess.run(
        [sys.executable, str(CLIENT_SCRIPT), "--url", server.target, "--keepalive", "6"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    answers = json.loads(done.stdout)["answers"]
    if survives:
        assert answers == [5, 9]
    else:
        assert answers[0] == 5 and answers[1]["status"] == "StatusCode.UNAVAILABLE", answers


@pytest.mark.parametrize(("policy", "survives"), [("0.5", True), ("300", False)])
def test_every_frontend_applies_the_ping_policy(tiny_models: Path, tmp_path: Path, policy: str, survives: bool) -> None:
    """``seqserve serve --workers 2`` (the layout a server with two cores or more runs by default): the gRPC
    servers are the frontend processes, and they apply the settings too."""
    proc, info = start_server(
        tiny_models, tmp_path, SEQSERVE_WORKERS="2", SEQSERVE_GRPC_MIN_PING_INTERVAL_SECONDS=policy
    )
    try:
        first, second = _idle_stream(f"127.0.0.1:{info['grpc_port']}")
    finally:
        stop_server(proc)
    assert not first.error_message
    if survives:
        assert second == 2
    else:
        assert isinstance(second, grpc.RpcError) and second.code() == grpc.StatusCode.UNAVAILABLE
