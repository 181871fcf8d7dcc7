"""End to end: a real seqserve process, a real Prometheus scraping it every second, traffic through every API,
then checks through Prometheus's HTTP API: the target is up, counters equal the traffic sent, latency quantiles
are finite, and every PromQL expression of the Grafana dashboard and of the alert rules evaluates and returns
series."""

from __future__ import annotations

import http.client
import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from service.api.gen.inference import grpc_service_pb2 as v2
from service.api.gen.inference import grpc_service_pb2_grpc as v2_grpc
from service.client import ApiError, Client
from tests.integration.conftest import ROOT, Prometheus, SeqServe, http_get, run_prometheus, shipped_job, wait_for

pytestmark = pytest.mark.timeout(600)

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "seqserve.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
TLS_ONLY = {"SeqServeCertificateExpiresSoon"}  # rules whose series exist only on a TLS server
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"  # the sampled trace of one_round's KServe ModelInfer
RATE_WINDOW = "1m"  # covers the whole test: both rounds of traffic and the scrapes between them
MODEL_METHODS = 'method=~"Classify|Complete|Predict|ModelInfer"'


def query(prom: Prometheus, expr: str) -> list[dict[str, Any]]:
    status, body = http_get(prom.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    data = json.loads(body or b"{}")
    assert status == 200 and data.get("status") == "success", f"{expr}\n-> HTTP {status}: {data.get('error')}"
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


def scalar(prom: Prometheus, expr: str) -> float:
    result = query(prom, expr)
    assert len(result) == 1, f"{expr} -> {result}"
    return float(result[0]["value"][1])


@dataclass
class Traffic:
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method, code) -> RPCs sent
    texts: int = 0  # sentiment texts the model classified (Classify + KServe ModelInfer; not those from the cache)
    runs: int = 0  # sentiment requests that ran the model (each of its texts' length groups: one here)
    cached: Counter[str] = field(default_factory=Counter)  # response cache lookups: "hit" / "miss"
    completes: int = 0
    completion_chars: int = 0
    scored: int = 0  # forecast targets scored against the quantiles forecast for them
    streamed: Counter[tuple[str, str]] = field(default_factory=Counter)  # (model, code) -> requests inside streams
    rest: Counter[tuple[str, str]] = field(default_factory=Counter)  # (route, status) -> REST answers
    refused: int = 0  # REST connections the server closed at once (every slot taken)


def rest_request(seqserve: SeqServe, method: str, path: str, body: bytes | None, t: Traffic) -> int:
    """One REST request; a connection the server closes unanswered (no free slot) is counted and tried again."""
    for _ in range(100):
        connection = http.client.HTTPConnection("127.0.0.1", seqserve.http_port, timeout=10)
        try:
            connection.request(method, path, body, {"Content-Type": "application/json"} if body else {})
            response = connection.getresponse()
            response.read()
            return response.status
        except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError):
            t.refused += 1
            time.sleep(0.05)
        finally:
            connection.close()
    raise AssertionError(f"REST {method} {path}: every try was refused")


def fill_rest_slots(seqserve: SeqServe, t: Traffic) -> None:
    """Takes connection slots of the REST port (kept-alive connections, each served once, so each surely holds
    one) until a connection is refused for want of one (busy, counted by the server). With N frontends each has
    ``http_slots`` (the kernel spreads connections), so that takes at most N x ``http_slots`` connections. Then
    frees them."""
    held: list[http.client.HTTPConnection] = []
    try:
        while True:
            assert len(held) <= 64 * seqserve.http_slots, "no connection was ever refused"
            connection = http.client.HTTPConnection("127.0.0.1", seqserve.http_port, timeout=10)
            try:
                connection.request("GET", "/v2/health/live")
                answer = connection.getresponse()
                answer.read()
            except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError):
                t.refused += 1
                connection.close()
                return
            assert answer.status == 200 and not answer.will_close
            held.append(connection)
            t.rest["/v2/health/live", "200"] += 1
            t.calls["ServerLive", "OK"] += 1
    finally:
        for connection in held:
            connection.close()


