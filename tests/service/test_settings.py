"""Settings refused at start, naming what to change: combinations the server used to take without a word."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_a_default_ttl_above_the_maximum_is_refused() -> None:
    """SESSION_TTL_SECONDS=100000 with the maximum at 86400 started, and the maximum was used instead."""
    with pytest.raises(ValidationError, match="session_ttl_seconds 100000 is above session_max_ttl_seconds 86400"):
        Settings(session_ttl_seconds=100_000)
    assert Settings(session_ttl_seconds=100_000, session_max_ttl_seconds=200_000).session_ttl_seconds == 100_000


def test_a_trace_file_in_a_folder_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    """The traces were collected all along, then lost at stop when the file could not be written."""
    missing = tmp_path / "no-such-folder" / "trace.json"
    with pytest.raises(ValidationError, match=f"its folder '{missing.parent}' does not exist"):
        Settings(trace_level=["TIMESTAMPS"], trace_file=str(missing))
    assert Settings(trace_level=["TIMESTAMPS"], trace_file=str(tmp_path / "trace.json")).trace_file
    assert Settings(trace_file=str(missing)).trace_level == ["OFF"]  # (nothing is written with tracing off)


def test_two_ports_of_one_number_are_refused() -> None:
    """gRPC and metrics on one port failed to bind, saying another process listened there: it was this one."""
    with pytest.raises(ValidationError, match="port and metrics_port are both 9000: each port needs its own number"):
        Settings(port=9000, metrics_port=9000)
    with pytest.raises(ValidationError, match="metrics_port and http_port are both 8002"):
        Settings(http_port=8002)
    assert Settings(port=0, metrics_port=0, http_port=0).http_port == 0  # free ports, each its own
