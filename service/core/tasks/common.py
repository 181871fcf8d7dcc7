"""What every task needs: the served model version (manifest, runtime, batcher, tokenizer) and small math."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from service.core.batching import Batcher
from service.core.manifest import Manifest
from service.core.runtime import Runtime
from service.core.tokenizers import Encoder
from service.errors import InvalidInput

F64 = npt.NDArray[np.float64]


class ForecastArrays(NamedTuple):
    """A forecaster manifest's numbers as float32 arrays, converted once per model, not per request."""

    mean: npt.NDArray[np.float32]  # (features,)
    std: npt.NDArray[np.float32]  # (features,)
    quantile_offsets: npt.NDArray[np.float32]  # (quantiles, horizon, features), z-scored; (0,) when absent


@dataclass
class Served:
    """A ready model version as the tasks see it."""

    name: str
    version: int
    manifest: Manifest
    runtime: Runtime
    batcher: Batcher
    encoder: Encoder | None

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"

    @cached_property
    def forecast_arrays(self) -> ForecastArrays:
        norm, spec = self.manifest.normalization, self.manifest.forecast
        assert norm is not None and spec is not None, f"{self.label} is not a forecaster"
        return ForecastArrays(
            mean=np.asarray(norm.mean, dtype=np.float32),
            std=np.asarray(norm.std, dtype=np.float32),
            quantile_offsets=np.asarray(spec.quantile_offsets, dtype=np.float32),
        )


def log_softmax(logits: npt.NDArray[np.floating], axis: int = -1) -> F64:
    """Numerically stable log-probabilities, float64 so sums over many characters stay exact enough."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    out: F64 = z - np.log(np.exp(z).sum(axis=axis, keepdims=True))
    return out


def softmax(logits: npt.NDArray[np.floating], axis: int = -1) -> F64:
    out: F64 = np.exp(log_softmax(logits, axis))
    return out


def check_int(value: int, field: str, lo: int, hi: int, hint: str = "") -> None:
    if not lo <= value <= hi:
        raise InvalidInput(f"{field} must be between {lo} and {hi}{hint}; got {value}")


def check_float(value: float, field: str, lo: float, hi: float) -> None:
    if not math.isfinite(value) or not lo <= value <= hi:
        raise InvalidInput(f"{field} must be a finite number between {lo:g} and {hi:g}; got {value}")


def check_text(text: str, field: str, max_chars: int, allow_empty: bool = False) -> None:
    if not allow_empty and not text.strip():
        raise InvalidInput(f"{field} is empty; send at least one non-blank character")
    if len(text) > max_chars:
        raise InvalidInput(f"{field} has {len(text)} characters; the limit is {max_chars} (max_chars_per_text)")
