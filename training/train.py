"""The training loop shared by every task: AdamW, warmup + cosine LR, gradient clipping (pre-clip norm logged each
step), early stopping on a validation metric keeping the best weights, time budget, checkpoint save/resume,
tqdm progress, and the run report (metrics.json + training-curve PNG).

Task specifics (batches, loss, evaluation) live in ``training/runners.py`` behind the small ``Runner`` protocol.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from training.data import DataError


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    clip: float = 1.0  # max gradient L2 norm
    patience: int = 4  # evaluations without improvement before stopping
    eval_every: int = 0  # steps between evaluations; 0 = once per epoch
    max_minutes: float = 0.0  # wall-clock budget; 0 = none
    seed: int = 0
    device: str = "cpu"
    threads: int = 2
    run_dir: Path = Path("runs/default")
    resume: bool = False
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["run_dir"] = str(self.run_dir)
        return d


class Runner(Protocol):
    """One task's data, loss and evaluation over ``net``."""

    net: nn.Module
    metric: str  # key of ``evaluate()`` that selects the best checkpoint, e.g. "val_accuracy"
    higher_is_better: bool

    def steps_per_epoch(self, batch_size: int) -> int: ...

    def epoch(self, batch_size: int, rng: np.random.Generator) -> Iterator[Any]:
        """Batches of one pass over the training data (a char LM also resets its carried state here)."""
        ...

    def loss(self, batch: Any) -> Tensor: ...

    def evaluate(self) -> dict[str, float]:
        """Validation numbers; must contain ``metric``. Called in eval mode under no_grad."""
        ...


@dataclass
class FitResult:
    best: dict[str, float]  # evaluate() at the best checkpoint
    best_step: int
    steps: int
    seconds: float
    stopped: str  # why training ended
    history: dict[str, list[float]] = field(default_factory=dict)
    evals: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio as ``progress`` (0..1) runs out."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def _better(a: float, b: float | None, higher: bool) -> bool:
    return b is None or (a > b if higher else a < b)


# A weight larger than this is a run that blew up, even when its loss stayed finite (a learning rate of 1e4 on the
# sentiment or char model): the committed models' largest trained weight is 13.
MAX_WEIGHT = 1e3


