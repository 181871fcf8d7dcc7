"""The Kubernetes scrape job and the prometheus-adapter rule docs/deploy.md gives for the queue-depth autoscaler
(deploy/k8s/components/hpa-queue-depth): the adapter finds ``seqserve_queue_depth`` only on series labelled with
the pod's ``namespace`` and ``pod``, so the job must copy them from pod discovery, or the HPA never gets its metric.

The Debian build of Prometheus has no Kubernetes discovery: the job's relabelling is checked twice, by the rules
as Prometheus defines them (here, on the targets pod discovery gives for a pod of the rendered Deployment), and by
a real Prometheus that runs the documented job on a static target carrying those ``__meta_kubernetes_*`` labels,
scraping a real server, then answers the adapter rule's own queries."""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from service.metrics import Metrics
from tests.deploy.conftest import ROOT
from tests.deploy.test_k8s import K8S, container, kustomize, objects

DOC = ROOT / "docs" / "deploy.md"
NAMESPACE, POD, POD_IP = "seqserve", "seqserve-7d9f8b6c5d-x2x4q", "127.0.0.1"
Labels = dict[str, str]


def yaml_blocks(key: str) -> list[Any]:
    """The doc's YAML blocks that hold ``key`` (others may use tags of their own, as compose's ``!reset``)."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", DOC.read_text(), flags=re.M | re.S)
    return [yaml.safe_load(b) for b in blocks if key in b]


def documented_job() -> dict[str, Any]:
    (job,) = [
        j for b in yaml_blocks("kubernetes_sd_configs") for j in b["scrape_configs"] if "kubernetes_sd_configs" in j
    ]
    assert job["job_name"] == "seqserve"  # the alert SeqServeDown keys on up{job="seqserve"}
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": [NAMESPACE]}}]
    return dict(job)


def adapter_rule() -> dict[str, Any]:
    (rule,) = [r for b in yaml_blocks("seriesQuery") for r in b["rules"]]
    return dict(rule)


def sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def discovered_targets(pod_ip: str = POD_IP, metrics_port: str | None = None) -> list[Labels]:
    """What Prometheus' pod discovery gives for one pod of the rendered Deployment: one target per container port,
    with the pod's meta labels (``metrics_port`` replaces the annotated port, to point a real scrape at a test
    server)."""
    objs = objects(kustomize(K8S / "overlays" / "cpu"))
    template, c = objs["Deployment/seqserve"]["spec"]["template"], container(objs)
    annotations = dict(template["metadata"]["annotations"])
    if metrics_port is not None:
        annotations["prometheus.io/port"] = metrics_port
    pod: Labels = {
        "__meta_kubernetes_namespace": NAMESPACE,
        "__meta_kubernetes_pod_name": POD,
        "__meta_kubernetes_pod_ip": pod_ip,
        "__meta_kubernetes_pod_ready": "true",
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_container_name": c["name"],
        "__meta_kubernetes_pod_controller_kind": "ReplicaSet",
        "__meta_kubernetes_pod_controller_name": POD.rsplit("-", 1)[0],
    }
    pod |= {f"__meta_kubernetes_pod_label_{sanitize(k)}": v for k, v in template["metadata"]["labels"].items()}
    pod |= {f"__meta_kubernetes_pod_annotation_{sanitize(k)}": v for k, v in annotations.items()}
    pod |= {f"__meta_kubernetes_pod_annotationpresent_{sanitize(k)}": "true" for k in annotations}
    return [
        pod
        | {
            "__address__": f"{pod_ip}:{p['containerPort']}",
            "__meta_kubernetes_pod_container_port_name": p["name"],
            "__meta_kubernetes_pod_container_port_number": str(p["containerPort"]),
            "__meta_kubernetes_pod_container_port_protocol": p["protocol"],
        }
        for p in c["ports"]
    ]


def relabel(labels: Labels, rules: list[dict[str, Any]]) -> Labels | None:
    """Prometheus' relabelling for the actions the job uses (keep, drop, replace): source labels joined by the
    separator, the regex anchored at both ends, ``$1`` / ``${name}`` in the replacement, an empty result removes
    the label; None: the target is dropped."""
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if (action == "keep" and match is None) or (action == "drop" and match is not None):
            return None
        if action == "replace" and match is not None:
            template = re.sub(r"\$\{?(\w+)\}?", r"\\g<\1>", rule.get("replacement", "$1"))
            result = match.expand(template)
            if result:
                labels[rule["target_label"]] = result
            else:
                labels.pop(rule["target_label"], None)
        assert action in {"keep", "drop", "replace"}, f"unsupported here: {action}"
    return labels


def matchers(selector: str) -> list[tuple[str, str, str]]:
    """``name{a!="",b="x"}``'s label matchers (=, != only)."""
    inner = selector.split("{", 1)[1].rstrip("}")
    found = re.findall(r'(\w+)\s*(!=|=)\s*"([^"]*)"', inner)
    assert found and len(found) == inner.count('"') // 2, selector
    return found


