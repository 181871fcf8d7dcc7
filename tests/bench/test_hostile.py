"""``python -m bench.hostile`` on a short campaign against a real server on the tiny models: every request
answered, no UNKNOWN or INTERNAL on either side, the control session unchanged, and ServerLive timed by a probe
process of its own. The full campaign (12,000 requests) is the bench's; this only keeps its code working."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import hostile
from bench.launch import serve


@pytest.mark.parametrize(
    ("workers", "engines"), [(1, 1), (2, 2)], ids=["one-process", "two-frontends-two-engines"]
)  # (the second: bad input through the routing to several engines)
def test_a_short_campaign_passes_and_times_serverlive_from_its_own_process(
    tiny_models: Path, workers: int, engines: int
) -> None:
    env = {"SEQSERVE_API_KEYS": ",".join(f"{k}:{v}" for k, v in hostile.KEYS.items()),
           "SEQSERVE_ADMIN_PRINCIPALS": "alice", "SEQSERVE_LOG_LEVEL": "WARNING",
           "SEQSERVE_ENGINES": str(engines)}  # fmt: skip
    with serve(tiny_models, env, workers=workers) as server:
        r = hostile.run(server.target, server.metrics_port, server.pid, requests=300, threads=4, seed=1)
    assert r["requests"] >= 300  # (plus the plan's fixed number of huge requests)
    assert hostile.failed(r) == [], r["codes"]
    assert "INVALID_ARGUMENT" in r["codes"] and "OK" in r["codes"]  # it did send bad and good requests
    live = r["server_live_ms"]
    assert live["n"] >= 1 and 0 < live["p50"] <= live["p99"] <= live["max"]


def test_a_refused_serverlive_probe_fails_the_campaign() -> None:
    ok = {"codes": {"OK": 3}, "server_codes": {"OK": 3}, "control_unchanged": True, "server_live_refused": {}}
    assert hostile.failed(ok) == []
    refused = ok | {"server_live_refused": {"UNAVAILABLE": 2}}
    assert hostile.failed(refused) == ["ServerLive refused: 2 UNAVAILABLE"]
