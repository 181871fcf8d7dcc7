"""The contract between training and serving: `models/<name>/<version>/manifest.json`.

Training writes it (``training/export.py``) next to ``model.onnx``; serving reads and validates it
(``service/core/registry.py``). This module imports neither torch nor grpc so both sides can share it.

Tensor shapes use ints for fixed sizes and strings for symbolic (dynamic) axes, e.g.
``["batch", "time"]`` or ``[2, "batch", 512]``. What each task needs beyond this generic schema (a tokenizer,
labels, normalization...) is checked by the task itself at load (``service/core/tasks``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
# A version folder (models/NAME/N) the registry loads, and the training CLI writes: 1 to 999999999, no leading zero.
VERSION_FOLDER = re.compile(r"[1-9][0-9]{0,8}")
VERSION_RULE = "a whole number from 1 to 999999999, at most 9 digits without a leading zero"  # VERSION_FOLDER, said

Cell = Literal["rnn_tanh", "rnn_relu", "lstm", "gru"]
DType = Literal["float32", "int64", "int32", "bool"]
Dim = int | str


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One named graph input or output."""

    name: str
    dtype: DType
    shape: list[Dim]
    description: str = ""


class StateSpec(_Strict):
    """A recurrent state carried between calls: fed as ``input``, returned as ``output``.

    ``shape`` is ``[layers * directions, "batch", hidden]``; batching concatenates on axis 1.
    """

    name: str  # logical name, e.g. "h" or "c"
    input: str  # graph input name, e.g. "h0"
    output: str  # graph output name, e.g. "hn"
    shape: list[Dim]
    dtype: DType = "float32"


class Architecture(_Strict):
    cell: Cell
    layers: int = Field(ge=1)
    hidden: int = Field(ge=1)
    directions: Literal[1, 2] = 1
    embedding: int | None = None
    dropout: float = 0.0
    parameters: int = Field(ge=0, description="Trainable parameter count.")
    notes: str = ""


class Tokenizer(_Strict):
    """Index -> token table. ``kind="char"``: one token per character; ``kind="word"``: whitespace/punct words."""

    kind: Literal["char", "word"]
    vocab: list[str]
    unk_token: str | None = None
    pad_token: str | None = None
    lowercase: bool = False
    max_length: int | None = Field(
        default=None,
        description="Longest token sequence training fed the model (longer texts were cut there). A recurrent "
        "graph reads any length: serving does not cut or refuse longer texts.",
    )

    @model_validator(mode="after")
    def _unique(self) -> Tokenizer:
        seen: dict[str, int] = {}
        for i, token in enumerate(self.vocab):
            first = seen.setdefault(token, i)
            if first != i:  # (text maps to one of the two indices, and the other's answers are never read)
                raise ValueError(
                    f"tokenizer vocab lists {token!r} twice (entries {first} and {i}): each token needs one index; "
                    "copy the manifest from the model's own export"
                )
        return self


class Normalization(_Strict):
    """Per-feature z-score statistics from the training split: ``x_norm = (x - mean) / std``."""

    columns: list[str]
    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _same_length(self) -> Normalization:
        if not (len(self.columns) == len(self.mean) == len(self.std)):
            raise ValueError("normalization columns, mean and std must have the same length")
        if any(s <= 0 for s in self.std):
            raise ValueError("normalization std must be positive")
        return self


class ForecastSpec(_Strict):
    """How the forecaster consumes history and what it returns.

    ``state_mode="window"``: a session keeps the last ``window`` rows beside the state and re-runs the
    (short) encoder on every update; ``state_mode="recurrent"``: the recurrent state advances row by row.
    ``quantile_offsets[q][h][f]`` is added to the point forecast (normalized scale) for quantile ``quantiles[q]``,
    multiplied first by the window's ``scale_output`` when the graph has one.
    """

    window: int = Field(ge=1)
    horizon: int = Field(ge=1)
    features: int = Field(ge=1)
    state_mode: Literal["window", "recurrent"]
    update_cost: str = Field(description="What one Observe costs, in recurrent steps, e.g. '8 GRU steps'.")
    quantiles: list[float] = Field(default_factory=lambda: [0.1, 0.5, 0.9])
    quantile_offsets: list[list[list[float]]] = Field(default_factory=list)
    targets: list[str] = Field(
        default_factory=list,
        description="Columns the model forecasts, a subset of normalization.columns in the same order; empty = "
        "every column. The others are covariates: read from the history, never forecast. The graph's 'forecast' "
        "output and quantile_offsets then have len(targets) on their last axis.",
    )
    frequency: str | None = Field(default=None, description="Sampling interval of the rows, e.g. '1h', '15min', 'MS'.")
    time_column: str | None = Field(default=None, description="The CSV column holding timestamps, when there is one.")
    split: dict[str, list[int]] = Field(
        default_factory=dict,
        description="Rows [start, stop) of each split of the training data, e.g. {'test': [a, b]}.",
    )
    scale_output: str | None = Field(
        default=None,
        description="Name of a graph output shaped (batch, 1 or horizon, targets), z-scored units, > 0: a per-window "
        "scale (e.g. the recent volatility of each target) that multiplies quantile_offsets, so quantile q is "
        "point + quantile_offsets[q] * scale. None: the offsets are added as they are.",
    )
    adaptive_width_gamma: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Rate of a session's adaptive band width (service/core/intervals.py): quantile q becomes "
        "point + (mid + m * (quantile_offsets[q] - mid)) * scale, mid the median's offset, and after each observed row "
        "m *= exp(-gamma * (share of the revealed targets inside the outer band - its nominal share)), per target "
        "column, from m = 1. Needs quantile_offsets at an odd number of levels with 0.5 in the middle. None: the band "
        "stays as calibrated.",
    )

    @property
    def target_count(self) -> int:
        return len(self.targets) or self.features


