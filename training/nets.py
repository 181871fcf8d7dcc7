"""Recurrent networks: a cell-agnostic encoder, the three task heads, and a plain-math Elman reference cell.

Recurrent state is always a tuple of tensors shaped (layers * directions, batch, hidden): ``(h,)`` for
RNN/GRU, ``(h, c)`` for LSTM. That is the layout ONNX exports with explicit state I/O and that serving batches
on axis 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.core.arrays import zero_states
from service.core.manifest import StateSpec

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
REVIN = ("last", "mean", "meanstd")  # forecaster: how each window is re-referenced inside the graph
State = tuple[Tensor, ...]


def make_rnn(cell: str, input_size: int, hidden: int, layers: int = 1, dropout: float = 0.0) -> nn.RNNBase:
    """A native unidirectional torch RNN picked by name (exports to native ONNX RNN/LSTM/GRU nodes)."""
    drop = dropout if layers > 1 else 0.0  # torch warns about dropout on a single layer
    if cell == "lstm":
        return nn.LSTM(input_size, hidden, layers, batch_first=True, dropout=drop)
    if cell == "gru":
        return nn.GRU(input_size, hidden, layers, batch_first=True, dropout=drop)
    if cell in ("rnn_tanh", "rnn_relu"):
        return nn.RNN(input_size, hidden, layers, nonlinearity=cell[4:], batch_first=True, dropout=drop)
    raise ValueError(f"cell: unknown recurrent cell {cell!r}; choose one of {', '.join(CELLS)}")


def state_names(cell: str) -> list[str]:
    """Logical state names: LSTM carries (h, c), the others only h."""
    return ["h", "c"] if cell == "lstm" else ["h"]


def _run(rnn: nn.Module, x: Tensor, state: State) -> tuple[Tensor, State]:
    assert isinstance(rnn, nn.RNNBase)
    if isinstance(rnn, nn.LSTM):
        out, (h, c) = rnn(x, (state[0], state[1]))
        return out, (h, c)
    out, h = rnn(x, state[0])
    return out, (h,)


def reverse_padded(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each sequence of x (B, T, C) within its own length; padding stays in place. Self-inverse."""
    t = torch.arange(x.shape[1], device=x.device).unsqueeze(0)  # (1, T)
    n = lengths.unsqueeze(1)  # (B, 1)
    idx = torch.where(t < n, n - 1 - t, t)  # (B, T)
    return torch.gather(x, 1, idx.unsqueeze(2).expand(-1, -1, x.shape[2]))


class RecurrentEncoder(nn.Module):
    """RNN/LSTM/GRU over (B, T, C) batch-first input, any number of layers, optional bidirectional.

    Bidirectional runs, per layer, a forward RNN and a backward RNN over a *length-aware* reversed copy, so
    right-padding never reaches a valid position in either direction (a padded text's result is exact).
    """

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden: int,
        layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers: must be >= 1, got {layers}")
        self.cell, self.hidden, self.layers = cell, hidden, layers
        self.directions = 2 if bidirectional else 1
        self.dropout = nn.Dropout(dropout)
        if bidirectional:
            mods: list[nn.RNNBase] = []
            for i in range(layers):
                size = input_size if i == 0 else 2 * hidden
                mods += [make_rnn(cell, size, hidden), make_rnn(cell, size, hidden)]
            self.rnns = nn.ModuleList(mods)  # [l0 fwd, l0 bwd, l1 fwd, ...], torch's state order
        else:
            self.rnns = nn.ModuleList([make_rnn(cell, input_size, hidden, layers, dropout)])

    def zero_state(self, batch: int, device: torch.device | None = None) -> State:
        shape = (self.layers * self.directions, batch, self.hidden)
        return tuple(torch.zeros(shape, device=device) for _ in state_names(self.cell))

    def forward(self, x: Tensor, state: State, lengths: Tensor | None = None) -> tuple[Tensor, State]:
        """x (B, T, C), state each (L*D, B, H) -> out (B, T, D*H), new state each (L*D, B, H)."""
        if self.directions == 1:
            return _run(self.rnns[0], x, state)
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        finals: list[State] = []
        for i in range(self.layers):
            if i > 0:
                x = self.dropout(x)
            fwd, sf = _run(self.rnns[2 * i], x, tuple(s[2 * i : 2 * i + 1] for s in state))
            bwd, sb = _run(
                self.rnns[2 * i + 1], reverse_padded(x, lengths), tuple(s[2 * i + 1 : 2 * i + 2] for s in state)
            )
            x = torch.cat([fwd, reverse_padded(bwd, lengths)], dim=2)  # (B, T, 2H)
            finals += [sf, sb]
        new_state = tuple(torch.cat([f[k] for f in finals], dim=0) for k in range(len(state)))
        return x, new_state


