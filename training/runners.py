"""Per-task batches, losses and validation for ``training.train.fit`` (the ``Runner`` protocol)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.core.arrays import right_pad
from training.data import FloatArray, IntArray, char_streams
from training.nets import SentimentNet, State, zero_state
from training.series import windows


class CharLMRunner:
    """Truncated BPTT: B parallel contiguous streams, windows of ``bptt`` chars, state carried across consecutive
    windows and detached between them (gradients stop at the window edge, the memory does not)."""

    metric = "val_loss"
    higher_is_better = False

    def __init__(self, net: nn.Module, train: IntArray, val: IntArray, bptt: int, device: str = "cpu") -> None:
        self.net, self.train, self.val, self.bptt, self.device = net, train, val, bptt, device
        self.state: State = ()

    def steps_per_epoch(self, batch_size: int) -> int:
        return (len(self.train) // batch_size - 1) // self.bptt

    @staticmethod
    def chars_for_one_step(batch_size: int, bptt: int) -> int:
        """Train characters an epoch needs for one step whatever its random start (``epoch``: an offset below
        ``bptt``, then ``batch_size`` streams of ``bptt + 1``)."""
        return batch_size * (bptt + 1) + bptt - 1

    def epoch(self, batch_size: int, rng: np.random.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        offset = int(rng.integers(0, self.bptt))  # window edges move every epoch
        streams = torch.from_numpy(char_streams(self.train[offset:], batch_size)).to(self.device)  # (B, N)
        self.state = tuple(s.to(self.device) for s in zero_state(self.net, batch_size))
        for i in range(0, streams.shape[1] - 1 - self.bptt + 1, self.bptt):
            yield streams[:, i : i + self.bptt], streams[:, i + 1 : i + 1 + self.bptt]

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch  # (B, T) each; y is x shifted by one char
        logits, *state = self.net(x, *self.state)  # (B, T, V)
        self.state = tuple(s.detach() for s in state)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def evaluate(self) -> dict[str, float]:
        nats = char_nll(lambda x, st: self.net(x, *st), self.val, zero_state(self.net, VAL_STREAMS), self.device)
        return {"val_loss": nats}


VAL_STREAMS = 32  # validation text is cut into this many contiguous streams, state carried within each
VAL_CHUNK = 512


def char_nll(step: object, ids: IntArray, state0: State, device: str = "cpu") -> float:
    """Mean next-char NLL (nats) over ``ids`` split into len(state0[0][0]) streams with carried state.

    ``step(x (B, T) tensor, state tuple) -> (logits (B, T, V), *state)``. Shared by training and the ONNX
    evaluator so both report the same number.
    """
    streams = torch.from_numpy(char_streams(ids, state0[0].shape[1])).to(device)  # (B, N)
    state = tuple(s.to(device) for s in state0)
    total, count = 0.0, 0
    for i in range(0, streams.shape[1] - 1, VAL_CHUNK):
        x = streams[:, i : min(i + VAL_CHUNK, streams.shape[1] - 1)]
        y = streams[:, i + 1 : i + 1 + x.shape[1]]
        logits, *st = step(x, state)  # type: ignore[operator]
        state = tuple(st)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        count += y.numel()
    return total / count


class SentimentRunner:
    """Length-bucketed batches of (ids, lengths, label); selection on a slice held out from train."""

    metric = "heldout_accuracy"
    higher_is_better = True

    def __init__(
        self,
        net: nn.Module,
        train: list[tuple[IntArray, int]],
        heldout: list[tuple[IntArray, int]],
        dev: list[tuple[IntArray, int]],
        max_length: int,
        device: str = "cpu",
        word_dropout: float = 0.0,
        blank_dropout: float = 0.0,
        adversarial: float = 0.0,
    ) -> None:
        self.net, self.train, self.heldout, self.dev = net, train, heldout, dev
        self.max_length, self.device, self.word_dropout = max_length, device, word_dropout
        self.blank_dropout = blank_dropout  # chance a word keeps only its pretrained (+ sub-word) vector
        self.adversarial = adversarial  # relative size of the adversarial nudge of the word vectors (0 = off)

    def steps_per_epoch(self, batch_size: int) -> int:
        return (len(self.train) + batch_size - 1) // batch_size

    def _tensors(self, items: list[tuple[IntArray, int]]) -> tuple[Tensor, Tensor, Tensor]:
        ids, lengths = right_pad([s[: self.max_length] for s, _ in items], pad=0)
        y = torch.tensor([lab for _, lab in items])
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(lengths).to(self.device), y.to(self.device)

    def epoch(self, batch_size: int, rng: np.random.Generator) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = rng.permutation(len(self.train))
        # Sort within chunks of 50 batches by length: little padding, still random batches.
        chunk = 50 * batch_size
        batches = []
        for c in range(0, len(order), chunk):
            part = sorted(order[c : c + chunk], key=lambda i: len(self.train[i][0]))
            batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
        for j in rng.permutation(len(batches)):
            yield self._tensors([self.train[i] for i in batches[j]])

    def loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        ids, lengths, y = batch
        if self.word_dropout > 0:  # replace random words by unk (id 1): teaches the model to read around unknowns
            drop = (torch.rand(ids.shape, device=ids.device) < self.word_dropout) & (ids > 0)
            ids = ids.masked_fill(drop, 1)
        blank = None
        if self.blank_dropout > 0:  # teaches the model to read words it will only know from GloVe
            blank = (torch.rand(ids.shape, device=ids.device) < self.blank_dropout) & (ids > 1)
        net = self.net
        assert isinstance(net, SentimentNet)
        state = zero_state(net, ids.shape[0])
        x = net.lookup(ids, blank)  # (B, T, W)

        def members_loss(vectors: Tensor) -> Tensor:
            logits, _ = net.member_logits(vectors, lengths, *state)  # (K, B, 2)
            return F.cross_entropy(logits.flatten(0, 1), y.repeat(logits.shape[0]))  # each member on its own

        loss = members_loss(x)
        if self.adversarial > 0:  # Miyato et al. 2017: also fit the vectors nudged where the loss rises fastest
            (grad,) = torch.autograd.grad(loss, x, retain_graph=True)
            loss = loss + members_loss(x + adversarial_nudge(x.detach(), grad, self.adversarial))
        return loss

    def logits(self, items: list[tuple[IntArray, int]]) -> tuple[Tensor, Tensor]:
        """Ensemble logits (N, 2) and labels (N,) of ``items``, in batches of 256 (call under no_grad)."""
        out, ys = [], []
        for i in range(0, len(items), 256):
            ids, lengths, y = self._tensors(items[i : i + 256])
            out.append(self.net(ids, lengths, *zero_state(self.net, ids.shape[0]))[0])
            ys.append(y)
        return torch.cat(out), torch.cat(ys)

    def _score(self, items: list[tuple[IntArray, int]]) -> tuple[float, float]:
        logits, y = self.logits(items)
        return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))

    def evaluate(self) -> dict[str, float]:
        acc, loss = self._score(self.heldout)
        dev_acc, _ = self._score(self.dev)  # reported only; never used for selection
        return {"heldout_accuracy": acc, "val_loss": loss, "dev_accuracy": dev_acc}


def adversarial_nudge(x: Tensor, grad: Tensor, eps: float) -> Tensor:
    """Per example b of x (B, T, W): eps * ||x_b|| * grad_b / ||grad_b|| (norms over T and W), the first-order
    worst perturbation of that size. Relative to the example's own vectors, which are not normalized (Miyato et al.
    normalize the embeddings and use an absolute eps)."""
    size = x.flatten(1).norm(dim=1) * eps / grad.flatten(1).norm(dim=1).clamp(min=1e-12)  # (B,)
    nudge: Tensor = grad * size.view(-1, 1, 1)
    return nudge


class ForecastRunner:
    """Every stride-1 (window, horizon) pair of the z-scored train split; MSE loss over the target channels;
    selection on validation MSE. ``targets`` = indices of the forecast channels (None = all)."""

    metric = "val_mse"
    higher_is_better = False

    def __init__(
        self,
        net: nn.Module,
        train: FloatArray,
        val: FloatArray,
        window: int,
        horizon: int,
        device: str = "cpu",
        targets: list[int] | None = None,
    ) -> None:
        self.net, self.device = net, device
        self.x, self.y = (torch.from_numpy(a).to(device) for a in windows(train, window, horizon, targets))
        self.vx, self.vy = (torch.from_numpy(a).to(device) for a in windows(val, window, horizon, targets))

    def to(self, device: str) -> None:
        self.device = device
        self.x, self.y, self.vx, self.vy = (t.to(device) for t in (self.x, self.y, self.vx, self.vy))

    def steps_per_epoch(self, batch_size: int) -> int:
        return (len(self.x) + batch_size - 1) // batch_size

    def epoch(self, batch_size: int, rng: np.random.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.from_numpy(rng.permutation(len(self.x)))
        for i in range(0, len(order), batch_size):
            j = order[i : i + batch_size]
            yield self.x[j], self.y[j]

    def predict(self, x: Tensor) -> Tensor:
        """x (N, L, F) -> point forecasts (N, H, T), in chunks of 512 windows."""
        out = [self.net(x[i : i + 512], *zero_state(self.net, len(x[i : i + 512])))[0] for i in range(0, len(x), 512)]
        return torch.cat(out)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        pred, *_ = self.net(x, *zero_state(self.net, x.shape[0]))
        return F.mse_loss(pred, y)

    def evaluate(self) -> dict[str, float]:
        pred = self.predict(self.vx)
        return {"val_mse": float(F.mse_loss(pred, self.vy)), "val_mae": float((pred - self.vy).abs().mean())}
