"""Triton's system shared-memory extension (``SEQSERVE_SHARED_MEMORY=system``): the stock tritonclient (gRPC and
HTTP, and its libcshm helpers) registers regions through one frontend of ``--workers 2`` and infers through the
other; the answers equal those of requests that carry their tensors; every refusal says what to fix. Off by
default, where every call says how to turn it on. ``Regions`` itself is checked on files of a temporary folder."""

from __future__ import annotations

import contextvars
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.kserve.tensors import RegionRef, region_ref
from service.core.context import set_principal
from service.core.shm import Regions
from service.core.types import SharedRegion
from service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidInput,
    NotOffered,
    Overloaded,
    PermissionDenied,
    RegionNotFound,
)
from tests.conftest import ServerHandle
from tests.service.kserve.procs import start_server, stop_server

SCRIPT = Path(__file__).parent / "shm_client.py"
K_ALICE, K_BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdefgh"
K_CAROL = "carol-key-0123456789abcdefg"


@pytest.fixture(scope="module", params=["1", "2"], ids=["one-engine", "two-engines"])
def workers(
    kserve_repo: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    """Two frontends, and one engine or two (a region is registered in every engine; each frontend's calls go to
    its own)."""
    proc, info = start_server(
        kserve_repo,
        tmp_path_factory.mktemp("shm"),
        SEQSERVE_WORKERS="2",
        SEQSERVE_ENGINES=request.param,
        SEQSERVE_FRONTEND_PORTS="true",
        SEQSERVE_HTTP_PORT="0",
        SEQSERVE_SHARED_MEMORY="system",
    )
    try:
        yield dict(info)
    finally:
        stop_server(proc)


def _run(protocol: str, url: str, other: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--protocol", protocol, "--url", url, "--other", other],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tritonclient_registers_through_one_frontend_and_infers_through_the_other(
    workers: dict[str, Any], protocol: str
) -> None:
    if protocol == "grpc":
        first, second = (f"127.0.0.1:{p}" for p in workers["frontend_ports"])
    else:
        first = second = f"127.0.0.1:{workers['http_port']}"  # (one REST port, either frontend behind it)
    r = _run(protocol, first, second)
    assert "system_shared_memory" in r["extensions"]
    tag = f"seqserve_test_{protocol}_"
    assert [row[0] for row in r["status"]] == ["in", "out"]
    assert r["status"][0][1].startswith(f"/{tag}") and r["status"][0][2:] == [0, 4096]
    assert r["status_out"][0][0] == "out" and r["status_out"][0][2:] == [1024, 2048]

    s = r["sentiment"]
    assert s["shape"] == [1, 2]
    np.testing.assert_allclose(s["from_region"], s["expected"], rtol=0, atol=1e-6)
    assert s["label"] == s["expected_label"]
    assert r["forecast_max_diff"] <= 1e-6

    refused = r["refusals"]
    codes = {k: v["status"] for k, v in refused.items()}
    if protocol == "grpc":
        assert codes == {
            "again": "StatusCode.ALREADY_EXISTS",
            "no_object": "StatusCode.NOT_FOUND",
            "bad_key": "StatusCode.INVALID_ARGUMENT",
            "too_big": "StatusCode.INVALID_ARGUMENT",
            "status_unknown": "StatusCode.NOT_FOUND",
            "unknown_region": "StatusCode.NOT_FOUND",
            "past_the_end": "StatusCode.INVALID_ARGUMENT",
            "output_too_small": "StatusCode.INVALID_ARGUMENT",
            "unregistered": "StatusCode.NOT_FOUND",
        }
    else:
        assert set(codes.values()) <= {"400", "404", "409"} and codes["again"] == "409", codes
        assert codes["unknown_region"] == "404" and codes["past_the_end"] == "400"
    messages = {k: v["message"] for k, v in refused.items()}
    assert "is registered already; unregister it first" in messages["again"]
    assert "create it there (shm_open) before registering it" in messages["no_object"]
    assert "is not a POSIX shared-memory name" in messages["bad_key"]
    assert "offset 0 + byte_size 4097 passes the end of shared-memory object" in messages["too_big"]
    assert "no shared-memory region 'nope' is registered" in messages["status_unknown"]
    assert "input TEXT: no shared-memory region 'nope' is registered; register it first" in messages["unknown_region"]
    assert (
        "shared_memory_offset 1000 + shared_memory_byte_size 4000 pass the end of region 'in'"
        in messages["past_the_end"]
    )
    assert (
        "is 8 bytes, more than its shared_memory_byte_size 4: give the output a larger region"
        in messages["output_too_small"]
    )
    assert [row[0] for row in r["after_unregister"]] == ["out"]
    assert "no shared-memory region 'in' is registered" in messages["unregistered"]
    assert r["after_unregister_all"] == [] and r["still_serving"] is True


def test_off_by_default_every_call_says_how_to_turn_it_on(kserve_server: dict[str, int]) -> None:
    """The shared KServe server runs with the default: the extension is not listed and each of its calls, and an
    input naming a region, is UNIMPLEMENTED naming the setting."""
    with grpc.insecure_channel(f"127.0.0.1:{kserve_server['grpc_port']}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert "system_shared_memory" not in stub.ServerMetadata(pb.ServerMetadataRequest()).extensions
        request = pb.ModelInferRequest(model_name="sentiment")
        t = request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
        t.parameters["shared_memory_region"].string_param = "in"
        t.parameters["shared_memory_byte_size"].int64_param = 8
        calls: list[Callable[[], object]] = [
            lambda: stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()),
            lambda: stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(name="a", key="/a")),
            lambda: stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest()),
            lambda: stub.ModelInfer(request),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "start the server with SEQSERVE_SHARED_MEMORY=system" in info.value.details()
        assert stub.ServerLive(pb.ServerLiveRequest()).live


