"""deploy/prometheus and deploy/grafana: promtool validates the Prometheus config and alert rules (and runs the
alert unit tests); Grafana provisioning and the dashboard are parsed and cross-checked against the compose file.
The Dockerfiles, the compose file and the Kubernetes manifests have their own tests in tests/deploy (linters,
and the image and compose stack run for real by `make image-test`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from service.metrics import SERVER_ERROR_CODES
from tests.deploy.conftest import unavailable

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"


def promtool(*args: str) -> str:
    exe = shutil.which("promtool")
    if exe is None:
        unavailable("promtool not installed (make sysdeps installs it)")
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=DEPLOY / "prometheus")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_promtool_check_config() -> None:
    out = promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in out


def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", "alerts.yml")
    assert "SUCCESS: 15 rules found" in out


def test_promtool_alert_unit_tests() -> None:
    out = promtool("test", "rules", "alerts_test.yml")
    assert "SUCCESS" in out


def test_prometheus_scrapes_the_compose_service() -> None:
    cfg = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert jobs["seqserve"]["static_configs"][0]["targets"] == ["seqserve-1:8002", "seqserve-2:8002"]
    assert jobs["seqserve"].get("metrics_path", "/metrics") == "/metrics"
    assert cfg["rule_files"] == ["alerts.yml"]


def test_alerts_cover_the_required_conditions() -> None:
    rules = {r["alert"]: r for g in load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"] for r in g["rules"]}
    assert "up{" in rules["SeqServeDown"]["expr"]
    assert "seqserve_rpc_requests_total" in rules["SeqServeHighErrorRatio"]["expr"]
    assert "seqserve_rpc_stream_requests_total" in rules["SeqServeHighStreamErrorRatio"]["expr"]
    for alert in ("SeqServeHighErrorRatio", "SeqServeHighStreamErrorRatio"):  # the codes the server keeps at 0
        (codes,) = re.findall(r'code=~"([^"]+)"', rules[alert]["expr"])
        assert sorted(codes.split("|")) == sorted(SERVER_ERROR_CODES), alert
    assert "histogram_quantile(0.99" in rules["SeqServeHighLatencyP99"]["expr"]
    assert "by (job, model, le)" in rules["SeqServeHighLatencyP99"]["expr"]
    assert "seqserve_session_store_capacity" in rules["SeqServeSessionStoreNearCapacity"]["expr"]
    assert "seqserve_queue_depth" in rules["SeqServeSustainedQueueing"]["expr"]
    assert "seqserve_session_store_up == 0" in rules["SeqServeSessionStoreDown"]["expr"]
    assert rules["SeqServeModelReloadFailed"]["expr"] == "seqserve_model_reload_failed > 0"
    assert 'seqserve_http_connections_closed_total{reason="busy"}' in rules["SeqServeHttpConnectionsRefused"]["expr"]
    assert "seqserve_tls_certificate_expiry_timestamp_seconds" in rules["SeqServeCertificateExpiresSoon"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]


def _no_key_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    assert not twice, f"a JSON object has {twice} twice (the last one wins: an empty description hid the written one)"
    return dict(pairs)


def test_dashboard_covers_the_required_panels() -> None:
    text = (DEPLOY / "grafana" / "dashboards" / "seqserve.json").read_text()
    dash = json.loads(text, object_pairs_hook=_no_key_twice)
    assert dash["uid"] == "seqserve"
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    for needle in (
        "seqserve_rpc_requests_total",  # request rate, errors by code
        "histogram_quantile(0.99, sum by (model, le) (rate(seqserve_rpc_duration_seconds_bucket",
        "histogram_quantile(0.5, sum by (model, le) (rate(seqserve_rpc_duration_seconds_bucket",
        "seqserve_inference_queue_seconds",
        "seqserve_inference_compute_seconds",
        "seqserve_inference_batch_size",
        "seqserve_sessions_active",
        "seqserve_session_events_total",
        "seqserve_generated_chars_total",
        "seqserve_time_to_first_chunk_seconds_bucket",
        "seqserve_model_info",
        "seqserve_forecast_targets_below_total",  # live interval coverage
        "seqserve_forecast_observed_targets_total",
        "seqserve_prefix_cache_lookups_total",  # calls without a session that found their text
        "seqserve_response_cache_lookups_total",  # stateless requests the response cache answered
        "seqserve_http_requests_total",  # the REST port's answers, its own refusals included
        "seqserve_http_connections_closed_total",  # connections an HTTP port closed for want of a slot
        "seqserve_frontend_restarts_total",  # frontends that died and were replaced
        "seqserve_session_store_operations_total",  # hand-overs and takeovers between replicas (Redis)
    ):
        assert needle in exprs, needle
    # The server error ratio counts the requests inside KServe streams too (a stream is one RPC).
    (ratio,) = [p for p in dash["panels"] if p["title"] == "Server error ratio"]
    counters = [t["expr"].split("{")[0].removeprefix("(sum(rate(") for t in ratio["targets"]]
    assert counters == ["seqserve_rpc_requests_total", "seqserve_rpc_stream_requests_total"]
    # ... as 0 while no request failed (no error series exists then: the panel said "No data")
    assert all("[$__rate_interval])) or vector(0)) / sum(rate(" in t["expr"] for t in ratio["targets"])
    # Replicas sharing a store each report its whole count: sessions are counted once per store.
    for title in ("Active sessions", "Active sessions by model"):
        (panel,) = [p for p in dash["panels"] if p["title"] == title]
        (expr,) = [t["expr"] for t in panel["targets"]]
        assert expr.startswith(("sum(max by (store, model) (seqserve_sessions_active", "sum by (model) (max by (store"))
        assert expr.endswith(" * on(job, instance) group_left(store) seqserve_session_store_info))")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}  # panels tile the 24-column grid without overlapping
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for cell in ((x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])):
            assert cell not in cells, f"{p['title']} overlaps {cells[cell]}"
            cells[cell] = p["title"]
    # Every panel queries the provisioned datasource by its fixed uid.
    ds = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert ds["url"] == "http://prometheus:9090"
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == ds["uid"], panel["title"]


def test_compose_wiring_and_referenced_files_exist() -> None:
    compose = load_yaml(ROOT / "docker-compose.yml")
    services = compose["services"]
    assert {"seqserve-1", "seqserve-2", "prometheus", "grafana"} <= set(services)
    for replica in ("seqserve-1", "seqserve-2"):
        assert services["prometheus"]["depends_on"][replica]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name in ("prometheus", "grafana"):
        svc = services[name]
        assert "healthcheck" in svc, name
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    # Grafana's provider path is where compose mounts the dashboards.
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "seqserve.yml")["providers"][0]
    mounts = dict(v.split(":")[:2][::-1] for v in services["grafana"]["volumes"])
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
