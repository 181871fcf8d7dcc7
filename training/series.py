"""Forecasting data from any CSV: columns and targets, train/val/test split, train-split z-scores, windows.

``read_table`` (``service/tables.py``, shared with the ``seqserve`` client) reads and checks the file; this module
cuts it. Splits are row ranges ``[start, stop)``; a validation or test window's history may reach back ``window``
rows into the split before it (Informer's protocol), its targets never leave the split.

Presets reproduce the published ETT protocol (Informer, AAAI 2021): 12/4/4 months of 30 days, z-scored with the
train split's statistics, every stride-1 window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.core.manifest import Manifest
from service.tables import Table, TableError, read_table
from training.data import DataError, FloatArray

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Preset:
    split: str
    time_column: str
    frequency: str
    window: int = 96
    horizon: int = 96


PRESETS = {
    "ett-h": Preset("8640,2880,2880", "date", "1h"),  # ETTh1/ETTh2: 12/4/4 months of hourly rows
    "ett-m": Preset("34560,11520,11520", "date", "15min"),  # ETTm1/ETTm2: the same months, 4x the rows
}
DEFAULT_SPLIT = "0.7,0.1,0.2"  # the usual split of a custom series (Autoformer's "custom" data sets)
LEGACY = PRESETS["ett-h"]  # forecaster/1 predates manifest.forecast.split: it was trained on the ETTh1 protocol
SEASON = {"1h": 24, "15min": 96, "1D": 7, "MS": 12, "3MS": 4}  # seasonal-naive period per frequency


@dataclass
class Series:
    """A table cut for forecasting. ``z`` is every row z-scored with the train split's statistics."""

    path: Path
    columns: list[str]  # model inputs (targets first-class, covariates too), in file order
    targets: list[str]  # the forecast columns, a subset of ``columns`` in the same order
    split: dict[str, tuple[int, int]]
    mean: FloatArray  # (F,) train-split statistics, original units
    std: FloatArray  # (F,)
    z: FloatArray  # (rows, F)
    values: npt.NDArray[np.float64]  # (rows, F) the file's values, as read
    time_column: str | None = None
    frequency: str | None = None
    times: list[str] = field(default_factory=list)  # ISO text of each row's timestamp (empty without one)

    @property
    def target_index(self) -> list[int]:
        return [self.columns.index(t) for t in self.targets]

    def part(self, name: str, window: int) -> FloatArray:
        """Rows of split ``name``; val and test start ``window`` rows early (their first window's history)."""
        start, stop = self.split[name]
        return self.z[max(0, start - window if name != "train" else start) : stop]

    def raw(self) -> FloatArray:
        """Every row in original units, float32: the file's values (rebuilt from ``z``, a 0 came back as ~1e-8)."""
        out: FloatArray = self.values.astype(np.float32)
        return out


