"""Recompute a model's reported metric FROM THE EXPORTED ONNX with onnxruntime, on the standard split.

``seqserve-train evaluate --model models/NAME/VERSION --data PATH`` calls ``evaluate_model``; training calls the
same functions to fill the manifest, so the README numbers and a rerun are the same code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from service.core.tokenizers import Encoder
from training.data import DataError, load_ett, read_text, read_tsv, windows
from training.runners import VAL_STREAMS, char_nll


def _session(model_dir: Path) -> tuple[Manifest, ort.InferenceSession]:
    if not (model_dir / MANIFEST_FILE).exists():
        raise DataError(f"{model_dir / MANIFEST_FILE}: file not found (expected models/NAME/VERSION)")
    m = Manifest.load(model_dir / MANIFEST_FILE)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return m, ort.InferenceSession(str(model_dir / MODEL_FILE), opts, providers=["CPUExecutionProvider"])


def zero_states(m: Manifest, batch: int) -> dict[str, np.ndarray[Any, Any]]:
    """Zero state for every declared state input: "batch" -> batch, "batch*features" -> batch * features."""
    features = m.forecast.features if m.forecast is not None else 1

    def dim(d: int | str) -> int:
        return d if isinstance(d, int) else batch * features if d == "batch*features" else batch

    return {s.input: np.zeros([dim(d) for d in s.shape], np.float32) for s in m.states}


def eval_charlm(m: Manifest, sess: ort.InferenceSession, path: Path, val_fraction: float = 0.1) -> dict[str, float]:
    assert m.tokenizer is not None
    text = read_text(path)
    val = Encoder(m.tokenizer).encode(text[int(len(text) * (1 - val_fraction)) :], field=str(path))
    names = [s.input for s in m.states]

    def step(x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        feeds = {"input_ids": x.numpy(), **{n: s.numpy() for n, s in zip(names, state, strict=True)}}
        return tuple(torch.from_numpy(o) for o in sess.run(None, feeds))

    rows = VAL_STREAMS
    state0 = tuple(torch.from_numpy(v) for v in zero_states(m, rows).values())
    nats = char_nll(step, val, state0)
    return {"val_loss_nats_per_char": nats, "val_bits_per_char": nats / np.log(2)}


def sentiment_logits(m: Manifest, sess: ort.InferenceSession, texts: list[str]) -> np.ndarray[Any, Any]:
    assert m.tokenizer is not None
    enc, limit = Encoder(m.tokenizer), m.tokenizer.max_length or 10**9
    out = []
    for i in range(0, len(texts), 256):
        seqs = [enc.encode(t)[:limit] for t in texts[i : i + 256]]
        lengths = np.array([max(1, len(s)) for s in seqs], dtype=np.int64)
        ids = np.zeros((len(seqs), int(lengths.max())), dtype=np.int64)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = s
        feeds = {"input_ids": ids, "lengths": lengths, **zero_states(m, len(seqs))}
        out.append(sess.run(["logits"], feeds)[0])
    return np.concatenate(out)


def eval_sentiment(m: Manifest, sess: ort.InferenceSession, folder: Path) -> dict[str, float]:
    dev = read_tsv(folder / "dev.tsv")
    logits = sentiment_logits(m, sess, [t for t, _ in dev])
    y = np.array([lab for _, lab in dev])
    return {"dev_accuracy": float((logits.argmax(1) == y).mean()), "dev_examples": float(len(y))}


def forecast_windows(m: Manifest, sess: ort.InferenceSession, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """x (N, window, F) z-scored -> point forecasts (N, horizon, F) z-scored."""
    out = [
        sess.run(["forecast"], {"history": x[i : i + 512], **zero_states(m, len(x[i : i + 512]))})[0]
        for i in range(0, len(x), 512)
    ]
    return np.concatenate(out)


def eval_forecast(m: Manifest, sess: ort.InferenceSession, path: Path) -> dict[str, float]:
    assert m.forecast is not None and m.normalization is not None
    f = m.forecast
    data = load_ett(path, window=f.window)
    # The standard split's train statistics must be the ones the model was trained with.
    if not np.allclose(data.mean, m.normalization.mean, rtol=1e-4) or not np.allclose(
        data.std, m.normalization.std, rtol=1e-4
    ):
        raise DataError(f"{path}: train-split statistics differ from the model's manifest.normalization")
    x, y = windows(data.test, f.window, f.horizon)
    pred = forecast_windows(m, sess, x)
    res = {"test_mse": float(((pred - y) ** 2).mean()), "test_mae": float(np.abs(pred - y).mean())}
    if f.quantile_offsets:
        q = pred[None] + np.asarray(f.quantile_offsets, np.float32)[:, None]  # (Q, N, H, F)
        for level, qi in zip(f.quantiles, q, strict=True):
            res[f"test_coverage_q{level:g}"] = float((y <= qi).mean())  # should be close to the level
    res["test_windows"] = float(len(x))
    return res


def evaluate_model(model_dir: Path, data: Path) -> dict[str, float]:
    m, sess = _session(model_dir)
    if m.task == "charlm":
        return eval_charlm(m, sess, data)
    if m.task == "sentiment":
        return eval_sentiment(m, sess, data)
    return eval_forecast(m, sess, data)


def sample(model_dir: Path, prompt: str, length: int, temperature: float, top_k: int, seed: int) -> str:
    """Char LM sampling from the ONNX model: feed the prompt once, then one char at a time carrying state."""
    m, sess = _session(model_dir)
    if m.task != "charlm" or m.tokenizer is None:
        raise DataError(f"{model_dir}: sampling needs a charlm model, this one is {m.task!r}")
    enc, rng = Encoder(m.tokenizer), np.random.default_rng(seed)
    ids = enc.encode(prompt or "\n", field="prompt")[None, :]
    feeds: dict[str, Any] = {"input_ids": ids, **zero_states(m, 1)}
    out: list[int] = []
    for _ in range(length):
        logits, *state = sess.run(None, feeds)
        z = logits[0, -1].astype(np.float64)
        if temperature <= 0:
            nxt = int(z.argmax())
        else:
            z = z / temperature
            if top_k > 0:
                z[z < np.sort(z)[-top_k]] = -np.inf
            p = np.exp(z - z.max())
            nxt = int(rng.choice(len(p), p=p / p.sum()))
        out.append(nxt)
        feeds = {"input_ids": np.array([[nxt]], np.int64), **{s.input: v for s, v in zip(m.states, state, strict=True)}}
    return prompt + enc.decode(out)
