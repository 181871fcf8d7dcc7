"""Triton's logging extension (``LogSettings``): each severity on or off on its own, verbose records from level 1,
the format, all changed while the server runs; every bad change refused whole, with what to fix.

The multi-process path (a change reaching both frontends and the engine, through tritonclient) is in
``tests/service/engine/test_workers.py``."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable

import grpc
import pytest
from grpc import StatusCode as Code

from service import logs
from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.kserve.convert import fill_log_settings
from service.errors import InvalidInput
from tests.conftest import ServerHandle

DEFAULTS = {"log_file": "", "log_info": True, "log_warning": True, "log_error": True, "log_verbose_level": 0,
            "log_format": "text"}  # fmt: skip


def _lines(buffer: io.StringIO) -> list[str]:
    return [line.split(" ", 3)[-1] for line in buffer.getvalue().splitlines()]


def _write_each_level(tag: str) -> None:
    log = logging.getLogger("service.test")
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL):
        log.log(level, "%s %s", tag, logging.getLevelName(level))


def test_each_severity_is_switched_on_its_own(log_state: Callable[[str], io.StringIO]) -> None:
    """Python's one threshold cannot say "errors and info, no warnings"; the switches can, and a verbose level
    of 1 or more adds DEBUG records."""
    out = log_state("INFO")
    _write_each_level("a")
    assert logs.update({"log_warning": False}) == {**DEFAULTS, "log_warning": False}
    _write_each_level("b")
    logs.update({"log_warning": True, "log_error": False, "log_info": False, "log_verbose_level": 2})
    _write_each_level("c")
    logs.update({"log_error": True, "log_info": True, "log_verbose_level": 0})
    _write_each_level("d")
    assert _lines(out) == [
        "service.test: a INFO", "service.test: a WARNING", "service.test: a ERROR", "service.test: a CRITICAL",
        "service.test: b INFO", "service.test: b ERROR", "service.test: b CRITICAL",
        "service.test: c DEBUG", "service.test: c WARNING",
        "service.test: d INFO", "service.test: d WARNING", "service.test: d ERROR", "service.test: d CRITICAL",
    ]  # fmt: skip
    assert logging.getLogger().level == logging.INFO  # records nobody would write are not even built


def test_verbose_level_1_is_this_servers_debug_records_and_2_the_libraries_too(
    log_state: Callable[[str], io.StringIO],
) -> None:
    """Level 1 let every library's DEBUG records through: gRPC's wrote a line per call ("Loaded running loop"),
    burying the server's own."""
    out = log_state("INFO")
    for level in (1, 2):
        logs.update({"log_verbose_level": level})
        for name in ("service.core.batching", "seqserve.access", "grpc._cython.cygrpc", "asyncio", "redis"):
            logging.getLogger(name).debug("at %d", level)
    assert _lines(out) == [
        "service.core.batching: at 1", "seqserve.access: at 1",
        "service.core.batching: at 2", "seqserve.access: at 2", "grpc._cython.cygrpc: at 2", "asyncio: at 2",
        "redis: at 2",
    ]  # fmt: skip


def test_grpcs_traceback_for_an_answer_to_an_ended_call_is_a_library_debug_line(
    log_state: Callable[[str], io.StringIO],
) -> None:
    """grpc.aio logs "ExecuteBatchError raised in core by servicer method" at ERROR, with a traceback, when an
    answer finds its call ended by the client's deadline: short deadlines wrote tracebacks at will (29 in 30 s).
    The edge counts and logs such calls; this line shows at verbose level 2 only. Other gRPC errors still show."""
    out = log_state("INFO")
    cygrpc = logging.getLogger("grpc._cython.cygrpc")
    try:
        raise RuntimeError("Failed execute_batch")
    except RuntimeError:
        cygrpc.exception("ExecuteBatchError raised in core by servicer method [%s]", "/seqserve.v1.Sessions/Get")
    cygrpc.error("something else went wrong")
    logs.update({"log_verbose_level": 2})
    cygrpc.error("ExecuteBatchError raised in core by servicer method [%s]", "/x")
    assert _lines(out) == [
        "grpc._cython.cygrpc: something else went wrong",
        "grpc._cython.cygrpc: ExecuteBatchError raised in core by servicer method [/x]",
    ]


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("DEBUG", {"log_verbose_level": 1}),
        ("INFO", {}),
        ("WARNING", {"log_info": False}),
        ("ERROR", {"log_info": False, "log_warning": False}),
    ],
)
def test_the_start_up_log_level_reads_as_switches(
    log_state: Callable[[str], io.StringIO], level: str, expected: dict[str, object]
) -> None:
    log_state(level)
    assert logs.current() == {**DEFAULTS, **expected}
    assert logging.getLogger().level == logging.getLevelName(level)


def test_a_change_leaves_the_settings_it_does_not_name_as_they_are(log_state: Callable[[str], io.StringIO]) -> None:
    log_state("INFO")
    logs.update({"log_warning": False, "log_format": "json"})
    assert logs.update({"log_verbose_level": 3}) == {
        **DEFAULTS, "log_warning": False, "log_format": "json", "log_verbose_level": 3
    }  # fmt: skip
    assert logs.update({}) == logs.current()


def test_tritons_default_format_is_text(log_state: Callable[..., io.StringIO]) -> None:
    """Triton's tools reset the settings with log_format "default": here that is the text format."""
    log_state("INFO", "json")
    reset = {"log_info": True, "log_warning": True, "log_error": True, "log_verbose_level": 0, "log_format": "default"}
    assert logs.update(reset) == DEFAULTS


