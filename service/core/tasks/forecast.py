"""Multivariate forecasting: validate rows, z-score with the manifest's statistics, run the encoder on the last
``window`` rows, add the calibrated quantile offsets, and de-normalize the target columns back to original units.

The history has every input column (``normalization.columns``); the model forecasts ``forecast.targets`` (all
columns when empty), the rest are covariates. Sessions (``state_mode="window"``) keep the last ``window`` rows
as their context; each Observe appends rows and re-runs the short encoder on the window (its cost is the
manifest's ``update_cost``, independent of how long the series is).

v2 contract: HISTORY FP32 [-1, features] -> FORECAST FP32 [horizon, targets], QUANTILES FP32 [quantiles,
horizon, targets]; with a sequence, HISTORY rows are appended to the sequence's window.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from service.core.batching import StepInput
from service.core.manifest import Manifest
from service.core.sessions.state import SessionState
from service.core.tasks.base import Array, ModelHandle, Task, TaskResult, fp32_tensor, register_task
from service.core.types import FloatArray, ForecastResult, Tensor, TensorContract, TensorDef
from service.errors import FailedPrecondition, InvalidInput
from service.settings import Settings


@register_task
class ForecastTask(Task):
    name = "forecast"
    stateful = True

    @classmethod
    def check(cls, manifest: Manifest) -> None:
        norm, f = manifest.normalization, manifest.forecast
        if norm is None or f is None:
            raise ValueError("a 'forecast' model needs normalization and forecast sections in manifest.json")
        if not manifest.has_input("history") or "forecast" not in {t.name for t in manifest.outputs}:
            raise ValueError("a 'forecast' model must declare input 'history' and output 'forecast' in manifest.json")
        if len(norm.columns) != f.features:
            raise ValueError(f"normalization has {len(norm.columns)} columns, forecast.features={f.features}")
        unknown = [t for t in f.targets if t not in norm.columns]
        if unknown or [c for c in norm.columns if c in f.targets] != list(f.targets):
            raise ValueError(
                f"forecast.targets {f.targets} must be columns of normalization.columns {norm.columns}, in their order"
            )
        shape = list(np.asarray(f.quantile_offsets, dtype=np.float64).shape)
        if f.quantile_offsets and shape != [len(f.quantiles), f.horizon, f.target_count]:
            raise ValueError(
                f"forecast.quantile_offsets has shape {shape}; expected [quantiles={len(f.quantiles)}, "
                f"horizon={f.horizon}, targets={f.target_count}]"
            )

    @classmethod
    def symbols(cls, manifest: Manifest) -> dict[str, int]:
        assert manifest.forecast is not None
        return {"features": manifest.forecast.features}

    def __init__(self, model: ModelHandle, settings: Settings) -> None:
        super().__init__(model, settings)
        norm, spec = model.manifest.normalization, model.manifest.forecast
        assert norm is not None and spec is not None  # check() ran at load
        self.spec, self.columns = spec, list(norm.columns)
        self.targets = list(spec.targets) or list(norm.columns)
        pick = [self.columns.index(t) for t in self.targets]
        # The manifest's numbers as float32 arrays, converted once per model, not per request.
        self.mean = np.asarray(norm.mean, dtype=np.float32)  # (features,)
        self.std = np.asarray(norm.std, dtype=np.float32)  # (features,)
        self.target_mean, self.target_std = self.mean[pick], self.std[pick]  # (targets,)
        self.offsets = np.asarray(spec.quantile_offsets, dtype=np.float32)  # (quantiles, horizon, targets) z-scored
        self.levels = list(spec.quantiles) if self.offsets.size else []

    # --- sessions -------------------------------------------------------------------------------------
    def session_nbytes(self) -> int:
        return 4 * self.spec.window * self.spec.features  # the last window rows, float32

    def initial_state(self) -> dict[str, Array]:
        return {}  # window mode: the rows are the state (context), the encoder restarts from zeros

    def check_session(self) -> None:
        if self.spec.state_mode != "window":
            raise FailedPrecondition(
                f"model {self.model.label} declares forecast.state_mode={self.spec.state_mode!r}; this server "
                "supports 'window' only"
            )

    # --- v2 -------------------------------------------------------------------------------------------
    def contract(self) -> TensorContract:
        h, t = self.spec.horizon, len(self.targets)
        return TensorContract(
            inputs=(
                TensorDef(
                    "HISTORY",
                    "FP32",
                    (-1, self.spec.features),
                    max_shape=(self.settings.max_forecast_rows, 0),
                    limit_name="max_forecast_rows",
                ),
            ),
            outputs=(
                TensorDef("FORECAST", "FP32", (h, t)),
                TensorDef("QUANTILES", "FP32", (max(len(self.levels), 0), h, t)),
            ),
            sequences=True,
        )

    async def infer(self, inputs: dict[str, Tensor], session: SessionState | None) -> TaskResult:
        history = inputs["HISTORY"].array
        assert history is not None  # FP32 tensors carry arrays
        if session is None:
            result = await self._predict(history, "input HISTORY")
        else:
            result = await self._observe(session, history, "input HISTORY")
        outputs = {
            "FORECAST": fp32_tensor("FORECAST", result.point),  # (horizon, targets)
            "QUANTILES": fp32_tensor("QUANTILES", result.quantiles),  # (quantiles, horizon, targets)
        }
        return TaskResult(outputs, inferences=1, steps=result.rows_seen)

    # --- Forecaster capability --------------------------------------------------------------------------
    async def predict(self, history: FloatArray) -> ForecastResult:
        return await self._predict(history, "history")

    async def observe(self, session: SessionState, rows: FloatArray) -> ForecastResult:
        return await self._observe(session, rows, "rows")

    def check_rows(self, rows: npt.NDArray[np.floating] | FloatArray, field: str) -> FloatArray:
        """``rows`` as float32 ``(n, features)``: 2-D, the model's column count, 1..max_forecast_rows, finite."""
        x = np.asarray(rows)
        if x.ndim != 2:
            raise InvalidInput(f"{field} must be 2-D (rows, features); got shape {list(x.shape)}")
        if x.shape[1] != self.spec.features:
            raise InvalidInput(
                f"{field} has {x.shape[1]} features per row; model {self.model.label} expects {self.spec.features} "
                f"(columns {self.columns})"
            )
        limit = self.settings.max_forecast_rows
        if not 1 <= x.shape[0] <= limit:
            raise InvalidInput(f"{field} has {x.shape[0]} rows; send 1 to {limit} rows (max_forecast_rows)")
        out: FloatArray = x.astype(np.float32)
        bad = np.argwhere(~np.isfinite(out))
        if len(bad):
            r, c = (int(v) for v in bad[0])
            raise InvalidInput(
                f"{field}[{r}][{c}] (column {self.columns[c]!r}) is {x[r, c]}; every value must be a finite number "
                f"({len(bad)} values are not)"
            )
        return out

    async def _run(self, window_rows: FloatArray, rows_seen: int) -> ForecastResult:
        """Forecast from exactly ``window`` rows ``(window, features)`` in original units."""
        z = ((window_rows - self.mean) / self.std).astype(np.float32)[None]  # (1, window, features)
        out = await self.model.batcher.submit(StepInput(inputs={"history": z}, rows=1, key=("window", len(z[0]))))
        point_z = out.outputs["forecast"][0]  # (horizon, targets), z-scored
        quant_z = point_z[None] + self.offsets if self.offsets.size else np.zeros((0, *point_z.shape), np.float32)
        return ForecastResult(
            columns=list(self.targets),
            point=(point_z * self.target_std + self.target_mean).astype(np.float32),
            quantile_levels=list(self.levels),
            quantiles=(quant_z * self.target_std + self.target_mean).astype(np.float32),
            rows_seen=rows_seen,
        )

    async def _predict(self, history: npt.NDArray[np.floating] | FloatArray, field: str) -> ForecastResult:
        """Stateless forecast from ``history`` ``(rows, features)``, oldest first; needs >= ``window`` rows."""
        self.check_session()
        x = self.check_rows(history, field)
        w = self.spec.window
        if len(x) < w:
            raise InvalidInput(f"{field} has {len(x)} rows; model {self.model.label} needs at least window={w} rows")
        return await self._run(x[-w:], rows_seen=len(x))

    async def _observe(
        self, session: SessionState, rows: npt.NDArray[np.floating] | FloatArray, field: str
    ) -> ForecastResult:
        """Appends ``rows`` to the session (which keeps the last ``window`` rows) and forecasts.

        Warming up: while the session has seen fewer than ``window`` rows in total, the result has ``point`` of
        shape ``(0, targets)`` and ``quantiles`` of shape ``(quantiles, 0, targets)``; ``rows_seen`` tells how
        many rows it has, so the caller knows how many more are needed.
        """
        self.check_session()
        x = self.check_rows(rows, field)
        kept = session.context.get("rows")
        window_rows = (x if kept is None else np.concatenate([kept, x], axis=0))[-self.spec.window :].copy()
        seen = session.steps + len(x)
        if len(window_rows) < self.spec.window:
            t = len(self.targets)
            result = ForecastResult(
                columns=list(self.targets),
                point=np.zeros((0, t), dtype=np.float32),
                quantile_levels=list(self.levels),
                quantiles=np.zeros((len(self.levels), 0, t), dtype=np.float32),
                rows_seen=seen,
            )
        else:
            result = await self._run(window_rows, rows_seen=seen)
        # Committed only after the run succeeded: a failed or cancelled Observe leaves the session as it was.
        session.context, session.steps = {"rows": window_rows}, seen
        return result