def test_cuda_shared_memory_has_no_regions_and_registering_says_what_to_use_instead(
    kserve_server: dict[str, int],
) -> None:
    """As a Triton built without GPU support answers: the status is empty and unregistering succeeds (perf_analyzer
    unregisters CUDA regions too, at its start and end), registering is UNIMPLEMENTED naming the alternatives."""
    with grpc.insecure_channel(f"127.0.0.1:{kserve_server['grpc_port']}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert not stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest()).regions
        stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest())
        stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest(name="r"))
        with pytest.raises(grpc.RpcError) as info:
            stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(name="r"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            stub.CudaSharedMemoryRegister(pb.CudaSharedMemoryRegisterRequest(name="r", byte_size=8))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "send the tensors in the request, or use system shared memory" in info.value.details()


def _probabilities_into(region: str) -> pb.ModelInferRequest:
    """A sentiment request whose PROBABILITIES go into ``region`` (8 bytes: two float32 classes)."""
    request = pb.ModelInferRequest(model_name="sentiment")
    text = request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"a fine film")
    out = request.outputs.add(name="PROBABILITIES")
    out.parameters["shared_memory_region"].string_param = region
    out.parameters["shared_memory_byte_size"].int64_param = 8
    return request


def test_registering_needs_a_named_principal_and_regions_are_their_principals(
    serve: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """Registering makes the server open a file of its host: with API keys, for ADMIN_PRINCIPALS (as loading models
    is) and SHARED_MEMORY_PRINCIPALS (which may do nothing else of an admin's) only. A region is its registering
    principal's, as a sequence is: another principal's status, tensors and unregistering see it as not registered,
    and may register the same name for a region of its own."""
    handle = serve(
        shared_memory="system",
        api_keys=f"alice:{K_ALICE},bob:{K_BOB},carol:{K_CAROL}",
        admin_principals=["alice"],
        shared_memory_principals=["carol"],
    )
    key, hers = f"seqserve_test_admin_{os.getpid()}", f"seqserve_test_carol_{os.getpid()}"
    path, carols = Path("/dev/shm") / key, Path("/dev/shm") / hers
    path.write_bytes(bytes(64))
    carols.write_bytes(bytes(64))
    try:
        with grpc.insecure_channel(handle.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            alice, bob, carol = ((("authorization", f"Bearer {k}"),) for k in (K_ALICE, K_BOB, K_CAROL))
            register = pb.SystemSharedMemoryRegisterRequest(name="r", key=f"/{key}", byte_size=64)
            with pytest.raises(grpc.RpcError) as info:
                stub.SystemSharedMemoryRegister(register, metadata=bob)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert info.value.details() == (
                "principal 'bob' may not register shared-memory regions; list it in shared_memory_principals "
                "(SEQSERVE_SHARED_MEMORY_PRINCIPALS) or admin_principals (SEQSERVE_ADMIN_PRINCIPALS) to allow it"
            )
            with pytest.raises(grpc.RpcError) as info:
                stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            stub.SystemSharedMemoryRegister(register, metadata=alice)
            status = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=alice)
            assert list(status.regions) == ["r"] and status.regions["r"].byte_size == 64

            # bob's view: no region "r", whatever he asks; alice's region keeps its bytes
            assert not stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=bob).regions
            with pytest.raises(grpc.RpcError) as info:
                stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="r"), metadata=bob)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(_probabilities_into("r"), metadata=bob)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "no shared-memory region 'r' is registered; register it first" in info.value.details()
            assert path.read_bytes() == bytes(64)
            with pytest.raises(grpc.RpcError) as info:
                stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), metadata=bob)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

            # carol, a shared-memory principal and no admin: not alice's object (its memory is alice's, under any
            # name), but her own "r" of her own object beside alice's; unregistering all of hers leaves alice's
            with pytest.raises(grpc.RpcError) as info:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="sentiment"), metadata=carol)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as info:
                stub.SystemSharedMemoryRegister(
                    pb.SystemSharedMemoryRegisterRequest(name="c", key=key, offset=32, byte_size=32), metadata=carol
                )
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert info.value.details() == (
                f"shared-memory object '{key}' is registered by another caller; create one of your own (shm_open, a "
                "name no other client uses) and register that"
            )
            stub.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name="r", key=f"/{hers}", offset=32, byte_size=32), metadata=carol
            )
            assert (
                stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=carol).regions["r"].offset
                == 32
            )
            stub.ModelInfer(_probabilities_into("r"), metadata=carol)  # into bytes 32..40 of her object
            written = carols.read_bytes()
            assert written[:32] == bytes(32) and written[32:40] != bytes(8) and path.read_bytes() == bytes(64)
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), metadata=carol)
            assert not stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=carol).regions
            answer = stub.ModelInfer(_probabilities_into("r"), metadata=alice)  # alice's region serves on
            probs = np.frombuffer(path.read_bytes()[:8], dtype=np.float32)
            assert np.isclose(probs.sum(), 1.0) and answer.outputs[0].name == "PROBABILITIES"
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), metadata=alice)
            assert not stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=alice).regions
    finally:
        path.unlink()
        carols.unlink()


