"""Recompute a model's reported metric FROM THE EXPORTED ONNX with onnxruntime, on the standard split.

``seqserve-train evaluate --model models/NAME/VERSION --data PATH`` calls ``evaluate_model``; training calls the
same functions to fill the manifest, so the README numbers and a rerun are the same code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from pydantic import ValidationError

from service.core import arrays
from service.core.arrays import right_pad, zero_states
from service.core.intervals import WidthRule, empty_ring
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, Metric, sha256_file
from service.core.tasks import task_class
from service.core.tokenizers import Encoder
from training.calibrate import interval_scores, quantile_scores
from training.data import DataError, long_texts, read_text, read_tsv, written_form
from training.runners import VAL_STREAMS, char_nll
from training.scores import ece, mape, mase, mase_scale, seasonal_naive
from training.series import SEASON, Series, series_for, windows

# Per task, the manifest metrics that ``evaluate_model`` recomputes from the ONNX file: manifest name -> (its
# ``evaluate_model`` key, higher is better). What a derived model (quantized, fused) reports again.
RECOMPUTED: dict[str, dict[str, tuple[str, bool]]] = {
    "charlm": {"val_loss_nats_per_char": ("val_loss_nats_per_char", False)},
    "sentiment": {"accuracy": ("dev_accuracy", True), "ece": ("dev_ece", False)},
}


def recomputed(metrics: list[Metric], task: str, ev: dict[str, Any], command: str) -> list[Metric]:
    """``metrics`` with each one ``evaluate_model`` recomputes for ``task`` set to its value in ``ev`` (that
    function's result for the derived model) and to ``command``; the others as they are."""
    keys = RECOMPUTED.get(task, {})
    return [
        x.model_copy(update={"value": ev[keys[x.name][0]], "command": command}) if x.name in keys else x
        for x in metrics
    ]


def read_manifest(model_dir: Path) -> Manifest:
    """A model folder's manifest, checked as serving checks it (its task's own checks), beside a non-empty ONNX
    file; one-line DataError naming the file otherwise."""
    path, model = model_dir / MANIFEST_FILE, model_dir / MODEL_FILE
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected models/NAME/VERSION)")
    try:
        m = Manifest.load(path)
        task_class(m.task).check(m)
    except ValidationError as e:
        first = e.errors()[0]
        where = "".join(f"{x}: " for x in [".".join(str(x) for x in first["loc"])] if x)
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise DataError(f"{path}: not a valid manifest: {where}{first['msg']}{more}") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a valid manifest: {e}") from None
    if not model.is_file() or model.stat().st_size == 0:
        why = "empty" if model.is_file() else "file not found"
        raise DataError(f"{model}: {why} (a model folder holds its ONNX graph beside its manifest)")
    digest = sha256_file(model)
    if digest != m.sha256:  # (as the server refuses it: a number from another graph would pass for this model's)
        raise DataError(
            f"{model}: its sha256 is {digest} but manifest.json says {m.sha256}; the file is corrupt or from another "
            "export: re-export or copy both files together"
        )
    return m


