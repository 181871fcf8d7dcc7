"""``seqserve forecast --plot``: history, point forecast and the outer quantile band (p10-p90), one panel per
forecast column (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from service.core.types import ForecastResult


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or the 'train' extra)") from exc
    return plt


def plot_path(path: Path) -> Path:
    """Where ``--plot PATH`` writes: PATH, with ``.png`` added when it names no format (matplotlib would add it,
    and the message would name a file that does not exist). A format matplotlib cannot write, a folder that does
    not exist or cannot be written and a name that is a folder are refused before anything is asked of the server
    (a missing folder failed with a bare "[Errno 2] No such file or directory" after the forecast was printed)."""
    target = path if path.suffix else path.with_name(path.name + ".png")
    folder = target.parent
    if target.is_dir():
        raise RuntimeError(f"--plot {path}: {target} is a folder; name an image file, e.g. {target / 'forecast.png'}")
    if folder.exists() and not folder.is_dir():
        raise RuntimeError(f"--plot {path}: {folder} is a file, not a folder; name a file in a folder")
    if not folder.is_dir():
        raise RuntimeError(f"--plot {path}: folder {folder} does not exist; create it, or name a file in a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RuntimeError(f"--plot {path}: folder {folder} is not writable; name a file in a folder you can write")
    if target.exists() and not os.access(target, os.W_OK):
        raise RuntimeError(f"--plot {path}: {target} is not writable; name another file, or make it writable")
    if target is not path:
        return target
    _pyplot()  # (matplotlib is there)
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise RuntimeError(f"--plot {path}: {path.suffix!r} is not an image format; use one of {sorted(formats)}")
    return path


def plot_forecast(path: Path, columns: list[str], history: np.ndarray[Any, Any], result: ForecastResult) -> None:
    """One panel per feature: history, the point forecast and the lowest-highest quantile band (p10-p90)."""
    plt = _pyplot()
    n, t = len(result.columns), history.shape[0]
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.2 * n), sharex=True, squeeze=False)
    steps = np.arange(t, t + result.point.shape[0])
    for f, ax in enumerate(axes[:, 0]):
        hist_col = columns.index(result.columns[f]) if result.columns[f] in columns else f
        ax.plot(np.arange(t), history[:, hist_col], color="black", lw=1, label="history")
        ax.plot(steps, result.point[:, f], color="tab:blue", lw=1, label="forecast")
        if len(result.quantile_levels) >= 2:
            lo, hi = result.quantiles[0, :, f], result.quantiles[-1, :, f]
            band = f"p{round(100 * result.quantile_levels[0])}-p{round(100 * result.quantile_levels[-1])}"
            ax.fill_between(steps, lo, hi, color="tab:blue", alpha=0.25, label=band)
        ax.set_ylabel(result.columns[f])
    axes[0, 0].legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
