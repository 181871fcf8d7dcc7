"""deploy/, Dockerfile and docker-compose.yml: promtool validates the Prometheus config and alert rules (and runs
the alert unit tests); the compose file, Grafana provisioning and dashboard are parsed and cross-checked.
Docker itself is not available here, so the images are not built."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from service.api.http import MetricsHttpServer
from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"


def promtool(*args: str) -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool not installed (make sysdeps installs it)")
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
    assert "SUCCESS: 8 rules found" in out


def test_promtool_alert_unit_tests() -> None:
    out = promtool("test", "rules", "alerts_test.yml")
    assert "SUCCESS" in out


def test_prometheus_scrapes_the_compose_service() -> None:
    cfg = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert jobs["seqserve"]["static_configs"][0]["targets"] == ["seqserve:8002"]
    assert jobs["seqserve"].get("metrics_path", "/metrics") == "/metrics"
    assert cfg["rule_files"] == ["alerts.yml"]


def test_alerts_cover_the_required_conditions() -> None:
    rules = {r["alert"]: r for g in load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"] for r in g["rules"]}
    assert "up{" in rules["SeqServeDown"]["expr"]
    assert "seqserve_rpc_requests_total" in rules["SeqServeHighErrorRatio"]["expr"]
    assert "histogram_quantile(0.99" in rules["SeqServeHighLatencyP99"]["expr"]
    assert "by (job, model, le)" in rules["SeqServeHighLatencyP99"]["expr"]
    assert "seqserve_session_store_capacity" in rules["SeqServeSessionStoreNearCapacity"]["expr"]
    assert "seqserve_queue_depth" in rules["SeqServeSustainedQueueing"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]


def test_dashboard_covers_the_required_panels() -> None:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "seqserve.json").read_text())
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
    ):
        assert needle in exprs, needle
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
    assert set(services) == {"seqserve", "prometheus", "grafana"}
    assert services["prometheus"]["depends_on"]["seqserve"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name, svc in services.items():
        assert "healthcheck" in svc, name
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    assert "8002:8002" in " ".join(services["seqserve"]["ports"])
    assert "/readyz" in " ".join(services["seqserve"]["healthcheck"]["test"])
    assert (ROOT / services["seqserve"]["build"] / "Dockerfile").exists()
    # Grafana's provider path is where compose mounts the dashboards.
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "seqserve.yml")["providers"][0]
    mounts = dict(v.split(":")[:2][::-1] for v in services["grafana"]["volumes"])
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"


def test_dockerfile_serving_only_non_root_with_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"^USER (?!root)\S+", text, re.M)
    assert re.search(r"^HEALTHCHECK .*", text, re.M) and "/readyz" in text
    assert "COPY models ./models" in text
    assert re.search(r"^RUN pip install \.\s", text, re.M) and "[train" not in text  # no torch in the image
    cmd = re.search(r"^CMD (.*)$", text, re.M)
    assert cmd is not None and json.loads(cmd.group(1))[:4] == ["seqserve", "serve", "--host", "0.0.0.0"]
    # Everything the Dockerfile copies exists and is not excluded by .dockerignore.
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path
            assert path not in ignored, path


def _probe(argv: list[str], port: int) -> int:
    """Runs a container healthcheck command here, against a local /readyz on ``port``."""
    assert argv[0] == "CMD"
    cmd = [sys.executable if a == "python" else a.replace("8002", str(port)) for a in argv[1:]]
    env = {**os.environ, "SEQSERVE_METRICS_PORT": str(port)}
    return subprocess.run(cmd, env=env, capture_output=True, timeout=60).returncode


@pytest.mark.parametrize("source", ["Dockerfile", "docker-compose.yml"])
def test_healthcheck_commands_follow_readiness(source: str) -> None:
    if source == "Dockerfile":
        line = re.search(r"CMD (\[.*\])\s*$", (ROOT / "Dockerfile").read_text().split("HEALTHCHECK", 1)[1], re.M)
        assert line is not None
        argv = ["CMD", *json.loads(line.group(1))]
    else:
        argv = load_yaml(ROOT / "docker-compose.yml")["services"]["seqserve"]["healthcheck"]["test"]
    ready = {"now": False}
    server = MetricsHttpServer("127.0.0.1", 0, Metrics(CollectorRegistry()), lambda: ready["now"])
    port = server.start()
    try:
        assert _probe(argv, port) != 0  # 503 while models load
        ready["now"] = True
        assert _probe(argv, port) == 0
    finally:
        server.stop()
    assert _probe(argv, port) != 0  # nothing listening
