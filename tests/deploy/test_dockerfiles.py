"""Every Dockerfile: hadolint clean at threshold `info` (no ignores), and the promises the docs make about the
image, read from the files; the HEALTHCHECK command run here against a real gRPC health service."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.conftest import ROOT, image_models, run, skip_models, tool
from tests.integration.conftest import free_port

DOCKERFILES = {
    "Dockerfile": "python:3.11-slim",
    "Dockerfile.cuda": "nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04",
    "deploy/docker/Dockerfile.redis-standin": "debian:bookworm-slim",
}
SERVING_IMAGES = ("Dockerfile", "Dockerfile.cuda")


def stages(text: str) -> list[str]:
    """The Dockerfile split at its FROM lines (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return re.split(r"^(?=FROM )", joined, flags=re.M)[1:]


def instruction(stage: str, name: str) -> list[str]:
    return [line[len(name) + 1 :].strip() for line in stage.splitlines() if line.startswith(name + " ")]


@pytest.mark.parametrize("path", sorted(DOCKERFILES))
def test_hadolint_clean_at_info(path: str) -> None:
    text = (ROOT / path).read_text()
    assert "hadolint ignore" not in text  # nothing waived: every finding at info level is fixed
    out = run([tool("hadolint"), "--failure-threshold", "info", "--no-color", ROOT / path], check=False)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout


@pytest.mark.parametrize("path", sorted(DOCKERFILES))
def test_base_image_is_a_build_arg_with_a_pinned_default(path: str) -> None:
    text = (ROOT / path).read_text()
    assert f"ARG BASE_IMAGE={DOCKERFILES[path]}\n" in text
    assert all(s.startswith("FROM ${BASE_IMAGE}") for s in stages(text))


@pytest.mark.parametrize("path", SERVING_IMAGES)
def test_serving_images_final_stage(path: str) -> None:
    builder, final = stages((ROOT / path).read_text())
    assert builder.startswith("FROM ${BASE_IMAGE} AS builder")
    assert instruction(final, "USER") == ["10001:10001"]
    assert instruction(final, "STOPSIGNAL") == ["SIGTERM"]
    assert instruction(final, "COPY") == ["--from=builder /opt/venv /opt/venv", "--from=builder /models /app/models"]
    assert json.loads(instruction(final, "ENTRYPOINT")[0]) == ["seqserve"]
    labels = " ".join(instruction(final, "LABEL"))
    for key in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    env = " ".join(instruction(final, "ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    # gRPC, KServe REST (Triton's HTTP port) and metrics, each set and exposed
    for setting in ("SEQSERVE_PORT=50051", "SEQSERVE_HTTP_PORT=8000", "SEQSERVE_METRICS_PORT=8002"):
        assert setting in env, setting
    assert instruction(final, "EXPOSE") == ["50051 8000 8002"]
    # Compilers and pip stay in the builder; the builder installs serving dependencies only (no torch).
    for tool_name in ("gcc", "build-essential", "pip install", "[train"):
        assert tool_name not in final, tool_name
    assert "--no-cache-dir" in builder and "[train" not in builder and "--invalidation-mode unchecked-hash" in builder


@pytest.mark.parametrize("path", SERVING_IMAGES)
def test_skip_models_names_committed_versions_and_the_build_refuses_others(path: str, tmp_path: Path) -> None:
    """The builder's SKIP_MODELS step, run as the build runs it: each name must be a committed model version (else
    the build fails, naming it) and only those versions are removed."""
    builder, _ = stages((ROOT / path).read_text())
    (step,) = [r for r in instruction(builder, "RUN") if "SKIP_MODELS" in r]
    default = skip_models(builder)
    for name in default:
        assert (ROOT / "models" / name / "model.onnx").is_file(), name
    if path == "Dockerfile":  # the CPU image's budget: the large opt-in ensemble stays out unless asked for
        assert "sentiment-glove/1" in default and "sentiment-glove/1" not in image_models()
    models = tmp_path / "models"
    for name in ("a/1", "a/2", "b/1"):
        (models / name).mkdir(parents=True)
        for file in ("model.onnx", "manifest.json", "metrics.json", "training_curve.png"):
            (models / name / file).write_bytes(b"x")
    script = step.replace("/models", str(models))
    done = run(["sh", "-c", script], check=False, env={"SKIP_MODELS": "a/2 b/1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and sorted(p.name for p in models.glob("*/*")) == ["1"], done.stderr
    # the training reports stay in the repository; the server reads the graph and the manifest
    assert sorted(p.name for p in (models / "a" / "1").iterdir()) == ["manifest.json", "model.onnx"]
    refused = run(["sh", "-c", script], check=False, env={"SKIP_MODELS": "a/9", "PATH": "/usr/bin:/bin"})
    assert refused.returncode == 1 and "SKIP_MODELS: no model a/9 under models/" in refused.stderr
    assert (models / "a" / "1" / "model.onnx").is_file()  # a refused build removed nothing
    for skip, ok in (("a/3", True), ("a/1", False)):  # a/3 serves a/1's file: dropping a/3 is fine, a/1 is not
        (models / "a" / "3").mkdir()
        (models / "a" / "3" / "model.onnx").symlink_to("../1/model.onnx")
        done = run(["sh", "-c", script], check=False, env={"SKIP_MODELS": skip, "PATH": "/usr/bin:/bin"})
        if ok:
            assert done.returncode == 0 and (models / "a" / "1" / "model.onnx").is_file(), done.stderr
            assert not (models / "a" / "3").exists()
        else:
            assert done.returncode == 1 and "a kept version links to a dropped one's file" in done.stderr
            assert f"{models}/a/3/model.onnx" in done.stderr


@pytest.mark.parametrize("path", SERVING_IMAGES)
def test_builders_drop_what_serving_never_loads(path: str) -> None:
    """The CPU image test checks these are gone from the built image; the CUDA image cannot be built here, so its
    builder is read: the same removals (the C API library: neither wheel's Python binding links it)."""
    builder, _ = stages((ROOT / path).read_text())
    for gone in ("-name tests", "onnxruntime/transformers", "onnxruntime/quantization", "onnxruntime/tools",
                 "onnxruntime/capi/libonnxruntime.so*", "pip uninstall --yes pip setuptools",
                 "numpy/f2py", "numpy/distutils", "numpy/_core/_simd.*", "-name '*.pyi'", "-name '*.h'"):  # fmt: skip
        assert gone in builder, gone


def test_onnx_runtime_comes_from_exactly_one_extra() -> None:
    """`onnxruntime` and `onnxruntime-gpu` install the same module and must never both be installed: neither is a
    plain dependency, `cpu` and `cuda` each name one, and no other extra (train, dev, ...) pulls either."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ort = {"onnxruntime", "onnxruntime-gpu"}

    def names(reqs: list[str]) -> set[str]:
        return {Requirement(r).name for r in reqs} & ort

    assert names(project["dependencies"]) == set()
    extras = {name: names(reqs) for name, reqs in project["optional-dependencies"].items()}
    assert extras.pop("cpu") == {"onnxruntime"} and extras.pop("cuda") == {"onnxruntime-gpu"}
    assert all(not found for found in extras.values()), extras


# PyPI's onnxruntime-gpu releases (cp312 wheels) and the CUDA major they are built for: the wheel METADATA's
# nvidia-cuda-runtime requirement, and libcudart.so.N in `readelf -d onnxruntime/capi/libonnxruntime_providers_cuda.so`
# (read 2026-12-02). A release newer than these must be looked up and added before a pin may allow it.
ORT_GPU_CUDA = {
    **dict.fromkeys(["1.20.0", "1.21.1", "1.22.0", "1.23.2", "1.24.1", "1.24.4", "1.25.1", "1.26.0"], 12),
    **dict.fromkeys(["1.27.0", "1.28.0", "1.29.0", "1.30.0", "1.31.0", "1.31.1"], 13),
}


CUDA_BASE = r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu24\.04"
CUDA12_BUILD = r"--build-arg BASE_IMAGE=(\S+) --build-arg 'ONNXRUNTIME_GPU=([^']+)'"  # documented in Dockerfile.cuda


def builder_requirements(path: str, onnxruntime_gpu: str = "") -> list[str]:
    """What a serving image's builder writes to requirements.txt: its own requirements.py line, run on our
    pyproject.toml (``${ONNXRUNTIME_GPU}`` set to ``onnxruntime_gpu``, as the build argument does)."""
    builder = stages((ROOT / path).read_text())[0]
    (args,) = re.findall(r"/opt/venv/bin/python requirements\.py ([^>]+) > requirements\.txt", builder)
    argv = shlex.split(args.replace("${ONNXRUNTIME_GPU}", onnxruntime_gpu))
    script = ROOT / "deploy" / "docker" / "requirements.py"
    out = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_cpu_image_installs_the_serving_dependencies_only() -> None:
    """The dependencies, ONNX Runtime for CPU and uvloop: nothing of the train or dev extras, no onnxruntime-gpu."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = builder_requirements("Dockerfile")
    extras = project["optional-dependencies"]
    assert lines == project["dependencies"] + extras["cpu"] + extras["uvloop"]
    assert not {Requirement(line).name for line in lines} & {"torch", "onnxruntime-gpu", "pytest"}


IMAGE_LOCK, DEV_LOCK = "deploy/docker/constraints.txt", ".ci/constraints.txt"


def locked(path: str = IMAGE_LOCK) -> dict[str, str]:
    """A lock (``make lock``) as {canonical name: version}; every line pins one package with ``==``."""
    pins: dict[str, str] = {}
    for line in (ROOT / path).read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==" and not req.extras and req.marker is None, line
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def assert_pinned(lines: list[str], pins: dict[str, str], lock: str) -> None:
    """Every requirement of ``lines`` (whose marker holds here) is in ``lock`` (``pins``) at a version it allows."""
    for line in lines:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in {lock}: run make lock"
        assert req.specifier.contains(pins[name]), f"{req} does not allow the locked {pins[name]}: make lock"


def test_images_install_each_dependency_at_its_locked_version() -> None:
    """The builders install under constraints.txt, which pins every serving requirement (and hiredis, which
    redis[hiredis] pulls) at a version pyproject.toml allows: `make lock` after a change of either."""
    for path in SERVING_IMAGES:  # the CUDA image too: the same releases, but for its onnxruntime-gpu
        builder = stages((ROOT / path).read_text())[0]
        assert "pip install --no-cache-dir --no-compile -c constraints.txt -r requirements.txt" in builder, path
        assert "deploy/docker/constraints.txt" in instruction(builder, "COPY")[0].split(), path
    pins = locked()
    assert_pinned(builder_requirements("Dockerfile"), pins, IMAGE_LOCK)
    assert "hiredis" in pins and "uvloop" in pins
    assert not pins.keys() & {"torch", "onnxruntime-gpu", "pytest", "pip", "seqserve"}, sorted(pins)


def test_the_lock_is_what_a_fresh_venv_holds() -> None:
    """requirements.py --lock on no requirements: a fresh venv holds nothing pip's freeze lists, so the file is
    the header alone (the install step is the same pip, with the requirements)."""
    spec = importlib.util.spec_from_file_location("requirements", ROOT / "deploy" / "docker" / "requirements.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = script.lock([], ["cpu"], [ROOT / IMAGE_LOCK])
    assert text.startswith("# Exact versions for pip's -c, written by `make lock`")
    assert f"extras cpu install in a fresh venv of Python {sys.version.split()[0]}." in text
    assert f"# Resolved under {ROOT / IMAGE_LOCK}." in text
    assert [line for line in text.splitlines() if not line.startswith("#")] == []


def test_make_venv_installs_the_dev_lock_which_agrees_with_the_image() -> None:
    """`make venv` (so `make test` and CI) installs under .ci/constraints.txt; it pins every requirement of the
    extras the venv installs at a version pyproject.toml allows (torch without its local +cpu label, which only
    one index has), and every package both locks hold at the same version: the suite tests what the image ships. The
    build backend that pip fetches for building the package is pinned too."""
    makefile = (ROOT / "Makefile").read_text()
    assert "$(BIN)/python -m pip install -q -e '.[cpu,train,dev]' -c .ci/constraints.txt" in makefile
    assert re.search(r"^\$\(STAMP\): pyproject\.toml \.ci/constraints\.txt$", makefile, re.M)
    # pip itself at one version, the one this venv has (not `--upgrade pip`: whatever is newest that day).
    (pip_version,) = re.findall(r"^PIP_VERSION := (\d+(?:\.\d+)+)$", makefile, re.M)
    assert "$(BIN)/python -m pip install -q --disable-pip-version-check 'pip==$(PIP_VERSION)'" in makefile
    assert "--upgrade pip" not in makefile
    assert importlib.metadata.version("pip") == pip_version
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    extras = project["optional-dependencies"]
    dev, image = locked(DEV_LOCK), locked(IMAGE_LOCK)
    assert_pinned(project["dependencies"] + extras["cpu"] + extras["train"] + extras["dev"], dev, DEV_LOCK)
    assert dev["torch"] == "2.13.0"
    (backend,) = pyproject["build-system"]["requires"]
    assert Requirement(backend).name == "setuptools" and str(Requirement(backend).specifier).startswith("==")
    assert {n: (v, dev.get(n)) for n, v in image.items() if dev.get(n, v) != v} == {}
    assert image.keys() <= dev.keys()  # (uvloop too: dev installs it, tested)


def test_cuda_image_installs_an_onnxruntime_gpu_built_for_its_cuda() -> None:
    """The CUDA base's major version and the onnxruntime-gpu the builder installs agree, for the default build and
    for the CUDA 12 build the Dockerfile documents (a CUDA 13 wheel on a CUDA 12 base cannot load its provider)."""
    (cuda12,) = re.findall(CUDA12_BUILD, (ROOT / "Dockerfile.cuda").read_text())
    for base, override in ((DOCKERFILES["Dockerfile.cuda"], ""), cuda12):
        found = re.fullmatch(CUDA_BASE, base)
        assert found is not None, base
        major = int(found.group(1))
        lines = builder_requirements("Dockerfile.cuda", override)
        ort = [Requirement(line) for line in lines if line.startswith("onnxruntime")]
        assert [r.name for r in ort] == ["onnxruntime-gpu"], lines  # never the CPU package beside it
        allowed = {v: m for v, m in ORT_GPU_CUDA.items() if ort[0].specifier.contains(v)}
        assert allowed and set(allowed.values()) == {major}, (base, str(ort[0]), allowed)
        assert {"grpcio", "uvloop"} <= {Requirement(line).name for line in lines}


def test_dockerignore_allows_exactly_what_the_images_copy() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert lines[0] == "*"  # an allowlist: nothing reaches the daemon unless named below
    allowed = {line[1:] for line in lines if line.startswith("!")}
    copied = set()
    for path in SERVING_IMAGES:
        for copy in instruction("\n".join(stages((ROOT / path).read_text())), "COPY"):
            if not copy.startswith("--from"):
                copied.update(copy.split()[:-1])
    assert copied == allowed == {
        "pyproject.toml", "README.md", "deploy/docker/requirements.py", "deploy/docker/constraints.txt", "service",
        "models", ".ci/constraints.txt",  # (the dev lock: the mypy that compiles the hot path in the builder)
    }  # fmt: skip
    assert all((ROOT / source).exists() for source in copied)
    assert "**/__pycache__" in lines and "models/**/*.pt" in lines


def healthcheck_argv(path: str) -> list[str]:
    final = stages((ROOT / path).read_text())[-1]
    (line,) = instruction(final, "HEALTHCHECK")
    argv: list[str] = json.loads(line.split(" CMD ", 1)[1])
    return argv


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    """A real gRPC server with the grpc_health servicer that seqserve registers."""
    servicer = health.HealthServicer()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(0)


def probe(argv: list[str], port: int, env: dict[str, str] | None = None) -> int:
    """Runs a HEALTHCHECK command here (``python`` = this interpreter) with the container's SEQSERVE_PORT (and
    ``env``)."""
    assert argv[0] == "python"
    env = {"SEQSERVE_PORT": str(port), **(env or {}), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=60).returncode


@pytest.mark.parametrize("path", SERVING_IMAGES)
def test_healthcheck_follows_the_grpc_health_service(
    path: str, health_server: tuple[int, health.HealthServicer]
) -> None:
    port, servicer = health_server
    argv = healthcheck_argv(path)
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # models loading, or draining
    assert probe(argv, port) != 0
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe(argv, port) == 0
    assert probe(argv, free_port()) != 0  # nothing listening


@pytest.mark.parametrize("path", SERVING_IMAGES)
def test_healthcheck_with_tls_asks_the_metrics_ports_readyz(path: str, tiny_models: Path, tmp_path: Path) -> None:
    """With TLS (mTLS here, the strictest case) the gRPC port refuses a probe without a client certificate: the
    HEALTHCHECK then reads /readyz over HTTPS, which follows the same status: healthy while the server serves,
    not once it drains, nor with nothing listening."""
    from tests.conftest import ServerHandle, server_settings
    from tests.service.security.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    handle = ServerHandle(
        server_settings(tiny_models, tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca)
    )
    argv = healthcheck_argv(path)
    env = {"SEQSERVE_TLS_CERT": "/etc/seqserve/tls/tls.crt", "SEQSERVE_METRICS_PORT": str(free_port())}
    try:
        assert probe(argv, handle.server.port, env) != 0  # nothing listening there
        env["SEQSERVE_METRICS_PORT"] = str(handle.server.metrics_port)
        assert probe(argv, handle.server.port, env) == 0
        draining = handle.begin_stop(grace=30.0)
        assert probe(argv, handle.server.port, env) != 0
        draining.result(60)
    finally:
        handle.close()
