"""docker-compose.yml brought up for real (make image-test): its seqserve + Redis part, with local stand-in
images and an override that switches to host networking on free ports (this machine forbids Docker's bridge
addresses as traffic targets; Prometheus and Grafana cannot be pulled here). Both replicas and Redis become
healthy, each replica answers a Classify and a Complete, a session moves from one replica to the other through
Redis, Redis runs with the AOF settings, then `down -v`
leaves nothing behind."""

from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from service.client import Client
from tests.deploy.conftest import ROOT, Docker, compose_binary, remove_images, run
from tests.integration.conftest import free_port

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

REPLICAS = ("seqserve-1", "seqserve-2")


def host_network_override(redis_port: int, ports: dict[str, tuple[int, int, int]]) -> str:
    """A compose override: every started service on the host network, its ports moved to free ones, the
    published `ports:` dropped (`!reset`, Compose >= 2.18), the image built with host networking too."""
    lines = [
        "services:",
        "  redis:",
        "    network_mode: host",
        "    ports: !reset []",
        f'    command: ["redis-server", "--port", "{redis_port}", "--bind", "127.0.0.1", "--appendonly", "yes",'
        ' "--appendfsync", "everysec", "--dir", "/data"]',
        "    healthcheck:",
        f'      test: ["CMD", "redis-cli", "-p", "{redis_port}", "ping"]',
        "      interval: 1s",
    ]
    for name, (grpc_port, metrics_port, http_port) in ports.items():
        lines += [
            f"  {name}:",
            "    network_mode: host",
            "    ports: !reset []",
            "    environment:",
            "      SEQSERVE_HOST: 127.0.0.1",
            f'      SEQSERVE_PORT: "{grpc_port}"',
            f'      SEQSERVE_METRICS_PORT: "{metrics_port}"',
            f'      SEQSERVE_HTTP_PORT: "{http_port}"',
            f"      SEQSERVE_SESSION_STORE: redis://127.0.0.1:{redis_port}/0",
        ]
        if name == "seqserve-1":
            lines += ["    build:", "      network: host"]
    return "\n".join(lines) + "\n"


@dataclass
class Stack:
    project: str
    ports: dict[str, tuple[int, int, int]]  # grpc, metrics, REST
    redis_port: int
    compose: list[str]  # the command prefix: binary, project, files
    env: dict[str, str]  # the images the compose file's variables name, and the builder

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        return run([*self.compose, *args], timeout=timeout, check=check, env=self.env).stdout


