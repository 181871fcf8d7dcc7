"""Thin gRPC servicers, one module per proto service: protobuf -> domain types -> one data-plane call -> back.

``REGISTRARS`` is the list the server walks at start-up. Each registrar adds its servicer(s) to the server and
returns the full service names it registered (for health and reflection); the metrics are there for what the edge
cannot see (requests answered inside a stream). Add a transport by appending here.
"""

from __future__ import annotations

from collections.abc import Callable

from service.api import kserve
from service.api.interceptors import EdgedServer
from service.api.servicers import autocomplete, forecast, sentiment, sessions
from service.core.types import DataPlane
from service.metrics import Metrics
from service.settings import Settings

Registrar = Callable[[EdgedServer, DataPlane, Settings, Metrics], list[str]]

REGISTRARS: list[Registrar] = [
    sentiment.register,
    autocomplete.register,
    forecast.register,
    sessions.register,
    kserve.register,
]

# The capability a service needs from some ready model before its health status says SERVING (others: any).
SERVICE_CAPABILITIES: dict[str, str] = {
    sentiment.SERVICE: sentiment.CAPABILITY,
    autocomplete.SERVICE: autocomplete.CAPABILITY,
    forecast.SERVICE: forecast.CAPABILITY,
    sessions.SERVICE: sessions.CAPABILITY,
}
