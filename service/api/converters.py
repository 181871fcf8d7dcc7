"""Protobuf <-> data-plane types, both directions (the servicers use pb -> domain -> pb, the client the reverse).

Shape checks that only make sense on the wire (ragged rows, a missing required id) happen here and raise
``InvalidInput`` naming the field; every other rule (limits, finiteness, feature counts) lives in the core.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf.timestamp_pb2 import Timestamp

from service.api.gen.seqserve.v1 import (
    autocomplete_pb2,
    common_pb2,
    forecast_pb2,
    sentiment_pb2,
    sessions_pb2,
)
from service.core.aio import inline_unless
from service.core.types import (
    CompletionChunk,
    FinishReason,
    FloatArray,
    ForecastResult,
    ModelRef,
    SamplingParams,
    SentimentResult,
    SessionInfo,
    Suggestion,
    SuggestResult,
)
from service.errors import InvalidInput

# Defaults of the proto3 fields whose zero value would be a bad default (see the .proto comments).
DEFAULT_MAX_CHARS = 200
DEFAULT_TEMPERATURE = 1.0
DEFAULT_SUGGESTIONS = 3
DEFAULT_SUGGEST_CHARS = 10
MAX_ROW_VALUES = 4096  # features per row: far above any model's, checked before a row is copied

_FINISH_TO_PB: dict[str | None, autocomplete_pb2.FinishReason.ValueType] = {
    None: autocomplete_pb2.FINISH_REASON_UNSPECIFIED,
    "length": autocomplete_pb2.FINISH_REASON_LENGTH,
    "stop": autocomplete_pb2.FINISH_REASON_STOP,
}
_FINISH_FROM_PB: dict[int, FinishReason | None] = {int(v): k for k, v in _FINISH_TO_PB.items()}  # type: ignore[misc]


def finish_reason_from_pb(value: int) -> FinishReason | None:
    """A ``CompleteChunk.finish_reason`` as the core names it ("length", "stop"), None while unfinished."""
    return _FINISH_FROM_PB.get(int(value))


# --- requests: pb -> domain -----------------------------------------------------------------------------


def require_id(value: str, field: str) -> str:
    if not value:
        raise InvalidInput(f"{field} is empty: pass the id returned by Sessions.Create or Sessions.Fork")
    return value


def model_ref(selector: common_pb2.ModelSelector, default: str | None, field: str = "model.name") -> ModelRef:
    """``default=None``: the name is required; ``""``: optional (a call on a session, whose model it is)."""
    name = selector.name or default or ""
    if not name and default is None:
        raise InvalidInput(f"{field} is required: name the model (e.g. 'charlm')")
    version = selector.version if selector.HasField("version") else None
    if version is not None and version < 1:
        raise InvalidInput(f"model.version must be >= 1 (got {version}); leave it unset for the newest")
    return ModelRef(name, version)


def sampling_params(request: autocomplete_pb2.CompleteRequest) -> SamplingParams:
    return SamplingParams(
        max_chars=request.max_chars if request.HasField("max_chars") else DEFAULT_MAX_CHARS,
        temperature=request.temperature if request.HasField("temperature") else DEFAULT_TEMPERATURE,
        top_k=request.top_k,
        seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop),
    )


ROWS_OFF_LOOP = 1000  # a larger table is read in a worker thread (its Python per row adds up to milliseconds)


async def rows_array(rows: Sequence[common_pb2.Row], field: str, max_rows: int) -> FloatArray:
    """``rows_to_array``, off the event loop for a table of more than ``ROWS_OFF_LOOP`` rows: the loop then takes
    its turns between the reader's slices of the GIL, so the calls it serves meanwhile (a keystroke, a health
    check) wait a few milliseconds, not the whole read."""
    return await inline_unless(len(rows) > ROWS_OFF_LOOP, rows_to_array, rows, field, max_rows)


def rows_to_array(rows: Sequence[common_pb2.Row], field: str, max_rows: int) -> FloatArray:
    """(rows, features) float32; 1..``max_rows`` rows (checked before any row is read), each with the same,
    non-zero number of values."""
    if not rows:
        raise InvalidInput(f"{field} is empty: send at least one row")
    if len(rows) > max_rows:
        raise InvalidInput(f"{field} has {len(rows)} rows; send 1 to {max_rows} rows (max_forecast_rows)")
    width = len(rows[0].values)
    if width == 0:
        raise InvalidInput(f"{field}[0] has no values: each row needs one value per feature")
    if width > MAX_ROW_VALUES:
        raise InvalidInput(f"{field}[0] has {width} values; a row has one value per feature, at most {MAX_ROW_VALUES}")
    values = [row.values for row in rows]  # (each row's container, read once: a protobuf row is costly to reach)
    lengths = list(map(len, values))
    if lengths.count(width) != len(lengths):
        i = next(i for i, n in enumerate(lengths) if n != width)
        raise InvalidInput(
            f"{field}[{i}] has {lengths[i]} values but {field}[0] has {width}: every row needs one value per feature"
        )
    return _stacked(values, width)


def texts(values: Sequence[str], field: str, max_texts: int) -> list[str]:
    """The texts of a request, counted before any is copied (the core checks each one)."""
    if len(values) > max_texts:
        raise InvalidInput(f"{field} has {len(values)} texts; the limit is {max_texts} (max_texts_per_request)")
    return list(values)


def optional_ttl(has: bool, value: float) -> float | None:
    return value if has else None  # limits are checked by the session manager


# --- responses: domain -> pb ----------------------------------------------------------------------------


def classify_response(results: Iterable[SentimentResult]) -> sentiment_pb2.ClassifyResponse:
    return sentiment_pb2.ClassifyResponse(
        results=[
            sentiment_pb2.Classification(label=r.label, labels=r.labels, probabilities=r.probabilities) for r in results
        ]
    )


def chunk_to_pb(chunk: CompletionChunk) -> autocomplete_pb2.CompleteChunk:
    return autocomplete_pb2.CompleteChunk(
        text=chunk.text,
        finish_reason=_FINISH_TO_PB[chunk.finish_reason],
        steps=chunk.steps,
        model_version=chunk.model_version,
    )


def suggest_to_pb(result: SuggestResult) -> autocomplete_pb2.SuggestResponse:
    return autocomplete_pb2.SuggestResponse(
        suggestions=[autocomplete_pb2.Suggestion(text=s.text, logprob=s.logprob) for s in result.suggestions],
        steps=result.steps,
    )


def rows_to_pb(rows: Sequence[Sequence[float]] | npt.NDArray[Any]) -> list[common_pb2.Row]:
    """A table (rows, features) as repeated Row messages (both directions use this). Rows may differ in length
    (the client sends what it is given; the server says what is wrong)."""
    table = rows.tolist() if isinstance(rows, np.ndarray) else [[float(v) for v in row] for row in rows]
    return [common_pb2.Row(values=row) for row in table]


def forecast_to_pb(result: ForecastResult) -> forecast_pb2.ForecastResponse:
    return forecast_pb2.ForecastResponse(
        columns=result.columns,
        point=rows_to_pb(result.point),
        quantiles=[
            forecast_pb2.QuantileForecast(level=level, rows=rows_to_pb(result.quantiles[i]))
            for i, level in enumerate(result.quantile_levels)
        ],
        rows_seen=result.rows_seen,
    )


def _timestamp(unix_seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(unix_seconds * 1e9))
    return ts


def session_to_pb(info: SessionInfo) -> sessions_pb2.SessionInfo:
    return sessions_pb2.SessionInfo(
        session_id=info.id,
        model=info.model,
        version=info.version,
        steps=info.steps,
        created_at=_timestamp(info.created_at),
        last_used_at=_timestamp(info.last_used_at),
        expires_at=_timestamp(info.expires_at),
        ttl_seconds=info.ttl_seconds,
        metadata=info.metadata,
        in_use=info.in_use,
    )


# --- client side: pb -> domain --------------------------------------------------------------------------


def sentiment_from_pb(pb: sentiment_pb2.Classification) -> SentimentResult:
    return SentimentResult(label=pb.label, labels=list(pb.labels), probabilities=list(pb.probabilities))


def chunk_from_pb(pb: autocomplete_pb2.CompleteChunk) -> CompletionChunk:
    return CompletionChunk(
        text=pb.text,
        finish_reason=finish_reason_from_pb(pb.finish_reason),
        steps=pb.steps,
        model_version=pb.model_version,
    )


def suggest_from_pb(pb: autocomplete_pb2.SuggestResponse) -> SuggestResult:
    return SuggestResult(suggestions=[Suggestion(s.text, s.logprob) for s in pb.suggestions], steps=pb.steps)


def rows_from_pb(rows: Sequence[common_pb2.Row], width: int) -> FloatArray:
    """(len(rows), width); ``width`` keeps the shape of an empty table (a warming-up session's forecast)."""
    return _stacked([r.values for r in rows], width)


def _stacked(values: Sequence[Sequence[float]], width: int) -> FloatArray:
    """Rows of ``width`` values each as one (rows, width) float32 array, read straight from the rows' containers
    (no list per row, which took about twice as long)."""
    flat = np.fromiter(itertools.chain.from_iterable(values), dtype=np.float32, count=len(values) * width)
    return flat.reshape(len(values), width)


def forecast_from_pb(pb: forecast_pb2.ForecastResponse) -> ForecastResult:
    width = len(pb.columns)
    point = rows_from_pb(pb.point, width)  # (horizon, features), or (0, features) while warming up
    quantiles = np.zeros((len(pb.quantiles), *point.shape), dtype=np.float32)  # (levels, horizon, features)
    for i, q in enumerate(pb.quantiles):
        quantiles[i] = rows_from_pb(q.rows, width)
    return ForecastResult(
        columns=list(pb.columns),
        point=point,
        quantile_levels=[q.level for q in pb.quantiles],
        quantiles=quantiles,
        rows_seen=pb.rows_seen,
    )


def session_from_pb(pb: sessions_pb2.SessionInfo) -> SessionInfo:
    return SessionInfo(
        id=pb.session_id,
        model=pb.model,
        version=pb.version,
        steps=pb.steps,
        created_at=pb.created_at.ToNanoseconds() / 1e9,
        last_used_at=pb.last_used_at.ToNanoseconds() / 1e9,
        expires_at=pb.expires_at.ToNanoseconds() / 1e9,
        ttl_seconds=pb.ttl_seconds,
        metadata=dict(pb.metadata),
        in_use=pb.in_use,
    )
