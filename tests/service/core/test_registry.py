"""Registry and runtime: loading, sha256 and broken-model reporting, versions, providers, zero states."""

from __future__ import annotations

import asyncio
import json
import shutil
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.core.arrays import resolve_shape
from service.core.dataplane import CoreDataPlane
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, sha256_file
from service.core.runtime import CPU, CUDA, select_providers
from service.core.types import DataPlane, ModelRef, SamplingParams
from service.errors import FailedPrecondition, InvalidInput, ModelNotFound, ModelUnavailable
from service.settings import Settings
from tests.service.core.conftest import MakeDP, add_version, core_settings, recorded

HAS_CUDA = CUDA in ort.get_available_providers()


def as_dataplane(dp: CoreDataPlane) -> DataPlane:
    """mypy checks here that ``CoreDataPlane`` implements the ``DataPlane`` protocol exactly."""
    return dp


async def test_loads_every_model_and_reports_it(dp: CoreDataPlane) -> None:
    infos = {m.name: m for m in await as_dataplane(dp).models()}
    assert set(infos) == {"charlm", "sentiment", "forecaster"}
    assert all(m.ready and m.error is None and m.provider == CPU and m.version == 1 for m in infos.values())
    assert infos["forecaster"].task == "forecast"
    assert await dp.ready()
    assert sorted(name for name, _, _, ready in recorded(dp).loaded if ready) == ["charlm", "forecaster", "sentiment"]
    meta = await dp.model_metadata(ModelRef("charlm"))
    assert (meta.task, meta.versions, meta.contract.sequences) == ("charlm", [1], True)
    assert (await dp.capabilities()) == {"classify", "generate", "forecast"}


async def test_not_ready_before_start_and_with_empty_repository(
    tiny_models: Path, make_dp: MakeDP, tmp_path: Path
) -> None:
    from service.metrics import Metrics

    assert not CoreDataPlane(core_settings(tiny_models), Metrics(runtime_collectors=False)).is_ready
    empty = await make_dp(models=tmp_path / "nothing-here")
    assert not await empty.ready()
    assert await empty.models() == []