# --- Regions, on a folder standing in for /dev/shm ---------------------------------------------------------------
def _object(root: Path, name: str, size: int) -> Path:
    path = root / name
    path.write_bytes(bytes(size))
    return path


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"shared_memory_region": pb.InferParameter(int64_param=3)},
         "input X: parameter shared_memory_region must be a non-empty string (a registered region's name), got an "
         "int64 (3)"),
        ({"shared_memory_region": pb.InferParameter(string_param="r")},
         "input X: shared_memory_region needs shared_memory_byte_size"),
        ({"shared_memory_region": pb.InferParameter(string_param="r"),
          "shared_memory_byte_size": pb.InferParameter(string_param="8")},
         "input X: parameter shared_memory_byte_size must be an integer >= 0, got a string ('8')"),
        ({"shared_memory_region": pb.InferParameter(string_param="r"),
          "shared_memory_byte_size": pb.InferParameter(int64_param=8),
          "shared_memory_offset": pb.InferParameter(int64_param=-1)},
         "input X: parameter shared_memory_offset must be an integer >= 0, got an int64 (-1)"),
    ],
)  # fmt: skip
def test_a_region_reference_of_the_wrong_kind_says_what_it_got(values: dict[str, Any], message: str) -> None:
    """In words a REST client's JSON reads too (they said string_param, int64_param or uint64_param)."""
    request = pb.ModelInferRequest()
    for key, value in values.items():
        request.parameters[key].CopyFrom(value)
    with pytest.raises(InvalidInput) as info:
        region_ref(request.parameters, "input X")
    assert message in info.value.message
    request.parameters["shared_memory_byte_size"].CopyFrom(pb.InferParameter(uint64_param=8))
    request.parameters["shared_memory_offset"].CopyFrom(pb.InferParameter(int64_param=0))
    request.parameters["shared_memory_region"].CopyFrom(pb.InferParameter(string_param="r"))
    assert region_ref(request.parameters, "input X") == RegionRef("r", 0, 8)


