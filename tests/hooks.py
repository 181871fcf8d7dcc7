"""Spies and delays around a model's ONNX Runtime runs, for tests.

``Runtime`` and ``Batcher`` are compiled (service/compiled.py) and take no patched methods, so tests wrap the
runtime's ONNX Runtime session instead: ``hook_runs(monkeypatch, runtime, around)`` calls ``around(run, feeds)``
for every run, where ``run()`` runs the real session and returns its outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from service.core.runtime import Runtime

Around = Callable[[Callable[[], Any], dict[str, Any]], Any]


class HookedSession:
    """Stands in for an ``onnxruntime.InferenceSession``: ``run`` goes through ``around``, the rest to the real one."""

    def __init__(self, real: Any, around: Around) -> None:
        self.real, self.around = real, around

    def run(self, names: Any, feeds: dict[str, Any], *options: Any) -> Any:
        return self.around(lambda: self.real.run(names, feeds, *options), feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def hook_runs(monkeypatch: pytest.MonkeyPatch, runtime: Runtime, around: Around) -> None:
    """Every run of ``runtime`` from now on goes through ``around`` (undone with the test's monkeypatch)."""
    monkeypatch.setattr(runtime, "session", HookedSession(runtime.session, around))
