"""seqserve.v1.Forecast: stateless Predict and session-backed Observe."""

from __future__ import annotations

import grpc

from service.api import converters as cv
from service.api.gen.seqserve.v1 import forecast_pb2, forecast_pb2_grpc
from service.api.interceptors import EdgedServer
from service.core.types import DataPlane
from service.metrics import Metrics
from service.settings import Settings

SERVICE = forecast_pb2.DESCRIPTOR.services_by_name["Forecast"].full_name
CAPABILITY = "forecast"  # what the served model must offer (service/core/tasks/base.py)
DEFAULT_MODEL = "forecaster"


class ForecastServicer(forecast_pb2_grpc.ForecastServicer):
    def __init__(self, dataplane: DataPlane, settings: Settings) -> None:
        self.dataplane = dataplane
        self.max_rows = settings.max_forecast_rows

    async def Predict(
        self, request: forecast_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> forecast_pb2.ForecastResponse:
        history = await cv.rows_array(request.history, "history", self.max_rows)  # (rows, features)
        model = cv.model_ref(request.model, DEFAULT_MODEL)
        result = await self.dataplane.forecast(model, history, columns=list(request.columns) or None)
        return cv.forecast_to_pb(result)

    async def Observe(
        self, request: forecast_pb2.ObserveRequest, context: grpc.aio.ServicerContext
    ) -> forecast_pb2.ForecastResponse:
        session_id = cv.require_id(request.session_id, "session_id")
        rows = await cv.rows_array(request.rows, "rows", self.max_rows)
        result = await self.dataplane.observe(session_id, rows, columns=list(request.columns) or None)
        return cv.forecast_to_pb(result)


def register(server: EdgedServer, dataplane: DataPlane, settings: Settings, metrics: Metrics) -> list[str]:
    forecast_pb2_grpc.add_ForecastServicer_to_server(ForecastServicer(dataplane, settings), server)
    return [SERVICE]