def test_regions_read_and_write_inside_their_bounds(tmp_path: Path) -> None:
    obj = _object(tmp_path, "obj", 64)
    regions = Regions(True, root=str(tmp_path))
    regions.register(SharedRegion("r", "/obj", 16, 32))
    regions.write("r", 4, 8, b"abcd", what="output 'X'")
    assert obj.read_bytes()[20:24] == b"abcd"  # the region starts at 16 of the object
    assert regions.read("r", 4, 4, what="input 'X'") == b"abcd"
    with pytest.raises(InvalidInput, match="shared_memory_offset 30 \\+ shared_memory_byte_size 4 pass the end"):
        regions.read("r", 30, 4, what="input 'X'")
    with pytest.raises(InvalidInput, match="is 9 bytes, more than its shared_memory_byte_size 8"):
        regions.write("r", 0, 8, b"x" * 9, what="output 'X'")
    assert obj.read_bytes()[16:20] == bytes(4)  # a refused write writes nothing
    with pytest.raises(AlreadyExists):
        regions.register(SharedRegion("r", "obj", 0, 8))
    for key in ("../obj", "/a/b", "..", ""):
        with pytest.raises(InvalidInput, match="is not a POSIX shared-memory name"):
            regions.register(SharedRegion("k", key, 0, 8))
    with pytest.raises(RegionNotFound, match="no shared-memory object '/gone'"):
        regions.register(SharedRegion("g", "/gone", 0, 8))
    os.symlink(obj, tmp_path / "link")
    with pytest.raises(InvalidInput, match="cannot be opened"):  # O_NOFOLLOW: a link is never followed
        regions.register(SharedRegion("l", "link", 0, 8))
    (tmp_path / "dir").mkdir()
    with pytest.raises(InvalidInput):
        regions.register(SharedRegion("d", "dir", 0, 8))
    with pytest.raises(InvalidInput, match="offset must be >= 0 and byte_size > 0"):
        regions.register(SharedRegion("z", "obj", 0, 0))
    assert [r.name for r in regions.status()] == ["r"]
    with open(obj, "r+b") as f:  # its owner shrinks the object: what passes its new end is refused
        f.truncate(24)
    assert regions.read("r", 0, 8, what="input 'X'") == bytes(4) + b"abcd"  # (16..24: still there)
    for call in (lambda: regions.read("r", 4, 8, what="input 'X'"), lambda: regions.write("r", 8, 4, b"zzzz", "o")):
        with pytest.raises(FailedPrecondition, match="is now 24 bytes, shorter than the 28 that region 'r' needs"):
            call()
    regions.unregister("not-there")  # as in Triton: no error
    regions.unregister(None)
    assert regions.status() == []
    with pytest.raises(RegionNotFound, match="register it first"):
        regions.read("r", 0, 4, what="input 'X'")


def test_an_output_goes_only_into_the_registration_it_was_checked_against(tmp_path: Path) -> None:
    """An output's region unregistered and registered again (another object under its name) while its request ran
    got the output, written into the new object while the request was checked against the old one; the same
    registration again is the same place and is written into."""
    a, b = _object(tmp_path, "a", 16), _object(tmp_path, "b", 16)
    regions = Regions(True, root=str(tmp_path))
    regions.register(SharedRegion("out", "/a", 0, 16))
    checked = regions.check("out", 0, 8, what="output 'X'")  # when the request is read
    regions.unregister("out")
    regions.register(SharedRegion("out", "/b", 0, 16))
    with pytest.raises(FailedPrecondition, match="region 'out' was unregistered and registered again while the"):
        regions.write("out", 0, 8, b"abcd", what="output 'X' (the model ran)", checked=checked)
    assert a.read_bytes()[:4] == b.read_bytes()[:4] == bytes(4)
    regions.unregister("out")
    regions.register(SharedRegion("out", "/a", 0, 16))  # the same registration as checked
    regions.write("out", 0, 8, b"abcd", what="output 'X' (the model ran)", checked=checked)
    assert a.read_bytes()[:4] == b"abcd"


def test_a_frontend_follows_the_engines_table(tmp_path: Path) -> None:
    _object(tmp_path, "a", 16)
    _object(tmp_path, "b", 16)
    regions = Regions(True, root=str(tmp_path))
    a, b = SharedRegion("a", "a", 0, 16), SharedRegion("b", "/b", 0, 8)
    regions.follow([a, b, SharedRegion("c", "/missing", 0, 8)])  # one that cannot be mapped is left out
    assert regions.status() == [a, b]
    moved = SharedRegion("b", "/b", 8, 8)  # re-registered with other bounds: mapped again
    regions.follow([moved])
    assert regions.status() == [moved]
    regions.close()
    assert regions.status() == []


def _as(who: str, call: Callable[[], Any]) -> Any:
    """``call()`` with ``who`` as the caller's principal (in a copy of the context: nothing leaks to other tests)."""

    def run() -> Any:
        set_principal(who)
        return call()

    return contextvars.copy_context().run(run)


