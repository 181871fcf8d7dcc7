"""One function per task: data -> net -> fit -> export (ONNX + manifest) -> ONNX evaluation -> report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.core.manifest import MANIFEST_FILE, ForecastSpec, Manifest, Metric, Normalization
from service.core.tokenizers import Encoder
from training.data import load_chars, load_ett, load_sst2, ngram_table, windows, word_tokenizer
from training.evaluate import evaluate_model
from training.export import write_model
from training.nets import NetConfig, SentimentNet, build_net, count_parameters
from training.runners import CharLMRunner, ForecastRunner, SentimentRunner
from training.train import FitResult, TrainConfig, fit, write_report


@dataclass
class Job:
    data: Path
    out: Path
    train: TrainConfig
    net: NetConfig
    command: str  # the shell command that reproduces this run
    extra: dict[str, Any]  # task-specific options (bptt, heldout fraction, ...)

    @property
    def name(self) -> str:
        return self.out.parent.name if self.out.name.isdigit() else self.out.name

    @property
    def version(self) -> int:
        return int(self.out.name) if self.out.name.isdigit() else 1


def _finish(
    job: Job, res: FitResult, metrics: list[Metric], onnx_metrics: dict[str, float], summary: dict[str, Any]
) -> None:
    """Add the ONNX-measured metrics to the manifest and write metrics.json + the training curve."""
    path = job.out / MANIFEST_FILE
    m = Manifest.load(path)
    m.model_copy(update={"metrics": metrics}).dump(path)
    metric = metrics[0]
    summary = {
        **summary,
        "model": f"{job.name}/{job.version}",
        "command": job.command,
        "evaluate_command": f"seqserve-train evaluate --model {job.out} --data {job.data}",
        "onnx_metrics": onnx_metrics,
        "parameters": m.architecture.parameters,
        "net": job.net.to_dict(),
        "train_config": job.train.to_dict(),
    }
    write_report(job.out, res, summary, metric_key(res))
    print(f"{job.name}/{job.version}: {metric.name}={metric.value:.4f} (target {metric.target}) -> {job.out}")


def metric_key(res: FitResult) -> str:
    keys = [k for k in (res.best or {}) if k not in ("step", "epoch")]
    for k in ("heldout_accuracy", "val_mse", "val_loss"):
        if k in keys:
            return k
    return keys[0]


def _training_info(job: Job, res: FitResult) -> dict[str, Any]:
    return {
        "command": job.command,
        "data": str(job.data),
        "config": job.train.to_dict(),
        **job.extra,
        "steps": res.steps,
        "best_step": res.best_step,
        "seconds": round(res.seconds, 1),
        "stopped": res.stopped,
        "best_validation": res.best,
    }


def train_charlm(job: Job) -> None:
    tok, train, val = load_chars(job.data)
    job.net.vocab = len(tok.vocab)
    net = build_net(job.net)
    print(f"charlm: {len(train)} train / {len(val)} val chars, vocab {len(tok.vocab)}, {count_parameters(net)} params")
    res = fit(CharLMRunner(net, train, val, job.extra["bptt"], job.train.device), job.train)
    write_model(
        net.cpu(), job.net, job.out, name=job.name, version=job.version,
        description="Character-level LSTM language model trained on Tiny Shakespeare (first 90% of the text).",
        tokenizer=tok, training=_training_info(job, res),
        notes="unidirectional; state (h, c) carries the whole prefix, so a session advances in O(new chars)",
    )  # fmt: skip
    ev = evaluate_model(job.out, job.data)
    metric = Metric(
        name="val_loss_nats_per_char", value=ev["val_loss_nats_per_char"], higher_is_better=False, target=1.50,
        dataset="tinyshakespeare/input.txt", split="last 10% of characters (validation)",
        command=f"seqserve-train evaluate --model {job.out} --data {job.data}",
    )  # fmt: skip
    _finish(job, res, [metric], ev, {"task": "charlm"})


def train_sentiment(job: Job) -> None:
    train_rows, dev_rows = load_sst2(job.data)
    rng = np.random.default_rng(job.train.seed)
    order = rng.permutation(len(train_rows))
    n_held = int(len(train_rows) * job.extra["heldout_fraction"])
    held_rows = [train_rows[i] for i in order[:n_held]]
    fit_rows = [train_rows[i] for i in order[n_held:]]
    tok = word_tokenizer([t for t, _ in fit_rows], min_count=job.extra["min_count"], max_length=job.extra["max_length"])
    enc = Encoder(tok)
    job.net.vocab = len(tok.vocab)
    net = build_net(job.net)
    if job.net.subword_buckets:
        assert isinstance(net, SentimentNet)
        net.set_ngrams(torch.from_numpy(ngram_table(tok.vocab, job.net.subword_buckets)))

    def encode(rows: list[tuple[str, int]]) -> list[tuple[Any, int]]:
        return [(enc.encode(t), y) for t, y in rows]

    print(f"sentiment: {len(fit_rows)} train / {n_held} held-out / {len(dev_rows)} dev, vocab {len(tok.vocab)}")
    runner = SentimentRunner(
        net, encode(fit_rows), encode(held_rows), encode(dev_rows), tok.max_length or 128,
        job.train.device, job.extra["word_dropout"],
    )  # fmt: skip
    res = fit(runner, job.train)
    if isinstance(net, SentimentNet):
        net.bake_subwords()
    write_model(
        net.cpu(), job.net, job.out, name=job.name, version=job.version,
        description="SST-2 binary sentiment: word embeddings + recurrent encoder, masked mean+max pooling.",
        tokenizer=tok, labels=["negative", "positive"], training=_training_info(job, res),
        notes=f"{job.net.ensemble} member(s) averaged over one shared embedding (state rows = members x layers x "
        "directions); the backward direction runs on a length-aware reversed copy: padding never changes a result",
    )  # fmt: skip
    ev = evaluate_model(job.out, job.data)
    metric = Metric(
        name="accuracy", value=ev["dev_accuracy"], target=0.85, dataset="GLUE SST-2",
        split="dev (872 sentences); checkpoint chosen on a held-out slice of train",
        command=f"seqserve-train evaluate --model {job.out} --data {job.data}",
    )  # fmt: skip
    held = metric.model_copy(
        update={"name": "heldout_accuracy", "value": res.best["heldout_accuracy"], "target": None,
                "split": f"{n_held} rows held out from train.tsv (PyTorch; selects the checkpoint)",
                "command": job.command}
    )  # fmt: skip
    _finish(job, res, [metric, held], ev, {"task": "sentiment"})


def train_forecast(job: Job) -> None:
    cfg = job.net
    data = load_ett(job.data, window=cfg.window)
    cfg.features = len(data.columns)
    net = build_net(cfg)
    runner = ForecastRunner(net, data.train, data.val, cfg.window, cfg.horizon, job.train.device)
    print(f"forecast: {len(runner.x)} train / {len(runner.vx)} val windows, {count_parameters(net)} params")
    res = fit(runner, job.train)
    net.cpu()
    # Empirical residual quantiles per horizon step and feature on the validation split (z-scored).
    with torch.no_grad():
        vx, vy = windows(data.val, cfg.window, cfg.horizon)
        pred = ForecastRunner.predict(runner, torch.from_numpy(vx)).numpy()
    levels = [0.1, 0.5, 0.9]
    offsets = np.quantile(vy - pred, levels, axis=0).astype(float).tolist()  # (Q, H, F)
    spec = ForecastSpec(
        window=cfg.window, horizon=cfg.horizon, features=cfg.features, state_mode="window",
        update_cost=f"{cfg.window // cfg.segment} {cfg.cell.upper()} steps (the window is re-encoded per update)",
        quantiles=levels, quantile_offsets=offsets,
    )  # fmt: skip
    norm = Normalization(columns=data.columns, mean=data.mean.tolist(), std=data.std.tolist())
    write_model(
        net, cfg, job.out, name=job.name, version=job.version,
        description="ETTh1 multivariate forecaster (all 7 columns), 96 rows in -> 96 rows out, channel-independent.",
        normalization=norm, forecast=spec, training=_training_info(job, res),
        notes=f"segment RNN: each channel's window cut into {cfg.window // cfg.segment} segments of {cfg.segment} rows",
    )  # fmt: skip
    ev = evaluate_model(job.out, job.data)
    metric = Metric(
        name="test_mse", value=ev["test_mse"], target=0.40, higher_is_better=False,
        dataset="ETTh1 (all 7 columns, z-scored with train statistics)",
        split=f"standard test split rows [11520-{cfg.window}, 14400), every stride-1 window, horizon {cfg.horizon}",
        command=f"seqserve-train evaluate --model {job.out} --data {job.data}",
    )  # fmt: skip
    mae = metric.model_copy(update={"name": "test_mae", "value": ev["test_mae"], "target": None})
    _finish(job, res, [metric, mae], ev, {"task": "forecast"})