class Metric(_Strict):
    name: str  # e.g. "accuracy", "val_loss_nats_per_char", "test_mse"
    value: float
    dataset: str
    split: str
    command: str = Field(description="Shell command that reproduces this number.")
    target: float | None = None
    higher_is_better: bool = True


class ModelCard(_Strict):
    """A short model card (Mitchell et al. 2019): what the model is for, what it was trained on, where it fails."""

    intended_use: str
    data: str = Field(description="Data set, its provenance and license.")
    license: str = Field(description="License of the model weights (and of anything folded into them).")
    limits: list[str] = Field(default_factory=list, description="Known limits, one per item.")


class Manifest(_Strict):
    name: str
    version: int = Field(ge=1)
    task: str = Field(
        pattern=r"^[a-z][a-z0-9_-]{0,63}$",
        description="The serving task that runs this model (service/core/tasks: sentiment, charlm, forecast, ...).",
    )
    description: str = ""
    architecture: Architecture
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    states: list[StateSpec]
    stateful: bool = Field(description="True when a returned state may be fed back to continue a sequence.")
    tokenizer: Tokenizer | None = None
    labels: list[str] | None = None
    normalization: Normalization | None = None
    forecast: ForecastSpec | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: list[Metric] = Field(default_factory=list)
    card: ModelCard | None = None
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int = Field(ge=17)
    torch_version: str
    onnx_version: str
    created_at: str

    @model_validator(mode="after")
    def _states_refer_to_tensors(self) -> Manifest:
        names = {t.name for t in self.inputs} | {t.name for t in self.outputs}
        for s in self.states:
            if s.input not in names or s.output not in names:
                raise ValueError(f"state {s.name!r} refers to unknown tensors {s.input!r}/{s.output!r}")
        return self

    def has_input(self, name: str) -> bool:
        return any(t.name == name for t in self.inputs)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        return cls.model_validate_json(path.read_text(encoding="utf-8"))

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """``load``, for a server: ValueError saying in one line what is wrong with the file (not JSON, not an
        object, the fields missing, each field that is not valid and what it held) instead of pydantic's report of
        a few lines per field."""
        text = path.read_text(encoding="utf-8")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc})") from None
        except RecursionError:
            raise ValueError("not JSON we read: its arrays or objects nest too deeply") from None
        if not isinstance(raw, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(raw), "a number")
            raise ValueError(f"a manifest is a JSON object, not {kind}")
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ValueError(problems(exc)) from None

    def dump(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def problems(exc: ValidationError, most: int = 5) -> str:
    """A manifest's validation errors in one line: the fields missing, named together, then each other one as
    ``where: what, got value`` (values cut at 40 characters), ``most`` of them, then how many more."""
    missing = [_where(e["loc"]) for e in exc.errors() if e["type"] == "missing"]
    said = [f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}"] if missing else []
    for e in exc.errors():
        if e["type"] == "missing":
            continue
        where = f"{_where(e['loc'])}: " if e["loc"] else ""
        if e["type"] == "value_error":  # a validator's own message ("normalization std must be positive")
            said.append(f"{where}{e['ctx']['error']}")
            continue
        got = json.dumps(e["input"], default=str)
        said.append(f"{where}{e['msg'][:1].lower()}{e['msg'][1:]}, got {got if len(got) <= 40 else got[:37] + '...'}")
    more = f"; and {len(said) - most} more" if len(said) > most else ""
    return "; ".join(said[:most]) + more


def _where(loc: tuple[int | str, ...]) -> str:
    """A field's place: ``inputs[0].dtype``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
