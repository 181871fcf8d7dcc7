"""argparse types that refuse a bad number or name list with a message saying what the option takes.

Shared by ``seqserve`` and ``seqserve-train``: ``--rows 0`` or ``--window 0`` is refused before any work, with
argparse's usual ``error: argument --rows: must be >= 1, got 0`` and exit status 2, instead of a traceback or a
silently meaningless run.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option prints ONE line (no usage block), as every other problem does, and exits 2; a
    subcommand's ``--help`` opens with the line its parent's lists for it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _Commands)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


class _Commands(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Subcommands whose description, unless given, is their ``help``."""

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        kwargs.setdefault("description", kwargs.get("help"))
        return super().add_parser(name, **kwargs)


INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def count(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number >= ``low`` (and <= ``high``: the range of the protobuf field it fills, so an option too large
    for the wire is named, not a bare "Value out of range" from protobuf)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    return parse


def real(low: float, high: float | None = None, *, above: bool = False, below: bool = True) -> Callable[[str], float]:
    """A finite number from ``low`` (excluded when ``above``) up to ``high`` (excluded when ``below``; None = no
    upper bound)."""
    if high is None:
        span = f"> {low:g}" if above else f">= {low:g}"
    else:
        span = f"in {'(' if above else '['}{low:g}, {high:g}{')' if below else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        ok = math.isfinite(value) and (value > low if above else value >= low)
        if ok and high is not None:
            ok = value < high if below else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return value

    return parse


def finite(text: str) -> float:
    """Any finite number (``nan`` and ``inf`` refused: a comparison with them is always false)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def names(text: str) -> str:
    """Comma-separated column names, none of them empty (kept as the text; callers split it)."""
    if not text.strip() or any(not part.strip() for part in text.split(",")):
        raise argparse.ArgumentTypeError(f"expected comma-separated column names, got {text!r}")
    return text