def test_each_principal_has_its_own_regions_and_frontends_follow_them(tmp_path: Path) -> None:
    obj, theirs = _object(tmp_path, "obj", 32), _object(tmp_path, "obj2", 32)
    engine, frontend = Regions(True, root=str(tmp_path)), Regions(True, root=str(tmp_path))
    _as("alice", lambda: engine.register(SharedRegion("r", "obj", 0, 16)))
    _as("carol", lambda: engine.register(SharedRegion("r", "obj2", 16, 16)))  # the same name: hers
    with pytest.raises(AlreadyExists):
        _as("alice", lambda: engine.register(SharedRegion("r", "obj", 0, 8)))
    assert [(r.owner, r.offset) for r in engine.table()] == [("alice", 0), ("carol", 16)]
    frontend.follow(engine.table())
    _as("carol", lambda: frontend.write("r", 0, 4, b"cccc", what="output 'X'"))
    assert theirs.read_bytes()[16:20] == b"cccc" and obj.read_bytes() == bytes(32)
    assert _as("alice", lambda: frontend.read("r", 0, 4, what="input 'X'")) == bytes(4)
    for view in (engine, frontend):
        assert _as("bob", view.status) == []
        with pytest.raises(RegionNotFound):
            _as("bob", functools.partial(view.status, "r"))
        with pytest.raises(RegionNotFound, match="no shared-memory region 'r' is registered; register it first"):
            _as("bob", functools.partial(view.read, "r", 0, 4, what="input 'X'"))
    _as("bob", lambda: engine.unregister(None))  # nothing of bob's: alice's and carol's stay
    _as("carol", lambda: engine.unregister("r"))
    assert [r.owner for r in engine.table()] == ["alice"]
    frontend.follow(engine.table())
    assert [r.owner for r in frontend.table()] == ["alice"] and _as("carol", frontend.status) == []
    engine.close()
    frontend.close()


def test_another_principals_object_cannot_be_registered(tmp_path: Path) -> None:
    """Region names were each principal's own, but the memory was not: bob registered alice's object (its key
    guessed, or tritonclient's examples' /input_simple) under a name of his, read her input through a model's answer
    and wrote his answers over it."""
    _object(tmp_path, "alices", 64)
    regions = Regions(True, root=str(tmp_path))
    _as("alice", lambda: regions.register(SharedRegion("in", "/alices", 0, 32)))
    _as("alice", lambda: regions.register(SharedRegion("out", "alices", 32, 32)))  # her own object again: fine
    for key in ("/alices", "alices"):
        with pytest.raises(PermissionDenied, match=f"shared-memory object '{key}' is registered by another caller"):
            _as("bob", lambda key=key: regions.register(SharedRegion("bobs", key, 0, 64)))  # type: ignore[misc]
    assert [(r.owner, r.name) for r in regions.table()] == [("alice", "in"), ("alice", "out")]
    _as("alice", lambda: regions.unregister(None))
    _as("bob", lambda: regions.register(SharedRegion("bobs", "alices", 0, 64)))  # free again: his to register
    regions.close()


def test_a_full_region_table_is_resource_exhausted_until_one_is_unregistered(tmp_path: Path) -> None:
    _object(tmp_path, "obj", 16)
    _object(tmp_path, "obj2", 16)
    regions = Regions(True, root=str(tmp_path), limit=2)
    _as("alice", lambda: regions.register(SharedRegion("a", "obj", 0, 8)))
    _as("carol", lambda: regions.register(SharedRegion("a", "obj2", 8, 8)))
    with pytest.raises(Overloaded, match="holds 2 shared-memory regions, its most; unregister one first"):
        _as("alice", lambda: regions.register(SharedRegion("b", "obj", 0, 8)))
    _as("carol", lambda: regions.unregister("a"))
    _as("alice", lambda: regions.register(SharedRegion("b", "obj", 0, 8)))
    assert [(r.owner, r.name) for r in regions.table()] == [("alice", "a"), ("alice", "b")]
    regions.close()


def test_off_regions_refuse_everything_naming_the_setting() -> None:
    regions = Regions(False)
    for call in (
        lambda: regions.status(),
        lambda: regions.register(SharedRegion("a", "/a", 0, 8)),
        lambda: regions.unregister(None),
        lambda: regions.read("a", 0, 8, what="input 'X'"),
    ):
        with pytest.raises(NotOffered, match="SEQSERVE_SHARED_MEMORY=system"):
            call()
