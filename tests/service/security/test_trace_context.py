"""W3C Trace Context: a caller's ``traceparent`` (gRPC metadata, or the REST header) puts its trace id and span id
on every log line of the call, and a sampled one becomes the exemplar of the call's latency bucket (OpenMetrics),
in one process and summed across frontends. A header that does not parse is ignored, never refused."""

from __future__ import annotations

import io
import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import cast

import grpc
import pytest

from service.api.gen.seqserve.v1 import sentiment_pb2, sessions_pb2
from service.tracing import parse_traceparent, sampled_trace_id
from tests.conftest import ServerHandle
from tests.service.kserve.procs import start_server, stop_server
from tests.service.security.conftest import eventually, raw_unary

TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
CLASSIFY = "/seqserve.v1.Sentiment/Classify"


def traceparent(
    trace: str = TRACE, span: str = SPAN, flags: str = "01", request_id: str | None = None
) -> tuple[tuple[str, str], ...]:
    sent = (("traceparent", f"00-{trace}-{span}-{flags}"),)
    return sent if request_id is None else (*sent, ("x-request-id", request_id))


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        (f"00-{TRACE}-{SPAN}-01", f"00-{TRACE}-{SPAN}-01"),
        (f" 00-{TRACE}-{SPAN}-00\t", f"00-{TRACE}-{SPAN}-00"),  # optional whitespace around the value
        (f"01-{TRACE}-{SPAN}-09-what-a-later-version-adds", f"00-{TRACE}-{SPAN}-09"),  # read by its first fields
        (f"00-{TRACE}-{SPAN}-01-extra", ""),  # version 00 is exactly 55 characters
        (f"ff-{TRACE}-{SPAN}-01", ""),  # version ff is invalid
        (f"00-{'0' * 32}-{SPAN}-01", ""),  # all-zero trace id
        (f"00-{TRACE}-{'0' * 16}-01", ""),  # all-zero parent id
        (f"00-{TRACE.upper()}-{SPAN}-01", ""),  # lower-case hex only
        (f"00-{TRACE[:-1]}-{SPAN}-01", ""),
        ("00-" + "a" * 600, ""),
        ("", ""),
        (None, ""),
    ],
)
def test_traceparent_parses_as_the_w3c_spec_says(header: str | None, parsed: str) -> None:
    assert parse_traceparent(header) == parsed


def test_only_a_sampled_trace_makes_an_exemplar() -> None:
    assert sampled_trace_id(f"00-{TRACE}-{SPAN}-01") == TRACE
    assert sampled_trace_id(f"00-{TRACE}-{SPAN}-03") == TRACE  # other flag bits do not matter
    assert sampled_trace_id(f"00-{TRACE}-{SPAN}-00") == ""
    assert sampled_trace_id("") == ""


def classify(target: str, metadata: tuple[tuple[str, str], ...]) -> None:
    payload = sentiment_pb2.ClassifyRequest(texts=["a fine film"]).SerializeToString()
    raw_unary(target, CLASSIFY, payload, metadata=metadata)


def test_log_lines_of_a_call_carry_its_trace(
    serve: Callable[..., ServerHandle], log_state: Callable[..., io.StringIO]
) -> None:
    handle = serve(access_log=True)
    out = log_state("INFO", "json")
    classify(handle.target, traceparent(request_id="with-trace"))
    classify(handle.target, traceparent(trace="a" * 32, flags="00", request_id="unsampled"))
    classify(handle.target, (("traceparent", "not a traceparent"), ("x-request-id", "bad-trace")))
    classify(handle.target, (("x-request-id", "no-trace"),))
    with pytest.raises(grpc.RpcError):  # a refusal's own line (INFO) carries the trace too
        payload = sessions_pb2.GetSessionRequest(session_id="nope").SerializeToString()
        raw_unary(handle.target, "/seqserve.v1.Sessions/Get", payload, metadata=traceparent(trace="b" * 32))
    assert eventually(lambda: out.getvalue().count('"seqserve.access"') >= 5)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    access = {r["request_id"]: r for r in records if r["logger"] == "seqserve.access"}
    assert (access["with-trace"]["trace_id"], access["with-trace"]["span_id"]) == (TRACE, SPAN)
    assert access["unsampled"]["trace_id"] == "a" * 32  # logged whether sampled or not
    assert "trace_id" not in access["bad-trace"] and "span_id" not in access["bad-trace"]
    assert "trace_id" not in access["no-trace"]
    refused = [r for r in records if r.get("method") == "/seqserve.v1.Sessions/Get"]
    assert len(refused) == 2 and {(r["trace_id"], r["code"]) for r in refused} == {("b" * 32, "NOT_FOUND")}
    out = log_state("INFO", "text")
    classify(handle.target, traceparent(request_id="text-line"))
    assert eventually(lambda: "text-line" in out.getvalue())
    assert f"[request text-line, trace {TRACE}]" in out.getvalue()


