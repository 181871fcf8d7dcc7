"""What every ``python -m bench.<section>`` command shares: its parser (``--models``, ``--out``) and the JSON it
writes."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
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


def setting(text: str) -> tuple[str, str]:
    """argparse type of ``--env KEY=VALUE``: a server setting as its environment variable (``SEQSERVE_*``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("SEQSERVE_"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a setting as SEQSERVE_NAME=VALUE (README, Configuration)")
    return key, value


def add_settings(ap: argparse.ArgumentParser, flag: str, whose: str) -> None:
    """``flag KEY=VALUE ...``: server settings (``setting``), parsed as a list of (key, value)."""
    ap.add_argument(flag, nargs="*", type=setting, default=[], metavar="KEY=VALUE", help=f"SEQSERVE_* for {whose}")


# How long the cleanup after SIGTERM may take before the bench stops waiting for it: more than bench.launch.stop
# gives one server to stop gracefully (60 s) before it kills it, so a slow stop is not mistaken for a hang.
CLEANUP_S = 75.0


def run(main: Callable[[], int]) -> NoReturn:
    """``python -m bench.<section>``: SIGTERM (a ``timeout``, a cancelled CI job, ``kill``) exits through the same
    cleanup as a normal end, so the servers, floors and perf_analyzer it started stop and their temporary folders
    go (Python's default SIGTERM ends the process without running any ``finally``, orphaning them). A cleanup that
    has not finished ``CLEANUP_S`` after the signal (the exit lands at any bytecode, e.g. inside a gRPC callback, and
    a wait in the cleanup may then never end) is cut short: the bench writes every thread's stack to stderr, kills
    what it started and exits. SIGUSR1 writes every thread's stack to stderr and goes on (``kill -USR1 PID``: where
    a bench that seems stuck is)."""
    signal.signal(signal.SIGTERM, _terminate)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    sys.exit(main())


def _terminate(signum: int, frame: object) -> NoReturn:
    threading.Thread(target=_last_resort, args=(signum, CLEANUP_S), daemon=True, name="sigterm-watchdog").start()
    sys.exit(128 + signum)


def _last_resort(signum: int, after_s: float) -> None:
    """Runs beside the cleanup; returns only if the process outlived it by ``after_s`` (then nothing returns)."""
    time.sleep(after_s)
    print(f"bench: the cleanup after signal {signum} took over {after_s:g} s; stopped. Its threads:", file=sys.stderr)
    faulthandler.dump_traceback(all_threads=True)
    for pid in reversed(descendants(os.getpid())[1:]):  # the deepest first: none is left to be adopted by init
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    os._exit(128 + signum)


def server_processes(pid: int, engines: Sequence[int]) -> list[int]:
    """A server's processes for CPU accounting: its ``engines`` first (the first one is ``pid``), then the rest of
    ``pid``'s descendants (frontends, ...)."""
    first = list(engines) or [pid]
    return first + [p for p in descendants(pid) if p not in first]


def descendants(pid: int) -> list[int]:
    """``pid`` and all its live descendants, parents before children (started from any of their threads)."""
    out, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        kids: list[int] = []
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids += [int(k) for k in task.read_text().split()]
        out += kids
        todo += kids
    return out


def python_speed_us() -> float:
    """This machine's speed at Python bytecode now: microseconds per ``sum(range(1000))``, the best of 5 timeit
    repeats (``python -m timeit "sum(range(1000))"``). This shared machine's speed drifts 2-3x between hours; a run
    that records it at its start and end says which kind of hour it measured (lower is faster)."""
    import timeit

    number = 2000
    return round(min(timeit.repeat("sum(range(1000))", number=number, repeat=5)) / number * 1e6, 2)


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
