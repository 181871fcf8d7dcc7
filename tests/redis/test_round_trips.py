"""``step`` durability costs one Redis round trip per step, not more: a step is one ``EVALSHA`` of the save
script (the lease is owned and cached, nothing is read back), its inner commands run inside Redis. Counted with
``MONITOR`` on a real ``redis-server``, which prints every command a client sends (and, apart, the commands
scripts run: ``[0 lua]``)."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Callable

from service.client import Client
from service.core.sessions.redis_scripts import SCRIPTS
from tests.conftest import ServerHandle
from tests.redis.servers import RedisServer
from tests.redis.test_faults import wait_for

STEPS = 20


class Monitor:
    """A raw ``MONITOR`` connection that keeps every line it is sent, read in a thread."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=0.2)
        self.sock.sendall(b"MONITOR\r\n")
        self.buf = b""
        self.stopping = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        assert wait_for(lambda: self.buf.startswith(b"+OK\r\n"), 5.0)

    def _read(self) -> None:
        while not self.stopping:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            self.buf += data

    def mark(self) -> int:
        return self.buf.count(b"\r\n")

    def close(self) -> list[str]:
        self.stopping = True
        self.thread.join(5)
        self.sock.close()
        return [line.decode(errors="replace") for line in self.buf.split(b"\r\n")]


def sha_of(script: str) -> str:
    return hashlib.sha1(SCRIPTS[script].encode()).hexdigest()


def test_a_step_is_one_script_call_and_no_other_command(
    redis_server: RedisServer, start_replica: Callable[..., ServerHandle]
) -> None:
    replica = start_replica(redis_server.url)  # step durability, the default
    client = Client(replica.target)
    sid = client.create_session("charlm").id
    assert client.suggest_once(sid, "F").steps == 1  # the first step loads the scripts, owns the lease
    monitor = Monitor(redis_server.port)
    try:
        for i in range(STEPS):
            assert client.suggest_once(sid, "riends, Romans"[i % 14]).steps == i + 2
    finally:
        lines = monitor.close()
    sent = [line for line in lines if sid in line and "[0 lua]" not in line]  # what replicas sent about it
    inner = [line for line in lines if sid in line and "[0 lua]" in line]
    assert len(sent) == STEPS, "\n".join(sent)  # one command per step: one round trip
    assert all(f'"EVALSHA" "{sha_of("save")}"' in line for line in sent), "\n".join(sent)
    assert inner, "the save script's own commands run inside Redis (MONITOR shows them as [0 lua])"
    assert not any('"GET"' in line or '"get"' in line for line in sent)  # no read before the write
