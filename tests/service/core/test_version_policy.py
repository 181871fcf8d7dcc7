"""Triton's ``version_policy``: which versions of a model are served (``all``, ``latest:N``, ``specific:...``), from
the server's setting, a model's serving.json (also as Triton's JSON) or a load's config; versions left out are not
loaded and a call naming one gets NOT_FOUND saying why; a newer version replaces the one before only once it is
ready; ModelConfig reports the policy."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from service.api.kserve.convert import config_to_pb
from service.core.dataplane import CoreDataPlane
from service.core.manifest import MODEL_FILE
from service.core.types import ModelRef
from service.errors import FailedPrecondition, InvalidInput, ModelNotFound, ModelUnavailable
from service.settings import Settings, chosen_versions, version_policy
from tests.service.core.conftest import RecordingMetrics, add_version, core_settings, memory_dp, texts

SENT = ModelRef("sentiment")


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("all", "all"),
        ("latest", "latest:1"),
        (" Latest : 2 ", "latest:2"),
        ("specific:3,1,3", "specific:1,3"),
        ({"all": {}}, "all"),
        ({"latest": {"num_versions": 2}}, "latest:2"),
        ({"latest": {}}, "latest:1"),
        ({"specific": {"versions": ["3", 1]}}, "specific:1,3"),  # (protobuf's JSON writes int64 as strings)
        ('{"latest": {"num_versions": 3}}', "latest:3"),  # Triton's JSON in an environment variable
    ],
)
def test_a_policy_is_read_in_every_form_triton_users_write(given: Any, canonical: str) -> None:
    assert version_policy(given) == canonical


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ("newest", "version_policy must be all, latest, latest:N, specific:1,3, or Triton's JSON"),
        ("all:2", "version_policy must be all, latest, latest:N, specific:1,3"),
        ("specific:", "version_policy must be all, latest, latest:N, specific:1,3"),
        ("latest:0", "the count of latest versions must be a whole number from 1 to 999999999; got '0'"),
        ({"latest": {"num_versions": True}}, "the count of latest versions must be a whole number"),
        ("specific:1,x", "each specific version must be a whole number from 1 to 999999999; got 'x'"),
        ({"specific": {"versions": []}}, "version_policy specific needs a non-empty list of versions, got []"),
        ({"latest": {}, "all": {}}, "version_policy as JSON holds exactly one of all, latest and specific"),
        ("{latest", "version_policy is not JSON"),
        (3, "version_policy must be all, latest"),
    ],
)
def test_a_policy_that_is_not_one_says_what_to_write(given: Any, words: str) -> None:
    with pytest.raises(ValueError) as err:
        version_policy(given)
    assert words in str(err.value)


def test_the_setting_comes_from_the_environment_and_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().version_policy == "all"  # the default: every version folder is served
    monkeypatch.setenv("SEQSERVE_VERSION_POLICY", "latest")
    assert Settings().version_policy == "latest:1"
    monkeypatch.setenv("SEQSERVE_VERSION_POLICY", "latest:zero")
    with pytest.raises(ValueError, match="the count of latest versions must be a whole number"):
        Settings()


def test_chosen_versions() -> None:
    assert chosen_versions("all", [3, 1, 2]) == [1, 2, 3]
    assert chosen_versions("latest:2", [3, 1, 2]) == [2, 3]
    assert chosen_versions("latest:5", [1, 2]) == [1, 2]
    assert chosen_versions("specific:1,4", [1, 2, 3]) == [1]  # a version not on disk is simply not there


def served(dp: CoreDataPlane, name: str) -> list[int]:
    return [e.version for e in dp.registry.versions() if e.name == name]


async def test_latest_serves_only_the_newest_and_names_why_an_older_one_is_not_found(repo: Path) -> None:
    add_version(repo, "sentiment", 1, 2)
    add_version(repo, "sentiment", 1, 3)
    dp = await memory_dp(repo, version_policy="latest")
    try:
        assert served(dp, "sentiment") == [3]
        assert served(dp, "charlm") == [1]  # one version: the newest
        assert (await dp.classify(SENT, ["good film"]))[0].label
        with pytest.raises(ModelNotFound) as err:
            await dp.classify(ModelRef("sentiment", 1), ["good film"])
        assert str(err.value) == (
            "model 'sentiment' version 1 is in the repository but not served: the model's version_policy is latest:1 "
            "(SEQSERVE_VERSION_POLICY, its serving.json or a load's config); served versions: [3]"
        )
        with pytest.raises(ModelNotFound, match="has no version 7; available versions: \\[3\\]"):
            await dp.classify(ModelRef("sentiment", 7), ["good film"])  # not on disk at all: as before
        config = config_to_pb(await dp.model_metadata(SENT), dp.settings)
        assert config.version_policy.WhichOneof("policy_choice") == "latest"
        assert config.version_policy.latest.num_versions == 1
        assert (await dp.model_metadata(SENT)).versions == [3]
    finally:
        await dp.stop()


async def test_a_models_serving_json_sets_its_own_policy_also_as_tritons_json(repo: Path) -> None:
    add_version(repo, "sentiment", 1, 2)
    add_version(repo, "sentiment", 1, 3)
    add_version(repo, "charlm", 1, 2)
    (repo / "sentiment" / "serving.json").write_text(json.dumps({"version_policy": {"specific": {"versions": [1, 3]}}}))
    dp = await memory_dp(repo)  # the server's policy: all
    try:
        assert served(dp, "sentiment") == [1, 3]
        assert served(dp, "charlm") == [1, 2]
        config = config_to_pb(await dp.model_metadata(SENT), dp.settings)
        assert list(config.version_policy.specific.versions) == [1, 3]
        other = config_to_pb(await dp.model_metadata(ModelRef("charlm")), dp.settings)
        assert other.version_policy.WhichOneof("policy_choice") == "all"

        # A changed policy applies at the next look at the repository (--watch-models, a load).
        (repo / "sentiment" / "serving.json").write_text('{"version_policy": "latest:2"}')
        await dp.registry.sync()
        assert served(dp, "sentiment") == [2, 3]
    finally:
        await dp.stop()


async def test_a_policy_in_a_serving_json_that_is_not_valid_makes_the_model_unavailable_saying_why(
    repo: Path,
) -> None:
    (repo / "sentiment" / "serving.json").write_text('{"version_policy": "latest:0"}')
    dp = await memory_dp(repo)
    try:
        states = {(m.name, m.version): (m.ready, m.error) for m in await dp.models()}
        ready, reason = states[("sentiment", 1)]
        assert not ready and reason is not None
        assert reason.startswith("sentiment/serving.json: version_policy: the count of latest versions"), reason
        assert states[("charlm", 1)] == (True, None)
    finally:
        await dp.stop()


async def test_a_new_version_replaces_the_old_once_it_is_ready_and_a_broken_one_does_not(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dp = await memory_dp(repo, version_policy="latest:1")
    try:
        assert served(dp, "sentiment") == [1]
        add_version(repo, "sentiment", 1, 2)
        await dp.registry.sync()  # what --watch-models does at its next poll
        assert served(dp, "sentiment") == [2]
        assert (await dp.model_info(SENT)).version == 2

        broken = add_version(repo, "sentiment", 2, 3)
        (broken / MODEL_FILE).write_bytes(b"not an onnx graph")
        with caplog.at_level(logging.WARNING, logger="service.core.registry"):
            await dp.registry.sync()
            await dp.registry.sync()
        assert served(dp, "sentiment") == [2, 3]  # 3 failed to load; 2 serves on
        assert not dp.registry.find(ModelRef("sentiment", 3)).ready
        assert (await dp.model_info(SENT)).version == 2  # a call naming no version gets the newest ready one
        assert (await dp.classify(SENT, ["good film"]))[0].label
        kept = [r.getMessage() for r in caplog.records if "outside its version_policy" in r.getMessage()]
        assert kept == [
            "model sentiment/2 is outside its version_policy latest:1 but serves on: no version the policy chooses "
            "is ready"
        ]  # once, not at every poll

        (broken / MODEL_FILE).write_bytes((repo / "sentiment" / "1" / MODEL_FILE).read_bytes())
        await dp.registry.sync()
        assert served(dp, "sentiment") == [3]
        assert (await dp.infer(SENT, texts("good film"))).outputs
    finally:
        await dp.stop()


async def test_a_model_whose_policy_chooses_none_of_its_versions_failed_to_load_saying_why(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A serving.json policy that names only versions the repository lacks: the model does not vanish (it is in the
    repository) but failed to load, as Triton's does: its newest version is UNAVAILABLE with the reason (the index,
    ModelReady, calls, seqserve_model_ready 0), once, not at every poll; a fixed policy loads it. A model that
    serves versions when its policy turns so keeps serving them (a warning), as before."""
    add_version(repo, "sentiment", 1, 2)
    (repo / "sentiment" / "serving.json").write_text('{"version_policy": "specific:7"}')
    with caplog.at_level(logging.ERROR, logger="service.core.registry"):
        dp = await memory_dp(repo)
    try:
        why = (
            "its version_policy specific:7 chooses none of the model's versions in the repository (1, 2); at least "
            "one version must be available under the version policy: change the policy (its serving.json, a load's "
            "config or SEQSERVE_VERSION_POLICY) or add the version it names"
        )
        info = await dp.model_info(SENT)
        assert (info.version, info.ready, info.error) == (2, False, why)
        with pytest.raises(ModelUnavailable, match=r"^model sentiment/2 failed to load: its version_policy specific:7"):
            await dp.classify(SENT, ["good film"])
        assert dp.metrics.registry.get_sample_value("seqserve_model_ready", {"model": "sentiment", "version": "2"}) == 0
        assert (await dp.model_info(ModelRef("charlm"))).ready  # the others serve
        await dp.registry.sync()  # a --watch-models poll: nothing new to say
        assert [r.getMessage() for r in caplog.records if "specific:7" in r.getMessage()] == [
            f"model sentiment/2 failed to load: {why}"
        ]

        (repo / "sentiment" / "serving.json").write_text('{"version_policy": "specific:1"}')
        await dp.registry.sync()
        assert served(dp, "sentiment") == [1] and (await dp.model_info(SENT)).version == 1
        assert (await dp.model_info(SENT)).ready

        (repo / "sentiment" / "serving.json").write_text('{"version_policy": "specific:8"}')
        await dp.registry.sync()  # version 1 serves on: no version the policy chooses is ready
        assert served(dp, "sentiment") == [1] and (await dp.model_info(SENT)).ready
    finally:
        await dp.stop()


