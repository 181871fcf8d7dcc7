"""Test PKI made with ``cryptography``: a CA, a server certificate for 127.0.0.1/localhost, client certificates
(and a second CA whose certificates the server must refuse). Files are PEM, written under one folder."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate (PEM): clients verify the server with it, the server verifies clients with it
    server: Pair
    alice: Pair  # subject CN=alice,O=seqserve-tests
    bob: Pair  # subject CN=bob,O=seqserve-tests
    stranger: Pair  # signed by another CA
    workers: tuple[Pair, Pair]  # empty subjects, named only by a SAN (SPIFFE URI; DNS name), as in service meshes
    issue: Callable[[str, x509.Name, list[x509.GeneralName]], Pair]  # (stem, subject, SANs) -> a client pair


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                                                                      "seqserve-tests")])  # fmt: skip


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pair:
    pair = Pair(folder / f"{stem}.crt", folder / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return pair


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    since: dt.timedelta = dt.timedelta(minutes=5),
    days_left: float = 2,
) -> x509.CertificateBuilder:
    """Valid from ``since`` ago until ``days_left`` days from now."""
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - since)
        .not_valid_after(now + dt.timedelta(days=days_left))
    )


def self_signed(folder: Path, stem: str, cn: str, days_left: float) -> Pair:
    """A self-signed certificate (subject CN=``cn`` only) that expires ``days_left`` days from now (negative: it
    has expired), valid since 400 days ago, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = _builder(name, name, key, dt.timedelta(days=400), days_left).sign(key, hashes.SHA256())
    return _write(folder, stem, cert, key)


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(cn), _name(cn), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    cn: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], server: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    b = _builder(_name(cn), ca[0].subject, key).add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(ca[1], hashes.SHA256()), key


def _san_only(
    name: x509.GeneralName, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    b = _builder(x509.Name([]), ca[0].subject, key).add_extension(
        x509.BasicConstraints(ca=False, path_length=None), True
    )
    b = b.add_extension(x509.SubjectAlternativeName([name]), critical=True)  # critical: the subject is empty
    b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(ca[1], hashes.SHA256()), key


def _client(
    subject: x509.Name, sans: list[x509.GeneralName], ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    b = _builder(subject, ca[0].subject, key).add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=not subject)
    b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(ca[1], hashes.SHA256()), key


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca, other = _ca("seqserve test CA"), _ca("another CA")
    (folder / "ca.crt").write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    return Pki(
        ca=folder / "ca.crt",
        server=_write(folder, "server", *_leaf("localhost", ca, server=True)),
        alice=_write(folder, "alice", *_leaf("alice", ca, server=False)),
        bob=_write(folder, "bob", *_leaf("bob", ca, server=False)),
        stranger=_write(folder, "stranger", *_leaf("stranger", other, server=False)),
        workers=(
            _write(folder, "worker1", *_san_only(x509.UniformResourceIdentifier("spiffe://example.org/worker"), ca)),
            _write(folder, "worker2", *_san_only(x509.DNSName("worker2.example.org"), ca)),
        ),
        issue=lambda stem, subject, sans: _write(folder, stem, *_client(subject, sans, ca)),
    )
