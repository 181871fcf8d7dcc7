"""Tiny generated data sets in the real files' formats (tests never touch ../shared/data)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def tiny_text(tmp_path: Path) -> Path:
    lines = ["ROMEO:\nBut soft, what light through yonder window breaks?\n", "JULIET:\nO Romeo, Romeo!\n"]
    p = tmp_path / "input.txt"
    p.write_text("".join(lines[i % 2] for i in range(60)), encoding="utf-8")
    return p


@pytest.fixture
def tiny_sst2(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    pos = ["a great movie", "good fun", "i love this film", "wonderful and warm", "great acting"]
    neg = ["a terrible movie", "boring", "i hate this film", "dull and cold", "bad acting"]
    d = tmp_path / "sst2"
    d.mkdir()
    for name, n in (("train.tsv", 300), ("dev.tsv", 40)):
        rows = []
        for _ in range(n):
            y = int(rng.integers(0, 2))
            rows.append(f"{rng.choice(pos if y else neg)} \t{y}")
        (d / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return d


@pytest.fixture
def tiny_ett(tmp_path: Path) -> Path:
    """14,400 hourly rows of 3 noisy daily sines: just enough rows for the standard ETTh1 split."""
    rng = np.random.default_rng(0)
    t = np.arange(14_400)
    cols = [np.sin(2 * np.pi * t / 24 + k) * (k + 1) + 0.1 * rng.standard_normal(len(t)) + k for k in range(3)]
    t0 = dt.datetime(2016, 7, 1)
    stamps = [(t0 + dt.timedelta(hours=int(i))).isoformat(sep=" ") for i in t]
    lines = ["date,A,B,OT"] + [f"{stamps[i]},{cols[0][i]:.4f},{cols[1][i]:.4f},{cols[2][i]:.4f}" for i in t]
    p = tmp_path / "ett.csv"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def write_csv(path: Path, rows: int = 480, start: str = "2021-01-01 00:00:00", seed: int = 0) -> Path:
    """Hourly ``time,load,temp,price`` rows: daily sines with noise; ``price`` follows ``load`` two hours later."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows + 2)
    load = np.sin(2 * np.pi * t / 24) + 0.1 * rng.standard_normal(len(t))
    temp = 0.5 * np.cos(2 * np.pi * t / 24) + 0.1 * rng.standard_normal(len(t)) + 3
    price = 2 * np.roll(load, 2) + 5 + 0.05 * rng.standard_normal(len(t))
    t0 = dt.datetime.fromisoformat(start)
    lines = ["time,load,temp,price"]
    for i in range(2, rows + 2):
        stamp = (t0 + dt.timedelta(hours=i - 2)).isoformat(sep=" ")
        lines.append(f"{stamp},{load[i]:.4f},{temp[i]:.4f},{price[i]:.4f}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_csv(tmp_path: Path) -> Path:
    """480 hourly rows of 3 columns with a time column (a user's own CSV, not ETT)."""
    return write_csv(tmp_path / "sales.csv")
