"""The KServe v2 (Open Inference Protocol) adapter: protobuf <-> the transport-free data plane, nothing else.

``tensors`` decodes and encodes tensors, ``params`` parses model references and sequence parameters,
``convert`` maps model metadata, statistics and the repository index, ``servicer`` wires the RPCs.
"""

from __future__ import annotations

from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.interceptors import EdgedServer
from service.api.kserve.servicer import EXTENSIONS, SERVICE_NAME, STEPS_PARAMETER, KServeServicer
from service.core.types import DataPlane
from service.metrics import Metrics
from service.settings import Settings


def register(server: EdgedServer, dataplane: DataPlane, settings: Settings, metrics: Metrics) -> list[str]:
    """Adds the KServe v2 service to ``server``; returns its full name for health and reflection."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(dataplane, settings, metrics), server)
    return [SERVICE_NAME]


__all__ = ["EXTENSIONS", "SERVICE_NAME", "STEPS_PARAMETER", "KServeServicer", "register"]
