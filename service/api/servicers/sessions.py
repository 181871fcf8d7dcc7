"""seqserve.v1.Sessions: create / get / fork / delete server-side recurrent-state sessions; export one as a
signed blob and import it (here or on another server)."""

from __future__ import annotations

import grpc

from service.api import converters as cv
from service.api.gen.seqserve.v1 import sessions_pb2, sessions_pb2_grpc
from service.api.interceptors import EdgedServer
from service.core.types import DataPlane
from service.errors import InvalidInput
from service.metrics import Metrics
from service.settings import Settings

SERVICE = sessions_pb2.DESCRIPTOR.services_by_name["Sessions"].full_name
CAPABILITY = "sessions"  # health: SERVING while the session store answers


class SessionsServicer(sessions_pb2_grpc.SessionsServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def Create(
        self, request: sessions_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> sessions_pb2.SessionInfo:
        model = cv.model_ref(request.model, default=None)
        ttl = cv.optional_ttl(request.HasField("ttl_seconds"), request.ttl_seconds)
        return cv.session_to_pb(await self.dataplane.create_session(model, ttl_seconds=ttl))

    async def Get(
        self, request: sessions_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> sessions_pb2.SessionInfo:
        return cv.session_to_pb(await self.dataplane.get_session(cv.require_id(request.session_id, "session_id")))

    async def Fork(
        self, request: sessions_pb2.ForkSessionRequest, context: grpc.aio.ServicerContext
    ) -> sessions_pb2.SessionInfo:
        session_id = cv.require_id(request.session_id, "session_id")
        ttl = cv.optional_ttl(request.HasField("ttl_seconds"), request.ttl_seconds)
        return cv.session_to_pb(await self.dataplane.fork_session(session_id, ttl_seconds=ttl))

    async def Delete(
        self, request: sessions_pb2.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> sessions_pb2.DeleteSessionResponse:
        await self.dataplane.delete_session(cv.require_id(request.session_id, "session_id"))
        return sessions_pb2.DeleteSessionResponse()

    async def Export(
        self, request: sessions_pb2.ExportSessionRequest, context: grpc.aio.ServicerContext
    ) -> sessions_pb2.ExportSessionResponse:
        blob, info = await self.dataplane.export_session(cv.require_id(request.session_id, "session_id"))
        return sessions_pb2.ExportSessionResponse(blob=blob, session=cv.session_to_pb(info))

    async def Import(
        self, request: sessions_pb2.ImportSessionRequest, context: grpc.aio.ServicerContext
    ) -> sessions_pb2.SessionInfo:
        if not request.blob:
            raise InvalidInput("blob is empty: pass the blob Sessions.Export returned")
        ttl = cv.optional_ttl(request.HasField("ttl_seconds"), request.ttl_seconds)
        return cv.session_to_pb(await self.dataplane.import_session(request.blob, ttl_seconds=ttl))


def register(server: EdgedServer, dataplane: DataPlane, settings: Settings, metrics: Metrics) -> list[str]:
    sessions_pb2_grpc.add_SessionsServicer_to_server(SessionsServicer(dataplane), server)
    return [SERVICE]
