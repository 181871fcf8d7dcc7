"""Multivariate forecasting: validate rows, z-score with the manifest's statistics, run the encoder on the last
``window`` rows, add the calibrated quantile offsets, and de-normalize the target columns back to original units.

The history has every input column (``normalization.columns``); the model forecasts ``forecast.targets`` (all
columns when empty), the rest are covariates. Sessions (``state_mode="window"``) keep the last ``window`` rows
as their context; each Observe appends rows and re-runs the short encoder on the window (its cost is the
manifest's ``update_cost``, independent of how long the series is). With intervals, the context also keeps the
session's last forecast (z-scored, and its scale): the rows the next Observe brings are the targets of that
forecast's first steps, and each is counted against its quantiles (``Metrics.forecast_scored``), so the
intervals' coverage is measured on live data, per model version (with an adaptive width, below, against every
forecast of it the session issued).

Quantile ``q`` is ``point + quantile_offsets[q]`` on the z-scored scale; a graph that declares a
``forecast.scale_output`` (shape ``(batch, 1 or horizon, targets)``, e.g. each target's recent volatility computed
from the window inside the graph) gets ``point + quantile_offsets[q] * scale`` instead, so its band widens and
narrows with the window it was given (normalized conformal calibration, ``training/calibrate.py``).

A model with ``forecast.adaptive_width_gamma`` gives its sessions an adaptive band width
(``service/core/intervals.py``): a session forecasts at every row it observes once it holds a window (the rows of
one Observe in one batched run), keeps the last ``horizon`` forecasts (a ring), scores each new row against all of
them and moves its width per target column. The band it returns is the same whether the rows come one per Observe
or many, and it is what the model card's test coverage measures (``training/evaluate.py`` replays the same code).
Such a session counts each observed row against every forecast of it in the ring (up to ``horizon``), so the live
counters measure the coverage the width steers, over all steps, however the rows are fed.
Without a session the band is the calibrated one (width 1).

v2 contract: HISTORY FP32 [-1, features], COLUMNS BYTES [features] (optional: HISTORY's column names, in any
order of the model's) -> FORECAST FP32 [horizon, targets], QUANTILES FP32 [quantiles, horizon, targets]; with a
sequence, HISTORY rows are appended to the sequence's window.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Container, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from service.core.batching import StepInput
from service.core.context import after_commit
from service.core.intervals import Ring, WidthRule, empty_ring
from service.core.manifest import Manifest
from service.core.sessions.state import SessionState
from service.core.tasks.base import Array, ModelHandle, Task, TaskResult, fp32_tensor, register_task, utf8_items
from service.core.types import FloatArray, ForecastResult, Tensor, TensorContract, TensorDef
from service.errors import FailedPrecondition, InvalidInput, echo
from service.settings import Settings

ADVANCE_INLINE_ROWS = 32  # an Observe with more rows moves its adaptive width in a worker thread
MAX_Z = 1e6  # standard deviations from the training mean beyond which an input value is refused


# The field that names the columns of a field that carries rows, as the caller spelled it: KServe's input COLUMNS
# beside input HISTORY; the API's ``columns`` beside ``history`` or ``rows``.
_COLUMNS_FIELD = {"input HISTORY": "input COLUMNS"}


@register_task
class ForecastTask(Task):
    name = "forecast"
    deterministic = True
    stateful = True

    @classmethod
    def warmup_input(cls, manifest: Manifest, rows: int) -> dict[str, Array]:
        """Windows of rows at the columns' means (zeros, z-scored)."""
        assert manifest.forecast is not None  # check() ran first
        return {"history": np.zeros((rows, manifest.forecast.window, manifest.forecast.features), np.float32)}

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
        if f.scale_output is not None:
            cls._check_scale(manifest, f.scale_output)
        if f.adaptive_width_gamma is not None:
            if not f.quantile_offsets:
                raise ValueError("forecast.adaptive_width_gamma is set but forecast.quantile_offsets is empty")
            WidthRule(f.quantile_offsets, list(f.quantiles), f.adaptive_width_gamma)  # raises for unusable levels

    @staticmethod
    def _check_scale(manifest: Manifest, name: str) -> None:
        """The scale output multiplies the offsets: declared, float32, (batch, 1 or horizon, targets), not the
        forecast or a state, and there must be offsets to multiply."""
        f = manifest.forecast
        assert f is not None
        outputs = {t.name: t for t in manifest.outputs}
        states = {s.output for s in manifest.states}
        if name not in outputs or name == "forecast" or name in states:
            raise ValueError(
                f"forecast.scale_output {name!r} must name a graph output other than 'forecast' and the states; "
                f"manifest.json declares outputs {sorted(outputs)}"
            )
        spec = outputs[name]
        ok = len(spec.shape) == 3 and spec.shape[1] in (1, f.horizon) and spec.shape[2] == f.target_count
        if spec.dtype != "float32" or not ok or isinstance(spec.shape[0], int):
            raise ValueError(
                f"output {name!r} (forecast.scale_output) is {spec.dtype} {spec.shape}; expected float32 "
                f"['batch', 1 or horizon={f.horizon}, targets={f.target_count}]"
            )
        if not f.quantile_offsets:
            raise ValueError(f"forecast.scale_output {name!r} is set but forecast.quantile_offsets is empty")

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
        self.scale_name = spec.scale_output  # graph output multiplying the offsets per window, or None
        self.pick = pick
        scale_spec = {t.name: t for t in model.manifest.outputs}.get(spec.scale_output or "")
        self.scale_rows = int(scale_spec.shape[1]) if scale_spec is not None else 0  # 1 or horizon
        gamma = spec.adaptive_width_gamma
        self.rule = WidthRule(self.offsets, self.levels, gamma) if gamma is not None and self.levels else None
        if self.levels:
            model.metrics.forecast_levels(model.name, model.version, self.levels)

    # --- sessions -------------------------------------------------------------------------------------
    def session_nbytes(self) -> int:
        """The last window rows, and with intervals the last forecast (and its scale) to score the next rows
        against; with an adaptive width the last ``horizon`` forecasts, each with its scale and the width it was
        issued with (the last one's is the session's width): float32."""
        h, t = self.spec.horizon, len(self.targets)
        memo = (h + self.scale_rows) * t if self.levels else 0
        if self.rule is not None:
            memo = h * (h + self.scale_rows + 1) * t
        return 4 * (self.spec.window * self.spec.features + memo)

    def initial_state(self) -> dict[str, Array]:
        return {}  # window mode: the rows are the state (context), the encoder restarts from zeros

    def context_shapes(self) -> dict[str, tuple[Container[int], ...]]:
        """The last rows (at most a window), and with intervals the last forecast and its scale, z-scored."""
        t = len(self.targets)
        shapes: dict[str, tuple[Container[int], ...]] = {"rows": (range(1, self.spec.window + 1), {self.spec.features})}
        if self.rule is not None:
            h, n = self.spec.horizon, range(1, self.spec.horizon + 1)
            shapes |= {"ring_z": (n, {h}, {t}), "ring_width": (n, {t})}
            if self.scale_name is not None:
                shapes["ring_scale"] = (n, {self.scale_rows}, {t})
            return shapes
        if self.levels:
            shapes["forecast_z"] = ({self.spec.horizon}, {t})
        if self.scale_name is not None and self.levels:
            shapes["scale_z"] = ({self.scale_rows}, {t})
        return shapes

    def context_problem(self, context: dict[str, Array], steps: int) -> str:
        """Its rows within ``MAX_Z`` standard deviations of the training mean, as an Observe's must be (a blob's
        -3e38 answered inf forecasts as OK; the model's own forecasts it keeps are only checked to be finite). With
        an adaptive width: the ring's arrays come together and hold one entry per forecast, the session has seen
        enough rows for them, and every width is positive."""
        kept = context.get("rows")
        if kept is not None and (np.abs((kept.astype(np.float64) - self.mean) / self.std) >= MAX_Z).any():
            return f"a row holds a value {MAX_Z:g} standard deviations or more from the training data's mean"
        if self.rule is None:
            return ""
        need = {"ring_z", "ring_width"} | ({"ring_scale"} if self.scale_name is not None else set())
        held = need & set(context)
        if not held:
            return ""  # warming up: no forecast yet
        if held != need:
            return f"it holds {', '.join(sorted(held))} without {', '.join(sorted(need - held))}"
        n = len(context["ring_z"])
        if any(len(context[k]) != n for k in need):
            return "its ring's arrays hold different numbers of forecasts"
        rows, w = context.get("rows"), self.spec.window
        if rows is None or len(rows) < w or n > steps - w + 1:
            return f"it holds {n} forecasts after {steps} rows with a window of {w}"
        if (context["ring_width"] <= 0).any():
            return "a width is not positive"
        return ""

    def config_parameters(self) -> dict[str, str]:
        """The feature columns in the order HISTORY's rows hold them, and the forecast's (target) columns, as JSON
        lists: KServe clients send rows without names; and the adaptive width's rate when the model has one."""
        out = {"columns": json.dumps(self.columns), "targets": json.dumps(self.targets)}
        if self.rule is not None:  # a session's band width adapts at this rate (service/core/intervals.py)
            out["adaptive_width_gamma"] = f"{self.spec.adaptive_width_gamma:g}"
        return super().config_parameters() | out

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
                # HISTORY's column names in its order (any order of the model's columns); unset = the model's.
                TensorDef("COLUMNS", "BYTES", (self.spec.features,), optional=True),
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
        columns = utf8_items(inputs["COLUMNS"]) if "COLUMNS" in inputs else None
        if session is None:
            result = await self._predict(history, "input HISTORY", columns)
        else:
            result = await self._observe(session, history, "input HISTORY", columns)
        outputs = {
            "FORECAST": fp32_tensor("FORECAST", result.point),  # (horizon, targets)
            "QUANTILES": fp32_tensor("QUANTILES", result.quantiles),  # (quantiles, horizon, targets)
        }
        return TaskResult(outputs, inferences=1, steps=result.rows_seen)

    # --- Forecaster capability --------------------------------------------------------------------------
    async def predict(self, history: FloatArray, columns: Sequence[str] | None = None) -> ForecastResult:
        return await self._predict(history, "history", columns)

    async def observe(
        self, session: SessionState, rows: FloatArray, columns: Sequence[str] | None = None
    ) -> ForecastResult:
        return await self._observe(session, rows, "rows", columns)

    def column_order(self, x: npt.NDArray[Any], field: str, columns: Sequence[str]) -> list[int]:
        """Where the model's columns are in ``x`` (rows, len(columns)), in the model's order, found by name in
        ``columns`` (the others are dropped). INVALID_ARGUMENT for a width that is not the names' count, a repeated
        name, or a model column that is not there, naming the field that named them as the caller spelled it (the API's
        ``columns``, KServe's input ``COLUMNS``)."""
        names, named_by = list(columns), _COLUMNS_FIELD.get(field, "columns")
        if x.shape[1] != len(names):
            raise InvalidInput(f"{field} has {x.shape[1]} values per row but {named_by} names {len(names)}")
        counts = Counter(names)
        twice = sorted(n for n, k in counts.items() if k > 1)
        if twice:
            raise InvalidInput(f"{named_by} names {echo(twice[0])} more than once; name each column once")
        missing = [c for c in self.columns if c not in counts]
        if missing:
            raise InvalidInput(
                f"{named_by} lacks {', '.join(map(repr, missing))}: model {self.model.label} reads {self.columns} "
                "(other columns are ignored)"
            )
        return [names.index(c) for c in self.columns]

    def check_rows(
        self, rows: npt.NDArray[np.floating] | FloatArray, field: str, columns: Sequence[str] | None = None
    ) -> FloatArray:
        """``rows`` as float32 ``(n, features)``: 2-D, the model's column count (or the model's columns found by
        name in ``columns``), 1..max_forecast_rows, finite."""
        x = np.asarray(rows)
        if x.ndim != 2:
            raise InvalidInput(f"{field} must be 2-D (rows, features); got shape {list(x.shape)}")
        sent = list(range(x.shape[1]))  # the caller's index of each column checked below (the model's order)
        if columns:
            sent = self.column_order(x, field, columns)
            x = x[:, sent]
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
                f"{field}[{r}][{sent[c]}] (column {self.columns[c]!r}) is {x[r, c]}; every value must be a finite "
                f"number ({len(bad)} values are not)"
            )
        far = np.argwhere(np.abs((out.astype(np.float64) - self.mean) / self.std) >= MAX_Z)
        if len(far):  # the graph's sums would overflow float32 (a forecast of NaN and inf)
            r, c = (int(v) for v in far[0])
            raise InvalidInput(
                f"{field}[{r}][{sent[c]}] (column {self.columns[c]!r}) is {x[r, c]}: {MAX_Z:g} standard deviations or "
                f"more from the training data's mean ({self.mean[c]:g} +- {self.std[c]:g}); the model cannot "
                f"forecast from it ({len(far)} values are that far)"
            )
        return out

    def _quantiles_z(self, point_z: FloatArray, scale: FloatArray | None) -> FloatArray:
        """(quantiles, steps, targets) z-scored: ``point_z`` (steps, targets) plus the first ``steps`` steps'
        offsets, times ``scale`` (1 or steps, targets) when the graph has one."""
        offsets = self.offsets[:, : len(point_z)]
        out: FloatArray = point_z[None] + (offsets if scale is None else offsets * scale[None])
        return out

    async def _forecast_z(self, z: FloatArray) -> tuple[FloatArray, FloatArray | None]:
        """Point forecasts ``(n, horizon, targets)`` and scales ``(n, 1 or horizon, targets)`` (None without a
        scale output) for ``z`` ``(n, window, features)`` z-scored windows, in runs of at most max_batch_size."""
        step = max(1, self.settings.max_batch_size)
        points, scales = [], []
        for i in range(0, len(z), step):
            part = z[i : i + step]
            out = await self.model.batcher.submit(
                StepInput(inputs={"history": part}, rows=len(part), key=("window", part.shape[1]))
            )
            points.append(out.outputs["forecast"])
            if self.scale_name is not None:
                scales.append(out.outputs[self.scale_name])
        point = points[0] if len(points) == 1 else np.concatenate(points)
        if self.scale_name is None:
            return point, None
        scale = scales[0] if len(scales) == 1 else np.concatenate(scales)
        if scale.ndim != 3 or scale.shape[1] not in (1, point.shape[1]) or scale.shape[2] != point.shape[2]:
            raise RuntimeError(
                f"model {self.model.label}: graph output {self.scale_name!r} has shape {list(scale.shape[1:])} per "
                f"window; its manifest promises (1 or {point.shape[1]}, {point.shape[2]})"
            )
        return point, scale

    async def _run(self, window_rows: FloatArray, rows_seen: int) -> tuple[ForecastResult, dict[str, Array]]:
        """Forecast from exactly ``window`` rows ``(window, features)`` in original units. Also returns what a
        session keeps to score the rows it observes next against this forecast (empty without intervals)."""
        z = ((window_rows - self.mean) / self.std).astype(np.float32)[None]  # (1, window, features)
        points, scales = await self._forecast_z(z)
        point_z = points[0]  # (horizon, targets), z-scored
        # Copies: the outputs are rows of the batch's arrays, which a session must not keep alive.
        memo: dict[str, Array] = {"forecast_z": point_z.copy()} if self.levels else {}
        if scales is not None:
            scale = scales[0]  # (1 or horizon, targets), z-scored units
            quant_z = self._quantiles_z(point_z, scale)  # (quantiles, horizon, targets)
            memo["scale_z"] = scale.copy()
        elif self.offsets.size:
            quant_z = self._quantiles_z(point_z, None)
        else:
            quant_z = np.zeros((0, *point_z.shape), np.float32)
        return self._result(point_z, quant_z, rows_seen), memo

    def _result(self, point_z: FloatArray, quant_z: FloatArray, rows_seen: int) -> ForecastResult:
        """The forecast in original units."""
        return ForecastResult(
            columns=list(self.targets),
            point=(point_z * self.target_std + self.target_mean).astype(np.float32),
            quantile_levels=list(self.levels),
            quantiles=(quant_z * self.target_std + self.target_mean).astype(np.float32),
            rows_seen=rows_seen,
        )

    def _score(self, context: dict[str, Array], rows: FloatArray) -> tuple[int, dict[float, int]] | None:
        """The observed ``rows`` (original units) against the quantiles of the session's previous forecast, whose
        first steps they are: (targets scored, level -> how many at or below that quantile); None when the
        session holds no forecast (warming up, or a model without intervals, whose sessions keep none)."""
        point_z = context.get("forecast_z")
        if point_z is None:
            return None
        steps = min(len(rows), len(point_z))
        scale = context.get("scale_z")
        if scale is not None and len(scale) > 1:
            scale = scale[:steps]
        quant_z = self._quantiles_z(point_z[:steps], scale)  # (quantiles, steps, targets)
        y_z = (rows[:steps, self.pick] - self.target_mean) / self.target_std  # (steps, targets)
        below = (y_z[None] <= quant_z).sum(axis=(1, 2))
        return int(y_z.size), {level: int(n) for level, n in zip(self.levels, below, strict=True)}

    def _ring(self, context: dict[str, Array]) -> Ring:
        """The session's ring of forecasts (``service/core/intervals.py``); empty while it warms up."""
        assert self.rule is not None
        points, widths, scales = context.get("ring_z"), context.get("ring_width"), context.get("ring_scale")
        if points is None or widths is None:
            return empty_ring(self.rule, self.scale_rows if self.scale_name is not None else None)
        return Ring(points, scales, widths)  # consistent: written by _observe_adaptive or checked at import

    async def _predict(
        self, history: npt.NDArray[np.floating] | FloatArray, field: str, columns: Sequence[str] | None = None
    ) -> ForecastResult:
        """Stateless forecast from ``history`` ``(rows, features)``, oldest first; needs >= ``window`` rows."""
        self.check_session()
        x = self.check_rows(history, field, columns)
        w = self.spec.window
        if len(x) < w:
            raise InvalidInput(f"{field} has {len(x)} rows; model {self.model.label} needs at least window={w} rows")
        return (await self._run(x[-w:], rows_seen=len(x)))[0]

    async def _observe(
        self,
        session: SessionState,
        rows: npt.NDArray[np.floating] | FloatArray,
        field: str,
        columns: Sequence[str] | None = None,
    ) -> ForecastResult:
        """Appends ``rows`` to the session (which keeps the last ``window`` rows) and forecasts.

        Warming up: while the session has seen fewer than ``window`` rows in total, the result has ``point`` of
        shape ``(0, targets)`` and ``quantiles`` of shape ``(quantiles, 0, targets)``; ``rows_seen`` tells how
        many rows it has, so the caller knows how many more are needed.
        """
        self.check_session()
        x = self.check_rows(rows, field, columns)
        if self.rule is not None:
            return await self._observe_adaptive(session, x)
        kept = session.context.get("rows")
        window_rows = (x if kept is None else np.concatenate([kept, x], axis=0))[-self.spec.window :].copy()
        seen = session.steps + len(x)
        scored = self._score(session.context, x)
        memo: dict[str, Array] = {}
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
            result, memo = await self._run(window_rows, rows_seen=seen)
        # Committed only after the run succeeded: a failed or cancelled Observe leaves the session as it was.
        session.context, session.steps = {"rows": window_rows, **memo}, seen
        if scored is not None:  # counted once the session holding these rows is stored (a retry counts once)
            model, version = self.model.name, self.model.version
            after_commit(lambda: self.model.metrics.forecast_scored(model, version, *scored))
        return result

    async def _observe_adaptive(self, session: SessionState, x: FloatArray) -> ForecastResult:
        """``_observe`` for a model with an adaptive width: a forecast at every new row that completes a window
        (one batched run), each row scored against the ring before the forecast it issues (``WidthRule.advance``)."""
        assert self.rule is not None
        w, t = self.spec.window, len(self.targets)
        kept = session.context.get("rows")
        all_rows = x if kept is None else np.concatenate([kept, x], axis=0)
        first = min(len(x), max(0, w - (len(all_rows) - len(x)) - 1))  # x's first row that completes a window
        ring = self._ring(session.context)
        points = np.zeros((0, self.spec.horizon, t), np.float32)
        scales = None if self.scale_name is None else np.zeros((0, self.scale_rows, t), np.float32)
        if first < len(x):
            z = ((all_rows - self.mean) / self.std).astype(np.float32)
            views = np.lib.stride_tricks.sliding_window_view(z, w, axis=0)[-(len(x) - first) :]  # (k, features, w)
            points, scales = await self._forecast_z(np.ascontiguousarray(views.transpose(0, 2, 1)))
        y = ((x[:, self.pick] - self.target_mean) / self.target_std).astype(np.float32)
        # The session's width is the one its last forecast was issued with: no row moved it since.
        args = (ring, ring.widths[-1] if len(ring) else self.rule.ones(), y, points, scales, first)
        if len(x) <= ADVANCE_INLINE_ROWS:
            run = self.rule.advance(*args)
        else:  # a backfill: one sequential width update per row (~75 us each for ETTh1), off the event loop
            run = await asyncio.to_thread(self.rule.advance, *args)
        ring, issued = run.ring, run.issued
        seen = session.steps + len(x)
        if len(issued):
            last_scale = None if scales is None else scales[-1:]
            quant_z = self.rule.quantiles_many(points[-1:], last_scale, issued[-1:])[:, 0]
            result = self._result(points[-1], quant_z, seen)
        else:
            result = self._result(np.zeros((0, t), np.float32), np.zeros((len(self.levels), 0, t), np.float32), seen)
        context: dict[str, Array] = {"rows": all_rows[-w:].copy()}
        if len(ring):  # (advance's arrays: none of them holds a row of the batch's outputs)
            context |= {"ring_z": ring.points, "ring_width": ring.widths}
            if ring.scales is not None:
                context["ring_scale"] = ring.scales
        # Committed only after the runs succeeded: a failed or cancelled Observe leaves the session as it was.
        session.context, session.steps = context, seen
        if run.scored:  # every observed row against every forecast of it: the coverage the width steers
            model, version, n = self.model.name, self.model.version, run.scored
            below = {level: int(b) for level, b in zip(self.levels, run.below, strict=True)}
            after_commit(lambda: self.model.metrics.forecast_scored(model, version, n, below))
        return result
