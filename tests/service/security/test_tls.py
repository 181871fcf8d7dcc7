"""TLS and mTLS on the gRPC and metrics ports: the typed client, the CLI and stock tritonclient (``ssl=True``)
get through; plaintext and strangers fail cleanly; with mTLS the certificate's subject is the principal."""

from __future__ import annotations

import contextlib
import gc
import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from service.api.gen.inference import grpc_service_pb2 as kserve_pb
from service.api.gen.inference import grpc_service_pb2_grpc as kserve_grpc
from service.api.gen.seqserve.v1 import sessions_pb2, sessions_pb2_grpc
from service.cli import main
from service.client import ApiError, AsyncClient, Client
from service.settings import Settings
from tests.conftest import ServerHandle
from tests.service.security.certs import Pki

Code = grpc.StatusCode


def tls_settings(pki: Pki, mtls: bool = False) -> dict[str, Path]:
    out = {"tls_cert": pki.server.cert, "tls_key": pki.server.key}
    if mtls:
        out["tls_client_ca"] = pki.ca
    return out


def https_get(port: int, pki: Pki, client: tuple[Path, Path] | None = None, path: str = "/metrics") -> int:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client is not None:
        context.load_cert_chain(*client)
    with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=context, timeout=10) as r:
        return int(r.status)


def test_tls_on_both_ports(serve: Callable[..., ServerHandle], pki: Pki) -> None:
    handle = serve(**tls_settings(pki))
    with Client(handle.target, tls_ca=pki.ca) as c:
        assert c.classify(["a fine film"])[0].label
        with c.session("charlm") as s:
            assert c.suggest_once(s.id, "abc").steps == 3
    assert https_get(handle.server.metrics_port or 0, pki) == 200
    assert https_get(handle.server.metrics_port or 0, pki, path="/readyz") == 200


def test_the_metrics_port_closes_each_tls_connection_when_its_request_is_done(
    serve: Callable[..., ServerHandle], pki: Pki
) -> None:
    """After a response with "Connection: close" the server closes the TLS connection at once (it used to leave it
    open, in CLOSE-WAIT once the client left, until the watchdog's deadline: 30 s per connection by default)."""
    import socket

    port = serve(**tls_settings(pki)).server.metrics_port or 0
    context = ssl.create_default_context(cafile=str(pki.ca))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(3):
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
            ):
                tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                received = b""
                while chunk := tls.recv(65536):  # a timeout here: the server kept the connection open
                    received += chunk
            assert received.startswith(b"HTTP/1.") and b" 200 " in received.split(b"\r\n")[0]
        gc.collect()
    # Closed by the server, not left to the garbage collector (which warns of each socket it has to close).
    assert not [w for w in seen if "unclosed" in str(w.message) and "SSLSocket" in str(w.message)]


def test_plaintext_to_a_tls_port_fails_cleanly(serve: Callable[..., ServerHandle], pki: Pki) -> None:
    handle = serve(**tls_settings(pki))
    with Client(handle.target, timeout=5) as plain, pytest.raises(ApiError) as info:
        plain.classify(["x"])
    assert info.value.code == Code.UNAVAILABLE
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{handle.server.metrics_port}/metrics", timeout=5)
    with Client(handle.target, tls_ca=pki.ca) as c:
        assert c.classify(["still serving"])[0].label
    assert https_get(handle.server.metrics_port or 0, pki) == 200


def test_mtls_subject_is_the_principal(serve: Callable[..., ServerHandle], pki: Pki) -> None:
    handle = serve(**tls_settings(pki, mtls=True))
    alice = Client(handle.target, tls_ca=pki.ca, tls_cert=pki.alice.cert, tls_key=pki.alice.key)
    bob = Client(handle.target, tls_ca=pki.ca, tls_cert=pki.bob.cert, tls_key=pki.bob.key)
    with alice, bob:
        s = alice.create_session("charlm")
        assert alice.get_session(s.id).id == s.id
        with pytest.raises(ApiError) as info:
            bob.get_session(s.id)
        assert info.value.code == Code.NOT_FOUND
    with grpc.secure_channel(handle.target, _creds(pki, pki.alice.cert, pki.alice.key)) as channel:
        stub = sessions_pb2_grpc.SessionsStub(channel)
        assert stub.Get(sessions_pb2.GetSessionRequest(session_id=s.id), timeout=10).session_id == s.id
    owner = handle.run(handle.server.dataplane.sessions.store.load(s.id))
    assert owner is not None and owner.owner == "O=seqserve-tests,CN=alice"