def one_round(
    c: Client, kserve: v2_grpc.GRPCInferenceServiceStub, seqserve: SeqServe, t: Traffic, first_round: bool
) -> None:
    """One of every API call, plus two failures: an unknown model (client error) and a full session store
    (RESOURCE_EXHAUSTED, a server-side code), then the KServe v2 endpoint. Sessions are deleted at the end, so
    rounds repeat identically but for one text: the server's response cache (on here) answers the second round's
    stateless Classify, Predict and unary ModelInfer, and the streamed sentence differs, so each round runs the
    sentiment model. (The KServe stub is our generated one: tritonclient's protos clash with ours in one process;
    tests/service/kserve drives tritonclient itself in its own interpreter.)"""
    ran = 1 if first_round else 0
    # (Classify looks up each of its two texts)
    t.cached.update({"miss": 5} if first_round else {"hit": 4, "miss": 1})
    t.texts += ran * len(c.classify(["a fine film", "a dull one"], model="sentiment"))
    t.runs += ran
    t.calls["Classify", "OK"] += 1
    with pytest.raises(ApiError) as err:
        c.classify(["x"], model="no-such-model")
    assert err.value.code.name == "NOT_FOUND"
    t.calls["Classify", "NOT_FOUND"] += 1
    t.completion_chars += sum(len(ch.text) for ch in c.complete("ROMEO:", model="charlm", max_chars=16, seed=1))
    t.completes += 1
    t.calls["Complete", "OK"] += 1

    s1 = c.create_session("charlm")
    assert len(list(c.suggest(s1.id, ["To be", " or"]))) == 2
    s2 = c.fork_session(s1.id)
    assert c.get_session(s2.id).id == s2.id
    s3 = c.create_session("forecaster")
    rows = np.linspace(0.0, 5.0, 30 * 7, dtype=np.float32).reshape(30, 7)
    c.forecast(rows, model="forecaster")
    first = c.observe(s3.id, rows[:24])  # a full window: the session's first forecast
    c.observe(s3.id, rows[24:30])  # six rows it forecast: scored against its quantiles
    t.scored += 6 * first.quantiles.shape[2]
    t.calls.update({("Create", "OK"): 2, ("Suggest", "OK"): 1, ("Fork", "OK"): 1, ("Get", "OK"): 1})
    t.calls.update({("Predict", "OK"): 1, ("Observe", "OK"): 2})
    assert seqserve.max_sessions == 3  # the store is full now
    with pytest.raises(ApiError) as err:
        c.create_session("charlm")
    assert err.value.code.name == "RESOURCE_EXHAUSTED"
    t.calls["Create", "RESOURCE_EXHAUSTED"] += 1
    # A KServe stream while the store is full: a sentence is answered, a sequence start is refused inline.
    sentence = v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])
    sentence.contents.bytes_contents.append(b"a fine film" if first_round else b"a fine film, again")
    chars = v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])
    chars.contents.bytes_contents.append(b"To be")
    start = v2.ModelInferRequest(model_name="charlm", inputs=[chars])
    start.parameters["sequence_id"].int64_param = 7
    start.parameters["sequence_start"].bool_param = True
    classify = v2.ModelInferRequest(model_name="sentiment", inputs=[sentence])
    answers = list(kserve.ModelStreamInfer(iter([classify, start]), timeout=30))
    assert answers[0].error_message == "" and "session store is full" in answers[1].error_message
    t.texts += 1
    t.runs += 1
    t.streamed.update({("sentiment", "OK"): 1, ("charlm", "RESOURCE_EXHAUSTED"): 1})
    t.calls["ModelStreamInfer", "OK"] += 1
    for s in (s1, s2, s3):
        c.delete_session(s.id)
    t.calls["Delete", "OK"] += 3

    assert kserve.ServerLive(v2.ServerLiveRequest(), timeout=30).live
    text = v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[2])
    text.contents.bytes_contents.extend([b"a fine film", b"a dull one"])
    # A caller that samples its trace (W3C traceparent, flags 01): the trace id becomes the latency's exemplar.
    sampled = (("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"),)
    request = v2.ModelInferRequest(model_name="sentiment", inputs=[text])
    response = kserve.ModelInfer(request, timeout=30, metadata=sampled)
    assert [o.name for o in response.outputs] == ["LABEL", "PROBABILITIES"]
    assert len(response.raw_output_contents) == 2
    t.texts += 2 * ran
    t.runs += ran
    t.calls.update({("ServerLive", "OK"): 1, ("ModelInfer", "OK"): 1})

    # The REST port: a forwarded call (ModelMetadata, also an RPC), a refusal of the gateway's own (no RPC), and a
    # connection refused for want of a slot.
    assert rest_request(seqserve, "GET", "/v2/models/sentiment", None, t) == 200
    t.rest["/v2/models/{model}", "200"] += 1
    t.calls["ModelMetadata", "OK"] += 1
    assert rest_request(seqserve, "POST", "/v2/models/sentiment/infer", b"{}", t) == 400
    t.rest["/v2/models/{model}/infer", "400"] += 1
    fill_rest_slots(seqserve, t)