@dataclass
class NetConfig:
    """Everything needed to rebuild a net (checkpoints carry it, nanoGPT-style)."""

    task: str  # "sentiment" | "charlm" | "forecast"
    cell: str = "lstm"
    hidden: int = 128
    layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    vocab: int = 0  # sentiment / charlm
    embedding: int = 64  # sentiment / charlm
    features: int = 7  # forecast
    window: int = 96  # forecast
    horizon: int = 96  # forecast
    segment: int = 12  # forecast: rows per encoder step
    revin: str = "last"  # forecast: per-window re-referencing, one of REVIN
    targets: list[int] | None = None  # forecast: indices of the forecast channels (None = all; others = covariates)
    linear: bool = False  # forecast: add a Linear(window -> horizon) path on the re-referenced history (NLinear-style)
    ensemble: int = 1  # sentiment: members averaged inside one graph
    subword_buckets: int = 0  # sentiment: hashed char n-gram buckets (0 = off); folded into the table at export
    glove: int = 0  # sentiment: dims of frozen pretrained word vectors beside the learned ones (0 = off)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SentimentNet(nn.Module):
    """ids (B, T) right-padded with 0, lengths (B,) -> logits (B, 2); mean+max pooling over valid steps.

    ``cfg.ensemble`` > 1 puts K encoders + heads over one shared embedding and averages their logits; each
    member is trained on its own loss (``member_logits``), so they differ only by initialization (a cheap ensemble
    inside one graph). Member k's state is rows [k*L*D, (k+1)*L*D) of the state tensors.

    A word's vector during training: its own learned vector (E), plus the mean of its hashed char n-grams when
    ``cfg.subword_buckets`` > 0, next to a frozen pretrained vector (``cfg.glove`` dims, e.g. GloVe) when
    ``cfg.glove`` > 0, so the encoders read E + glove dims. ``bake`` folds all of it into one plain
    ``nn.Embedding`` (optionally float16) before export: the graph is a Gather, and serving tokenizes as before.
    """

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.embedding + cfg.glove
        self.embed = nn.Embedding(cfg.vocab, cfg.embedding, padding_idx=0)
        self.encoders = nn.ModuleList(
            RecurrentEncoder(cfg.cell, width, cfg.hidden, cfg.layers, cfg.bidirectional, cfg.dropout)
            for _ in range(cfg.ensemble)
        )
        d = cfg.hidden * (2 if cfg.bidirectional else 1)
        self.drop = nn.Dropout(cfg.dropout)
        self.heads = nn.ModuleList(nn.Linear(2 * d, 2) for _ in range(cfg.ensemble))
        # Optional fastText-style sub-word vectors: word vector = own vector + mean of its hashed char n-grams.
        self.subword: nn.EmbeddingBag | None = None
        if cfg.subword_buckets > 0:
            self.subword = nn.EmbeddingBag(cfg.subword_buckets + 1, cfg.embedding, mode="mean", padding_idx=0)
            self.register_buffer("ngram_ids", torch.zeros(cfg.vocab, 1, dtype=torch.long))  # (V, N), 0 = none
        self.glove: Tensor | None
        # A buffer, not a parameter: frozen (and saved in checkpoints).
        self.register_buffer("glove", torch.zeros(cfg.vocab, cfg.glove) if cfg.glove > 0 else None)

    def set_ngrams(self, ngram_ids: Tensor) -> None:
        """(V, N) bucket ids (1-based, 0 = padding) of every vocab word's char n-grams."""
        self.ngram_ids = ngram_ids.to(self.embed.weight.device)

    def set_glove(self, table: Tensor, learned_rows: int, init: bool = False) -> None:
        """(V, glove) pretrained vectors. Rows from ``learned_rows`` on are words never seen in training: their own
        vector starts (and, never receiving a gradient, stays) at zero, so they read as GloVe (+ sub-words) only.
        ``init``: the train words' own vectors start from their GloVe vector (first dims) instead of noise."""
        assert self.glove is not None, "cfg.glove is 0"
        self.glove = table.to(self.embed.weight.device)
        with torch.no_grad():
            if init:
                k = min(table.shape[1], self.embed.weight.shape[1])
                known = table[:learned_rows, :k].abs().sum(dim=1) > 0  # train words GloVe knows
                self.embed.weight[:learned_rows, :k][known] = table[:learned_rows, :k][known]
            self.embed.weight[learned_rows:] = 0.0

    def table(self) -> Tensor:
        """The (V, E [+ glove]) word-vector table actually used."""
        table = self.embed.weight if self.subword is None else self.embed.weight + self.subword(self.ngram_ids)
        return table if self.glove is None else torch.cat([table, self.glove], dim=1)

    def bake(self, half: bool = False) -> None:
        """Fold sub-word and pretrained vectors into one plain ``embed`` (float16 if ``half``: half the bytes; the
        graph casts looked-up rows back to float32) and drop them."""
        with torch.no_grad():
            table = self.table().detach().clone()
        self.embed = nn.Embedding(table.shape[0], table.shape[1], padding_idx=0, _weight=table).to(table.device)
        if half:
            self.embed.half()
        self.subword, self.glove = None, None

    def lookup(self, ids: Tensor, blank: Tensor | None = None) -> Tensor:
        """ids (B, T) -> vectors (B, T, E [+ glove]) float32. ``blank`` (B, T) bool, training only: those words
        lose their own vector (sub-words and GloVe stay), as a word never seen in training would."""
        if self.subword is None and self.glove is None and blank is None:
            vectors: Tensor = self.embed(ids)
            return vectors.float()
        uniq, inv = torch.unique(ids, return_inverse=True)  # the batch's distinct words only
        own = self.embed(uniq)  # (U, E)
        vec = own if self.subword is None else own + self.subword(self.ngram_ids[uniq])
        emb = vec[inv]  # (B, T, E)
        if blank is not None:
            emb = emb - own[inv] * blank.unsqueeze(2).to(emb.dtype)
        return emb if self.glove is None else torch.cat([emb, self.glove[ids]], dim=2)

    def member_logits(self, vectors: Tensor, lengths: Tensor, *state: Tensor) -> tuple[Tensor, State]:
        """Looked-up word vectors (B, T, E [+ glove]) (``lookup``; training may blank or nudge them) -> logits
        (K, B, 2) of every member, new state (K*L*D, B, H) each."""
        x = self.drop(vectors)
        mask = (torch.arange(x.shape[1], device=x.device).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(2)
        n = lengths.clamp(min=1).unsqueeze(1).to(x.dtype)  # (B, 1)
        rows = state[0].shape[0] // len(self.encoders)
        logits, states = [], []
        for k, (enc, head) in enumerate(zip(self.encoders, self.heads, strict=True)):
            out, st = enc(x, tuple(s[k * rows : (k + 1) * rows] for s in state), lengths)  # (B, T, D)
            mean = (out * mask).sum(dim=1) / n  # (B, D)
            mx = out.masked_fill(~mask, -1e4).amax(dim=1)  # (B, D)
            logits.append(head(self.drop(torch.cat([mean, mx], dim=1))))  # (B, 2)
            states.append(st)
        new_state = tuple(torch.cat([st[i] for st in states], dim=0) for i in range(len(state)))
        return torch.stack(logits), new_state

    def scale_logits(self, temperature: float) -> None:
        """Divide every head by ``temperature`` (temperature scaling folded into the weights: logits / T)."""
        with torch.no_grad():
            for head in self.heads:
                assert isinstance(head, nn.Linear)
                head.weight.div_(temperature)
                head.bias.div_(temperature)

    def forward(self, ids: Tensor, lengths: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        logits, new_state = self.member_logits(self.lookup(ids), lengths, *state)
        return (logits.mean(dim=0), *new_state)


class CharLM(nn.Module):
    """ids (B, T), state -> logits (B, T, V), new state. Unidirectional so state can be carried forward."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.embedding)
        self.encoder = RecurrentEncoder(cfg.cell, cfg.embedding, cfg.hidden, cfg.layers, False, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden, cfg.vocab)

    def forward(self, ids: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        out, new_state = self.encoder(self.drop(self.embed(ids)), state)  # (B, T, H)
        return (self.head(self.drop(out)), *new_state)


class Forecaster(nn.Module):
    """Channel-independent segment RNN: history (B, L, F) z-scored -> forecast (B, H, T) z-scored, T = targets.

    Per window and channel (inside the graph, so serving sends plain z-scored rows) the history is re-referenced
    (``cfg.revin``): "last" subtracts the last value, "mean" the window mean, "meanstd" also divides by the window
    std (RevIN without affine weights); the forecast is mapped back the same way. Each channel's window is then
    cut into L/S segments of S rows, embedded by Linear(S->hidden)+ReLU and fed to the RNN (a window of 96 rows
    costs 8 recurrent steps); Linear(hidden->horizon) reads the last hidden state. ``cfg.linear`` adds
    Linear(window->horizon) over the re-referenced history itself (a linear skip: seasonal patterns by index).
    Covariates (``cfg.targets`` a strict subset of the F channels) are encoded like the targets and reach the
    targets' heads through ``mix``: Linear(F*hidden -> hidden) over every channel's final state.
    State is (layers, B*F, hidden): every channel of every series is its own sequence.
    """

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        if cfg.window % cfg.segment:
            raise ValueError(f"window: {cfg.window} must be a multiple of segment {cfg.segment}")
        if cfg.revin not in REVIN:
            raise ValueError(f"revin: unknown mode {cfg.revin!r}; choose one of {', '.join(REVIN)}")
        targets = cfg.targets if cfg.targets is not None else list(range(cfg.features))
        if not targets or sorted(set(targets)) != targets or targets[-1] >= cfg.features or targets[0] < 0:
            raise ValueError(f"targets: {targets} must be increasing channel indices below features={cfg.features}")
        self.cfg = cfg
        self.targets = targets
        self.embed = nn.Linear(cfg.segment, cfg.hidden)
        self.encoder = RecurrentEncoder(cfg.cell, cfg.hidden, cfg.hidden, cfg.layers, False, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden, cfg.horizon)
        self.linear = nn.Linear(cfg.window, cfg.horizon) if cfg.linear else None
        if self.linear is not None:  # starts as "no change from the reference"; learns what the RNN misses
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        covariates = len(targets) < cfg.features
        self.mix = nn.Linear(cfg.features * cfg.hidden, cfg.hidden) if covariates else None

    def forward(self, history: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        b, _, f = history.shape
        x = history.permute(0, 2, 1).reshape(b * f, -1)  # (B*F, L)
        ref = x[:, -1:] if self.cfg.revin == "last" else x.mean(dim=1, keepdim=True)  # (B*F, 1)
        scale = torch.sqrt(x.var(dim=1, unbiased=False, keepdim=True) + 1e-5) if self.cfg.revin == "meanstd" else None
        x = x - ref
        if scale is not None:
            x = x / scale
        seg = x.reshape(b * f, -1, self.cfg.segment)  # (B*F, L/S, S)
        out, new_state = self.encoder(F.relu(self.embed(seg)), state)  # (B*F, L/S, hidden)
        last = out[:, -1].reshape(b, f, -1)  # (B, F, hidden)
        mixed = last[:, self.targets]  # (B, T, hidden)
        if self.mix is not None:
            mixed = mixed + self.mix(last.reshape(b, -1)).unsqueeze(1)
        y = self.head(self.drop(mixed))  # (B, T, horizon)
        if self.linear is not None:
            y = y + self.linear(x[:, -self.cfg.window :]).reshape(b, f, -1)[:, self.targets]
        if scale is not None:
            y = y * scale.reshape(b, f, 1)[:, self.targets]
        y = y + ref.reshape(b, f, 1)[:, self.targets]
        return (y.permute(0, 2, 1), *new_state)  # (B, horizon, T)


def build_net(cfg: NetConfig, seed: int | None = None) -> nn.Module:
    """The net ``cfg`` describes; with ``seed``, its initial weights are drawn from torch's generator seeded with it
    (training passes its ``--seed``: the same command then starts from the same weights)."""
    if cfg.cell not in CELLS:
        raise ValueError(f"cell: unknown recurrent cell {cfg.cell!r}; choose one of {', '.join(CELLS)}")
    if seed is not None:
        torch.manual_seed(seed)
    if cfg.task == "sentiment":
        return SentimentNet(cfg)
    if cfg.task == "charlm":
        return CharLM(cfg)
    if cfg.task == "forecast":
        return Forecaster(cfg)
    raise ValueError(f"task: unknown task {cfg.task!r}; choose sentiment, charlm or forecast")


def state_specs(cfg: NetConfig) -> list[StateSpec]:
    """The manifest's state tensors: ``[layers * directions (* ensemble), rows, hidden]``, rows = "batch", or
    "batch*features" for the forecaster (every channel of every series is its own sequence)."""
    rows = "batch*features" if cfg.task == "forecast" else "batch"
    first = cfg.ensemble * cfg.layers * (2 if cfg.bidirectional else 1) if cfg.task == "sentiment" else cfg.layers
    return [
        StateSpec(name=n, input=f"{n}0", output=f"{n}n", shape=[first, rows, cfg.hidden]) for n in state_names(cfg.cell)
    ]


def zero_state(net: nn.Module, batch: int) -> State:
    """Zero recurrent state for ``batch`` sequences: serving's ``zero_states`` of the same specs, as tensors."""
    cfg: NetConfig = net.cfg  # type: ignore[assignment]
    device = next(net.parameters()).device
    zeros = zero_states(state_specs(cfg), {"batch": batch, "features": cfg.features})
    return tuple(torch.from_numpy(z).to(device) for z in zeros.values())


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


class ElmanCell:
    """Plain-math reference: ``h_t = f(W_xh x_t + W_hh h_{t-1} + b_h)``, ``y_t = g(W_hy h_t + b_y)``.

    Written with explicit matrix products so it can be checked against torch.nn.RNN with copied weights
    (torch has two biases, b_ih + b_hh, whose sum is b_h).
    """

    def __init__(
        self,
        w_xh: Tensor,
        w_hh: Tensor,
        b_h: Tensor,
        w_hy: Tensor | None = None,
        b_y: Tensor | None = None,
        f: str = "tanh",
        g: str = "identity",
    ) -> None:
        acts: dict[str, Callable[[Tensor], Tensor]] = {
            "tanh": torch.tanh,
            "relu": torch.relu,
            "identity": lambda t: t,
            "sigmoid": torch.sigmoid,
        }
        if f not in acts or g not in acts:
            raise ValueError(f"activation: choose from {sorted(acts)}, got f={f!r}, g={g!r}")
        self.w_xh, self.w_hh, self.b_h, self.w_hy, self.b_y = w_xh, w_hh, b_h, w_hy, b_y
        self.f, self.g = acts[f], acts[g]

    def run(self, xs: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
        """xs (T, input), h0 (hidden,) -> hs (T, hidden), ys (T, out) (= hs when there is no output layer)."""
        h, hs, ys = h0, [], []
        for x in xs:
            h = self.f(self.w_xh @ x + self.w_hh @ h + self.b_h)
            hs.append(h)
            if self.w_hy is not None:
                b_y = self.b_y if self.b_y is not None else torch.zeros(self.w_hy.shape[0])
                ys.append(self.g(self.w_hy @ h + b_y))
            else:
                ys.append(h)
        return torch.stack(hs), torch.stack(ys)
