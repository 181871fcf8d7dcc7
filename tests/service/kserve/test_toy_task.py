"""The task seam: a task defined only in ``tests/toy_task.py`` (a GRU character tagger) is loaded as a plugin
and served over KServe v2 — metadata, config, inference and a sequence — by an unchanged server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.kserve.tensors import deserialize_bytes, serialize_bytes
from tests.conftest import ServerHandle
from tests.toy_task import TAGS, export_toy, reference_tags

Input = pb.ModelInferRequest.InferInputTensor


@pytest.fixture
def toy_stub(
    tmp_path: Path, start_server: Callable[..., ServerHandle]
) -> Iterator[tuple[pb_grpc.GRPCInferenceServiceStub, Path]]:
    model_dir = export_toy(tmp_path / "models")
    handle = start_server(models=tmp_path / "models", plugins=["tests.toy_task"])
    with grpc.insecure_channel(handle.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel), model_dir


def text_request(model: str, text: str, **seq: object) -> pb.ModelInferRequest:
    """A v2 request of one TEXT, with sequence parameters (booleans, or strings: a sequence id)."""
    request = pb.ModelInferRequest(model_name=model, inputs=[Input(name="TEXT", datatype="BYTES", shape=[1])])
    request.raw_input_contents.append(serialize_bytes([text.encode()]))
    for key, value in seq.items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        else:
            assert isinstance(value, str)
            request.parameters[key].string_param = value
    return request


def tag(stub: pb_grpc.GRPCInferenceServiceStub, text: str, **seq: object) -> tuple[list[str], np.ndarray, int]:
    response = stub.ModelInfer(text_request("tagger", text, **seq), timeout=30)
    (tags_meta, scores_meta) = response.outputs
    tags = [t.decode() for t in deserialize_bytes("TAGS", response.raw_output_contents[0], tags_meta.shape[0])]
    scores = np.frombuffer(response.raw_output_contents[1], "<f4").reshape(tuple(scores_meta.shape))
    return tags, scores, response.parameters["seqserve_steps"].int64_param


def test_a_plugin_task_is_served_over_kserve_v2(toy_stub: tuple[pb_grpc.GRPCInferenceServiceStub, Path]) -> None:
    stub, model_dir = toy_stub
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="tagger"), timeout=30)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("TEXT", "BYTES", [1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("TAGS", "BYTES", [-1]),
        ("SCORES", "FP32", [-1, len(TAGS)]),
    ]
    config = stub.ModelConfig(pb.ModelConfigRequest(name="tagger"), timeout=30).config
    assert config.parameters["task"].string_value == "toy-tagger"
    assert config.sequence_batching.max_sequence_idle_microseconds > 0
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30)
    assert [(m.name, m.version, m.state) for m in index.models] == [("tagger", "1", "READY")]

    tags, scores, _ = tag(stub, "hello world")
    assert tags == reference_tags(model_dir, "hello world") and scores.shape == (11, len(TAGS))

    # A sequence carries the GRU state: "hello " then "world" scores "world" as the whole text does, and not as
    # "world" alone would (the untrained tagger's argmax tags are the same either way, so scores are compared).
    first, first_scores, steps = tag(stub, "hello ", sequence_id="s1", sequence_start=True)
    assert first == reference_tags(model_dir, "hello world")[:6] and steps == 6
    np.testing.assert_allclose(first_scores, scores[:6], atol=1e-5)
    rest, rest_scores, steps = tag(stub, "world", sequence_id="s1", sequence_end=True)
    assert rest == reference_tags(model_dir, "hello world")[6:] and steps == 11
    np.testing.assert_allclose(rest_scores, scores[6:], atol=1e-5)
    _, alone, _ = tag(stub, "world")
    assert np.abs(alone - scores[6:]).max() > 1e-3
    with pytest.raises(grpc.RpcError) as e:
        tag(stub, "x", sequence_id="s1")  # ended
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        tag(stub, "HELLO")  # outside the vocabulary: the shared tokenizer's message
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not in the model's vocabulary" in str(
        e.value.details()
    )


BROKEN_TASKS = """
from service.core.tasks import register_task
from tests.toy_task import TaggerTask


