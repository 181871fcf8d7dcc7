"""What health probes see while a server drains (docs/deploy.md, "Stop"): after SIGTERM an open health Watch hears
NOT_SERVING and ends OK, but a new Check, on a new or an open connection, gets UNAVAILABLE (the port takes no new
calls), not NOT_SERVING; the metrics port's /readyz answers 503; the image's HEALTHCHECK reports not ready. A real
server, its drain held open by a Suggest stream in flight."""

from __future__ import annotations

import queue
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.gen.seqserve.v1 import autocomplete_pb2
from service.client import Client
from service.healthcheck import ready
from tests.conftest import ServerHandle

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def readyz(port: int | None) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_draining_server_refuses_new_health_checks(start_server: Callable[..., ServerHandle]) -> None:
    handle = start_server()
    events: queue.Queue[autocomplete_pb2.SuggestRequest | None] = queue.Queue()

    def requests() -> Iterator[autocomplete_pb2.SuggestRequest]:
        while (event := events.get(timeout=60)) is not None:
            yield event

    env = {"SEQSERVE_PORT": str(handle.port)}
    with Client(handle.target) as client, grpc.insecure_channel(handle.target) as kept:
        stub = health_pb2_grpc.HealthStub(kept)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
        assert ready(env)[0] and readyz(handle.server.metrics_port) == 200
        watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == SERVING
        session = client.create_session("charlm")
        suggest = client._autocomplete.Suggest(requests(), timeout=60)  # in flight: holds the drain open
        events.put(autocomplete_pb2.SuggestRequest(session_id=session.id, appended="To be"))
        assert next(suggest).steps == 5

        stopping = handle.begin_stop(grace=30)  # what SIGTERM does
        assert (
            list(watch) == [health_pb2.HealthCheckResponse(status=NOT_SERVING)] and watch.code() == grpc.StatusCode.OK
        )
        with grpc.insecure_channel(handle.target) as new:  # the open connection, and a new one (kubelet's)
            for channel in (kept, new):
                with pytest.raises(grpc.RpcError) as refused:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # not NOT_SERVING
        ok, why = ready(env)
        assert not ok and why.endswith("UNAVAILABLE"), why
        assert readyz(handle.server.metrics_port) == 503
        assert not stopping.done()  # (all of it while the drain waited for the stream)
        events.put(None)
        assert list(suggest) == [] and suggest.code() == grpc.StatusCode.OK
        stopping.result(60)
