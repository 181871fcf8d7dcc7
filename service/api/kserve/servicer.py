"""Open Inference Protocol (KServe v2) gRPC endpoint: ``inference.GRPCInferenceService``, with Triton's
classification, sequence, statistics, model-configuration, model-repository (index, load, unload), logging,
trace and system shared-memory extensions.
Works with stock tritonclient.

Thin: protobuf -> tensors (``tensors``) and parameters (``params``) -> one DataPlane call -> protobuf
(``convert``). Validation lives in the core. ModelInfer raises ``service.errors`` types (the edge maps
them to status codes); ModelStreamInfer reports a failed request in ``error_message`` and keeps the stream
open, as Triton does.
"""

from __future__ import annotations

import base64
import functools
import logging
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version
from typing import TypeAlias

import grpc

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.interceptors import log_budget, status_code_for
from service.api.kserve.convert import (
    LOADABLE,
    config_to_pb,
    index_to_pb,
    log_settings_from_pb,
    log_settings_to_pb,
    metadata_to_pb,
    regions_to_pb,
    serving_from_config,
    stats_to_pb,
    trace_settings_from_pb,
    trace_settings_to_pb,
)
from service.api.kserve.params import SESSION_PARAMETER, model_ref, parse_priority, parse_sequence, parse_timeout
from service.api.kserve.tensors import encode_outputs, output_regions, read_inputs, requested_outputs
from service.core.context import check_admin, reset_priority, set_priority
from service.core.types import DataPlane, SharedRegion
from service.errors import (
    InvalidInput,
    ModelNotFound,
    ModelUnavailable,
    NotOffered,
    RegionNotFound,
    SeqServeError,
    clip,
    short,
)
from service.logs import CALL
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)
EXTENSIONS = [
    "classification",
    "logging",
    "sequence",
    "sequence(string_id)",
    "model_configuration",
    "model_repository",
    "statistics",
    "trace",
    "parameters",
    "schedule_policy",  # timeout and priority (PRIORITY_LEVELS)
    "binary_tensor_data",  # REST: tensors as raw bytes after the JSON header (Triton lists it for both protocols)
]
SHARED_MEMORY_EXTENSION = "system_shared_memory"  # listed when SHARED_MEMORY=system
CUDA_HINT = (
    "the CUDA shared-memory extension is not offered; send the tensors in the request, or use system shared memory "
    "(SEQSERVE_SHARED_MEMORY=system)"
)
# Response parameter: characters (charlm) or rows (forecaster) consumed, a sequence's running total.
STEPS_PARAMETER = "seqserve_steps"
Context: TypeAlias = grpc.aio.ServicerContext  # grpc ships no type stubs: this is Any to mypy


def _server_version() -> str:
    try:
        return version("seqserve")
    except PackageNotFoundError:
        return "0"


FINAL_PARAMETER = "triton_final_response"
# A refusal inside a stream: the gRPC status name a unary call would have got (retry on UNAVAILABLE,
# RESOURCE_EXHAUSTED, ABORTED; fix the request on INVALID_ARGUMENT...), since the stream's own status stays OK.
ERROR_CODE_PARAMETER = "seqserve_error_code"
RETRY_PARAMETER = "seqserve_retry_after_ms"  # a refused streamed request that may be sent again after this wait
SERVICE_NAME = "inference.GRPCInferenceService"
STREAM_METHOD = f"/{SERVICE_NAME}/ModelStreamInfer"


