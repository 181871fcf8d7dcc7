"""The training loop: LR schedule, pre-clip gradient norms, early stopping keeps the best weights, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.nets import NetConfig, build_net
from training.runners import ForecastRunner
from training.train import TrainConfig, fit, lr_at, write_report


def _runner(seed: int = 0) -> ForecastRunner:
    rng = np.random.default_rng(seed)
    t = np.arange(400)
    noisy = np.stack([np.sin(t / 5), np.cos(t / 7)], axis=1) + 0.05 * rng.standard_normal((400, 2))
    series = noisy.astype(np.float32)
    torch.manual_seed(seed)
    net = build_net(NetConfig(task="forecast", cell="gru", hidden=8, features=2, window=12, horizon=4, segment=4))
    return ForecastRunner(net, series[:300], series[280:], window=12, horizon=4)


def test_lr_schedule_warmup_then_cosine() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(0.1)
    assert lr_at(cfg, 9, 0.0) == pytest.approx(1.0)
    assert lr_at(cfg, 50, 0.5) == pytest.approx(0.55)
    assert lr_at(cfg, 99, 1.0) == pytest.approx(0.1)
    assert lr_at(cfg, 99, 3.0) == pytest.approx(0.1)  # past the budget it stays at the floor


def test_fit_logs_pre_clip_norm_and_improves(tmp_path: Path) -> None:
    runner = _runner()
    cfg = TrainConfig(epochs=3, batch_size=32, lr=1e-2, clip=1e-3, warmup_steps=1, run_dir=tmp_path, progress=False)
    res = fit(runner, cfg)
    assert res.steps == 3 * runner.steps_per_epoch(32) == len(res.history["grad_norm"]) == len(res.history["loss"])
    assert max(res.history["grad_norm"]) > 1e-3  # the norm before clipping, not the clipped one
    assert len(res.evals) == 3 and res.stopped == "epochs"
    assert res.evals[-1]["val_mse"] < res.evals[0]["val_mse"] or res.best["val_mse"] < res.evals[0]["val_mse"]
    write_report(tmp_path / "out", res, {"task": "forecast"}, "val_mse")
    assert (tmp_path / "out" / "metrics.json").exists() and (tmp_path / "out" / "training_curve.png").exists()


def test_early_stop_restores_best_weights(tmp_path: Path) -> None:
    """Validation improves at the second evaluation and never again: training stops `patience` evaluations later
    and leaves the net with the weights of that second evaluation, not the last trained ones."""
    runner = _runner()
    scores = iter([1.0, 0.5, 0.9, 0.8, 0.7, 0.6])  # improving, but never past the best 0.5
    seen: list[dict[str, torch.Tensor]] = []

    def evaluate() -> dict[str, float]:
        seen.append({k: v.clone() for k, v in runner.net.state_dict().items()})
        return {"val_mse": next(scores)}

    runner.evaluate = evaluate  # type: ignore[method-assign]
    cfg = TrainConfig(epochs=20, batch_size=32, lr=1e-2, patience=2, warmup_steps=1, eval_every=3, run_dir=tmp_path)
    cfg.progress = False
    res = fit(runner, cfg)
    assert res.stopped.startswith("early stop") and len(res.evals) == 4 and res.best_step == 6
    assert any(not torch.equal(v, seen[1][k]) for k, v in seen[-1].items())  # training moved on after the best
    for k, v in runner.net.state_dict().items():
        torch.testing.assert_close(v, seen[1][k])


def test_resume_continues_from_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=2, batch_size=64, lr=1e-2, warmup_steps=1, run_dir=tmp_path, progress=False, patience=9)
    first = fit(_runner(), cfg)
    assert (tmp_path / "checkpoint.pt").exists()
    cfg.epochs, cfg.resume = 4, True
    second = fit(_runner(), cfg)
    assert second.steps == 2 * first.steps
    assert second.history["loss"][: first.steps] == first.history["loss"]
    assert len(second.evals) == 4
