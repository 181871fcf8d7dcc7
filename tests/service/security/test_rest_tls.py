"""TLS and mTLS on the REST port: it speaks TLS with the gRPC port's certificate, reaches the gRPC port (TLS only)
over a private Unix socket, and with a client CA names each caller as the gRPC port names the same certificate."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import socket
import ssl
import stat
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.http as triton
from cryptography import x509
from cryptography.x509.oid import NameOID

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.principals import GATEWAY_SUBJECT, GATEWAY_TOKEN
from service.client import Client
from service.settings import Settings
from tests.conftest import ServerHandle
from tests.service.security.certs import Pair, Pki
from tests.service.security.conftest import eventually, https
from tests.service.security.test_tls import _creds, tls_settings

Code = grpc.StatusCode
A = x509.NameAttribute
KEY = "rest-tls-key-0123456789"


def rest(
    handle: ServerHandle, pki: Pki, path: str, body: bytes | None = None, client: Pair | None = None, **headers: str
) -> tuple[int, bytes]:
    """(status, body) of one request over TLS to the REST port."""
    return https(handle.server.http_port or 0, pki.ca, path, body, client, **headers)


def triton_client(handle: ServerHandle, pki: Pki, client: Pair | None = None) -> triton.InferenceServerClient:
    options: dict[str, Any] = {"ca_certs": str(pki.ca)}
    if client is not None:
        options |= {"certfile": str(client.cert), "keyfile": str(client.key)}
    return triton.InferenceServerClient(f"127.0.0.1:{handle.server.http_port}", ssl=True, ssl_options=options)


def sentiment_over(c: triton.InferenceServerClient) -> np.ndarray:
    text = triton.InferInput("TEXT", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"a fine , moving film", b"dull and far too long"], dtype=object))
    result = c.infer("sentiment", [text], outputs=[triton.InferRequestedOutput("PROBABILITIES")])
    return np.asarray(result.as_numpy("PROBABILITIES"))


def test_rest_may_be_set_with_tls() -> None:
    s = Settings(http_port=8000, tls_cert=Path("cert.pem"), tls_key=Path("key.pem"))
    assert (s.http_port, s.tls_cert) == (8000, Path("cert.pem"))


def test_the_rest_port_speaks_tls_with_the_grpc_ports_certificate(serve: Callable[..., ServerHandle], pki: Pki) -> None:
    """Stock tritonclient.http (``ssl=True``) gets what a gRPC caller gets; plaintext HTTP to the port fails
    and leaves it serving; the gateway's socket lives in a folder only the server's user may enter, gone at stop."""
    handle = serve(http_port=0, **tls_settings(pki))
    c = triton_client(handle, pki)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("sentiment")
    over_rest = sentiment_over(c)
    with Client(handle.target, tls_ca=pki.ca) as grpc_client:
        over_grpc = [r.probabilities for r in grpc_client.classify(["a fine , moving film", "dull and far too long"])]
    assert np.allclose(over_rest, np.asarray(over_grpc), atol=1e-6)
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{handle.server.http_port}/v2/health/live", timeout=5)
    assert rest(handle, pki, "/v2/health/ready")[0] == 200
    folder = Path(str(handle.server.gateway_target).removeprefix("unix:")).parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()
    handle.stop()
    assert not folder.exists()


def test_with_mtls_every_rest_request_needs_a_client_certificate(serve: Callable[..., ServerHandle], pki: Pki) -> None:
    handle = serve(http_port=0, **tls_settings(pki, mtls=True))
    for path in ("/v2/health/live", "/v2/models/sentiment", "/v2/no/such/path"):
        status, body = rest(handle, pki, path)
        assert status == 403 and "needs a client certificate" in json.loads(body)["error"], body
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):  # another CA's: the handshake fails
        rest(handle, pki, "/v2/health/live", client=pki.stranger)
    assert rest(handle, pki, "/v2/health/live", client=pki.alice)[0] == 200
    assert sentiment_over(triton_client(handle, pki, pki.alice)).shape == (2, 2)


def test_an_mtls_caller_is_the_same_principal_over_rest_and_grpc(
    serve: Callable[..., ServerHandle], pki: Pki, log_state: Callable[..., io.StringIO]
) -> None:
    """The REST port spells a certificate's subject as gRPC's auth context does (RFC 2253: last attribute first,
    short names, escapes, ``+`` in a multi-valued RDN; ``san=`` for an empty subject), checked on the access lines
    of one call each way, for subjects that exercise each rule."""
    handle = serve(http_port=0, access_log=True, **tls_settings(pki, mtls=True))
    out = log_state("INFO", "json")
    multi = x509.RelativeDistinguishedName([A(NameOID.COMMON_NAME, "m1"), A(NameOID.USER_ID, "u7")])
    subjects: dict[str, tuple[x509.Name, list[x509.GeneralName]]] = {
        "special": (
            x509.Name(
                [A(NameOID.COMMON_NAME, 'a,b+c"d\\e<f>g;h'), A(NameOID.ORGANIZATIONAL_UNIT_NAME, "#lead trail ")]
            ),
            [],
        ),
        "spaces": (x509.Name([A(NameOID.COMMON_NAME, " x ")]), []),
        "utf8": (x509.Name([A(NameOID.COMMON_NAME, "José 東京"), A(NameOID.COUNTRY_NAME, "DE")]), []),
        "multi": (x509.Name([multi, x509.RelativeDistinguishedName([A(NameOID.DOMAIN_COMPONENT, "org")])]), []),
        "many": (
            x509.Name(
                [
                    A(oid, "v")
                    for oid in (
                        NameOID.EMAIL_ADDRESS,
                        NameOID.SERIAL_NUMBER,
                        NameOID.STATE_OR_PROVINCE_NAME,
                        NameOID.LOCALITY_NAME,
                        NameOID.STREET_ADDRESS,
                        NameOID.TITLE,
                        NameOID.SURNAME,
                        NameOID.GIVEN_NAME,
                        NameOID.BUSINESS_CATEGORY,
                        NameOID.POSTAL_CODE,
                        NameOID.PSEUDONYM,
                        NameOID.DN_QUALIFIER,
                        NameOID.GENERATION_QUALIFIER,
                        NameOID.INITIALS,
                        x509.ObjectIdentifier("2.5.4.13"),
                        x509.ObjectIdentifier("2.5.4.41"),
                    )
                ]
            ),
            [],
        ),
        "control": (x509.Name([A(NameOID.COMMON_NAME, "a\x7fb\x01")]), []),
        "ipv6": (x509.Name([]), [x509.IPAddress(ipaddress.ip_address("2001:db8::1"))]),
        "email": (x509.Name([]), [x509.RFC822Name("w@example.org"), x509.DNSName("z.example.org")]),
    }
    pairs = {stem: pki.issue(stem, *subject) for stem, subject in subjects.items()} | {"alice": pki.alice}
    for pair in pairs.values():
        with grpc.secure_channel(handle.target, _creds(pki, pair.cert, pair.key)) as channel:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
        assert rest(handle, pki, "/v2", client=pair)[0] == 200
    method = "/inference.GRPCInferenceService/ServerMetadata"
    assert eventually(lambda: out.getvalue().count(method) >= 2 * len(pairs))
    lines = [json.loads(line) for line in out.getvalue().splitlines() if method in line]
    seen = [line["principal"] for line in lines if line.get("method") == method]
    assert seen[::2] == seen[1::2] and len(set(seen)) == len(pairs), seen  # gRPC, then REST, per certificate
    assert "O=seqserve-tests,CN=alice" in seen and "san=2001:db8::1" in seen and "san=w@example.org" in seen


def test_a_subject_the_rest_port_cannot_spell_is_refused_not_renamed(
    serve: Callable[..., ServerHandle], pki: Pki
) -> None:
    """gRPC prints attributes its TLS library has no name for as OID=#DER bytes, which Python's ssl does not
    expose: such a caller is refused with what to do, never given a principal that differs from its gRPC one."""
    handle = serve(http_port=0, **tls_settings(pki, mtls=True))
    pair = pki.issue("odd", x509.Name([A(x509.ObjectIdentifier("1.2.3.4.5"), "v"), A(NameOID.COMMON_NAME, "c")]), [])
    status, body = rest(handle, pki, "/v2", client=pair)
    assert status == 403 and "cannot spell" in json.loads(body)["error"] and "1.2.3.4.5" in json.loads(body)["error"]
    with grpc.secure_channel(handle.target, _creds(pki, pair.cert, pair.key)) as channel:  # (gRPC names it)
        assert pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live


def test_mtls_with_api_keys_needs_both_over_rest(serve: Callable[..., ServerHandle], pki: Pki) -> None:
    """With API keys the key names the principal, and the certificate is still required, as on the gRPC port
    (whose handshake asks for it)."""
    handle = serve(http_port=0, api_key=KEY, **tls_settings(pki, mtls=True))
    assert rest(handle, pki, "/v2/models/sentiment", Authorization=f"Bearer {KEY}")[0] == 403
    assert rest(handle, pki, "/v2/models/sentiment", client=pki.alice)[0] == 401
    assert rest(handle, pki, "/v2/models/sentiment", client=pki.alice, Authorization=f"Bearer {KEY}")[0] == 200


def test_only_the_gateway_can_vouch_for_a_subject(serve: Callable[..., ServerHandle], pki: Pki) -> None:
    """The subject header counts only with the gateway's token, which never leaves the server: a caller on the
    gateway's socket without it is refused, and a TLS caller who sends the headers stays its certificate."""
    handle = serve(http_port=0, admin_principals=["O=seqserve-tests,CN=alice"], **tls_settings(pki, mtls=True))
    forged = ((GATEWAY_SUBJECT, "O=seqserve-tests,CN=alice"), (GATEWAY_TOKEN, "0" * 32))
    with grpc.insecure_channel(handle.server.gateway_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for metadata in ((), forged, forged[:1]):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=metadata, timeout=10)
            assert refused.value.code() == Code.UNAUTHENTICATED
    with grpc.secure_channel(handle.target, _creds(pki, pki.bob.cert, pki.bob.key)) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name="sentiment"), metadata=forged, timeout=10
            )
        assert refused.value.code() == Code.PERMISSION_DENIED and "CN=bob" in refused.value.details()
    status, body = rest(handle, pki, "/v2/repository/models/sentiment/unload", b"{}", client=pki.bob)
    assert status == 403 and "CN=bob" in json.loads(body)["error"]
    assert rest(handle, pki, "/v2/repository/models/sentiment/unload", b"{}", client=pki.alice)[0] == 200
    assert rest(handle, pki, "/v2/repository/models/sentiment/load", b"{}", client=pki.alice)[0] == 200


def test_a_tls_handshake_that_never_comes_does_not_hold_the_port(serve: Callable[..., ServerHandle], pki: Pki) -> None:
    """A connection that sends plaintext, or nothing, where the TLS handshake should be gets no HTTP answer and is
    closed (the silent one after the idle timeout); other callers are served meanwhile."""
    handle = serve(http_port=0, http_idle_timeout_seconds=1.0, **tls_settings(pki))
    port = handle.server.http_port or 0
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as silent,
        socket.create_connection(("127.0.0.1", port), timeout=10) as plaintext,
    ):
        plaintext.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert rest(handle, pki, "/v2/health/live")[0] == 200
        for conn in (plaintext, silent):
            received = b""
            with contextlib.suppress(ConnectionResetError):  # (closed with data unread: a reset)
                while chunk := conn.recv(1024):  # a timeout here: the server kept the connection open
                    received += chunk
            assert b"HTTP/" not in received
