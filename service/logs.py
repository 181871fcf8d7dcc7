"""Logging setup: every record on one line that a caller cannot forge, as text or as JSON.

Callers put names, ids and texts into requests, and some of them reach log messages. The text format escapes
every control character (``\\n`` becomes the two characters ``\\n``) and indents the lines of a traceback, so
no request can start a line of its own. ``SEQSERVE_LOG_FORMAT=json`` writes one JSON object per line with the
request id, method, model, status code and duration where the record has them.

The RPC being served is known to every record written while serving it (``CALL``: request id, method and the
caller's W3C trace context), through a ``ContextVar`` the edge sets. A call that sends a valid ``traceparent``
gets its ``trace_id`` and ``span_id`` (the caller's span) on every record, so a log line joins the caller's trace.

What is written can change while the server runs (Triton's logging extension, ``LogSettings``): each severity on
or off on its own, verbose (DEBUG) records from ``log_verbose_level`` 1, and the format. ``current`` and
``update`` read and change this process's settings; the engine passes a change on to every frontend. Each change
is written to the ``seqserve.audit`` logger, which no setting silences.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, cast

from service.errors import InvalidInput, echo
from service.settings import Settings
from service.tracing import trace_and_span

# (request id, method, traceparent) of the RPC being served; ("-", "", "") outside any. The traceparent is a valid
# W3C header in its version-00 form (``service.tracing.parse_traceparent``), or "" when the call sent none.
CALL: ContextVar[tuple[str, str, str]] = ContextVar("seqserve_call", default=("-", "", ""))
ACCESS_LOGGER = "seqserve.access"
# Changes of the log settings are written whatever the settings say (a change must not hide itself or the next).
AUDIT_LOGGER = "seqserve.audit"
audit = logging.getLogger(AUDIT_LOGGER)
audit.setLevel(logging.INFO)  # its own level: the root's, which follows the switches, does not silence it
FIELDS = ("request_id", "trace_id", "span_id", "method", "model", "code", "duration_ms", "principal")

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str) -> str:
    """Control characters (C0, DEL, C1, line/paragraph separators) as Python escapes; the rest unchanged."""
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class _CallFilter(logging.Filter):
    """Adds the current call's request id, method and trace context to records that do not carry them."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id, method, trace = CALL.get()
        if not hasattr(record, "request_id"):
            record.request_id = request_id
        if not hasattr(record, "method") and method:
            record.method = method
        if trace and not hasattr(record, "trace_id"):
            record.trace_id, record.span_id = trace_and_span(trace)
        # Which process wrote it, with --workers N: "frontend-1" (with --engines K: "engine-2" .. too); the first
        # engine, or a single process: nothing.
        name = record.processName or "MainProcess"
        record.process_tag = "" if name == "MainProcess" else name.removeprefix("seqserve-")
        return True


# Triton's log settings (its names and types), as LogSettings reads and changes them.
SETTING_TYPES: dict[str, type] = {
    "log_file": str,
    "log_info": bool,
    "log_warning": bool,
    "log_error": bool,
    "log_verbose_level": int,
    "log_format": str,
}
FORMATS = ("text", "json", "iso8601")
# Triton's names: its default format (tools that reset settings send it), and its ISO 8601 one
FORMAT_ALIASES = {"default": "text", "ISO8601": "iso8601"}
MAX_VERBOSE_LEVEL = 2**32 - 1  # a uint32 on the wire
OWN_LOGGERS = frozenset({"service", "seqserve", "training", "bench", "__main__"})  # (a logger name's first part)
LogSettings = dict[str, bool | int | str]
_PARAMS = {bool: "a bool (bool_param)", int: "an unsigned integer (uint32_param)", str: "a string (string_param)"}


# grpc.aio logs this, at ERROR with a traceback, when a handler's answer finds its call already ended by the C core:
# the client's deadline passed (or it hung up) while the answer was on its way. The edge has counted and logged the
# call (DEADLINE_EXCEEDED, CANCELLED; within LOG_ERRORS_PER_SECOND), so any client could write tracebacks at will
# with short deadlines (29 in 30 s of 1-30 ms deadlines, --workers 2): a library debug line here (verbose 2).
GRPC_CYTHON_LOGGER = "grpc._cython.cygrpc"
DEAD_CALL_SEND = "ExecuteBatchError raised in core by servicer method"


