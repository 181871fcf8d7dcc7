"""What the KServe REST gateway costs per request: the same ModelInfer sent as gRPC, as REST with JSON tensors and
as REST with Triton's binary tensors, one caller at a time, in interleaved rounds against one ``seqserve serve
--http-port 0`` process on the committed models (``sentiment``: one sentence; ``charlm``: one character); and a
health check on a kept-alive connection to the metrics port and to the REST port (what a scraper or a probe
that reuses its connection sees).

    python -m bench.rest [--models models] [--requests 300] [--rounds 2]

Prints p50/p99 per transport and writes ``bench/results/rest.json``.
"""

from __future__ import annotations

import http.client
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from bench import cli
from bench.launch import process, server_env
from bench.run import timed
from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.kserve.tensors import serialize_bytes

INPUTS = {"sentiment": "a fine , moving film", "charlm": "T"}


def _grpc(target: str, model: str, text: str) -> Callable[[], None]:
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(target))
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(serialize_bytes([text.encode()]))
    return lambda: stub.ModelInfer(request, timeout=30) and None


def _http(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> Callable[[], None]:
    """One request, again and again, on one kept-alive connection (as Prometheus scrapes, as tritonclient posts)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call() -> None:
        conn.request(method, path, body=body, headers=headers or {})
        answer = conn.getresponse()
        answer.read()
        if answer.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {answer.status}")

    return call


def _rest(port: int, model: str, text: str, binary: bool) -> Callable[[], None]:
    path = f"/v2/models/{model}/infer"
    if not binary:
        body = json.dumps({"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": [text]}]}).encode()
        return _http(port, "POST", path, body)
    # as tritonclient.http sends it: binary input, binary outputs
    raw = serialize_bytes([text.encode()])
    tensor = {"name": "TEXT", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}
    head = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    return _http(port, "POST", path, head + raw, {"Inference-Header-Content-Length": str(len(head))})


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "rest.json")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        cmd = [sys.executable, "-m", "service.cli", "serve", "--port", "0", "--metrics-port", "0", "--http-port", "0"]
        cmd += ["--models", str(args.models), "--device", "cpu", "--workers", "1", "--ready-file", str(ready)]
        with process(cmd, ready, server_env({})) as (ports, _pid):
            target, port = f"127.0.0.1:{ports['grpc_port']}", int(ports["http_port"])
            calls = {
                f"{model} {kind}": call
                for model, text in INPUTS.items()
                for kind, call in (
                    ("gRPC", _grpc(target, model, text)),
                    ("REST json", _rest(port, model, text, binary=False)),
                    ("REST binary", _rest(port, model, text, binary=True)),
                )
            }
            calls["metrics port /healthz"] = _http(int(ports["metrics_port"]), "GET", "/healthz")
            calls["REST /v2/health/ready"] = _http(port, "GET", "/v2/health/ready")
            for _ in range(args.rounds):  # interleaved: the machine drifts
                for name, call in calls.items():
                    samples.setdefault(name, []).extend(timed(call, args.requests, warmup=20))
    result: dict[str, Any] = {name: cli.percentiles(s) for name, s in samples.items()}
    print(f"{'model, transport':>24} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name, r in result.items():
        print(f"{name:>24} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['mean_ms']:8.2f}")
    cli.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    cli.run(main)
