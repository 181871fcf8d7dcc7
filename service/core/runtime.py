"""One model version on ONNX Runtime: execution-provider choice, state shapes, and one ``run`` per batch.

The runtime knows the manifest's tensor names and fills zero states for every declared state input the
caller leaves out. It knows nothing about queues or sessions (``batching.py`` concatenates requests into a
batch; ``sessions.py`` keeps states between calls).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.core.arrays import DTYPES, resolve_shape, zero_states
from service.core.manifest import Dim, Manifest, StateSpec
from service.errors import ModelUnavailable
from service.settings import Settings

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]  # any dtype: int64 ids, float32 features and states
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def select_providers(device: str, available: list[str] | None = None) -> list[str]:
    """ORT providers for ``settings.device``: auto = CUDA when this onnxruntime build has it, else CPU."""
    available = list(ort.get_available_providers()) if available is None else available
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if device == "cuda":
        raise ModelUnavailable(
            f"device='cuda' was requested but onnxruntime offers only {available}; install onnxruntime-gpu "
            "(pip install 'seqserve[cuda]', instead of onnxruntime) on a machine with a GPU, or set "
            "SEQSERVE_DEVICE=cpu or auto"
        )
    return [CPU]


# A run of this many model-input elements or more (state inputs aside) is large: far above a batch of char-LM steps
# or short texts, reached by long texts in batches and long histories. Its arena growth is handed back by the first
# run SHRINK_IDLE_SECONDS after the last large one (``Runtime._arena_options``).
SHRINK_AFTER_ELEMENTS = 8192
SHRINK_IDLE_SECONDS = 10.0


class Runtime:
    """An ``ort.InferenceSession`` plus the manifest that names its tensors. ``symbols`` sizes the symbolic
    state dimensions besides "batch" (a forecaster's ``"batch*features"`` needs ``{"features": 7}``)."""

    def __init__(
        self, manifest: Manifest, path: Path, settings: Settings, providers: list[str], symbols: dict[str, int]
    ) -> None:
        self.manifest = manifest
        self.symbols = dict(symbols)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = settings.intra_op_threads
        opts.inter_op_num_threads = settings.inter_op_threads
        # Pool threads that spin between runs burn the cores the event loops need (the default spins).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.log_severity_level = 3  # errors only; ORT's warnings about unused initializers are noise here
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.provider: str = self.session.get_providers()[0]
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]
        self._check_graph()
        self.states: list[StateSpec] = list(manifest.states)
        self._state_inputs = {s.input for s in self.states}
        self._shrink: Any = ort.RunOptions()  # (its stub lacks the config entries)
        arenas = "cpu:0;gpu:0" if self.provider == "CUDAExecutionProvider" else "cpu:0"
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", arenas)
        self._grown_at: float | None = None  # (monotonic) the last large run, until its growth is handed back
        # Rows of state axis 1 per batch item: 1 for [L, "batch", H], features for [L, "batch*features", H].
        self.state_rows: dict[str, int] = {s.input: self._state_shape(s, 1)[1] for s in self.states}

    def _check_graph(self) -> None:
        """The graph must have every tensor the manifest declares (a mismatched export fails at load time)."""
        graph_in = {i.name for i in self.session.get_inputs()}
        graph_out = set(self.output_names)
        missing = [t.name for t in self.manifest.inputs if t.name not in graph_in]
        missing += [t.name for t in self.manifest.outputs if t.name not in graph_out]
        if missing:
            raise ValueError(
                f"model.onnx lacks tensors declared in manifest.json: {missing} "
                f"(graph inputs {sorted(graph_in)}, outputs {sorted(graph_out)}); re-export the model"
            )
        known = {t.name for t in self.manifest.inputs} | {st.input for st in self.manifest.states}
        undeclared = sorted(graph_in - known)
        if undeclared:  # (found by the warm-up run before, whose advice was to re-export: the manifest is at fault)
            raise ValueError(
                f"model.onnx takes inputs that manifest.json does not declare: {undeclared}; declare each in the "
                "manifest (an input, or a state with its input and output), or copy the manifest from the same "
                "export as the graph"
            )
        # Dtypes, ranks and the sizes the manifest fixes (numbers, and symbols such as features or vocab) must be
        # the graph's too: a graph from another export under this manifest would load, then fail every request.
        args = {a.name: a for a in (*self.session.get_inputs(), *self.session.get_outputs())}
        declared = [(t.name, t.dtype, t.shape) for t in (*self.manifest.inputs, *self.manifest.outputs)]
        for st in self.manifest.states:
            declared += [(st.input, st.dtype, st.shape), (st.output, st.dtype, st.shape)]
        problems = []
        for name, dtype, shape in declared:
            arg = args.get(name)
            if arg is None:
                continue  # a state the graph does not expose is the states check's business
            if arg.type != _ORT_TYPES[dtype]:
                problems.append(f"{name} is {arg.type} in the graph, {dtype} in the manifest")
                continue
            if not isinstance(arg.shape, list) or not arg.shape:
                continue  # a rank the graph does not state
            if len(arg.shape) != len(shape):
                problems.append(f"{name} has rank {len(arg.shape)} in the graph, {len(shape)} in the manifest")
                continue
            for axis, (want, got) in enumerate(zip(shape, arg.shape, strict=True)):
                size = self._fixed(want)
                if size is not None and isinstance(got, int) and got > 0 and got != size:
                    named = f"{want} = {size}" if isinstance(want, str) else str(size)  # (128 = 128 read as a slip)
                    problems.append(f"{name} axis {axis} is {got} in the graph, {named} in the manifest")
        if problems:
            raise ValueError(
                f"model.onnx does not match manifest.json: {'; '.join(problems)}; it is from another export: copy "
                "the two files together"
            )

    def _fixed(self, dim: Dim) -> int | None:
        """A manifest dimension's size when the manifest fixes it (a number, or symbols it defines), else None."""
        if isinstance(dim, int):
            return dim
        try:
            return resolve_shape([dim], self.symbols)[0]
        except ValueError:  # batch, time: free
            return None

    def _state_shape(self, spec: StateSpec, batch: int) -> tuple[int, ...]:
        return resolve_shape(spec.shape, {**self.symbols, "batch": batch})

    def zero_states(self, batch: int) -> dict[str, Array]:
        """Initial state of every declared state input: zeros, ``[layers*dirs, batch(*features), hidden]``."""
        return zero_states(self.states, {**self.symbols, "batch": batch})

    def run(self, feeds: dict[str, Array], batch: int) -> dict[str, Array]:
        """Runs one batch. ``feeds`` holds the model inputs; missing state inputs get zeros for ``batch`` rows.

        Returns every graph output by name (state outputs under their output names, e.g. ``hn``).
        """
        feeds = dict(feeds)
        for s in self.states:
            if s.input not in feeds:
                feeds[s.input] = np.zeros(self._state_shape(s, batch), dtype=DTYPES[s.dtype])
        outputs = self.session.run(self.output_names, feeds, self._arena_options(feeds))
        return dict(zip(self.output_names, outputs, strict=True))

    @property
    def trim_due(self) -> bool:
        """A large run's arena growth is waiting to be handed back (no run has come since to do it)."""
        return self._grown_at is not None and time.monotonic() - self._grown_at >= SHRINK_IDLE_SECONDS

    def _arena_options(self, feeds: dict[str, Array]) -> Any:
        """A large run grows ONNX Runtime's memory arena to its peak, which the arena keeps for good (one 256-text
        x 128-word Classify: +380 MiB per sentiment version). The first run ``SHRINK_IDLE_SECONDS`` after the last
        large one hands that growth back (freeing it costs that run ~25 ms, once), or the data plane's trim when
        no run comes (``trim_due``); large runs in a row keep it (shrinking after each cost them 30-55%: their
        pages faulted in again)."""
        if self.trim_due:
            self._grown_at = None  # (this run's own growth, large or not, goes with it)
            return self._shrink
        if sum(v.size for k, v in feeds.items() if k not in self._state_inputs) >= SHRINK_AFTER_ELEMENTS:
            self._grown_at = time.monotonic()
        return None


_ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "int32": "tensor(int32)", "bool": "tensor(bool)"}


def load_runtime(manifest: Manifest, path: Path, settings: Settings, symbols: dict[str, int]) -> Runtime:
    """Builds the runtime, turning ORT's exceptions into a readable ``ModelUnavailable`` reason."""
    providers = select_providers(settings.device)
    try:
        runtime = Runtime(manifest, path, settings, providers, symbols)
    except ValueError:
        raise
    except Exception as exc:  # ORT raises its own exception types for broken graphs
        raise ValueError(f"onnxruntime could not load {path}: {exc}") from exc
    if settings.device == "cuda" and runtime.provider != CUDA:
        # onnxruntime-gpu silently falls back to CPU when CUDA/cuDNN libraries are missing.
        raise ModelUnavailable(
            f"device='cuda' was requested but ONNX Runtime placed the model on {runtime.provider}; check the "
            "CUDA and cuDNN libraries onnxruntime-gpu needs, or set SEQSERVE_DEVICE=auto"
        )
    return runtime