def openmetrics(port: int) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": OPENMETRICS})
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        return str(r.read().decode())


def exemplars(text: str, method: str) -> dict[str, float]:
    """trace id -> the ``le`` of the latency bucket that holds it, for ``method``'s OK calls."""
    bucket = r"^seqserve_rpc_duration_seconds_bucket\{([^}]*)\} \S+ "
    pattern = re.compile(bucket + r'# \{trace_id="([0-9a-f]{32})"\} (\S+)', re.M)
    found = {}
    for labels, trace, value in pattern.findall(text):
        named = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if named["method"] == method:
            assert float(value) <= float(named["le"])  # the exemplar's own value lies in its bucket
            found[trace] = float(named["le"])
    return found


def test_a_sampled_call_is_its_latency_buckets_exemplar(serve: Callable[..., ServerHandle]) -> None:
    handle = serve()
    classify(handle.target, traceparent())
    classify(handle.target, traceparent(trace="c" * 32, flags="00"))  # not sampled: no exemplar
    port = handle.server.metrics_port
    assert port is not None
    assert eventually(lambda: TRACE in openmetrics(port))
    found = exemplars(openmetrics(port), "Classify")
    assert set(found) == {TRACE}
    plain = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert TRACE not in plain and "seqserve_rpc_duration_seconds_bucket" in plain  # the text format has none


def test_the_rest_traceparent_header_reaches_logs_and_exemplars(
    serve: Callable[..., ServerHandle], log_state: Callable[..., io.StringIO]
) -> None:
    handle = serve(access_log=True, http_port=0)
    out = log_state("INFO", "json")
    body = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["a fine film"]}]})
    request = urllib.request.Request(
        f"http://127.0.0.1:{handle.server.http_port}/v2/models/sentiment/infer",
        data=body.encode(),
        headers={"Content-Type": "application/json", "traceparent": f"00-{TRACE}-{SPAN}-01"},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status == 200
    assert eventually(lambda: '"seqserve.access"' in out.getvalue())
    access = [json.loads(line) for line in out.getvalue().splitlines() if '"seqserve.access"' in line]
    assert [(r["method"], r["trace_id"], r["span_id"]) for r in access] == [
        ("/inference.GRPCInferenceService/ModelInfer", TRACE, SPAN)
    ]
    port = handle.server.metrics_port
    assert port is not None
    # (the hop's metrics are written a moment after its answer reached the gateway)
    assert eventually(lambda: set(exemplars(openmetrics(port), "ModelInfer")) == {TRACE})


def test_exemplars_cross_from_the_frontends_to_the_engines_metrics(tiny_models: Path, tmp_path: Path) -> None:
    """With --workers 2 the engine sums the frontends' latency buckets; each bucket keeps the newest exemplar
    any frontend reported, so the one /metrics still links to the traces."""
    proc, info = start_server(tiny_models, tmp_path, SEQSERVE_WORKERS="2", SEQSERVE_FRONTEND_PORTS="true")
    try:
        first, second = (f"127.0.0.1:{p}" for p in cast("list[int]", info["frontend_ports"]))
        port = int(info["metrics_port"])
        for target, trace in ((first, "d" * 32), (second, "e" * 32)):  # one call on each frontend, one after the other
            classify(target, traceparent(trace=trace))
            assert eventually(lambda trace=trace: trace in exemplars(openmetrics(port), "Classify"))  # type: ignore[misc]
    finally:
        stop_server(proc)
