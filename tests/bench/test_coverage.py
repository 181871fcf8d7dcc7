"""bench/coverage.py: a test split fed through a real server, its live interval counters read from /metrics. The
expected shares are recomputed from stateless forecasts of the same windows (what the session's forecasts must
be: window mode re-encodes the last ``window`` rows)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench import coverage
from bench.launch import serve
from service.client import Client
from service.core.manifest import MANIFEST_FILE, Manifest
from tests.tiny_models import ETT_COLUMNS
from training.series import load_series

WINDOW, HORIZON, ROWS, TEST = 24, 12, 200, (150, 200)


@pytest.fixture(scope="module")
def repo(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny models, the forecaster's manifest given a data file's split and train-split statistics (as
    ``seqserve-train forecast`` records them), and that file: hourly rows of the 7 ETT columns."""
    root = tmp_path_factory.mktemp("coverage")
    models = root / "models"
    shutil.copytree(tiny_models, models)
    rng = np.random.default_rng(0)
    values = np.cumsum(rng.normal(size=(ROWS, len(ETT_COLUMNS))), axis=0) + 10
    lines = ["date," + ",".join(ETT_COLUMNS)]
    for i, row in enumerate(values):
        lines.append(f"2021-01-{1 + i // 24:02d} {i % 24:02d}:00:00," + ",".join(f"{v:.4f}" for v in row))
    data = root / "ett.csv"
    data.write_text("\n".join(lines) + "\n")
    split = {"train": (0, 100), "val": (100, 150), "test": TEST}
    s = load_series(data, window=WINDOW, horizon=HORIZON, split=split, time_column="date", frequency="1h")
    path = models / "forecaster" / "1" / MANIFEST_FILE
    m = json.loads(path.read_text())
    m["forecast"].update(split={k: list(v) for k, v in split.items()}, time_column="date", frequency="1h")
    m["normalization"].update(mean=s.mean.tolist(), std=s.std.tolist())
    path.write_text(json.dumps(m))
    return models, data


def recomputed(models: Path, rows: np.ndarray, per_observe: int) -> tuple[int, list[int]]:
    """Targets and at-or-below counts per level, from stateless forecasts of the windows the session saw: the
    chunk at row ``i`` is the truth for the first steps of the forecast made on the ``window`` rows before it."""
    n, below = 0, [0, 0, 0]
    with serve(models, workers=1) as srv, Client(srv.target) as c:
        for i in range(WINDOW, len(rows), per_observe):
            q = c.forecast(rows[i - WINDOW : i], model="forecaster").quantiles  # (3, horizon, 7)
            truth = rows[i : i + per_observe][:HORIZON]
            n += truth.size
            below = [b + int((truth <= q[k, : len(truth)]).sum()) for k, b in enumerate(below)]
    return n, below


@pytest.mark.parametrize("per_observe", [1, HORIZON])
def test_the_counters_score_every_observed_row_against_its_forecast(repo: tuple[Path, Path], per_observe: int) -> None:
    models, data = repo
    m = Manifest.load(models / "forecaster" / "1" / MANIFEST_FILE)
    rows = coverage.test_rows(m, data)
    assert rows.shape == (WINDOW + TEST[1] - TEST[0], len(ETT_COLUMNS))
    r = coverage.run(models, "forecaster/1", data, per_observe)
    assert r["test_rows"] == TEST[1] - TEST[0] and r["targets"] == (TEST[1] - TEST[0]) * len(ETT_COLUMNS)
    n, below = recomputed(models, rows, per_observe)
    assert n == r["targets"]
    shares = [r[f"below_q{level}"] for level in ("0.1", "0.5", "0.9")]
    assert shares == pytest.approx([b / n for b in below])
    assert r["band_p10_p90"] == pytest.approx(shares[2] - shares[0])


def test_a_model_without_a_recorded_split_is_refused(tiny_models: Path, repo: tuple[Path, Path]) -> None:
    with pytest.raises(SystemExit, match="not a forecaster with a recorded test split"):
        coverage.run(tiny_models, "forecaster/1", repo[1], 1)
