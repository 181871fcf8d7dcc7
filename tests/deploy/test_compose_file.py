"""docker-compose.yml without a daemon: valid against the Compose Specification's JSON schema
(check-jsonschema), accepted by Docker Compose v2's own `config`, images pinned, one build per image, and the
wiring the docs describe (two replicas, Redis with AOF, Prometheus scraping both, grace before SIGKILL)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import ROOT, compose_binary, run, tool

COMPOSE = ROOT / "docker-compose.yml"
REPLICAS = ("seqserve-1", "seqserve-2")


@pytest.fixture(scope="module")
def model() -> dict[str, Any]:
    """The compose file as Docker Compose v2 resolves it (anchors merged, defaults filled), variables unset."""
    out = run([compose_binary(), "-f", COMPOSE, "config", "--format", "json"], env={"PATH": "/usr/bin:/bin"}).stdout
    resolved: dict[str, Any] = json.loads(out)
    return resolved


def test_valid_against_the_compose_spec_schema() -> None:
    out = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", COMPOSE]).stdout
    assert "ok -- validation done" in out


def test_compose_v2_accepts_it_quietly() -> None:
    proc = run([compose_binary(), "-f", COMPOSE, "config", "--quiet"], env={"PATH": "/usr/bin:/bin"})
    assert proc.stdout == "" and proc.stderr == ""  # no warnings either (obsolete keys, unset variables)


def test_images_pinned_and_each_built_once(model: dict[str, Any]) -> None:
    services = model["services"]
    assert set(services) == {*REPLICAS, "redis", "prometheus", "grafana"}
    builders: dict[str, str] = {}
    for name, svc in services.items():
        image = svc["image"]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), (name, image)
        if "build" in svc:
            assert image not in builders, f"{name} and {builders.get(image)} both build {image}"
            builders[image] = name
            assert svc["image"].split(":")[0] == "seqserve"  # a local name: never mistaken for a pull
    assert builders == {"seqserve:0.1.0": "seqserve-1"}
    assert services["seqserve-2"]["image"] == "seqserve:0.1.0"  # runs what seqserve-1 builds
    assert services["seqserve-1"]["build"]["args"] == {"BASE_IMAGE": "python:3.11-slim"}


def test_replicas_are_hardened_and_drain_before_sigkill(model: dict[str, Any]) -> None:
    for name in REPLICAS:
        svc = model["services"][name]
        env = svc["environment"]
        assert svc["read_only"] is True and svc["tmpfs"] == ["/tmp"]
        grace = float(env["SEQSERVE_GRACE_SECONDS"])
        assert float(svc["stop_grace_period"].rstrip("s")) > grace
        assert env["SEQSERVE_SESSION_STORE"] == "redis://redis:6379/0"
        assert env["SEQSERVE_SESSION_DURABILITY"] == "step"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "test" not in svc["healthcheck"]  # the image's gRPC HEALTHCHECK, with compose's timing
        assert svc["restart"] == "unless-stopped"
        # No CPU limit here: unset (0, one frontend per core) a replica would start one ~91 MiB frontend per host core.
        assert int(env.get("SEQSERVE_WORKERS", "0")) >= 1, f"{name}: SEQSERVE_WORKERS not pinned"
        assert "cpus" not in svc or int(env["SEQSERVE_WORKERS"]) == math.ceil(float(svc["cpus"]))
    published = [(p["host_ip"], p["published"]) for name in REPLICAS for p in model["services"][name]["ports"]]
    assert published == [
        ("127.0.0.1", "50051"),
        ("127.0.0.1", "8000"),
        ("127.0.0.1", "8002"),
        ("127.0.0.1", "50052"),
        ("127.0.0.1", "8001"),
        ("127.0.0.1", "8003"),
    ]


def test_redis_append_only_everysec_with_a_volume(model: dict[str, Any]) -> None:
    redis = model["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    assert [(v["type"], v["source"], v["target"]) for v in redis["volumes"]] == [("volume", "redis-data", "/data")]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_every_service_has_a_healthcheck_and_loopback_ports(model: dict[str, Any]) -> None:
    for name, svc in model["services"].items():
        assert "healthcheck" in svc, name
        for port in svc.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port} on every interface"
    for name in ("prometheus", "grafana"):
        for volume in model["services"][name]["volumes"]:
            if volume["type"] == "bind":
                assert (ROOT / volume["source"]).exists(), volume


def test_prometheus_scrapes_both_replicas_after_they_are_healthy(model: dict[str, Any]) -> None:
    prom = model["services"]["prometheus"]
    assert {name: dep["condition"] for name, dep in prom["depends_on"].items()} == dict.fromkeys(
        REPLICAS, "service_healthy"
    )
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = jobs["seqserve"]["static_configs"][0]["targets"]
    ports = {name: model["services"][name]["environment"]["SEQSERVE_METRICS_PORT"] for name in REPLICAS}
    assert targets == [f"{name}:{ports[name]}" for name in REPLICAS]
