"""The image built from ./Dockerfile, run for real with host networking on free ports (make image-test): health
SERVING within 10 s, a Classify, a Complete stream and a KServe sequence from the host, /metrics scraped, a
read-only root filesystem, uid 10001, TLS and mTLS on every port with a healthy HEALTHCHECK, and `docker stop`
draining an open stream with exit 0."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from service import compiled
from service.client import Client
from tests.deploy.conftest import Docker, image_models, run
from tests.integration.conftest import free_port, http_get, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

MAX_IMAGE_MB = 350
MAX_SECONDS_TO_HEALTHY = 10.0
GRACE_SECONDS = 10.0
SERVING = health_pb2.HealthCheckResponse.SERVING

# Run inside the image: what it holds (modules, tools, models, compiled bytecode), as JSON.
INSPECT = """
import importlib.util, json, os, pathlib, shutil, sys
import numpy, service.cli, service.compiled, service.core.batching
MODULES = ("onnxruntime", "grpc", "uvloop", "torch", "pip", "training")
models = pathlib.Path("/app/models")
site = pathlib.Path(service.cli.__file__).parents[1]
def mb(path):
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1)
def sections(path):  # an ELF64 file's section names, from its section header table
    b = path.read_bytes()
    off, size, count, names = (int.from_bytes(b[i:i + n], "little") for i, n in ((40, 8), (58, 2), (60, 2), (62, 2)))
    heads = [b[off + k * size:off + (k + 1) * size] for k in range(count)]
    strtab = int.from_bytes(heads[names][24:32], "little")
    return {b[strtab + int.from_bytes(h[:4], "little"):].split(b"\\0", 1)[0].decode() for h in heads}
