"""W3C Trace Context (level 1): the ``traceparent`` a caller sends, as the logs and metrics read it.

seqserve starts no spans of its own: it keeps the caller's header (validated, in its version-00 form) with the
call, so that log lines carry its trace and span ids and a sampled call's trace id becomes the exemplar of its
latency bucket.
"""

from __future__ import annotations

import re

TRACEPARENT = "traceparent"  # the header (gRPC metadata key and HTTP header)
_FORM = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.ASCII)


def parse_traceparent(value: str | None) -> str:
    """A ``traceparent`` header as its version-00 form (``00-<trace id>-<parent id>-<flags>``), or "" when it is
    not a valid one (section 4.3: a header that does not parse is ignored; version ff, an all-zero trace or parent
    id, and a version-00 header with anything after the flags are invalid; a later version is read by its first
    four fields)."""
    if not value or len(value) > 512:
        return ""
    m = _FORM.fullmatch(value.strip(" \t"))
    if m is None:
        return ""
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or not trace_id.strip("0") or not parent_id.strip("0"):
        return ""
    return f"00-{trace_id}-{parent_id}-{flags}"


def trace_and_span(traceparent: str) -> tuple[str, str]:
    """(trace id, the caller's span id) of a parsed ``traceparent``."""
    return traceparent[3:35], traceparent[36:52]


def sampled_trace_id(traceparent: str) -> str:
    """The trace id of a parsed ``traceparent`` whose caller sampled the trace (flags bit 0), else ""."""
    return traceparent[3:35] if traceparent and int(traceparent[53:55], 16) & 1 else ""
