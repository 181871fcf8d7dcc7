"""Multivariate forecasting: validate rows, z-score with the manifest's statistics, run the encoder on the
last ``window`` rows, add the calibrated quantile offsets, and de-normalize back to original units.

Sessions (``state_mode="window"``) keep the last ``window`` rows; each Observe appends rows and re-runs the
short encoder on the window (its cost is the manifest's ``update_cost``, independent of how long the series is).
"""

from __future__ import annotations

import numpy as np

from service.core.batching import StepInput
from service.core.manifest import ForecastSpec, Normalization
from service.core.sessions import Session
from service.core.tasks.common import Served
from service.core.types import FloatArray, ForecastResult
from service.errors import FailedPrecondition, InvalidInput
from service.settings import Settings


def _spec(m: Served) -> tuple[ForecastSpec, Normalization]:
    assert m.manifest.forecast is not None and m.manifest.normalization is not None
    return m.manifest.forecast, m.manifest.normalization


def check_rows(m: Served, rows: FloatArray, field: str, settings: Settings) -> FloatArray:
    """``rows`` as float32 ``(n, features)``: 2-D, the model's feature count, 1..max_forecast_rows, finite."""
    spec, norm = _spec(m)
    x = np.asarray(rows)
    if x.ndim != 2:
        raise InvalidInput(f"{field} must be 2-D (rows, features); got shape {list(x.shape)}")
    if x.shape[1] != spec.features:
        raise InvalidInput(
            f"{field} has {x.shape[1]} features per row; model {m.label} expects {spec.features} "
            f"(columns {norm.columns})"
        )
    if not 1 <= x.shape[0] <= settings.max_forecast_rows:
        raise InvalidInput(
            f"{field} has {x.shape[0]} rows; send 1 to {settings.max_forecast_rows} rows (max_forecast_rows)"
        )
    out: FloatArray = x.astype(np.float32)
    bad = np.argwhere(~np.isfinite(out))
    if len(bad):
        r, c = (int(v) for v in bad[0])
        raise InvalidInput(
            f"{field}[{r}][{c}] (column {norm.columns[c]!r}) is {x[r, c]}; every value must be a finite number "
            f"({len(bad)} values are not)"
        )
    return out


async def _run(m: Served, window_rows: FloatArray, rows_seen: int) -> ForecastResult:
    """Forecast from exactly ``window`` rows ``(window, features)`` in original units."""
    spec, norm = _spec(m)
    mean, std, offsets = m.forecast_arrays  # (features,), (features,), (quantiles, horizon, features)
    z = ((window_rows - mean) / std).astype(np.float32)[None]  # (1, window, features)
    out = await m.batcher.submit(StepInput(inputs={"history": z}, rows=1, key=("window", spec.window)))
    point_z = out.outputs["forecast"][0]  # (horizon, features), z-scored
    if offsets.size:
        quant_z = point_z[None] + offsets  # (quantiles, horizon, features)
        levels = list(spec.quantiles)
    else:
        quant_z, levels = np.zeros((0, *point_z.shape), dtype=np.float32), []
    return ForecastResult(
        columns=list(norm.columns),
        point=(point_z * std + mean).astype(np.float32),
        quantile_levels=levels,
        quantiles=(quant_z * std + mean).astype(np.float32),
        rows_seen=rows_seen,
    )


def check_mode(m: Served) -> ForecastSpec:
    spec, _ = _spec(m)
    if spec.state_mode != "window":
        raise FailedPrecondition(
            f"model {m.label} declares forecast.state_mode={spec.state_mode!r}; this server supports 'window' only"
        )
    return spec


async def predict(m: Served, history: FloatArray, settings: Settings) -> ForecastResult:
    """Stateless forecast from ``history`` ``(rows, features)``, oldest first; needs >= ``window`` rows."""
    spec = check_mode(m)
    x = check_rows(m, history, "history", settings)
    if len(x) < spec.window:
        raise InvalidInput(
            f"history has {len(x)} rows; model {m.label} needs at least window={spec.window} rows to forecast"
        )
    return await _run(m, x[-spec.window :], rows_seen=len(x))


async def observe(m: Served, session: Session, rows: FloatArray, settings: Settings) -> ForecastResult:
    """Appends ``rows`` to the session (which keeps the last ``window`` rows) and forecasts.

    Warming up: while the session has seen fewer than ``window`` rows in total, the result has ``point`` of
    shape ``(0, features)`` and ``quantiles`` of shape ``(quantiles, 0, features)``; ``rows_seen`` tells how
    many rows it has, so the caller knows how many more are needed.
    """
    spec = check_mode(m)
    x = check_rows(m, rows, "rows", settings)
    kept = x if session.rows is None else np.concatenate([session.rows, x], axis=0)
    window_rows = kept[-spec.window :].copy()  # (<= window, features), original units
    seen = session.steps + len(x)
    if len(window_rows) < spec.window:
        _, norm = _spec(m)
        q = len(spec.quantiles) if spec.quantile_offsets else 0
        result = ForecastResult(
            columns=list(norm.columns),
            point=np.zeros((0, spec.features), dtype=np.float32),
            quantile_levels=list(spec.quantiles) if q else [],
            quantiles=np.zeros((q, 0, spec.features), dtype=np.float32),
            rows_seen=seen,
        )
    else:
        result = await _run(m, window_rows, rows_seen=seen)
    # Committed only after the run succeeded: a failed or cancelled Observe leaves the session as it was.
    session.rows, session.steps = window_rows, seen
    return result
