"""deploy/k8s rendered by `kubectl kustomize` (base + cpu/gpu overlays, and the optional components: queue-depth
autoscaling, TLS) and validated offline with `kubernetes-validate --strict` against Kubernetes' own schemas; then the
wiring between the objects (labels, ports, probes, grace periods, settings) checked on the rendered output."""

from __future__ import annotations

import math
import os
import ssl
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from service.metrics import Metrics
from service.settings import Settings
from tests.deploy.conftest import ROOT, run, tool

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # the oldest and newest we claim (native gRPC probes are GA in 1.27)
Objects = dict[str, dict[str, Any]]  # "Kind/name" -> object


def kustomize(directory: Path) -> str:
    return run([tool("kubectl"), "kustomize", directory]).stdout


def objects(rendered: str) -> Objects:
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def with_component(tmp_path: Path, overlay: str, component: str) -> Path:
    """A kustomization that adds a component to an overlay (paths relative: kustomize refuses absolute ones)."""
    rel = os.path.relpath(K8S, tmp_path)
    text = (
        f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {rel}/overlays/{overlay}\n"
    )
    (tmp_path / "kustomization.yaml").write_text(text + f"components:\n  - {rel}/components/{component}\n")
    return tmp_path


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param, kustomize(K8S / "overlays" / request.param)


