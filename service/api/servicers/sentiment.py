"""seqserve.v1.Sentiment: batch text classification."""

from __future__ import annotations

import grpc

from service.api import converters as cv
from service.api.gen.seqserve.v1 import sentiment_pb2, sentiment_pb2_grpc
from service.api.interceptors import EdgedServer
from service.core.types import DataPlane
from service.metrics import Metrics
from service.settings import Settings

SERVICE = sentiment_pb2.DESCRIPTOR.services_by_name["Sentiment"].full_name
CAPABILITY = "classify"  # what the served model must offer (service/core/tasks/base.py)
DEFAULT_MODEL = "sentiment"


class SentimentServicer(sentiment_pb2_grpc.SentimentServicer):
    def __init__(self, dataplane: DataPlane, settings: Settings) -> None:
        self.dataplane = dataplane
        self.max_texts = settings.max_texts_per_request

    async def Classify(
        self, request: sentiment_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> sentiment_pb2.ClassifyResponse:
        texts = cv.texts(request.texts, "texts", self.max_texts)  # counted before any text is copied
        results = await self.dataplane.classify(cv.model_ref(request.model, DEFAULT_MODEL), texts)
        return cv.classify_response(results)


def register(server: EdgedServer, dataplane: DataPlane, settings: Settings, metrics: Metrics) -> list[str]:
    sentiment_pb2_grpc.add_SentimentServicer_to_server(SentimentServicer(dataplane, settings), server)
    return [SERVICE]
