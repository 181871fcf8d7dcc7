"""Per-task KServe v2 tensor contracts, and how a decoded request becomes one data-plane call.

sentiment   TEXT BYTES [-1]                          -> LABEL BYTES [-1], PROBABILITIES FP32 [-1, labels]
charlm      TEXT BYTES [1], NUM_CHARS INT32 [1] opt  -> NEXT_CHAR_PROBS FP32 [vocab], VOCAB BYTES [vocab],
                                                        COMPLETION BYTES [1]
forecast    HISTORY FP32 [-1, features]              -> FORECAST FP32 [horizon, features],
                                                        QUANTILES FP32 [quantiles, horizon, features]
With a sequence (charlm, forecast), ``session_id`` names the session that carries the state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from service.api.kserve_tensors import Tensor
from service.core.manifest import Manifest
from service.core.types import DataPlane, ModelRef
from service.errors import InvalidInput
from service.settings import Settings

Outputs = dict[str, tuple[str, npt.NDArray[Any] | list[bytes]]]  # name -> (datatype, value)


@dataclass(frozen=True)
class Result:
    outputs: Outputs
    inferences: int  # texts for sentiment, 1 otherwise (Triton's inference_count)
    steps: int | None = None  # characters (charlm) or rows (forecast) behind this answer, a sequence's total


@dataclass(frozen=True)
class TensorDef:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 = any size
    optional: bool = False

    def describe(self) -> str:
        return f"{self.name} ({self.datatype} {list(self.shape)})"


@dataclass(frozen=True)
class Contract:
    inputs: tuple[TensorDef, ...]
    outputs: tuple[TensorDef, ...]
    sequences: bool  # whether the model accepts Triton sequence parameters


def contract(manifest: Manifest) -> Contract:
    if manifest.task == "sentiment":
        labels = len(manifest.labels or [])
        return Contract(
            inputs=(TensorDef("TEXT", "BYTES", (-1,)),),
            outputs=(TensorDef("LABEL", "BYTES", (-1,)), TensorDef("PROBABILITIES", "FP32", (-1, labels))),
            sequences=False,
        )
    if manifest.task == "charlm":
        vocab = len(manifest.tokenizer.vocab) if manifest.tokenizer else -1
        return Contract(
            inputs=(TensorDef("TEXT", "BYTES", (1,)), TensorDef("NUM_CHARS", "INT32", (1,), optional=True)),
            outputs=(
                TensorDef("NEXT_CHAR_PROBS", "FP32", (vocab,)),
                TensorDef("VOCAB", "BYTES", (vocab,)),
                TensorDef("COMPLETION", "BYTES", (1,)),
            ),
            sequences=True,
        )
    spec = manifest.forecast
    assert spec is not None  # the manifest validator guarantees it for task "forecast"
    quantiles = len(spec.quantiles)
    return Contract(
        inputs=(TensorDef("HISTORY", "FP32", (-1, spec.features)),),
        outputs=(
            TensorDef("FORECAST", "FP32", (spec.horizon, spec.features)),
            TensorDef("QUANTILES", "FP32", (quantiles, spec.horizon, spec.features)),
        ),
        sequences=True,
    )


def check_inputs(model: str, c: Contract, inputs: dict[str, Tensor]) -> None:
    """Names, datatypes and shapes against the contract; every error names the tensor and what it needs."""
    known = {d.name: d for d in c.inputs}
    for name in inputs:
        if name not in known:
            raise InvalidInput(
                f"model {model} has no input {name}; inputs are {', '.join(d.describe() for d in c.inputs)}"
            )
    for d in c.inputs:
        t = inputs.get(d.name)
        if t is None:
            if d.optional:
                continue
            raise InvalidInput(f"model {model}: missing input {d.describe()}")
        # NUM_CHARS may come as INT64 too (numpy's default integer).
        allowed = {"INT32", "INT64"} if d.name == "NUM_CHARS" else {d.datatype}
        if t.datatype not in allowed:
            raise InvalidInput(f"input {d.name}: datatype must be {d.datatype}, got {t.datatype}")
        ok = len(t.shape) == len(d.shape) and all(w in (-1, s) for w, s in zip(d.shape, t.shape, strict=True))
        if not ok:
            raise InvalidInput(f"input {d.name}: shape must be {list(d.shape)} (-1 = any), got {list(t.shape)}")


def _utf8(name: str, items: list[bytes]) -> list[str]:
    try:
        return [b.decode("utf-8") for b in items]
    except UnicodeDecodeError as e:
        raise InvalidInput(f"input {name}: element is not valid UTF-8 ({e.reason} at byte {e.start})") from e


async def run(
    dataplane: DataPlane,
    ref: ModelRef,
    manifest: Manifest,
    inputs: dict[str, Tensor],
    settings: Settings,
    session_id: str | None,
) -> Result:
    """One data-plane call for a checked request."""
    if manifest.task == "sentiment":
        texts = _utf8("TEXT", inputs["TEXT"].items or [])
        if not texts:
            raise InvalidInput("input TEXT: needs at least one text")
        if len(texts) > settings.max_texts_per_request:
            raise InvalidInput(f"input TEXT: {len(texts)} texts, at most {settings.max_texts_per_request} per request")
        results = await dataplane.classify(ref, texts)
        probs = np.asarray([r.probabilities for r in results], dtype=np.float32).reshape(len(results), -1)
        outputs: Outputs = {
            "LABEL": ("BYTES", [r.label.encode() for r in results]),
            "PROBABILITIES": ("FP32", probs),  # (texts, labels), labels in manifest order
        }
        return Result(outputs, len(texts))
    if manifest.task == "charlm":
        (text,) = _utf8("TEXT", inputs["TEXT"].items or [])
        num_chars = 0
        if "NUM_CHARS" in inputs and inputs["NUM_CHARS"].array is not None:
            num_chars = int(inputs["NUM_CHARS"].array.reshape(-1)[0])
        if not 0 <= num_chars <= settings.max_generate_chars:
            raise InvalidInput(f"input NUM_CHARS: must be between 0 and {settings.max_generate_chars}, got {num_chars}")
        step = await dataplane.char_step(ref, text, session_id=session_id, num_chars=num_chars)
        outputs = {
            "NEXT_CHAR_PROBS": ("FP32", np.asarray(step.probabilities, dtype=np.float32).reshape(-1)),  # (vocab,)
            "VOCAB": ("BYTES", [c.encode() for c in step.vocab]),
            "COMPLETION": ("BYTES", [step.completion.encode()]),
        }
        return Result(outputs, 1, step.steps)
    history = inputs["HISTORY"].array
    assert history is not None
    if history.shape[0] > settings.max_forecast_rows:
        raise InvalidInput(f"input HISTORY: {history.shape[0]} rows, at most {settings.max_forecast_rows}")
    if not np.isfinite(history).all():
        raise InvalidInput("input HISTORY: contains NaN or infinite values")
    rows = np.ascontiguousarray(history, dtype=np.float32)  # (rows, features), original units
    if session_id is None:
        result = await dataplane.forecast(ref, rows)
    else:
        result = await dataplane.observe(session_id, rows)
    outputs = {
        "FORECAST": ("FP32", result.point),  # (horizon, features)
        "QUANTILES": ("FP32", result.quantiles),  # (quantiles, horizon, features)
    }
    return Result(outputs, 1, result.rows_seen)
