"""Open Inference Protocol (KServe v2) gRPC endpoint: ``inference.GRPCInferenceService``, with Triton's
sequence, statistics, model-configuration and repository-index extensions. Works with stock tritonclient.

Thin: protobuf -> checked tensors (kserve_tensors, kserve_models) -> one DataPlane call -> raw outputs.
ModelInfer raises ``service.errors`` types (the interceptor maps them to status codes); ModelStreamInfer
reports a failed request in ``error_message`` and keeps the stream open, as Triton does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version
from typing import Protocol, TypeAlias, runtime_checkable

import grpc

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.kserve_models import check_inputs, contract, run
from service.api.kserve_sequences import Sequence, Sequences, parse_sequence
from service.api.kserve_stats import ModelStatsBook
from service.api.kserve_tensors import decode_inputs, encode_output
from service.core.manifest import Manifest
from service.core.types import DataPlane, ModelInfo, ModelRef
from service.errors import InvalidInput, ModelNotFound, SeqServeError, SessionNotFound
from service.settings import Settings

log = logging.getLogger(__name__)
SERVICE_NAME = "inference.GRPCInferenceService"
EXTENSIONS = ["sequence", "sequence(string_id)", "model_configuration", "statistics", "parameters"]
# Response parameter: characters (charlm) or rows (forecaster) consumed, a sequence's running total.
STEPS_PARAMETER = "seqserve_steps"
_CONFIG_TYPES = {"BYTES": pb.TYPE_STRING, "FP32": pb.TYPE_FP32, "INT32": pb.TYPE_INT32}
Context: TypeAlias = grpc.aio.ServicerContext  # grpc ships no type stubs: this is Any to mypy


@runtime_checkable
class CoreExtras(Protocol):
    """What KServe needs beyond ``DataPlane`` (``CoreDataPlane`` has both): a loaded model's manifest, and
    whether the data plane is serving at all (false before start-up finished and while shutting down)."""

    def model_manifest(self, model: ModelRef) -> Manifest: ...

    def ready(self) -> bool: ...


def _ref(name: str, version: str) -> ModelRef:
    if not name:
        raise InvalidInput("model name is empty")
    if not version:
        return ModelRef(name)
    if not version.isdigit() or int(version) < 1:
        raise InvalidInput(f"model version must be a positive integer or empty (newest), got {version!r}")
    return ModelRef(name, int(version))


def _server_version() -> str:
    try:
        return version("seqserve")
    except PackageNotFoundError:
        return "0"


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, core: CoreExtras, settings: Settings) -> None:
        self._dataplane = dataplane
        self._core = core
        self._settings = settings
        self._sequences = Sequences(dataplane, settings)
        self._stats = ModelStatsBook()

    # --- health and metadata --------------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        models = self._dataplane.models()
        return pb.ServerReadyResponse(ready=self._core.ready() and bool(models) and all(m.ready for m in models))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        try:
            info = self._dataplane.model_info(_ref(request.name, request.version))
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)  # the protocol answers "not ready" for unknown models
        return pb.ModelReadyResponse(ready=info.ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="seqserve", version=_server_version(), extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        info, manifest = self._resolve(_ref(request.name, request.version))
        c = contract(manifest)
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=info.name,
            versions=[str(v) for v in sorted(m.version for m in self._dataplane.models() if m.name == info.name)],
            platform="onnxruntime_onnx",
            inputs=[T(name=d.name, datatype=d.datatype, shape=d.shape) for d in c.inputs],
            outputs=[T(name=d.name, datatype=d.datatype, shape=d.shape) for d in c.outputs],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        info, manifest = self._resolve(_ref(request.name, request.version))
        c = contract(manifest)
        config = pb.ModelConfig(
            name=info.name,
            platform="onnxruntime_onnx",
            backend="onnxruntime",
            max_batch_size=0,  # dims below are per request; the server batches requests internally
            input=[
                pb.ModelInput(name=d.name, data_type=_CONFIG_TYPES[d.datatype], dims=d.shape, optional=d.optional)
                for d in c.inputs
            ],
            output=[pb.ModelOutput(name=d.name, data_type=_CONFIG_TYPES[d.datatype], dims=d.shape) for d in c.outputs],
            parameters={
                "task": pb.ModelParameter(string_value=manifest.task),
                "version": pb.ModelParameter(string_value=str(info.version)),
            },
        )
        if c.sequences:
            idle_us = int(self._settings.sequence_idle_seconds * 1e6)
            config.sequence_batching.CopyFrom(pb.ModelSequenceBatching(max_sequence_idle_microseconds=idle_us))
        return pb.ModelConfigResponse(config=config)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        M = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                M(
                    name=m.name,
                    version=str(m.version),
                    state="READY" if m.ready else "UNAVAILABLE",
                    reason=m.error or "",
                )
                for m in self._dataplane.models()
                if m.ready or not request.ready
            ]
        )

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        if request.name:
            info = self._dataplane.model_info(_ref(request.name, request.version))
            models = [info] if request.version else [m for m in self._dataplane.models() if m.name == info.name]
        else:
            models = self._dataplane.models()
        return pb.ModelStatisticsResponse(model_stats=[self._stats.to_pb(m.name, m.version) for m in models])

    # --- inference ------------------------------------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        return await self._infer(request)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Requests of one stream run in order, so a sequence sent on a stream advances step by step.
        async for request in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=await self._infer(request))
            except SeqServeError as e:
                yield self._stream_error(request, e.message)
            except Exception:
                log.exception("ModelStreamInfer: unexpected error (model %r, id %r)", request.model_name, request.id)
                yield self._stream_error(request, "internal error; see the server log")

    @staticmethod
    def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
        echo = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
        return pb.ModelStreamInferResponse(error_message=message, infer_response=echo)

    def _resolve(self, ref: ModelRef) -> tuple[ModelInfo, Manifest]:
        info = self._dataplane.model_info(ref)  # raises ModelNotFound naming the model
        return info, self._core.model_manifest(ModelRef(info.name, info.version))

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        requested = _ref(request.model_name, request.model_version)
        info, manifest = self._resolve(requested)
        t0 = time.perf_counter()
        ok, count = False, 0
        try:
            seq = parse_sequence(request.parameters)
            if seq is not None and not contract(manifest).sequences:
                raise InvalidInput(
                    f"model {info.name} is stateless: it does not take sequence_id/sequence_start/sequence_end"
                )
            if seq is not None and not seq.start and requested.version is None:
                # A running sequence stays on the version it started with, even when a newer one loaded since.
                version = await self._sequences.version(info.name, seq)
                if version != info.version:
                    info, manifest = self._resolve(ModelRef(info.name, version))
            response, count = await self._run(request, ModelRef(info.name, info.version), manifest, seq)
            ok = True
            return response
        finally:
            self._stats.record(info.name, info.version, ok=ok, seconds=time.perf_counter() - t0, inferences=count)

    async def _run(
        self, request: pb.ModelInferRequest, ref: ModelRef, manifest: Manifest, seq: Sequence | None
    ) -> tuple[pb.ModelInferResponse, int]:
        c = contract(manifest)
        known_outputs = [d.name for d in c.outputs]
        wanted = [o.name for o in request.outputs] or known_outputs
        for name in wanted:
            if name not in known_outputs:
                raise InvalidInput(f"model {ref.name} has no output {name}; outputs are {', '.join(known_outputs)}")
        inputs = decode_inputs(request)
        check_inputs(ref.name, c, inputs)
        sid = None if seq is None else await self._sequences.begin(ref, ref.name, seq)
        try:
            result = await run(self._dataplane, ref, manifest, inputs, self._settings, sid)
        except SessionNotFound as e:
            raise (self._sequences.unknown(ref.name, seq) if seq is not None else e) from None
        finally:
            if seq is not None and seq.end and sid is not None:
                await self._sequences.end(sid)
        response = pb.ModelInferResponse(model_name=ref.name, model_version=str(ref.version), id=request.id)
        if result.steps is not None:
            response.parameters[STEPS_PARAMETER].int64_param = result.steps
        for name in wanted:
            datatype, value = result.outputs[name]
            encode_output(response, name, datatype, value)
        return response, result.inferences


def register(server: grpc.aio.Server, dataplane: DataPlane, settings: Settings) -> list[str]:
    """Adds the KServe v2 service to ``server``; returns its full name for health and reflection."""
    if not isinstance(dataplane, CoreExtras):
        raise TypeError("the KServe v2 endpoint needs a data plane with model_manifest() and ready() (CoreDataPlane)")
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(dataplane, dataplane, settings), server)
    return [SERVICE_NAME]
