"""Certificate rotation without a restart: when the files SEQSERVE_TLS_CERT/KEY/CLIENT_CA name are replaced (as
cert-manager or a Secret volume does), new connections on every port get the new certificate and client CA, open
ones keep working, and a replacement that does not load is logged and ignored until the files change again."""

from __future__ import annotations

import io
import os
import shutil
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import ServerHandle
from tests.service.security.certs import Pair, Pki, make_pki
from tests.service.security.conftest import eventually, https
from tests.service.security.test_tls import _creds


def install(live: Path, server: Pair, ca: Path, key: Path | None = None) -> None:
    """Replaces the live files as a Secret volume does: each new file written aside, then renamed into place."""
    for source, name in ((server.cert, "server.crt"), (key or server.key, "server.key"), (ca, "ca.crt")):
        shutil.copyfile(source, live / f".{name}.new")
        os.replace(live / f".{name}.new", live / name)


def grpc_ok(handle: ServerHandle, trust: Pki, client: Pair) -> bool:
    with grpc.secure_channel(handle.target, _creds(trust, client.cert, client.key)) as channel:
        try:
            return bool(pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5).live)
        except grpc.RpcError:
            return False


def https_status(port: int, path: str, trust: Pki, client: Pair) -> int | None:
    """The status, or None when the TLS handshake fails (a certificate the client does not trust, or the other
    way round)."""
    try:
        return https(port, trust.ca, path, client=client)[0]
    except (urllib.error.URLError, ssl.SSLError, ConnectionError):
        return None


def everywhere(handle: ServerHandle, trust: Pki, client: Pair) -> tuple[bool, int | None, int | None]:
    """(gRPC, REST, /metrics) for a new connection from ``client`` that trusts ``trust``'s CA."""
    rest = https_status(handle.server.http_port or 0, "/v2/health/ready", trust, client)
    return (
        grpc_ok(handle, trust, client),
        rest,
        https_status(handle.server.metrics_port or 0, "/metrics", trust, client),
    )


@pytest.fixture
def pkis(tmp_path: Path) -> tuple[Pki, Pki, Path]:
    """Two unrelated PKIs (old and new) and the folder of live files, holding the old one's."""
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    install(live, old.server, old.ca)
    return old, new, live


def live_settings(live: Path) -> dict[str, Path]:
    return {"tls_cert": live / "server.crt", "tls_key": live / "server.key", "tls_client_ca": live / "ca.crt"}


def test_new_connections_get_the_rotated_certificate_and_client_ca_on_every_port(
    serve: Callable[..., ServerHandle], pkis: tuple[Pki, Pki, Path]
) -> None:
    old, new, live = pkis
    handle = serve(http_port=0, **live_settings(live))
    assert everywhere(handle, old, old.alice) == (True, 200, 200)
    assert everywhere(handle, new, new.alice) == (False, None, None)
    kept = grpc.secure_channel(handle.target, _creds(old, old.alice.cert, old.alice.key))
    stub = pb_grpc.GRPCInferenceServiceStub(kept)
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live  # (connected before the rotation)
    install(live, new.server, new.ca)
    assert eventually(lambda: everywhere(handle, new, new.alice) == (True, 200, 200), timeout=10)
    assert everywhere(handle, old, old.alice) == (False, None, None)  # old trust and old client CA: refused
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live  # an open connection keeps working
    kept.close()
    context = ssl.create_default_context(cafile=str(new.ca))
    context.load_cert_chain(new.alice.cert, new.alice.key)
    url = f"https://127.0.0.1:{handle.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, context=context, timeout=10) as r:
        text = r.read().decode()
    assert "seqserve_tls_reloads_total 1.0" in text
    (expiry,) = [line for line in text.splitlines() if line.startswith("seqserve_tls_certificate_expiry_timestamp")]
    assert 'subject="O=seqserve-tests,CN=localhost"' in expiry and float(expiry.split()[-1]) > 1.7e9


def test_a_replacement_that_does_not_load_is_ignored_until_the_files_change_again(
    serve: Callable[..., ServerHandle],
    pkis: tuple[Pki, Pki, Path],
    log_state: Callable[..., io.StringIO],
) -> None:
    """The new certificate with the old key (the key file not replaced yet, say): the server goes on with the old
    pair, says so once in its log, and takes the new pair when the key arrives."""
    old, new, live = pkis
    handle = serve(http_port=0, **live_settings(live))
    out = log_state("INFO", "text")
    install(live, new.server, new.ca, key=old.server.key)  # mismatched
    # (the files are looked at when a connection comes, at most once a second)
    assert eventually(lambda: grpc_ok(handle, old, old.alice) and "do not load" in out.getvalue(), timeout=10)
    assert everywhere(handle, old, old.alice)[0] and everywhere(handle, new, new.alice) == (False, None, None)
    assert everywhere(handle, old, old.alice) == (True, 200, 200)
    assert out.getvalue().count("do not load") == 1  # (said once, not on every connection)
    shutil.copyfile(new.server.key, live / "server.key")
    assert eventually(lambda: everywhere(handle, new, new.alice) == (True, 200, 200), timeout=10)
    assert "TLS certificate reloaded" in out.getvalue()
