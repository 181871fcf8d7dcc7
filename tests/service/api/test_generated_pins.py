"""The committed generated code (service/api/gen) and pyproject.toml's pins agree: the generators are pinned to the
versions that wrote the code (so `make proto-check` on a clean clone regenerates it byte for byte whatever was
released since), and the runtime lower bounds admit no grpcio or protobuf the code refuses to import under."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[3]
GEN = ROOT / "service" / "api" / "gen"


def _requirements(group: str | None) -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return {(r := Requirement(line)).name: r for line in lines}


def _pinned(req: Requirement) -> Version:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} must be pinned with == (a new release must not change what the checks see)"
    return Version(spec.version)


def _lowest(req: Requirement) -> Version:
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
    assert lows, f"{req} has no lower bound"
    return max(lows)


def test_the_generators_are_pinned_to_the_versions_that_wrote_the_code() -> None:
    dev = _requirements("dev")
    tools = _pinned(dev["grpcio-tools"])
    _pinned(dev["mypy-protobuf"])
    grpc_files = sorted(GEN.rglob("*_pb2_grpc.py"))
    assert len(grpc_files) >= 6
    written = {p.name: re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'$", p.read_text(), re.M) for p in grpc_files}
    assert all(written.values()), [name for name, m in written.items() if m is None]
    assert {Version(m.group(1)) for m in written.values() if m} == {tools}


def test_the_runtime_bounds_admit_only_versions_the_generated_code_imports_under() -> None:
    runtime = _requirements(None)
    tools = _pinned(_requirements("dev")["grpcio-tools"])
    # *_pb2_grpc.py raises unless grpcio >= the grpcio-tools that wrote it.
    assert _lowest(runtime["grpcio"]) >= tools
    # *_pb2.py raises unless protobuf is the gencode's major and at least its version.
    pb2 = sorted(GEN.rglob("*_pb2.py"))
    gencode = set()
    for p in pb2:
        m = re.search(
            r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
            p.read_text(),
        )
        assert m, f"{p.name}: no protobuf runtime check found"
        gencode.add(Version(".".join(m.groups())))
    (version,) = gencode
    protobuf = runtime["protobuf"].specifier
    assert _lowest(runtime["protobuf"]) >= version
    assert protobuf.contains(str(version)) and not protobuf.contains(f"{version.major + 1}.0.0")
