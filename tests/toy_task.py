"""A fourth task that exists only in the tests: a character *tagger* (many-to-many) over a tiny exported GRU.

It proves the task seam: this module alone defines the task, registers it (``register_task``) and exports its
model; a server started with ``plugins=["tests.toy_task"]`` serves it over KServe v2, sequences included,
without a change anywhere in ``service/``.

The model tags every character of its input (``n_tags`` classes, argmax of a linear layer over the GRU's
output). With a sequence, the GRU state carries over between requests, so tagging "ab" then "cd" gives the
same tags for "cd" as tagging "abcd" in one request.

v2 contract: TEXT BYTES [1] -> TAGS BYTES [-1] (one tag per character), SCORES FP32 [-1, n_tags].
"""

from __future__ import annotations

import hashlib
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from service.core.batching import StepInput
from service.core.manifest import Architecture, Manifest, StateSpec, TensorSpec, Tokenizer
from service.core.sessions.state import SessionState
from service.core.tasks import Task, register_task
from service.core.tasks.base import ModelHandle, TaskResult, bytes_tensor, fp32_tensor, utf8_items
from service.core.tokenizers import Encoder
from service.core.types import Tensor, TensorContract, TensorDef
from service.errors import InvalidInput
from service.settings import Settings

TASK = "toy-tagger"
VOCAB = list("abcdefghijklmnopqrstuvwxyz ")
TAGS = ["vowel-ish", "consonant-ish", "space-ish"]
HIDDEN = 8


@register_task
class TaggerTask(Task):
    name = TASK
    stateful = True

    @classmethod
    def check(cls, manifest: Manifest) -> None:
        if manifest.tokenizer is None or not manifest.labels:
            raise ValueError("a toy tagger needs a tokenizer and labels")

    @classmethod
    def warmup_input(cls, manifest: Manifest, rows: int) -> dict[str, np.ndarray]:
        """Four characters a row (id 0): the loader runs them before the model is READY (``SEQSERVE_WARMUP``)."""
        return {"input_ids": np.zeros((rows, 4), np.int64)}

    def __init__(self, model: ModelHandle, settings: Settings) -> None:
        super().__init__(model, settings)
        assert model.manifest.tokenizer is not None and model.manifest.labels is not None
        self.encoder = Encoder(model.manifest.tokenizer)
        self.tags = list(model.manifest.labels)

    def contract(self) -> TensorContract:
        return TensorContract(
            inputs=(TensorDef("TEXT", "BYTES", (1,)),),
            outputs=(TensorDef("TAGS", "BYTES", (-1,)), TensorDef("SCORES", "FP32", (-1, len(self.tags)))),
            sequences=True,
        )

    async def infer(self, inputs: dict[str, Tensor], session: SessionState | None) -> TaskResult:
        (text,) = utf8_items(inputs["TEXT"])
        ids = self.encoder.encode(text, field="input TEXT")
        if ids.size == 0:
            raise InvalidInput("input TEXT is empty; send at least one character")
        state = self.initial_state() if session is None else session.state
        out = await self.model.batcher.submit(
            StepInput(inputs={"input_ids": ids[None, :]}, rows=1, states=state, key=("tag", ids.size))
        )
        scores = out.outputs["tags"][0]  # (time, n_tags)
        if session is not None:
            session.state, session.steps = out.states, session.steps + int(ids.size)
        steps = None if session is None else session.steps
        tags = [self.tags[int(i)] for i in scores.argmax(axis=1)]
        return TaskResult({"TAGS": bytes_tensor("TAGS", tags), "SCORES": fp32_tensor("SCORES", scores)}, 1, steps)


def export_toy(root: Path, name: str = "tagger", version: int = 1, seed: int = 0) -> Path:
    """Exports an untrained tiny GRU tagger to ``root/name/version`` (model.onnx + manifest.json)."""
    import onnx
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(len(VOCAB), 8)
            self.gru = nn.GRU(8, HIDDEN, batch_first=True)
            self.head = nn.Linear(HIDDEN, len(TAGS))

        def forward(self, input_ids: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y, hn = self.gru(self.embed(input_ids), h0)  # (batch, time, hidden), (1, batch, hidden)
            return self.head(y), hn

    torch.manual_seed(seed)
    out = root / name / str(version)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    args = (torch.zeros((2, 5), dtype=torch.int64), torch.zeros((1, 2, HIDDEN)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Net().eval(),
            args,
            str(path),
            input_names=["input_ids", "h0"],
            output_names=["tags", "hn"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "time"},
                "h0": {1: "batch"},
                "tags": {0: "batch", 1: "time"},
                "hn": {1: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    manifest = Manifest(
        name=name,
        version=version,
        task=TASK,
        description="test-only toy tagger",
        architecture=Architecture(cell="gru", layers=1, hidden=HIDDEN, parameters=0),
        inputs=[
            TensorSpec(name="input_ids", dtype="int64", shape=["batch", "time"]),
            TensorSpec(name="h0", dtype="float32", shape=[1, "batch", HIDDEN]),
        ],
        outputs=[
            TensorSpec(name="tags", dtype="float32", shape=["batch", "time", len(TAGS)]),
            TensorSpec(name="hn", dtype="float32", shape=[1, "batch", HIDDEN]),
        ],
        states=[StateSpec(name="h", input="h0", output="hn", shape=[1, "batch", HIDDEN])],
        stateful=True,
        tokenizer=Tokenizer(kind="char", vocab=VOCAB),
        labels=TAGS,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        opset=17,
        torch_version=torch.__version__,
        onnx_version=onnx.__version__,
        created_at=datetime.now(UTC).isoformat(),
    )
    manifest.dump(out / "manifest.json")
    return out


def reference_tags(model_dir: Path, text: str) -> list[str]:
    """The tags straight from onnxruntime, for comparison."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[VOCAB.index(c) for c in text]], dtype=np.int64)
    tags, _ = sess.run(None, {"input_ids": ids, "h0": np.zeros((1, 1, HIDDEN), np.float32)})
    return [TAGS[int(i)] for i in tags[0].argmax(axis=1)]
