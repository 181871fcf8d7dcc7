"""Fixtures of the hardening suite: a private server per test (its own settings, the in-memory store unless a
test asks for another), raw channels that send bytes no client library would, and metric readers."""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from tests.conftest import ServerHandle, server_settings
from tests.service.security.certs import Pair, Pki, make_pki

KSERVE = "/inference.GRPCInferenceService/"
Input = pb.ModelInferRequest.InferInputTensor


def https(
    port: int, ca: Path, path: str, body: bytes | None = None, client: Pair | None = None, **headers: str
) -> tuple[int, bytes]:
    """(status, body) of one request over TLS to 127.0.0.1:``port``, trusting ``ca`` (and presenting ``client``'s
    certificate); a failed handshake raises (``ssl.SSLError``, ``URLError``, ``ConnectionError``)."""
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    request = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=body)
    for key, value in headers.items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="session")
def plain(tiny_models: Path) -> Iterator[ServerHandle]:
    """One shared server with default settings on the in-memory store (tests must not stop it)."""
    handle = ServerHandle(server_settings(tiny_models, session_store="memory://"))
    yield handle
    handle.close()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def raw_unary(target: str, method: str, payload: bytes, timeout: float = 10.0, **kw: Any) -> Any:
    """Sends ``payload`` as the request bytes of ``method``; returns the raw response bytes or raises
    grpc.RpcError."""
    with grpc.insecure_channel(target) as channel:
        return channel.unary_unary(method)(payload, timeout=timeout, **kw)


def rpc_count(handle: ServerHandle, service: str, method: str, code: str, model: str = "") -> float:
    labels = {"service": service, "method": method, "model": model, "code": code}
    return handle.server.metrics.registry.get_sample_value("seqserve_rpc_requests_total", labels) or 0.0


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """True once ``check()`` is (a stream's status reaches the client a moment before the server's metrics
    interceptor has counted the call)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def infer_request(model: str, *inputs: Input, version: str = "", **params: Any) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version, inputs=list(inputs))
    for key, value in params.items():
        p = request.parameters[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.uint64_param = value
        else:
            p.string_param = value
    return request


def text_input(text: str, name: str = "TEXT") -> Input:
    return Input(
        name=name, datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[text.encode()])
    )
