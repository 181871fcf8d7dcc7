"""The REST API's endpoints: each HTTP request as the gRPC call it means (KServe v2, Triton's extensions, generate
and OpenAI's completions), its answer as JSON or Server-Sent Events."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import grpc
from google.protobuf.message import Message

from service.api.completions import OPTIONS as COMPLETION_OPTIONS
from service.api.completions import (
    StopCut,
    completion,
    completion_request,
    model_object,
    models_list,
    usage,
)
from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.generate import OPTIONS, RequestError, answer, caller_keys, complete_request, event
from service.api.kserve.convert import fill_log_settings
from service.api.rest.base import GatewayHandler
from service.api.rest.common import (
    HEADER_LENGTH,
    MODEL_PATH,
    MODEL_TRACE_PATH,
    REPOSITORY_MODEL_PATH,
    SHM_PATH,
    HttpError,
    Reply,
    flag,
    ok,
    openai_error,
    read_json,
    triton_error,
)
from service.api.rest.convert import (
    UINT64_MAX,
    fill_parameters,
    infer_request,
    infer_response,
    message_json,
    parameter_value,
)
from service.core.traces import NAMES as TRACE_SETTINGS
from service.errors import echo

log = logging.getLogger(__name__)
_GET_ROUTES = frozenset({"/v2", "/v2/", "/v2/health/live", "/v2/health/ready", "/v2/models/stats"})  # (GET and HEAD)


# The shared-memory extensions' RPC prefix and request messages (status, unregister), by the route's kind.
_SHARED_MEMORY: dict[str, tuple[str, Any, Any]] = {
    "system": ("SystemSharedMemory", pb.SystemSharedMemoryStatusRequest, pb.SystemSharedMemoryUnregisterRequest),
    "cuda": ("CudaSharedMemory", pb.CudaSharedMemoryStatusRequest, pb.CudaSharedMemoryUnregisterRequest),
}


class Endpoints(GatewayHandler):
    """The routes of ``_route``; the HTTP mechanics are ``GatewayHandler``'s and the gateway's."""

    def _route(self, method: str, path: str, body: bytes) -> Reply | None:
        get = method in ("GET", "HEAD")
        if path in ("/v2", "/v2/") and get:
            return ok(message_json(self._call("ServerMetadata", pb.ServerMetadataRequest())))
        if path == "/v2/health/live" and get:
            return flag(self._call("ServerLive", pb.ServerLiveRequest()).live)
        if path == "/v2/health/ready" and get:
            return flag(self._call("ServerReady", pb.ServerReadyRequest()).ready)
        if path == "/v2/models/stats" and get:
            return ok(message_json(self._call("ModelStatistics", pb.ModelStatisticsRequest())))
        if path in _GET_ROUTES and not get:
            raise HttpError(405, f"{path} takes GET", {"Allow": "GET, HEAD"})
        if path == "/v2/logging":
            return self._logging(method, body)
        if path == "/v2/trace/setting":
            return self._trace(method, None, body)
        if m := MODEL_TRACE_PATH.fullmatch(path):
            return self._trace(method, unquote(m["name"]), body)
        if path == "/v1/completions":
            if method != "POST":
                raise HttpError(405, "/v1/completions takes POST", {"Allow": "POST"})
            return self._completions(body)
        if path in ("/v1/models", "/v1/models/") or path.startswith("/v1/models/"):
            rest = path[len("/v1/models/") :].strip("/") if path.startswith("/v1/models/") else ""
            return self._models(method, unquote(rest) if rest else None)
        if path == "/v2/repository/index" and method != "POST":
            raise HttpError(405, f"{path} takes POST", {"Allow": "POST"})
        if path == "/v2/repository/index":
            options = read_json(body) if body else {}
            ready = options.get("ready", False) if isinstance(options, dict) else None
            if not isinstance(ready, bool):
                raise HttpError(400, 'the body is {"ready": true|false} or empty')
            index = self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready))
            return 200, json.dumps([message_json(m) for m in index.models]).encode(), {}
        if m := SHM_PATH.fullmatch(path):
            return self._shared_memory(method, m["kind"], unquote(m["name"] or ""), m["action"], body)
        if m := REPOSITORY_MODEL_PATH.fullmatch(path):
            if method != "POST":
                raise HttpError(405, f"{path} takes POST", {"Allow": "POST"})
            return self._repository(unquote(m["name"]), m["action"], body)
        if m := MODEL_PATH.fullmatch(path):
            return self._model(method, unquote(m["name"]), unquote(m["version"] or ""), m["action"], body)
        if path.startswith("/v2/"):
            raise HttpError(404, f"no such endpoint: {method} {echo(path, 200)} (KServe v2 REST: see docs/kserve.md)")
        if path.startswith("/v1/"):
            raise HttpError(
                404, f"no such endpoint: {method} {echo(path, 200)} (OpenAI's API here: /v1/completions, /v1/models)"
            )
        raise HttpError(404, f"not found: {echo(path, 200)}; the KServe v2 REST API is under /v2, OpenAI's under /v1")

    def _model(self, method: str, name: str, version: str, action: str | None, body: bytes) -> Reply | None:
        get = method in ("GET", "HEAD")
        if action in ("infer", "generate", "generate_stream"):
            if method != "POST":
                raise HttpError(405, f"{action} takes POST", {"Allow": "POST"})
            if action == "infer":
                return self._infer(name, version, body)
            return self._generate(name, version, body, stream=action == "generate_stream")
        if not get:
            raise HttpError(405, f"{action or 'model metadata'} takes GET", {"Allow": "GET, HEAD"})
        if action is None:
            meta = self._call("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version))
            return ok(message_json(meta))
        if action == "ready":
            return flag(self._call("ModelReady", pb.ModelReadyRequest(name=name, version=version)).ready)
        if action == "config":
            return ok(message_json(self._call("ModelConfig", pb.ModelConfigRequest(name=name, version=version)).config))
        if action == "stats":
            stats = self._call("ModelStatistics", pb.ModelStatisticsRequest(name=name, version=version))
            return ok(message_json(stats))
        raise HttpError(
            404, f"no such endpoint: {echo(action, 40)} (ready, config, stats, infer, generate, generate_stream)"
        )

    def _infer(self, name: str, version: str, body: bytes) -> Reply:
        length = self.headers.get(HEADER_LENGTH)
        if length is None:
            split = len(body)
        elif length.isascii() and length.isdigit() and int(length) <= len(body):
            split = int(length)
        else:
            raise HttpError(
                400, f"{HEADER_LENGTH} {echo(length, 40)} must be a number up to the body's {len(body)} bytes"
            )
        try:
            header = read_json(body[:split])
        except HttpError as err:
            if length is None or not err.message.startswith("the body is not JSON: "):  # (its syntax only)
                raise
            raise HttpError(  # (a header length too short or too long cut the JSON, and the message said not why)
                400,
                f"the JSON header (the body's first {split} bytes, {HEADER_LENGTH}) is not JSON we read: check "
                f"that the header names the JSON part's length; {err.message}",
            ) from None
        request, binary_default = infer_request(name, version, header, body[split:])
        response = self._call("ModelInfer", request)
        payload, head = infer_response(response, header, binary_default)
        headers = {HEADER_LENGTH: str(head)} if head != len(payload) else {}
        return 200, payload, headers

    def _generate(self, name: str, version: str, body: bytes, stream: bool) -> Reply | None:
        """Triton's generate extension: one ``Autocomplete.Complete`` call; its chunks as one answer, or as
        Server-Sent Events while they come (``_stream``). Refusals before the first chunk are plain JSON errors with
        their HTTP status; one after it is a last event ``{"error": ...}`` (as Triton's)."""
        try:
            document = read_json(body)
            request = complete_request(name, version, document, stream=stream)
        except RequestError as err:
            raise HttpError(400, str(err)) from None
        call, first = self._complete(request, caller_keys(document, OPTIONS, {"prompt": "text_input"}))
        session, version_used = request.HasField("session_id"), first.model_version
        if stream:
            self._stream(call, first, lambda c: answer(name, version_used, c.text, c, session), triton_error)
            return None
        chunks = [first, *call]
        text = "".join(chunk.text for chunk in chunks)
        return ok(answer(name, version_used, text, chunks[-1], session))

    def _completions(self, body: bytes) -> Reply | None:
        """OpenAI's ``POST /v1/completions`` (``service.api.completions``): the same one call as generate, its
        chunks as one completion object, or as completion chunks ending in ``data: [DONE]``."""
        document = read_json(body)
        try:
            request, stream, with_usage = completion_request(document)
        except RequestError as err:
            raise HttpError(400, str(err), param=err.param) from None
        call, first = self._complete(
            request, caller_keys(document, COMPLETION_OPTIONS, {"prompt": "prompt", "model": "model"})
        )
        model, version_used, created = document["model"], first.model_version, int(time.time())
        ident = f"cmpl-{self._request_id}"
        cut = StopCut(list(request.stop))
        if stream:
            generated = [0]

            def render(chunk: Any) -> dict[str, Any]:
                generated[0] += len(chunk.text)
                return completion(ident, created, model, version_used, cut.feed(chunk.text, chunk), chunk)

            def closing() -> list[dict[str, Any]]:
                if not with_usage:
                    return []
                last = completion(ident, created, model, version_used, "", None)
                return [{**last, "choices": [], "usage": usage(request.prompt, generated[0])}]

            self._stream(call, first, render, openai_error, closing, b"data: [DONE]\n\n")
            return None
        chunks = [first, *call]
        text = "".join(chunk.text for chunk in chunks)
        document = completion(ident, created, model, version_used, cut.feed(text, chunks[-1]), chunks[-1])
        return ok({**document, "usage": usage(request.prompt, len(text))})

    def _models(self, method: str, name: str | None) -> Reply:
        """OpenAI's ``GET /v1/models`` (the ready models of the repository, one entry per name) and
        ``GET /v1/models/{name}``, also ``{name}/{version}`` (a ``model`` that completions take)."""
        if method not in ("GET", "HEAD"):
            raise HttpError(405, "/v1/models takes GET", {"Allow": "GET, HEAD"})
        index = self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=True))
        ready = {(m.name, m.version) for m in index.models if m.state == "READY"}
        names = sorted({n for n, _ in ready})
        if name is None:
            return ok(models_list(names))
        if name not in names and tuple(name.rsplit("/", 1)) not in ready:
            raise HttpError(404, f"The model {echo(name)} does not exist; served models: {names}", param="model")
        return ok(model_object(name))

    def _complete(self, request: Message, keys: dict[str, str]) -> tuple[Any, Any]:
        """An ``Autocomplete.Complete`` call and its first chunk (a refusal raises here: an ordinary error answer,
        naming a field as the caller's request did: ``keys``, field -> its key there).
        The request id must be known before a stream's headers leave: the caller's when the server takes it as
        one, else one made here and sent along (the server uses it, so its logs say the same)."""
        self._request_id = self._own_request_id()
        metadata = (*(m for m in self._metadata() if m[0] != "x-request-id"), ("x-request-id", self._request_id))
        self._keys = keys
        call = self.gateway.autocomplete.Complete(request, metadata=metadata, timeout=self.gateway.call_timeout)
        return call, next(call)

    def _stream(
        self,
        call: Any,
        first: Any,
        render: Callable[[Any], dict[str, Any]],
        error: Callable[[str], dict[str, Any]],
        closing: Callable[[], list[dict[str, Any]]] = list,
        done: bytes = b"",
    ) -> None:
        """``call``'s chunks as Server-Sent Events (``render``: a chunk's event) in a chunked HTTP body, then the
        ``closing`` events and ``done``; an error after the first event is the last event (``error``). A client
        that goes away cancels the call: the server stops generating. To an HTTP/1.0 client, which knows no
        chunks, the events go unframed and the connection's close ends the body (RFC 9112, 6.1 and 6.3)."""
        chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.send_header("X-Request-Id", str(self._request_id))
        for key, value in self._cors().items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

        def send(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

        try:
            send(event(render(first)))
            try:
                for chunk in call:
                    send(event(render(chunk)))
                for document in closing():
                    send(event(document))
                if done:
                    send(done)
            except grpc.RpcError as err:
                from service.client import ApiError

                send(event(error(ApiError.from_rpc_error(err).message)))
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError as exc:  # the client went away (or the request ran out of time): stop the generation
            call.cancel()
            self.close_connection = True
            log.debug("rest stream: %s, call cancelled", type(exc).__name__)

    def _repository(self, name: str, action: str, body: bytes) -> Reply:
        options = read_json(body) if body else {}
        if not isinstance(options, dict):
            raise HttpError(400, f"the body of {action} is a JSON object or empty")
        if action == "unload":
            request: Message = pb.RepositoryModelUnloadRequest(model_name=name)
            self._call("RepositoryModelUnload", request)
        else:
            load = pb.RepositoryModelLoadRequest(model_name=name)
            fill_parameters(load.parameters, options.get("parameters"), f"load {echo(name)}")
            self._call("RepositoryModelLoad", load)
        return 200, b"", {}

    def _shared_memory(self, method: str, kind: str, name: str, action: str, body: bytes) -> Reply:
        """Triton's system shared-memory extension: GET .../status (a list of {name, key, offset, byte_size}), POST
        .../region/NAME/register with {"key", "offset", "byte_size"}, POST .../unregister (every region, or NAME).
        The CUDA one's routes answer as the gRPC calls do (none registered; registering is not offered)."""
        rpc, status_request, unregister_request = _SHARED_MEMORY[kind]
        if action == "status":
            if method not in ("GET", "HEAD"):
                raise HttpError(405, f"{kind}sharedmemory status takes GET", {"Allow": "GET, HEAD"})
            status = self._call(f"{rpc}Status", status_request(name=name))
            return 200, json.dumps([message_json(r) for r in status.regions.values()]).encode(), {}
        if method != "POST":
            raise HttpError(405, f"{kind}sharedmemory {action} takes POST", {"Allow": "POST"})
        if action == "unregister":
            self._call(f"{rpc}Unregister", unregister_request(name=name))
            return 200, b"", {}
        if kind == "cuda":
            self._call("CudaSharedMemoryRegister", pb.CudaSharedMemoryRegisterRequest(name=name))
        if not name:
            raise HttpError(404, "register a region at /v2/systemsharedmemory/region/NAME/register")
        options = read_json(body)
        if not isinstance(options, dict) or not isinstance(options.get("key"), str):
            raise HttpError(400, 'the body is {"key": "/shm-key", "offset": 0, "byte_size": N}')
        sizes = {k: options.get(k, 0) for k in ("offset", "byte_size")}
        for key, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= UINT64_MAX:
                raise HttpError(400, f"{key} must be an integer 0..2**64-1")
        request = pb.SystemSharedMemoryRegisterRequest(name=name, key=options["key"], **sizes)
        self._call("SystemSharedMemoryRegister", request)
        return 200, b"", {}

    def _logging(self, method: str, body: bytes) -> Reply:
        request = pb.LogSettingsRequest()
        if method == "POST":
            changes = read_json(body)
            if not isinstance(changes, dict):
                raise HttpError(400, 'the body is a JSON object of log settings, e.g. {"log_verbose_level": 1}')
            for key, value in changes.items():  # (the values SettingValue holds; the server checks the rest)
                if not isinstance(value, bool | str) and not (isinstance(value, int) and 0 <= value < 2**32):
                    raise HttpError(
                        400, f"log setting {echo(key)} takes a bool, an unsigned 32-bit integer or a string"
                    )
            fill_log_settings(request.settings, changes)
        elif method not in ("GET", "HEAD"):
            raise HttpError(405, "/v2/logging takes GET or POST", {"Allow": "GET, HEAD, POST"})
        settings = self._call("LogSettings", request).settings
        return ok({key: parameter_value(value) for key, value in settings.items()})

    def _trace(self, method: str, model: str | None, body: bytes) -> Reply:
        """Triton's trace extension: GET reads the settings (of a model, or the server's), POST changes those it
        names (null clears one; for a model, an empty object clears all of its own, as in Triton)."""
        request = pb.TraceSettingRequest(model_name=model or "")
        if method == "POST":
            changes = read_json(body) if body else {}
            if not isinstance(changes, dict):
                raise HttpError(400, 'the body is a JSON object of trace settings, e.g. {"trace_rate": "100"}')
            if not changes and model is not None:
                changes = dict.fromkeys(TRACE_SETTINGS)
            for key, value in changes.items():
                values = [] if value is None else value if isinstance(value, list) else [value]
                if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in values):
                    raise HttpError(400, f"trace setting {echo(key)} takes a string, a list of strings or null")
                request.settings[key].value.extend(str(v) for v in values)
        elif method not in ("GET", "HEAD"):
            raise HttpError(405, "trace/setting takes GET or POST", {"Allow": "GET, HEAD, POST"})
        settings = self._call("TraceSetting", request).settings
        return ok({k: list(v.value) if k == "trace_level" else "".join(v.value[:1]) for k, v in settings.items()})
