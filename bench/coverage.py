"""Live interval coverage through a real server: a forecaster's test split fed to one session, and what the
server's own counters say about its quantiles (docs/metrics.md, "Interval coverage in production").

A ``seqserve serve`` process on the committed models; one Observe with the ``window`` rows before the test split,
then the test rows, ``--rows-per-observe`` at a time (1: a live feed, each row the truth for the previous
forecast's first step; the horizon: every step of every ``horizon``-th forecast). Then it reads
``seqserve_forecast_observed_targets_total`` and ``seqserve_forecast_targets_below_total`` from ``/metrics`` and
prints the share below each quantile and the p10-p90 band. ``seqserve-train evaluate`` reports the same model over
every stride-1 window and every step; this is what an operator's dashboard shows for the feed it gets.

    python -m bench.coverage --model forecaster/3 --data ../shared/data/etth1/ETTh1.csv [--rows-per-observe 1]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench import cli
from bench.launch import metric_families, serve
from service.client import Client
from service.core.manifest import MANIFEST_FILE, Manifest
from training.series import series_for


def test_rows(manifest: Manifest, data: Path) -> np.ndarray:
    """The ``window`` rows before the test split, then the test split: (rows, features), original units, ``data``
    read and split as the model's training recorded (``training.series.series_for``)."""
    f = manifest.forecast
    if f is None or "test" not in f.split:
        raise SystemExit(f"{manifest.name}/{manifest.version}: not a forecaster with a recorded test split")
    start, end = f.split["test"]
    return series_for(manifest, data).raw()[start - f.window : end]


def scores(metrics_port: int, model: str, version: int) -> dict[str, float]:
    """The server's counters for ``model``/``version``: targets scored and the share at or below each level."""
    labels = {"model": model, "version": str(version)}
    found: dict[str, float] = {}
    for family in metric_families(metrics_port):
        for s in family.samples:
            ours = all(s.labels.get(k) == v for k, v in labels.items())
            if ours and s.name.startswith("seqserve_forecast_") and s.name.endswith("_total"):
                found[s.labels.get("level", "targets")] = s.value
    n = found.pop("targets", 0.0)
    out = {"targets": n, **{f"below_q{level}": v / n for level, v in found.items() if n}}
    if n and "0.1" in found and "0.9" in found:
        out["band_p10_p90"] = (found["0.9"] - found["0.1"]) / n
    return out


def run(models: Path, model: str, data: Path, rows_per_observe: int) -> dict[str, Any]:
    name, _, version = model.partition("/")
    manifest = Manifest.load(models / name / version / MANIFEST_FILE)
    rows = test_rows(manifest, data)  # refuses a model that is not a forecaster
    assert manifest.forecast is not None
    window, step = manifest.forecast.window, max(1, rows_per_observe)
    with serve(models, workers=1) as srv, Client(srv.target) as client:
        with client.session(name, int(version)) as s:
            client.observe(s.id, rows[:window])
            for i in range(window, len(rows), step):
                client.observe(s.id, rows[i : i + step])
        result = scores(srv.metrics_port, name, int(version))
    return {"model": model, "data": str(data), "rows_per_observe": step, "test_rows": len(rows) - window, **result}


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "coverage.json")
    ap.add_argument("--model", required=True, help="NAME/VERSION of a committed forecaster")
    ap.add_argument("--data", type=Path, required=True, help="its data file")
    ap.add_argument("--rows-per-observe", type=int, default=1)
    args = ap.parse_args(argv)
    r = run(args.models, args.model, args.data, args.rows_per_observe)
    cli.write_json(args.out, r)
    shares = ", ".join(f"{k.removeprefix('below_q')}: {100 * v:.1f}%" for k, v in r.items() if k.startswith("below_q"))
    print(f"{r['model']}: {r['test_rows']} test rows, {r['rows_per_observe']} per Observe, {r['targets']:.0f} targets "
          f"scored; below {shares}; p10-p90 band {100 * r.get('band_p10_p90', float('nan')):.1f}%")  # fmt: skip
    return 0


if __name__ == "__main__":
    cli.run(main)
