"""TLS for both ports, from ``SEQSERVE_TLS_CERT`` / ``SEQSERVE_TLS_KEY`` (and ``SEQSERVE_TLS_CLIENT_CA`` for mTLS).

The gRPC port gets ``grpc.ssl_server_credentials``; the metrics port an ``ssl.SSLContext`` with the same files.
With a client CA, the gRPC port requires a client certificate it signed for every call (health included: gRPC
Python cannot make it optional), and the metrics port requires one for ``/metrics`` while ``/healthz`` and
``/readyz`` stay open to probes. Unreadable or mismatched files fail the
start with a message naming the setting.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from service.settings import Settings


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RuntimeError(f"{setting}={path}: cannot read it ({exc.strerror or exc})") from exc


def grpc_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """None when TLS is off (plaintext port)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    cert = _read(settings.tls_cert, "SEQSERVE_TLS_CERT")
    key = _read(settings.tls_key, "SEQSERVE_TLS_KEY")
    ca = _read(settings.tls_client_ca, "SEQSERVE_TLS_CLIENT_CA") if settings.tls_client_ca is not None else None
    ssl_context(settings)  # grpc accepts mismatched files silently and fails every handshake: check them here
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The metrics port's server context (TLS 1.2+), or None when TLS is off. With a client CA, a client
    certificate is requested and verified; ``/metrics`` requires one (``service.api.http``)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise RuntimeError(
            f"SEQSERVE_TLS_CERT={settings.tls_cert} / SEQSERVE_TLS_KEY={settings.tls_key}: not a PEM certificate "
            f"chain and its private key ({exc})"
        ) from exc
    if settings.tls_client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(settings.tls_client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise RuntimeError(f"SEQSERVE_TLS_CLIENT_CA={settings.tls_client_ca}: not a PEM CA bundle ({exc})") from exc
        # Optional at the handshake (a certificate that is presented must verify): probes without one still reach
        # /healthz and /readyz; the HTTP server refuses /metrics to a connection without a verified certificate.
        context.verify_mode = ssl.CERT_OPTIONAL
    return context
