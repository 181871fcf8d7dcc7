"""seqserve.v1.Autocomplete: streamed generation (Complete) and per-keystroke suggestions (Suggest)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from service.api import converters as cv
from service.api.gen.seqserve.v1 import autocomplete_pb2, autocomplete_pb2_grpc
from service.api.interceptors import EdgedServer
from service.core.types import DataPlane
from service.metrics import Metrics
from service.settings import Settings

SERVICE = autocomplete_pb2.DESCRIPTOR.services_by_name["Autocomplete"].full_name
CAPABILITY = "generate"  # what the served model must offer (service/core/tasks/base.py)
DEFAULT_MODEL = "charlm"


class AutocompleteServicer(autocomplete_pb2_grpc.AutocompleteServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def Complete(
        self, request: autocomplete_pb2.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[autocomplete_pb2.CompleteChunk]:
        session_id = cv.require_id(request.session_id, "session_id") if request.HasField("session_id") else None
        if session_id is not None:
            # Continue with the session's own model; a model named here must match it (checked by the core).
            model = cv.model_ref(request.model, "")  # version checked (>= 1) as without a session
        else:
            model = cv.model_ref(request.model, DEFAULT_MODEL)
        stream = self.dataplane.complete(model, request.prompt, cv.sampling_params(request), session_id)
        # When the client cancels, grpc cancels this task: closing the core generator at once stops generation
        # now instead of whenever the generator is garbage collected.
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                yield cv.chunk_to_pb(chunk)

    async def Suggest(
        self, request_iterator: AsyncIterator[autocomplete_pb2.SuggestRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[autocomplete_pb2.SuggestResponse]:
        async for event in request_iterator:
            result = await self.dataplane.suggest(
                cv.require_id(event.session_id, "session_id"),
                event.appended,
                reset=event.reset,
                n=event.n or cv.DEFAULT_SUGGESTIONS,
                max_chars=event.max_chars or cv.DEFAULT_SUGGEST_CHARS,
                beam=event.beam if event.HasField("beam") else True,
                backspace=event.backspace,
            )
            yield cv.suggest_to_pb(result)


def register(server: EdgedServer, dataplane: DataPlane, settings: Settings, metrics: Metrics) -> list[str]:
    autocomplete_pb2_grpc.add_AutocompleteServicer_to_server(AutocompleteServicer(dataplane), server)
    return [SERVICE]
