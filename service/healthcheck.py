"""The images' HEALTHCHECK (``python -m service.healthcheck``): exit 0 when the server in this container is ready
(its models loaded, not draining), 1 otherwise, saying why on one line.

Plaintext: the gRPC health service's whole-server status (``""``) on ``127.0.0.1:$SEQSERVE_PORT``. With TLS
(``SEQSERVE_TLS_CERT`` set): the metrics port's ``/readyz`` over HTTPS, which follows the same status; the gRPC
port would want a client certificate under mTLS, which a probe has none of, and ``/readyz`` answers without one.
The certificate is not checked there (the probe talks to its own container over loopback, as kubelet's HTTPS
probes do). Reads the environment only, so it starts fast and never fails on a setting the server accepts.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request


def ready(env: dict[str, str]) -> tuple[bool, str]:
    if env.get("SEQSERVE_TLS_CERT"):
        url = f"https://127.0.0.1:{env.get('SEQSERVE_METRICS_PORT', '8002')}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=3, context=ssl._create_unverified_context()) as answer:
                return answer.status == 200, f"{url}: {answer.status}"
        except urllib.error.HTTPError as exc:
            return False, f"{url}: {exc.code}"
        except (OSError, ValueError) as exc:
            return False, f"{url}: {exc}"
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"127.0.0.1:{env.get('SEQSERVE_PORT', '50051')}"
    with grpc.insecure_channel(target) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3).status
        except grpc.RpcError as exc:
            return False, f"gRPC health at {target}: {exc.code().name}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    return status == health_pb2.HealthCheckResponse.SERVING, f"gRPC health at {target}: {name}"


def main() -> int:
    ok, why = ready(dict(os.environ))
    if not ok:
        print(f"not ready: {why}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
