"""The Grafana dashboard read by the Grafana Foundation SDK (every panel's options and queries decode into the
SDK's typed models), and every PromQL expression in it parsed by promtool and naming only metrics seqserve
exports. tests/integration also evaluates each expression against a real Prometheus scraping a real server."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard, Panel, RowPanel
from prometheus_client import CollectorRegistry

from service.metrics import Metrics
from tests.deploy.conftest import ROOT, run, tool

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "seqserve.json"
# Grafana's variables, replaced by values Prometheus accepts (as Grafana itself does before sending a query).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$model": ".*"}


@pytest.fixture(scope="module")
def dashboard() -> Dashboard:
    register_default_plugins()  # panel options and datasource queries decode into their plugins' types
    return Dashboard.from_json(json.loads(DASHBOARD.read_text()))


def panels(d: Dashboard) -> list[Panel]:
    return [p for p in d.panels or [] if isinstance(p, Panel)]


def expressions(d: Dashboard) -> list[str]:
    exprs = [str(t.expr) for p in panels(d) for t in p.targets or []]  # type: ignore[attr-defined]
    for variable in d.templating.list_val or []:
        query = cast(str, variable.query["query"]) if isinstance(variable.query, dict) else str(variable.query)
        label_values = re.fullmatch(r"label_values\((.+), \w+\)", query)
        exprs.append(label_values.group(1) if label_values else query)
    return exprs


def test_the_sdk_decodes_every_panel_into_typed_models(dashboard: Dashboard) -> None:
    assert dashboard.uid == "seqserve" and dashboard.title
    assert any(isinstance(p, RowPanel) for p in dashboard.panels or [])
    graphs = panels(dashboard)
    assert len(graphs) >= 20
    for p in graphs:
        # The panel plugin's own Options class (stat, table, timeseries, ...), not a raw dict.
        assert type(p.options).__module__.rsplit(".", 1)[-1] == p.type_val, p.title
        assert p.targets, p.title
        for target in p.targets:
            assert type(target).__module__.endswith(".prometheus"), (p.title, type(target))
            assert target.expr, p.title  # type: ignore[attr-defined]


def test_sdk_round_trip_keeps_every_query(dashboard: Dashboard) -> None:
    encoded = json.loads(json.dumps(dashboard.to_json(), default=lambda o: o.to_json()))
    again = Dashboard.from_json(encoded)
    assert expressions(again) == expressions(dashboard)


def test_promtool_parses_every_expression(dashboard: Dashboard, tmp_path: Path) -> None:
    exprs = expressions(dashboard)
    rules = []
    for i, expr in enumerate(exprs):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run([tool("promtool"), "check", "rules", path]).stdout
    assert f"SUCCESS: {len(exprs)} rules found" in out


def exported_metric_names() -> set[str]:
    names: set[str] = set()
    suffixes: dict[str, tuple[str, ...]] = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    for family in Metrics(CollectorRegistry()).registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def test_every_query_names_only_exported_metrics(dashboard: Dashboard) -> None:
    exported = exported_metric_names()
    used: set[str] = set()
    for expr in expressions(dashboard):
        used.update(re.findall(r"\bseqserve_[a-z_]+\b", re.sub(r"\{[^}]*\}", "", expr)))
    assert used and used <= exported, sorted(used - exported)


def test_panels_query_the_provisioned_datasource(dashboard: Dashboard) -> None:
    datasource: dict[str, Any] = yaml.safe_load(
        (ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    for p in panels(dashboard):
        assert p.datasource is not None and p.datasource.uid == datasource["uid"], p.title


def streaming_methods() -> set[str]:
    """Every method of the server's services whose answer is a stream (it lasts as long as the stream)."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from service.api.gen.inference import grpc_service_pb2
    from service.api.gen.seqserve.v1 import autocomplete_pb2, forecast_pb2, sentiment_pb2, sessions_pb2

    ours = [grpc_service_pb2, autocomplete_pb2, forecast_pb2, sentiment_pb2, sessions_pb2]
    modules: list[Any] = [*ours, health_pb2, reflection_pb2]
    return {
        m.name
        for module in modules
        for service in module.DESCRIPTOR.services_by_name.values()
        for m in service.methods
        if m.server_streaming
    }


def test_unary_latency_panels_leave_out_every_streaming_method(dashboard: Dashboard) -> None:
    """A health Watch (a load balancer's, open for minutes) counted in the "unary" latency panels as model="",
    which the dashboard's All matches."""
    streams = streaming_methods()
    assert {"Complete", "Suggest", "ModelStreamInfer", "Watch", "ServerReflectionInfo"} <= streams
    checked = 0
    for expr in expressions(dashboard):
        for excluded in re.findall(r'seqserve_rpc_duration_seconds_bucket\{[^}]*method!~"([^"]+)"', expr):
            assert set(excluded.split("|")) >= streams, expr
            checked += 1
    assert checked >= 3


def test_active_sessions_count_a_shared_store_once(dashboard: Dashboard, tmp_path: Path) -> None:
    """Replicas on one Redis each report the whole store's sessions: the panels summed them, two replicas showing
    2x. promtool evaluates the panels' queries on two replicas sharing a store (5 sessions of charlm, 1 of
    forecaster) and a third on its own memory store (3 of charlm): 9 in all, 8 and 1 by model, not 15, 13 and 2."""
    series = []
    for instance, store, charlm, forecaster in (
        ("a:8002", "redis://redis:6379/0", 5, 1),
        ("b:8002", "redis://redis:6379/0", 5, 1),
        ("c:8002", "memory://c/1", 3, 0),
    ):
        at = f'job="seqserve", instance="{instance}"'
        series += [
            {"series": f'seqserve_session_store_info{{{at}, store="{store}"}}', "values": "1x5"},
            {"series": f'seqserve_sessions_active{{{at}, model="charlm"}}', "values": f"{charlm}x5"},
            {"series": f'seqserve_sessions_active{{{at}, model="forecaster"}}', "values": f"{forecaster}x5"},
        ]
    (total,) = [str(t.expr) for p in panels(dashboard) if p.title == "Active sessions" for t in p.targets or []]  # type: ignore[attr-defined]
    (by_model,) = [
        str(t.expr).replace("$model", ".*")  # type: ignore[attr-defined]
        for p in panels(dashboard)
        if p.title == "Active sessions by model"
        for t in p.targets or []
    ]
    tests = [
        {"expr": total, "eval_time": "2m", "exp_samples": [{"labels": "{}", "value": 9}]},
        {
            "expr": by_model,
            "eval_time": "2m",
            "exp_samples": [{"labels": '{model="charlm"}', "value": 8}, {"labels": '{model="forecaster"}', "value": 1}],
        },
    ]
    path = tmp_path / "sessions_test.yml"
    path.write_text(yaml.safe_dump({"tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}]}))
    out = run([tool("promtool"), "test", "rules", path]).stdout
    assert "SUCCESS" in out