def parse_split(text: str, rows: int) -> dict[str, tuple[int, int]]:
    """``"0.7,0.1,0.2"`` (fractions of the rows) or ``"8640,2880,2880"`` (row counts), consecutive from row 0."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise DataError(f"--split: expected three numbers TRAIN,VAL,TEST (fractions or row counts), got {text!r}")
    try:
        if all(p.isdigit() for p in parts):
            counts = [int(p) for p in parts]
        else:
            fractions = [float(p) for p in parts]
            if any(not 0 < f < 1 for f in fractions) or sum(fractions) > 1 + 1e-9:
                raise DataError(f"--split: fractions must be in (0, 1) and sum to at most 1, got {text!r}")
            counts = [int(rows * f) for f in fractions]
            if abs(sum(fractions) - 1) < 1e-9:
                counts[2] = rows - counts[0] - counts[1]  # the test split ends at the last row
    except ValueError:
        raise DataError(f"--split: {text!r} is not three numbers TRAIN,VAL,TEST") from None
    if sum(counts) > rows:
        raise DataError(f"--split: {'+'.join(map(str, counts))} = {sum(counts)} rows, but the file has only {rows}")
    bounds = np.cumsum([0, *counts]).tolist()
    return {name: (int(bounds[i]), int(bounds[i + 1])) for i, name in enumerate(SPLITS)}


def check_sizes(path: Path, split: dict[str, tuple[int, int]], rows: int, window: int, horizon: int) -> None:
    """Every split must hold at least one window: train ``window + horizon`` rows, val/test ``horizon`` rows."""
    if rows < window + horizon:
        raise DataError(
            f"{path}: {rows} rows are too few for window {window} + horizon {horizon} = {window + horizon} rows "
            "(plus validation and test rows)"
        )
    a, b = split["train"]
    if b - a < window + horizon:
        raise DataError(
            f"{path}: the train split has {b - a} rows; window {window} + horizon {horizon} needs at least "
            f"{window + horizon}"
        )
    for name in ("val", "test"):
        a, b = split[name]
        if b - a < horizon:
            raise DataError(
                f"{path}: the {name} split has {b - a} rows; horizon {horizon} needs at least {horizon} "
                "(its history comes from the rows before it)"
            )


def load_series(
    path: Path,
    *,
    window: int,
    horizon: int,
    split: str | dict[str, tuple[int, int]],
    columns: list[str] | None = None,
    targets: list[str] | None = None,
    time_column: str | None = "auto",
    frequency: str | None = "auto",
) -> Series:
    """Read, check and split ``path``; z-score every column with the train split's mean and std."""
    try:
        table = read_table(path, time_column=time_column, columns=columns, frequency=frequency)
    except TableError as e:
        uneven = "the rows step by" in str(e)  # (a gap or an irregular step)
        hint = "; or, where the rows step unevenly by nature (business days), pass --freq irregular" if uneven else ""
        raise DataError(f"{e}{hint}") from None
    targets = list(targets or table.columns)
    unknown = [t for t in targets if t not in table.columns]
    if unknown:
        raise DataError(f"--targets: {unknown[0]!r} is not one of the input columns {table.columns}")
    twice = [t for i, t in enumerate(targets) if t in targets[:i]]
    if twice:
        raise DataError(f"--targets: {twice[0]!r} is named twice")
    targets = [c for c in table.columns if c in targets]  # the columns' order
    bounds = parse_split(split, table.rows) if isinstance(split, str) else split
    check_sizes(path, bounds, table.rows, window, horizon)
    return _normalize(table, targets, bounds)


def _normalize(table: Table, targets: list[str], split: dict[str, tuple[int, int]]) -> Series:
    a, b = split["train"]
    train = table.values[a:b]
    mean, std = train.mean(axis=0), train.std(axis=0)
    flat = [c for c, s in zip(table.columns, std, strict=True) if not s > 0]
    if flat:
        raise DataError(f"{table.path}: column {flat[0]!r} is constant over the train split (std 0): drop it")
    z = ((table.values - mean) / std).astype(np.float32)
    times = [t.isoformat(sep=" ") for t in table.times] if table.times else []
    return Series(
        table.path, table.columns, targets, split, mean.astype(np.float32), std.astype(np.float32), z, table.values,
        table.time_column, table.frequency, times,
    )  # fmt: skip


def series_for(m: Manifest, path: Path) -> Series:
    """The data ``m`` was trained on, re-read and re-split as its manifest records (checked: same statistics)."""
    assert m.forecast is not None and m.normalization is not None
    f, norm = m.forecast, m.normalization
    split = {k: (v[0], v[1]) for k, v in f.split.items()} or LEGACY.split
    series = load_series(
        path, window=f.window, horizon=f.horizon, split=split, columns=list(norm.columns),
        targets=list(f.targets) or None, time_column=f.time_column or (None if f.split else LEGACY.time_column),
        frequency=f.frequency or "auto",
    )  # fmt: skip
    if not np.allclose(series.mean, norm.mean, rtol=1e-4) or not np.allclose(series.std, norm.std, rtol=1e-4):
        raise DataError(f"{path}: train-split statistics differ from the model's manifest.normalization")
    return series


def windows(
    series: FloatArray, window: int, horizon: int, targets: list[int] | None = None
) -> tuple[FloatArray, FloatArray]:
    """Every (history, target) pair, stride 1 -> x (N, window, F), y (N, horizon, T) (T = targets, default all)."""
    n = len(series) - window - horizon + 1
    if n < 1:
        raise DataError(f"series of {len(series)} rows is too short for window {window} + horizon {horizon}")
    idx = np.arange(n)[:, None]
    x = series[idx + np.arange(window)[None, :]]
    y = series[idx + window + np.arange(horizon)[None, :]]
    return x, (y if targets is None else y[:, :, targets])