@register_task
class NoInfer(TaggerTask):
    name = "toy-no-infer"
    infer = TaggerTask.__mro__[1].infer  # the base's: not defined by this task


@register_task
class CheckCrashes(TaggerTask):
    name = "toy-check-crashes"

    @classmethod
    def check(cls, manifest):
        return {}["foo"]


@register_task
class NotImplementedInside(TaggerTask):
    name = "toy-not-implemented"

    async def infer(self, inputs, session):
        raise NotImplementedError("a plugin's own TODO")
"""


def test_a_plugin_task_that_is_incomplete_or_broken_is_named_as_such(
    tmp_path: Path, start_server: Callable[..., ServerHandle], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task class without infer() loaded and answered every call UNIMPLEMENTED ("not implemented by this server",
    no traceback); a plugin's own NotImplementedError did too; a plugin's check() that crashed was blamed on the
    export ("re-export it")."""
    import json
    import sys

    (tmp_path / "broken_tasks.py").write_text(BROKEN_TASKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, task in (("noinfer", "toy-no-infer"), ("crashes", "toy-check-crashes"), ("todo", "toy-not-implemented")):
        manifest = export_toy(tmp_path / "models", name=name) / "manifest.json"
        raw = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**raw, "task": task}))
    handle = start_server(models=tmp_path / "models", plugins=["tests.toy_task", "broken_tasks"])
    with grpc.insecure_channel(handle.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        index = {m.name: m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30).models}
        assert index["noinfer"].state == "UNAVAILABLE" and index["noinfer"].reason.startswith(
            "task 'toy-no-infer' (broken_tasks.NoInfer) does not define infer(): a task class must"
        )
        assert index["crashes"].reason.endswith(
            "could not be checked (KeyError: 'foo'); a fault in the code of task 'toy-check-crashes' (broken_tasks), "
            "not in the export"
        )
        request = pb.ModelInferRequest(model_name="todo", inputs=[Input(name="TEXT", datatype="BYTES", shape=[1])])
        request.raw_input_contents.append(serialize_bytes([b"ab"]))
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INTERNAL  # the plugin's bug, logged with its traceback
    sys.modules.pop("broken_tasks", None)


