"""``step`` durability costs one Redis round trip per step, not more: a step is one ``EVALSHA`` of the save
script (the lease is owned and cached, nothing is read back), its inner commands run inside Redis. Counted with
``MONITOR`` on a real ``redis-server`` (redis-py's ``Monitor``), which reports every command a client sends and,
apart (client type ``lua``), the commands scripts run."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

from service.client import Client
from service.core.sessions.redis_scripts import SCRIPTS
from tests.conftest import ServerHandle
from tests.redis.servers import RedisServer

STEPS = 20
END = "seqserve-round-trips-end"


def test_a_step_is_one_script_call_and_no_other_command(
    redis_server: RedisServer, start_replica: Callable[..., ServerHandle]
) -> None:
    replica = start_replica(redis_server.url)  # step durability, the default
    client = Client(replica.target)
    sid = client.create_session("charlm").id
    assert client.suggest_once(sid, "F").steps == 1  # the first step loads the scripts, owns the lease
    seen: list[dict[str, Any]] = []
    open_monitor: Callable[[], Any] = redis_server.client().monitor  # (redis-py leaves it unannotated)
    with open_monitor() as monitor:  # MONITOR is on once this returns

        def read() -> None:  # until our own end marker comes by
            while (cmd := monitor.next_command())["command"] != f"ECHO {END}":
                seen.append(cmd)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        for i in range(STEPS):
            assert client.suggest_once(sid, "riends, Romans"[i % 14]).steps == i + 2
        redis_server.client().echo(END)
        reader.join(10)
        assert not reader.is_alive()
    about = [c for c in seen if sid in c["command"]]
    sent = [c["command"] for c in about if c["client_type"] != "lua"]  # what the replica sent about the session
    inner = [c["command"] for c in about if c["client_type"] == "lua"]
    save = hashlib.sha1(SCRIPTS["save"].encode()).hexdigest()
    assert len(sent) == STEPS, "\n".join(sent)  # one command per step: one round trip
    assert all(c.startswith(f"EVALSHA {save} ") for c in sent), "\n".join(sent)
    assert inner, "the save script's own commands run inside Redis"
    assert not any(c.split()[0].upper() == "GET" for c in sent)  # no read before the write
