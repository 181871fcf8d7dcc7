"""Signed session blobs: ``Sessions.Export`` / ``Import`` (and the KServe parameters ``seqserve_export`` /
``seqserve_import``). A blob parks a session with the client, moves it to another cluster, or starts a session
from a state the client chose.

Layout, integers little-endian::

    b"SQSX" | u16 format (1) | u16 flags (0) | u32 header length | header (UTF-8 JSON) | SessionState.to_bytes()
    | HMAC-SHA256 over everything before it (32 bytes)

The header repeats what a reader checks before it decodes any array: model, version, weights sha256, task,
steps, created time (of the exported session) and the export time. The signature covers header and state, so
no byte can change unnoticed; the key never leaves the servers (``SEQSERVE_SESSION_SIGNING_KEY``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import struct
from dataclasses import dataclass

from service.core.sessions.state import NewerSessionFormat, SessionDecodeError, SessionState
from service.errors import FailedPrecondition, InvalidInput, ReplicaBehind

MAGIC = b"SQSX"
FORMAT = 1
_PREFIX = struct.Struct("<4sHHI")
MAC_BYTES = 32
MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Exported:
    """A verified blob: its header and the session it holds (id, owner and TTL are the exporter's)."""

    model: str
    version: int
    model_sha256: str
    task: str
    steps: int
    created_at: float
    exported_at: float
    session: SessionState


def seal(s: SessionState, key: bytes, now: float) -> bytes:
    header = {
        "model": s.model,
        "version": s.version,
        "model_sha256": s.model_sha256,
        "task": s.task,
        "steps": s.steps,
        "created_at": s.created_at,
        "exported_at": now,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    # The state without the live session's id, owner and revision: an import gets a new id and its importer as
    # owner, and a blob must not be a handle on the session it came from (nor say whose it was).
    anonymous = dataclasses.replace(s, id="", owner="", revision=0)
    body = _PREFIX.pack(MAGIC, FORMAT, 0, len(head)) + head + anonymous.to_bytes()
    return body + hmac.new(key, body, hashlib.sha256).digest()


def unseal(blob: bytes, key: bytes) -> Exported:
    """The blob's content once its signature verifies. InvalidInput: not a blob, or the signature does not
    verify (changed, or signed with another key); FailedPrecondition: signed, but this server cannot read it."""
    if len(blob) < _PREFIX.size + MAC_BYTES or blob[:4] != MAGIC:
        raise InvalidInput(f"not a seqserve session export ({len(blob)} bytes); pass the blob Export returned")
    body, mac = blob[:-MAC_BYTES], blob[-MAC_BYTES:]
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        raise InvalidInput("session blob signature does not verify: it was changed, or signed with another signing key")
    _, fmt, flags, head_len = _PREFIX.unpack_from(body, 0)
    if fmt > FORMAT or flags:
        raise ReplicaBehind(
            f"session blob format {fmt} (flags {flags:#x}) is from a newer seqserve (this one reads format {FORMAT}): "
            "import it on an updated server"
        )
    if fmt != FORMAT or head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > len(body):
        raise FailedPrecondition(f"session blob format {fmt} is not one this server reads (format {FORMAT})")
    try:
        h = json.loads(body[_PREFIX.size : _PREFIX.size + head_len])
        s = SessionState.from_bytes(memoryview(body)[_PREFIX.size + head_len :])
        out = Exported(
            str(h["model"]),
            int(h["version"]),
            str(h["model_sha256"]),
            str(h["task"]),
            int(h["steps"]),
            float(h["created_at"]),
            float(h["exported_at"]),
            s,
        )
    except NewerSessionFormat as e:
        raise ReplicaBehind(
            f"session blob holds a session this server cannot read yet ({e}): import it on an updated server"
        ) from None
    except (SessionDecodeError, KeyError, TypeError, ValueError) as e:
        raise FailedPrecondition(f"session blob cannot be read by this server: {e}") from None
    if (out.model, out.version, out.model_sha256, out.steps) != (s.model, s.version, s.model_sha256, s.steps):
        raise FailedPrecondition("session blob header does not match the state it carries")
    return out