sizes = {p.name: mb(p) for p in site.iterdir() if p.is_dir() and not p.name.endswith("-info")}
print(json.dumps({
    "largest_mb": dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:5]) | {"models": mb(models)},
    "modules": {m: bool(importlib.util.find_spec(m)) for m in MODULES},
    "ort_c_library": sorted(p.name for p in (site / "onnxruntime" / "capi").glob("libonnxruntime.so*")),
    "tools": [t for t in ("gcc", "cc", "g++", "make", "pip", "pip3", "strip") if shutil.which(t)],
    "symbol_tables": sorted(str(p.relative_to(site)) for p in site.rglob("*.so")
                            if ".libs" not in p.parent.name and ".symtab" in sections(p)),
    "pip_cache": os.path.exists("/root/.cache/pip") or os.path.exists("/tmp/.cache/pip"),
    "build_leftovers": sorted({p.suffix or p.name for p in site.rglob("*")
                               if p.suffix in (".pyi", ".pyx", ".pxd", ".pxi", ".h", ".c", ".cpp")
                               or p.name in ("f2py", "distutils", "ma", "polynomial") and p.parent == site / "numpy"
                               or p.name.startswith("_simd.") and p.parent.name == "_core"}),
    "numpy": float(numpy.ones(3).sum()) == 3.0,
    "models": sorted(str(p.parent.relative_to(models)) for p in models.glob("*/*/model.onnx")),
    "compiled": pathlib.Path(service.cli.__cached__).exists(),
    "hot_path": [service.compiled.state(), service.core.batching.__file__.endswith(".so")],
    "python": sys.version_info[:2],
}))
"""


@dataclass
class Container:
    id: str
    grpc: str
    metrics_port: int
    http_port: int  # KServe REST (the image serves it by default: SEQSERVE_HTTP_PORT=8000, moved here)
    started: float  # time.monotonic() just before the container was started


def start(docker: Docker, image: str, *flags: str, **env: str) -> Container:
    """Runs the image the way the issue asks: ``--network host`` (never the default bridge here), read-only root
    filesystem with a tmpfs /tmp, the image's own user; ports from the SEQSERVE_* env vars; ``flags``: more
    container options (a volume)."""
    port, metrics, rest = free_port(), free_port(), free_port()
    settings = {"SEQSERVE_HOST": "127.0.0.1", "SEQSERVE_PORT": str(port), "SEQSERVE_METRICS_PORT": str(metrics)}
    settings |= {"SEQSERVE_HTTP_PORT": str(rest), "SEQSERVE_GRACE_SECONDS": str(GRACE_SECONDS), **env}
    flags = (*flags, *(f"--env={k}={v}" for k, v in settings.items()))
    started = time.monotonic()
    cid = docker("run", "--detach", "--network", "host", "--read-only", "--tmpfs", "/tmp:rw,size=64m", *flags, image)
    return Container(cid, f"127.0.0.1:{port}", metrics, int(settings["SEQSERVE_HTTP_PORT"]), started)


def remove(docker: Docker, c: Container) -> None:
    logs = run([docker.exe, "logs", c.id], check=False).stderr[-3000:]
    print(f"--- container {c.id[:12]} log (tail) ---\n{logs}")
    run([docker.exe, "rm", "--force", "--volumes", c.id], check=False)


def health(target: str, service: str = "") -> int | None:
    with grpc.insecure_channel(target) as channel:
        try:
            status: int = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                .status
            )
            return status
        except grpc.RpcError:
            return None


def docker_health(docker: Docker, cid: str) -> str:
    return docker("inspect", "--format", "{{.State.Health.Status}}", cid)


@pytest.fixture(scope="module")
def server(docker: Docker, image: str, report: dict[str, Any]) -> Iterator[Container]:
    c = start(docker, image)
    try:
        wait_for("gRPC health SERVING", lambda: health(c.grpc) == SERVING, timeout=60, every=0.1)
        report["seconds_to_serving"] = round(time.monotonic() - c.started, 2)
        wait_for("docker health = healthy", lambda: docker_health(docker, c.id) == "healthy", timeout=60, every=0.2)
        report["seconds_to_healthy"] = round(time.monotonic() - c.started, 2)
        yield c
    finally:
        remove(docker, c)


def test_image_is_small_and_serving_only(docker: Docker, image: str, report: dict[str, Any]) -> None:
    assert report["image_mb"] <= MAX_IMAGE_MB, report
    out = json.loads(docker("run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", INSPECT))
    report["largest_mb"] = out["largest_mb"]  # where the image's size goes (site-packages folders, models)
    assert out["modules"] == {
        "onnxruntime": True, "grpc": True, "uvloop": True, "torch": False, "pip": False, "training": False
    }  # fmt: skip
    assert out["ort_c_library"] == []  # ONNX Runtime's C API library: 35 MB the Python binding never loads
    assert out["tools"] == [] and out["pip_cache"] is False
    # numpy's f2py, distutils, SIMD test module, masked arrays and polynomials, type stubs, C headers and sources:
    # dropped in the builder, numpy still works
    assert out["build_leftovers"] == [] and out["numpy"] is True
    assert out["symbol_tables"] == []  # extension modules stripped in the builder (uvloop's symbols were 11.7 MB)
    # every committed model version but those the Dockerfile's SKIP_MODELS default leaves out, none hard-coded
    assert out["models"] == image_models() and len(image_models()) >= 3
    assert out["compiled"] is True and out["python"] == [3, 11]
    # the hot path compiled with mypyc in the builder (service/compiled.py), and in use
    assert out["hot_path"] == [[True, f"{len(compiled.MODULES)} modules compiled with mypyc"], True], out["hot_path"]


def test_image_metadata(docker: Docker, image: str) -> None:
    config = docker.inspect(image)["Config"]
    assert config["User"] == "10001:10001"
    assert config["StopSignal"] == "SIGTERM"
    assert config["Entrypoint"] == ["seqserve"] and config["Cmd"] == ["serve"]
    assert set(config["ExposedPorts"]) == {"50051/tcp", "8000/tcp", "8002/tcp"}
    env = dict(item.split("=", 1) for item in config["Env"])
    assert (env["SEQSERVE_PORT"], env["SEQSERVE_HTTP_PORT"], env["SEQSERVE_METRICS_PORT"]) == ("50051", "8000", "8002")
    assert config["Healthcheck"]["Test"] == ["CMD", "python", "-m", "service.healthcheck"]
    labels = config["Labels"]
    for key in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert labels[f"org.opencontainers.image.{key}"], key
    assert labels["org.opencontainers.image.revision"] != "unknown"


def test_seqserve_check_passes_on_the_images_models(docker: Docker, image: str) -> None:
    """``seqserve check`` in the image (what an init container or a pipeline runs before a rollout): every committed
    model version loads, without a network or a writable root."""
    out = docker("run", "--rm", "--network", "none", "--read-only", image, "check")
    lines = out.splitlines()
    loaded = sorted(line.split()[2] for line in lines if line.split()[:2] == ["ok", "model"])
    assert loaded == image_models() and lines[-1].startswith("ready to serve"), out


def test_healthy_within_10s_and_both_probe_services_serving(server: Container, report: dict[str, Any]) -> None:
    assert report["seconds_to_healthy"] <= MAX_SECONDS_TO_HEALTHY, report
    assert health(server.grpc) == SERVING  # docker HEALTHCHECK, Kubernetes readiness/startup
    assert health(server.grpc, "grpc.health.v1.Health") == SERVING  # Kubernetes liveness (deploy/k8s)


def test_runs_as_10001_on_a_read_only_root(docker: Docker, server: Container) -> None:
    status = docker("exec", server.id, "cat", "/proc/1/status")
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids == ["10001"] * 4  # real, effective, saved, filesystem uid of the server process
    assert docker.inspect(server.id)["HostConfig"]["ReadonlyRootfs"] is True
    denied = run([docker.exe, "exec", server.id, "touch", "/app/models/x"], check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    docker("exec", server.id, "touch", "/tmp/x")  # the tmpfs is writable


def test_classify_and_complete_from_the_host(server: Container) -> None:
    with Client(server.grpc) as c:
        results = c.classify(["a wonderful , moving and beautifully acted film", "a dull , tedious mess"])
        assert [r.label for r in results] == ["positive", "negative"]
        chunks = list(c.complete("ROMEO:", max_chars=40, temperature=0.8, seed=1))
    assert sum(len(ch.text) for ch in chunks) == 40
    assert chunks[-1].finish_reason == "length"


def test_kserve_sequence_with_tritonclient(server: Container) -> None:
    kserve_sequence(server.grpc)


def test_rest_by_default_streams_a_completion(server: Container) -> None:
    """The image serves KServe REST by default (Triton's port 8000): Triton's generate_stream from the host gives
    the text the gRPC Complete gives for the same seed, one Server-Sent Event per character."""
    with Client(server.grpc) as c:
        want = "".join(chunk.text for chunk in c.complete("ROMEO:", max_chars=20, temperature=0.8, seed=4))
    wait_for("REST ready", lambda: http_get(f"http://127.0.0.1:{server.http_port}/v2/health/ready")[0] == 200)
    body = json.dumps({"text_input": "ROMEO:", "max_tokens": 20, "temperature": 0.8, "seed": 4}).encode()
    url = f"http://127.0.0.1:{server.http_port}/v2/models/charlm/generate_stream"
    with urllib.request.urlopen(urllib.request.Request(url, body), timeout=30) as answer:
        assert answer.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        events = [json.loads(line[6:]) for line in answer.read().decode().split("\n") if line.startswith("data: ")]
    assert len(events) == 20 and "".join(e["text_output"] for e in events) == want


def kserve_sequence(target: str) -> None:
    """tritonclient feeds the char LM one sequence in three chunks: the same probabilities as the text fed whole."""
    script = Path(__file__).with_name("kserve_sequence.py")
    proc = subprocess.run([sys.executable, str(script), "--url", target], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["live"] is True and out["ready"] is True
    assert out["steps"] == out["chars"]  # the server advanced one state through all three chunks
    whole, sequence = np.asarray(out["whole"]), np.asarray(out["sequence"])
    assert whole.sum() == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(sequence, whole, atol=1e-4)


def test_uvloop_with_two_frontends(docker: Docker, image: str) -> None:
    """SEQSERVE_EVENT_LOOP=uvloop works in the image (the extra is installed): the engine and both frontends run on
    libuv's loop, and a KServe sequence goes through, as does a KServe REST request (SEQSERVE_HTTP_PORT: the
    engine's gateway to the frontends). Its own container, so the other tests keep theirs."""
    rest = free_port()
    c = start(docker, image, SEQSERVE_EVENT_LOOP="uvloop", SEQSERVE_WORKERS="2", SEQSERVE_HTTP_PORT=str(rest))
    try:
        wait_for("gRPC health SERVING", lambda: health(c.grpc) == SERVING, timeout=60, every=0.1)
        kserve_sequence(c.grpc)
        # (the REST gateway starts with the first frontend: ready once it answers, as a probe would see it)
        wait_for("REST ready", lambda: http_get(f"http://127.0.0.1:{rest}/v2/health/ready")[0] == 200, timeout=30)
        body = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["a fine film"]}]}
        request = urllib.request.Request(
            f"http://127.0.0.1:{rest}/v2/models/sentiment/infer", json.dumps(body).encode()
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            outputs = {o["name"]: o for o in json.loads(answer.read())["outputs"]}
        assert outputs["LABEL"]["data"][0] in ("positive", "negative") and outputs["PROBABILITIES"]["shape"] == [1, 2]

        def on_uvloop() -> list[str]:
            return docker("exec", c.id, "sh", "-c", "grep -l 'uvloop/loop' /proc/[0-9]*/maps || true").split()

        # The engine (pid 1) and two frontends have uvloop's extension mapped. Health turns SERVING with the first
        # frontend; the second one may still be starting then.
        wait_for("three processes on uvloop", lambda: len(on_uvloop()) >= 3, timeout=30, every=0.2)
        pids = on_uvloop()
        assert len(pids) == 3 and "/proc/1/maps" in pids, pids
    finally:
        remove(docker, c)


def test_tls_container_turns_healthy_and_serves_every_port_over_tls(docker: Docker, image: str, tmp_path: Path) -> None:
    """The image with TLS and a client CA (the certificates on a read-only volume): its HEALTHCHECK turns healthy
    (it reads /readyz over HTTPS: the plaintext gRPC check it had before never could), and a caller with a
    client certificate reaches gRPC, the REST port (on by default in the image) and /metrics over TLS."""
    from tests.service.security.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    (tmp_path / "pki").chmod(0o755)  # (the container's uid 10001 reads the files)
    for f in (tmp_path / "pki").iterdir():
        f.chmod(0o644)
    tls = {"SEQSERVE_TLS_CERT": "/certs/server.crt", "SEQSERVE_TLS_KEY": "/certs/server.key"}
    c = start(docker, image, f"--volume={tmp_path / 'pki'}:/certs:ro", SEQSERVE_TLS_CLIENT_CA="/certs/ca.crt", **tls)
    try:
        wait_for("docker health = healthy", lambda: docker_health(docker, c.id) == "healthy", timeout=60, every=0.2)
        with Client(c.grpc, tls_ca=pki.ca, tls_cert=pki.alice.cert, tls_key=pki.alice.key, timeout=30) as client:
            assert client.classify(["a fine film"])[0].label in ("positive", "negative")
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(pki.alice.cert, pki.alice.key)
        body = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["a fine film"]}]}
        request = urllib.request.Request(
            f"https://127.0.0.1:{c.http_port}/v2/models/sentiment/infer", json.dumps(body).encode()
        )
        with urllib.request.urlopen(request, context=context, timeout=30) as answer:
            outputs = {o["name"]: o for o in json.loads(answer.read())["outputs"]}
        assert outputs["PROBABILITIES"]["shape"] == [1, 2]
        with urllib.request.urlopen(f"https://127.0.0.1:{c.metrics_port}/metrics", context=context, timeout=30) as r:
            assert b"seqserve_rpc_requests_total" in r.read()
    finally:
        remove(docker, c)


