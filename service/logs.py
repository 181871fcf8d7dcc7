"""Logging setup: every record on one line that a caller cannot forge, as text or as JSON.

Callers put names, ids and texts into requests, and some of them reach log messages. The text format escapes
every control character (``\\n`` becomes the two characters ``\\n``) and indents the lines of a traceback, so
no request can start a line of its own. ``SEQSERVE_LOG_FORMAT=json`` writes one JSON object per line with the
request id, method, model, status code and duration where the record has them.

The RPC being served is known to every record written while serving it (``CALL``: request id and method),
through a ``ContextVar`` the error interceptor sets.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar
from typing import Any

from service.settings import Settings

# (request id, method) of the RPC being served; ("-", "") outside any.
CALL: ContextVar[tuple[str, str]] = ContextVar("seqserve_call", default=("-", ""))
ACCESS_LOGGER = "seqserve.access"
FIELDS = ("request_id", "method", "model", "code", "duration_ms", "principal")

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str) -> str:
    """Control characters (C0, DEL, C1, line/paragraph separators) as Python escapes; the rest unchanged."""
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class _CallFilter(logging.Filter):
    """Adds the current call's request id and method to records that do not carry them."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id, method = CALL.get()
        if not hasattr(record, "request_id"):
            record.request_id = request_id
        if not hasattr(record, "method") and method:
            record.method = method
        # Which process wrote it, with --workers N: "frontend-1"; the engine, or a single process: nothing.
        name = record.processName or "MainProcess"
        record.process_tag = "" if name == "MainProcess" else name.removeprefix("seqserve-")
        return True


def summary(settings: Settings, workers: int) -> str:
    """One start-up line: what this server is and how it is set up (no secret: the store's password hidden)."""
    from importlib.metadata import PackageNotFoundError, version

    from service.core.sessions import redact

    try:
        release = version("seqserve")
    except PackageNotFoundError:
        release = "unknown"
    if settings.api_key or settings.api_keys:
        auth = "API keys" + (" + client certificates" if settings.tls_client_ca else "")
    else:
        auth = "client certificates (mTLS)" if settings.tls_client_ca else "none (every caller is one principal)"
    layout = "one process" if workers == 1 else f"{workers} frontends + the engine"
    return (
        f"seqserve {release}: {layout}, models {settings.models}, device {settings.device}, session store "
        f"{redact(settings.session_store)}, auth {auth}, TLS {'on' if settings.tls_cert else 'off'}"
    )


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(process_prefix)s%(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        tag = getattr(record, "process_tag", "")
        record.process_prefix = f"[{tag}] " if tag else ""
        request_id = getattr(record, "request_id", "-")
        line = super().formatMessage(record)
        if request_id == "-" or f"request id {escape(str(request_id))}" in line:  # (the error lines name it)
            return line
        return f"{line} [request {escape(str(request_id))}]"

    def formatException(self, ei: Any) -> str:
        # Every traceback line indented: a forged message inside an exception cannot start a line.
        lines = super().formatException(ei).splitlines()
        return "\n".join("    " + escape(line) for line in lines)

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("    " + escape(line) for line in stack_info.splitlines())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
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
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    handler.addFilter(_CallFilter())
    handler.set_name("seqserve")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "seqserve"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    return handler
