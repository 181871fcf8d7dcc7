"""An injectable wall clock for session TTL tests: time moves only when the test says so (no sleeping)."""

from __future__ import annotations


class FakeClock:
    """Unix seconds, starting at ``start``; ``advance`` moves it. Safe to read from the server's thread."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