def test_metrics_scraped(server: Container) -> None:
    with Client(server.grpc) as c:
        c.classify(["fine"])
    status, body = http_get(f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert status == 200
    samples = [s for fam in text_string_to_metric_families(body.decode()) for s in fam.samples]
    ok = [s for s in samples if s.name == "seqserve_rpc_requests_total" and s.labels["method"] == "Classify"]
    assert sum(s.value for s in ok if s.labels["code"] == "OK") >= 1
    ready = {s.labels["model"]: s.value for s in samples if s.name == "seqserve_model_ready"}
    assert set(ready) >= {"sentiment", "charlm", "forecaster"} and set(ready.values()) == {1.0}
    assert http_get(f"http://127.0.0.1:{server.metrics_port}/readyz")[0] == 200


def test_docker_stop_drains_an_open_stream(docker: Docker, image: str, report: dict[str, Any]) -> None:
    """SIGTERM while a Complete stream is open: the stream still ends normally, then the process exits 0
    within the grace period. Its own container, so the other tests keep theirs."""
    c = start(docker, image)
    try:
        wait_for("gRPC health SERVING", lambda: health(c.grpc) == SERVING, timeout=60, every=0.1)
        stopped: dict[str, float] = {}

        def stop() -> None:
            stopped["at"] = time.monotonic()
            docker("stop", "--time", str(int(GRACE_SECONDS) + 20), c.id, timeout=120)
            stopped["seconds"] = time.monotonic() - stopped["at"]

        stopper = threading.Thread(target=stop)
        chars, last = 0, None
        with Client(c.grpc, timeout=60) as client:
            for i, chunk in enumerate(client.complete("ROMEO:", max_chars=1000, temperature=0.8, seed=3)):
                if i == 0:
                    stopper.start()  # SIGTERM now, with 999 characters (0.5-2.5 s on 2 cores) still to generate
                chars += len(chunk.text)
                last = chunk
        ended = time.monotonic()
        stopper.join(timeout=120)
        assert last is not None and last.finish_reason == "length" and chars == 1000
        assert ended > stopped["at"]  # the stream was still open when the signal went out
        state = docker.inspect(c.id)["State"]
        assert state["Status"] == "exited" and state["ExitCode"] == 0 and not state["OOMKilled"]
        assert stopped["seconds"] < GRACE_SECONDS
        assert "draining" in run([docker.exe, "logs", c.id]).stderr
        report["drain_seconds_with_open_stream"] = round(stopped["seconds"], 2)
        report["stream_seconds_after_sigterm"] = round(ended - stopped["at"], 2)
    finally:
        remove(docker, c)
