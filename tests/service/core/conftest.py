"""Fixtures for the core tests: a started ``CoreDataPlane`` over the tiny model repository (``tiny_models`` in
tests/conftest.py), a metrics object that also records what the core reported, and repository copies that a
test may change (add a version, corrupt a file)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from service.core.dataplane import CoreDataPlane
from service.core.manifest import MANIFEST_FILE
from service.core.types import Tensor
from service.metrics import Metrics
from service.settings import Settings
from tests.clock import FakeClock


class RecordingMetrics(Metrics):
    """The real metrics, plus a log of the calls the tests check (batch sizes, session events)."""

    def __init__(self) -> None:
        super().__init__(runtime_collectors=False)
        self.batches: list[tuple[str, int]] = []
        self.events: list[tuple[str, str]] = []
        self.loaded: list[tuple[str, int, str, bool]] = []
        self.generated = 0
        self.requests: list[tuple[int, int | None]] = []  # (rows, requests observed) per batch

    def inference(
        self,
        model: str,
        version: int,
        queue_seconds: float,
        compute_seconds: float,
        batch_size: int,
        requests: int | None = None,
    ) -> None:
        super().inference(model, version, queue_seconds, compute_seconds, batch_size, requests)
        self.batches.append((model, batch_size))
        self.requests.append((batch_size, requests))

    def session_event(self, model: str, event: str) -> None:
        super().session_event(model, event)
        self.events.append((model, event))

    def model_loaded(self, model: str, version: int, provider: str, load_seconds: float, ready: bool) -> None:
        super().model_loaded(model, version, provider, load_seconds, ready)
        self.loaded.append((model, version, provider, ready))

    def chars_generated(self, model: str, count: int) -> None:
        super().chars_generated(model, count)
        self.generated += count

    def batch_sizes(self, model: str) -> list[int]:
        return [n for m, n in self.batches if m == model]


def core_settings(models: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"models": models, "device": "cpu", "max_batch_delay_ms": 1.0}
    values.update(overrides)
    return Settings(**values)


def texts(*values: str) -> list[Tensor]:
    """A KServe TEXT input of these texts (one BYTES row each)."""
    return [Tensor("TEXT", "BYTES", (len(values),), items=[t.encode() for t in values])]


async def memory_dp(models: Path, **overrides: Any) -> CoreDataPlane:
    """A started data plane on the in-memory session store (for tests where the store does not matter); the caller
    stops it."""
    dp = CoreDataPlane(core_settings(models, session_store="memory", **overrides), RecordingMetrics())
    await dp.start()
    return dp


def recorded(dp: CoreDataPlane) -> RecordingMetrics:
    assert isinstance(dp.metrics, RecordingMetrics)
    return dp.metrics


MakeDP = Callable[..., Awaitable[CoreDataPlane]]


@pytest.fixture
async def make_dp(tiny_models: Path, session_store: str) -> AsyncIterator[MakeDP]:
    """``await make_dp(models=..., **settings)``: a started data plane (on each session store), stopped when the
    test ends."""
    made: list[CoreDataPlane] = []

    async def make(models: Path | None = None, clock: FakeClock | None = None, **overrides: Any) -> CoreDataPlane:
        overrides.setdefault("session_store", session_store)
        settings = core_settings(models or tiny_models, **overrides)
        dp = CoreDataPlane(settings, RecordingMetrics(), clock=clock or time.time)
        made.append(dp)
        await dp.start()
        return dp

    yield make
    for dp in made:
        await dp.stop()


@pytest.fixture
async def dp(make_dp: MakeDP) -> CoreDataPlane:
    return await make_dp()


@pytest.fixture
def repo(tiny_models: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny repository that the test may modify."""
    root = tmp_path / "models"
    shutil.copytree(tiny_models, root)
    return root


def add_version(root: Path, name: str, src: int, dst: int) -> Path:
    """Copies ``name/src`` to ``name/dst`` with the manifest's version updated (same weights, valid sha256)."""
    out = root / name / str(dst)
    shutil.copytree(root / name / str(src), out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["version"] = dst
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


SCALED_FLOOR = [0.05] * 7  # the scale floor of ``scaled_repo``'s model, per feature


@pytest.fixture(scope="session")
def scaled_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``plain/1``: the tiny forecaster (window 24, horizon 12, 7 features); ``scaled/1``: the same weights (same
    seed) plus a grafted ``scale`` output (std of each column's last 5 changes, floored at ``SCALED_FLOOR``)."""
    from tests.tiny_models import export_tiny
    from training.scale import add_scale_output

    root = tmp_path_factory.mktemp("scaled-models")
    export_tiny("forecast", root, name="plain", cell="gru")
    out = export_tiny("forecast", root, name="scaled", cell="gru")
    add_scale_output(out, "std", 5, SCALED_FLOOR)
    return root
