"""TLS for every port, from ``SEQSERVE_TLS_CERT`` / ``SEQSERVE_TLS_KEY`` (and ``SEQSERVE_TLS_CLIENT_CA`` for mTLS).

The gRPC port gets ``grpc.dynamic_ssl_server_credentials``; the metrics and REST ports an ``ssl.SSLContext`` with the
same files. With a client CA, the gRPC port requires a client certificate it signed for every call (health included:
gRPC Python cannot make it optional), and the HTTP ports verify one that is presented (the metrics port requires one
for ``/metrics`` while ``/healthz`` and ``/readyz`` stay open to probes; the REST port for every request).
Unreadable or mismatched files fail the start with a message naming the setting.

**Rotation without a restart.** The files are read again when they change (checked at most once a second, on a new
connection or handshake), as cert-manager or a Secret volume replaces them: new connections get the new certificate
(and client CA), connections already open keep theirs. A replacement that does not load (a key that does not match
its certificate, half-written files) is logged and ignored until the files change again: the server keeps serving
with what it had. ``seqserve_tls_certificate_expiry_timestamp_seconds`` says when the certificate in use expires.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from service.settings import Settings

log = logging.getLogger(__name__)

CHECK_SECONDS = 1.0  # the files are looked at no more often than this


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RuntimeError(f"{setting}={path}: cannot read it ({exc.strerror or exc})") from exc


class TlsFiles:
    """The certificate, key and client CA files of one process, reloaded when they change."""

    def __init__(
        self, cert: Path, key: Path, client_ca: Path | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._clock = clock
        self._lock = threading.Lock()
        self._contents = self._read_all()
        self._context = self._build(self._contents)  # (raises RuntimeError naming the setting)
        self.generation = 0  # of what is loaded: 0 = the files read at start, +1 per reload
        self._given_to_grpc = 0
        self._checked = clock()
        self._refused: tuple[bytes, ...] | None = None  # the contents last refused (logged once)
        self.expires_at, self.subject = _described(cert)
        self.on_load: list[Callable[[TlsFiles], None]] = []  # run after a reload (the metrics)
        self._warn_if_expired()

    def _warn_if_expired(self) -> None:
        """An expired certificate serves (a renewal is picked up without a restart), but every client's handshake
        fails, and gRPC logs nothing for that by default: said once per load. (It started without a word, where
        ``seqserve check`` fails the same file.)"""
        if self.expires_at is not None and self.expires_at <= time.time():
            days = (time.time() - self.expires_at) / 86400
            log.warning(
                "TLS certificate %s (%s) expired %.1f days ago: every client's handshake fails until it is renewed "
                "(new files are loaded without a restart)",
                self.cert,
                self.subject or "subject not readable",
                days,
            )

    def _read_all(self) -> tuple[bytes, ...]:
        contents: tuple[bytes, ...] = (_read(self.cert, "SEQSERVE_TLS_CERT"), _read(self.key, "SEQSERVE_TLS_KEY"))
        if self.client_ca is not None:
            contents += (_read(self.client_ca, "SEQSERVE_TLS_CLIENT_CA"),)
        return contents

    def _build(self, contents: tuple[bytes, ...]) -> ssl.SSLContext:
        """An HTTP port's server context (TLS 1.2+) from the files (``contents``: what they held when read, so that
        the gRPC port and this context never mix two versions). With a client CA, a client certificate is requested
        and verified when presented (``service.api.http`` and ``service.api.rest`` decide which paths need one)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)  # (from the files: a reload compares them again after)
        except (OSError, ssl.SSLError) as exc:
            raise RuntimeError(
                f"SEQSERVE_TLS_CERT={self.cert} / SEQSERVE_TLS_KEY={self.key}: not a PEM certificate chain and its "
                f"private key ({exc})"
            ) from exc
        if len(contents) > 2:
            try:
                context.load_verify_locations(cadata=contents[2].decode("ascii"))
            except (ValueError, UnicodeDecodeError, ssl.SSLError) as exc:
                raise RuntimeError(f"SEQSERVE_TLS_CLIENT_CA={self.client_ca}: not a PEM CA bundle ({exc})") from exc
            # Optional at the handshake (a certificate that is presented must verify): probes without one still reach
            # /healthz and /readyz; the HTTP servers refuse the rest to a connection without a verified certificate.
            context.verify_mode = ssl.CERT_OPTIONAL
        return context

    def _refresh(self) -> None:
        """Reload when the files changed since the last look (at most once per ``CHECK_SECONDS``)."""
        now = self._clock()
        with self._lock:
            if now - self._checked < CHECK_SECONDS:
                return
            self._checked = now
            try:
                contents = self._read_all()
            except RuntimeError as exc:  # (mid-replacement: a file missing for a moment)
                log.warning("TLS files not reloaded, still serving the previous certificate: %s", exc)
                return
            if contents == self._contents or contents == self._refused:
                return
            try:
                context = self._build(contents)
                if self._read_all() != contents:  # changed while loading: take it on the next look
                    return
            except RuntimeError as exc:
                self._refused = contents
                log.warning("TLS files changed but do not load; still serving the previous certificate: %s", exc)
                return
            self._contents, self._context, self._refused = contents, context, None
            self.generation += 1
            self.expires_at, self.subject = _described(self.cert)
        log.info("TLS certificate reloaded from %s (new connections get it)", self.cert)
        self._warn_if_expired()
        for hook in self.on_load:
            hook(self)

    def context(self) -> ssl.SSLContext:
        """The HTTP ports' context for a new connection."""
        self._refresh()
        return self._context

    @property
    def client_certificates(self) -> bool:
        return self.client_ca is not None

    def _grpc_config(self) -> Any:
        cert, key = self._contents[0], self._contents[1]
        ca = self._contents[2] if len(self._contents) > 2 else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self) -> Any:
        """gRPC asks before each handshake: a new configuration once after each reload, else None (keep)."""
        self._refresh()
        with self._lock:
            if self._given_to_grpc == self.generation:
                return None
            self._given_to_grpc = self.generation
            return self._grpc_config()

    def grpc_credentials(self) -> grpc.ServerCredentials:
        with self._lock:
            initial = self._grpc_config()
        return grpc.dynamic_ssl_server_credentials(
            initial, self._fetch, require_client_authentication=self.client_ca is not None
        )


def _described(cert: Path) -> tuple[float | None, str]:
    """When the (first) certificate in ``cert`` expires (a Unix time) and its subject as principals are spelled;
    (None, "") where Python cannot decode it."""
    from service.api.principals import subject_of_peercert

    try:
        decoded = ssl._ssl._test_decode_cert(str(cert))  # type: ignore[attr-defined]  # (no public decoder)
        expires = float(ssl.cert_time_to_seconds(decoded["notAfter"]))
    except Exception:  # a private helper: never let it stop the server
        return None, ""
    try:
        subject = subject_of_peercert(decoded) or ""
    except ValueError:  # (an attribute without a short name)
        subject = ""
    return expires, subject


def files(settings: Settings, on_load: Callable[[TlsFiles], None] | None = None) -> TlsFiles | None:
    """The settings' TLS files, read and checked now (``RuntimeError`` naming the setting when they do not load),
    for every port of one server process to share; None when TLS is off. ``on_load`` runs now and after every
    reload (``Metrics.tls_loaded``)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    loaded = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    if on_load is not None:
        loaded.on_load.append(on_load)
        on_load(loaded)
    return loaded
