"""Replicas as real ``seqserve serve`` processes sharing one Redis: ``kill -9`` of the replica serving a live
Suggest stream and a live KServe v2 stream loses no acknowledged step (the client carries on at the other
replica, which takes the sessions over once the dead one's lease runs out), and a restart of every replica keeps
every session. Outputs are compared with an uninterrupted run on a single in-process server."""

from __future__ import annotations

import queue
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import grpc
import numpy as np

from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.client import Client, SuggestEvent
from tests.conftest import ServerHandle
from tests.redis.servers import RedisServer
from tests.redis.test_replicas import suggestions
from tests.service.kserve.procs import start_server, stop_server
from tests.service.sessions.v2 import charlm_request, probs

TEXT = "When in disgrace with fortune and men's eyes"


class Live:
    """A bidirectional stream fed one message at a time: ``send`` waits for the answer."""

    def __init__(self, open_stream: Callable[[Iterator[object]], Iterator[object]]) -> None:
        self._q: queue.Queue[object] = queue.Queue()
        self._answers = open_stream(iter(self._q.get, None))

    def send(self, message: object) -> object:
        self._q.put(message)
        return next(self._answers)


def replica(repo: Path, workdir: Path, url: str) -> tuple[subprocess.Popen[bytes], str]:
    workdir.mkdir(parents=True, exist_ok=True)
    proc, ports = start_server(repo, workdir, SEQSERVE_SESSION_STORE=url, SEQSERVE_SESSION_LEASE_SECONDS="1")
    return proc, f"127.0.0.1:{ports['grpc_port']}"


def test_kill_9_loses_no_acknowledged_step_and_a_restart_keeps_every_session(
    tiny_models: Path, tmp_path: Path, redis_server: RedisServer, start_replica: Callable[..., ServerHandle]
) -> None:
    url = redis_server.url
    (pa, ta), (pb_, tb) = replica(tiny_models, tmp_path / "a", url), replica(tiny_models, tmp_path / "b", url)
    try:
        a = Client(ta, timeout=30)
        sid = a.create_session("charlm").id
        typing = Live(lambda events: a.suggest(sid, cast(Iterator[SuggestEvent], events)))
        with grpc.insecure_channel(ta) as channel:
            v2 = Live(pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer)
            acked = 0
            for i in range(0, 20, 4):  # both streams live on replica a; every answer acknowledges a step
                typing.send(SuggestEvent(TEXT[i : i + 4], n=1, max_chars=1))
                r = v2.send(charlm_request(TEXT[i : i + 4], "seq", sequence_start=i == 0))
                assert not r.error_message  # type: ignore[attr-defined]
                acked = i + 4
            pa.send_signal(signal.SIGKILL)
            pa.wait()
        # The client carries on at replica b: the first call waits for a's lease to run out.
        b = Client(tb, timeout=30)
        assert b.get_session(sid).steps == acked
        moved = suggestions(b, sid, TEXT[acked:30])
        with grpc.insecure_channel(tb) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            got = stub.ModelInfer(charlm_request(TEXT[acked:30], "seq"), timeout=30)
            assert got.parameters["seqserve_steps"].int64_param == 30
        ref_server = start_replica("memory://")
        ref = Client(ref_server.target)
        rid = ref.create_session("charlm").id
        ref.suggest_once(rid, TEXT[:acked])
        assert moved == suggestions(ref, rid, TEXT[acked:30])
        with grpc.insecure_channel(ref_server.target) as channel:
            want = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                charlm_request(TEXT[:30], "seq", sequence_start=True), timeout=30
            )
        np.testing.assert_allclose(probs(got), probs(want), atol=1e-6)

        # Every replica restarts (SIGTERM; no replica alive in between): both sessions go on where they stood.
        stop_server(pb_)
        (pa, ta), (pb_, tb) = replica(tiny_models, tmp_path / "a2", url), replica(tiny_models, tmp_path / "b2", url)
        assert Client(tb).get_session(sid).steps == 30
        assert suggestions(Client(ta), sid, TEXT[30:]) == suggestions(ref, rid, TEXT[30:])
        with grpc.insecure_channel(tb) as channel:
            got = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(charlm_request(TEXT[30:], "seq"), timeout=30)
        with grpc.insecure_channel(ref_server.target) as channel:
            want = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                charlm_request(TEXT[30:], "seq", sequence_end=True), timeout=30
            )
        np.testing.assert_allclose(probs(got), probs(want), atol=1e-6)
    finally:
        for p in (pa, pb_):
            if p.poll() is None:
                stop_server(p)
