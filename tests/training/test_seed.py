"""``--seed`` fixes a whole training run, the net's initial weights included: the same command writes the same
``model.onnx``, byte for byte; another seed writes another one."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.manifest import MODEL_FILE
from tests.training import fast
from training.cli import main

FAST = [*fast.FAST, "--epochs", "1"]
ARGS = {
    "sentiment": ["--hidden", "8", "--embedding", "8", "--batch-size", "32", "--ensemble", "2", "--adversarial", "0.1"],
    "charlm": ["--hidden", "16", "--embedding", "8", "--batch-size", "4", "--bptt", "16"],
    "forecast": [*fast.TINY_FORECAST, "--batch-size", "32"],
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "data"), [("sentiment", "tiny_sst2"), ("charlm", "tiny_text"), ("forecast", "tiny_csv")]
)
def test_the_same_seed_trains_the_same_model(
    tmp_path: Path, task: str, data: str, request: pytest.FixtureRequest
) -> None:
    path: Path = request.getfixturevalue(data)

    def train(run: str, *seed: str) -> bytes:
        out = tmp_path / run / "1"
        assert main([task, "--data", str(path), "--out", str(out), "--run-dir", str(tmp_path / f"{run}-run"), *FAST,
                     *ARGS[task], *seed]) == 0  # fmt: skip
        return (out / MODEL_FILE).read_bytes()

    first = train("a")
    assert train("b") == first  # the net was built before the seed was set: its initial weights differed per run
    assert train("c", "--seed", "1") != first
