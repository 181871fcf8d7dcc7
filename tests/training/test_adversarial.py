"""Adversarial training of the sentiment net's word vectors (``--adversarial``; Miyato et al. 2017)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from service.core.manifest import MANIFEST_FILE, Manifest
from tests.training import fast
from tests.training.fast import TINY_SENTIMENT
from training.cli import main
from training.nets import NetConfig, SentimentNet, zero_state
from training.runners import SentimentRunner, adversarial_nudge

FAST = [*fast.FAST, *TINY_SENTIMENT, "--epochs", "1"]


def test_the_nudge_has_its_size_per_example_and_follows_the_gradient() -> None:
    torch.manual_seed(0)
    x, grad = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    grad[2] = 0.0  # an example the loss does not depend on
    r = adversarial_nudge(x, grad, 0.1)
    sizes = r.flatten(1).norm(dim=1)
    torch.testing.assert_close(sizes[:2], 0.1 * x[:2].flatten(1).norm(dim=1))
    assert sizes[2] == 0.0 and torch.isfinite(r).all()
    cos = F.cosine_similarity(r[:2].flatten(1), grad[:2].flatten(1), dim=1)
    torch.testing.assert_close(cos, torch.ones(2))


def _net_and_batch() -> tuple[SentimentNet, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = SentimentNet(NetConfig(task="sentiment", hidden=8, vocab=30, embedding=6, bidirectional=True, ensemble=2))
    ids = torch.randint(2, 30, (8, 7))
    lengths = torch.tensor([7, 5, 3, 7, 2, 6, 4, 1])
    ids[torch.arange(7).unsqueeze(0) >= lengths.unsqueeze(1)] = 0  # right padding
    return net, ids, lengths, torch.randint(0, 2, (8,))


def test_the_nudge_raises_the_loss_more_than_a_random_one_of_its_size() -> None:
    net, ids, lengths, y = _net_and_batch()
    net.eval()  # no dropout: the losses below differ only by the vectors
    state = zero_state(net, ids.shape[0])

    def loss(x: torch.Tensor) -> torch.Tensor:
        logits, _ = net.member_logits(x, lengths, *state)
        return F.cross_entropy(logits.flatten(0, 1), y.repeat(logits.shape[0]))

    x = net.lookup(ids)
    clean = loss(x)
    (grad,) = torch.autograd.grad(clean, x)
    r = adversarial_nudge(x.detach(), grad, 0.05)
    noise = adversarial_nudge(x.detach(), torch.randn_like(x) * (ids > 0).unsqueeze(2), 0.05)
    with torch.no_grad():
        adv, rand = loss(x.detach() + r), loss(x.detach() + noise)
    assert adv > clean and adv - clean > 3 * abs(rand - clean)


def test_the_runner_adds_the_nudged_loss_and_trains_the_vectors_through_it() -> None:
    net, ids, lengths, y = _net_and_batch()
    net.eval()  # the runner's loss without dropout: deterministic
    train = [(ids[i, : lengths[i]].numpy(), int(y[i])) for i in range(len(y))]
    plain = SentimentRunner(net, train, [], [], 16).loss((ids, lengths, y))
    adversarial = SentimentRunner(net, train, [], [], 16, adversarial=0.05)
    both = adversarial.loss((ids, lengths, y))
    assert both > 2 * plain  # clean + a loss above the clean one
    backward: Callable[[], None] = both.backward  # (torch leaves Tensor.backward unannotated)
    backward()
    assert net.embed.weight.grad is not None and net.embed.weight.grad[ids[0, 0]].abs().sum() > 0


@pytest.mark.slow
def test_train_sentiment_adversarially(tmp_path: Path, tiny_sst2: Path) -> None:
    out = tmp_path / "sentiment" / "1"
    args = ["sentiment", "--data", str(tiny_sst2), "--out", str(out), "--run-dir", str(tmp_path / "run"), *FAST]
    assert main([*args, "--adversarial", "0.05"]) == 0
    m = Manifest.load(out / MANIFEST_FILE)
    assert m.training["adversarial"] == 0.05 and "--adversarial 0.05" in m.training["command"]
    assert m.training["blank_dropout"] == 0.0  # no frozen features: nothing is blanked


def test_a_negative_adversarial_size_is_refused(
    tmp_path: Path, tiny_sst2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sentiment" / "1"
    assert main(["sentiment", "--data", str(tiny_sst2), "--out", str(out), "--adversarial", "-0.1", *FAST]) == 2
    assert "argument --adversarial: must be >= 0, got -0.1" in capsys.readouterr().err and not out.exists()
