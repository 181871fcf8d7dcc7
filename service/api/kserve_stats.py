"""Per-model inference statistics for the KServe v2 ModelStatistics RPC (Triton's statistics extension).

Counts what went through this endpoint: requests (execution_count), inferences (inference_count: each text
of a sentiment batch counts), cumulative success/fail durations, and the last inference time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from service.api.gen.inference import grpc_service_pb2 as pb


@dataclass
class _Stats:
    inference_count: int = 0
    execution_count: int = 0
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0


class ModelStatsBook:
    def __init__(self) -> None:
        self._by_model: dict[tuple[str, int], _Stats] = {}

    def record(self, name: str, version: int, *, ok: bool, seconds: float, inferences: int) -> None:
        s = self._by_model.setdefault((name, version), _Stats())
        ns = int(seconds * 1e9)
        if ok:
            s.success_count += 1
            s.success_ns += ns
            s.inference_count += inferences
            s.execution_count += 1
        else:
            s.fail_count += 1
            s.fail_ns += ns
        s.last_inference_ms = int(time.time() * 1000)

    def to_pb(self, name: str, version: int) -> pb.ModelStatistics:
        s = self._by_model.get((name, version), _Stats())
        return pb.ModelStatistics(
            name=name,
            version=str(version),
            last_inference=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
            inference_stats=pb.InferStatistics(
                success=pb.StatisticDuration(count=s.success_count, ns=s.success_ns),
                fail=pb.StatisticDuration(count=s.fail_count, ns=s.fail_ns),
            ),
        )