def validate(rendered: str, tmp_path: Path) -> str:
    path = tmp_path / "rendered.yaml"
    path.write_text(rendered)
    out = ""
    for version in KUBERNETES_VERSIONS:
        proc = run([tool("kubernetes-validate"), "--strict", "-k", version, path], check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out += proc.stdout
    return out


def test_overlays_validate_strictly(rendered: tuple[str, str], tmp_path: Path) -> None:
    _, text = rendered
    out = validate(text, tmp_path)
    kinds = {key.split("/")[0] for key in objects(text)}
    assert kinds == {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "StatefulSet",
    }
    assert out.count("passed for resource") == len(objects(text)) * len(KUBERNETES_VERSIONS)


def test_strict_validation_rejects_a_typo(tmp_path: Path) -> None:
    """The validator is really strict: an unknown field in a probe fails it."""
    text = kustomize(K8S / "overlays" / "cpu").replace("periodSeconds: 5", "periodSecond: 5", 1)
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    proc = run([tool("kubernetes-validate"), "--strict", path], check=False)
    assert proc.returncode != 0 and "periodSecond" in proc.stdout + proc.stderr


def container(objs: Objects) -> dict[str, Any]:
    c: dict[str, Any]
    (c,) = objs["Deployment/seqserve"]["spec"]["template"]["spec"]["containers"]
    return c


def config(objs: Objects) -> dict[str, str]:
    (cm,) = [o for key, o in objs.items() if key.startswith("ConfigMap/seqserve-config-")]  # hash-suffixed
    assert container(objs)["envFrom"] == [{"configMapRef": {"name": cm["metadata"]["name"]}}]
    data: dict[str, str] = cm["data"]
    return data


def test_probes_ports_and_settings_agree(rendered: tuple[str, str]) -> None:
    objs = objects(rendered[1])
    c, env = container(objs), config(objs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {
        "grpc": int(env["SEQSERVE_PORT"]),
        "http": int(env["SEQSERVE_HTTP_PORT"]),
        "metrics": int(env["SEQSERVE_METRICS_PORT"]),
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == ports["grpc"], probe  # native gRPC health checks
    assert "service" not in c["readinessProbe"]["grpc"]  # "": the whole server, SERVING once models are loaded
    assert c["livenessProbe"]["grpc"]["service"] == "grpc.health.v1.Health"
    annotations = objs["Deployment/seqserve"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(ports["metrics"]),
        "prometheus.io/path": "/metrics",
    }
    service_ports = {p["name"]: p["targetPort"] for p in objs["Service/seqserve"]["spec"]["ports"]}
    assert service_ports == {"grpc": "grpc", "http": "http", "metrics": "metrics"}


def test_shutdown_outlasts_prestop_plus_drain(rendered: tuple[str, str]) -> None:
    objs = objects(rendered[1])
    pod = objs["Deployment/seqserve"]["spec"]["template"]["spec"]
    pre_stop = container(objs)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(pre_stop[1]) + float(config(objs)["SEQSERVE_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > drain


def test_pod_is_hardened_and_spread(rendered: tuple[str, str]) -> None:
    objs = objects(rendered[1])
    pod, c = objs["Deployment/seqserve"]["spec"]["template"]["spec"], container(objs)
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(c["resources"]["limits"])
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert pod["automountServiceAccountToken"] is False


def test_selectors_match_the_pods(rendered: tuple[str, str]) -> None:
    objs = objects(rendered[1])
    labels = objs["Deployment/seqserve"]["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    assert selects(objs["Deployment/seqserve"]["spec"]["selector"]["matchLabels"])
    assert selects(objs["Service/seqserve"]["spec"]["selector"])
    assert selects(objs["Service/seqserve-headless"]["spec"]["selector"])
    assert selects(objs["PodDisruptionBudget/seqserve"]["spec"]["selector"]["matchLabels"])
    assert selects(objs["NetworkPolicy/seqserve"]["spec"]["podSelector"]["matchLabels"])
    hpa = objs["HorizontalPodAutoscaler/seqserve"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "seqserve"}
    assert hpa["metrics"][0]["resource"]["name"] == "cpu" and hpa["minReplicas"] >= 1
    assert objs["PodDisruptionBudget/seqserve"]["spec"]["maxUnavailable"] == 1  # one at a time, never blocks a drain
    policy = objs["NetworkPolicy/seqserve"]["spec"]
    allowed = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert allowed == {"grpc", "http", "metrics"}  # named ports of the container
    assert {o["metadata"].get("namespace", "seqserve") for o in objs.values() if o["kind"] != "Namespace"} == {
        "seqserve"
    }


def test_replicas_share_the_redis_session_store(rendered: tuple[str, str]) -> None:
    """Several replicas behind round-robin clients: every session call must find its session on any replica, so
    the settings name the Redis Service shipped beside them, and the network policies let exactly the server pods
    reach it."""
    objs = objects(rendered[1])
    store = config(objs)["SEQSERVE_SESSION_STORE"]
    assert store.startswith("redis://")
    host, port = store.removeprefix("redis://").split("/")[0].split(":")
    service = objs[f"Service/{host}"]["spec"]
    assert [p["port"] for p in service["ports"]] == [int(port)]
    redis = objs["StatefulSet/seqserve-redis"]["spec"]
    pod_labels = redis["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in service["selector"].items())
    (c,) = redis["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"redis": int(port)}
    assert "--appendonly" in c["args"] and c["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    server_labels = objs["Deployment/seqserve"]["spec"]["template"]["metadata"]["labels"]
    egress = objs["NetworkPolicy/seqserve"]["spec"]["egress"]
    assert any(
        all(pod_labels.get(k) == v for k, v in peer["podSelector"]["matchLabels"].items())
        and {p["port"] for p in rule["ports"]} == {int(port)}
        for rule in egress
        for peer in rule["to"]
        if "podSelector" in peer and "namespaceSelector" not in peer
    )
    (ingress,) = objs["NetworkPolicy/seqserve-redis"]["spec"]["ingress"]
    (peer,) = ingress["from"]
    assert all(server_labels.get(k) == v for k, v in peer["podSelector"]["matchLabels"].items())
    assert objs["HorizontalPodAutoscaler/seqserve"]["spec"]["minReplicas"] >= 1


def test_config_names_real_settings_and_moves_long_lived_clients(
    rendered: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every variable of the ConfigMap is a setting (a misspelt one would be ignored without a word), they load,
    and connections age out: the ClusterIP Service balances connections, not calls, so without an age the
    clients connected before a scale-up never reach the new replicas. Moving them is safe because every replica
    reads the same (Redis) session store."""
    env = config(objects(rendered[1]))
    known = {f"SEQSERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= known, f"not settings: {sorted(set(env) - known)}"
    for name in os.environ:
        if name.startswith("SEQSERVE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.grpc_max_connection_age_seconds > 0
    assert settings.grpc_max_connection_age_grace_seconds == 0  # open streams finish on their connection
    assert settings.session_store.startswith("redis://")


# Measured RSS of a server started with --workers 2 on the committed models (docs/capacity.md, "Memory of one
# replica", 2026-12-07): the engine, each frontend, multiprocessing's resource tracker; and what ONNX Runtime keeps
# after the largest Classify the server accepts, on the default sentiment version.
ENGINE_MIB, FRONTEND_MIB, TRACKER_MIB, LARGEST_REQUEST_MIB = 418.2, 91.0, 12.8, 710.1
MIB = 1024 * 1024


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (``2``, ``500m``, ``1Gi``, ``512Mi``) as a number (cores, bytes)."""
    units = {"m": 1e-3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "k": 1e3, "M": 1e6, "G": 1e9}
    text = str(value)
    for suffix, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * factor
    return float(text)


def test_workers_pinned_to_the_cpu_limit_and_memory_covers_them(
    rendered: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SEQSERVE_WORKERS unset (0) means one frontend per core, and the server counts only a cgroup v2 CPU quota: on
    a cgroup v1 node a replica would start one frontend (~91 MiB) per host core, past its memory limit. So the
    config pins it to the container's CPU limit, and the memory request holds that many frontends, the engine and
    the caches the settings allow filled (plus the memory-backed /tmp); the limit also what ONNX Runtime keeps
    after the largest requests (docs/capacity.md)."""
    objs = objects(rendered[1])
    c, env = container(objs), config(objs)
    assert "SEQSERVE_WORKERS" in env, "SEQSERVE_WORKERS unset: one frontend per core the server sees"
    workers = int(env["SEQSERVE_WORKERS"])
    assert workers == math.ceil(quantity(c["resources"]["limits"]["cpu"])) >= 2  # >= 2: frontends + an engine
    for name in [n for n in os.environ if n.startswith("SEQSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.workers == workers and settings.engines == 1  # (the measured layout: one engine)
    (tmp,) = [v for v in objs["Deployment/seqserve"]["spec"]["template"]["spec"]["volumes"] if v["name"] == "tmp"]
    assert tmp["emptyDir"]["medium"] == "Memory"  # tmpfs: counts against the container's memory
    idle = (ENGINE_MIB + workers * FRONTEND_MIB + TRACKER_MIB) * MIB
    caches = settings.session_cache_bytes + settings.prefix_cache_bytes + settings.response_cache_bytes
    full = idle + caches + quantity(tmp["emptyDir"]["sizeLimit"])
    request, limit = (quantity(c["resources"][k]["memory"]) for k in ("requests", "limits"))
    assert request >= full, f"memory request {request / MIB:.0f} MiB < {full / MIB:.0f} MiB (idle + caches + /tmp)"
    assert limit >= full + LARGEST_REQUEST_MIB * MIB, f"limit {limit / MIB:.0f} MiB"


def test_gpu_overlay_asks_for_a_gpu_and_the_cuda_image() -> None:
    gpu, cpu = objects(kustomize(K8S / "overlays" / "gpu")), objects(kustomize(K8S / "overlays" / "cpu"))
    c = container(gpu)
    assert c["image"] == "seqserve-cuda:0.1.0" and container(cpu)["image"] == "seqserve:0.1.0"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert config(gpu)["SEQSERVE_DEVICE"] == "cuda" and config(cpu)["SEQSERVE_DEVICE"] == "cpu"
    tolerations = gpu["Deployment/seqserve"]["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert "nvidia.com/gpu" not in str(cpu["Deployment/seqserve"])


def test_queue_depth_component_scales_on_an_exported_gauge(tmp_path: Path) -> None:
    (tmp_path / "k").mkdir()
    text = kustomize(with_component(tmp_path / "k", "cpu", "hpa-queue-depth"))
    validate(text, tmp_path)
    metrics = objects(text)["HorizontalPodAutoscaler/seqserve"]["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Resource", "Pods"]
    name = metrics[1]["pods"]["metric"]["name"]
    gauges = {f.name for f in Metrics(CollectorRegistry()).registry.collect() if f.type == "gauge"}
    assert name == "seqserve_queue_depth" and name in gauges


def test_tls_component_gives_probes_kubelet_can_pass_against_a_tls_server(tmp_path: Path, tiny_models: Path) -> None:
    """kubelet's native gRPC probes speak plaintext, so with TLS on they fail and no pod would ever be ready. The
    component moves them to the metrics port over HTTPS; each rendered probe is run here as kubelet runs it (HTTPS,
    the certificate not checked, no client certificate) against a real server with the component's settings and
    mTLS on, the strictest case: all pass, while the base's probe (plaintext gRPC health) fails against it."""
    from tests.conftest import ServerHandle, server_settings
    from tests.service.security.certs import make_pki

    (tmp_path / "k").mkdir()
    text = kustomize(with_component(tmp_path / "k", "cpu", "tls"))
    validate(text, tmp_path)
    objs = objects(text)
    c, env = container(objs), config(objs)
    pod = objs["Deployment/seqserve"]["spec"]["template"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "tls"]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "tls"]
    assert volume == {"name": "tls", "secret": {"secretName": "seqserve-tls"}} and mount["readOnly"]
    folder = mount["mountPath"]  # the keys of a kubernetes.io/tls Secret:
    assert (env["SEQSERVE_TLS_CERT"], env["SEQSERVE_TLS_KEY"]) == (f"{folder}/tls.crt", f"{folder}/tls.key")
    assert pod["metadata"]["annotations"]["prometheus.io/scheme"] == "https"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    pki = make_pki(tmp_path / "pki")
    settings = server_settings(tiny_models, tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca)
    handle = ServerHandle(settings)
    try:
        for name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c[name]["httpGet"]
            assert probe["scheme"] == "HTTPS" and ports[probe["port"]] == int(env["SEQSERVE_METRICS_PORT"]), name
            kubelet = ssl._create_unverified_context()  # (kubelet's HTTPS probes skip verification)
            url = f"https://127.0.0.1:{handle.server.metrics_port}{probe['path']}"
            with urllib.request.urlopen(url, context=kubelet, timeout=10) as r:
                assert r.status == 200, name
        with grpc.insecure_channel(handle.target) as channel, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        handle.close()