@pytest.fixture(scope="module")
def stack(
    docker: Docker,
    image: str,
    base_image: str,
    redis_image: str,
    report: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    ports = {name: (free_port(), free_port(), free_port()) for name in REPLICAS}
    redis_port = free_port()
    override = tmp_path_factory.mktemp("compose") / "host-network.yml"
    override.write_text(host_network_override(redis_port, ports))
    project = f"seqserve-test-{uuid.uuid4().hex[:8]}"
    tag = f"seqserve-test-compose:{project[-8:]}"
    # DOCKER_BUILDKIT=0: the classic builder, the one conftest's image build uses, so its layer cache is reused.
    env = os.environ | {"SEQSERVE_IMAGE": tag, "SEQSERVE_BASE_IMAGE": base_image, "REDIS_IMAGE": redis_image}
    env["DOCKER_BUILDKIT"] = "0"
    files = [
        "-p",
        project,
        "--project-directory",
        str(ROOT),
        "-f",
        str(ROOT / "docker-compose.yml"),
        "-f",
        str(override),
    ]
    s = Stack(project, ports, redis_port, [str(compose_binary()), *files], env)
    try:
        start = time.monotonic()
        s("build", "seqserve-1", timeout=900)  # the compose build section, on the layers cached by `image`
        report["compose_build_seconds"] = round(time.monotonic() - start, 1)
        start = time.monotonic()
        s("up", "--detach", "--no-build", "--wait", "--wait-timeout", "120", "redis", *REPLICAS, timeout=300)
        report["compose_seconds_to_healthy"] = round(time.monotonic() - start, 1)
        yield s
    finally:
        print(f"--- compose logs (tail) ---\n{s('logs', '--no-color', '--tail', '20', check=False)}")
        down = run([*s.compose, "down", "--volumes", "--remove-orphans", "--timeout", "20"], check=False, env=env)
        remove_images(docker, tag)
        assert down.returncode == 0, down.stderr
        label = f"label=com.docker.compose.project={project}"
        assert docker("ps", "--all", "--quiet", "--filter", label) == ""
        assert docker("volume", "ls", "--quiet", "--filter", label) == ""


def test_replicas_and_redis_are_healthy(stack: Stack) -> None:
    rows = [json.loads(line) for line in stack("ps", "--format", "json").splitlines() if line.strip()]
    state = {r["Service"]: (r["State"], r["Health"]) for r in rows}
    assert state == {name: ("running", "healthy") for name in ("redis", *REPLICAS)}


@pytest.mark.parametrize("replica", REPLICAS)
def test_each_replica_serves_classify_and_complete(stack: Stack, replica: str) -> None:
    with Client(f"127.0.0.1:{stack.ports[replica][0]}") as c:
        assert [r.label for r in c.classify(["a wonderful , moving film", "a dull , tedious mess"])] == [
            "positive",
            "negative",
        ]
        chunks = list(c.complete("ROMEO:", max_chars=24, seed=2))
    assert sum(len(ch.text) for ch in chunks) == 24 and chunks[-1].finish_reason == "length"


def test_a_session_started_on_one_replica_continues_on_the_other(stack: Stack) -> None:
    first, second = (f"127.0.0.1:{stack.ports[r][0]}" for r in REPLICAS)
    with Client(first) as a, Client(second) as b:
        s = a.create_session("charlm")
        assert a.suggest_once(s.id, "To be, or not").steps == 13
        resumed = b.suggest_once(s.id, " to be")  # the state lives in Redis, not in the replica
        assert resumed.steps == 19 and b.get_session(s.id).steps == 19
        b.delete_session(s.id)


def test_rest_generate_continues_a_session_of_the_other_replica(stack: Stack) -> None:
    """Each replica serves KServe REST (SEQSERVE_HTTP_PORT in the compose file): a session created over gRPC on
    one replica goes on through Triton's generate on the other's REST port (the state is in Redis)."""
    first, second = stack.ports[REPLICAS[0]], stack.ports[REPLICAS[1]]
    with Client(f"127.0.0.1:{first[0]}") as a:
        s = a.create_session("charlm")
        assert a.suggest_once(s.id, "ROMEO:").steps == 6
        body = json.dumps({"text_input": " I", "max_tokens": 5, "session_id": s.id}).encode()
        url = f"http://127.0.0.1:{second[2]}/v2/models/charlm/generate"
        with urllib.request.urlopen(urllib.request.Request(url, body), timeout=30) as answer:
            got = json.loads(answer.read())
        assert got["steps"] == 6 + 2 + 5 and len(got["text_output"]) == 5 and got["finish_reason"] == "length"
        assert a.get_session(s.id).steps == 13
        a.delete_session(s.id)


def test_redis_keeps_an_append_only_file_and_replicas_point_at_it(docker: Docker, stack: Stack) -> None:
    def config(key: str) -> str:
        out = stack("exec", "-T", "redis", "redis-cli", "-p", str(stack.redis_port), "config", "get", key)
        return out.split()[1]

    assert (config("appendonly"), config("appendfsync"), config("dir")) == ("yes", "everysec", "/data")
    mounts = docker.inspect(f"{stack.project}-redis-1")["Mounts"]
    assert [(m["Type"], m["Destination"]) for m in mounts] == [("volume", "/data")]
    for replica in REPLICAS:
        env = docker.inspect(f"{stack.project}-{replica}-1")["Config"]["Env"]
        assert f"SEQSERVE_SESSION_STORE=redis://127.0.0.1:{stack.redis_port}/0" in env


def test_override_is_needed_only_for_host_networking(stack: Stack) -> None:
    """The merged model keeps the shipped file's settings: read-only root, tmpfs, grace, restart policy."""
    merged = json.loads(stack("config", "--format", "json"))
    for replica in REPLICAS:
        svc = merged["services"][replica]
        assert svc["network_mode"] == "host" and "ports" not in svc
        assert svc["read_only"] is True and svc["tmpfs"] == ["/tmp"] and svc["stop_grace_period"] == "15s"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
