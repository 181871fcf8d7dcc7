"""An adaptive-width forecast session (its ring of the last ``horizon`` forecasts and its width, about 260 KiB for
the ETT models) lives in Redis like any other session: two replicas on one real ``redis-server`` continue it turn
by turn, and it ends exactly where a session on the in-memory store ends."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from service.client import Client
from tests.conftest import ServerHandle
from tests.redis.servers import RedisServer
from tests.service.core.test_forecast_adaptive import _copy
from tests.service.core.test_forecast_scale import WINDOW, series


@pytest.fixture(scope="module")
def adaptive_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import export_tiny
    from training.scale import add_scale_output

    root = tmp_path_factory.mktemp("adaptive-redis")
    scaled = export_tiny("forecast", root / "src", name="scaled", cell="gru")
    add_scale_output(scaled, "std", 5, [0.05] * 7)
    _copy(scaled, root / "models" / "adaptive" / "1", 0.05)
    return root / "models"


def test_replicas_take_turns_on_a_session_with_a_ring(
    redis_server: RedisServer, start_replica: Callable[..., ServerHandle], adaptive_models: Path
) -> None:
    history = series(WINDOW + 40, volatility=2.0, seed=21)
    cuts = [0, WINDOW - 3, WINDOW + 1, WINDOW + 2, WINDOW + 30, len(history)]
    alone = Client(start_replica("memory://", models=adaptive_models).target)
    a = Client(start_replica(redis_server.url, models=adaptive_models).target)
    b = Client(start_replica(redis_server.url, models=adaptive_models).target)
    want = alone.create_session("adaptive").id
    sid = a.create_session("adaptive").id
    for turn, (lo, hi) in enumerate(itertools.pairwise(cuts)):
        expected = alone.observe(want, history[lo:hi])
        got = (a if turn % 2 == 0 else b).observe(sid, history[lo:hi])  # each turn on the other replica
        np.testing.assert_array_equal(got.quantiles, expected.quantiles)
        assert got.rows_seen == expected.rows_seen == hi
    assert expected.quantiles.shape == (3, 12, 7)
