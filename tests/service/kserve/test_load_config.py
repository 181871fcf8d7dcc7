"""Triton's load with a ``config`` (RepositoryModelLoad's parameter; tritonclient's ``load_model(config=...)``) over
REST with the stock ``tritonclient.http``: what it may change (the batching delay and instance count, as a model's
serving.json may), what it refuses and why, and that a load without one goes back to the files. The gRPC side, with
the stock tritonclient.grpc and --workers 2, is in ``test_model_repository.py``."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.api.kserve.convert import LOADABLE
from tests.conftest import ServerHandle, server_settings
from tests.service.core.conftest import add_version


def refused(c: triton.InferenceServerClient, model: str, config: str) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        c.load_model(model, config=config)
    return info.value.status(), info.value.message()


def test_a_load_with_a_config_over_rest(tiny_models: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(tiny_models, repo)
    (repo / "sentiment" / "serving.json").write_text('{"model_instances": 3}')
    handle = ServerHandle(server_settings(repo, http_port=0, load_models=["sentiment", "charlm"]))
    try:
        c = triton.InferenceServerClient(f"127.0.0.1:{handle.server.http_port}")
        config = c.get_model_config("sentiment")
        assert (config["dynamic_batching"]["max_queue_delay_microseconds"], config["instance_group"][0]["count"]) == (
            1000,  # the test server's MAX_BATCH_DELAY_MS, 1 ms
            3,  # its serving.json's
        )
        config["dynamic_batching"]["max_queue_delay_microseconds"] = 7000
        config["instance_group"][0]["count"] = 2
        c.load_model("sentiment", config=json.dumps(config))
        now = c.get_model_config("sentiment")
        assert (now["dynamic_batching"]["max_queue_delay_microseconds"], now["instance_group"][0]["count"]) == (
            7000,
            2,
        )
        t = triton.InferInput("TEXT", [1], "BYTES")
        t.set_data_from_numpy(np.array([b"a fine film"], dtype=object))
        assert c.infer("sentiment", [t]).as_numpy("LABEL") is not None

        # Refusals: 400 saying what to fix; the model serves on as it was.
        assert refused(c, "sentiment", "{not json") == (
            "400",
            "load parameter config is not a model configuration in JSON (Expecting property name enclosed in double "
            "quotes: line 1 column 2 (char 1))",
        )
        # JSON that is no object: "[]" loaded as an empty config (dropping an earlier load's settings), 123 and
        # null failed inside the parser ("'int' object is not iterable"), a string was read field by field.
        for text, kind in (("[]", "an array"), ("123", "a number"), ("null", "null"), ('"abc"', "a string")):
            assert refused(c, "sentiment", text) == (
                "400",
                f"load parameter config is {kind}, not a model configuration: send a JSON object",
            )
        assert refused(c, "sentiment", "[" * 5_000) == (  # (the check above must not fail inside the parser)
            "400",
            "load parameter config is not JSON we read: its arrays or objects nest too deeply",
        )
        # A field of Triton's configuration this server has not (a Triton user's own config.pbtxt as JSON) was "not a
        # model configuration in JSON (Message type ... has no field named ...)".
        for text, field in (
            ('{"optimization": {}}', "optimization"),
            ('{"input": [{"name": "TEXT", "is_shape_tensor": false}]}', "input[0].is_shape_tensor"),
        ):
            assert refused(c, "sentiment", text) == (
                "400",
                f"load parameter config has {field}, a field of Triton's model configuration this server does not "
                f"have; leave it out (a load may change {LOADABLE}; the rest must be what ModelConfig answers, or "
                "left out)",
            )
        # An instance group's kind and name were dropped without a word: KIND_GPU loaded on the CPU.
        gpu = {"instance_group": [{"count": 1, "kind": "KIND_GPU", "name": "foo"}]}
        status, message = refused(c, "sentiment", json.dumps(gpu))
        assert status == "400" and message.startswith(
            "load parameter config changes instance_group.name, instance_group.kind, which a load cannot change"
        )
        status, message = refused(c, "sentiment", json.dumps({"instance_group": [{"count": 65}]}))
        assert status == "400" and message == (
            "load parameter config: model_instances: input should be less than or equal to 64, got 65"
        )
        # A delay for a sequence-batched model said it "changes dynamic_batching ... it may change
        # dynamic_batching.max_queue_delay_microseconds": a contradiction that never said why.
        delay = json.dumps({"dynamic_batching": {"max_queue_delay_microseconds": 500}})
        status, message = refused(c, "charlm", delay)
        assert status == "400" and message.startswith(
            "load parameter config sets dynamic_batching, but model charlm is configured with sequence_batching"
        )
        assert "set its batching delay as max_batch_delay_ms in the model's serving.json" in message
        changed = {**config, "platform": "tensorrt_plan", "input": [{**config["input"][0], "dims": [7]}]}
        status, message = refused(c, "sentiment", json.dumps(changed))
        assert status == "400" and message.startswith("load parameter config changes platform, input, which a load")
        assert c.get_model_config("sentiment") == now
        # A config that is no string parameter: the message read as a statement ("config is a string: ...").
        body = json.dumps({"parameters": {"config": 123}}).encode()
        url = f"http://127.0.0.1:{handle.server.http_port}/v2/repository/models/sentiment/load"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=30)
        assert err.value.code == 400 and json.loads(err.value.read())["error"].startswith(
            "load parameter config must be a string parameter holding the model configuration in JSON"
        )

        # A model not loaded yet: its name and the two settings only (nothing to compare the rest with).
        assert not c.is_model_ready("forecaster")
        status, message = refused(c, "forecaster", json.dumps({"name": "forecaster", "max_batch_size": 4}))
        assert status == "400" and "changes max_batch_size" in message and "the model is not loaded" in message
        status, message = refused(c, "forecaster", json.dumps({"name": "sentiment"}))  # another model's config
        assert status == "400" and "changes name" in message
        c.load_model("forecaster", config=json.dumps({"name": "forecaster", "instance_group": [{"count": 2}]}))
        assert c.get_model_config("forecaster")["instance_group"][0]["count"] == 2

        # A load without a config goes back to the files: the server's delay, serving.json's instances.
        c.load_model("sentiment")
        again = c.get_model_config("sentiment")
        assert (again["dynamic_batching"]["max_queue_delay_microseconds"], again["instance_group"][0]["count"]) == (
            1000,
            3,
        )
    finally:
        handle.close()


def test_a_loads_config_and_serving_json_choose_the_versions_served(tiny_models: Path, tmp_path: Path) -> None:
    """Triton's ``version_policy`` through the stock ``tritonclient.http``: ModelConfig reports it, a load's config
    changes it (the versions it leaves out unload, a call naming one gets 404 saying why), a count of 0 is refused
    saying what to write, and a load without a config goes back to the files."""
    repo = tmp_path / "models"
    shutil.copytree(tiny_models, repo)
    add_version(repo, "sentiment", 1, 2)
    handle = ServerHandle(server_settings(repo, http_port=0, load_models=["sentiment"]))
    try:
        c = triton.InferenceServerClient(f"127.0.0.1:{handle.server.http_port}")
        assert c.get_model_config("sentiment")["version_policy"] == {"all": {}}
        assert c.get_model_metadata("sentiment")["versions"] == ["1", "2"]
        c.load_model("sentiment", config=json.dumps({"version_policy": {"latest": {"num_versions": 1}}}))
        assert c.get_model_config("sentiment")["version_policy"] == {"latest": {"num_versions": 1}}
        assert c.get_model_metadata("sentiment")["versions"] == ["2"]
        t = triton.InferInput("TEXT", [1], "BYTES")
        t.set_data_from_numpy(np.array([b"a fine film"], dtype=object))
        assert c.infer("sentiment", [t]).as_numpy("LABEL") is not None
        with pytest.raises(InferenceServerException) as err:
            c.infer("sentiment", [t], model_version="1")
        assert err.value.status() == "404"
        assert "version 1 is in the repository but not served: the model's version_policy is latest:1" in (
            err.value.message() or ""
        )
        status, message = refused(c, "sentiment", json.dumps({"version_policy": {"latest": {"num_versions": 0}}}))
        assert (status, message) == (
            "400",
            "load parameter config: version_policy: the count of latest versions must be a whole number from 1 to "
            "999999999; got 0",
        )
        assert c.get_model_metadata("sentiment")["versions"] == ["2"]  # the refused load changed nothing
        c.load_model("sentiment")
        assert c.get_model_metadata("sentiment")["versions"] == ["1", "2"]
    finally:
        handle.close()
