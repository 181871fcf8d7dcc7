"""Tiny untrained models for the tests: every task through the real export path (ONNX + manifest + parity).

Test fixtures, not production code: ``tests/conftest.py`` and the KServe/integration conftests build their model
repositories with ``export_tiny``. Only test processes import it (it needs torch; the server never does).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from service.core.manifest import ForecastSpec, Normalization, Tokenizer
from training.export import DEFAULT_NAMES, write_model
from training.nets import NetConfig, build_net

CHAR_VOCAB = [chr(i) for i in range(32, 127)] + ["\n"]  # printable ASCII + newline
TINY_WORDS = ["<pad>", "<unk>", ".", ",", "!", "?", "the", "a", "an", "and", "is", "was", "it", "this", "i", "not"]
TINY_WORDS += ["movie", "film", "good", "great", "fun", "love", "bad", "terrible", "boring", "hate", "very", "n't"]
ETT_COLUMNS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]


def tiny_forecast_spec(
    window: int, horizon: int, features: int, segment: int, cell: str, targets: list[str] | None = None
) -> ForecastSpec:
    z = [-1.2816, 0.0, 1.2816]  # standard-normal quantiles for 0.1 / 0.5 / 0.9
    width = len(targets) if targets else features
    offsets = [[[zq * 0.3 * math.sqrt(1 + h) for _ in range(width)] for h in range(horizon)] for zq in z]
    return ForecastSpec(
        targets=targets or [],
        window=window,
        horizon=horizon,
        features=features,
        state_mode="window",
        update_cost=f"{window // segment} {cell.upper()} steps",
        quantiles=[0.1, 0.5, 0.9],
        quantile_offsets=offsets,
    )


def export_tiny(
    task: str,
    root: Path,
    *,
    cell: str = "lstm",
    name: str | None = None,
    version: int = 1,
    seed: int = 0,
    targets: list[str] | None = None,
) -> Path:
    """Untrained tiny model for ``task`` in ``root/<name>/<version>/`` (model.onnx + manifest.json); returns it.

    charlm: vocab = printable ASCII + "\\n", 2 layers x 16; sentiment: 28-word vocab (pad=0, unk=1), 1 layer x 16;
    forecast: window 24, horizon 12, 7 ETTh1-like features, 4 segments of 6 rows; ``targets`` (e.g. ``["OT"]``)
    makes the other columns covariates: the output is then (batch, 12, len(targets)).
    """
    torch.manual_seed(seed)
    name = name or DEFAULT_NAMES.get(task, task)
    out = Path(root) / name / str(version)
    tokenizer, labels, norm, spec = None, None, None, None
    if task == "charlm":
        cfg = NetConfig(task=task, cell=cell, hidden=16, layers=2, vocab=len(CHAR_VOCAB), embedding=8)
        tokenizer = Tokenizer(kind="char", vocab=CHAR_VOCAB)
    elif task == "sentiment":
        cfg = NetConfig(task=task, cell=cell, hidden=16, layers=1, vocab=len(TINY_WORDS), embedding=8)
        tokenizer = Tokenizer(
            kind="word", vocab=TINY_WORDS, unk_token="<unk>", pad_token="<pad>", lowercase=True, max_length=64
        )
        labels = ["negative", "positive"]
    elif task == "forecast":
        index = [ETT_COLUMNS.index(t) for t in targets] if targets else None
        cfg = NetConfig(
            task=task, cell=cell, hidden=16, layers=1, features=7, window=24, horizon=12, segment=6, targets=index
        )
        norm = Normalization(
            columns=ETT_COLUMNS, mean=[7.9, 2.1, 5.0, 0.7, 3.0, 0.9, 13.3], std=[5.8, 2.0, 5.6, 1.9, 1.2, 0.6, 8.6]
        )
        spec = tiny_forecast_spec(cfg.window, cfg.horizon, cfg.features, cfg.segment, cell, targets)
    else:
        raise ValueError(f"task: unknown task {task!r}; choose sentiment, charlm or forecast")
    net = build_net(cfg)
    return write_model(
        net,
        cfg,
        out,
        name=name,
        version=version,
        description=f"UNTRAINED tiny {task} model for tests (seed {seed})",
        tokenizer=tokenizer,
        labels=labels,
        normalization=norm,
        forecast=spec,
        training={"untrained": True, "seed": seed},
    )