def _not_counted(service: str, method: str, model: str, code: str) -> None:
    """Without metrics (a servicer built alone, e.g. by bench/core.py)."""


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, settings: Settings, metrics: Metrics | None = None) -> None:
        self._dataplane = dataplane
        self._settings = settings
        self._budget = log_budget(settings)  # (the refusals inside streams: the edge's budget)
        self._count = metrics.stream_request if metrics is not None else _not_counted
        self._regions = dataplane.regions
        self._extensions = [*EXTENSIONS, SHARED_MEMORY_EXTENSION] if self._regions.enabled else EXTENSIONS

    # --- health and metadata --------------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        if not await self._dataplane.ready():  # (first: a frontend whose engine is silent answers at once)
            return pb.ServerReadyResponse(ready=False)
        return pb.ServerReadyResponse(ready=all(m.ready for m in await self._dataplane.models()))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        try:
            info = await self._dataplane.model_info(model_ref(request.name, request.version))
        except (ModelNotFound, ModelUnavailable):
            return pb.ModelReadyResponse(ready=False)  # the protocol answers "not ready" for unknown models
        return pb.ModelReadyResponse(ready=info.ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="seqserve", version=_server_version(), extensions=self._extensions)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        return metadata_to_pb(await self._dataplane.model_metadata(model_ref(request.name, request.version)))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        meta = await self._dataplane.model_metadata(model_ref(request.name, request.version))
        return pb.ModelConfigResponse(config=config_to_pb(meta, self._settings))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        ref = model_ref(request.name, request.version) if request.name else None
        return pb.ModelStatisticsResponse(model_stats=[stats_to_pb(s) for s in await self._dataplane.statistics(ref)])

    # --- model repository -----------------------------------------------------------------------------
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        return index_to_pb(await self._dataplane.models(), await self._dataplane.unloaded(), request.ready)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        if not request.model_name:
            raise InvalidInput("model_name is empty: name the model to load")
        others = sorted(k for k in request.parameters if k != "config")
        if others:  # Triton would apply them; answering OK would say they were
            names = ", ".join(short(k) for k in others[:4])
            raise InvalidInput(
                f"load parameters ({names}) are not supported: put the model's files in the repository folder "
                f"(models/{short(request.model_name)}/VERSION/) and load it by name alone (a 'config' may change "
                f"{LOADABLE})"
            )
        serving = None
        if "config" in request.parameters:
            # Permission first, as for a load without a config (the core checks again): a caller who may not load
            # models learns nothing from how its config would have been read.
            check_admin(self._settings.admin_principals, "load models")
            config = request.parameters["config"]
            if config.WhichOneof("parameter_choice") != "string_param":
                raise InvalidInput(
                    "load parameter config must be a string parameter holding the model configuration in JSON "
                    '(tritonclient: config=json.dumps({...}); REST: "config": "{...}")'
                )
            now = await self._config_now(request.model_name)
            serving = serving_from_config(config.string_param, now, request.model_name)
        await self._dataplane.load_model(request.model_name, serving)
        return pb.RepositoryModelLoadResponse()

    async def _config_now(self, name: str) -> pb.ModelConfig | None:
        """The model's configuration as ModelConfig answers it, or None when it is not loaded."""
        try:
            meta = await self._dataplane.model_metadata(model_ref(name, ""))
        except (ModelNotFound, ModelUnavailable):
            return None
        return config_to_pb(meta, self._settings)

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        if not request.model_name:
            raise InvalidInput("model_name is empty: name the model to unload")
        await self._dataplane.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # --- system shared-memory extension ---------------------------------------------------------------
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Context
    ) -> pb.SystemSharedMemoryStatusResponse:
        return regions_to_pb(self._regions.status(request.name or None))

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Context
    ) -> pb.SystemSharedMemoryRegisterResponse:
        region = SharedRegion(request.name, request.key, request.offset, request.byte_size)
        await self._dataplane.register_region(region)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        await self._dataplane.unregister_region(request.name or None)
        return pb.SystemSharedMemoryUnregisterResponse()

    # --- CUDA shared memory: not offered, as on a Triton built without GPU support --------------------------------
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Context
    ) -> pb.CudaSharedMemoryStatusResponse:
        if request.name:
            raise RegionNotFound(f"no CUDA shared-memory region {short(request.name)} is registered: {CUDA_HINT}")
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Context
    ) -> pb.CudaSharedMemoryRegisterResponse:
        raise NotOffered(CUDA_HINT)

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Context
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        return pb.CudaSharedMemoryUnregisterResponse()  # (none is ever registered: perf_analyzer unregisters all)

    # --- logging extension ----------------------------------------------------------------------------
    async def LogSettings(self, request: pb.LogSettingsRequest, context: Context) -> pb.LogSettingsResponse:
        return log_settings_to_pb(await self._dataplane.log_settings(log_settings_from_pb(request) or None))

    # --- trace extension ------------------------------------------------------------------------------
    async def TraceSetting(self, request: pb.TraceSettingRequest, context: Context) -> pb.TraceSettingResponse:
        changes = trace_settings_from_pb(request)
        settings = await self._dataplane.trace_settings(request.model_name or None, changes or None)
        return trace_settings_to_pb(settings)

    # --- inference ------------------------------------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        return await self._infer(request)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Requests of one stream run in order, so a sequence sent on a stream advances step by step. Each request
        # has exactly one response, so each is its final one: like Triton, every response (errors too) says so
        # in parameter triton_final_response, which streaming clients read to know a request is done.
        # The stream is one RPC to the edge (counted once, OK): each request's own outcome is counted here.
        count = functools.partial(self._count, SERVICE_NAME, "ModelStreamInfer")
        async for request in request_iterator:
            try:
                out = pb.ModelStreamInferResponse()
                await self._infer(request, out.infer_response)  # filled in place: no copy into the envelope
                out.infer_response.parameters[FINAL_PARAMETER].bool_param = True
                count(request.model_name, "OK")
                yield out
            except SeqServeError as e:
                message = clip(e.message)
                code = status_code_for(e).name
                count(request.model_name, code)
                if self._budget.allow():  # the stream goes on (one OK RPC): its refusals are told here, in the log
                    log.info("%s -> %s inside the stream: %s (request id %s)", STREAM_METHOD, code, message,
                             CALL.get()[0], extra={"code": code})  # fmt: skip
                yield self._stream_error(request, message, code, e.retry_after)
            except Exception:
                log.exception("ModelStreamInfer: unexpected error")
                count(request.model_name, "INTERNAL")
                message = f"internal error (request id {CALL.get()[0]}); see the server log"
                yield self._stream_error(request, message, "INTERNAL")

    @staticmethod
    def _stream_error(
        request: pb.ModelInferRequest, message: str, code: str, retry_after: float | None = None
    ) -> pb.ModelStreamInferResponse:
        echo = pb.ModelInferResponse(  # the whole id, as Triton: the client matches the failure to its request
            model_name=request.model_name[:256], model_version=request.model_version[:16], id=request.id
        )
        echo.parameters[FINAL_PARAMETER].bool_param = True
        echo.parameters[ERROR_CODE_PARAMETER].string_param = code  # what a unary call's status would have been
        if retry_after is not None:  # the same request may be sent again after this wait (a unary call's RetryInfo)
            echo.parameters[RETRY_PARAMETER].int64_param = max(1, round(retry_after * 1000))
        return pb.ModelStreamInferResponse(error_message=message, infer_response=echo)

    async def _infer(
        self, request: pb.ModelInferRequest, response: pb.ModelInferResponse | None = None
    ) -> pb.ModelInferResponse:
        """One inference; the answer goes into ``response`` when given (a stream's envelope), else a new one."""
        ref = model_ref(request.model_name, request.model_version)
        sequence = parse_sequence(request.parameters)
        timeout = parse_timeout(request.parameters)
        level = parse_priority(request.parameters, self._settings.priority_levels)
        outputs, classes = requested_outputs(request)
        placed = output_regions(request, self._regions) if outputs is not None else None
        call = self._dataplane.infer(ref, read_inputs(request, self._regions), outputs, sequence, classes, timeout)
        token = set_priority(level)  # (read where its steps queue: the batcher, here or in the engine)
        try:
            result = await call  # (the data plane keeps the limit: the engine, with --workers N)
        finally:
            reset_priority(token)
        if response is None:
            response = pb.ModelInferResponse()
        encode_outputs(response, result.model, result.version, result.outputs, placed, self._regions)
        response.id = request.id
        if result.steps is not None:
            response.parameters[STEPS_PARAMETER].int64_param = result.steps
        if result.session_blob is not None:
            response.parameters[SESSION_PARAMETER].string_param = base64.b64encode(result.session_blob).decode()
        return response