def requests_seen(prom: Prometheus, n: int) -> bool:
    """Prometheus's latest scrape holds exactly ``n`` finished RPCs."""
    result = query(prom, "sum(seqserve_rpc_requests_total)")
    return bool(result) and float(result[0]["value"][1]) == n


@pytest.fixture(scope="module")
def traffic(seqserve: SeqServe, prometheus: Prometheus) -> Traffic:
    wait_for(
        "a first successful scrape",
        lambda: [r for r in query(prometheus, 'up{job="seqserve"}') if r["value"][1] == "1"],
    )
    t = Traffic()
    channel = grpc.insecure_channel(seqserve.grpc_target)
    kserve = v2_grpc.GRPCInferenceServiceStub(channel)  # KServe v2 / Open Inference Protocol
    with Client(seqserve.grpc_target) as c:
        # Two rounds with a scrape between them: series exist before the second round, so rate() sees it grow.
        for i in range(2):
            one_round(c, kserve, seqserve, t, first_round=i == 0)
            sent = sum(t.calls.values())
            wait_for(f"Prometheus to see {sent} RPCs", partial(requests_seen, prometheus, sent), timeout=60)
    channel.close()
    return t


def test_target_is_up(prometheus: Prometheus, traffic: Traffic) -> None:
    status, body = http_get(prometheus.url + "/api/v1/targets")
    targets = json.loads(body)["data"]["activeTargets"]
    assert status == 200 and len(targets) == 1
    assert targets[0]["health"] == "up", targets[0]["lastError"]
    assert targets[0]["lastError"] == ""
    assert scalar(prometheus, 'up{job="seqserve"}') == 1.0


def test_the_response_cache_answers_the_repeated_round(prometheus: Prometheus, traffic: Traffic) -> None:
    got = {
        r["metric"]["result"]: float(r["value"][1])
        for r in query(prometheus, "sum by (result) (seqserve_response_cache_lookups_total)")
    }
    assert got == {k: float(v) for k, v in traffic.cached.items()} == {"miss": 6.0, "hit": 4.0}
    assert scalar(prometheus, "sum(seqserve_response_cache_entries)") == 6.0  # Classify's texts kept one by one