class _Switches(logging.Filter):
    """Which records the handler writes: INFO, WARNING and ERROR (with CRITICAL) each on or off, DEBUG records
    when the verbose level is 1 or more. Python's single threshold cannot say "errors but not warnings"."""

    def __init__(self) -> None:
        super().__init__()
        self.info = self.warning = self.error = True
        self.verbose = 0
        self.format = "text"

    def set_level(self, level: str) -> None:
        """The switches a ``log_level`` setting means (DEBUG: verbose level 1; WARNING: no INFO; ...)."""
        number = logging.getLevelName(level)
        self.verbose = 1 if number <= logging.DEBUG else 0
        self.info = number <= logging.INFO
        self.warning = number <= logging.WARNING
        self.error = number <= logging.ERROR

    def lowest(self) -> int:
        """The lowest level any switch lets through: the root logger's level, so that nothing builds a record
        the handler would drop."""
        for on, level in ((self.verbose > 0, logging.DEBUG), (self.info, logging.INFO),
                          (self.warning, logging.WARNING), (self.error, logging.ERROR)):  # fmt: skip
            if on:
                return level
        return logging.CRITICAL + 1

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == AUDIT_LOGGER:
            return True
        if record.name == GRPC_CYTHON_LOGGER and record.getMessage().startswith(DEAD_CALL_SEND):
            return self.verbose >= 2  # (a library's debug line: see DEAD_CALL_SEND)
        level = record.levelno
        if level >= logging.ERROR:
            return self.error
        if level >= logging.WARNING:
            return self.warning
        if level >= logging.INFO:
            return self.info
        # Level 1: this server's own debug records; 2 and up: the libraries' too (gRPC's logged a line per call,
        # "Loaded running loop", which buried ours).
        return self.verbose >= (1 if record.name.partition(".")[0] in OWN_LOGGERS else 2)


_SWITCHES = _Switches()
_HANDLER: list[logging.Handler] = []  # the handler ``configure`` installed, if it did


def current() -> LogSettings:
    """This process's log settings, by Triton's names."""
    s = _SWITCHES
    return {"log_file": "", "log_info": s.info, "log_warning": s.warning, "log_error": s.error,
            "log_verbose_level": s.verbose, "log_format": s.format}  # fmt: skip


def check(changes: Mapping[str, object]) -> LogSettings:
    """``changes`` as valid settings, or InvalidInput saying what to fix (nothing is applied then)."""
    out: LogSettings = {}
    for key, value in changes.items():
        kind = SETTING_TYPES.get(key)
        if kind is None:
            raise InvalidInput(f"unknown log setting {echo(key)}; the settings are {', '.join(SETTING_TYPES)}")
        if type(value) is not kind:
            got = _PARAMS.get(type(value), type(value).__name__)
            raise InvalidInput(f"log setting {key!r} takes {_PARAMS[kind]}, got {got}")
        if key == "log_file" and value != "":
            raise InvalidInput(
                "log_file must be empty: seqserve writes its logs to standard error, for the container runtime "
                "or the process supervisor to collect"
            )
        if key == "log_format":
            value = FORMAT_ALIASES.get(str(value), value)
            if value not in FORMATS:
                raise InvalidInput(
                    f"log_format must be one of {', '.join(FORMATS)} (or Triton's default and ISO8601), got "
                    f"{echo(str(value))}"
                )
        if key == "log_verbose_level" and isinstance(value, int) and not 0 <= value <= MAX_VERBOSE_LEVEL:
            raise InvalidInput(f"log_verbose_level must be between 0 and {MAX_VERBOSE_LEVEL}, got {value}")
        out[key] = cast(bool | int | str, value)
    return out