async def test_a_load_whose_policy_chooses_no_version_on_disk_is_refused_and_changes_nothing(repo: Path) -> None:
    """Triton refuses a load when no version is available under the model's version policy. A load's config that
    names only versions the repository lacks is INVALID_ARGUMENT and leaves the model as it was (its config too);
    a policy from the model's serving.json is FAILED_PRECONDITION. A policy that chooses some version loads it."""
    add_version(repo, "sentiment", 1, 2)
    dp = await memory_dp(repo)
    try:
        with pytest.raises(InvalidInput) as err:
            await dp.load_model("sentiment", {"version_policy": "specific:7,9"})
        assert str(err.value) == (
            "load parameter config: version_policy specific:7,9 chooses none of the versions of model 'sentiment' in "
            "the repository (1, 2); at least one version must be available under the version policy"
        )
        assert served(dp, "sentiment") == [1, 2]
        config = config_to_pb(await dp.model_metadata(SENT), dp.settings)
        assert config.version_policy.WhichOneof("policy_choice") == "all"  # the refused config was not kept

        await dp.load_model("sentiment", {"version_policy": "specific:2,9"})  # 2 is there: it loads, alone
        assert served(dp, "sentiment") == [2]

        (repo / "sentiment" / "serving.json").write_text('{"version_policy": "specific:5"}')
        with pytest.raises(FailedPrecondition, match=r"^model 'sentiment': its version_policy specific:5 \(its "
                           r"serving.json's, or the server's VERSION_POLICY\) chooses none of its versions in the "
                           r"repository \(1, 2\)"):  # fmt: skip
            await dp.load_model("sentiment")
        assert served(dp, "sentiment") == [2]  # as the load before left it
    finally:
        await dp.stop()


