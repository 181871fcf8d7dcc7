"""One function per task: data -> net -> fit -> export (ONNX + manifest) -> ONNX evaluation -> report.

The sentiment classifier's lives in ``training/sentiment.py``, the forecaster's in ``training/forecasting.py``."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.manifest import MANIFEST_FILE, MODEL_FILE, VERSION_FOLDER, Manifest, Metric, ModelCard, sha256_file
from training.cards import card_for
from training.data import DataError, data_sha256, load_chars, public_data
from training.evaluate import evaluate_model, read_manifest
from training.export import cell_name, write_model
from training.nets import NetConfig, build_net, count_parameters
from training.runners import CharLMRunner
from training.train import FitResult, TrainConfig, fit, write_report


def name_version(out: Path) -> tuple[str, int]:
    """models/NAME/N -> (NAME, N); a folder not named by a number is version 1 of its own name. A number the
    server would not load as a version (0, 01, ten digits or more) is refused."""
    if out.name.isascii() and out.name.isdigit():
        if not VERSION_FOLDER.fullmatch(out.name):
            raise DataError(
                f"{out}: --out's last folder is the version, 1 to 999999999 without leading zeros (the server loads "
                "only such folders)"
            )
        return out.parent.name, int(out.name)
    return out.name, 1


def derived_source(src: Path, out: Path) -> Manifest:
    """The manifest of ``src`` (models/NAME/N), for a command that writes a model derived from it (calibrate,
    quantize, fuse) into ``out``, which must be a new or empty folder: a committed model is never rewritten."""
    m = read_manifest(src)
    if out.resolve() == src.resolve():
        raise DataError(f"{out}: --out must differ from --model (a committed model is never rewritten)")
    require_new_folder(out)
    return m


def require_new_folder(out: Path, alternative: str = "pick a new folder") -> None:
    """``out`` (a model's --out) must not exist yet or be an empty folder: a model is never rewritten in place."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: already exists and is not empty; {alternative} (a model is never rewritten)")


@contextmanager
def new_model_folder(out: Path) -> Iterator[tuple[str, int]]:
    """Creates ``out`` (new, or an empty folder) and yields its (name, version). When the body fails (refused,
    broken, interrupted), what it made goes again: the folders created for it (``models/NAME/`` included), or the
    contents of an empty folder that was there, so no half-written model is left behind."""
    require_new_folder(out)
    made = out
    while not made.parent.exists():  # the topmost folder this creates
        made = made.parent
    existed = out.exists()

    def undo() -> None:
        if not existed:
            shutil.rmtree(made, ignore_errors=True)
        else:
            for child in out.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        undo()
        raise DataError(f"{out}: cannot create this folder ({e.strerror or e})") from None
    try:
        yield name_version(out)
    except BaseException:
        undo()
        raise


def derived_manifest(
    m: Manifest,
    out: Path,
    version: tuple[str, int],
    command: str,
    description: str,
    training: dict[str, Any],
    **update: Any,
) -> Manifest:
    """``m`` made the manifest of a model derived from it in ``out`` (calibrate, quantize, fuse): ``version`` =
    (name, version), ``training`` on top of ``m.training`` with the deriving ``command``, the sha256 of ``out``'s
    model file, a fresh ``created_at``, no card (the caller writes its own once the metrics are in), and any other
    field in ``update``."""
    return m.model_copy(
        update={
            "name": version[0], "version": version[1], "card": None, "description": description,
            "training": {**m.training, "command": command, **training},
            "sha256": sha256_file(out / MODEL_FILE),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **update,
        }
    )  # fmt: skip


def write_derived_report(src: Path, out: Path, fields: dict[str, Any], parent_command_key: str) -> None:
    """metrics.json of a model derived from ``src`` without training (recalibrated, quantized): ``src``'s training
    report with ``fields`` on top, ``src``'s own training command under ``parent_command_key``, and its training
    curve copied beside it."""
    old = src / "metrics.json"
    report: dict[str, Any] = json.loads(old.read_text(encoding="utf-8")) if old.exists() else {}
    report |= {parent_command_key: report.get("command")} | fields
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if (src / "training_curve.png").exists():
        shutil.copyfile(src / "training_curve.png", out / "training_curve.png")


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
        return name_version(self.out)[0]

    @property
    def version(self) -> int:
        return name_version(self.out)[1]


def finish(
    job: Job,
    res: FitResult,
    metrics: list[Metric],
    onnx_metrics: dict[str, float],
    summary: dict[str, Any],
    card: ModelCard | None = None,
) -> None:
    """Add the ONNX-measured metrics and the model card to the manifest; write metrics.json + the training curve."""
    path = job.out / MANIFEST_FILE
    m = Manifest.load(path)
    m.model_copy(update={"metrics": metrics, "card": card}).dump(path)
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


def training_info(job: Job, res: FitResult) -> dict[str, Any]:
    return {
        "command": job.command,
        "data": str(job.data),
        "data_sha256": data_sha256(job.data),  # what heldout checks its --data against
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
    batch, bptt = job.train.batch_size, job.extra["bptt"]
    need = CharLMRunner.chars_for_one_step(batch, bptt)
    if len(train) < need:
        raise DataError(
            f"{job.data}: the train part has {len(train):,} characters; one step of --batch-size {batch} streams "
            f"x --bptt {bptt} characters needs {need:,}: lower --batch-size or --bptt, or give more text"
        )
    job.net.vocab = len(tok.vocab)
    known = public_data(job.data)  # "Tiny Shakespeare", or None: the user's own text, named as itself
    net = build_net(job.net, job.train.seed)
    print(f"charlm: {len(train)} train / {len(val)} val chars, vocab {len(tok.vocab)}, {count_parameters(net)} params")
    res = fit(CharLMRunner(net, train, val, job.extra["bptt"], job.train.device), job.train)
    half = bool(job.extra.get("half"))
    write_model(
        net.cpu(), job.net, job.out, name=job.name, version=job.version,
        description=f"Character-level {cell_name(job.net.cell)} language model trained on {known or job.data.name} "
        "(first 90% of the text).",
        tokenizer=tok, training=training_info(job, res), half=half,
        notes=f"unidirectional; state {'(h, c)' if job.net.cell == 'lstm' else 'h'} carries the whole prefix, so a "
        "session advances in O(new chars)"
        + ("; weights stored as float16, computed in float32" if half else ""),
    )  # fmt: skip
    ev = evaluate_model(job.out, job.data)
    metric = Metric(
        name="val_loss_nats_per_char", value=ev["val_loss_nats_per_char"], higher_is_better=False, target=1.50,
        dataset="tinyshakespeare/input.txt" if known else job.data.name, split="last 10% of characters (validation)",
        command=f"seqserve-train evaluate --model {job.out} --data {job.data}",
    )  # fmt: skip
    finish(job, res, [metric], ev, {"task": "charlm"}, card_for(job.name, "charlm", job.version, job.data))
