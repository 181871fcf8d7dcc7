"""Settings refused at start, naming what to change: combinations the server used to take without a word."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, misspelt


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


def test_a_trace_file_in_a_folder_the_server_cannot_write_is_refused(tmp_path: Path) -> None:
    """A read-only folder (a read-only mount) passed the check, seqserve check said ready, and every trace was kept
    in memory and lost at stop. /proc takes no new file, whoever asks (root included). The check leaves nothing
    behind where it can write."""
    with pytest.raises(ValidationError, match="the server cannot write into its folder '/proc'"):
        Settings(trace_level=["TIMESTAMPS"], trace_file="/proc/seqserve-trace.json")
    assert Settings(trace_level=["TIMESTAMPS"], trace_file=str(tmp_path / "trace.json")).trace_file
    assert list(tmp_path.iterdir()) == []


def test_two_ports_of_one_number_are_refused() -> None:
    """gRPC and metrics on one port failed to bind, saying another process listened there: it was this one."""
    with pytest.raises(ValidationError, match="port and metrics_port are both 9000: each port needs its own number"):
        Settings(port=9000, metrics_port=9000)
    with pytest.raises(ValidationError, match="metrics_port and http_port are both 8002"):
        Settings(http_port=8002)
    assert Settings(port=0, metrics_port=0, http_port=0).http_port == 0  # free ports, each its own


def test_a_variable_a_word_off_a_setting_gets_a_hint_and_kubernetes_service_links_get_none() -> None:
    """SEQSERVE_MAX_WORKERS=2 (for SEQSERVE_WORKERS) was ignored without a hint: too short for a close spelling."""
    environ = {
        "SEQSERVE_MAX_WORKERS": "2",  # a word too many
        "SEQSERVE_SESSION_CACHE": "1000",  # a word too few (SESSION_CACHE_BYTES)
        "SEQSERVE_WOKERS": "2",  # a close spelling, as before
        "SEQSERVE_SESSIONS": "5",  # a word too few of two settings (MAX_SESSIONS, QUOTA_SESSIONS): no guess
        # what Kubernetes injects for Services named seqserve, seqserve-redis and seqserve-grpc
        "SEQSERVE_SERVICE_HOST": "10.0.0.7",
        "SEQSERVE_SERVICE_PORT": "50051",
        "SEQSERVE_SERVICE_PORT_METRICS": "9090",
        "SEQSERVE_PORT_50051_TCP": "tcp://10.0.0.7:50051",
        "SEQSERVE_PORT_50051_TCP_ADDR": "10.0.0.7",
        "SEQSERVE_PORT_50051_TCP_PORT": "50051",
        "SEQSERVE_PORT_50051_TCP_PROTO": "tcp",
        "SEQSERVE_REDIS_PORT": "tcp://10.0.0.8:6379",
        "SEQSERVE_GRPC_PORT": "tcp://10.0.0.9:50051",
        "SEQSERVE_GRPC_SERVICE_HOST": "10.0.0.9",
        "SEQSERVE_TARGET": "127.0.0.1:50051",  # a client command's
    }
    assert misspelt(environ) == [
        ("SEQSERVE_MAX_WORKERS", "SEQSERVE_WORKERS"),
        ("SEQSERVE_SESSION_CACHE", "SEQSERVE_SESSION_CACHE_BYTES"),
        ("SEQSERVE_WOKERS", "SEQSERVE_WORKERS"),
    ]


def test_a_small_message_limit_above_the_message_limit_is_refused() -> None:
    """MAX_SMALL_MESSAGE_BYTES=20000000 started, and the small methods took 16 MiB (the message limit) without a
    word; a message limit below the small one's default takes that default down with it."""
    with pytest.raises(ValidationError, match=r"max_small_message_bytes \(20000000\) is above max_message_bytes"):
        Settings(max_small_message_bytes=20_000_000)
    with pytest.raises(ValidationError, match=r"max_small_message_bytes \(8192\) is above max_message_bytes \(4096\)"):
        Settings(max_message_bytes=4096, max_small_message_bytes=8192)
    assert Settings(max_message_bytes=4096).max_small_message_bytes == 4096


@pytest.mark.parametrize(
    ("given", "level"),
    [("debug", "DEBUG"), ("Info", "INFO"), ("warn", "WARNING"), ("WARNING", "WARNING"), ("critical", "ERROR")],
)
def test_log_levels_in_any_case_and_their_usual_other_names(
    given: str, level: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SEQSERVE_LOG_LEVEL=debug (and WARN, CRITICAL) was refused: "Input should be 'DEBUG', 'INFO', ...\""""
    monkeypatch.setenv("SEQSERVE_LOG_LEVEL", given)
    assert Settings().log_level == level


def test_a_log_level_that_is_none_is_refused_as_given() -> None:
    with pytest.raises(ValidationError, match="input_value='verbose'"):
        Settings(log_level="verbose")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_message_bytes", 2**31, "less than or equal to 2147483647"),
        ("grpc_max_ping_strikes", 3_000_000_000, "less than or equal to 2147483647"),
        ("max_batch_size", 4096, "less than or equal to 1024"),
        ("intra_op_threads", 100_000, "less than or equal to 256"),
        ("inter_op_threads", 100_000, "less than or equal to 256"),
        ("host", "", "is empty: set 127.0.0.1 to listen on this machine only, or 0.0.0.0 for every interface"),
        ("host", " ", "is empty"),
        ("trace_dir", "/no-such-folder", "is not an existing folder: create it, or leave TRACE_DIR empty"),
        ("frontend_silent_seconds", 1.5, "a frontend sends its engines a heartbeat every second"),
        ("frontend_silent_seconds", -1, "greater than or equal to 0"),
    ],
)
def test_values_serve_cannot_use_are_refused_by_name(field: str, value: object, message: str) -> None:
    """A message limit or ping strikes past gRPC's int32 passed check and crashed serve with an OverflowError
    naming no setting; a batch of 65,536 rows or 100,000 ORT threads ran the machine out of memory in the
    warm-up; an empty host listened on every interface; a TRACE_DIR that does not exist refused every trace file
    named in it, after a start that said ok."""
    with pytest.raises(ValidationError) as info:
        Settings.model_validate({field: value})
    assert field in str(info.value) and message in str(info.value), str(info.value)


@pytest.mark.parametrize("value", [0, 3, 30])
def test_a_silent_frontend_limit_of_zero_or_at_least_three_seconds_is_taken(value: float) -> None:
    """0 never replaces a silent frontend (one under a debugger); a limit is at least 3 s (a frontend speaks once
    a second: below that, a busy second would read as a hang)."""
    assert Settings(frontend_silent_seconds=value).frontend_silent_seconds == value
