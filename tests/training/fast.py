"""Training flags that keep the tests' tiny runs quick: no progress bar, one thread, a two-step warm-up; and the
tiny forecaster trained with them."""

from __future__ import annotations

from pathlib import Path

FAST = ["--no-progress", "--threads", "1", "--warmup-steps", "2"]
# A tiny sentiment net for tiny_sst2: one member of 8 units over 8-d vectors, a fifth of train held out.
TINY_SENTIMENT = ["--hidden", "8", "--embedding", "8", "--batch-size", "32", "--heldout-fraction", "0.2"]
TINY_SENTIMENT += ["--ensemble", "1"]
# A tiny forecaster for tiny_csv (480 hourly rows): 24 rows in, 12 out, segments of 6, 8 units.
TINY_FORECAST = ["--window", "24", "--horizon", "12", "--segment", "6", "--hidden", "8"]


def train_tiny_forecaster(data: Path, out: Path, run_dir: Path) -> None:
    """``seqserve-train forecast`` of the tiny forecaster on ``data`` for one epoch, into the version folder ``out``."""
    from training.cli import main

    args = ["forecast", "--data", str(data), "--out", str(out), "--run-dir", str(run_dir), *FAST]
    assert main([*args, *TINY_FORECAST, "--epochs", "1"]) == 0