def test_the_format_changes_while_running(log_state: Callable[[str], io.StringIO]) -> None:
    out = log_state("INFO")
    logs.update({"log_format": "json"})
    logging.getLogger("service.test").info("as json")
    logs.update({"log_format": "text"})
    logging.getLogger("service.test").info("as text")
    first, second = out.getvalue().splitlines()
    assert json.loads(first)["message"] == "as json"
    assert second.endswith("INFO service.test: as text")


def test_tritons_iso8601_format_writes_utc_times_to_the_millisecond(log_state: Callable[[str], io.StringIO]) -> None:
    """Triton's ISO8601 format: the text lines, each starting with its time in ISO 8601, UTC."""
    out = log_state("INFO")
    assert logs.update({"log_format": "ISO8601"})["log_format"] == "iso8601"
    record = logging.LogRecord("service.test", logging.WARNING, __file__, 1, "in ISO\n8601", (), None)
    record.created, record.msecs = 1_796_313_388.0, 123.0  # 2026-12-03 15:56:28.123 UTC
    logging.getLogger("service.test").handle(record)
    logs.update({"log_format": "default"})
    logging.getLogger("service.test").info("back to text")
    iso, text = out.getvalue().splitlines()
    assert iso == "2026-12-03T15:56:28.123Z WARNING service.test: in ISO\\n8601"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO service.test: back to text", text)
    assert logs.update({"log_format": "iso8601"})["log_format"] == "iso8601"  # (SEQSERVE_LOG_FORMAT's spelling)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"log_infos": True}, "unknown log setting 'log_infos'; the settings are log_file, log_info, log_warning"),
        ({"log_info": 1}, "log setting 'log_info' takes a bool (bool_param), got an unsigned integer (uint32_param)"),
        ({"log_verbose_level": True}, "takes an unsigned integer (uint32_param), got a bool (bool_param)"),
        ({"log_format": False}, "'log_format' takes a string (string_param), got a bool (bool_param)"),
        ({"log_verbose_level": -1}, "log_verbose_level must be between 0 and 4294967295, got -1"),
        (
            {"log_format": "xml"},
            "log_format must be one of text, json, iso8601 (or Triton's default and ISO8601), got 'xml'",
        ),
        ({"log_format": "iso-8601"}, "log_format must be one of text, json, iso8601"),
        ({"log_file": "/var/log/seqserve.log"}, "log_file must be empty: seqserve writes its logs to standard error"),
        ({"x" * 300: True}, "unknown log setting 'xxxxxxxxxxxxxxx"),
        ({"log\nfile": True}, "unknown log setting 'log\\nfile'"),
    ],
)
def test_a_bad_change_is_refused_whole(
    log_state: Callable[[str], io.StringIO], change: dict[str, object], message: str
) -> None:
    """Nothing of a refused request is applied, not even its valid settings."""
    log_state("INFO")
    with pytest.raises(InvalidInput) as info:
        logs.update({"log_info": False, **change})
    assert message in str(info.value)
    assert logs.current() == DEFAULTS
    assert logs.update({"log_file": ""}) == DEFAULTS  # the one log_file there is


# --- through the server --------------------------------------------------------------------------------------
def _request(**values: bool | int | str | None) -> pb.LogSettingsRequest:
    r = pb.LogSettingsRequest()
    fill_log_settings(r.settings, {k: v for k, v in values.items() if v is not None})
    for key in [k for k, v in values.items() if v is None]:
        r.settings.get_or_create(key)  # the key with no value
    return r


def _settings(response: pb.LogSettingsResponse) -> dict[str, object]:
    return {k: getattr(v, str(v.WhichOneof("parameter_choice"))) for k, v in response.settings.items()}


def test_log_settings_over_grpc(
    start_server: Callable[..., ServerHandle], log_state: Callable[[str], io.StringIO]
) -> None:
    """One process: read (an empty request), change some, refuse a bad one with what to fix; the server goes on
    serving, and ServerMetadata lists the extension."""
    out = log_state("INFO")
    handle = start_server()
    with grpc.insecure_channel(handle.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert _settings(stub.LogSettings(pb.LogSettingsRequest(), timeout=30)) == DEFAULTS
        verbose = _settings(stub.LogSettings(_request(log_verbose_level=1), timeout=30))
        assert verbose == {**DEFAULTS, "log_verbose_level": 1}
        changed = _settings(stub.LogSettings(_request(log_warning=False, log_format="text"), timeout=30))
        assert changed == {**DEFAULTS, "log_verbose_level": 1, "log_warning": False}
        assert _settings(stub.LogSettings(pb.LogSettingsRequest(), timeout=30)) == changed
        for bad, words in (
            (_request(log_info=None), "log setting 'log_info' has no value: set its bool_param"),
            (_request(log_info=3), "'log_info' takes a bool (bool_param), got an unsigned integer (uint32_param)"),
            (_request(log_error=False, log_file="x.log"), "log_file must be empty"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                stub.LogSettings(bad, timeout=30)
            assert info.value.code() == Code.INVALID_ARGUMENT
            assert words in str(info.value.details())
        assert _settings(stub.LogSettings(pb.LogSettingsRequest(), timeout=30)) == changed  # nothing applied
        assert "logging" in stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=30).extensions
        assert stub.ModelReady(pb.ModelReadyRequest(name="sentiment"), timeout=30).ready
    audit = [line for line in _lines(out) if "log settings changed" in line]
    # Each change is written, the one that turned warnings off too: no setting silences the audit lines.
    assert [line.split(" [request")[0] for line in audit] == [
        "seqserve.audit: log settings changed by the anonymous principal: log_verbose_level=1",
        "seqserve.audit: log settings changed by the anonymous principal: log_format=text, log_warning=False",
    ]
