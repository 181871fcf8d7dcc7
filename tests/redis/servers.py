"""Real ``redis-server`` processes on loopback ports for the tests: a single server (optionally with AOF) and a
three-node cluster. Each lives in its own temporary folder and is stopped when the test (or session) ends."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

REDIS_SERVER = "redis-server"


def execute(client: redis.Redis, *args: object) -> Any:
    """``client.execute_command(*args)``: redis-py leaves that method unannotated."""
    command: Callable[..., Any] = client.execute_command
    return command(*args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, both below Linux's ephemeral range (32768+), so
    no outgoing connection takes them between this check and redis-server's bind."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 22768)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisServer:
    """``redis-server`` on 127.0.0.1:<port>; ``aof`` turns on the append-only file (``appendfsync everysec``)."""

    def __init__(
        self, workdir: Path, aof: bool = False, cluster: bool = False, port: int | None = None, tls: bool = False
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aof = aof
        self.cluster = cluster
        self.cert = self.workdir / "cert.pem" if tls else None  # self-signed for 127.0.0.1 (also the CA)
        if self.cert is not None:
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                 "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(self.workdir / "key.pem"),
                 "-out", str(self.cert)],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        self.port = port or (free_cluster_port() if cluster else free_port())
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        if self.cert is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.cert}"
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        if self.cert is not None:
            return redis.Redis(
                host="127.0.0.1", port=self.port, socket_timeout=5, ssl=True, ssl_ca_certs=str(self.cert)
            )
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        cmd = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        if self.cert is not None:  # TLS only: the plain port is off
            cmd[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            cmd += ["--tls-cert-file", str(self.cert), "--tls-key-file", str(self.workdir / "key.pem")]
            cmd += ["--tls-ca-cert-file", str(self.cert), "--tls-auth-clients", "no"]
        cmd += ["--save", "", "--appendonly", "yes" if self.aof else "no", "--appendfsync", "everysec"]
        if self.cluster:
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"]
        with (self.workdir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.client().ping():
                    return
            except redis.exceptions.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{(self.workdir / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: Redis writes its AOF and exits; SIGKILL: as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class RedisCluster:
    """Three primaries (no replicas) on loopback ports, slots split evenly, started fresh."""

    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        self.nodes = [RedisServer(workdir / f"node{i}", cluster=True) for i in range(nodes)]
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        done = subprocess.run(
            ["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")
        deadline = time.monotonic() + 30
        while not all(b"cluster_state:ok" in execute(n.client(), "CLUSTER", "INFO") for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