def fit(runner: Runner, cfg: TrainConfig) -> FitResult:
    """Train ``runner.net`` in place; on return it holds the best weights seen on validation."""
    rng = seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads)
    net = runner.net.to(cfg.device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = runner.steps_per_epoch(cfg.batch_size)
    total = per_epoch * cfg.epochs
    eval_every = cfg.eval_every or per_epoch
    budget = cfg.max_minutes * 60
    ckpt = cfg.run_dir / "checkpoint.pt"
    hist: dict[str, list[float]] = {"loss": [], "grad_norm": [], "lr": []}
    evals: list[dict[str, float]] = []
    step, start_epoch, bad, spent = 0, 0, 0, 0.0
    completed = 0
    best_value: float | None = None
    best_state = copy.deepcopy(net.state_dict())
    best: dict[str, float] = {}
    if cfg.resume and ckpt.exists():
        try:
            st = torch.load(ckpt, map_location=cfg.device, weights_only=False)
        except Exception as e:  # (torch raises what the damage makes: OSError, RuntimeError, UnpicklingError, ...)
            raise DataError(
                f"--resume: {ckpt} is not a readable checkpoint ({type(e).__name__}); resume from an intact run's "
                "--run-dir, or train with another --run-dir"
            ) from None
        try:
            net.load_state_dict(st["net"])
            opt.load_state_dict(st["opt"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
            raise DataError(
                f"--resume: {ckpt} was saved by a run with other settings ({first}); resume with that run's "
                "options, or train with another --run-dir"
            ) from None
        step, start_epoch, bad, spent = st["step"], st["epoch"], st["bad"], st["seconds"]
        best_value, best_state, best, hist, evals = (
            st["best_value"],
            st["best_state"],
            st["best"],
            st["hist"],
            st["evals"],
        )
        rng = np.random.default_rng(cfg.seed + start_epoch)
        completed = start_epoch
        print(f"resumed {ckpt} at step {step}, epoch {start_epoch}, best {runner.metric}={best_value}")
    t0 = time.monotonic() - spent

    def diverged(what: str) -> DataError:
        return DataError(
            f"training diverged: {what}; lower --lr ({cfg.lr:g}) or --weight-decay ({cfg.weight_decay:g}), or "
            f"clip harder (--clip {cfg.clip:g})"
        )

    def validate(epoch: int) -> None:
        """Evaluate, keep the best weights, checkpoint."""
        nonlocal best_value, best, bad, best_state
        net.eval()
        with torch.no_grad():
            ev = {"step": float(step), "epoch": float(epoch), **runner.evaluate()}
        net.train()
        if not math.isfinite(ev[runner.metric]):
            raise diverged(f"{runner.metric} is {ev[runner.metric]} at step {step}")
        evals.append(ev)
        if _better(ev[runner.metric], best_value, runner.higher_is_better):
            best_value, best, bad = ev[runner.metric], ev, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            bad += 1
        shown = " ".join(f"{k}={v:.4f}" for k, v in ev.items() if k not in ("step", "epoch"))
        bar.write(f"step {step} epoch {epoch} {shown} ({time.monotonic() - t0:.0f}s)")
        save()

    def save() -> None:
        # "epoch" = completed epochs: a resume restarts a partly done epoch from its beginning.
        _save(ckpt, net, opt, step, completed, bad, time.monotonic() - t0, best_value, best_state, best, hist, evals)

    stopped = "epochs"
    bar = tqdm(total=total, initial=step, disable=not cfg.progress, dynamic_ncols=True, mininterval=2.0)
    done = False
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        for batch in runner.epoch(cfg.batch_size, rng):
            elapsed = time.monotonic() - t0
            progress = max(step / max(total, 1), elapsed / budget if budget else 0.0)
            lr = lr_at(cfg, step, progress)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = runner.loss(batch)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise diverged(f"the loss is {loss_value} at step {step + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip))  # pre-clip total norm
            opt.step()
            step += 1
            hist["loss"].append(loss_value)
            hist["grad_norm"].append(norm)
            hist["lr"].append(lr)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", gnorm=f"{norm:.2f}", best=best_value, refresh=False)
            out_of_time = bool(budget) and time.monotonic() - t0 >= budget
            if step % eval_every == 0 or out_of_time:
                validate(epoch)
                if bad >= cfg.patience:
                    stopped, done = f"early stop: {bad} evaluations without improvement", True
                elif out_of_time:
                    stopped, done = f"time budget of {cfg.max_minutes} min", True
            if done:
                break
        if done:
            break
        completed = epoch + 1
        save()
    if not evals or evals[-1]["step"] != step:  # the last steps always get a validation
        validate(cfg.epochs - 1)
    bar.close()
    net.load_state_dict(best_state)
    largest = max((float(p.detach().abs().max()) for p in net.parameters() if p.numel()), default=0.0)
    if not largest <= MAX_WEIGHT:  # (its loss may stay finite: its export then failed ORT's parity, a traceback)
        raise diverged(f"a weight of the best checkpoint is {largest:.3g} (trained ones stay below {MAX_WEIGHT:g})")
    best_step = int(best.get("step", step))
    return FitResult(best, best_step, step, time.monotonic() - t0, stopped, hist, evals)


def _save(path: Path, net: nn.Module, opt: torch.optim.Optimizer, step: int, epoch: int, bad: int, seconds: float,
          best_value: float | None, best_state: dict[str, Any], best: dict[str, float],
          hist: dict[str, list[float]], evals: list[dict[str, float]]) -> None:  # fmt: skip
    """Checkpoint that carries everything to resume; written atomically (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(
            {"net": net.state_dict(), "opt": opt.state_dict(), "step": step, "epoch": epoch, "bad": bad,
             "seconds": seconds, "best_value": best_value, "best_state": best_state, "best": best, "hist": hist,
             "evals": evals, "net_cfg": getattr(net, "cfg", None)},
            tmp,
        )  # fmt: skip
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # (interrupted mid-write: the last whole checkpoint stays)


def write_report(out: Path, result: FitResult, summary: dict[str, Any], metric: str) -> None:
    """``metrics.json`` (summary + per-eval numbers) and ``training_curve.png`` (loss, val metric, grad norm)."""
    out.mkdir(parents=True, exist_ok=True)
    report = {
        **summary,
        "best_step": result.best_step,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "stopped": result.stopped,
        "best_validation": result.best,
        "evaluations": result.evals,
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    loss = np.asarray(result.history["loss"])
    k = max(1, len(loss) // 100)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid") if len(loss) >= k else loss
    ax[0].plot(loss, alpha=0.3, label="train loss")
    ax[0].plot(np.arange(len(smooth)) + k - 1, smooth, label=f"train loss ({k}-step mean)")
    if result.evals and "val_loss" in result.evals[0]:
        ax[0].plot([e["step"] for e in result.evals], [e["val_loss"] for e in result.evals], "o-", label="val loss")
    ax[0].set(title="loss", xlabel="step")
    ax[0].legend()
    ax[1].plot([e["step"] for e in result.evals], [e[metric] for e in result.evals], "o-")
    ax[1].axvline(result.best_step, color="gray", ls="--", label="best checkpoint")
    ax[1].set(title=metric, xlabel="step")
    ax[1].legend()
    ax[2].plot(result.history["grad_norm"], lw=0.5)
    ax[2].set(title="gradient norm (before clipping)", xlabel="step", yscale="log")
    fig.tight_layout()
    fig.savefig(out / "training_curve.png", dpi=80)
    plt.close(fig)