async def test_the_async_client_speaks_mtls_with_its_certificate(serve: Callable[..., ServerHandle], pki: Pki) -> None:
    """``AsyncClient`` builds its grpc.aio channel from the same files: alice's session is hers over it too."""
    handle = serve(**tls_settings(pki, mtls=True))
    async with (
        AsyncClient(handle.target, tls_ca=pki.ca, tls_cert=pki.alice.cert, tls_key=pki.alice.key) as alice,
        AsyncClient(handle.target, tls_ca=pki.ca, tls_cert=pki.bob.cert, tls_key=pki.bob.key) as bob,
        AsyncClient(handle.target, tls_ca=pki.ca, timeout=10) as nobody,
    ):
        s = await alice.create_session("charlm")
        assert (await alice.get_session(s.id)).id == s.id
        with pytest.raises(ApiError) as other:
            await bob.get_session(s.id)
        assert other.value.code == Code.NOT_FOUND
        with pytest.raises(ApiError) as anonymous:  # no client certificate: the handshake fails
            await nobody.get_session(s.id)
        assert anonymous.value.code in (Code.UNAVAILABLE, Code.UNAUTHENTICATED)


def test_mtls_certificates_with_an_empty_subject_are_named_by_their_san(
    serve: Callable[..., ServerHandle], pki: Pki
) -> None:
    """An empty subject is not the anonymous principal (which owns everything on a server without auth and may
    manage models): such a certificate is ``san=<its first SAN>``, isolated like any other principal."""
    handle = serve(**tls_settings(pki, mtls=True))
    one, two = (Client(handle.target, tls_ca=pki.ca, tls_cert=w.cert, tls_key=w.key) for w in pki.workers)
    with one, two:
        s = one.create_session("charlm")
        for call in (lambda: two.get_session(s.id), lambda: two.delete_session(s.id)):
            with pytest.raises(ApiError) as info:
                call()
            assert info.value.code == Code.NOT_FOUND
    with grpc.secure_channel(handle.target, _creds(pki, pki.workers[1].cert, pki.workers[1].key)) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            kserve_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
                kserve_pb.RepositoryModelUnloadRequest(model_name="sentiment"), timeout=10
            )
        assert refused.value.code() == Code.PERMISSION_DENIED and "san=worker2.example.org" in refused.value.details()
    owner = handle.run(handle.server.dataplane.sessions.store.load(s.id))
    assert owner is not None and owner.owner == "san=spiffe://example.org/worker"


def test_an_mtls_subject_can_be_an_admin_principal(serve: Callable[..., ServerHandle], pki: Pki) -> None:
    """SEQSERVE_ADMIN_PRINCIPALS holds whole subjects (with their commas) when separated by semicolons."""
    admins = Settings(
        admin_principals=cast(Any, "O=seqserve-tests,CN=alice;san=spiffe://example.org/worker")
    ).admin_principals
    handle = serve(admin_principals=admins, **tls_settings(pki, mtls=True))
    for pair, allowed in ((pki.alice, True), (pki.workers[0], True), (pki.bob, False)):
        with grpc.secure_channel(handle.target, _creds(pki, pair.cert, pair.key)) as channel:
            stub = kserve_grpc.GRPCInferenceServiceStub(channel)
            try:
                stub.RepositoryModelLoad(kserve_pb.RepositoryModelLoadRequest(model_name="sentiment"), timeout=30)
                assert allowed
            except grpc.RpcError as e:
                assert not allowed and e.code() == Code.PERMISSION_DENIED


