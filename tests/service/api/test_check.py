"""``seqserve check`` (service/preflight.py): serve's start-up, checked without serving. Each part on real files:
a copied model repository with a corrupted model, certificates that expire at chosen times, a Redis URL nobody
listens on, a plugin that does not import, a misspelt variable. Exit status 1 exactly when a part fails."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import onnxruntime as ort
import pytest

from service.cli import main
from tests.graphs import answer_nan
from tests.service.core.conftest import add_version
from tests.service.security.certs import self_signed

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("SEQSERVE_")]:
        monkeypatch.delenv(name)


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, str]]]:
    rc = main(["check", "--json", *args])
    return rc, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def status(found: list[dict[str, str]], part: str, name: str | None = None) -> tuple[str, str]:
    (row,) = [f for f in found if f["part"] == part and (name is None or f["name"] == name)]
    return row["status"], row["detail"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_good_repository_is_ready_to_serve(tiny_models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ports = ["--port", str(_free_port()), "--metrics-port", str(_free_port())]
    assert main(["check", "--models", str(tiny_models), *ports]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "ready to serve (10 checks, 0 warnings)", lines
    assert [" ".join(x.split()) for x in lines if " ports " in x] == [
        f"ok ports port {ports[1]} free",
        f"ok ports metrics_port {ports[3]} free",
    ]
    (host,) = [" ".join(x.split()) for x in lines if " host " in x]
    assert host == "ok host 127.0.0.1 an address of this machine"
    assert "ONNX Runtime providers CPUExecutionProvider" in next(x for x in lines if " device " in x)
    for name, task in (("charlm/1", "charlm"), ("sentiment/1", "sentiment"), ("forecaster/1", "forecast")):
        (line,) = [x for x in lines if f" {name} " in x]
        assert line.startswith("ok") and f"{task} on CPUExecutionProvider, loaded in" in line
        assert line.endswith("ran on samples of 1 and 32 row(s)"), line  # the warm-up: the graph runs
    assert any(x.startswith("ok") and "memory://" in x and "answers" in x for x in lines)


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA")
def test_a_folder_not_named_as_a_version_is_warned_of_as_serve_does(
    tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """serve logs "ignoring .../latest: a version folder's name must be ..."; check said "ready to serve" with no
    word of it (a model trained into --out models/NAME/latest, which no server loads)."""
    repo = tmp_path / "models"
    shutil.copytree(tiny_models, repo)
    shutil.copytree(repo / "sentiment" / "1", repo / "sentiment" / "latest")
    rc, found = check(capsys, "--models", str(repo))
    assert rc == 0 and status(found, "model", "sentiment/latest") == (
        "warn",
        "ignored: a version folder's name must be a whole number from 1 to 999999999, at most 9 digits without a "
        "leading zero",
    )


def test_cuda_without_a_cuda_build_fails_the_device_and_loads_no_model(
    tiny_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to end ``check`` (and ``serve``) in a traceback from the registry's start."""
    rc, found = check(capsys, "--models", str(tiny_models), "--device", "cuda")
    assert rc == 1
    state, detail = status(found, "device", "cuda")
    assert state == "fail" and detail.startswith("device='cuda' was requested but onnxruntime offers only [")
    assert "install onnxruntime-gpu" in detail and not [f for f in found if f["part"] == "model"]
    assert main(["serve", "--models", str(tiny_models), "--device", "cuda", "--port", "0", "--metrics-port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: device='cuda' was requested but onnxruntime offers only [") and err.count("\n") == 1


def test_a_host_that_is_not_this_machines_fails(tiny_models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, found = check(capsys, "--models", str(tiny_models), "--host", "192.0.2.1")
    assert rc == 1
    assert status(found, "host") == ("fail", "host '192.0.2.1' is not an address of this machine: set --host "
                                     "(SEQSERVE_HOST) to an address of this machine (127.0.0.1 for this machine "
                                     "only, 0.0.0.0 for all)")  # fmt: skip


def test_a_models_serving_json_is_checked_and_shown(
    tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(tiny_models, repo)
    (repo / "sentiment" / "serving.json").write_text('{"max_batch_size": 8, "model_instances": 2}')
    (repo / "charlm" / "serving.json").write_text('{"max_batch_delay_ms": -1}')
    rc, found = check(capsys, "--models", str(repo))
    assert rc == 1
    state, detail = status(found, "model", "sentiment/1")
    assert state == "ok" and detail.endswith("ran on samples of 1 and 8 row(s), serving.json: max_batch_size=8, "
                                             "model_instances=2"), detail  # fmt: skip
    state, detail = status(found, "model", "charlm/1")
    assert (state, detail) == ("fail", "charlm/serving.json: max_batch_delay_ms: input should be greater than or "
                                       "equal to 0, got -1")  # fmt: skip


def test_versions_a_version_policy_leaves_out_are_listed_as_not_served(
    tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(tiny_models, repo)
    add_version(repo, "sentiment", 1, 2)
    add_version(repo, "sentiment", 1, 3)
    (repo / "sentiment" / "serving.json").write_text('{"version_policy": {"specific": {"versions": [1, 3]}}}')
    rc, found = check(capsys, "--models", str(repo))
    assert rc == 0
    assert status(found, "model", "sentiment/3")[0] == status(found, "model", "sentiment/1")[0] == "ok"
    assert status(found, "model", "sentiment/2") == ("ok", "not served: outside its version_policy specific:1,3")


def test_a_corrupt_model_and_a_missing_one_fail_and_name_what_to_fix(
    tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(tiny_models, repo)
    model = repo / "sentiment" / "1" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")  # one byte changed: the manifest's sha256 no longer holds
    rc, found = check(capsys, "--models", str(repo))
    assert rc == 1
    state, detail = status(found, "model", "sentiment/1")
    assert state == "fail" and "sha256" in detail and "re-export or copy both files together" in detail
    assert status(found, "model", "charlm/1")[0] == "ok"  # the others are still checked, and fine
    rc, found = check(capsys, "--models", str(repo), "--load-model", "charlm", "--load-model", "nosuch")
    assert rc == 1
    state, detail = status(found, "model", "-")
    assert state == "fail" and "['nosuch']" in detail and "does not have" in detail
    (tmp_path / "empty").mkdir()
    rc, found = check(capsys, "--models", str(tmp_path / "empty"))
    assert rc == 1 and status(found, "model")[0] == "fail" and "nothing to serve" in status(found, "model")[1]
    # No folder there (or a file): it said "no model versions in ...", as for an empty one; serve says why.
    (tmp_path / "a-file").write_text("")
    for path, why in ((tmp_path / "nope", "does not exist"), (tmp_path / "a-file", "is not a directory")):
        rc, found = check(capsys, "--models", str(path))
        assert rc == 1 and status(found, "model") == (
            "fail",
            f"the model repository {path} {why}: point --models (SEQSERVE_MODELS) at the folder of model folders",
        )


def test_a_policy_that_chooses_none_of_a_models_versions_fails_the_check(
    tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A serving.json whose version_policy names no version on disk: the model would serve nothing, so the check
    fails on it (it said "ready to serve" before)."""
    repo = tmp_path / "models"
    shutil.copytree(tiny_models, repo)
    (repo / "sentiment" / "serving.json").write_text('{"version_policy": "specific:3"}')
    rc, found = check(capsys, "--models", str(repo))
    assert rc == 1
    state, detail = status(found, "model", "sentiment/1")
    assert state == "fail" and detail.startswith("its version_policy specific:3 chooses none of the model's versions")
    assert status(found, "model", "charlm/1")[0] == "ok"


def test_a_graph_that_loads_but_answers_nan_fails_the_check(
    tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The warm-up (``SEQSERVE_WARMUP``) runs in the check as in serve: what only running the graph shows stops a
    rollout here."""
    repo = tmp_path / "models"
    shutil.copytree(tiny_models, repo)
    answer_nan(repo / "sentiment" / "1")
    rc, found = check(capsys, "--models", str(repo))
    assert rc == 1
    state, detail = status(found, "model", "sentiment/1")
    assert state == "fail" and "answered NaN in ['logits'] on its warm-up sample" in detail, detail
    assert status(found, "model", "charlm/1")[0] == "ok"


def test_settings_keys_plugins_and_the_session_store(
    tiny_models: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEQSERVE_WOKERS", "4")  # a typo serve would only warn about: a warning here too
    rc, found = check(capsys, "--models", str(tiny_models))
    assert rc == 0 and status(found, "settings") == ("warn", "not a setting, ignored; did you mean SEQSERVE_WORKERS?")
    monkeypatch.setenv("SEQSERVE_API_KEYS", "alice:alice-key-0123456789,bob:bob-key-0123456789")
    rc, found = check(capsys, "--models", str(tiny_models))
    assert rc == 0 and status(found, "auth") == ("ok", "2 principals: alice, bob")
    monkeypatch.setenv("SEQSERVE_API_KEYS", "alice:short")
    rc, found = check(capsys, "--models", str(tiny_models))
    assert rc == 1 and status(found, "auth")[0] == "fail" and "at least" in status(found, "auth")[1]
    monkeypatch.delenv("SEQSERVE_API_KEYS")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SEQSERVE_SESSION_STORE", f"redis://:hunter2-password@127.0.0.1:{port}/0")
    monkeypatch.setenv("SEQSERVE_SESSION_STORE_TIMEOUT_SECONDS", "0.5")
    rc, found = check(capsys, "--models", str(tiny_models), "--plugin", "no_such_plugin_module")
    assert rc == 1
    state, detail = status(found, "plugins", "no_such_plugin_module")
    assert state == "fail" and "could not be imported: No module named 'no_such_plugin_module'" in detail
    assert not [f for f in found if f["part"] == "model"]  # (a plugin may register a model's task: not judged)
    (row,) = [f for f in found if f["part"] == "sessions"]
    assert row["status"] == "fail" and row["name"] == f"redis://:***@127.0.0.1:{port}/0"
    assert "hunter2" not in json.dumps(found)


def _certificate(folder: Path, days_left: float) -> tuple[Path, Path]:
    pair = self_signed(folder, str(days_left), "seqserve.example", days_left)
    return pair.cert, pair.key


def test_settings_that_leave_no_room_for_one_session_are_warned_of(
    tiny_models: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAX_SESSION_BYTES below one session (every create refused) and, with Redis, SESSION_CACHE_BYTES below one
    (each read from Redis again): check said "ready to serve", no warning."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # (nobody listens: the store fails, the warnings are the settings' own)
    monkeypatch.setenv("SEQSERVE_MAX_SESSION_BYTES", "100")
    monkeypatch.setenv("SEQSERVE_SESSION_CACHE_BYTES", "0")
    monkeypatch.setenv("SEQSERVE_SESSION_STORE", f"redis://127.0.0.1:{port}/0")
    _, found = check(capsys, "--models", str(tiny_models))
    warned = [(f["name"], f["detail"]) for f in found if f["status"] == "warn" and f["part"] == "sessions"]
    assert sorted(name for name, _ in warned) == ["charlm/1", "charlm/1", "forecaster/1", "forecaster/1"]
    for name, detail in warned:
        assert detail.startswith(f"no session of {name} fits"), detail
        assert ("more than max_session_bytes=100;" in detail) != ("more than session_cache_bytes=0;" in detail)
    monkeypatch.setenv("SEQSERVE_SESSION_STORE", "memory://")  # (no hot cache)
    monkeypatch.setenv("SEQSERVE_MAX_SESSION_BYTES", str(2**20))
    rc, found = check(capsys, "--models", str(tiny_models))
    assert rc == 0 and not [f for f in found if f["status"] == "warn"]


@pytest.mark.parametrize(("days_left", "want"), [(90, "ok"), (5, "warn"), (-1, "fail")])
def test_the_certificate_loads_and_its_time_left_is_judged(
    tiny_models: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    days_left: float,
    want: str,
) -> None:
    crt, key = _certificate(tmp_path, days_left)
    monkeypatch.setenv("SEQSERVE_TLS_CERT", str(crt))
    monkeypatch.setenv("SEQSERVE_TLS_KEY", str(key))
    rc, found = check(capsys, "--models", str(tiny_models))
    state, detail = status(found, "tls")
    assert state == want and rc == (1 if want == "fail" else 0), detail
    assert detail.startswith("CN=seqserve.example: ")
    assert ("expired" in detail) == (want == "fail") and ("renew it" in detail) == (want != "ok")


def test_a_key_that_does_not_match_the_certificate_fails(
    tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    crt, _ = _certificate(tmp_path, 90)
    _, other = _certificate(tmp_path, 91)
    monkeypatch.setenv("SEQSERVE_TLS_CERT", str(crt))
    monkeypatch.setenv("SEQSERVE_TLS_KEY", str(other))
    rc, found = check(capsys, "--models", str(tiny_models))
    state, detail = status(found, "tls")
    assert rc == 1 and state == "fail" and "SEQSERVE_TLS" in detail, detail


def test_a_port_in_use_and_admin_principals_without_credentials_are_warned_of(
    tiny_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check said "ready to serve" where serve then failed to bind a port another process held, and said nothing of
    ADMIN_PRINCIPALS where no caller can be anyone but the anonymous principal."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {"SEQSERVE_ADMIN_PRINCIPALS": "bob"}
        os.environ.update(env)
        try:
            rc, found = check(capsys, "--models", str(tiny_models), "--port", str(port), "--metrics-port", "0")
        finally:
            for name in env:
                os.environ.pop(name)
    assert rc == 0  # (warnings: serve may be the process that holds it, and stop first)
    state, detail = status(found, "ports", f"port {port}")
    assert state == "warn" and detail.startswith(f"in use now: serve would fail to start (cannot bind 127.0.0.1:{port}")
    assert [f for f in found if f["part"] == "ports"] == [f for f in found if f["name"] == f"port {port}"]
    state, detail = status(found, "auth")
    assert state == "warn" and detail.startswith("admin_principals (bob) has no effect: without API keys")