def test_request_counters_match_the_traffic(prometheus: Prometheus, traffic: Traffic) -> None:
    got = {
        (r["metric"]["method"], r["metric"]["code"]): float(r["value"][1])
        for r in query(prometheus, "sum by (method, code) (seqserve_rpc_requests_total) > 0")
    }
    assert got == {k: float(v) for k, v in traffic.calls.items()}
    # The server-side codes the error-ratio alert counts are there at 0 before any happened (rate() sees the first).
    zero = {r["metric"]["code"] for r in query(prometheus, 'seqserve_rpc_requests_total{method="Classify"} == 0')}
    assert {"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"} <= zero
    # The gRPC service label survives the shipped scrape config (a target label of the same name replaced it).
    services = {r["metric"].get("service") for r in query(prometheus, "sum by (service) (seqserve_rpc_requests_total)")}
    assert "seqserve.v1.Sentiment" in services and "inference.GRPCInferenceService" in services
    by_model = {
        (r["metric"]["method"], r["metric"].get("model", "")): float(r["value"][1])
        for r in query(prometheus, f"sum by (method, model) (seqserve_rpc_requests_total{{{MODEL_METHODS}}}) > 0")
    }
    assert by_model == {
        ("Classify", "sentiment"): 2.0,
        ("Classify", "_other"): 2.0,
        ("Complete", "charlm"): 2.0,
        ("Predict", "forecaster"): 2.0,
        ("ModelInfer", "sentiment"): 2.0,
    }
    assert scalar(prometheus, "sum(seqserve_rpc_in_flight)") == 0.0


def test_requests_inside_streams_are_counted_by_outcome(prometheus: Prometheus, traffic: Traffic) -> None:
    """Each request of a ModelStreamInfer stream counts by the status it got inline (the stream is one OK RPC)."""
    got = {
        (r["metric"]["model"], r["metric"]["code"]): float(r["value"][1])
        for r in query(prometheus, "sum by (model, code) (seqserve_rpc_stream_requests_total) > 0")
    }
    assert got == {k: float(v) for k, v in traffic.streamed.items()}


def test_latency_quantiles_are_finite(prometheus: Prometheus, traffic: Traffic) -> None:
    buckets = f'rate(seqserve_rpc_duration_seconds_bucket{{model!=""}}[{RATE_WINDOW}])'
    expr = f"histogram_quantile(0.99, sum by (model, le) ({buckets}))"
    p99 = {r["metric"]["model"]: float(r["value"][1]) for r in query(prometheus, expr)}
    for model in ("sentiment", "charlm", "forecaster"):
        assert math.isfinite(p99[model]) and 0 < p99[model] <= 10.0, (model, p99)
    expr = (
        f"histogram_quantile(0.5, sum by (model, le) (rate(seqserve_inference_compute_seconds_bucket[{RATE_WINDOW}])))"
    )
    p50 = {r["metric"]["model"]: float(r["value"][1]) for r in query(prometheus, expr)}
    assert all(math.isfinite(v) and v > 0 for v in p50.values()) and set(p50) == {"sentiment", "charlm", "forecaster"}


def test_a_sampled_calls_trace_is_the_exemplar_of_its_latency(prometheus: Prometheus, traffic: Traffic) -> None:
    """Prometheus (exemplar storage on) keeps the trace id of the one call that sent a sampled ``traceparent``
    on the latency bucket of that call, and on no other method's: Grafana's latency panel links to the trace."""
    now = time.time()
    window = {"start": f"{now - 600:.3f}", "end": f"{now + 60:.3f}"}
    args = {"query": "seqserve_rpc_duration_seconds_bucket", **window}
    status, body = http_get(prometheus.url + "/api/v1/query_exemplars?" + urllib.parse.urlencode(args))
    data = json.loads(body or b"{}")
    assert status == 200 and data.get("status") == "success", data
    seen = [(series["seriesLabels"], exemplar) for series in data["data"] for exemplar in series["exemplars"]]
    assert seen, "no exemplars stored"
    assert {e["labels"]["trace_id"] for _, e in seen} == {TRACE_ID}
    assert {(s["method"], s["model"], s["code"]) for s, _ in seen} == {("ModelInfer", "sentiment", "OK")}
    assert all(0 < float(e["value"]) <= float(labels["le"]) for labels, e in seen)
    targets = [t for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]
    latency = [t for t in targets if "seqserve_rpc_duration_seconds_bucket" in t["expr"]]
    assert len(latency) == 4 and all(t.get("exemplar") is True for t in latency)  # the panels draw them


