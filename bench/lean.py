"""The lean server: the canned-response floor plus the least work a stateful char-LM step needs, nothing more.

``bench.layers`` sets it beside the floor and seqserve: its CPU per step is what a Python server on this skeleton
(``grpc.aio``, ONNX Runtime) spends on a real char-LM step when it does nothing a production server must do
besides the step itself, so it says how far trimming seqserve's Python could ever go. For each KServe step of a
char LM (``ModelInfer``, ``ModelStreamInfer``) it

- reads the request (gRPC's protobuf parse, as the floor), its ``sequence_id`` / ``sequence_start`` /
  ``sequence_end`` and its ``TEXT``, and maps the characters to ids;
- takes the sequence's state from a dict (zeros at a start);
- runs ONNX Runtime once (one thread) for the steps waiting, one row each (rows of one text length together),
  once as many are waiting as the largest of the last runs had (up to ``max_batch_size``), else
  ``max_batch_delay_ms`` after the first (seqserve's defaults), and then one more turn of the event loop at a
  time while more arrive: the batcher's rule, without its queue bounds, priorities or inline-or-thread choice;
- keeps each row's new state and answers the softmax of its last logits in place of the canned response's
  ``NEXT_CHAR_PROBS`` (the rest of the response is the floor's recorded bytes: the same sizes as seqserve's).

What it leaves out is all the rest: the edge (authentication, rate limits, request size limits, metrics, logs),
the checks of inputs and parameters, model versions and live reloads, the session store (leases, TTLs, quotas,
eviction, export), deadlines, priorities, statistics, tracing, the batcher's queue bounds and its inline or
threaded runs, and every error path (an unknown character or sequence is a plain gRPC error). Other models
(sentiment) and every other method answer as the floor does.

    python -m bench.lean --canned DIR --models DIR [--port 0] [--ready-file F] [--event-loop asyncio|uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.floor import FloorServicer, add_event_loop_option, serve_servicer
from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.kserve.tensors import deserialize_bytes
from service.core.aio import run
from service.core.arrays import softmax, zero_states
from service.core.batching import RECENT_BATCHES
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from service.settings import Settings

PROBS = "NEXT_CHAR_PROBS"
DELAY = Settings.model_fields["max_batch_delay_ms"].default / 1000
MAX_ROWS = Settings.model_fields["max_batch_size"].default

Step = tuple[np.ndarray, list[np.ndarray], "asyncio.Future[tuple[np.ndarray, list[np.ndarray]]]"]


class CharNet:
    """One char-LM version: its ONNX Runtime session (one thread), vocabulary and state layout, and the steps
    waiting for the next run."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        assert manifest.tokenizer is not None  # (char_nets keeps char LMs only)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(folder / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
        self.index = {ch: i for i, ch in enumerate(manifest.tokenizer.vocab)}
        self.state_in = [s.input for s in manifest.states]
        self.state_out = [s.output for s in manifest.states]
        zeros = zero_states(manifest.states, {"batch": 1})
        self.initial = [zeros[name] for name in self.state_in]
        self.outputs = ["logits", *self.state_out]
        self.pending: list[Step] = []
        self.timer: asyncio.Handle | None = None  # the run to come, once a row waits
        self.soon = False  # ... at the loop's next turn (not at the delay)
        self.seen = 0  # rows waiting at the last turn (growing: wait one more)
        self.recent: deque[int] = deque([1], maxlen=RECENT_BATCHES)  # rows of the last runs
        self.expect = 1  # the most of them, kept per run (not per step): a run starts once as many wait
        self.rows = self.runs = 0  # (what the batching achieved: rows / runs)

    def step(self, ids: np.ndarray, state: list[np.ndarray]) -> asyncio.Future[tuple[np.ndarray, list[np.ndarray]]]:
        """Queues one row; the run starts when as many rows wait as the most of the last runs had, or ``DELAY``
        after the first, and once no more arrive in a turn of the loop (``flush``)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[np.ndarray, list[np.ndarray]]] = loop.create_future()
        self.pending.append((ids, state, fut))
        if len(self.pending) >= self.expect and not self.soon:
            if self.timer is not None:
                self.timer.cancel()
            self.timer, self.soon = loop.call_soon(self.flush), True
        elif self.timer is None:
            self.timer = loop.call_later(DELAY, self.flush)
        return fut

    def flush(self) -> None:
        loop = asyncio.get_running_loop()
        if self.seen < len(self.pending) < MAX_ROWS:  # still growing: one more turn of the loop
            self.seen = len(self.pending)
            self.timer, self.soon = loop.call_soon(self.flush), True
            return
        self.seen = 0
        pending, self.pending = self.pending[:MAX_ROWS], self.pending[MAX_ROWS:]
        self.timer, self.soon = None, False
        if self.pending:  # (more than a run takes: the rest at once after this one)
            self.timer, self.soon = loop.call_soon(self.flush), True
        self.recent.append(len(pending))
        self.expect = max(self.recent)
        groups: dict[int, list[Step]] = {}
        for item in pending:
            groups.setdefault(item[0].shape[1], []).append(item)
        for group in groups.values():
            feeds = {"input_ids": np.concatenate([ids for ids, _, _ in group])}
            for k, name in enumerate(self.state_in):
                feeds[name] = np.concatenate([state[k] for _, state, _ in group], axis=1)
            logits, *states = self.session.run(self.outputs, feeds)
            probs = softmax(logits[:, -1, :]).astype(np.float32)  # (as seqserve: in float64, answered in float32)
            self.rows, self.runs = self.rows + len(group), self.runs + 1
            for i, (_, _, fut) in enumerate(group):
                if not fut.cancelled():
                    fut.set_result((probs[i], [s[:, i : i + 1, :] for s in states]))


def char_nets(models: Path, names: list[str]) -> dict[tuple[str, str], CharNet]:
    """Every version of each of ``names`` that is a char LM, by (name, version); ``""`` names the newest."""
    nets: dict[tuple[str, str], CharNet] = {}
    for name in names:
        versions = sorted((int(p.name) for p in (models / name).iterdir() if p.name.isdigit()), reverse=True)
        for v in versions:
            folder = models / name / str(v)
            manifest = Manifest.load(folder / MANIFEST_FILE)
            if manifest.tokenizer is None or manifest.tokenizer.kind != "char" or not manifest.stateful:
                break  # not a char LM: the floor's answers
            nets[(name, str(v))] = CharNet(folder, manifest)
            nets.setdefault((name, ""), nets[(name, str(v))])
    return nets


def _text(request: pb.ModelInferRequest) -> bytes:
    if request.raw_input_contents:
        return deserialize_bytes("TEXT", request.raw_input_contents[0], 1)[0]
    return request.inputs[0].contents.bytes_contents[0]


class LeanServicer(FloorServicer):
    def __init__(self, canned: Path, models: Path) -> None:
        super().__init__(canned)
        self.nets = char_nets(models, sorted({name for name, _ in self.answers}))
        self.states: dict[tuple[str, str, int | str], list[np.ndarray]] = {}
        self.slot: dict[str, int] = {}  # the canned response's NEXT_CHAR_PROBS index, per model
        for (name, kind), answer in self.answers.items():
            if kind == "infer":
                self.slot[name] = next((i for i, o in enumerate(answer.outputs) if o.name == PROBS), 0)

    async def _step(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        net = self.nets.get((request.model_name, request.model_version))
        if net is None:
            return self._respond(request)
        params = request.parameters
        seq = params["sequence_id"]
        key = (request.model_name, request.model_version, seq.int64_param or seq.string_param)
        start = params.get("sequence_start")
        started = start is not None and start.bool_param
        state = net.initial if started else self.states[key]  # (an unknown sequence: KeyError, a gRPC error)
        ids = np.array([[net.index[ch] for ch in _text(request).decode()]], np.int64)
        probs, self.states[key] = await net.step(ids, state)
        end = params.get("sequence_end")
        if end is not None and end.bool_param:
            del self.states[key]
        response = self._respond(request)
        response.raw_output_contents[self.slot[request.model_name]] = probs.tobytes()
        return response

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return await self._step(request)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            yield pb.ModelStreamInferResponse(infer_response=await self._step(request))


async def _serve(canned: Path, models: Path, port: int, ready: Path | None) -> None:
    servicer = LeanServicer(canned, models)
    await serve_servicer(servicer, port, ready)
    for (name, version), net in servicer.nets.items():
        if version and net.runs:  # the mean batch, for whoever reads the log
            print(f"{name}/{version}: {net.rows} rows in {net.runs} runs ({net.rows / net.runs:.1f} per run)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canned", type=Path, required=True)
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", type=Path)
    add_event_loop_option(ap)
    args = ap.parse_args(argv)
    run(_serve(args.canned, args.models, args.port, args.ready_file), args.event_loop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
