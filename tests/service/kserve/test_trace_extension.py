"""Triton's trace extension over KServe v2 REST (the stock ``tritonclient.http``) and gRPC (our stub; the stock
``tritonclient.grpc`` drives it in ``tests/service/engine/test_workers.py``): reading and changing the settings,
the refusals, and the traces of calls from both, written when the server stops."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.kserve.tensors import serialize_bytes
from tests.conftest import ServerHandle, server_settings
from tests.service.kserve.test_rest import error_of, http

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def text_input(value: str) -> triton.InferInput:
    t = triton.InferInput("TEXT", [1], "BYTES")
    t.set_data_from_numpy(np.array([value.encode()], dtype=object))
    return t


def entries(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text()))


def test_settings_refusals_and_the_traces_of_rest_and_grpc_calls(tiny_models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "traces"
    folder.mkdir()
    start = str(folder / "start.json")
    handle = ServerHandle(server_settings(tiny_models, http_port=0, trace_dir=str(folder), trace_file=start))
    try:
        c = triton.InferenceServerClient(f"127.0.0.1:{handle.server.http_port}")
        assert "trace" in c.get_server_metadata()["extensions"]
        initial = {"trace_file": start, "trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1",
                   "log_frequency": "0"}  # fmt: skip
        assert c.get_trace_settings() == initial == c.get_trace_settings(model_name="sentiment")
        server = c.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
        assert server == {**initial, "trace_level": ["TIMESTAMPS"], "trace_rate": "1"}
        own = c.update_trace_settings(model_name="sentiment", settings={"trace_file": "sentiment.json"})
        assert own == {**server, "trace_file": str(folder / "sentiment.json")}
        # Refusals: the status and what to fix; nothing changes.
        for model, settings, status, words in [
            ("no-such-model", {"trace_rate": "5"}, "404", "not in the repository"),
            (None, {"trace_level": ["LOUD"]}, "400", "'LOUD' is not a level"),
            (None, {"trace_file": "/etc/trace.json"}, "400", "outside TRACE_DIR"),
            (None, {"trace_rate": ["1", "2"]}, "400", "trace_rate takes one value"),
        ]:
            with pytest.raises(InferenceServerException) as info:
                c.update_trace_settings(model_name=model, settings=settings)
            assert (info.value.status(), words in info.value.message()) == (status, True), info.value.message()
        assert error_of(http(handle, "/v2/trace/setting", b"[1]", method="POST")) == (
            400, 'the body is a JSON object of trace settings, e.g. {"trace_rate": "100"}'
        )  # fmt: skip
        assert error_of(http(handle, "/v2/trace/setting", method="DELETE"))[0] == 405
        assert c.get_trace_settings() == server and c.get_trace_settings(model_name="sentiment") == own

        # Calls over REST and gRPC, each traced (rate 1) into the file its model's settings name.
        c.infer("sentiment", [text_input("a fine film")], headers={"x-request-id": "rest-call-1"})
        c.infer("charlm", [text_input("to be")], headers={"x-request-id": "rest-call-2"})
        request = pb.ModelInferRequest(model_name="sentiment")
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(serialize_bytes([b"dull"]))
        with grpc.insecure_channel(handle.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(request, metadata=[("x-request-id", "grpc-call-1"), ("traceparent", PARENT)], timeout=30)
            # The model's own settings cleared (REST: an empty object for a model): it follows the server's again.
            assert c.update_trace_settings(model_name="sentiment", settings={}) == server
            changed = pb.TraceSettingRequest()
            changed.settings["trace_level"].value.append("OFF")
            reply = stub.TraceSetting(changed, timeout=30)
            assert list(reply.settings["trace_level"].value) == ["OFF"]
            assert list(reply.settings["trace_file"].value) == [start]
            stub.ModelInfer(request, metadata=[("x-request-id", "grpc-call-2")], timeout=30)  # not traced: OFF
    finally:
        handle.close()  # the traces are written when the server stops
    own_file = entries(folder / "sentiment.json")
    server_file = entries(Path(start))
    heads = {e["request_id"]: e for e in own_file + server_file if "model_name" in e}
    assert sorted(heads) == ["grpc-call-1", "rest-call-1", "rest-call-2"]
    assert heads["grpc-call-1"]["traceparent"] == PARENT  # the caller's distributed trace, joined
    assert "traceparent" not in heads["rest-call-1"]
    assert {e["model_name"] for e in own_file if "model_name" in e} == {"sentiment"}
    assert {e["model_name"] for e in server_file if "model_name" in e} == {"charlm"}
    for head in heads.values():
        names = [
            e["timestamps"][0]["name"] for e in own_file + server_file if e["id"] == head["id"] and "timestamps" in e
        ]
        assert names[0] == "REQUEST_START" and names[-1] == "REQUEST_END" and "COMPUTE_START" in names
