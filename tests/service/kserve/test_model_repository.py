"""Live model management against a real ``seqserve serve --watch-models`` process: tritonclient's
``unload_model``/``load_model``; a new version folder becomes the default; changed weights reload; a removed
folder unloads. Running sequences keep their version, and get FAILED_PRECONDITION once it is gone or its
weights changed; health, the repository index and the metrics follow every change."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.kserve.tensors import serialize_bytes
from service.core.manifest import MANIFEST_FILE, MODEL_FILE
from tests.service.kserve.procs import CLIENT_SCRIPT, start_server, stop_server

Input = pb.ModelInferRequest.InferInputTensor
SENTIMENT_SERVICE = "seqserve.v1.Sentiment"


class Live:
    def __init__(self, repo: Path, ports: dict[str, int], channel: grpc.Channel) -> None:
        self.repo, self.ports = repo, ports
        self.url = f"127.0.0.1:{ports['grpc_port']}"
        self.v2 = pb_grpc.GRPCInferenceServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    def tritonclient(self, op: str, model: str) -> dict[str, object]:
        done = subprocess.run(
            [sys.executable, str(CLIENT_SCRIPT), "--url", self.url, "--repository", f"{op}:{model}"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        report: dict[str, object] = json.loads(done.stdout)
        return report

    def step(self, text: str, version: str = "", **seq: object) -> pb.ModelInferResponse:
        request = pb.ModelInferRequest(
            model_name="charlm", model_version=version, inputs=[Input(name="TEXT", datatype="BYTES", shape=[1])]
        )
        request.raw_input_contents.append(serialize_bytes([text.encode()]))
        for key, value in seq.items():
            if isinstance(value, bool):
                request.parameters[key].bool_param = value
            else:
                request.parameters[key].string_param = str(value)
        response: pb.ModelInferResponse = self.v2.ModelInfer(request, timeout=30)
        return response

    def versions(self) -> list[str]:
        return list(self.v2.ModelMetadata(pb.ModelMetadataRequest(name="charlm"), timeout=30).versions)

    def sha(self, version: str) -> str:
        response: pb.ModelConfigResponse = self.v2.ModelConfig(
            pb.ModelConfigRequest(name="charlm", version=version), timeout=30
        )
        return response.config.parameters["sha256"].string_value

    def serving(self, service: str) -> bool:
        status = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status
        return bool(status == health_pb2.HealthCheckResponse.SERVING)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics_port']}/metrics", timeout=30) as r:
            text: str = r.read().decode()
            return text


def wait_for(condition: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    """Polls ``condition`` (the watcher runs every 0.2 s); fails naming ``what`` after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.1)


@pytest.fixture
def live(kserve_repo: Path, tmp_path: Path) -> Iterator[Live]:
    repo = tmp_path / "models"
    shutil.copytree(kserve_repo, repo)
    shutil.move(repo / "charlm" / "2", tmp_path / "charlm-2")  # added later, by the test
    proc, ports = start_server(repo, tmp_path, SEQSERVE_WATCH_MODELS_SECONDS="0.2", SEQSERVE_GRACE_SECONDS="2")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports['grpc_port']}") as channel:
            yield Live(repo, ports, channel)
    finally:
        stop_server(proc)


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), str(e.value.details())


def test_unload_and_load_with_tritonclient(live: Live) -> None:
    assert live.serving(SENTIMENT_SERVICE)
    out = live.tritonclient("unload", "sentiment")
    assert out["error"] == {"status": "OK", "message": ""} and out["ready"] is False
    infer = out["infer"]
    assert isinstance(infer, dict) and infer["status"] == "StatusCode.UNAVAILABLE" and "unloaded" in infer["message"]
    index = {(m["name"], m.get("version", "")): m for m in out["index"]["models"]}  # type: ignore[index]
    assert index[("sentiment", "")]["state"] == "UNAVAILABLE" and index[("sentiment", "")]["reason"] == "unloaded"
    assert "model_repository" in out["extensions"]  # type: ignore[operator]
    assert not live.serving(SENTIMENT_SERVICE) and live.serving("")  # the others still serve
    assert 'seqserve_model_info{model="sentiment"' not in live.metrics()
    back = live.tritonclient("load", "sentiment")
    assert back["error"] == {"status": "OK", "message": ""} and back["ready"] is True
    assert back["infer"] == {"status": "OK", "message": ""}
    assert live.serving(SENTIMENT_SERVICE)
    assert 'seqserve_model_info{model="sentiment",provider="CPUExecutionProvider",version="1"} 1.0' in live.metrics()
    missing = live.tritonclient("load", "no-such-model")
    assert missing["error"]["status"] == "StatusCode.NOT_FOUND"  # type: ignore[index]