async def test_exit_on_error_counts_a_model_whose_policy_chooses_none_of_its_versions(repo: Path) -> None:
    """--exit-on-error stops the start on a model that would serve nothing, as on a version that failed to load."""
    (repo / "sentiment" / "serving.json").write_text('{"version_policy": "specific:4"}')
    dp = CoreDataPlane(core_settings(repo, session_store="memory", exit_on_error=True), RecordingMetrics())
    try:
        with pytest.raises(RuntimeError) as err:
            await dp.start()
    finally:
        await dp.stop()  # what the start loaded before it stopped
    assert str(err.value).startswith(
        "exit_on_error (SEQSERVE_EXIT_ON_ERROR, --exit-on-error) is set and 1 model version(s) failed to load: "
        "sentiment/1: its version_policy specific:4 chooses none of the model's versions in the repository (1)"
    )


@pytest.mark.parametrize("kind", ["missing", "a file"])
async def test_exit_on_error_stops_the_start_on_a_repository_that_is_no_folder(tmp_path: Path, kind: str) -> None:
    """Without --exit-on-error such a server starts serving nothing (a warning; health NOT_SERVING): a repository
    mounted later, with --watch-models. With it, the start stops at once, saying what to point where."""
    root = tmp_path / "models"
    if kind == "a file":
        root.write_text("not a repository")
    for strict in (False, True):
        dp = CoreDataPlane(core_settings(root, session_store="memory", exit_on_error=strict), RecordingMetrics())
        try:
            if not strict:
                await dp.start()
                assert not dp.registry.versions()
                continue
            with pytest.raises(RuntimeError) as err:
                await dp.start()
        finally:
            await dp.stop()
    problem = "does not exist" if kind == "missing" else "is not a directory"
    assert str(err.value) == (
        f"exit_on_error (SEQSERVE_EXIT_ON_ERROR, --exit-on-error) is set and the model repository {root} {problem}: "
        "point --models (SEQSERVE_MODELS) at the folder of model folders"
    )


