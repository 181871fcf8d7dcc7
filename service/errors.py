"""Domain errors. Raised anywhere in the core; mapped to transport status codes in exactly one place
(``service/api/interceptors.py`` for gRPC). Messages are for the caller: they say what to fix."""

from __future__ import annotations


class SeqServeError(Exception):
    """Base class of every error a caller may see. ``code`` names the kind, independent of transport."""

    code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(SeqServeError):
    """Empty, oversized, non-finite or wrongly shaped input (gRPC INVALID_ARGUMENT)."""

    code = "invalid_argument"


class ModelNotFound(SeqServeError):
    """Unknown model name or version (gRPC NOT_FOUND)."""

    code = "not_found"


class ModelUnavailable(SeqServeError):
    """The model exists but failed to load or is still loading (gRPC UNAVAILABLE)."""

    code = "unavailable"


class SessionNotFound(SeqServeError):
    """Unknown or expired session / sequence id (gRPC NOT_FOUND)."""

    code = "not_found"


class FailedPrecondition(SeqServeError):
    """The request is well-formed but the system is not in a state to run it, e.g. a session used with
    another model, or a session whose model version was unloaded (gRPC FAILED_PRECONDITION)."""

    code = "failed_precondition"


class Overloaded(SeqServeError):
    """A bounded resource is full: session store, batch queue (gRPC RESOURCE_EXHAUSTED)."""

    code = "resource_exhausted"


class DeadlineExceeded(SeqServeError):
    """The caller's deadline passed before the work finished (gRPC DEADLINE_EXCEEDED)."""

    code = "deadline_exceeded"


class Cancelled(SeqServeError):
    """The caller went away (gRPC CANCELLED)."""

    code = "cancelled"


class Unauthenticated(SeqServeError):
    """Missing or wrong credentials (gRPC UNAUTHENTICATED)."""

    code = "unauthenticated"
