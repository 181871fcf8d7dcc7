"""The tests in this folder run on uvloop (the ``event_loop`` setting's other loop, the ``uvloop`` extra)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

uvloop = pytest.importorskip("uvloop")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop}