async def test_versions_a_specific_policy_names_but_the_repository_lacks_are_logged_once(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``specific:1,9`` with no version 9: version 1 serves, and the log says 9 is missing (as Triton logs it), once
    per policy, not at every --watch-models poll; again once the policy changes."""
    (repo / "sentiment" / "serving.json").write_text('{"version_policy": "specific:1,9"}')
    with caplog.at_level(logging.WARNING, logger="service.core.registry"):
        dp = await memory_dp(repo)
        try:
            assert served(dp, "sentiment") == [1]
            await dp.registry.sync()
            (repo / "sentiment" / "serving.json").write_text('{"version_policy": "specific:1,8,9"}')
            await dp.registry.sync()
            await dp.registry.sync()
        finally:
            await dp.stop()
    said = [r.getMessage() for r in caplog.records if "does not have" in r.getMessage()]
    assert said == [
        "model sentiment: its version_policy specific:1,9 names version(s) [9], which the repository does not have; "
        "serving [1]",
        "model sentiment: its version_policy specific:1,8,9 names version(s) [8, 9], which the repository does not "
        "have; serving [1]",
    ]


async def test_a_session_or_blob_of_a_version_the_policy_leaves_out_is_refused_saying_why(repo: Path) -> None:
    dp = await memory_dp(repo, session_signing_key="s" * 40)
    try:
        lm = ModelRef("charlm")
        s = await dp.create_session(lm)  # on charlm/1, the newest then
        await dp.char_step(lm, "abc", session_id=s.id)
        blob, _ = await dp.export_session(s.id)
        add_version(repo, "charlm", 1, 2)
        (repo / "charlm" / "serving.json").write_text('{"version_policy": "latest"}')
        await dp.registry.sync()
        assert served(dp, "charlm") == [2]
        with pytest.raises(FailedPrecondition) as err:
            await dp.char_step(lm, "d", session_id=s.id)
        assert str(err.value).endswith(
            "is pinned to model charlm version 1, which this server does not serve now: the model's version_policy is "
            "latest:1; the session keeps its state until it expires, and goes on once a version_policy that chooses "
            "its version is back; to go on now, create a new session (KServe: start a new sequence)"
        )
        assert (await dp.char_step(lm, "d", session_id=(await dp.create_session(lm)).id)).steps == 1
        with pytest.raises(FailedPrecondition) as err:
            await dp.import_session(blob)  # exported from charlm/1 before the policy changed
        assert str(err.value) == (
            "the session blob holds a session of model charlm version 1, which this server does not serve: the "
            "model's version_policy is latest:1; import it where that version is served"
        )
        (repo / "charlm" / "serving.json").unlink()  # the policy chooses version 1 again: the session goes on
        await dp.registry.sync()
        assert (await dp.char_step(lm, "d", session_id=s.id)).steps == 4
    finally:
        await dp.stop()
