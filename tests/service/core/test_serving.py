"""A model's own serving settings (``<models>/<name>/serving.json``, Triton's per-model config): its batcher, ONNX
Runtime threads and warm-up follow them, ModelConfig reports them, a file that is not valid makes that model
UNAVAILABLE saying why (the others serve), and a change reloads the model, the old versions serving on when the new
settings fail."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from service.api.kserve.convert import config_to_pb
from service.core.types import ModelRef
from tests.service.core.conftest import memory_dp, recorded, texts

SENT = ModelRef("sentiment")


def serve(repo: Path, model: str, settings: Any) -> None:
    (repo / model / "serving.json").write_text(settings if isinstance(settings, str) else json.dumps(settings))


async def test_a_models_serving_json_sets_its_own_batching(repo: Path) -> None:
    serve(repo, "sentiment", {"max_batch_delay_ms": 50, "model_instances": 2, "max_batch_size": 4})
    dp = await memory_dp(repo)
    try:
        sentiment, charlm = dp.registry.find(SENT), dp.registry.find(ModelRef("charlm"))
        assert sentiment.serving == {"max_batch_delay_ms": 50.0, "model_instances": 2, "max_batch_size": 4}
        assert (sentiment.batcher.delay, sentiment.batcher.instances, sentiment.batcher.max_rows) == (0.05, 2, 4)
        assert (charlm.batcher.delay, charlm.batcher.instances, charlm.batcher.max_rows) == (0.001, 1, 32)
        assert (sentiment.warmed, charlm.warmed) == ((1, 4), (1, 32))  # the warm-up's full batch is the model's
        await asyncio.gather(*(dp.infer(SENT, texts("good film")) for _ in range(10)))
        assert max(recorded(dp).batch_sizes("sentiment")) == 4  # never more rows than its own max_batch_size
        config = config_to_pb(await dp.model_metadata(SENT), dp.settings)
        assert config.instance_group[0].count == 2
        assert config.dynamic_batching.max_queue_delay_microseconds == 50_000
        other = config_to_pb(await dp.model_metadata(ModelRef("forecaster")), dp.settings)
        assert other.instance_group[0].count == 1  # (a stateful model: sequence batching, no dynamic_batching)
    finally:
        await dp.stop()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ({"max_sessions": 3}, "max_sessions cannot be set per model; a model may set max_batch_size, "),
        ({"max_batch_size": 0}, "max_batch_size: input should be greater than or equal to 1, got 0"),
        ({"warmup": "yes"}, 'warmup: input should be a valid boolean, got "yes"'),
        ({"model_instances": 2.5}, "model_instances: input should be a valid integer, got 2.5"),
        ("{max_batch_size: 4}", "is not JSON"),
        ("[4]", "must be a JSON object of settings"),
    ],
)
async def test_a_serving_json_that_is_not_valid_makes_its_model_unavailable_saying_why(
    repo: Path, content: Any, words: str
) -> None:
    serve(repo, "sentiment", content)
    dp = await memory_dp(repo)
    try:
        states = {(m.name, m.version): (m.ready, m.error) for m in await dp.models()}
        assert states[("sentiment", 1)][0] is False
        reason = states[("sentiment", 1)][1] or ""
        assert reason.startswith("sentiment/serving.json") and words in reason, reason
        assert states[("charlm", 1)] == (True, None)
    finally:
        await dp.stop()


async def test_a_changed_serving_json_reloads_the_model_and_a_bad_one_keeps_the_old(repo: Path) -> None:
    dp = await memory_dp(repo)
    try:
        first = dp.registry.find(SENT)
        assert (first.serving, first.batcher.instances) == ({}, 1)
        serve(repo, "sentiment", {"model_instances": 3})
        await dp.registry.sync()
        second = dp.registry.find(SENT)
        assert second is not first and (second.serving, second.batcher.instances) == ({"model_instances": 3}, 3)
        assert dp.registry.find(ModelRef("charlm")).batcher.instances == 1  # the other models are untouched
        serve(repo, "sentiment", {"model_instances": 0})
        await dp.registry.sync()
        assert dp.registry.find(SENT) is second  # still serving, with the settings it had
        assert (await dp.infer(SENT, texts("good film"))).outputs
        (repo / "sentiment" / "serving.json").unlink()
        await dp.registry.sync()
        third = dp.registry.find(SENT)
        assert third is not second and (third.serving, third.batcher.instances) == ({}, 1)
    finally:
        await dp.stop()