def test_a_load_whose_version_fails_answers_failed_precondition_and_the_rest_serves(live: Live) -> None:
    """tritonclient's load_model on a model with a version whose files do not load (here a half-copied
    model.onnx): the load fails as Triton's does, FAILED_PRECONDITION naming the version and what is wrong, through
    a frontend and the engine; the version that loads serves, and the index says why the other is unavailable."""
    broken = live.repo / "sentiment" / "2"
    shutil.copytree(live.repo / "sentiment" / "1", broken)
    manifest = json.loads((broken / MANIFEST_FILE).read_text())
    (broken / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": 2}))
    (broken / MODEL_FILE).write_bytes((broken / MODEL_FILE).read_bytes()[:1000])
    out = live.tritonclient("load", "sentiment")
    error = out["error"]
    assert isinstance(error, dict) and error["status"] == "StatusCode.FAILED_PRECONDITION", error
    assert error["message"].startswith("model 'sentiment': version 2 failed to load: sha256 of sentiment/2/model.onnx")
    assert error["message"].endswith("; load it again once its files are fixed")
    assert out["ready"] is True and out["infer"] == {"status": "OK", "message": ""}
    index = {(m["name"], m.get("version", "")): m for m in out["index"]["models"]}  # type: ignore[index]
    assert index[("sentiment", "1")]["state"] == "READY"
    assert index[("sentiment", "2")]["state"] == "UNAVAILABLE" and "sha256" in index[("sentiment", "2")]["reason"]
    shutil.rmtree(broken)
    back = live.tritonclient("load", "sentiment")
    assert back["error"] == {"status": "OK", "message": ""} and back["ready"] is True


def test_watch_new_version_changed_weights_and_removed_folder(live: Live, tmp_path: Path) -> None:
    assert live.versions() == ["1"]
    assert live.step("ab", sequence_id="old", sequence_start=True).model_version == "1"
    # A new version folder loads and becomes the default; the running sequence stays on version 1.
    shutil.copytree(tmp_path / "charlm-2", live.repo / "charlm" / "2")
    wait_for(lambda: live.versions() == ["1", "2"], "charlm/2 to load")
    assert live.step("x").model_version == "2"
    kept = live.step("c", sequence_id="old")
    assert kept.model_version == "1" and kept.parameters["seqserve_steps"].int64_param == 3
    # Naming the other version: what to send instead (was the Sessions API's wording with the internal key).
    code, message = _code(lambda: live.step("c", version="2", sequence_id="old"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert message == "sequence 'old' of model charlm runs on version 1, not 2; leave model_version empty or send 1"
    assert live.step("ab", sequence_id="new", sequence_start=True).model_version == "2"
    # Changed weights in version 1 reload it; the sequence pinned to the old weights fails with what to do.
    before = live.sha("1")
    v1 = live.repo / "charlm" / "1"
    manifest = json.loads((tmp_path / "charlm-2" / MANIFEST_FILE).read_text())
    manifest["version"] = 1
    shutil.copy(tmp_path / "charlm-2" / MODEL_FILE, v1 / MODEL_FILE)
    (v1 / MANIFEST_FILE).write_text(json.dumps(manifest))
    wait_for(lambda: live.sha("1") not in ("", before), "charlm/1 to reload")
    code, message = _code(lambda: live.step("d", sequence_id="old"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "version 1 with weights" in message
    assert "start a new sequence" in message
    # Removing the version-2 folder unloads it; its sequence gets FAILED_PRECONDITION, version 1 serves again.
    shutil.rmtree(live.repo / "charlm" / "2")
    wait_for(lambda: live.versions() == ["1"], "charlm/2 to unload")
    code, message = _code(lambda: live.step("d", sequence_id="new"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "version 2, which is no longer loaded" in message
    assert live.step("x").model_version == "1"
    assert 'version="2"' not in "\n".join(
        line for line in live.metrics().splitlines() if line.startswith('seqserve_model_info{model="charlm"')
    )


def test_load_parameters_and_long_versions_are_refused_saying_what_to_do(live: Live) -> None:
    """A config or files sent with RepositoryModelLoad were answered OK and ignored (Triton would apply them); a
    10-digit version was told it is not a positive integer."""
    request = pb.RepositoryModelLoadRequest(model_name="sentiment")
    request.parameters["config"].string_param = '{"max_batch_size": 8}'
    request.parameters["file:5/model.onnx"].bytes_param = b"onnx"
    with pytest.raises(grpc.RpcError) as err:
        live.v2.RepositoryModelLoad(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(
        "load parameters (file:5/model.onnx) are not supported: put the model's files in the repository "
        "folder (models/sentiment/VERSION/) and load it by name alone (a 'config' may change "
        "dynamic_batching.max_queue_delay_microseconds, instance_group counts and version_policy)"
    )
    assert live.versions()  # nothing changed; the server serves on
    with pytest.raises(grpc.RpcError) as err:
        live.v2.ModelMetadata(pb.ModelMetadataRequest(name="charlm", version="10000000000"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "positive integer of at most 9 digits" in (err.value.details() or "")


def test_a_loads_config_sets_the_batching_delay_and_instances_until_the_next_load(
    kserve_repo: Path, tmp_path: Path
) -> None:
    """Triton's load_model(config=...), stock tritonclient, through a frontend of --workers 2: ModelConfig's
    answer with the delay and instance count changed is loaded with them (the engine applies them); a config that
    changes anything else is refused, naming it, and changes nothing; a load without config goes back to the
    files."""
    proc, ports = start_server(kserve_repo, tmp_path, SEQSERVE_WORKERS="2")
    try:
        done = subprocess.run(
            [sys.executable, str(CLIENT_SCRIPT), "--url", f"127.0.0.1:{ports['grpc_port']}", "--repository",
             "load-config:sentiment"], capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout)
    finally:
        stop_server(proc)
    before, after = report["before"], report["after"]
    assert before["dynamic_batching"]["max_queue_delay_microseconds"] == "2000"  # MAX_BATCH_DELAY_MS, 2 ms
    assert after["dynamic_batching"]["max_queue_delay_microseconds"] == "5000"
    assert (before["instance_group"][0]["count"], after["instance_group"][0]["count"]) == (1, 2)
    assert {k: v for k, v in after.items() if k not in ("dynamic_batching", "instance_group")} == {
        k: v for k, v in before.items() if k not in ("dynamic_batching", "instance_group")
    }
    assert report["refused"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert report["refused"]["message"].startswith(
        "load parameter config changes max_batch_size, which a load cannot change: it may change "
        "dynamic_batching.max_queue_delay_microseconds, instance_group counts and version_policy; give what "
        "ModelConfig answers for the rest, or leave it out"
    )
    assert report["unchanged"] == after and report["again"] == before


def test_a_sequence_of_a_model_unloaded_on_request_continues_once_it_is_loaded_again(live: Live) -> None:
    """As docs/kserve.md says: UNAVAILABLE while unloaded, then the same weights continue the kept state."""
    assert live.step("To be", sequence_id="u1", sequence_start=True).parameters["seqserve_steps"].int64_param == 5
    live.v2.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="charlm"), timeout=30)
    code, message = _code(lambda: live.step(", or", sequence_id="u1"))
    assert code == grpc.StatusCode.UNAVAILABLE and "load it again" in message
    live.v2.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="charlm"), timeout=60)
    assert live.step(", or", sequence_id="u1").parameters["seqserve_steps"].int64_param == 9


def test_load_models_serves_a_subset_and_loads_the_rest_on_request(kserve_repo: Path, tmp_path: Path) -> None:
    """SEQSERVE_LOAD_MODELS (Triton's explicit model control with --load-model): only the named models load at
    start; the others are UNAVAILABLE in the index and to requests, saying how to load them, until a
    RepositoryModelLoad; --watch-models follows the loaded models only (a new version of one loads, a new model
    folder does not)."""
    repo = tmp_path / "models"
    shutil.copytree(kserve_repo, repo)
    shutil.move(repo / "charlm" / "2", tmp_path / "charlm-2")
    proc, ports = start_server(
        repo, tmp_path, SEQSERVE_LOAD_MODELS="charlm", SEQSERVE_WATCH_MODELS_SECONDS="0.2", SEQSERVE_GRACE_SECONDS="2"
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports['grpc_port']}") as channel:
            live = Live(repo, ports, channel)
            index = live.v2.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30).models
            assert {(m.name, m.version, m.state) for m in index} == {
                ("charlm", "1", "READY"), ("forecaster", "", "UNAVAILABLE"), ("sentiment", "", "UNAVAILABLE")
            }  # fmt: skip
            assert live.v2.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
            assert live.serving("seqserve.v1.Autocomplete") and not live.serving(SENTIMENT_SERVICE)
            code, message = _code(lambda: live.v2.ModelMetadata(pb.ModelMetadataRequest(name="sentiment"), timeout=30))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert "model 'sentiment' is not loaded: this server loads ['charlm'] (load_models)" in message
            assert "RepositoryModelLoad" in message
            code, message = _code(lambda: live.v2.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=30))
            assert code == grpc.StatusCode.NOT_FOUND  # not in the repository: not the same answer
            shutil.copytree(repo / "sentiment", repo / "sentiment-b")  # a new model folder: not followed
            shutil.copytree(tmp_path / "charlm-2", repo / "charlm" / "2")  # a new version of a loaded one: loaded
            wait_for(lambda: live.versions() == ["1", "2"], "charlm/2 to load")
            time.sleep(1.0)  # five more polls of the watcher
            index = live.v2.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30).models
            assert ("sentiment-b", "", "UNAVAILABLE") in {(m.name, m.version, m.state) for m in index}
            back = live.tritonclient("load", "sentiment")
            assert back["error"] == {"status": "OK", "message": ""} and back["ready"] is True
            assert back["infer"] == {"status": "OK", "message": ""}
            assert live.serving(SENTIMENT_SERVICE)
            shutil.copytree(repo / "sentiment" / "1", repo / "sentiment" / "2")  # loaded on request: followed now
            manifest = json.loads((repo / "sentiment" / "2" / MANIFEST_FILE).read_text())
            (repo / "sentiment" / "2" / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": 2}))

            def sentiment_versions() -> list[str]:
                request = pb.ModelMetadataRequest(name="sentiment")
                return list(live.v2.ModelMetadata(request, timeout=30).versions)

            wait_for(lambda: sentiment_versions() == ["1", "2"], "sentiment/2 to load")
    finally:
        stop_server(proc)


def test_exit_on_error_stops_the_start_naming_the_version_that_failed(kserve_repo: Path, tmp_path: Path) -> None:
    """Triton's --exit-on-error: a version that fails to load stops a server that asked for it (exit 1, the log
    names the version and why); without it the same repository serves the rest."""
    repo = tmp_path / "models"
    shutil.copytree(kserve_repo, repo)
    (repo / "sentiment" / "1" / MODEL_FILE).write_bytes(b"half a copy")
    for run in ("strict", "lenient"):
        (tmp_path / run).mkdir()
    with pytest.raises(RuntimeError) as info:
        start_server(repo, tmp_path / "strict", SEQSERVE_EXIT_ON_ERROR="true", SEQSERVE_WORKERS="2")
    assert "did not start" in str(info.value)
    log = (tmp_path / "strict" / "server.log").read_text()
    assert (
        "exit_on_error (SEQSERVE_EXIT_ON_ERROR, --exit-on-error) is set and 1 model version(s) failed to load: "
        "sentiment/1: sha256 of sentiment/1/model.onnx is "
    ) in log
    assert "seqserve stopped (exit code 1)" in log  # (the engine's own line, before the error: not "code 0")
    proc, _ = start_server(repo, tmp_path / "lenient")  # the default: the others serve
    stop_server(proc)


def test_load_models_naming_a_model_the_repository_lacks_stops_the_start(kserve_repo: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as info:
        start_server(kserve_repo, tmp_path, SEQSERVE_LOAD_MODELS="charlm,sentimnet")
    log = (tmp_path / "server.log").read_text()
    assert "load_models (SEQSERVE_LOAD_MODELS, --load-model) names ['sentimnet'], which the model repository" in log
    assert "its models are ['charlm', 'forecaster', 'sentiment']" in log
    assert "did not start" in str(info.value)