async def test_a_repository_path_that_is_missing_or_a_file_says_which(
    make_dp: MakeDP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a_file = tmp_path / "models.tar"
    a_file.write_bytes(b"not a folder")
    for path, problem in ((tmp_path / "nothing-here", "does not exist"), (a_file, "is not a directory")):
        caplog.clear()
        dp = await make_dp(models=path)
        assert (await dp.models()) == [] and not (await dp.ready())
        assert f"model repository {path} {problem}; no models will be served" in caplog.text
        assert "holds no model versions" not in caplog.text  # (said once, not twice)


async def test_an_empty_repository_or_one_of_strays_is_warned_of(
    make_dp: MakeDP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder that exists but holds no version folder started a server that never became ready, without a word
    in its log (``seqserve check`` said "nothing to serve")."""
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "latest").mkdir()  # not a version folder
    (tmp_path / "README.txt").write_text("models go here")
    dp = await make_dp(models=tmp_path)
    assert (await dp.models()) == [] and not (await dp.ready())
    assert f"model repository {tmp_path} holds no model versions (MODEL/VERSION/ folders" in caplog.text


async def test_a_repository_gone_as_a_whole_keeps_its_models_serving_until_it_is_back(
    repo: Path, make_dp: MakeDP, caplog: pytest.LogCaptureFixture
) -> None:
    """--watch-models: the repository folder itself gone (an unmount, a deploy that replaces it) unloaded every
    model within one poll (health NOT_SERVING, every session told its version was gone) and warned at every
    poll. Now the loaded versions keep serving until it is back, said once; an empty repository still unloads."""
    dp = await make_dp(models=repo)
    before = sorted((m.name, m.version) for m in await dp.models())
    away = repo.with_name("models.away")
    repo.rename(away)
    caplog.clear()
    for _ in range(2):
        await dp.registry.sync()
    assert sorted((m.name, m.version) for m in await dp.models()) == before and await dp.ready()
    assert len(await dp.classify(ModelRef("sentiment"), ["good film"])) == 1
    assert caplog.text.count("keep serving (charlm, forecaster, sentiment) until it is back") == 1
    away.rename(repo)
    await dp.registry.sync()
    assert sorted((m.name, m.version) for m in await dp.models()) == before and "is back" in caplog.text
    for model in list(repo.iterdir()):
        shutil.rmtree(model)
    await dp.registry.sync()
    assert await dp.models() == [] and not await dp.ready()


async def test_sha256_mismatch_is_reported_and_others_still_load(repo: Path, make_dp: MakeDP) -> None:
    with (repo / "charlm" / "1" / MODEL_FILE).open("ab") as f:
        f.write(b"\0")
    dp = await make_dp(models=repo)
    info = await dp.model_info(ModelRef("charlm"))
    assert not info.ready and info.error is not None and "sha256" in info.error
    assert await dp.ready()  # the others serve
    assert len(await dp.classify(ModelRef("sentiment"), ["good film"])) == 1
    with pytest.raises(ModelUnavailable, match="sha256"):
        [c async for c in dp.complete(ModelRef("charlm"), "hi", SamplingParams(max_chars=2))]
    with pytest.raises(ModelUnavailable, match="sha256"):
        await dp.create_session(ModelRef("charlm"))
    assert ("charlm", 1, "", False) in recorded(dp).loaded


async def test_broken_onnx_is_reported_and_others_still_load(repo: Path, make_dp: MakeDP) -> None:
    vdir = repo / "sentiment" / "1"
    (vdir / MODEL_FILE).write_bytes(b"this is not an onnx graph")
    manifest = json.loads((vdir / MANIFEST_FILE).read_text())
    manifest["sha256"] = sha256_file(vdir / MODEL_FILE)  # the hash matches; ORT still cannot load it
    (vdir / MANIFEST_FILE).write_text(json.dumps(manifest))
    dp = await make_dp(models=repo)
    info = await dp.model_info(ModelRef("sentiment"))
    assert not info.ready and info.error is not None and "onnxruntime could not load" in info.error
    with pytest.raises(ModelUnavailable, match="failed to load"):
        await dp.classify(ModelRef("sentiment"), ["good film"])
    assert (await dp.model_info(ModelRef("charlm"))).ready
    # Statistics list the versions that serve, as Triton lists the available ones; named, a failed one answers too.
    assert [(s.name, s.version) for s in await dp.statistics(None)] == [("charlm", 1), ("forecaster", 1)]
    assert await dp.statistics(ModelRef("sentiment")) == []
    assert [s.version for s in await dp.statistics(ModelRef("sentiment", 1))] == [1]


async def test_a_manifest_that_trips_a_tasks_check_is_reported_and_the_rest_keeps_syncing(
    repo: Path, make_dp: MakeDP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schema-valid manifest that a task's check cannot read (an output of rank 0: IndexError) is that version's
    load error, not the server's: start-up goes on, later folders still load, the message names the folder
    within the repository, never the server's path. An unreadable model folder is skipped and its loaded
    versions stay."""
    odd = add_version(repo, "charlm", 1, 2)
    manifest = json.loads((odd / MANIFEST_FILE).read_text())
    next(t for t in manifest["outputs"] if t["name"] == "logits")["shape"] = []
    (odd / MANIFEST_FILE).write_text(json.dumps(manifest))
    dp = await make_dp(models=repo)
    info = await dp.model_info(ModelRef("charlm", 2))
    assert not info.ready and "could not be checked (IndexError" in (info.error or "")
    assert (await dp.model_info(ModelRef("charlm"))).version == 1 and (await dp.ready())
    add_version(repo, "sentiment", 1, 2)
    add_version(repo, "forecaster", 1, 2)
    (repo / "forecaster" / "2" / MANIFEST_FILE).write_text("{not json")
    listed = Path.iterdir

    def unreadable(self: Path) -> object:  # what the kernel answers a non-root server for e.g. lost+found
        if self.name == "charlm":
            raise PermissionError(13, "Permission denied", str(self))
        return listed(self)

    monkeypatch.setattr(Path, "iterdir", unreadable)
    await dp.registry.sync()
    assert (await dp.model_info(ModelRef("sentiment"))).version == 2  # a later folder still loads
    assert (await dp.model_info(ModelRef("charlm", 1))).ready  # unreadable is not removed
    error = (await dp.model_info(ModelRef("forecaster", 2))).error or ""
    assert error.startswith("forecaster/2/manifest.json is not a valid manifest") and str(repo) not in error


async def test_while_a_model_loads_again_calls_get_unavailable_then_its_newest_version(
    repo: Path, make_dp: MakeDP
) -> None:
    """RepositoryModelLoad after an unload: until the newest version is in, a call that names no version gets
    UNAVAILABLE saying the model is loading (not NOT_FOUND, never an older version: a sequence started then would
    stay on it)."""
    add_version(repo, "sentiment", 1, 2)
    add_version(repo, "sentiment", 1, 3)
    dp = await make_dp(models=repo)
    await dp.unload_model("sentiment")
    loading = asyncio.create_task(dp.load_model("sentiment"))
    await asyncio.sleep(0)  # the load has begun
    seen: set[object] = set()
    while not loading.done():
        try:
            seen.add(dp.registry.resolve(ModelRef("sentiment")).version)
        except (ModelNotFound, ModelUnavailable) as exc:
            seen.add(type(exc).__name__ if "loading" not in str(exc) else "loading")
        await asyncio.sleep(0)
    await loading
    assert seen <= {"loading", 3} and "loading" in seen, seen
    assert dp.registry.resolve(ModelRef("sentiment")).version == 3


async def test_a_graph_from_another_export_is_refused_at_load(tmp_path: Path, make_dp: MakeDP) -> None:
    """The committed ETTh1 forecaster's graph (7 features, GRU 256) under the AirPassengers forecaster's manifest
    (1 feature), with a matching sha256: every tensor name is there, but the sizes are not; it must fail at load
    (it loaded READY, became the default and failed every request with INTERNAL)."""
    committed = Path(__file__).resolve().parents[3] / "models"
    shutil.copytree(committed / "forecaster-air" / "1", tmp_path / "forecaster-air" / "1")
    other = add_version(tmp_path, "forecaster-air", 1, 2)
    shutil.copy(committed / "forecaster" / "1" / MODEL_FILE, other / MODEL_FILE)
    manifest = json.loads((other / MANIFEST_FILE).read_text())
    manifest["sha256"] = sha256_file(other / MODEL_FILE)
    (other / MANIFEST_FILE).write_text(json.dumps(manifest))
    dp = await make_dp(models=tmp_path)
    info = await dp.model_info(ModelRef("forecaster-air", 2))
    assert not info.ready and "does not match manifest.json" in (info.error or ""), info.error
    assert "history axis 2 is 7 in the graph, 1 in the manifest" in (info.error or "")  # (it said "1 = 1")
    assert (await dp.model_info(ModelRef("forecaster-air"))).version == 1  # the default stays the one that works


async def test_a_manifest_that_wires_the_states_wrongly_or_hides_a_graph_input_is_refused_at_load(
    tmp_path: Path, make_dp: MakeDP
) -> None:
    """The committed char LM with its states' outputs swapped (h fed back as c and c as h) loaded READY, logging at
    INFO only that it would not be prefix-cached, and every sequence step answered wrongly (0.27 off in a
    probability). A manifest that leaves out a graph input (the c state) failed in the warm-up run, whose advice
    was to re-export the graph. A tokenizer vocab listing one character twice loaded without a word."""
    committed = Path(__file__).resolve().parents[3] / "models"
    for version in (1, 2, 3, 4):
        shutil.copytree(committed / "charlm" / "1", tmp_path / "charlm" / str(version))
        path = tmp_path / "charlm" / str(version) / MANIFEST_FILE
        manifest = json.loads(path.read_text())
        manifest["version"] = version
        states = manifest["states"]
        if version == 2:
            states[0]["output"], states[1]["output"] = states[1]["output"], states[0]["output"]
        elif version == 3:
            dropped = states.pop()
            manifest["inputs"] = [t for t in manifest["inputs"] if t["name"] != dropped["input"]]
            manifest["outputs"] = [t for t in manifest["outputs"] if t["name"] != dropped["output"]]
        elif version == 4:
            manifest["tokenizer"]["vocab"][-1] = manifest["tokenizer"]["vocab"][0]
        path.write_text(json.dumps(manifest))
    dp = await make_dp(models=tmp_path)
    assert (await dp.model_info(ModelRef("charlm", 1))).ready  # the committed manifest as it is
    swapped = await dp.model_info(ModelRef("charlm", 2))
    assert not swapped.ready and "its state does not carry the text" in (swapped.error or ""), swapped.error
    assert "check that the manifest's states wire each graph state output to its own input" in (swapped.error or "")
    hidden = await dp.model_info(ModelRef("charlm", 3))
    assert not hidden.ready and "model.onnx takes inputs that manifest.json does not declare: ['c0']" in (
        hidden.error or ""
    ), hidden.error
    twice = await dp.model_info(ModelRef("charlm", 4))
    assert not twice.ready and "tokenizer vocab lists '\\n' twice (entries 0 and 64)" in (twice.error or ""), (
        twice.error
    )


def test_load_errors_name_folders_within_the_repository(tmp_path: Path) -> None:
    from service.core.registry import _within_repository

    root = tmp_path / "models"
    message = f"{root}/charlm/2/manifest.json says tinymodels/1; models/x/1 and '{root}/a/1'"
    assert _within_repository(message, root) == "charlm/2/manifest.json says tinymodels/1; models/x/1 and 'a/1'"
    relative = Path("models")  # only where a path starts: never the tail of another folder's name
    assert _within_repository("models/charlm/2 lives in tinymodels/1", relative) == "charlm/2 lives in tinymodels/1"


async def test_invalid_manifest_and_misplaced_version_are_reported(repo: Path, make_dp: MakeDP) -> None:
    (repo / "forecaster" / "1" / MANIFEST_FILE).write_text("{not json")
    shutil.copytree(repo / "charlm" / "1", repo / "charlm" / "7")  # manifest still says version 1
    (repo / "charlm" / "latest").mkdir()  # not a version number: ignored
    dp = await make_dp(models=repo)
    bad = await dp.model_info(ModelRef("forecaster"))
    assert not bad.ready and bad.task == "unknown" and "not a valid manifest" in (bad.error or "")
    moved = await dp.model_info(ModelRef("charlm", 7))
    assert not moved.ready and "lives in charlm/7" in (moved.error or "")
    # The newest *ready* version serves by default.
    assert (await dp.model_info(ModelRef("charlm"))).version == 1
    with pytest.raises(ModelUnavailable, match="charlm/7 failed to load"):
        await dp.char_step(ModelRef("charlm", 7), "abc")
    with pytest.raises(ModelUnavailable, match="not a valid manifest"):
        (await dp.model_metadata(ModelRef("forecaster")))


async def test_unknown_model_or_version_lists_what_exists(dp: CoreDataPlane) -> None:
    with pytest.raises(ModelNotFound, match=r"'nope'.*\['charlm', 'forecaster', 'sentiment'\]"):
        (await dp.model_info(ModelRef("nope")))
    with pytest.raises(ModelNotFound, match=r"no version 9; available versions: \[1\]"):
        await dp.classify(ModelRef("sentiment", 9), ["good"])


async def test_model_of_the_wrong_task_is_invalid_input(dp: CoreDataPlane) -> None:
    with pytest.raises(InvalidInput, match="charlm/1 is a 'charlm' model; this call needs a text classifier"):
        await dp.classify(ModelRef("charlm"), ["good"])
    with pytest.raises(InvalidInput, match="'sentiment' model; this call needs a forecaster"):
        await dp.forecast(ModelRef("sentiment"), np.zeros((24, 7), np.float32))


async def test_newest_version_serves_by_default_and_versions_can_be_named(repo: Path, make_dp: MakeDP) -> None:
    add_version(repo, "sentiment", 1, 2)
    dp = await make_dp(models=repo)
    assert (await dp.model_info(ModelRef("sentiment"))).version == 2
    assert (await dp.model_info(ModelRef("sentiment", 1))).version == 1
    a = await dp.classify(ModelRef("sentiment", 1), ["good film"])
    b = await dp.classify(ModelRef("sentiment"), ["good film"])
    assert a == b  # same weights in both versions
    assert [(m.name, m.version) for m in (await dp.models()) if m.name == "sentiment"] == [
        ("sentiment", 1),
        ("sentiment", 2),
    ]


def test_provider_selection() -> None:
    assert select_providers("cpu", [CUDA, CPU]) == [CPU]
    assert select_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert select_providers("auto", [CPU]) == [CPU]
    assert select_providers("cuda", [CUDA, CPU]) == [CUDA, CPU]
    with pytest.raises(ModelUnavailable, match=r"onnxruntime-gpu.*SEQSERVE_DEVICE=cpu"):
        select_providers("cuda", [CPU])


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA")
async def test_cuda_requested_without_cuda_fails_start(tiny_models: Path) -> None:
    from service.metrics import Metrics

    dp = CoreDataPlane(core_settings(tiny_models, device="cuda"), Metrics(runtime_collectors=False))
    with pytest.raises(ModelUnavailable, match="device='cuda'"):
        await dp.start()
    await dp.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with CUDAExecutionProvider")
async def test_cuda_provider_serves(make_dp: MakeDP) -> None:
    dp = await make_dp(device="cuda")
    assert {m.provider for m in (await dp.models())} == {CUDA}
    assert len(await dp.classify(ModelRef("sentiment"), ["good film", "bad"])) == 2
    step = await dp.char_step(ModelRef("charlm"), "hello", num_chars=3)
    assert len(step.completion) == 3


def test_resolve_shape() -> None:
    assert resolve_shape([2, "batch", 16], {"batch": 3}) == (2, 3, 16)
    assert resolve_shape([1, "batch*features", 8], {"batch": 3, "features": 7}) == (1, 21, 8)
    with pytest.raises(ValueError, match="unknown symbol 'time'"):
        resolve_shape(["time"], {"batch": 1})


async def test_zero_states_follow_the_manifest(dp: CoreDataPlane) -> None:
    lm = dp.registry.resolve(ModelRef("charlm")).runtime
    fc = dp.registry.resolve(ModelRef("forecaster")).runtime
    assert lm is not None and fc is not None
    assert {k: v.shape for k, v in lm.zero_states(3).items()} == {"h0": (2, 3, 16), "c0": (2, 3, 16)}
    assert {k: v.shape for k, v in fc.zero_states(2).items()} == {"h0": (1, 14, 16), "c0": (1, 14, 16)}
    # Leaving the states out is the same as passing zeros.
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    implicit = lm.run({"input_ids": ids}, 1)
    explicit = lm.run({"input_ids": ids, **lm.zero_states(1)}, 1)
    np.testing.assert_array_equal(implicit["logits"], explicit["logits"])
    assert implicit["logits"].shape == (1, 3, 96)


async def test_manifest_that_breaks_the_serving_contract_is_reported(repo: Path, make_dp: MakeDP) -> None:
    def edit(model: str, **changes: object) -> None:
        path = repo / model / "1" / MANIFEST_FILE
        manifest = json.loads(path.read_text())
        for key, value in changes.items():
            if "." in key:
                outer, inner = key.split(".")
                manifest[outer][inner] = value
            else:
                manifest[key] = value
        path.write_text(json.dumps(manifest))

    edit("sentiment", labels=["negative", "neutral", "positive"])
    offsets = json.loads((repo / "forecaster" / "1" / MANIFEST_FILE).read_text())["forecast"]["quantile_offsets"]
    edit("forecaster", **{"forecast.quantile_offsets": offsets[:2]})
    edit(
        "charlm",
        inputs=[
            t
            for t in json.loads((repo / "charlm" / "1" / MANIFEST_FILE).read_text())["inputs"]
            if t["name"] != "input_ids"
        ],
    )
    dp = await make_dp(models=repo)
    errors = {m.name: m.error or "" for m in (await dp.models())}
    assert "logits have 2 classes but manifest.labels has 3" in errors["sentiment"]
    assert (
        "quantile_offsets has shape [2, 12, 7]; expected [quantiles=3, horizon=12, targets=7]" in errors["forecaster"]
    )
    assert "must declare input 'input_ids' and output 'logits'" in errors["charlm"]
    assert not (await dp.ready())


async def test_unload_lets_in_flight_requests_finish_then_refuses(make_dp: MakeDP) -> None:
    dp = await make_dp(grace_seconds=30)
    lm = ModelRef("charlm")
    long_call = asyncio.ensure_future(dp.char_step(lm, "abc", num_chars=300))  # 300 steps: still running below
    while not recorded(dp).batch_sizes("charlm"):
        await asyncio.sleep(0)  # its first step has run: the request is in flight
    await dp.unload_model("charlm")  # waits for it (30 s grace at most)
    assert long_call.done() and len(long_call.result().completion) == 300
    with pytest.raises(ModelUnavailable, match="'charlm' was unloaded; load it again"):
        await dp.char_step(lm, "abc")
    assert "charlm" in (await dp.unloaded()) and all(m.name != "charlm" for m in (await dp.models()))
    await dp.load_model("charlm")
    assert (await dp.char_step(lm, "abc")).steps == 3 and (await dp.unloaded()) == []


async def test_a_stream_running_past_the_unload_grace_ends_unavailable(make_dp: MakeDP) -> None:
    """A Complete still generating when its version is unloaded (grace 0) ends with UNAVAILABLE saying so, never
    an internal error from a model that is gone."""
    dp = await make_dp(grace_seconds=0.0)
    stream = dp.complete(ModelRef("charlm"), "ab", SamplingParams(max_chars=500))
    got = [await anext(stream) for _ in range(3)]
    await dp.unload_model("charlm")
    with pytest.raises(ModelUnavailable, match="unloaded"):
        async for chunk in stream:
            got.append(chunk)
    assert 3 <= len(got) < 500


async def test_an_unload_leaves_no_queue_depth_behind(make_dp: MakeDP) -> None:
    """Requests still queued when a model unloads are refused, and the queue-depth gauge says nothing waits
    (it kept its last value: a false backlog for alerts and autoscalers)."""
    dp = await make_dp(
        grace_seconds=0.0, max_batch_size=1, inline_batch_ms=0.0, alone_inline_ms=0.0
    )  # runs off the loop
    calls = [asyncio.ensure_future(dp.classify(ModelRef("sentiment"), ["good film"] * 4)) for _ in range(60)]

    def depth() -> float | None:
        return recorded(dp).registry.get_sample_value("seqserve_queue_depth", {"model": "sentiment"})

    for _ in range(20):  # every call queued, one batch of one running
        await asyncio.sleep(0)
    assert depth()
    await dp.unload_model("sentiment")
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert any(isinstance(r, ModelUnavailable) for r in results), {type(r).__name__ for r in results}
    assert depth() == 0


async def test_changed_weights_reload_and_pinned_sessions_say_so(
    repo: Path, make_dp: MakeDP, tiny_models: Path
) -> None:
    dp = await make_dp(models=repo)
    lm = ModelRef("charlm")
    s = await dp.create_session(lm)
    await dp.char_step(lm, "abc", session_id=s.id)
    other = await dp.create_session(ModelRef("forecaster"))
    model = repo / "charlm" / "1" / MODEL_FILE
    model.write_bytes(model.read_bytes())  # touched, same bytes: no reload
    await dp.registry.sync()
    assert (await dp.char_step(lm, "d", session_id=s.id)).steps == 4
    graph = onnx.load(str(model))
    graph.doc_string = "re-exported"  # a real change of the file (and its sha256), the graph still loads
    onnx.save(graph, str(model))
    manifest = json.loads((repo / "charlm" / "1" / MANIFEST_FILE).read_text())
    manifest["sha256"] = sha256_file(model)
    (repo / "charlm" / "1" / MANIFEST_FILE).write_text(json.dumps(manifest))
    await dp.registry.sync()
    assert (await dp.model_metadata(lm)).parameters["sha256"] == manifest["sha256"]
    with pytest.raises(FailedPrecondition, match=r"version 1 with weights .* which were replaced"):
        await dp.char_step(lm, "e", session_id=s.id)
    assert (await dp.char_step(lm, "e", session_id=(await dp.create_session(lm)).id)).steps == 1
    assert (await dp.get_session(other.id)).model == "forecaster"  # other sessions are untouched


async def test_a_manifest_dtype_that_differs_from_the_graph_is_refused_at_load(repo: Path, make_dp: MakeDP) -> None:
    path = repo / "charlm" / "1" / MANIFEST_FILE
    m = json.loads(path.read_text())
    for t in m["inputs"]:
        if t["name"] == "input_ids":
            t["dtype"] = "int32"
    path.write_text(json.dumps(m))
    dp = await make_dp(models=repo)
    info = await dp.model_info(ModelRef("charlm"))
    assert not info.ready and "input_ids is tensor(int64) in the graph, int32 in the manifest" in (info.error or "")


def test_cuda_requested_but_placed_on_cpu_is_refused(tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.core import runtime as rt
    from service.settings import Settings

    monkeypatch.setattr(rt, "select_providers", lambda device: [rt.CUDA, rt.CPU])
    vdir = tiny_models / "charlm" / "1"
    manifest = Manifest.load(vdir / MANIFEST_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelUnavailable, match="placed the model on CPUExecutionProvider"):
            rt.load_runtime(manifest, vdir / MODEL_FILE, Settings(device="cuda", models=tiny_models), {})


@pytest.mark.parametrize("folder", ["0", "007", "1234567890"])
async def test_version_folders_must_be_positive_integers_without_leading_zeros(
    repo: Path, make_dp: MakeDP, folder: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Triton's layout: a version folder is a positive integer, here of at most 9 digits. "0", a zero-padded "007"
    and a 10-digit "1234567890" (a TF-Serving timestamp) are ignored with a warning that says the rule (it said
    "must be positive integers", which 1234567890 is), never served as version 0 or 7."""
    out = add_version(repo, "charlm", 1, int(folder))
    out.rename(out.with_name(folder))
    dp = await make_dp(models=repo)
    assert [m.version for m in await dp.models() if m.name == "charlm"] == [1]
    with pytest.raises(ModelNotFound, match="has no version"):
        await dp.model_info(ModelRef("charlm", int(folder)))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignoring")]
    assert said == [
        f"ignoring {out.with_name(folder)}: a version folder's name must be a whole number from 1 to 999999999, at "
        "most 9 digits without a leading zero"
    ]


async def test_with_no_version_ready_a_call_naming_none_reports_the_newest(repo: Path, make_dp: MakeDP) -> None:
    """Every version of a model failed to load: a call that names no version is refused with the newest version's
    reason (the one an operator just deployed), not the oldest one's."""
    add_version(repo, "charlm", 1, 2)
    for v in ("1", "2"):
        with (repo / "charlm" / v / MODEL_FILE).open("ab") as f:
            f.write(b"\0")
    dp = await make_dp(models=repo)
    info = await dp.model_info(ModelRef("charlm"))
    assert (info.version, info.ready) == (2, False)
    with pytest.raises(ModelUnavailable, match="model charlm/2 failed to load"):
        await dp.create_session(ModelRef("charlm"))


async def test_a_touched_model_file_with_the_same_weights_is_not_reloaded(repo: Path, make_dp: MakeDP) -> None:
    """A changed mtime with the same sha256 (a `touch`, a config tool rewriting the files) keeps the loaded
    version serving: no reload, no drain of its in-flight calls, no load/unload events."""
    import os

    dp = await make_dp(models=repo)
    before = dp.registry.get("charlm", 1)
    model = repo / "charlm" / "1" / MODEL_FILE
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    loads = len(recorded(dp).loaded)
    await dp.registry.sync()
    assert dp.registry.get("charlm", 1) is before and before is not None and before.ready
    assert len(recorded(dp).loaded) == loads


async def test_a_changed_model_that_fails_to_load_leaves_the_old_one_serving(repo: Path, make_dp: MakeDP) -> None:
    """--watch-models: a version whose files change on disk into something that does not load (a half-copied
    file, a wrong sha256) keeps serving the weights it had, and reports the error in the log only."""
    dp = await make_dp(models=repo)
    lm = ModelRef("charlm")
    before = await dp.char_step(lm, "abc")
    with (repo / "charlm" / "1" / MODEL_FILE).open("ab") as f:
        f.write(b"\0")  # sha256 no longer matches the manifest
    await dp.registry.sync()
    info = await dp.model_info(lm)
    assert info.ready and info.error is None
    np.testing.assert_array_equal((await dp.char_step(lm, "abc")).probabilities, before.probabilities)


async def test_a_load_whose_files_fail_says_so_and_leaves_what_serves(repo: Path, make_dp: MakeDP) -> None:
    """Triton's load_model answers whether the load succeeded: a version whose files fail to load makes the load
    FAILED_PRECONDITION naming the version and why (the other versions load and serve). A version that was serving
    serves on with its old weights, and the load says that too."""
    dp = await make_dp(models=repo)
    lm = ModelRef("charlm")
    before = await dp.char_step(lm, "abc")
    broken = add_version(repo, "charlm", 1, 2)
    (broken / MODEL_FILE).write_bytes(b"half a copy")
    with pytest.raises(FailedPrecondition) as e:
        await dp.load_model("charlm")
    assert str(e.value).startswith("model 'charlm': version 2 failed to load: sha256 of charlm/2/model.onnx")
    assert str(e.value).endswith("; load it again once its files are fixed") and "serve on" not in str(e.value)
    assert not (await dp.model_info(ModelRef("charlm", 2))).ready
    assert (await dp.model_info(lm)).version == 1  # the newest version that loaded serves
    assert (await dp.model_metadata(lm)).versions == [1]  # the versions a call may name and be served (Triton's)
    good = (repo / "charlm" / "1" / MODEL_FILE).read_bytes()
    (repo / "charlm" / "1" / MODEL_FILE).write_bytes(good + b"\0")  # the serving version's files go bad too
    with pytest.raises(FailedPrecondition, match=r"version 1 failed to load: sha256 .* \(the weights it loaded "
                       r"before serve on\); version 2 failed to load"):  # fmt: skip
        await dp.load_model("charlm")
    np.testing.assert_array_equal((await dp.char_step(lm, "abc")).probabilities, before.probabilities)
    reload_failed = {"model": "charlm", "version": "1"}
    assert dp.metrics.registry.get_sample_value("seqserve_model_reload_failed", reload_failed) == 1.0
    shutil.rmtree(broken)
    (repo / "charlm" / "1" / MODEL_FILE).write_bytes(good)
    await dp.load_model("charlm")  # fixed: the load succeeds, and a failure it reported is not kept
    assert [m.version for m in await dp.models() if m.name == "charlm"] == [1]
    assert (await dp.model_info(lm)).ready
    assert dp.metrics.registry.get_sample_value("seqserve_model_reload_failed", reload_failed) == 0.0


async def test_a_load_that_finds_nothing_says_whether_the_folder_or_its_versions_are_missing(
    repo: Path, make_dp: MakeDP
) -> None:
    """NOT_FOUND either way, saying which: no folder of that name (listing the repository's models), or a folder
    without a version folder (one named "v1" does not count). The server's own paths are not told."""
    dp = await make_dp(models=repo)
    (repo / "staged" / "v1").mkdir(parents=True)  # a model being copied in, its version folder misnamed
    with pytest.raises(ModelNotFound) as err:
        await dp.load_model("staged")
    assert str(err.value) == (
        "model 'staged' has no version to load: its folder in the repository holds no version folder (staged/1/, "
        "staged/2/, ...: its name must be a whole number from 1 to 999999999, at most 9 digits without a leading "
        "zero); add one, then load it"
    )
    with pytest.raises(ModelNotFound) as err:
        await dp.load_model("../models")  # a path, not a name: never looked up outside the repository's listing
    assert str(err.value) == (
        "model '../models' is not in the repository; its models are ['charlm', 'forecaster', 'sentiment']"
    )
    assert str(repo) not in str(err.value)


async def test_an_explicit_load_retries_a_version_that_failed_even_if_its_files_did_not_change(
    repo: Path, make_dp: MakeDP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure that may pass (ONNX Runtime out of memory at start-up): --watch-models leaves a failed version
    alone until its files change, but RepositoryModelLoad tries it again, as an operator who asks for a load
    expects."""
    from service.core.runtime import load_runtime

    def out_of_memory(*args: object, **kwargs: object) -> object:
        raise OSError("onnxruntime could not allocate the session's arena")

    monkeypatch.setattr("service.core.registry.load_runtime", out_of_memory)
    dp = await make_dp(models=repo)
    assert "could not allocate" in ((await dp.model_info(ModelRef("sentiment"))).error or "")
    monkeypatch.setattr("service.core.registry.load_runtime", load_runtime)
    await dp.registry.sync()  # a --watch-models poll: the files did not change
    assert not (await dp.model_info(ModelRef("sentiment"))).ready
    await dp.load_model("sentiment")
    assert (await dp.model_info(ModelRef("sentiment"))).ready
    assert len(await dp.classify(ModelRef("sentiment"), ["a fine film"])) == 1


async def test_a_model_loaded_again_after_an_unload_follows_the_repository_again(repo: Path, make_dp: MakeDP) -> None:
    """RepositoryModelUnload then RepositoryModelLoad: the model is back under --watch-models, so a new version
    folder is picked up by the next poll (it stayed frozen at the versions of the explicit load)."""
    dp = await make_dp(models=repo)
    await dp.unload_model("sentiment")
    await dp.load_model("sentiment")
    add_version(repo, "sentiment", 1, 2)
    await dp.registry.sync()  # one --watch-models poll
    assert (await dp.model_info(ModelRef("sentiment"))).version == 2
    assert await dp.unloaded() == []


async def test_unloading_an_unloaded_model_again_is_not_an_error(dp: CoreDataPlane) -> None:
    """RepositoryModelUnload is idempotent for a model of the repository (a retried unload, two operators); a name
    the server never had is NOT_FOUND."""
    await dp.unload_model("sentiment")
    await dp.unload_model("sentiment")
    assert "sentiment" in await dp.unloaded()
    with pytest.raises(ModelNotFound):
        await dp.unload_model("no-such-model")


async def test_hidden_folders_of_the_repository_are_not_models(repo: Path, make_dp: MakeDP) -> None:
    """.git, .snapshot, an editor's or rsync's temporary folder in the model repository are not models: no failed
    entry, no NOT READY server because of them."""
    shutil.copytree(repo / "sentiment", repo / ".rsync-tmp")
    dp = await make_dp(models=repo)
    assert not [m.name for m in await dp.models() if m.name.startswith(".")]
    assert await dp.ready()


async def test_a_stray_folder_is_named_once_not_at_every_poll(
    repo: Path, make_dp: MakeDP, caplog: pytest.LogCaptureFixture
) -> None:
    """--watch-models: a folder that is no version (a backup, "0", "007") was warned about at every poll, forever
    (three strays at one poll a second: three lines a second); now once, and again if it comes back."""
    stray = repo / "sentiment" / "backup"
    stray.mkdir()
    dp = await make_dp(models=repo)
    for _ in range(3):
        await dp.registry.sync()
    said = [r for r in caplog.records if "a version folder's name must be a whole number" in r.getMessage()]
    assert len(said) == 1 and str(stray) in said[0].getMessage()
    stray.rmdir()
    await dp.registry.sync()
    stray.mkdir()
    await dp.registry.sync()
    assert sum("a version folder's name must be" in r.getMessage() for r in caplog.records) == 2


async def test_loads_and_unloads_are_audited_with_who_asked(make_dp: MakeDP, caplog: pytest.LogCaptureFixture) -> None:
    """Model management changes what every caller sees: like log and trace settings, it is written to the
    ``seqserve.audit`` logger, naming the principal (it was logged with a request id only)."""
    dp = await make_dp()
    with caplog.at_level("WARNING", logger="seqserve.audit"):
        await dp.unload_model("sentiment")
        await dp.load_model("sentiment", {"max_batch_delay_ms": 3.0})
        with pytest.raises(ModelNotFound):
            await dp.load_model("nothing")
    said = [r.getMessage() for r in caplog.records if r.name == "seqserve.audit"]
    assert said[0] == "model 'sentiment' unloaded by the anonymous principal"
    assert said[1] == "model 'sentiment' loaded with max_batch_delay_ms=3.0 by the anonymous principal"
    assert said[2].startswith("model 'nothing' load by the anonymous principal failed: model 'nothing' is not in")


def test_a_large_runs_arena_growth_is_handed_back_once_large_runs_stop(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime's arena keeps the peak of the largest run for good: one 256-text x 128-word Classify grew the
    engine by ~380 MiB per version (the committed sentiment/4), never given back. Large runs in a row keep it
    (shrinking after each cost them 30-55%); the first run SHRINK_IDLE_SECONDS after the last large one runs with
    arena shrinkage on, once."""
    from service.core import runtime as rt

    vdir = tiny_models / "sentiment" / "1"
    r = rt.load_runtime(Manifest.load(vdir / MANIFEST_FILE), vdir / MODEL_FILE, Settings(models=tiny_models), {})
    passed: list[object] = []
    run = r.session.run

    def spy(names: list[str], feeds: dict[str, Any], options: object = None) -> Any:
        passed.append(options)
        return run(names, feeds, options)

    now = [1000.0]
    monkeypatch.setattr(r.session, "run", spy)
    monkeypatch.setattr("service.core.runtime.time", types.SimpleNamespace(monotonic=lambda: now[0]))

    def step(texts: int, words: int, wait: float = 0.0) -> None:
        now[0] += wait
        ids = np.ones((texts, words), np.int64)
        r.run({"input_ids": ids, "lengths": np.full(texts, words, np.int64)}, texts)

    step(1, 3)  # small (3 token ids), nothing grown
    step(64, 128)  # large: 8,192 ids
    step(1, 3, wait=1)  # soon after: the growth is kept (more large runs may come)
    step(64, 128, wait=1)
    step(1, 3, wait=rt.SHRINK_IDLE_SECONDS)  # quiet since: handed back, once
    step(1, 3, wait=rt.SHRINK_IDLE_SECONDS)
    step(64, 128, wait=1)
    step(64, 128, wait=rt.SHRINK_IDLE_SECONDS)  # a large run after a quiet spell hands back too (its own growth)
    assert r._shrink.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    assert [o is r._shrink for o in passed] == [False, False, False, False, True, False, False, True]
    assert not r.trim_due


async def test_a_version_no_run_comes_to_is_trimmed_by_the_data_plane(
    make_dp: MakeDP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version sent one large request and nothing since kept the growth: the data plane's trim runs its one-row
    warm-up with arena shrinkage on."""
    import time

    monkeypatch.setattr("service.core.dataplane.SHRINK_IDLE_SECONDS", 0.05)
    dp = await make_dp()
    r = dp.registry.resolve(ModelRef("sentiment")).runtime
    passed: list[object] = []
    run = r.session.run

    def spy(names: list[str], feeds: dict[str, Any], options: object = None) -> Any:
        passed.append(options)
        return run(names, feeds, options)

    monkeypatch.setattr(r.session, "run", spy)
    r._grown_at = time.monotonic() - 100  # as after a large run long ago
    for _ in range(100):
        if passed:
            break
        await asyncio.sleep(0.05)
    assert passed and passed[0] is r._shrink and not r.trim_due


async def test_a_changed_manifest_with_the_same_weights_reloads_and_its_sessions_go_on(
    repo: Path, make_dp: MakeDP, caplog: pytest.LogCaptureFixture
) -> None:
    """A change to manifest.json alone (labels reversed, model.onnx as it was) is a change of the version: the sync
    (--watch-models) and an explicit load reload it, saying so, and calls get the new labels (a restart would). The
    sessions of a version are pinned to its weights, which did not change: they go on."""
    dp = await make_dp(models=repo)
    assert (await dp.classify(ModelRef("sentiment"), ["good film"]))[0].labels == ["negative", "positive"]
    lm = ModelRef("charlm")
    s = await dp.create_session(lm)
    await dp.char_step(lm, "abc", session_id=s.id)
    for name in ("sentiment", "charlm"):
        path = repo / name / "1" / MANIFEST_FILE
        manifest = json.loads(path.read_text())
        if name == "sentiment":
            manifest["labels"] = manifest["labels"][::-1]
        else:
            manifest["description"] = "Re-described."
        path.write_text(json.dumps(manifest))
    with caplog.at_level("INFO", logger="service.core.registry"):
        await dp.registry.sync()
    assert (await dp.classify(ModelRef("sentiment"), ["good film"]))[0].labels == ["positive", "negative"]
    assert "reloaded model sentiment/1" in caplog.text and "manifest.json changed, same weights" in caplog.text
    assert (await dp.char_step(lm, "d", session_id=s.id)).steps == 4  # same weights: the session goes on
    assert dp.registry.resolve(lm).manifest.description == "Re-described."
    path = repo / "sentiment" / "1" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["labels"] = manifest["labels"][::-1]  # back
    path.write_text(json.dumps(manifest))
    await dp.load_model("sentiment")  # RepositoryModelLoad, without --watch-models
    assert (await dp.classify(ModelRef("sentiment"), ["good film"]))[0].labels == ["negative", "positive"]


async def test_a_load_ending_during_another_leaves_the_model_loading_not_missing(
    repo: Path, make_dp: MakeDP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two loads and an unload of one model, overlapping (tritonclient's load_model/unload_model from several
    clients): while the second load is still under way the model is "loading" (UNAVAILABLE, retry), never NOT_FOUND
    "not in the repository" (false, and it tells clients not to retry). The first load to end cleared the mark the
    second one had set; the unload between them had dropped every version."""
    import threading

    dp = await make_dp(models=repo)
    registry = dp.registry
    discover, gate, held = registry._discover, threading.Event(), threading.Event()

    def slow_discover() -> Any:
        if not held.is_set():  # the first load's look at the repository waits for the gate
            held.set()
            gate.wait(10)
        return discover()

    monkeypatch.setattr(registry, "_discover", slow_discover)
    second = asyncio.create_task(dp.load_model("sentiment"))
    while not held.is_set():
        await asyncio.sleep(0.001)
    await dp.load_model("sentiment")  # the other load, start to end
    await dp.unload_model("sentiment")
    gate.set()
    seen: set[str] = set()
    while not second.done():
        try:
            seen.add(f"version {registry.resolve(ModelRef('sentiment')).version}")
        except ModelUnavailable as exc:
            seen.add("loading" if "is loading" in str(exc) else str(exc))
        except ModelNotFound as exc:
            seen.add(f"NOT_FOUND: {exc}")
        await asyncio.sleep(0)
    await second
    assert seen <= {"loading", "version 1"} and "loading" in seen, seen
    assert registry.resolve(ModelRef("sentiment")).version == 1


async def test_a_manifest_that_is_not_valid_is_said_in_one_line(repo: Path, make_dp: MakeDP) -> None:
    """What is wrong with a manifest, as serving.json's errors are said: one line naming the fields missing, each
    field that is not valid and what it held; not JSON says so. (Pydantic's report was 2,000 characters over 30
    lines for a manifest of a name and a version, with a link per field, in the index, every UNAVAILABLE and the
    load's FAILED_PRECONDITION.)"""
    (repo / "sentiment" / "1" / MANIFEST_FILE).write_text('{"name": "sentiment", "version": 1}')
    (repo / "forecaster" / "1" / MANIFEST_FILE).write_text("{not json")
    path = repo / "charlm" / "1" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["inputs"][0]["dtype"] = "float64"
    manifest["opset"] = 11
    path.write_text(json.dumps(manifest))
    dp = await make_dp(models=repo)
    errors = {m.name: m.error for m in await dp.models()}
    assert errors == {
        "sentiment": "sentiment/1/manifest.json is not a valid manifest: missing fields task, architecture, inputs, "
        "outputs, states, stateful, sha256, opset, torch_version, onnx_version, created_at",
        "forecaster": "forecaster/1/manifest.json is not a valid manifest: not JSON (Expecting property name enclosed "
        "in double quotes: line 1 column 2 (char 1))",
        "charlm": "charlm/1/manifest.json is not a valid manifest: inputs[0].dtype: input should be 'float32', "
        "'int64', 'int32' or 'bool', got \"float64\"; opset: input should be greater than or equal to 17, got 11",
    }
    with pytest.raises(FailedPrecondition) as failed:
        await dp.load_model("sentiment")
    assert "\n" not in str(failed.value) and len(str(failed.value)) < 300, str(failed.value)
    (repo / "sentiment" / "1" / MANIFEST_FILE).write_text("[]")
    with pytest.raises(FailedPrecondition, match="not a valid manifest: a manifest is a JSON object, not an array;"):
        await dp.load_model("sentiment")
    (repo / "sentiment" / "1" / MANIFEST_FILE).write_text("[" * 100_000)
    with pytest.raises(FailedPrecondition, match="not a valid manifest: not JSON we read: its arrays or objects nest"):
        await dp.load_model("sentiment")


async def test_a_version_whose_weights_link_to_a_removed_version_says_so(repo: Path, make_dp: MakeDP) -> None:
    """charlm/2/model.onnx is a link to ../1/model.onnx (as forecaster/4's is to forecaster/3's). Once charlm/1 is
    removed, charlm/2 serves on from memory, and a load says its file is a link to a missing file, naming it (it
    said "must contain model.onnx and manifest.json", which it did)."""
    import os

    v2 = add_version(repo, "charlm", 1, 2)
    (v2 / MODEL_FILE).unlink()
    os.symlink(Path("..") / "1" / MODEL_FILE, v2 / MODEL_FILE)
    dp = await make_dp(models=repo)
    assert (await dp.model_info(ModelRef("charlm", 2))).ready
    shutil.rmtree(repo / "charlm" / "1")
    await dp.registry.sync()
    assert (await dp.model_info(ModelRef("charlm", 2))).ready  # (the weights it loaded serve on)
    with pytest.raises(FailedPrecondition) as failed:
        await dp.load_model("charlm")
    assert str(failed.value) == (
        "model 'charlm': version 2 failed to load: charlm/2/model.onnx is a link to charlm/1/model.onnx, which does "
        "not exist: a version whose files are links depends on the folder they link into; restore that file, or copy "
        "it into charlm/2 in place of the link (the weights it loaded before serve on); load it again once its files "
        "are fixed"
    )
    outside = repo / "charlm" / "3"
    outside.mkdir()
    shutil.copy(v2 / MANIFEST_FILE, outside / MANIFEST_FILE)
    os.symlink(repo.parent / "elsewhere" / MODEL_FILE, outside / MODEL_FILE)
    await dp.registry.sync()
    error = (await dp.model_info(ModelRef("charlm", 3))).error or ""
    assert "charlm/3/model.onnx is a link to a file outside the model repository, which does not exist" in error
    assert str(repo.parent) not in error
