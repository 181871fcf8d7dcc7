"""Our proto/inference/grpc_service.proto must match upstream on the wire: for every message and field we
declare, tritonclient 2.41's descriptors have the same name, number, type and repetition; same for the RPCs."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor

from service.api.gen.inference import grpc_service_pb2 as ours

# Dumps descriptors as {message: {field: [number, type, repeated, type_name]}} plus the service's methods.
DUMP = """
import json, sys
def dump(files):
    out, methods = {}, {}
    def walk(m):
        out[m.full_name] = {f.name: [f.number, f.type, f.is_repeated, (f.message_type or f.enum_type).full_name
                                     if (f.message_type or f.enum_type) else ""] for f in m.fields}
        for n in m.nested_types:
            walk(n)
    for fd in files:
        for m in fd.message_types_by_name.values():
            walk(m)
        for e in fd.enum_types_by_name.values():
            out[e.full_name] = {v.name: [v.number] for v in e.values}
        for s in fd.services_by_name.values():
            for m in s.methods:
                methods[s.full_name + "/" + m.name] = [m.input_type.full_name, m.output_type.full_name,
                                                       m.client_streaming, m.server_streaming]
    return {"messages": out, "methods": methods}
"""


def _ours() -> dict[str, Any]:
    scope: dict[str, Any] = {}
    exec(DUMP, scope)  # the same dump code on both sides
    fd: FileDescriptor = ours.DESCRIPTOR
    result: dict[str, Any] = scope["dump"]([fd])
    return result


def _upstream() -> dict[str, Any]:
    code = DUMP + (
        "from tritonclient.grpc import service_pb2, model_config_pb2\n"
        "print(json.dumps(dump([service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR])))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_messages_and_rpcs_match_tritonclient() -> None:
    mine, upstream = _ours(), _upstream()
    problems = []
    for message, fields in mine["messages"].items():
        theirs = upstream["messages"].get(message)
        if theirs is None:
            problems.append(f"{message}: not upstream")
            continue
        for name, spec in fields.items():
            if theirs.get(name) != spec:
                problems.append(f"{message}.{name}: ours {spec}, upstream {theirs.get(name)}")
    for method, spec in mine["methods"].items():
        if upstream["methods"].get(method) != spec:
            problems.append(f"{method}: ours {spec}, upstream {upstream['methods'].get(method)}")
    assert not problems, "\n".join(problems)
    assert len(mine["methods"]) == 20
    service: ServiceDescriptor = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
