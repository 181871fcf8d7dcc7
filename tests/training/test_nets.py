"""Nets: cell selection, the Elman reference vs torch.nn.RNN, padding invariance, state continuation."""

from __future__ import annotations

import pytest
import torch

from training.nets import (
    CELLS,
    ElmanCell,
    NetConfig,
    RecurrentEncoder,
    SentimentNet,
    build_net,
    make_rnn,
    reverse_padded,
    zero_state,
)


def test_unknown_cell_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match=r"cell: unknown recurrent cell 'transformer'; choose one of rnn_tanh"):
        make_rnn("transformer", 4, 8)
    with pytest.raises(ValueError, match="cell"):
        build_net(NetConfig(task="charlm", cell="lstmm", vocab=10))
    with pytest.raises(ValueError, match="task"):
        build_net(NetConfig(task="translate", vocab=10))


@pytest.mark.parametrize("cell", CELLS)
def test_make_rnn_picks_native_module(cell: str) -> None:
    rnn = make_rnn(cell, 4, 8, layers=2, dropout=0.1)
    expected = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(cell, torch.nn.RNN)
    assert type(rnn) is expected and rnn.num_layers == 2
    if cell.startswith("rnn"):
        assert rnn.nonlinearity == cell[4:]


def test_elman_worked_example_relu() -> None:
    """Inputs [10, 20, 30], one hidden unit, h0=0, W_xh=0.5, W_hh=0.2, b_h=0.1, ReLU -> 5.1, 11.12, 17.324."""
    cell = ElmanCell(torch.tensor([[0.5]]), torch.tensor([[0.2]]), torch.tensor([0.1]), f="relu")
    hs, _ = cell.run(torch.tensor([[10.0], [20.0], [30.0]]), torch.zeros(1))
    assert hs.squeeze(1).tolist() == pytest.approx([5.1, 11.12, 17.324], abs=1e-5)
    # The same numbers from torch.nn.RNN with those weights copied in (b_h split over torch's two biases).
    rnn = torch.nn.RNN(1, 1, nonlinearity="relu", batch_first=True)
    with torch.no_grad():
        params = dict(rnn.named_parameters())
        params["weight_ih_l0"].fill_(0.5)
        params["weight_hh_l0"].fill_(0.2)
        params["bias_ih_l0"].fill_(0.1)
        params["bias_hh_l0"].fill_(0.0)
        out, _ = rnn(torch.tensor([[[10.0], [20.0], [30.0]]]), torch.zeros(1, 1, 1))
    assert out.flatten().tolist() == pytest.approx([5.1, 11.12, 17.324], abs=1e-5)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_elman_matches_torch_rnn_with_copied_weights(nonlinearity: str) -> None:
    torch.manual_seed(0)
    rnn = torch.nn.RNN(5, 7, nonlinearity=nonlinearity, batch_first=True)
    xs, h0 = torch.randn(9, 5), torch.randn(7)
    w: dict[str, torch.Tensor] = {k: v.detach() for k, v in rnn.named_parameters()}
    ref = ElmanCell(
        w["weight_ih_l0"],
        w["weight_hh_l0"],
        w["bias_ih_l0"] + w["bias_hh_l0"],
        w_hy=torch.eye(7),
        f=nonlinearity,
        g="identity",
    )
    hs, ys = ref.run(xs, h0)
    with torch.no_grad():
        out, hn = rnn(xs[None], h0[None, None])
    torch.testing.assert_close(hs, out[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ys, hs)
    torch.testing.assert_close(hn[0, 0], hs[-1], atol=1e-5, rtol=1e-5)


def test_reverse_padded_keeps_padding_and_is_self_inverse() -> None:
    x = torch.arange(10.0).reshape(2, 5, 1)
    lengths = torch.tensor([3, 5])
    r = reverse_padded(x, lengths)
    assert r[0, :, 0].tolist() == [2, 1, 0, 3, 4] and r[1, :, 0].tolist() == [9, 8, 7, 6, 5]
    assert torch.equal(reverse_padded(r, lengths), x)


@pytest.mark.parametrize("cell", CELLS)
def test_sentiment_result_does_not_depend_on_padding(cell: str) -> None:
    torch.manual_seed(0)
    net = build_net(
        NetConfig(task="sentiment", cell=cell, hidden=12, layers=2, bidirectional=True, vocab=30, embedding=6)
    )
    net.eval()
    text = torch.tensor([[5, 9, 3, 17]])
    with torch.no_grad():
        alone = net(text, torch.tensor([4]), *zero_state(net, 1))[0]
        padded = torch.zeros(3, 11, dtype=torch.long)
        padded[1, :4] = text
        padded[0, :11] = torch.randint(1, 30, (11,))
        padded[2, :2] = torch.tensor([4, 4])
        batch = net(padded, torch.tensor([11, 4, 2]), *zero_state(net, 3))[0]
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_bidirectional_encoder_matches_torch_bidirectional_without_padding(cell: str) -> None:
    """With full-length rows the length-aware encoder is exactly torch's bidirectional RNN."""
    torch.manual_seed(0)
    enc = RecurrentEncoder(cell, 4, 6, layers=2, bidirectional=True)
    ref: torch.nn.Module
    if cell == "lstm":
        ref = torch.nn.LSTM(4, 6, 2, batch_first=True, bidirectional=True)
    elif cell == "gru":
        ref = torch.nn.GRU(4, 6, 2, batch_first=True, bidirectional=True)
    else:
        ref = torch.nn.RNN(4, 6, 2, nonlinearity=cell[4:], batch_first=True, bidirectional=True)
    with torch.no_grad():
        for layer in range(2):
            for d, suffix in enumerate(["", "_reverse"]):
                mod = enc.rnns[2 * layer + d]
                for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(ref, f"{kind}_l{layer}{suffix}").copy_(getattr(mod, f"{kind}_l0"))
    x = torch.randn(3, 8, 4)
    state = tuple(torch.randn(4, 3, 6) for _ in range(2 if cell == "lstm" else 1))
    with torch.no_grad():
        out, new = enc(x, state)
        want, want_state = ref(x, state if cell == "lstm" else state[0])
    want_state = want_state if isinstance(want_state, tuple) else (want_state,)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(new, want_state, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_charlm_state_continues_a_sequence(cell: str) -> None:
    torch.manual_seed(0)
    net = build_net(NetConfig(task="charlm", cell=cell, hidden=8, layers=2, vocab=20, embedding=4)).eval()
    ids = torch.randint(0, 20, (2, 15))
    with torch.no_grad():
        whole = net(ids, *zero_state(net, 2))
        a = net(ids[:, :6], *zero_state(net, 2))
        b = net(ids[:, 6:], *a[1:])
    torch.testing.assert_close(torch.cat([a[0], b[0]], dim=1), whole[0], atol=1e-5, rtol=1e-5)


def test_forecaster_shapes_and_level_shift() -> None:
    torch.manual_seed(0)
    cfg = NetConfig(task="forecast", cell="gru", hidden=8, features=3, window=24, horizon=6, segment=6)
    net = build_net(cfg).eval()
    x = torch.randn(2, 24, 3)
    with torch.no_grad():
        y = net(x, *zero_state(net, 2))[0]
        shifted = net(x + 5.0, *zero_state(net, 2))[0]
    assert y.shape == (2, 6, 3)
    torch.testing.assert_close(shifted, y + 5.0, atol=1e-4, rtol=1e-4)  # last value subtracted / added back
    with pytest.raises(ValueError, match="window: 25 must be a multiple of segment 6"):
        build_net(NetConfig(task="forecast", window=25, segment=6))


def test_subwords_fold_into_a_plain_embedding() -> None:
    from training.data import ngram_table

    torch.manual_seed(0)
    vocab = ["<pad>", "<unk>", "good", "goodness", "bad"]
    cfg = NetConfig(task="sentiment", cell="gru", hidden=6, vocab=len(vocab), embedding=4, subword_buckets=50)
    net = build_net(cfg).eval()
    assert isinstance(net, SentimentNet)
    net.set_ngrams(torch.from_numpy(ngram_table(vocab, 50)))
    ids, lengths = torch.tensor([[2, 3, 4]]), torch.tensor([3])
    with torch.no_grad():
        before = net(ids, lengths, *zero_state(net, 1))[0]
        net.bake()
        after = net(ids, lengths, *zero_state(net, 1))[0]
    assert net.subword is None
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("revin", ["last", "mean", "meanstd"])
def test_forecaster_revin_maps_back_level_and_scale(revin: str) -> None:
    torch.manual_seed(0)
    cfg = NetConfig(task="forecast", cell="gru", hidden=8, features=2, window=12, horizon=4, segment=4, revin=revin)
    net = build_net(cfg).eval()
    x = torch.randn(3, 12, 2)
    with torch.no_grad():
        y = net(x, *zero_state(net, 3))[0]
        shifted = net(x + 4.0, *zero_state(net, 3))[0]
        scaled = net(3 * x, *zero_state(net, 3))[0]
    torch.testing.assert_close(shifted, y + 4.0, atol=1e-4, rtol=1e-4)  # every mode removes the level
    if revin == "meanstd":
        torch.testing.assert_close(scaled, 3 * y, atol=1e-3, rtol=1e-3)  # and this one the scale
    else:
        assert (scaled - 3 * y).abs().max() > 1e-3
    with pytest.raises(ValueError, match="revin: unknown mode 'max'"):
        build_net(NetConfig(task="forecast", window=12, segment=4, revin="max"))


def test_forecaster_covariates_feed_the_targets_only_through_mix() -> None:
    """targets=[2]: the output has one channel; changing a covariate's history changes it (covariates are used),
    and without covariates the channels stay independent."""
    torch.manual_seed(0)
    cov = build_net(NetConfig(task="forecast", cell="gru", hidden=8, features=3, window=12, horizon=4, segment=4,
                              targets=[2])).eval()  # fmt: skip
    x = torch.randn(2, 12, 3)
    x2 = x.clone()
    x2[:, :, 0] += torch.randn(2, 12)
    with torch.no_grad():
        y, y2 = cov(x, *zero_state(cov, 2))[0], cov(x2, *zero_state(cov, 2))[0]
    assert y.shape == (2, 4, 1) and (y - y2).abs().max() > 1e-4
    ind = build_net(NetConfig(task="forecast", cell="gru", hidden=8, features=3, window=12, horizon=4, segment=4))
    with torch.no_grad():
        a, b = ind.eval()(x, *zero_state(ind, 2))[0], ind(x2, *zero_state(ind, 2))[0]
    torch.testing.assert_close(a[:, :, 1:], b[:, :, 1:])  # channel-independent without covariates
    with pytest.raises(ValueError, match=r"targets: \[3\] must be increasing channel indices below features=3"):
        build_net(NetConfig(task="forecast", features=3, window=12, segment=4, targets=[3]))


def test_forecaster_linear_path_starts_at_zero() -> None:
    torch.manual_seed(0)
    cfg = NetConfig(task="forecast", cell="gru", hidden=8, features=2, window=12, horizon=4, segment=4, linear=True)
    net = build_net(cfg).eval()
    torch.manual_seed(0)
    plain = build_net(NetConfig(task="forecast", cell="gru", hidden=8, features=2, window=12, horizon=4, segment=4))
    x = torch.randn(2, 12, 2)
    with torch.no_grad():
        torch.testing.assert_close(net(x, *zero_state(net, 2))[0], plain.eval()(x, *zero_state(plain, 2))[0])