def test_core_metrics_match_the_traffic(prometheus: Prometheus, traffic: Traffic) -> None:
    # Per request (text), not per batch: the inference histograms count every classified text once.
    # (per request that ran the model, not per text: a request of two texts once)
    assert scalar(prometheus, 'sum(seqserve_inference_seconds_count{model="sentiment"})') == traffic.runs
    assert scalar(prometheus, 'sum(seqserve_inference_batch_size_sum{model="sentiment"})') == traffic.texts
    events = {
        (r["metric"]["model"], r["metric"]["event"]): float(r["value"][1])
        for r in query(prometheus, "seqserve_session_events_total > 0")
    }
    # Per round: charlm created + forked (a fork is also a creation), forecaster created; all three deleted.
    assert events == {
        ("charlm", "created"): 4.0,
        ("charlm", "forked"): 2.0,
        ("charlm", "deleted"): 4.0,
        ("forecaster", "created"): 2.0,
        ("forecaster", "deleted"): 2.0,
    }
    assert scalar(prometheus, "sum(seqserve_sessions_active)") == 0.0
    assert scalar(prometheus, "seqserve_session_store_capacity_sessions") == 3.0
    assert scalar(prometheus, 'seqserve_time_to_first_chunk_seconds_count{model="charlm"}') == traffic.completes
    assert scalar(prometheus, 'seqserve_generated_chars_total{model="charlm"}') >= traffic.completion_chars > 0
    # Two texts fed from nothing each round (the stateless Complete's prompt, a new session's first Suggest): the
    # first round fed both, every later one found both in the prefix cache.
    lookups = {
        r["metric"]["result"]: float(r["value"][1])
        for r in query(prometheus, 'seqserve_prefix_cache_lookups_total{model="charlm"}')
    }
    rounds = traffic.completes
    assert lookups == {"hit": 2.0 * (rounds - 1), "partial": 0.0, "miss": 2.0}
    reused = scalar(prometheus, 'seqserve_prefix_cache_reused_chars_total{model="charlm"}')
    assert reused == (len("ROMEO:") + len("To be")) * (rounds - 1)
    info = query(prometheus, "seqserve_model_info")
    assert {(r["metric"]["model"], r["metric"]["version"]) for r in info} == {
        ("sentiment", "1"),
        ("charlm", "1"),
        ("forecaster", "1"),
    }
    assert all(r["metric"]["provider"] == "CPUExecutionProvider" for r in info)
    assert scalar(prometheus, "min(seqserve_model_ready)") == 1.0
    # Live interval coverage: every target the second Observe brought was scored against the first forecast.
    assert scalar(prometheus, 'sum(seqserve_forecast_observed_targets_total{model="forecaster"})') == traffic.scored
    below = {
        r["metric"]["level"]: float(r["value"][1])
        for r in query(prometheus, 'seqserve_forecast_targets_below_total{model="forecaster"}')
    }
    assert set(below) == {"0.1", "0.5", "0.9"} and below["0.1"] <= below["0.5"] <= below["0.9"] <= traffic.scored


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    # Grafana's variables, as Grafana would expand them for "All" models and a short time range.
    return [(title, e.replace("$__rate_interval", RATE_WINDOW).replace("$model", ".*")) for title, e in exprs]


def test_rest_answers_and_refused_connections_are_counted(prometheus: Prometheus, traffic: Traffic) -> None:
    def seen() -> dict[tuple[str, str], float] | None:
        rows = query(prometheus, "sum by (route, code) (seqserve_http_requests_total)")
        got = {(r["metric"]["route"], r["metric"]["code"]): float(r["value"][1]) for r in rows}
        return got if got == {k: float(v) for k, v in traffic.rest.items()} else None

    wait_for(f"Prometheus to see the REST answers {dict(traffic.rest)}", seen, timeout=30)
    assert traffic.refused >= 2  # one per round at least
    refused = 'sum(seqserve_http_connections_closed_total{port="rest", reason="busy"})'
    wait_for(f"{traffic.refused} refused connections", lambda: scalar(prometheus, refused) == traffic.refused)