def _creds(pki: Pki, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    read: Callable[[Path | None], bytes | None] = lambda p: p.read_bytes() if p is not None else None  # noqa: E731
    return grpc.ssl_channel_credentials(pki.ca.read_bytes(), read(key), read(cert))


@pytest.mark.parametrize("who", ["nobody", "stranger"])
def test_mtls_refuses_clients_without_a_certificate_of_its_ca(
    serve: Callable[..., ServerHandle], pki: Pki, who: str
) -> None:
    handle = serve(**tls_settings(pki, mtls=True))
    pair = (pki.stranger.cert, pki.stranger.key) if who == "stranger" else (None, None)
    with grpc.secure_channel(handle.target, _creds(pki, *pair)) as channel, pytest.raises(grpc.RpcError) as info:
        sessions_pb2_grpc.SessionsStub(channel).Get(sessions_pb2.GetSessionRequest(session_id="x"), timeout=5)
    assert info.value.code() == Code.UNAVAILABLE
    port = handle.server.metrics_port or 0
    if who == "nobody":  # probes without a certificate reach health and readiness, never the metrics
        assert https_get(port, pki, None, "/healthz") == https_get(port, pki, None, "/readyz") == 200
        with pytest.raises(urllib.error.HTTPError) as denied:
            https_get(port, pki, None)
        assert denied.value.code == 403
    else:  # a certificate from another CA fails the handshake
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            https_get(port, pki, (pki.stranger.cert, pki.stranger.key), "/healthz")
    assert https_get(port, pki, (pki.alice.cert, pki.alice.key)) == 200


def test_mtls_with_api_keys_names_the_principal_by_key(serve: Callable[..., ServerHandle], pki: Pki) -> None:
    handle = serve(**tls_settings(pki, mtls=True), api_keys="carol:carol-key-0123456789")
    tls = {"tls_ca": pki.ca, "tls_cert": pki.alice.cert, "tls_key": pki.alice.key}
    with Client(handle.target, api_key="carol-key-0123456789", **tls) as carol:  # type: ignore[arg-type]
        s = carol.create_session("charlm")
    assert handle.run(handle.server.dataplane.sessions.store.load(s.id)).owner == "carol"  # type: ignore[union-attr]
    with Client(handle.target, **tls) as keyless, pytest.raises(ApiError) as info:  # type: ignore[arg-type]
        keyless.get_session(s.id)
    assert info.value.code == Code.UNAUTHENTICATED


def test_cli_tls_flags(serve: Callable[..., ServerHandle], pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    handle = serve(**tls_settings(pki, mtls=True))
    flags = ["--target", handle.target, "--tls-ca", str(pki.ca)]
    assert main(["classify", *flags, "--tls-cert", str(pki.alice.cert), "--tls-key", str(pki.alice.key), "ok"]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["classify", *flags, "--timeout", "5", "no client certificate"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_tls_settings_are_checked_at_start(serve: Callable[..., ServerHandle], pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        Settings(tls_cert=pki.server.cert)
    with pytest.raises(ValueError, match="needs tls_cert"):
        Settings(tls_client_ca=pki.ca)
    with pytest.raises(RuntimeError, match="SEQSERVE_TLS_CERT"):
        serve(tls_cert=pki.server.cert, tls_key=pki.alice.key)  # a key that does not match the certificate
    with pytest.raises(RuntimeError, match="cannot read"):
        serve(tls_cert=tmp_path / "missing.crt", tls_key=pki.server.key)


TRITON_SSL = """
import json, sys
import numpy as np
import tritonclient.grpc as g
url, ca, cert, key = sys.argv[1:5]
with g.InferenceServerClient(url, ssl=True, root_certificates=ca, private_key=key, certificate_chain=cert) as c:
    t = g.InferInput("TEXT", [1], "BYTES")
    t.set_data_from_numpy(np.array([b"abc"], dtype=np.object_))
    r = c.infer("charlm", [t], sequence_id=7, sequence_start=True)
    steps = r.get_response().parameters["seqserve_steps"].int64_param
    print(json.dumps({"live": c.is_server_live(), "ready": c.is_model_ready("charlm"), "steps": steps}))
"""


def test_tritonclient_with_ssl(serve: Callable[..., ServerHandle], pki: Pki) -> None:
    """Stock tritonclient, in its own interpreter (its protos must not meet ours), over mTLS."""
    handle = serve(**tls_settings(pki, mtls=True))
    args = [handle.target, str(pki.ca), str(pki.alice.cert), str(pki.alice.key)]
    done = subprocess.run([sys.executable, "-c", TRITON_SSL, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {"live": True, "ready": True, "steps": 3}


def test_failed_handshakes_write_nothing_past_the_log_settings(tiny_models: Path, pki: Pki, tmp_path: Path) -> None:
    """gRPC's C core wrote one INFO line per failed TLS handshake straight to stderr, whatever SEQSERVE_LOG_LEVEL
    and LOG_FORMAT=json said: anyone could fill the log before authenticating. `seqserve serve` now sets
    GRPC_VERBOSITY=ERROR before gRPC loads (unless it is set)."""
    import os
    import socket

    from tests.service.kserve.procs import start_server, stop_server

    env = {"SEQSERVE_TLS_CERT": str(pki.server.cert), "SEQSERVE_TLS_KEY": str(pki.server.key)}
    env |= {"SEQSERVE_LOG_FORMAT": "json", "SEQSERVE_WORKERS": "1"}
    saved = os.environ.pop("GRPC_VERBOSITY", None)  # (the server's own default applies)
    try:
        proc, info = start_server(tiny_models, tmp_path, **env)
    finally:
        if saved is not None:
            os.environ["GRPC_VERBOSITY"] = saved
    try:
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", info["grpc_port"]), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                s.settimeout(5)
                with contextlib.suppress(OSError):
                    s.recv(100)
    finally:
        stop_server(proc)
    lines = [line for line in (tmp_path / "server.log").read_text().splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), [x for x in lines if not x.startswith("{")][:3]


def test_the_cli_says_tls_not_a_missing_server_when_a_handshake_fails(
    serve: Callable[..., ServerHandle], pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plaintext client at a TLS port, or a client without the certificate an mTLS server asks for, was told
    "no server answers ...: start one": the server was up and the fix is a TLS flag."""
    handle = serve(**tls_settings(pki, mtls=True))
    for flags, says in (
        ([], "if it serves TLS, pass --tls-ca CA (and --tls-cert/--tls-key where it asks for client certificates"),
        (["--tls-ca", str(pki.ca)], "if it asks for a client certificate (mTLS), pass --tls-cert and --tls-key"),
    ):
        assert main(["classify", "--target", handle.target, "--timeout", "10", *flags, "a fine film"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: UNAVAILABLE: ") and "no server answers" not in err, err
        assert f"a server at {handle.target} closed the connection during the TLS handshake" in err and says in err
    cert, key = str(pki.alice.cert), str(pki.alice.key)
    assert (
        main(
            ["classify", "--target", handle.target, "--tls-ca", str(pki.ca), "--tls-cert", cert, "--tls-key", key, "x"]
        )
        == 0
    )


def test_a_server_that_loads_an_expired_certificate_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """It served without a word (every client's handshake then failed, and gRPC logs nothing for those), where
    ``seqserve check`` fails the same file."""
    from service.api.tls import TlsFiles
    from tests.service.security.certs import self_signed

    expired, fresh = (
        self_signed(tmp_path, stem, "seqserve.example", days) for stem, days in (("old", -2), ("new", 90))
    )
    with caplog.at_level("WARNING", logger="service.api.tls"):
        TlsFiles(fresh.cert, fresh.key, None)
        assert not caplog.records
        TlsFiles(expired.cert, expired.key, None)
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith(f"TLS certificate {expired.cert} (CN=seqserve.example) expired 2.0 days ago: every client")
