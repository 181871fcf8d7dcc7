"""seqserve.v1.Sentiment: batch text classification."""

from __future__ import annotations

import grpc

from service.api import converters as cv
from service.api.gen.seqserve.v1 import sentiment_pb2, sentiment_pb2_grpc
from service.core.types import DataPlane
from service.settings import Settings

SERVICE = sentiment_pb2.DESCRIPTOR.services_by_name["Sentiment"].full_name
CAPABILITY = "classify"  # what the served model must offer (service/core/tasks/base.py)
DEFAULT_MODEL = "sentiment"


class SentimentServicer(sentiment_pb2_grpc.SentimentServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def Classify(
        self, request: sentiment_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> sentiment_pb2.ClassifyResponse:
        results = await self.dataplane.classify(cv.model_ref(request.model, DEFAULT_MODEL), list(request.texts))
        return cv.classify_response(results)


def register(server: grpc.aio.Server, dataplane: DataPlane, settings: Settings) -> list[str]:
    sentiment_pb2_grpc.add_SentimentServicer_to_server(SentimentServicer(dataplane), server)
    return [SERVICE]