def test_every_dashboard_query_returns_series(prometheus: Prometheus, traffic: Traffic) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 25
    # (the TLS panel has series only on a TLS server: test_prometheus_scrapes_a_tls_server_... queries it)
    empty = [(title, e) for title, e in exprs if not query(prometheus, e) and "seqserve_tls_" not in e]
    assert not empty, f"dashboard queries with no series after traffic: {empty}"


def with_bool(expr: str) -> str:
    """``x > 0.9`` filters series out; ``x > bool 0.9`` keeps them as 0/1, so 'returns series' is testable."""
    return re.sub(r"(==|!=|>=|<=|>|<)\s*(?=[-+]?[0-9.])", r"\1 bool ", expr)


def test_every_alert_rule_evaluates_and_returns_series(prometheus: Prometheus, traffic: Traffic) -> None:
    rules = {r["alert"]: r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert len(rules) == 15
    for name, expr in rules.items():
        if name in TLS_ONLY:  # (series only with TLS: test_prometheus_scrapes_a_tls_server_...)
            continue
        assert query(prometheus, with_bool(expr)), f"{name}: no series for {with_bool(expr)}"

    # Prometheus itself loaded the file and evaluates every rule without error (rule health "ok").
    def evaluated() -> list[dict[str, Any]] | None:
        loaded = [
            r for g in json.loads(http_get(prometheus.url + "/api/v1/rules")[1])["data"]["groups"] for r in g["rules"]
        ]
        return loaded if loaded and all(r["health"] != "unknown" for r in loaded) else None

    loaded = wait_for("every alert rule to be evaluated once", evaluated, timeout=30)
    assert {r["name"] for r in loaded} == set(rules)
    for r in loaded:
        assert r["health"] == "ok" and not r.get("lastError"), (r["name"], r.get("lastError"))


def test_with_bool_keeps_label_matchers() -> None:
    assert with_bool('up{job="x"} == 0') == 'up{job="x"} == bool 0'
    assert with_bool('a{code!="OK"} > 0.05') == 'a{code!="OK"} > bool 0.05'
    assert with_bool("(a / b > 0.9) or (c > 1)") == "(a / b > bool 0.9) or (c > bool 1)"


def test_tritons_metric_names_count_the_traffic(prometheus: Prometheus, traffic: Traffic) -> None:
    """SEQSERVE_TRITON_METRICS (on here): Prometheus ingests Triton's names from the engine's endpoint, counting
    what the seqserve_* series count."""
    assert scalar(prometheus, 'sum(nv_inference_count{model="sentiment"})') == traffic.texts
    assert scalar(prometheus, 'sum(nv_inference_count{model="sentiment"})') == scalar(
        prometheus, 'sum(seqserve_inference_batch_size_sum{model="sentiment"})'
    )
    assert scalar(prometheus, 'nv_inference_request_success{model="charlm",version="1"}') > 0
    assert scalar(prometheus, 'nv_inference_compute_infer_duration_us{model="forecaster",version="1"}') > 0
    assert scalar(prometheus, 'nv_cache_num_hits_per_model{model="sentiment",version="1"}') > 0  # rounds 2+
    assert scalar(prometheus, "max(nv_inference_pending_request_count)") == 0.0
    assert 0 < scalar(prometheus, "nv_cpu_memory_used_bytes") <= scalar(prometheus, "nv_cpu_memory_total_bytes")
    rate = scalar(prometheus, 'sum(rate(nv_inference_request_success{model="sentiment"}[5m]))')
    assert rate >= 0.0  # a range query over the untyped series evaluates as over a counter


def test_promtool_lints_the_live_server_exposition(seqserve: SeqServe, traffic: Traffic) -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None  # installed with prometheus (the fixtures skip or install before this runs)
    status, body = http_get(f"http://127.0.0.1:{seqserve.metrics_port}/metrics")
    assert status == 200 and b"seqserve_rpc_requests_total" in body
    # Triton's names (SEQSERVE_TRITON_METRICS, on here) are Triton's, _us and _count included, which promtool's
    # naming lint flags: every other family is linted.
    ours = b"".join(line for line in body.splitlines(keepends=True) if not _names_triton_family(line))
    assert len(ours) < len(body) and b"nv_inference" not in ours
    proc = subprocess.run([promtool, "check", "metrics"], input=ours, capture_output=True, timeout=60)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), (proc.stdout + proc.stderr).decode()