def update(changes: Mapping[str, object]) -> LogSettings:
    """Checks every change, then applies them all to this process; returns the settings now in force."""
    valid = check(changes)
    s = _SWITCHES
    s.info = bool(valid.get("log_info", s.info))
    s.warning = bool(valid.get("log_warning", s.warning))
    s.error = bool(valid.get("log_error", s.error))
    s.verbose = int(valid.get("log_verbose_level", s.verbose))
    if "log_format" in valid and valid["log_format"] != s.format:
        s.format = str(valid["log_format"])
        for handler in _HANDLER:
            handler.setFormatter(_formatter(s.format))
    logging.getLogger().setLevel(s.lowest())
    return current()


def _formatter(name: str) -> logging.Formatter:
    return JsonFormatter() if name == "json" else TextFormatter(iso8601=name == "iso8601")


def iso_time(created: float, msecs: float) -> str:
    """A record's time in ISO 8601, UTC, to the millisecond: ``2026-12-03T15:56:28.123Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(msecs):03d}Z"


def summary(settings: Settings, workers: int) -> str:
    """One start-up line: what this server is and how it is set up (no secret: the store's password hidden)."""
    from importlib.metadata import PackageNotFoundError, version

    from service import compiled
    from service.core.sessions import redact

    try:
        release = version("seqserve")
    except PackageNotFoundError:
        release = "unknown"
    if settings.api_key or settings.api_keys:
        auth = "API keys" + (" + client certificates" if settings.tls_client_ca else "")
    else:
        auth = "client certificates (mTLS)" if settings.tls_client_ca else "none (every caller is one principal)"
    engines = "the engine" if settings.engines == 1 else f"{settings.engines} engines"
    layout = "one process" if workers == 1 else f"{workers} frontends + {engines}"
    use, why = compiled.in_use()
    return (
        f"seqserve {release}: {layout}, models {settings.models}, device {settings.device}, session store "
        f"{redact(settings.session_store)}, auth {auth}, TLS {'on' if settings.tls_cert else 'off'}, hot path "
        f"{'compiled' if use else f'interpreted ({why})'}"
    )


class TextFormatter(logging.Formatter):
    """``iso8601``: the time as ISO 8601 in UTC (Triton's ``ISO8601`` format) instead of local ``asctime``."""

    def __init__(self, iso8601: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)s %(process_prefix)s%(name)s: %(message)s")
        self.iso8601 = iso8601

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if self.iso8601:
            return iso_time(record.created, record.msecs)
        return super().formatTime(record, datefmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        tag = getattr(record, "process_tag", "")
        record.process_prefix = f"[{tag}] " if tag else ""
        request_id = getattr(record, "request_id", "-")
        trace = f"trace {escape(str(record.trace_id))}" if hasattr(record, "trace_id") else ""
        line = super().formatMessage(record)
        if request_id == "-" or f"request id {escape(str(request_id))}" in line:  # (the error lines name it)
            return f"{line} [{trace}]" if trace else line
        return f"{line} [request {escape(str(request_id))}{', ' + trace if trace else ''}]"

    def formatException(self, ei: Any) -> str:
        # Every traceback line indented: a forged message inside an exception cannot start a line.
        lines = super().formatException(ei).splitlines()
        return "\n".join("    " + escape(line) for line in lines)

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("    " + escape(line) for line in stack_info.splitlines())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": iso_time(record.created, record.msecs),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if tag := getattr(record, "process_tag", ""):
            out["process"] = tag
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None and value != "-":
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=True, default=str)  # ensure_ascii escapes every control character


def configure(settings: Settings, stream: Any = None) -> logging.Handler:
    """Installs one root handler that writes ``settings.log_format`` to ``stream`` (stderr by default), in place
    of the one a previous call installed; returns it."""
    _SWITCHES.set_level(settings.log_level)
    _SWITCHES.format = settings.log_format
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_formatter(settings.log_format))
    handler.addFilter(_SWITCHES)  # (first: a record it drops costs nothing more)
    handler.addFilter(_CallFilter())
    handler.set_name("seqserve")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "seqserve"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_SWITCHES.lowest())
    _HANDLER[:] = [handler]
    return handler