def test_a_plugin_that_fails_at_import_is_named_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A syntax error printed a whole traceback at start; an error raised at import said only "plugin raised at
    import", naming no module. Both now say which module and what (the server then exits 1 with that line)."""
    from service.core.tasks import load_plugins

    (tmp_path / "plugin_syntax.py").write_text("def broken(:\n")
    (tmp_path / "plugin_raises.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError) as info:
        load_plugins(["plugin_raises"])
    assert str(info.value) == ("plugin module 'plugin_raises' failed while it was imported: RuntimeError: no GPU here")
    with pytest.raises(ValueError) as info:
        load_plugins(["plugin_syntax"])
    message = str(info.value)
    assert message.startswith("plugin module 'plugin_syntax' failed while it was imported: SyntaxError: ")
    assert message.endswith(f"({tmp_path / 'plugin_syntax.py'}, line 1)") and "\n" not in message


def test_a_plugin_task_that_returns_no_declared_output_is_named_in_the_log(
    tmp_path: Path, start_server: Callable[..., ServerHandle], caplog: pytest.LogCaptureFixture
) -> None:
    """A bare KeyError: 'SCORES' in the log before; the caller still gets INTERNAL (the task's bug, not theirs)."""
    from service.core.tasks.base import TASKS
    from tests.toy_task import TaggerTask

    class Forgetful(TaggerTask):
        name = "toy-forgetful"

        async def infer(self, inputs: dict[str, Any], session: Any) -> Any:
            result = await super().infer(inputs, session)
            result.outputs.pop("SCORES")
            return result

    TASKS[Forgetful.name] = Forgetful
    try:
        manifest = export_toy(tmp_path / "models", name="forgetful") / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"toy-tagger"', '"toy-forgetful"'))
        handle = start_server(models=tmp_path / "models", plugins=["tests.toy_task"])
        with grpc.insecure_channel(handle.target) as channel, caplog.at_level("ERROR"):
            request = pb.ModelInferRequest(
                model_name="forgetful", inputs=[Input(name="TEXT", datatype="BYTES", shape=[1])]
            )
            request.raw_input_contents.append(serialize_bytes([b"ab"]))
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert (
            "task 'toy-forgetful' of model forgetful/1 returned no output SCORES (it returned ['TAGS']" in caplog.text
        )
    finally:
        TASKS.pop(Forgetful.name, None)


def test_a_plugin_task_whose_answer_breaks_its_contract_is_internal_and_its_session_kept(
    tmp_path: Path, start_server: Callable[..., ServerHandle], caplog: pytest.LogCaptureFixture
) -> None:
    """A task's output of another datatype, rank or fixed size than ModelMetadata declared went out as a success;
    a task that returned None failed on an AttributeError naming nothing; a task that left a session a state of
    other shapes was saved, and every later step of the sequence failed in ONNX Runtime with an INTERNAL that named
    no task. Now each is INTERNAL naming the task, and the session is kept as it was before the call."""
    from service.core.tasks.base import TASKS, bytes_tensor, fp32_tensor
    from tests.toy_task import TaggerTask

    class Liar(TaggerTask):
        name = "toy-liar"

        async def infer(self, inputs: dict[str, Any], session: Any) -> Any:
            result = await super().infer(inputs, session)
            (text,) = [t.decode() for t in inputs["TEXT"].items]
            scores = result.outputs["SCORES"].array
            assert scores is not None
            if text == "wide":  # a column more than the labels ModelMetadata declares
                result.outputs["SCORES"] = fp32_tensor("SCORES", np.zeros((4, len(TAGS) + 1), np.float32))
            elif text == "flat":  # another rank
                result.outputs["SCORES"] = fp32_tensor("SCORES", scores.reshape(-1))
            elif text == "text":  # another datatype
                result.outputs["SCORES"] = bytes_tensor("SCORES", ["x"] * 4)
            elif text == "name":  # another output under this one's name
                result.outputs["SCORES"] = result.outputs["TAGS"]
            elif text == "none":
                return None
            elif text == "state" and session is not None:
                session.state = {k: np.zeros((1, 1, 5), np.float32) for k in session.state}
            elif text == "inplace" and session is not None:  # the same, into the dict it was given
                session.state["h0"] = np.zeros((1, 1, 5), np.float32)
            elif text == "boom":  # fails after it advanced the session
                raise ValueError("the task's own bug")
            elif text == "forget":  # an output its contract declares, left out
                del result.outputs["SCORES"]
            return result

    TASKS[Liar.name] = Liar
    try:
        manifest = export_toy(tmp_path / "models", name="liar") / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"toy-tagger"', '"toy-liar"'))
        model_dir = export_toy(tmp_path / "models")
        handle = start_server(models=tmp_path / "models", plugins=["tests.toy_task"])
        with grpc.insecure_channel(handle.target) as channel, caplog.at_level("ERROR"):
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            def call(text: str, **seq: object) -> pb.ModelInferResponse:
                answer: pb.ModelInferResponse = stub.ModelInfer(text_request("liar", text, **seq), timeout=30)
                return answer

            for text, wrong in (
                ("wide", f"shape [4, {len(TAGS) + 1}]"),
                ("flat", "shape [12]"),
                ("text", "datatype BYTES"),
                ("name", "the tensor named 'TAGS'"),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    call(text)
                assert info.value.code() == grpc.StatusCode.INTERNAL
                assert (
                    f"task 'toy-liar' of model liar/1 returned output SCORES with {wrong}; its contract declares "
                    f"SCORES (FP32 [-1, {len(TAGS)}])" in caplog.text
                )
            with pytest.raises(grpc.RpcError) as info:
                call("none")
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "task 'toy-liar' of model liar/1 returned NoneType from infer(), not a TaskResult" in caplog.text

            assert call("abc", sequence_id="s", sequence_start=True).parameters["seqserve_steps"].int64_param == 3
            with pytest.raises(grpc.RpcError) as info:
                call("state", sequence_id="s")
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "task 'toy-liar' of model liar/1 left session" in caplog.text
            assert "state h0 as float32 [1, 1, 5] (not float32 [1, 1, 8])" in caplog.text
            # A state changed in the dict itself was saved unchecked; an output off its contract, or a failure
            # after the task advanced the session, failed the request after the sequence had advanced. Now each is
            # INTERNAL with the sequence as it was.
            for bad in ("inplace", "wide", "boom", "forget"):
                with pytest.raises(grpc.RpcError) as info:
                    call(bad, sequence_id="s")
                assert info.value.code() == grpc.StatusCode.INTERNAL, bad
            # The sequence goes on from where it was before the refused call: "abc" then "de" tags as "abcde".
            answer = call("de", sequence_id="s")
            assert answer.parameters["seqserve_steps"].int64_param == 5
            scores = np.frombuffer(answer.raw_output_contents[1], "<f4").reshape(2, len(TAGS))
            whole = np.frombuffer(call("abcde").raw_output_contents[1], "<f4").reshape(5, len(TAGS))
            np.testing.assert_allclose(scores, whole[3:], atol=1e-5)
            # Other models and the server are unaffected.
            assert tag(stub, "hello")[0] == reference_tags(model_dir, "hello")
        # Our Sessions API on a stateful plugin model: it made a session no call of the API could advance.
        from service.client import ApiError, Client

        with Client(handle.target) as client, pytest.raises(ApiError) as refused:
            client.create_session("tagger")
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "keeps state only through KServe v2 sequences" in refused.value.message
        # ...nor a twin of such a sequence by Fork (it made one under an id no call could reach)
        with Client(handle.target) as client, pytest.raises(ApiError) as refused:
            client.fork_session("kserve:liar:s")
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        TASKS.pop(Liar.name, None)


def test_a_plugin_not_on_the_path_or_replacing_a_task_is_told_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``--plugin mytasks`` run from the plugin's own folder said only "No module named 'mytasks'"; a plugin that
    registered a task under a built-in's name took over every model of that task without a word."""
    from service.core.tasks import load_plugins
    from service.core.tasks.base import TASKS, register_task
    from tests.toy_task import TaggerTask

    monkeypatch.chdir(tmp_path)
    (tmp_path / "plugin_here.py").write_text("")
    (tmp_path / "plugin_needs.py").write_text("import no_such_dependency_here\n")
    with pytest.raises(ValueError) as info:
        load_plugins(["plugin_here"])
    assert str(info.value) == (
        "plugin module 'plugin_here' could not be imported: No module named 'plugin_here'; a plugin is imported by "
        "its module name: install its package into this Python, or put the folder holding it on PYTHONPATH (the "
        "current folder is not searched)"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError) as info:  # a module the plugin imports is missing: no advice about the plugin
        load_plugins(["plugin_needs"])
    assert str(info.value) == (
        "plugin module 'plugin_needs' could not be imported: No module named 'no_such_dependency_here'"
    )

    class Hijack(TaggerTask):
        name = "charlm"

    original = TASKS["charlm"]
    try:
        with caplog.at_level("WARNING"):
            register_task(original)  # the same class again (a module imported twice): nothing to say
            assert "replaces" not in caplog.text
            register_task(Hijack)
        assert TASKS["charlm"] is Hijack
        assert (
            f"task 'charlm': {__name__}.test_a_plugin_not_on_the_path_or_replacing_a_task_is_told_so.<locals>.Hijack "
            "replaces service.core.tasks.charlm.CharLMTask, registered before under that name" in caplog.text
        )
    finally:
        TASKS["charlm"] = original
