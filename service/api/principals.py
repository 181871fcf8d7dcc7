"""Who is calling: API keys and client certificates -> a principal name, and the per-principal request rate.

Keys come from ``SEQSERVE_API_KEYS`` (a file of ``name:key`` lines, or ``name:key`` pairs separated by commas)
and the single ``SEQSERVE_API_KEY`` (principal ``default``). A key is looked up by its SHA-256 digest: one dict
lookup whatever the number of keys, and what the lookup's timing could reveal is a digest, never a key.

With mTLS and no API keys, the client certificate's subject (``CN=alice,O=acme``; its common name when the
gRPC build does not expose the subject) is the principal.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from service.errors import QuotaExceeded, echo, principal_ref
from service.settings import Settings

DEFAULT_PRINCIPAL = "default"  # the principal of the single SEQSERVE_API_KEY
# Metadata of a call the REST gateway of a TLS server forwards for an mTLS caller: its certificate's subject, and
# the token (one per server process, never sent anywhere but its own Unix socket) that makes the server believe it.
GATEWAY_SUBJECT = "seqserve-gateway-subject"
GATEWAY_TOKEN = "seqserve-gateway-token"
NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
MIN_KEY_CHARS = 16
MAX_TRACKED = 10_000  # principals whose rate bucket is kept (least recently seen dropped first)


COMMENT = re.compile(r"(?:^|\s)#")  # "# ..." or "key  # ...": a comment; "ab#cd" is a key


def parse_keys(spec: str) -> dict[str, str]:
    """``name:key`` entries (one per line or comma-separated; a ``#`` at the start of an entry or after a space
    starts a comment, so a key may hold ``#``) -> {name: key}. ValueError naming the entry for a malformed line,
    a short key, a key with a space, or a repeated name or key."""
    keys: dict[str, str] = {}
    for n, raw in enumerate(re.split(r"[,\n]", spec), start=1):
        line = COMMENT.split(raw, 1)[0].strip()
        if not line:
            continue
        name, sep, key = line.partition(":")
        name, key = name.strip(), key.strip()
        if not sep or not NAME.fullmatch(name):
            raise ValueError(f"api key entry {n}: expected 'name:key' with a name of 1-64 of A-Za-z0-9._@-")
        _check_key_chars(key, f"api key {name!r}", " (a comment starts with ' #')")
        if re.search(r";\s*[A-Za-z0-9._@-]{1,64}:", key):  # ("alice:K1;bob:K2" read as one key of alice's)
            raise ValueError(
                f"api key {name!r} holds ';' and what reads as another entry: separate entries with ',' or new lines"
            )
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(f"api key {name!r}: at least {MIN_KEY_CHARS} characters (got {len(key)})")
        if name in keys:
            raise ValueError(f"api key name {name!r} appears twice")
        if key in keys.values():
            raise ValueError(f"api key {name!r}: the same key is given to another name")
        keys[name] = key
    return keys


def _check_key_chars(key: str, label: str, hint: str = "") -> None:
    """ValueError naming ``label`` for a key no client can send as one token after "Bearer ": with a space, or not
    printable ASCII (gRPC metadata is printable ASCII)."""
    if any(c.isspace() for c in key):
        raise ValueError(f"{label}: a key has no spaces{hint}")
    if not (key.isascii() and key.isprintable()):
        raise ValueError(f"{label}: a key is printable ASCII, which an Authorization header carries")


def load_keys(settings: Settings) -> dict[str, str]:
    """Every configured principal and its key; empty when the server needs no API key."""
    keys: dict[str, str] = {}
    spec = settings.api_keys
    for name, value in (("api_key", settings.api_key), ("api_keys", spec)):
        if value is not None and not value.strip():  # e.g. a secret template that rendered empty: never fail open
            raise ValueError(
                f"{name} is set but empty: unset SEQSERVE_{name.upper()} to serve without authentication, or give it "
                "a value"
            )
    if spec:
        path = Path(spec)
        if ":" not in spec or _is_file(path):
            if not _is_file(path):
                raise ValueError(f"api_keys {echo(spec)}: no such file, and not a list of 'name:key' pairs")
            spec = path.read_text(encoding="utf-8")
        keys = parse_keys(spec)
        if not keys:
            raise ValueError("api_keys holds no 'name:key' entry")
    if settings.api_key:
        if len(settings.api_key) < MIN_KEY_CHARS:
            raise ValueError(f"api_key: at least {MIN_KEY_CHARS} characters (got {len(settings.api_key)})")
        _check_key_chars(settings.api_key.strip(), "api_key")  # (as in api_keys: one token after "Bearer ")
        if DEFAULT_PRINCIPAL in keys:
            raise ValueError(f"api_key and an api_keys entry both name principal {DEFAULT_PRINCIPAL!r}")
        if settings.api_key in keys.values():
            raise ValueError("api_key is also given to a named principal in api_keys")
        keys[DEFAULT_PRINCIPAL] = settings.api_key
    return keys


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a long list of pairs is not a valid file name
        return False


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass") if isinstance(token, str) else token).digest()


class KeyTable:
    """API key -> principal name."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._by_digest = {_digest(key): name for name, key in keys.items()}

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def principal(self, key: str | bytes) -> str | None:
        return self._by_digest.get(_digest(key))


def subject_of(auth_context: Mapping[str, list[bytes]]) -> str | None:
    """The peer certificate's principal from a gRPC auth context: its subject, or for a certificate with an empty
    subject (SPIFFE-style, names only in the SAN) ``san=<first subject alternative name>``. None without a
    verified client certificate or when it names nobody: "" is the anonymous principal of a server without
    authentication, which no certificate may become."""
    for key, prefix in (("x509_subject", ""), ("x509_common_name", ""), ("x509_subject_alternative_name", "san=")):
        for value in auth_context.get(key) or ():
            if name := value.decode("utf-8", "replace").strip():
                return prefix + name
    return None


# BoringSSL's short names (gRPC's subject string; checked against it in tests) for the long names of
# Python's ``getpeercert()``.
SHORT_NAMES = {
    "commonName": "CN", "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
    "organizationName": "O", "organizationalUnitName": "OU", "emailAddress": "emailAddress",
    "domainComponent": "DC", "userId": "UID", "streetAddress": "street", "serialNumber": "serialNumber",
    "title": "title", "surname": "SN", "givenName": "GN", "initials": "initials", "pseudonym": "pseudonym",
    "generationQualifier": "generationQualifier", "dnQualifier": "dnQualifier", "name": "name",
    "businessCategory": "businessCategory", "postalCode": "postalCode", "description": "description",
}  # fmt: skip
# (Not organizationIdentifier or the jurisdiction* names: gRPC's BoringSSL prints those as OID=#DER.)
_SPECIAL = frozenset(',+"\\<>;')


def _rfc2253_value(value: str) -> str:
    """An attribute value escaped as OpenSSL's RFC 2253 printing does: ``,+"\\<>;`` with a backslash, a leading
    ``#`` or space and a trailing space likewise, control characters and every byte of a non-ASCII character as
    ``\\XX``."""
    out = []
    data = value.encode("utf-8")
    for i, byte in enumerate(data):
        ch = chr(byte)
        if byte > 0x7E or byte < 0x20:
            out.append(f"\\{byte:02X}")
        elif ch in _SPECIAL or (i == 0 and ch in "# ") or (i == len(data) - 1 and ch == " "):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def subject_of_peercert(cert: Mapping[str, Any]) -> str | None:
    """The principal of a verified client certificate as Python's ``ssl`` gives it (``getpeercert()``), spelled
    as ``subject_of`` spells the same certificate from gRPC's auth context, so that a caller is one principal on
    both ports: the subject in RFC 2253 form (last attribute first, short names, ``+`` inside a multi-valued
    RDN), or ``san=<first subject alternative name>`` for an empty subject. None when the certificate names
    nobody; ``UnknownAttribute`` when its subject holds an attribute this module cannot spell as gRPC does."""
    rdns: tuple[tuple[tuple[str, str], ...], ...] = cert.get("subject") or ()
    entries = [(n, key, value) for n, rdn in enumerate(rdns) for key, value in rdn]
    if entries:
        parts: list[str] = []
        last = None
        for n, key, value in reversed(entries):
            short = SHORT_NAMES.get(key)
            if short is None:
                raise UnknownAttribute(key)
            if parts:
                parts.append("+" if n == last else ",")
            parts.append(f"{short}={_rfc2253_value(value)}")
            last = n
        if subject := "".join(parts).strip():  # (stripped as ``subject_of`` strips gRPC's, an escaped end too)
            return subject
    names: tuple[tuple[str, str], ...] = cert.get("subjectAltName") or ()
    for kind, value in names:
        if kind == "IP Address":
            value = str(ipaddress.ip_address(value.strip()))  # (Python spells IPv6 in full, upper case)
        if kind in ("DNS", "URI", "email", "IP Address") and (name := value.strip()):
            return "san=" + name
    return None


class UnknownAttribute(ValueError):
    """A subject attribute without a known short name: gRPC spells it as its OID and DER bytes, which Python's
    ``ssl`` does not expose."""


class RateLimiter:
    """A token bucket per principal: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst or max(1, math.ceil(rate)))
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # principal -> (tokens, when)

    def wait_time(self, principal: str) -> float:
        """Takes one token when there is one (returns 0), else returns the seconds until one is due (and takes
        nothing)."""
        now = self._clock()
        tokens, then = self._buckets.pop(principal, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[principal] = (tokens, now)
        if len(self._buckets) > MAX_TRACKED:
            self._buckets.popitem(last=False)
        return wait

    def take(self, principal: str) -> None:
        """One request now, or ``QuotaExceeded`` naming the quota."""
        wait = self.wait_time(principal)
        if wait > 0:
            who = principal_ref(principal) if principal else "this server's callers"
            raise QuotaExceeded(
                f"request rate quota exceeded: {who} may send {self.rate:g} requests per second "
                f"(quota_requests_per_second, burst {self.burst:g}); retry in {wait:.2f}s",
                retry_after=wait,
            )
