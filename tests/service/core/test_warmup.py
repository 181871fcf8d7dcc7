"""Warm-up at load (``settings.warmup``, Triton's ``model_warmup``): each version runs its task's sample input of one
row and of ``max_batch_size`` rows before it is READY, so a graph that loads but cannot run, or answers NaN, is
UNAVAILABLE with the reason instead of READY and failing its callers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.core.registry import ModelEntry
from service.core.tasks import task_class
from service.core.types import ModelRef
from service.errors import ModelUnavailable
from service.settings import Settings
from tests.graphs import answer_nan, reshape_logits
from tests.service.core.conftest import MakeDP

COMMITTED = Path(__file__).resolve().parents[3] / "models"


@pytest.mark.parametrize(
    ("shape", "max_batch_size", "rows"),
    [([3, 2], 32, 1), ([1, 2], 32, 32), ([1, 2], 8, 8)],
    ids=["fails-on-one-row", "fails-on-a-full-batch", "max-batch-size-is-the-second-sample"],
)
async def test_a_graph_that_cannot_run_is_unavailable_with_the_reason(
    repo: Path, make_dp: MakeDP, shape: list[int], max_batch_size: int, rows: int
) -> None:
    reshape_logits(repo / "sentiment" / "1", shape)
    dp = await make_dp(models=repo, max_batch_size=max_batch_size)
    info = await dp.model_info(ModelRef("sentiment"))
    assert not info.ready
    assert f"model.onnx loads but failed its warm-up run on a sample of {rows} row(s)" in (info.error or "")
    assert "Reshape" in (info.error or "")  # ONNX Runtime's own words say which node
    fix = "re-export it" if rows == 1 else "it runs one row: lower SEQSERVE_MAX_BATCH_SIZE, or re-export it"
    assert (info.error or "").endswith(fix)  # a full batch too big for the device's memory is not the graph's fault
    with pytest.raises(ModelUnavailable, match="failed to load"):
        await dp.classify(ModelRef("sentiment"), ["good film"])
    assert (await dp.model_info(ModelRef("charlm"))).ready  # the other models load and serve


async def test_a_graph_that_fails_only_on_full_batches_serves_when_batches_stay_small(
    repo: Path, make_dp: MakeDP
) -> None:
    """The warm-up's samples are the batches the server can form: with max_batch_size 1, the graph above that fails
    on more than one row is READY and answers."""
    reshape_logits(repo / "sentiment" / "1", [1, 2])
    dp = await make_dp(models=repo, max_batch_size=1)
    assert (await dp.model_info(ModelRef("sentiment"))).ready
    (result,) = await dp.classify(ModelRef("sentiment"), ["good film"])
    assert sum(result.probabilities) == pytest.approx(1.0, abs=1e-5)


async def test_a_graph_answering_nan_is_unavailable(repo: Path, make_dp: MakeDP) -> None:
    answer_nan(repo / "sentiment" / "1")
    dp = await make_dp(models=repo)
    info = await dp.model_info(ModelRef("sentiment"))
    assert not info.ready
    assert "model.onnx answered NaN in ['logits'] on its warm-up sample of 1 row(s)" in (info.error or "")


async def test_without_warmup_the_broken_graph_is_ready_and_fails_its_callers(repo: Path, make_dp: MakeDP) -> None:
    """What the warm-up saves callers from (and proof that the setting turns it off): READY, then every call fails."""
    reshape_logits(repo / "sentiment" / "1", [3, 2])
    dp = await make_dp(models=repo, warmup=False)
    assert (await dp.model_info(ModelRef("sentiment"))).ready
    with pytest.raises(Exception, match="running Reshape node"):  # ONNX Runtime's own failure, on every call
        await dp.classify(ModelRef("sentiment"), ["good film"])


@pytest.mark.parametrize("task", ["sentiment", "charlm", "forecast"])
def test_each_tasks_warmup_input_runs_on_its_tiny_graph(tiny_models: Path, task: str) -> None:
    """The samples are valid inputs of each task's graph at both sizes, and the runs' outputs have those rows."""
    name = {"forecast": "forecaster"}.get(task, task)
    entry = ModelEntry(name, 1, tiny_models / name / "1")
    entry.load_files(Settings(device="cpu", warmup=False))
    assert entry.error is None, entry.error
    cls = task_class(task)
    for rows in (1, 5):
        feeds = cls.warmup_input(entry.manifest, rows)
        assert feeds is not None and all(len(v) == rows for v in feeds.values())
        outputs = entry.runtime.run(feeds, rows)
        first = entry.manifest.outputs[0].name
        assert outputs[first].shape[0] == rows and np.isfinite(outputs[first]).all()


def test_every_committed_model_passes_its_warmup() -> None:
    """The models a fresh checkout serves load READY with the warm-up on (at the default max_batch_size)."""
    settings = Settings(device="cpu")
    assert settings.warmup
    versions = sorted(COMMITTED.glob("*/*/manifest.json"))
    assert len(versions) >= 3
    for manifest in versions:
        vdir = manifest.parent
        entry = ModelEntry(vdir.parent.name, int(vdir.name), vdir)
        entry.load_files(settings)
        assert entry.error is None, f"{entry.label}: {entry.error}"


async def test_new_weights_that_answer_nan_leave_the_old_ones_serving(repo: Path, make_dp: MakeDP) -> None:
    """--watch-models: weights that change on disk into a graph that loads but answers NaN (a bad export copied over
    a good one, with its manifest) do not replace the weights serving: the old answers go on."""
    dp = await make_dp(models=repo)
    before = await dp.classify(ModelRef("sentiment"), ["good film"])
    answer_nan(repo / "sentiment" / "1")
    await dp.registry.sync()
    info = await dp.model_info(ModelRef("sentiment"))
    assert info.ready and info.error is None
    assert await dp.classify(ModelRef("sentiment"), ["good film"]) == before
