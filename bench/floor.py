"""The canned-response floor: a ``grpc.aio`` server implementing the KServe v2 service with no model, no state,
no interceptors and no metrics. What any Python server on this skeleton can reach; ``make bench`` reports
seqserve as a ratio of it. ``canned_method`` is the same for one method of our API (Sessions.Create,
Autocomplete.Suggest): the floor of the session-create and keystroke rows.

Its answers are recorded from a real seqserve (``record``): per model the ModelMetadata, ModelConfig and
ModelStatistics responses and one ModelInfer response, so the floor sends byte-for-byte the same sizes. Each
inference echoes the request id into a copy of the canned response, as any server must.

    python -m bench.floor --canned DIR --port 0 --ready-file F [--workers N] [--event-loop asyncio|uvloop]

It runs on the event loop seqserve runs on (``--event-loop``, as the ``event_loop`` setting; ``bench.perf`` passes
the server's), so the ratios compare the same loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

import grpc

from bench.launch import first_message
from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.core.aio import run
from service.settings import Settings

_TYPES: dict[str, Any] = {
    "metadata": pb.ModelMetadataResponse,
    "config": pb.ModelConfigResponse,
    "statistics": pb.ModelStatisticsResponse,
    "infer": pb.ModelInferResponse,
}


def record(target: str, models: dict[str, pb.ModelInferRequest], out: Path) -> None:
    """Asks a running seqserve for each model's metadata, config, statistics and one inference; writes
    ``<out>/<model>.<kind>.pb``."""
    out.mkdir(parents=True, exist_ok=True)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for name, request in models.items():
            infer = stub.ModelInfer(request)  # first: perf_analyzer picks the version whose queue count > 0
            answers = {
                "metadata": stub.ModelMetadata(pb.ModelMetadataRequest(name=name)),
                "config": stub.ModelConfig(pb.ModelConfigRequest(name=name)),
                "statistics": stub.ModelStatistics(pb.ModelStatisticsRequest(name=name)),
                "infer": infer,
            }
            for kind, message in answers.items():
                (out / f"{name}.{kind}.pb").write_bytes(message.SerializeToString())


class FloorServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, canned: Path) -> None:
        self.answers: dict[tuple[str, str], Any] = {}
        for path in canned.glob("*.pb"):
            name, kind, _ = path.name.rsplit(".", 2)
            self.answers[(name, kind)] = _TYPES[kind].FromString(path.read_bytes())
        self.served: dict[str, int] = dict.fromkeys((name for name, _ in self.answers), 0)

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=(request.name, "infer") in self.answers)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="floor", version="0", extensions=["sequence", "statistics"])

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        return self.answers[(request.name, "metadata")]

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        return self.answers[(request.name, "config")]

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        """The canned statistics with the requests served so far: without ``-x``, perf_analyzer picks the
        version whose counts moved during its window."""
        stats = pb.ModelStatisticsResponse()
        stats.CopyFrom(self.answers[(request.name, "statistics")])
        n = self.served.get(request.name, 0)
        for s in stats.model_stats:
            s.inference_count = s.execution_count = n
            i = s.inference_stats
            for d in (i.success, i.queue, i.compute_input, i.compute_infer, i.compute_output):
                d.count, d.ns = n, n * 1000
        return stats

    async def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse()

    async def RepositoryModelLoad(self, request: Any, context: Any) -> pb.RepositoryModelLoadResponse:
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> pb.RepositoryModelUnloadResponse:
        return pb.RepositoryModelUnloadResponse()

    async def LogSettings(self, request: Any, context: Any) -> pb.LogSettingsResponse:
        return pb.LogSettingsResponse()

    async def TraceSetting(self, request: Any, context: Any) -> pb.TraceSettingResponse:
        return pb.TraceSettingResponse()

    # Shared memory: nothing registered, nothing to unregister (the floor answers from its canned responses only).
    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> pb.SystemSharedMemoryStatusResponse:
        return pb.SystemSharedMemoryStatusResponse()

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> pb.SystemSharedMemoryRegisterResponse:
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> pb.SystemSharedMemoryUnregisterResponse:
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> pb.CudaSharedMemoryStatusResponse:
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> pb.CudaSharedMemoryRegisterResponse:
        return pb.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> pb.CudaSharedMemoryUnregisterResponse:
        return pb.CudaSharedMemoryUnregisterResponse()

    def _respond(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse()
        response.CopyFrom(self.answers[(request.model_name, "infer")])
        response.id = request.id
        self.served[request.model_name] += 1
        return response

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return self._respond(request)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            yield pb.ModelStreamInferResponse(infer_response=self._respond(request))


async def _serve(canned: Path, port: int, ready: Path | None) -> None:
    await serve_servicer(FloorServicer(canned), port, ready)


async def serve_servicer(servicer: pb_grpc.GRPCInferenceServiceServicer, port: int, ready: Path | None) -> None:
    """Serves ``servicer`` (this floor, ``bench/lean.py``'s) on 127.0.0.1:``port`` (SO_REUSEPORT) until SIGTERM or
    SIGINT; ``ready``: the JSON file written once it listens (its port and pid)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if ready is not None:
        tmp = ready.with_name(ready.name + ".tmp")
        tmp.write_text(json.dumps({"grpc_port": bound, "pid": os.getpid()}))
        tmp.replace(ready)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def _canned_method(service: str, method: str, answer: bytes, streaming: bool, ready: mp.Queue[int]) -> None:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return answer

    async def stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield answer

    async def main() -> None:
        server = grpc.aio.server()
        handler = (
            grpc.stream_stream_rpc_method_handler(stream) if streaming else grpc.unary_unary_rpc_method_handler(unary)
        )
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {method: handler})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


@contextmanager
def canned_method(service: str, method: str, answer: bytes, streaming: bool = False) -> Iterator[str]:
    """A ``grpc.aio`` server in a child process whose one method (unary, or bidirectional: one answer per request)
    returns the serialized ``answer``: no store, no interceptors, no metrics. Yields its target."""
    ctx = mp.get_context("spawn")
    ready: mp.Queue[int] = ctx.Queue()
    proc = ctx.Process(target=_canned_method, args=(service, method, answer, streaming, ready), daemon=True)
    proc.start()
    try:
        yield f"127.0.0.1:{first_message(proc, ready, timeout=60)}"
    finally:
        proc.terminate()
        proc.join(10)


def _child(canned: Path, port: int, loop: str) -> None:
    run(_serve(canned, port, None), loop)


def add_event_loop_option(ap: argparse.ArgumentParser) -> None:
    """``--event-loop``, as seqserve's event_loop setting (its choices and default): a bench server runs on the
    loop the server it is set against runs on."""
    loop = Settings.model_fields["event_loop"]
    ap.add_argument(
        "--event-loop", choices=get_args(loop.annotation), default=loop.default, help="as seqserve's event_loop setting"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canned", type=Path, required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", type=Path)
    ap.add_argument("--workers", type=int, default=1, help="processes behind one port (SO_REUSEPORT)")
    add_event_loop_option(ap)
    args = ap.parse_args(argv)
    if args.workers > 1 and args.port == 0:
        ap.error("--workers > 1 needs a fixed --port (processes share it with SO_REUSEPORT)")
    ctx = mp.get_context("spawn")
    children = [
        ctx.Process(target=_child, args=(args.canned, args.port, args.event_loop)) for _ in range(args.workers - 1)
    ]
    for c in children:
        c.start()
    try:
        run(_serve(args.canned, args.port, args.ready_file), args.event_loop)
    finally:
        for c in children:
            c.terminate()
            c.join(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
