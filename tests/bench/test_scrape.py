"""``python -m bench.scrape``: a ``--workers 2`` server's frontends given many series, then its engine's
``/metrics`` scraped, each scrape's size, engine CPU and wall time recorded. A short run on the tiny models; what a
scrape costs is the benchmark's business, not this test's."""

from __future__ import annotations

import json
from pathlib import Path

from bench import scrape
from bench.launch import metric_families, serve


def test_the_engine_is_scraped_after_the_frontends_served_every_model(tiny_models: Path, tmp_path: Path) -> None:
    names = scrape.model_names(tiny_models)
    assert names and all((tiny_models / n).is_dir() for n in names)
    out = tmp_path / "scrape.json"
    assert scrape.main(["--models", str(tiny_models), "--scrapes", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["workers"] == 2 and result["calls"] == scrape.CONNECTIONS * 5 * (len(names) + len(scrape.UNKNOWN))
    assert len(result["rows"]) == 3 and result["bytes"] == result["rows"][-1]["bytes"] > 10_000
    assert result["processes"] == 4  # (the engine, two frontends, multiprocessing's resource tracker)
    assert all(r["wall_ms"] > 0 and r["server_cpu_ms"] >= r["engine_cpu_ms"] >= 0 for r in result["rows"])


def test_the_calls_reach_the_metrics_as_series_of_every_model_and_status(tiny_models: Path) -> None:
    with serve(tiny_models, workers=2) as served:
        scrape.populate(served.target, ["charlm"])
        families = {f.name: f for f in metric_families(served.metrics_port)}
    counts = {
        (s.labels["method"], s.labels["model"], s.labels["code"]): s.value
        for s in families["seqserve_rpc_requests"].samples
        if s.name.endswith("_total") and s.value
    }
    assert counts[("ModelInfer", "charlm", "INVALID_ARGUMENT")] == scrape.CONNECTIONS  # (no inputs: refused)
    assert counts[("ModelMetadata", "charlm", "OK")] == scrape.CONNECTIONS
    assert {code for (method, _, code) in counts if method == "ModelReady"} >= {"OK"}
    assert any(model != "charlm" and code == "NOT_FOUND" for (_, model, code) in counts)  # the unknown names
