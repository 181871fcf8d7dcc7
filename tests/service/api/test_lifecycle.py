"""Health transitions, graceful shutdown, reflection, metrics, the edge's INTERNAL path and its registration."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import shutil
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from service import errors
from service.api.gen.seqserve.v1 import autocomplete_pb2
from service.api.interceptors import EdgedServer, _EdgeMethod, build_edge
from service.client import ApiError, Client
from service.metrics import Metrics
from tests.conftest import ServerHandle

OURS = ["seqserve.v1.Sentiment", "seqserve.v1.Autocomplete", "seqserve.v1.Forecast", "seqserve.v1.Sessions"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        status: int = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status
        return status


def test_health_serving_overall_and_per_service(server: ServerHandle) -> None:
    assert health(server.target) == SERVING
    for name in [*OURS, *server.server.services]:
        assert health(server.target, name) == SERVING, name


def test_health_not_serving_without_models(start_server: Callable[..., ServerHandle], tmp_path: Path) -> None:
    handle = start_server(models=tmp_path)
    assert health(handle.target) == NOT_SERVING
    assert health(handle.target, "seqserve.v1.Sentiment") == NOT_SERVING


def test_health_per_service_follows_the_loaded_tasks(
    start_server: Callable[..., ServerHandle], tiny_models: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_models / "charlm", tmp_path / "charlm")  # only the char LM
    handle = start_server(models=tmp_path)
    assert health(handle.target) == SERVING
    assert health(handle.target, "seqserve.v1.Autocomplete") == SERVING
    assert health(handle.target, "seqserve.v1.Sessions") == SERVING
    assert health(handle.target, "seqserve.v1.Sentiment") == NOT_SERVING
    assert health(handle.target, "seqserve.v1.Forecast") == NOT_SERVING


def test_graceful_shutdown_finishes_in_flight_calls(start_server: Callable[..., ServerHandle]) -> None:
    handle = start_server()
    events: queue.Queue[autocomplete_pb2.SuggestRequest | None] = queue.Queue()

    def requests() -> Iterator[autocomplete_pb2.SuggestRequest]:
        while (event := events.get(timeout=60)) is not None:
            yield event

    with Client(handle.target) as client, grpc.insecure_channel(handle.target) as channel:
        session = client.create_session("charlm")
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == SERVING
        suggest = client._autocomplete.Suggest(requests(), timeout=60)  # a raw bidi call we keep open
        events.put(autocomplete_pb2.SuggestRequest(session_id=session.id, appended="To be"))
        assert next(suggest).steps == 5

        stopping = handle.begin_stop(grace=30)  # what SIGTERM does
        assert next(watch).status == NOT_SERVING  # watchers hear it at once
        watch.cancel()
        # The in-flight stream keeps working during the grace period...
        events.put(autocomplete_pb2.SuggestRequest(session_id=session.id, appended=", or"))
        assert next(suggest).steps == 9
        # ...while new calls are refused.
        with pytest.raises(ApiError) as refused:
            client.classify(["good"], timeout=10)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        events.put(None)  # the client finishes its stream normally
        assert list(suggest) == []
        assert suggest.code() == grpc.StatusCode.OK
        stopping.result(60)


def test_health_watches_end_when_the_server_drains(start_server: Callable[..., ServerHandle]) -> None:
    """A watcher hears NOT_SERVING and its stream then ends OK: an open Watch (a load balancer's) was a call in flight
    that held every shutdown for its whole grace, then ended UNAVAILABLE. Watches of a service the server does not
    know (SERVICE_UNKNOWN, never notified of a change) end too."""
    handle = start_server()
    with grpc.insecure_channel(handle.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watches = {name: stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=120) for name in ("", "x.Y")}
        assert next(watches[""]).status == SERVING
        assert next(watches["x.Y"]).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        stopping = handle.begin_stop(grace=120)
        assert [r.status for r in watches[""]] == [NOT_SERVING]
        assert list(watches["x.Y"]) == []
        assert (watches[""].code(), watches["x.Y"].code()) == (grpc.StatusCode.OK, grpc.StatusCode.OK)
        stopping.result(60)  # the drain waited for no watcher: well inside its 120 s grace


def test_reflection_lists_and_describes_every_service(server: ServerHandle) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        listed = {s.name for s in reply.list_services_response.service}
        assert {*OURS, "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= listed
        assert "grpc.reflection.v1alpha.ServerReflection" in listed
        # What grpcurl does: rebuild the descriptors from the server alone.
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        autocomplete = pool.FindServiceByName("seqserve.v1.Autocomplete")
        assert {m.name for m in autocomplete.methods} == {"Complete", "Suggest"}
        complete = autocomplete.methods_by_name["Complete"]
        assert complete.server_streaming and not complete.client_streaming
        assert "seed" in pool.FindMessageTypeByName("seqserve.v1.CompleteRequest").fields_by_name


def test_health_and_reflection_need_no_api_key(start_server: Callable[..., ServerHandle]) -> None:
    handle = start_server(api_key="key-0123456789abcdef")
    assert health(handle.target) == SERVING
    with grpc.insecure_channel(handle.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert reply.list_services_response.service


def test_rpc_metrics_and_http_endpoint(start_server: Callable[..., ServerHandle]) -> None:
    handle = start_server()  # a private server: the counts below are exact
    with Client(handle.target, timeout=60) as client:
        with pytest.raises(ApiError):
            client.classify(["good"], model="metrics-probe")
        client.classify(["good"])
        client.classify(["good"], model="sentiment")
    registry = handle.server.metrics.registry
    labels = {"service": "seqserve.v1.Sentiment", "method": "Classify"}
    # Unknown model names share one label value; the request that named no model is labelled with the model
    # that served it (the default).
    failed = registry.get_sample_value(
        "seqserve_rpc_requests_total", {**labels, "model": "_other", "code": "NOT_FOUND"}
    )
    ok = registry.get_sample_value("seqserve_rpc_requests_total", {**labels, "model": "sentiment", "code": "OK"})
    assert (failed, ok) == (1.0, 2.0)
    assert handle.server.metrics_port
    base = f"http://127.0.0.1:{handle.server.metrics_port}"
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        assert b'seqserve_rpc_requests_total{code="NOT_FOUND"' in r.read()
    with urllib.request.urlopen(f"{base}/readyz", timeout=10) as r:
        assert r.status == 200


def test_session_addressed_rpcs_carry_the_sessions_model(start_server: Callable[..., ServerHandle]) -> None:
    handle = start_server()
    registry = handle.server.metrics.registry

    def count(service: str, method: str, model: str) -> float:
        labels = {"service": f"seqserve.v1.{service}", "method": method, "model": model, "code": "OK"}
        return registry.get_sample_value("seqserve_rpc_requests_total", labels) or 0.0

    with Client(handle.target, timeout=60) as client:
        s = client.create_session("charlm")
        client.get_session(s.id)
        assert len(list(client.suggest(s.id, ["To be"]))) == 1  # the whole stream: it ends OK before we look
        client.delete_session(client.fork_session(s.id).id)
        f = client.create_session("forecaster")
        client.observe(f.id, [[1.0] * 7])
    expected = {("Sessions", "Get", "charlm"): 1, ("Autocomplete", "Suggest", "charlm"): 1,
                ("Sessions", "Fork", "charlm"): 1, ("Sessions", "Delete", "charlm"): 1,
                ("Forecast", "Observe", "forecaster"): 1, ("Sessions", "Create", "charlm"): 1}  # fmt: skip
    assert {c: count(*c) for c in expected} == expected  # never model="" for a call that reached a session
    assert count("Sessions", "Get", "") == 0


@contextlib.asynccontextmanager
async def edged_channel(metrics: Metrics, register: Callable[[EdgedServer], None]) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a real aio server whose handlers ``register`` added through the edge (``EdgedServer``)."""
    server = grpc.aio.server()
    edged = EdgedServer(server, build_edge(metrics))
    register(edged)
    edged.close()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(0)


async def test_unexpected_exceptions_become_internal_with_a_request_id(caplog: pytest.LogCaptureFixture) -> None:
    """A real aio server with the real edge and handlers that fail in ways the core never should."""

    async def boom(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("secret internals")

    async def boom_later(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"first"
        raise KeyError("secret internals")

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(boom),
        "Stream": grpc.unary_stream_rpc_method_handler(boom_later),
    }
    metrics = Metrics()

    def register(edged: EdgedServer) -> None:
        edged.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Boom", handlers)])

    async with edged_channel(metrics, register) as channel:
        with caplog.at_level(logging.ERROR, logger="service.api.interceptors"):
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await channel.unary_unary("/test.Boom/Unary")(b"x")
            stream = channel.unary_stream("/test.Boom/Stream")(b"x")
            assert await stream.read() == b"first"
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                await stream.read()
    for err in (unary.value, streamed.value):
        assert err.code() == grpc.StatusCode.INTERNAL
        request_id = dict(err.trailing_metadata())["x-request-id"]
        assert err.details() == f"internal error (request id {request_id})"
        assert "secret" not in err.details()
        assert any(request_id in r.getMessage() and r.exc_info for r in caplog.records)
    code = {"service": "test.Boom", "method": "Unary", "model": "", "code": "INTERNAL"}
    assert metrics.registry.get_sample_value("seqserve_rpc_requests_total", code) == 1.0


async def test_the_edge_wraps_handlers_at_registration_once_per_method() -> None:
    """Services register on ``EdgedServer`` as generated code does (the same handlers generically and as registered
    methods): a call passes the edge exactly once (one request counted, the request id in the trailers, a domain
    error mapped), a handler registered only generically gets the edge too, and a method nobody registered gets
    our UNIMPLEMENTED answer. No interceptor is involved."""

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"bad":
            raise errors.InvalidInput("say something else")
        return request

    metrics = Metrics(runtime_collectors=False)

    def register(edged: EdgedServer) -> None:
        both = {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        edged.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Both", both)])
        edged.add_registered_method_handlers("test.Both", both)
        only = {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        edged.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Generic", only)])

    async with edged_channel(metrics, register) as channel:
        for service in ("test.Both", "test.Generic"):
            call = channel.unary_unary(f"/{service}/Echo")(b"hi")
            assert await call == b"hi"
            assert "x-request-id" in dict(await call.trailing_metadata())
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary(f"/{service}/Echo")(b"bad")
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details() == "say something else"
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await channel.unary_unary("/test.Nobody/Echo")(b"hi")
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "no method '/test.Nobody/Echo' on this server" in str(unknown.value.details())
    for service in ("test.Both", "test.Generic"):
        for code in ("OK", "INVALID_ARGUMENT"):
            labels = {"service": service, "method": "Echo", "model": "", "code": code}
            assert metrics.registry.get_sample_value("seqserve_rpc_requests_total", labels) == 1.0


def _free_elsewhere(listen: str, port: int) -> bool:
    """Whether ``port`` is free on the loopback that is not ``listen`` (or that loopback does not exist), as the
    server's own probe (``check_free``) finds it."""
    from service.api.server import check_free

    try:
        check_free("127.0.0.1" if ":" in listen else "::1", port, "")
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize(
    ("listen", "host"), [("::1", "localhost"), ("127.0.0.1", "localhost"), ("127.0.0.1", "127.0.0.1")]
)
def test_a_port_taken_on_any_address_grpc_would_bind_is_found_before_starting(listen: str, host: str) -> None:
    """gRPC binds both loopbacks for "localhost"; a listener on either takes the port (with SO_REUSEPORT gRPC would
    share it silently). The probe used to try 127.0.0.1 alone, so a server on [::1] went unnoticed."""
    import socket

    from service.api.server import check_free

    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    taken: socket.socket | None = None
    for _ in range(50):  # a port the other loopback does not use either (a client's connection may hold it there)
        try:
            taken = socket.socket(family, socket.SOCK_STREAM)
            taken.bind((listen, 0))
        except OSError as exc:  # a machine without IPv6 loopback
            if taken is not None:
                taken.close()
            pytest.skip(f"cannot listen on {listen}: {exc}")
        if _free_elsewhere(listen, taken.getsockname()[1]):
            break
        taken.close()
    else:
        pytest.fail("no port free on both loopbacks in 50 tries")
    assert taken is not None
    with taken:
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot bind {host}:{port}: another process listens there"):
            check_free(host, port, "--port or SEQSERVE_PORT")
    check_free(host, port, "--port or SEQSERVE_PORT")  # free again: no error


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_port_held_by_a_connection_is_named_as_such(host: str) -> None:
    """A port can be taken by a connection's local port, not a listener: the kernel hands clients ports from its
    ephemeral range, which holds gRPC's customary 50051. The refusal says so instead of blaming a listener, and
    says which range to stay out of; a listener on the same machine is still named as one."""
    import socket

    from service.api.server import check_free

    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            with accepted:
                port = client.getsockname()[1]  # the connection's own, kernel-chosen local port
                with pytest.raises(RuntimeError) as refused:
                    check_free(host, port, "--port or SEQSERVE_PORT")
                said = str(refused.value)
                assert said.startswith(f"cannot bind {host}:{port}: a socket on this machine holds the port"), said
                assert "most likely a connection's local port" in said and "ephemeral range (ports " in said, said
                assert "listens there" not in said and said.endswith("(--port or SEQSERVE_PORT)"), said
        listening = listener.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot bind {host}:{listening}: another process listens there"):
            check_free(host, listening, "--port or SEQSERVE_PORT")


async def test_a_watcher_mid_write_when_the_drain_begins_still_hears_not_serving() -> None:
    """enter_graceful_shutdown sets NOT_SERVING under each watched service's condition, whose lock a watcher holds
    except while it waits: a watcher still in its first write when the drain began resumed, saw the drain and ended
    without NOT_SERVING (the status not set yet). Under load the drain test above saw its Watch end empty."""
    from service.api.server import _Health

    health = _Health()
    written: list[int] = []
    gate = asyncio.Event()

    class Context:
        async def write(self, response: health_pb2.HealthCheckResponse) -> None:
            written.append(response.status)
            await gate.wait()  # the first write is still on its way when the drain begins

    watch = asyncio.create_task(health.Watch(health_pb2.HealthCheckRequest(service=""), Context()))
    while not written:
        await asyncio.sleep(0)
    drain = asyncio.create_task(health.enter_graceful_shutdown())
    for _ in range(5):
        await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(asyncio.gather(watch, drain), 10)
    assert written == [SERVING, NOT_SERVING]


class _Remaining:
    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds

    def time_remaining(self) -> float | None:
        return self.seconds


@pytest.mark.parametrize(
    ("remaining", "elapsed", "code"),
    [
        (0.0, 1.0, "DEADLINE_EXCEEDED"),
        (0.007, 1.0, "DEADLINE_EXCEEDED"),
        (2.0, 1.0, "CANCELLED"),
        (None, 1.0, "CANCELLED"),
        (0.005, 0.075, "DEADLINE_EXCEEDED"),  # an 80 ms deadline, cancelled at the client's end of it
        (0.007, 0.013, "DEADLINE_EXCEEDED"),  # a 20 ms deadline that passed, 7 ms still shown here
        (0.07, 0.01, "CANCELLED"),  # an 80 ms deadline, cancelled by the client 10 ms in
    ],
)
def test_a_cancel_at_the_clients_deadline_counts_as_its_deadline(
    remaining: float | None, elapsed: float, code: str
) -> None:
    """The client cancels at its deadline, counted from before it sent the call; the server's, counted from the
    headers' arrival, is a few ms later: with --workers 2 and the engine stalled, 7 of 8 calls whose 1 s deadline
    passed were counted CANCELLED (the error-ratio alerts leave those out) with 7 ms left here. The slack is at
    most half the whole deadline: a client's own cancel 10 ms into an 80 ms deadline was counted
    DEADLINE_EXCEEDED (within 0.1 s of it)."""
    start = time.perf_counter() - elapsed
    assert _EdgeMethod.ended(_Remaining(remaining), asyncio.CancelledError(), start) == code
