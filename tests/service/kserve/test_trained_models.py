"""tritonclient against the committed, trained models in ``models/`` (skipped until they are there)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.service.kserve.procs import CLIENT_SCRIPT, start_server, stop_server

MODELS = Path(__file__).resolve().parents[3] / "models"
NAMES = ("sentiment", "charlm", "forecaster")

pytestmark = pytest.mark.skipif(
    not all(any((MODELS / n).glob("*/manifest.json")) for n in NAMES),
    reason="the trained models (models/sentiment, models/charlm, models/forecaster) are not committed yet",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    proc, ports = start_server(MODELS, tmp_path_factory.mktemp("kserve-trained"))
    try:
        url = f"127.0.0.1:{ports['grpc_port']}"
        done = subprocess.run(
            [sys.executable, str(CLIENT_SCRIPT), "--url", url, "--trained"], capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, f"tritonclient script failed:\n{done.stderr[-4000:]}"
        yield json.loads(done.stdout)
    finally:
        stop_server(proc)


def test_trained_sentiment_is_clear_cut(report: dict[str, Any]) -> None:
    assert report["labels"] == ["positive", "negative"]


def test_trained_charlm_sequence_matches_whole_text(report: dict[str, Any]) -> None:
    assert report["seq_steps"] == report["text_chars"]
    seq, whole = np.asarray(report["seq_probs"]), np.asarray(report["whole_probs"])
    assert float(np.max(np.abs(seq - whole))) <= 1e-5
    # The check has teeth: without the carried state (last piece alone) the answer differs clearly.
    assert float(np.max(np.abs(np.asarray(report["prefix_probs"]) - whole))) > 1e-3


def test_static_int8_charlm_sequence_equals_whole_text_exactly(report: dict[str, Any]) -> None:
    # charlm-int8/2 and /3 quantize with fixed scales: reading a text in pieces or at once is the same arithmetic.
    assert sorted(report["int8"]) == ["2", "3"]
    for got in report["int8"].values():
        assert got["seq"] == got["whole"]
        assert float(np.max(np.abs(np.asarray(got["seq"]) - np.asarray(report["whole_probs"])))) > 0


def test_trained_forecaster_shapes_and_quantile_order(report: dict[str, Any]) -> None:
    features = int(report["metadata"]["inputs"][0]["shape"][1])
    horizon = int(report["metadata"]["outputs"][0]["shape"][0])
    assert report["forecast_shape"] == [horizon, features] and report["forecast_finite"]
    q = np.asarray(report["quantiles"])  # (3, horizon, features): p10 <= p50 <= p90
    assert q.shape == (3, horizon, features)
    assert (q[0] <= q[1] + 1e-5).all() and (q[1] <= q[2] + 1e-5).all()
