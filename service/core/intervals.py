"""An adaptive band width for a forecaster's quantiles: one width multiplier per target column that follows the
coverage of the targets as they are revealed (``forecast.adaptive_width_gamma`` in the manifest).

A forecaster's quantiles are ``point + offset[q] * scale`` (z-scored; ``scale`` is 1 without a scale output). With
an adaptive width, quantile q is ``point + (mid + m * (offset[q] - mid)) * scale``, where ``mid`` is the median's
offset and ``m`` (one per target column, 1 at the start) the session's width: the band keeps the shape calibration
gave it and widens or narrows as a whole; the median never moves. After each observed row, every earlier forecast
whose target that row is (the last ``horizon`` forecasts, one per row) is scored, and
``m *= exp(-gamma * (share of those targets inside the outer band - its nominal share))``: a band that covers too
much narrows, one that covers too little widens, slowly. It adapts to a drifting error level, which no band fixed
at calibration can (docs/models.md, "An adaptive band width in sessions").

This module is the one implementation: serving's sessions (``service/core/tasks/forecast.py``), the release's
test-split evaluation (``training/evaluate.py``) and the validation check that chose ``gamma``
(``training/adaptive.py``) all call it, so the coverage a model card reports is the coverage its sessions produce.
Plain numpy, float32 as the sessions store it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
WIDTH_LIMITS = (0.01, 100.0)  # m never leaves this range: a series that stops moving cannot drive it to 0 or inf


@dataclass(frozen=True)
class Ring:
    """The forecasts a session issued on its last ``n <= horizon`` rows, oldest first, one per row: their points
    ``(n, horizon, targets)``, scales ``(n, 1 or horizon, targets)`` or None, and widths ``(n, targets)``."""

    points: F32
    scales: F32 | None
    widths: F32

    def __len__(self) -> int:
        return len(self.points)


class WidthRule:
    """``offsets`` ``(quantiles, horizon, targets)`` at ``levels`` (odd in number, the median in the middle), moved
    with rate ``gamma``."""

    def __init__(self, offsets: npt.ArrayLike, levels: list[float], gamma: float) -> None:
        off = np.asarray(offsets, dtype=np.float32)
        if off.ndim != 3 or len(off) != len(levels) or len(levels) % 2 != 1 or levels[len(levels) // 2] != 0.5:
            raise ValueError(
                f"an adaptive width needs offsets (quantiles, horizon, targets) at an odd number of levels with 0.5 "
                f"in the middle; got levels {levels} and offsets of shape {list(off.shape)}"
            )
        self.mid = off[len(levels) // 2]  # (H, T)
        self.spread = off - self.mid[None]  # (Q, H, T): 0 at the median
        self.nominal = np.float32(levels[-1] - levels[0])
        self.gamma = np.float32(gamma)
        self.horizon, self.targets = off.shape[1], off.shape[2]

    def ones(self) -> F32:
        return np.ones(self.targets, np.float32)

    def quantiles_many(self, points: F32, scales: F32 | None, widths: F32) -> F32:
        """``(quantiles, n, horizon, targets)`` for ``n`` whole forecasts ``points`` ``(n, horizon, targets)``, their
        ``scales`` ``(n, 1 or horizon, targets)`` or None, issued with ``widths`` ``(n, targets)``."""
        off = self.mid[None, None] + widths[None, :, None] * self.spread[:, None]  # (Q, n, H, T)
        out: F32 = points[None] + (off if scales is None else off * scales[None])
        return out

    def updated(self, width: F32, inside: F32) -> F32:
        """``width`` after a row whose revealed targets were inside the outer band at the share ``inside``
        ``(targets,)``."""
        m = width * np.exp(-self.gamma * (inside - self.nominal))
        out: F32 = np.clip(m, *WIDTH_LIMITS).astype(np.float32)
        return out

    def scored(self, ring: Ring, y: F32) -> tuple[F32, npt.NDArray[np.int64]]:
        """``y`` ``(targets,)``, the row after the ring's last one (step ``n - 1 - i`` of forecast ``i``), against
        each of the ring's forecasts: the share ``(targets,)`` whose outer band holds it, and how many of the
        ``n * targets`` values are at or below each quantile ``(quantiles,)``."""
        n = len(ring)
        idx = np.arange(n)
        steps = n - 1 - idx
        point = ring.points[idx, steps]  # (n, T)
        scale = 1.0 if ring.scales is None else ring.scales[idx, steps if ring.scales.shape[1] > 1 else 0]
        q = point[None] + (self.mid[steps][None] + ring.widths[None] * self.spread[:, steps]) * scale  # (Q, n, T)
        inside: F32 = ((y >= q[0]) & (y <= q[-1])).mean(axis=0, dtype=np.float32)
        below: npt.NDArray[np.int64] = (y <= q).sum(axis=(1, 2))
        return inside, below

    def advance(self, ring: Ring, width: F32, rows: F32, points: F32, scales: F32 | None, first: int) -> Advanced:
        """A session's ``ring`` and ``width`` after ``rows`` ``(k, targets)`` (z-scored targets of the observed rows,
        in order): before each row's forecast is issued, the row is scored against every forecast in the ring and
        the width moves. Rows ``first..k-1`` each issue a forecast (``points`` ``(k - first, horizon, targets)``,
        ``scales`` the same length); earlier rows issue none (the session is still warming up, so its ring is
        empty)."""
        h = self.horizon
        if len(points) != max(len(rows) - first, 0) or (first > 0 and len(ring)):
            raise ValueError(
                f"advance: {len(points)} forecasts for {len(rows)} rows from row {first} on, ring {len(ring)}"
            )
        # New arrays (also for an empty ring): the ring returned never holds a row of the batch's outputs.
        all_points = np.concatenate([ring.points, points])
        all_scales = None if scales is None else np.concatenate([ring.scales, scales])  # (ring's: as many)
        widths = np.empty((len(ring) + len(points), self.targets), np.float32)
        widths[: len(ring)] = ring.widths
        issued, count, below = len(ring), 0, np.zeros(len(self.spread), np.int64)
        for j, y in enumerate(rows):
            if issued:  # the forecasts issued on the last `horizon` rows before this one
                lo = max(0, issued - h)
                window = Ring(
                    all_points[lo:issued], None if all_scales is None else all_scales[lo:issued], widths[lo:issued]
                )
                inside, at_or_below = self.scored(window, y)
                width = self.updated(width, inside)
                count, below = count + len(window) * self.targets, below + at_or_below
            if j >= first:
                widths[issued] = width
                issued += 1
        keep = slice(max(0, issued - h), issued)

        def kept(a: F32) -> F32:  # a view, unless it would keep a backfill's far larger array alive
            return a[keep] if len(a) <= h + 1 else a[keep].copy()

        new = Ring(kept(all_points), None if all_scales is None else kept(all_scales), kept(widths))
        return Advanced(new, width, widths[len(ring) :], count, below)


@dataclass(frozen=True)
class Advanced:
    """``WidthRule.advance``'s result: the new ring (the last ``horizon`` forecasts), the new width, the width each
    new forecast was issued with ``(forecasts, targets)``, and the rows' scores: how many (row, target, forecast)
    values were scored and how many of them were at or below each quantile."""

    ring: Ring
    width: F32
    issued: F32
    scored: int
    below: npt.NDArray[np.int64]


def empty_ring(rule: WidthRule, scale_rows: int | None) -> Ring:
    """A ring that holds no forecast yet (``scale_rows``: 1 or horizon for a model with a scale output)."""
    h, t = rule.horizon, rule.targets
    scales = None if scale_rows is None else np.zeros((0, scale_rows, t), np.float32)
    return Ring(np.zeros((0, h, t), np.float32), scales, np.zeros((0, t), np.float32))
