"""training/series.py: splits (fractions, row counts, presets), sizes with their numbers, covariates, windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.core.manifest import MANIFEST_FILE, Manifest
from tests.tiny_models import ETT_COLUMNS, export_tiny
from training.data import DataError
from training.series import PRESETS, check_sizes, load_series, parse_split, series_for, windows


def _error(fn: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kwargs)  # type: ignore[operator]
    assert "\n" not in str(e.value)
    return str(e.value)


def test_split_fractions_and_counts() -> None:
    assert parse_split("0.7,0.1,0.2", 1000) == {"train": (0, 700), "val": (700, 800), "test": (800, 1000)}
    assert parse_split("0.5,0.2,0.2", 1000) == {"train": (0, 500), "val": (500, 700), "test": (700, 900)}
    assert parse_split("96,24,24", 144) == {"train": (0, 96), "val": (96, 120), "test": (120, 144)}
    assert _error(parse_split, "0.7,0.3", 10) == (
        "--split: expected three numbers TRAIN,VAL,TEST (fractions or row counts), got '0.7,0.3'"
    )
    assert _error(parse_split, "0.7,0.2,0.2", 10) == (
        "--split: fractions must be in (0, 1) and sum to at most 1, got '0.7,0.2,0.2'"
    )
    assert _error(parse_split, "a,b,c", 10) == "--split: 'a,b,c' is not three numbers TRAIN,VAL,TEST"
    assert (
        _error(parse_split, "8640,2880,2880", 1000)
        == "--split: 8640+2880+2880 = 14400 rows, but the file has only 1000"
    )


def test_ett_presets_are_informers_protocol() -> None:
    h, m = PRESETS["ett-h"], PRESETS["ett-m"]
    assert parse_split(h.split, 17420) == {"train": (0, 8640), "val": (8640, 11520), "test": (11520, 14400)}
    assert parse_split(m.split, 69680)["test"] == (46080, 57600)  # 4x the rows of the hourly protocol
    assert (h.frequency, m.frequency, h.time_column, h.window, h.horizon) == ("1h", "15min", "date", 96, 96)


def test_too_few_rows_says_the_numbers(tmp_path: Path) -> None:
    p = Path("f.csv")
    split = {"train": (0, 50), "val": (50, 60), "test": (60, 100)}
    assert _error(check_sizes, p, split, 100, 48, 24) == (
        "f.csv: the train split has 50 rows; window 48 + horizon 24 needs at least 72"
    )
    assert _error(check_sizes, p, split, 60, 96, 24) == (
        "f.csv: 60 rows are too few for window 96 + horizon 24 = 120 rows (plus validation and test rows)"
    )
    split = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}
    assert _error(check_sizes, p, split, 100, 24, 12) == (
        "f.csv: the val split has 10 rows; horizon 12 needs at least 12 (its history comes from the rows before it)"
    )


def test_load_series_with_covariates(tiny_csv: Path) -> None:
    s = load_series(tiny_csv, window=24, horizon=12, split="0.7,0.1,0.2", targets=["price", "load"])
    assert (s.time_column, s.frequency, s.columns) == ("time", "1h", ["load", "temp", "price"])
    assert s.targets == ["load", "price"] and s.target_index == [0, 2]  # kept in the columns' order
    assert s.split == {"train": (0, 336), "val": (336, 384), "test": (384, 480)}
    a, b = s.split["train"]
    np.testing.assert_allclose(s.z[a:b].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(s.z[a:b].std(0), 1, atol=1e-4)
    np.testing.assert_allclose(
        s.raw()[5], np.loadtxt(tiny_csv, delimiter=",", skiprows=6, usecols=(1, 2, 3))[0], atol=1e-3
    )
    test = s.part("test", 24)
    assert len(test) == 96 + 24  # the first window's history comes from the val rows
    x, y = windows(test, 24, 12, s.target_index)
    assert x.shape == (96 - 12 + 1, 24, 3) and y.shape == (85, 12, 2)
    np.testing.assert_array_equal(y[0, 0], test[24, [0, 2]])
    assert _error(load_series, tiny_csv, window=24, horizon=12, split="0.7,0.1,0.2", targets=["cost"]) == (
        "--targets: 'cost' is not one of the input columns ['load', 'temp', 'price']"
    )


def test_constant_column_is_named(tmp_path: Path) -> None:
    p = tmp_path / "c.csv"
    p.write_text("x,flat\n" + "".join(f"{i % 7},3\n" for i in range(60)))
    assert _error(load_series, p, window=6, horizon=3, split="0.6,0.2,0.2") == (
        f"{p}: column 'flat' is constant over the train split (std 0): drop it"
    )


def test_a_numeric_column_named_like_time_is_data_and_targets_are_named_once(tmp_path: Path) -> None:
    """``month`` of 1..12 (or ``time`` in elapsed seconds) was forced to be the time column and read as timestamps;
    it is data when its cells are numbers. ``--targets a,a`` is refused like ``--columns a,a``."""
    p = tmp_path / "m.csv"
    rows = [f"{i % 12 + 1},{np.sin(i / 3) + 0.01 * i:.4f}" for i in range(300)]
    p.write_text("month,load\n" + "\n".join(rows) + "\n")
    s = load_series(p, window=24, horizon=12, split="0.7,0.1,0.2")
    assert s.columns == ["month", "load"] and s.time_column is None
    message = _error(load_series, p, window=24, horizon=12, split="0.7,0.1,0.2", targets=["load", "load"])
    compact = tmp_path / "c.csv"  # 20160701 reads as a number and as an ISO date: a date column stays the time
    compact.write_text("date,load\n" + "".join(f"201607{d:02d},{d * 0.5:.1f}\n" for d in range(1, 31)))
    c = load_series(compact, window=4, horizon=2, split="0.7,0.1,0.2")
    assert c.columns == ["load"] and c.time_column == "date" and c.frequency == "1D"
    assert message == "--targets: 'load' is named twice"


def test_split_fractions_round_down_and_the_test_split_keeps_the_last_row() -> None:
    """1001 rows at 0.7/0.1/0.2: train and val are rounded down, the test split ends at the file's last row
    (none is lost)."""
    assert parse_split("0.7,0.1,0.2", 1001) == {"train": (0, 700), "val": (700, 800), "test": (800, 1001)}
    # fractions summing to less than 1 leave the tail unused, each count rounded down
    assert parse_split("0.5,0.25,0.2", 1003) == {"train": (0, 501), "val": (501, 751), "test": (751, 951)}


def test_split_mixing_counts_and_fractions_or_a_zero_fraction_is_refused() -> None:
    """'96,0.1,24' is neither three counts nor three fractions; a zero fraction is outside (0, 1)."""
    assert _error(parse_split, "96,0.1,24", 144) == (
        "--split: fractions must be in (0, 1) and sum to at most 1, got '96,0.1,24'"
    )
    assert _error(parse_split, "0.8,0.0,0.2", 100) == (
        "--split: fractions must be in (0, 1) and sum to at most 1, got '0.8,0.0,0.2'"
    )
    # a sum just above 1 is refused too; float noise at exactly 1 is not
    assert _error(parse_split, "0.7,0.2,0.11", 100).startswith("--split: fractions must be in (0, 1) and sum to")
    assert parse_split("0.6,0.3,0.1", 10) == {"train": (0, 6), "val": (6, 9), "test": (9, 10)}


def test_split_sizes_at_the_boundaries_and_a_short_test_split() -> None:
    """Exactly window + horizon train rows and exactly horizon val/test rows are enough; one train row fewer is
    refused; a test split shorter than the horizon is named like a short val split (before training, not after
    it at evaluation)."""
    p = Path("f.csv")
    check_sizes(p, {"train": (0, 72), "val": (72, 96), "test": (96, 120)}, 120, 48, 24)  # no error
    assert _error(check_sizes, p, {"train": (0, 71), "val": (71, 95), "test": (95, 119)}, 119, 48, 24) == (
        "f.csv: the train split has 71 rows; window 48 + horizon 24 needs at least 72"
    )
    assert _error(check_sizes, p, {"train": (0, 80), "val": (80, 92), "test": (92, 100)}, 100, 24, 12) == (
        "f.csv: the test split has 8 rows; horizon 12 needs at least 12 (its history comes from the rows before it)"
    )


def test_series_for_refuses_data_whose_train_statistics_differ_from_the_manifest(tmp_path: Path) -> None:
    """evaluate/calibrate re-read the training file through series_for; a different file (or an edited one) must be
    refused, not scored with the model's statistics."""
    model = export_tiny("forecast", tmp_path, name="fc")
    m = Manifest.load(model / MANIFEST_FILE)
    assert m.forecast is not None and m.normalization is not None
    rng = np.random.default_rng(0)
    data = tmp_path / "ett7.csv"
    rows = [",".join(f"{v:.4f}" for v in rng.standard_normal(7) * 2 + 10) for _ in range(200)]
    data.write_text(",".join(ETT_COLUMNS) + "\n" + "\n".join(rows) + "\n")
    split = {"train": [0, 120], "val": [120, 160], "test": [160, 200]}
    m = m.model_copy(update={"forecast": m.forecast.model_copy(update={"split": split})})
    assert (
        _error(series_for, m, data) == f"{data}: train-split statistics differ from the model's manifest.normalization"
    )
    values = np.loadtxt(data, delimiter=",", skiprows=1)[:120]  # the same file with its own statistics: accepted
    assert m.normalization is not None
    norm = m.normalization.model_copy(update={"mean": values.mean(0).tolist(), "std": values.std(0).tolist()})
    s = series_for(m.model_copy(update={"normalization": norm}), data)
    assert s.split == {"train": (0, 120), "val": (120, 160), "test": (160, 200)} and s.columns == ETT_COLUMNS


def test_raw_is_the_files_values_not_rebuilt_from_z_scores(tiny_csv: Path, tmp_path: Path) -> None:
    """MASE/MAPE and the zero check before MAPE use ``raw()``: the file's values exactly, a 0 stays 0."""
    s = load_series(tiny_csv, window=24, horizon=12, split="0.7,0.1,0.2")
    want = np.loadtxt(tiny_csv, delimiter=",", skiprows=1, usecols=(1, 2, 3))
    np.testing.assert_array_equal(s.raw(), want.astype(np.float32))
    p = tmp_path / "solar.csv"
    p.write_text("x,solar\n" + "".join(f"{i % 7},{max(0.0, np.sin(i / 4)) * 3.7:.3f}\n" for i in range(120)))
    solar = load_series(p, window=12, horizon=6, split="0.6,0.2,0.2").raw()[:, 1]
    assert (solar == 0).sum() == sum(max(0.0, np.sin(i / 4)) * 3.7 < 0.0005 for i in range(120)) > 0