def satisfies(labels: Labels, conditions: list[tuple[str, str, str]]) -> bool:
    return all((labels.get(k, "") == v) == (op == "=") for k, op, v in conditions)


def test_relabelling_gives_the_labels_the_adapter_rule_selects_and_maps() -> None:
    job, rule = documented_job(), adapter_rule()
    series = rule["seriesQuery"]
    assert series.split("{")[0] == "seqserve_queue_depth"
    overrides = rule["resources"]["overrides"]
    assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    kept = [t for t in (relabel(t, job["relabel_configs"]) for t in discovered_targets()) if t is not None]
    assert kept, "the job keeps no target of the Deployment's pods"
    final = {tuple(sorted((k, v) for k, v in t.items() if not k.startswith("__meta_"))) for t in kept}
    assert len(final) == 1  # one scrape per pod, whichever container port discovery found it by
    (labels,) = [dict(f) for f in final]
    assert labels["__address__"] == f"{POD_IP}:8002"  # the annotated metrics port
    assert labels["namespace"] == NAMESPACE and labels["pod"] == POD  # what the overrides map to objects
    assert satisfies(labels, matchers(series))
    assert set(overrides) <= set(labels)
    # No seqserve family carries a label of these names: the target's own would replace it.
    exported = {
        name for family in Metrics(CollectorRegistry()).registry.collect() for s in family.samples for name in s.labels
    }
    assert not exported & {"namespace", "pod"}


def test_without_the_two_rules_the_adapter_finds_nothing() -> None:
    """The check above can fail: the job as it was documented before (no namespace/pod rules) is refused by it."""
    job, rule = documented_job(), adapter_rule()
    before = [r for r in job["relabel_configs"] if r.get("target_label") not in {"namespace", "pod"}]
    assert len(before) == len(job["relabel_configs"]) - 2
    kept = [t for t in (relabel(t, before) for t in discovered_targets()) if t is not None]
    assert kept and not any(satisfies(t, matchers(rule["seriesQuery"])) for t in kept)


def adapter_metrics_query(rule: dict[str, Any], pods: list[str]) -> str:
    """The rule's metricsQuery as prometheus-adapter fills it for a Pods metric of the HPA: grouped by the
    resource's label, matching the namespace and the pods it asks for."""
    name = rule["seriesQuery"].split("{")[0]
    matchers = f'namespace="{NAMESPACE}",pod=~"{"|".join(pods)}"'
    query: str = rule["metricsQuery"]
    return query.replace("<<.GroupBy>>", "pod").replace("<<.Series>>", name).replace("<<.LabelMatchers>>", matchers)


def test_a_real_prometheus_running_the_job_answers_the_adapter_queries(tiny_models: Path, tmp_path: Path) -> None:
    from tests.conftest import ServerHandle, server_settings
    from tests.integration.conftest import http_get, run_prometheus, wait_for

    job, rule = documented_job(), adapter_rule()
    handle = ServerHandle(server_settings(tiny_models))
    try:
        port = str(handle.server.metrics_port)
        targets = discovered_targets(metrics_port=port)
        static = dict(job)
        del static["kubernetes_sd_configs"]
        static["static_configs"] = [
            {"targets": [t["__address__"]], "labels": {k: v for k, v in t.items() if k != "__address__"}}
            for t in targets
        ]
        with run_prometheus(tmp_path, static) as prometheus:

            def api(path: str, **params: str) -> Any:
                status, body = http_get(f"{prometheus.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
                assert status == 200, body
                return json.loads(body)["data"]

            wait_for("a scrape", lambda: api("query", query='up{job="seqserve"} == 1')["result"])
            (active,) = api("targets")["activeTargets"]  # the pod's three container ports: one target
            assert active["scrapeUrl"] == f"http://{POD_IP}:{port}/metrics"
            assert active["labels"] == {
                "job": "seqserve",
                "instance": f"{POD_IP}:{port}",
                "namespace": NAMESPACE,
                "pod": POD,
            }
            # prometheus-adapter discovers the metric's series with the rule's seriesQuery (/api/v1/series) ...
            found = wait_for("the adapter's series", lambda: api("series", **{"match[]": rule["seriesQuery"]}))
            assert {(s["namespace"], s["pod"]) for s in found} == {(NAMESPACE, POD)}
            # ... and answers the HPA with the metricsQuery: one value per pod
            (value,) = api("query", query=adapter_metrics_query(rule, [POD]))["result"]
            assert value["metric"] == {"pod": POD} and float(value["value"][1]) == 0.0
    finally:
        handle.close()
