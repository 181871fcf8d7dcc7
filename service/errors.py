"""Domain errors. Raised anywhere in the core; mapped to transport status codes in exactly one place
(``service/api/interceptors.py`` for gRPC). Messages are for the caller: they say what to fix."""

from __future__ import annotations

ECHO_CHARS = 64


def echo(value: str, limit: int = ECHO_CHARS) -> str:
    """A caller-supplied value, quoted, fit to repeat in a message or a log line: at most ``limit``
    characters (then its length), control characters escaped."""
    shown = repr(value[:limit])
    return shown if len(value) <= limit else f"{shown[:-1]}...{shown[-1]} ({len(value)} characters)"


def principal_ref(who: str) -> str:
    """A principal as a message names it: "principal 'NAME'", NAME exactly as SEQSERVE_ADMIN_PRINCIPALS and the
    quota settings spell it (an mTLS subject such as ``CN=ev,O=acme\\, inc`` keeps its one backslash, which
    ``echo``'s repr doubled, so the copied value did not match); ``echo`` for one that is not printable."""
    return f"principal '{who}'" if who.isprintable() and len(who) <= 256 else f"principal {echo(who)}"


def short(value: str, limit: int = ECHO_CHARS) -> str:
    """Like ``echo`` without the quotes, for names inside a message ("input TEXT: ..."); an empty name is shown as
    ``''`` (a message never reads "input : ...")."""
    if not value:
        return "''"
    shown = repr(value[:limit])[1:-1]
    return shown if len(value) <= limit else f"{shown}...({len(value)} characters)"


SEQUENCE_KEY_PREFIX = "kserve:"  # session keys of KServe sequences (``service.core.sequences``): not credentials


def session_ref(session_id: str) -> str:
    """A session id as messages and log lines show it. On a server without API keys a session's id is its only
    credential, and error messages reach the server's log: so only its first characters (a quarter of them, at
    most 6) and its length are shown, enough to tell one's sessions apart, far too few to use one. A KServe
    sequence's key (model and sequence id, which are no secret) is shown whole."""
    if session_id.startswith(SEQUENCE_KEY_PREFIX):
        return echo(session_id)
    shown = min(6, len(session_id) // 4)
    count = f"{len(session_id)} character{'' if len(session_id) == 1 else 's'}"
    return f"{session_id[:shown] + '...'!r} ({count})"


MAX_MESSAGE_CHARS = 1024  # the edge's last resort: no status message is longer, whatever the core wrote


def clip(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` cut to ``limit`` characters (messages are built with ``echo``; this bounds any that is not)."""
    return message if len(message) <= limit else f"{message[: limit - 40]}... ({len(message)} characters, cut)"


RETRY_SOON = 0.1  # seconds: a full queue or budget, which drains within milliseconds to a few batches
RETRY_LATER = 1.0  # seconds: a model loading, a replica behind in a rolling update


class SeqServeError(Exception):
    """Base class of every error a caller may see. ``retry_after`` (seconds), when set, says the request was
    refused before anything ran and the same request may succeed after that wait: the status then carries a
    ``google.rpc.RetryInfo`` (AIP-194) that clients can follow. A class may set a default for its kind."""

    retry_after: float | None = None

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after is not None:
            self.retry_after = retry_after


class InvalidInput(SeqServeError):
    """Empty, oversized, non-finite or wrongly shaped input (gRPC INVALID_ARGUMENT)."""


class ModelNotFound(SeqServeError):
    """Unknown model name or version (gRPC NOT_FOUND)."""


class ModelUnavailable(SeqServeError):
    """The model exists but failed to load, is unloading or was unloaded (gRPC UNAVAILABLE)."""


class SessionNotFound(SeqServeError):
    """Unknown or expired session / sequence id (gRPC NOT_FOUND)."""


class RegionNotFound(SeqServeError):
    """A system shared-memory region, or the object its key names, that is not there (gRPC NOT_FOUND)."""


class AlreadyExists(SeqServeError):
    """A name that is taken, e.g. a shared-memory region registered already (gRPC ALREADY_EXISTS)."""


class NotOffered(SeqServeError):
    """An extension this server has but does not serve as configured (gRPC UNIMPLEMENTED); the message names
    the setting that turns it on."""


class FailedPrecondition(SeqServeError):
    """The request is well-formed but the system is not in a state to run it, e.g. a session used with
    another model, or a session whose model version was unloaded (gRPC FAILED_PRECONDITION)."""


class SessionEvicted(SessionNotFound):
    """The session was evicted to make room (gRPC NOT_FOUND, ErrorInfo reason SESSION_EVICTED)."""


class Overloaded(SeqServeError):
    """A bounded resource is full: session store, batch queue (gRPC RESOURCE_EXHAUSTED)."""


class DeadlineExceeded(SeqServeError):
    """The request's own time limit passed before it was answered (gRPC DEADLINE_EXCEEDED): Triton's ``timeout``
    request parameter. (A gRPC deadline ends the call in gRPC itself, before any of this.)"""


class StoreUnavailable(SeqServeError):
    """The session store (Redis) does not answer; calls that need no session still work (gRPC UNAVAILABLE). No
    retry time: it may fail a step's write after the model ran, when sending the step again would not be safe."""


class ReplicaBehind(SeqServeError):
    """The session or blob needs a model version, or a session format, that this replica does not serve yet while
    another may: a newer release during a rolling update (gRPC UNAVAILABLE, ErrorInfo reason REPLICA_BEHIND:
    retry; an updated replica serves it)."""

    retry_after = RETRY_LATER


class SessionConflict(SeqServeError):
    """Another replica took the session over while this call used it; nothing was written (gRPC ABORTED:
    retry the call)."""


class QuotaExceeded(Overloaded):
    """The caller's own quota (sessions, session bytes, request rate) is used up; the message names the quota
    (gRPC RESOURCE_EXHAUSTED, ErrorInfo reason QUOTA_EXCEEDED)."""


class TooLarge(SeqServeError):
    """A request larger than its method accepts (gRPC RESOURCE_EXHAUSTED, as gRPC's own size limit)."""


class Unauthenticated(SeqServeError):
    """Missing or wrong credentials (gRPC UNAUTHENTICATED)."""


class PermissionDenied(SeqServeError):
    """Known caller, but not allowed to do this (gRPC PERMISSION_DENIED): e.g. model management by a principal
    that is not in ``admin_principals``."""
