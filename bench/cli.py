"""What every ``python -m bench.<section>`` command shares: its parser (``--models``, ``--out``) and the JSON it
writes."""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def parser(doc: str | None, out: str | None = None) -> argparse.ArgumentParser:
    """A parser with the module's docstring as help, ``--models`` (the committed models) and, when ``out`` names a
    file, ``--out`` (default ``bench/results/<out>``)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    if out is not None:
        ap.add_argument("--out", type=Path, default=RESULTS / out)
    return ap


def run(main: Callable[[], int]) -> NoReturn:
    """``python -m bench.<section>``: SIGTERM (a ``timeout``, a cancelled CI job, ``kill``) exits through the same
    cleanup as a normal end, so the servers, floors and perf_analyzer it started stop and their temporary folders
    go (Python's default SIGTERM ends the process without running any ``finally``, orphaning them). SIGUSR1 writes
    every thread's stack to stderr and goes on (``kill -USR1 PID``: where a bench that seems stuck is)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    sys.exit(main())


def write_json(path: Path, result: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def percentiles(seconds: list[float]) -> dict[str, float]:
    """Latency samples in seconds -> n, p50, p99, mean and max in milliseconds (just n when there are none)."""
    if not seconds:
        return {"n": 0}
    a = np.asarray(seconds) * 1e3
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "max_ms": float(a.max()),
        "n": len(seconds),
    }