def test_prometheus_scrapes_a_tls_server_and_its_certificate_alert_goes_pending(
    model_repo: Path, tmp_path: Path
) -> None:
    """The scrape job docs/deploy.md describes for TLS (``scheme: https``, a ``tls_config`` with the CA and, under
    mTLS, a client certificate) against a real mTLS server: Prometheus scrapes it, the certificate's expiry series
    carries its subject, and SeqServeCertificateExpiresSoon, on the test certificate that lives 2 days, is pending
    (it fires after 10 minutes) with that subject, evaluated without error."""
    from tests.service.kserve.procs import start_server, stop_server
    from tests.service.security.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    tls = {"SEQSERVE_TLS_CERT": str(pki.server.cert), "SEQSERVE_TLS_KEY": str(pki.server.key)}
    proc, info = start_server(model_repo, tmp_path, SEQSERVE_TLS_CLIENT_CA=str(pki.ca), **tls)
    try:
        job = shipped_job(int(info["metrics_port"]))
        job |= {"scheme": "https", "tls_config": {
            "ca_file": str(pki.ca), "cert_file": str(pki.alice.cert), "key_file": str(pki.alice.key),
            "server_name": "localhost",
        }}  # fmt: skip
        (tmp_path / "prometheus").mkdir()
        with run_prometheus(tmp_path / "prometheus", job) as prometheus:
            up = 'up{job="seqserve"} == 1'
            wait_for("a scrape over TLS", lambda: query(prometheus, up), timeout=60)
            (series,) = query(prometheus, "seqserve_tls_certificate_expiry_timestamp_seconds")
            assert series["metric"]["subject"] == "O=seqserve-tests,CN=localhost"
            left = float(series["value"][1]) - time.time()
            assert 86400 < left < 2 * 86400 + 600  # (the test certificate's 2 days)
            (panel,) = [e for title, e in dashboard_exprs() if "seqserve_tls_" in e]  # the dashboard's days-left panel
            (days,) = query(prometheus, panel)
            assert days["metric"] == {"subject": "O=seqserve-tests,CN=localhost"}
            assert 1 < float(days["value"][1]) < 2.01

            def pending() -> list[dict[str, Any]] | None:
                groups = json.loads(http_get(prometheus.url + "/api/v1/rules")[1])["data"]["groups"]
                (rule,) = [r for g in groups for r in g["rules"] if r["name"] == "SeqServeCertificateExpiresSoon"]
                return rule["alerts"] if rule["health"] == "ok" and rule["alerts"] else None

            (alert,) = wait_for("the certificate alert to go pending", pending, timeout=30)
            assert alert["state"] == "pending" and alert["labels"]["subject"] == "O=seqserve-tests,CN=localhost"
    finally:
        stop_server(proc)


def _names_triton_family(line: bytes) -> bool:
    """Whether an exposition line (a sample, or its # HELP / # TYPE) belongs to one of Triton's nv_* families."""
    name = line.split(b" ", 3)[2] if line.startswith(b"# ") else line
    return name.startswith(b"nv_")