def open_model(model_dir: Path) -> tuple[Manifest, ort.InferenceSession]:
    m = read_manifest(model_dir)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    try:
        sess = ort.InferenceSession(str(model_dir / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's own exception types (NoSuchFile, InvalidProtobuf, Fail, ...)
        raise DataError(f"{model_dir / MODEL_FILE}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
    return m, sess


def states0(m: Manifest, batch: int) -> dict[str, npt.NDArray[Any]]:
    """Zero state for every declared state input (serving's own ``zero_states``)."""
    features = m.forecast.features if m.forecast is not None else 1
    return zero_states(m.states, {"batch": batch, "features": features})


def eval_charlm(m: Manifest, sess: ort.InferenceSession, path: Path, val_fraction: float = 0.1) -> dict[str, float]:
    assert m.tokenizer is not None
    text = read_text(path)
    val = Encoder(m.tokenizer).encode(text[int(len(text) * (1 - val_fraction)) :], field=str(path))
    names = [s.input for s in m.states]

    def step(x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        feeds = {"input_ids": x.numpy(), **{n: s.numpy() for n, s in zip(names, state, strict=True)}}
        return tuple(torch.from_numpy(o) for o in sess.run(None, feeds))

    rows = VAL_STREAMS
    if len(val) < 2 * rows:
        raise DataError(
            f"{path}: the validation part (its last {val_fraction:.0%}) has {len(val)} characters; evaluation reads "
            f"it as {rows} streams and needs at least {2 * rows}"
        )
    state0 = tuple(torch.from_numpy(v) for v in states0(m, rows).values())
    nats = char_nll(step, val, state0)
    return {"val_loss_nats_per_char": nats, "val_bits_per_char": nats / np.log(2)}


def sentiment_logits(m: Manifest, sess: ort.InferenceSession, texts: list[str]) -> npt.NDArray[Any]:
    assert m.tokenizer is not None
    enc = Encoder(m.tokenizer)
    out = []
    for i in range(0, len(texts), 256):  # (whole texts, as served: tokenizer.max_length cut training's only)
        ids, lengths = right_pad([enc.encode(t) for t in texts[i : i + 256]], pad=enc.pad_id or 0)
        feeds = {"input_ids": ids, "lengths": lengths, **states0(m, len(ids))}
        out.append(sess.run(["logits"], feeds)[0])
    return np.concatenate(out)


def eval_sentiment(m: Manifest, sess: ort.InferenceSession, folder: Path) -> dict[str, float]:
    """GLUE dev accuracy, ECE and NLL; and ``dev_accuracy_written``: the same sentences as people write them
    (``written_form``: "doesn't", not SST's "does n't"), which is what clients send; ``..._negations``: only
    those that hold a negation "n't" (``dev_negations`` of them); ``dev_accuracy_long``: texts of eight dev
    sentences of one label each (``long_texts``; ``dev_long_words`` words on average), read whole as served."""
    dev = read_tsv(folder / "dev.tsv")
    logits = sentiment_logits(m, sess, [t for t, _ in dev])
    y = np.array([lab for _, lab in dev])
    probs = arrays.softmax(logits)  # what serving returns
    written = sentiment_logits(m, sess, [written_form(t) for t, _ in dev])
    negations = np.array(["n't" in t for t, _ in dev])
    right = written.argmax(1) == y
    out = {
        "dev_accuracy": float((logits.argmax(1) == y).mean()),
        "dev_accuracy_written": float(right.mean()),
        "dev_ece": ece(probs, y),
        "dev_nll": float(-np.log(probs[np.arange(len(y)), y]).mean()),
        "dev_examples": float(len(y)),
    }
    if negations.any():
        out |= {
            "dev_accuracy_written_negations": float(right[negations].mean()),
            "dev_negations": float(negations.sum()),
        }
    long = long_texts(dev)
    if long:
        y_long = np.array([lab for _, lab in long])
        long_logits = sentiment_logits(m, sess, [t for t, _ in long])
        out |= {
            "dev_accuracy_long": float((long_logits.argmax(1) == y_long).mean()),
            "dev_long_words": float(np.mean([len(t.split()) for t, _ in long])),
        }
    return out


def forecaster_study(doc: str | None, argv: list[str] | None) -> tuple[Manifest, ort.InferenceSession, Series]:
    """The command line of a study run on one forecaster (``python -m training.adaptive``, ``learned_scale``):
    ``--model models/NAME/N --data FILE`` -> its manifest, session and data as it was split for training."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a forecaster folder, models/NAME/N")
    ap.add_argument("--data", type=Path, required=True, help="its data file")
    args = ap.parse_args(argv)
    m, sess = open_model(args.model)
    if m.forecast is None:
        raise SystemExit(f"{args.model}: not a forecaster")
    return m, sess, series_for(m, args.data)


def forecast_windows(m: Manifest, sess: ort.InferenceSession, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """x (N, window, F) z-scored -> point forecasts (N, horizon, T) z-scored (T = target columns)."""
    return forecast_and_scale(m, sess, x)[0]


def forecast_and_scale(
    m: Manifest, sess: ort.InferenceSession, x: npt.NDArray[Any]
) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]:
    """x (N, window, F) z-scored -> point forecasts (N, horizon, T) and, when the graph has a
    ``forecast.scale_output``, the scale multiplying the offsets (N, 1 or horizon, T); else None."""
    assert m.forecast is not None
    names = ["forecast"] + ([m.forecast.scale_output] if m.forecast.scale_output else [])
    runs = [
        sess.run(names, {"history": x[i : i + 512], **states0(m, len(x[i : i + 512]))}) for i in range(0, len(x), 512)
    ]
    point = np.concatenate([r[0] for r in runs])
    return point, (np.concatenate([r[1] for r in runs]) if len(names) > 1 else None)


def eval_forecast(m: Manifest, sess: ort.InferenceSession, path: Path) -> dict[str, float]:
    """Test-split MSE/MAE (z-scored, target columns), quantile coverage and pinball loss (z-scored), and, in
    original units, MASE (and MAPE when no target is 0) of the model and of the seasonal-naive baseline."""
    assert m.forecast is not None
    f = m.forecast
    s = series_for(m, path)
    x, y = windows(s.part("test", f.window), f.window, f.horizon, s.target_index)
    pred, scale = forecast_and_scale(m, sess, x)
    res = {"test_mse": float(((pred - y) ** 2).mean()), "test_mae": float(np.abs(pred - y).mean())}
    if f.quantile_offsets and f.adaptive_width_gamma is not None:
        res |= {f"test_{k}": v for k, v in adaptive_scores(m, x[:, -1, s.target_index], y, pred, scale).items()}
    elif f.quantile_offsets:
        scores = interval_scores(y, pred, np.asarray(f.quantile_offsets), f.quantiles, scale)
        res |= {f"test_{k}": v for k, v in scores.items()}
    res |= _baseline_scores(s, f.window, f.horizon, x, y, pred)
    res["test_windows"] = float(len(x))
    return res


def adaptive_quantiles(
    m: Manifest, last: npt.NDArray[Any], point: npt.NDArray[Any], scale: npt.NDArray[Any] | None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The quantiles (Q, N, H, T), z-scored, that one session of ``m`` (a model with an adaptive width) returns
    when it observes a series row by row from its first window on: ``WidthRule.advance`` (the code sessions run)
    over the windows' last history rows ``last`` (N, T), with their forecasts ``point`` (N, H, T) and ``scale``
    (N, 1 or H, T) or None, from width 1. Also the width after the last window."""
    f = m.forecast
    assert f is not None and f.adaptive_width_gamma is not None
    rule = WidthRule(f.quantile_offsets, list(f.quantiles), f.adaptive_width_gamma)
    p32 = np.asarray(point, np.float32)
    s32 = None if scale is None else np.asarray(scale, np.float32)
    ring = empty_ring(rule, None if s32 is None else s32.shape[1])
    run = rule.advance(ring, rule.ones(), np.asarray(last, np.float32), p32, s32, 0)
    return rule.quantiles_many(p32, s32, run.issued), run.width


def adaptive_scores(
    m: Manifest,
    last: npt.NDArray[Any],
    y: npt.NDArray[Any],
    point: npt.NDArray[Any],
    scale: npt.NDArray[Any] | None,
) -> dict[str, float]:
    """``interval_scores`` of a model with an adaptive width: each window scored (against ``y`` (N, H, T)) at the
    width it was issued with (``adaptive_quantiles``); also the mean width after the last window."""
    assert m.forecast is not None
    quant, width = adaptive_quantiles(m, last, point, scale)
    return quantile_scores(y, quant, m.forecast.quantiles) | {"adaptive_width_final": float(width.mean())}


def _baseline_scores(
    s: Series, window: int, horizon: int, x: npt.NDArray[Any], y: npt.NDArray[Any], pred: npt.NDArray[Any]
) -> dict[str, float]:
    """MASE / MAPE of the model vs seasonal naive, in original units (needs a known season <= window)."""
    season = SEASON.get(s.frequency or "")
    if season is None or season > window:
        return {}
    t = s.target_index
    mean, std = s.mean[t], s.std[t]
    y_raw, pred_raw = y * std + mean, pred * std + mean  # (N, H, T)
    naive = seasonal_naive(x[:, :, t] * std + mean, horizon, season)
    raw = s.raw()
    a, b = s.split["train"]
    scale = mase_scale(raw[a:b, t], season)
    out: dict[str, float] = {}
    # MASE needs every target to vary from season to season in the train rows (an exact daily cycle such as an
    # hour-of-day column has scale 0); MAPE needs no target to be 0, judged on the file's values (a 0 rebuilt
    # from z-scores in float32 is ~1e-8, which would "pass" and give a MAPE of millions of percent).
    if (scale > 0).all():
        out |= {"test_mase": mase(y_raw, pred_raw, scale), "test_snaive_mase": mase(y_raw, naive, scale)}
    a, b = s.split["test"]
    if (raw[a:b, t] != 0).all():
        out |= {"test_mape": mape(y_raw, pred_raw), "test_snaive_mape": mape(y_raw, naive)}
        out["test_mape_gain_vs_snaive"] = 1 - out["test_mape"] / out["test_snaive_mape"]
    out = {k: v for k, v in out.items() if np.isfinite(v)}  # (a seasonal naive with MAPE 0 has no gain)
    if out:
        out["season"] = float(season)
    return out


def evaluate_model(model_dir: Path, data: Path) -> dict[str, float]:
    m, sess = open_model(model_dir)
    if m.task == "charlm":
        return eval_charlm(m, sess, data)
    if m.task == "sentiment":
        return eval_sentiment(m, sess, data)
    return eval_forecast(m, sess, data)


def sample(model_dir: Path, prompt: str, length: int, temperature: float, top_k: int, seed: int) -> str:
    """Char LM sampling from the ONNX model: feed the prompt once, then one char at a time carrying state."""
    m, sess = open_model(model_dir)
    if m.task != "charlm" or m.tokenizer is None:
        raise DataError(f"{model_dir}: sampling needs a charlm model, this one is {m.task!r}")
    enc, rng = Encoder(m.tokenizer), np.random.default_rng(seed)
    ids = enc.encode(prompt or "\n", field="prompt")[None, :]
    feeds: dict[str, Any] = {"input_ids": ids, **states0(m, 1)}
    out: list[int] = []
    for _ in range(length):
        logits, *state = sess.run(None, feeds)
        nxt = arrays.sample(logits[0, -1], temperature, top_k, rng)  # the very function serving's Complete uses
        out.append(nxt)
        feeds = {"input_ids": np.array([[nxt]], np.int64), **{s.input: v for s, v in zip(m.states, state, strict=True)}}
    return prompt + enc.decode(out)
