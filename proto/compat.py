"""Wire compatibility of the served protobuf API with what it was: ``proto/api.lock.json`` records every message
field (number, name, type, label), enum value and RPC as released; a change may add, never alter or drop.

    python proto/compat.py            # exit 1 listing each break (``make proto-check``)
    python proto/compat.py --update   # record additions in the lock (refused while anything breaks)

A break is what makes an existing client read wrong values or fail: a field, enum value or RPC removed without
reserving its number and name (a later field could reuse them), or kept with another type, label, name or message
type (``float`` to ``double`` reads as zero on an old client, silently). Numbers and names reserved in the proto
may leave the lock. Reads the generated modules under ``service/api/gen`` (``proto/generate.py --check`` keeps
them equal to ``proto/``), so it needs no protoc.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
GEN_DIR = ROOT / "service" / "api" / "gen"
LOCK = ROOT / "proto" / "api.lock.json"

Snapshot = dict[str, Any]


def generated_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """The FileDescriptorProto of every generated ``*_pb2`` module, by path."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    out = []
    for path in sorted(GEN_DIR.rglob("*_pb2.py")):
        module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
        fdp = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fdp)
        out.append(fdp)
    return out


def _reserved(d: descriptor_pb2.DescriptorProto | descriptor_pb2.EnumDescriptorProto) -> dict[str, Any]:
    if isinstance(d, descriptor_pb2.DescriptorProto):  # message ranges are end-exclusive, enum ranges inclusive
        numbers = [[r.start, r.end - 1] for r in d.reserved_range]
    else:
        numbers = [[r.start, r.end] for r in d.reserved_range]
    return {"numbers": numbers, "names": sorted(d.reserved_name)}


def snapshot(files: list[descriptor_pb2.FileDescriptorProto]) -> Snapshot:
    """What a client depends on, keyed by full name: fields by number, enum values by number, RPCs by name."""
    messages: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    methods: dict[str, Any] = {}

    def enum(prefix: str, e: descriptor_pb2.EnumDescriptorProto) -> None:
        enums[f"{prefix}.{e.name}"] = {"values": {str(v.number): v.name for v in e.value}, "reserved": _reserved(e)}

    def message(prefix: str, m: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{m.name}"
        fields = {
            str(f.number): [
                f.name,
                descriptor_pb2.FieldDescriptorProto.Type.Name(f.type),
                descriptor_pb2.FieldDescriptorProto.Label.Name(f.label),
                f.type_name,
            ]
            for f in m.field
        }
        messages[name] = {"fields": fields, "reserved": _reserved(m)}
        for nested in m.nested_type:
            if not nested.options.map_entry:  # map<k, v> entries are the map field's type, checked with it
                message(name, nested)
        for e in m.enum_type:
            enum(name, e)

    for f in files:
        for m in f.message_type:
            message(f.package, m)
        for e in f.enum_type:
            enum(f.package, e)
        for s in f.service:
            for rpc in s.method:
                methods[f"{f.package}.{s.name}/{rpc.name}"] = [
                    rpc.input_type,
                    rpc.output_type,
                    rpc.client_streaming,
                    rpc.server_streaming,
                ]
    return {"messages": messages, "enums": enums, "methods": methods}


def _is_reserved(number: int, name: str, reserved: dict[str, Any]) -> bool:
    return any(lo <= number <= hi for lo, hi in reserved["numbers"]) and name in reserved["names"]


def breaks(lock: Snapshot, now: Snapshot) -> list[str]:
    """Each way ``now`` breaks a client built against ``lock``; empty when it only adds."""
    out = []
    for kind, items in (("field", "messages"), ("value", "enums")):
        table = "fields" if kind == "field" else "values"
        for owner, old in lock[items].items():
            new = now[items].get(owner)
            if new is None:
                out.append(f"{items[:-1]} {owner} was removed")
                continue
            kept = new["reserved"]
            for lo, hi in old["reserved"]["numbers"]:
                if not any(a <= lo and hi <= b for a, b in kept["numbers"]):
                    out.append(f"{items[:-1]} {owner} no longer reserves numbers {lo}-{hi}")
            for name in sorted(set(old["reserved"]["names"]) - set(kept["names"])):
                out.append(f"{items[:-1]} {owner} no longer reserves the name {name!r}")
            for number, was in old[table].items():
                name = was[0] if kind == "field" else was
                got = new[table].get(number)
                if got is None:
                    if not _is_reserved(int(number), name, new["reserved"]):
                        out.append(
                            f"{kind} {owner} #{number} {name!r} was removed without `reserved {number};` and "
                            f'`reserved "{name}";`: a later {kind} could reuse them'
                        )
                elif got != was:
                    out.append(f"{kind} {owner} #{number} changed from {was} to {got}: old clients misread it")
    for rpc, was in lock["methods"].items():
        got = now["methods"].get(rpc)
        if got is None:
            out.append(f"rpc {rpc} was removed")
        elif got != was:
            out.append(f"rpc {rpc} changed from {was} to {got} (input, output, client/server streaming)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--update", action="store_true", help="record additions in proto/api.lock.json")
    args = parser.parse_args(argv)
    now = snapshot(generated_files())
    lock = json.loads(LOCK.read_text()) if LOCK.exists() else {"messages": {}, "enums": {}, "methods": {}}
    problems = breaks(lock, now)
    for p in problems:
        print(f"proto/compat.py: {p}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} incompatible change(s) to the served API (see proto/compat.py)", file=sys.stderr)
        return 1
    text = json.dumps(now, indent=1, sort_keys=True) + "\n"
    if args.update:
        LOCK.write_text(text)
        print(f"recorded {LOCK.relative_to(ROOT)}")
    elif not LOCK.exists() or LOCK.read_text() != text:
        print("proto/api.lock.json is behind proto/: run `python proto/compat.py --update`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
