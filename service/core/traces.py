"""Triton's trace extension: a sample of inference requests traced into Triton's JSON trace file (transport-free).

Settings, by Triton's names (strings on the wire; ``trace_level`` a list): ``trace_file``, ``trace_level`` (OFF,
or TIMESTAMPS and/or TENSORS), ``trace_rate`` (every N-th request), ``trace_count`` (traces still to take; -1 = no
limit; counts down), ``log_frequency`` (write every N traces into ``<trace_file>.<i>``; 0 = the whole array into
``<trace_file>`` when the server stops or the file setting changes). The server's settings start as the
``TRACE_*`` settings; a model may set any of its own, and follows the server's for the rest (a later change of
the server's included). Clearing a setting (no value) sends a model's back to the server's and the server's back
to its start-up value, as Triton does.

A traced request (``stats.CountedRequest``: one per request, whatever the API) gets a ``Trace``; the batcher
stamps each of its model runs. What a trace holds, as Triton writes it (``ns``: the monotonic clock, the same in
every process of the server):

- an object with ``id``, ``model_name``, ``model_version`` and ``request_id`` (the request id of our logs), and
  ``traceparent`` when the caller sent a valid W3C one (``service/tracing.py``);
- TIMESTAMPS: one object per timestamp: ``REQUEST_START``, then per model run ``QUEUE_START``,
  ``COMPUTE_START``, ``COMPUTE_INPUT_END``, ``COMPUTE_OUTPUT_START``, ``COMPUTE_END`` (a generation or a prompt
  fed in pieces has several runs), then ``REQUEST_END``. The gRPC and HTTP frontends' own timestamps (Triton's
  ``GRPC_WAITREAD_*``, ``HTTP_*``) are not recorded: with ``--workers N`` those happen in other processes;
- TENSORS: per run, the graph's feeds (``TENSOR_QUEUE_INPUT``: inputs and recurrent state of this request's rows)
  and its results (``TENSOR_BACKEND_OUTPUT``), each ``{"name", "data", "shape", "dtype"}``.

Files are written by a thread of their own, never on the event loop. The trace file is where the server writes
at a caller's word: callers may name one only inside ``TRACE_DIR`` (unset: the file is set at start only).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.errors import InvalidInput, echo
from service.logs import CALL

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger(__name__)

NAMES = ("trace_file", "trace_level", "trace_rate", "trace_count", "log_frequency")
LEVELS = ("TIMESTAMPS", "TENSORS")
OFF = ("OFF",)
_INTEGERS = {"trace_rate": 1, "trace_count": -1, "log_frequency": 0}  # setting -> least value
MAX_TRACE_INTEGER = 2**31 - 1
_KINDS = {"f": "FP", "i": "INT", "u": "UINT"}
KEPT_BYTES = 64 * 1024 * 1024  # what one file keeps for the end (log_frequency 0); later traces are dropped, warned


def parse_level(values: Iterable[str]) -> tuple[str, ...]:
    """A trace level as given (one or more names): OFF alone, or TIMESTAMPS and/or TENSORS; InvalidInput else."""
    levels: list[str] = []
    for value in values:
        name = str(value).strip().upper()
        if name and name not in levels:
            levels.append(name)
    for name in levels:
        if name not in (*OFF, *LEVELS):
            raise InvalidInput(f"trace_level {echo(name)} is not a level; give OFF, or TIMESTAMPS and/or TENSORS")
    if not levels:
        raise InvalidInput("trace_level names no level; give OFF, or TIMESTAMPS and/or TENSORS")
    if "OFF" in levels and len(levels) > 1:
        raise InvalidInput(f"trace_level {','.join(levels)}: OFF goes alone (it turns tracing off)")
    return tuple(levels)


def datatype(dtype: np.dtype[Any]) -> str:
    """A numpy dtype's v2 datatype name (FP32, INT64, BOOL, BYTES, ...)."""
    if dtype.kind == "b":
        return "BOOL"
    if dtype.kind in _KINDS:
        return f"{_KINDS[dtype.kind]}{dtype.itemsize * 8}"
    return "BYTES"


def tensor_entry(name: str, array: np.ndarray[Any, Any]) -> dict[str, str]:
    """One tensor as Triton's TENSORS trace writes it (numbers at their dtype's shortest exact form)."""
    values = array.ravel()
    data = ",".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values)
    return {"name": name, "data": data, "shape": ",".join(str(d) for d in array.shape), "dtype": datatype(array.dtype)}


@dataclass(eq=False, slots=True)
class Trace:
    """One traced request: its timestamps and tensors, in the order they happened."""

    id: int
    model: str
    version: int
    request_id: str
    file: str
    log_frequency: int
    timestamps: bool
    tensors: bool
    traceparent: str = ""  # the caller's W3C trace context, when it sent one (joins its distributed trace)
    stamps: list[tuple[str, int]] = field(default_factory=list)
    activities: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    ended: bool = False  # REQUEST_END is stamped: a run that ends later (its request's deadline passed) is not its

    def stamp(self, name: str, ns: int | None = None) -> None:
        if self.timestamps and not self.ended:
            self.stamps.append((name, time.perf_counter_ns() if ns is None else ns))

    def end(self) -> None:
        """The request ended (answered, failed or cancelled): REQUEST_END, and nothing after it. A batch that held a
        request whose deadline passed meanwhile ends after it, in another thread; Triton writes no run after
        REQUEST_END, and ``summarize`` would read one as a negative rest."""
        self.stamp("REQUEST_END")
        self.ended = True

    def run(self, times: tuple[int, int, int, int]) -> None:
        """One model run of this request (its QUEUE_START was stamped when it queued): compute start, input end,
        output start, end."""
        if self.timestamps and not self.ended:
            start, input_end, output_start, end = times
            self.stamps += [
                ("COMPUTE_START", start),
                ("COMPUTE_INPUT_END", input_end),
                ("COMPUTE_OUTPUT_START", output_start),
                ("COMPUTE_END", end),
            ]

    def tensor(self, activity: str, arrays: Mapping[str, np.ndarray[Any, Any]]) -> None:
        if self.tensors and not self.ended:
            self.activities += [(activity, tensor_entry(name, a)) for name, a in arrays.items()]

    def size(self) -> int:
        """Bytes the trace takes in memory and in its file, roughly (its tensors' text, mostly)."""
        size = 120 * (1 + len(self.stamps))
        return size + sum(len(t["data"]) + 120 for _, t in self.activities) if self.activities else size

    def header(self) -> dict[str, Any]:
        """Triton's first object of a trace, and the caller's ``traceparent`` when it sent one."""
        head = {"id": self.id, "model_name": self.model, "model_version": self.version, "request_id": self.request_id}
        return head | {"traceparent": self.traceparent} if self.traceparent else head

    def json(self) -> str:
        """The trace as Triton's JSON objects, comma-separated: its header, one object per timestamp, one per tensor
        (timestamps are formatted here, ~3x cheaper than ``json.dumps``: a name is one of ours, ``ns`` an int; the
        caller's strings go through ``json.dumps``)."""
        head = json.dumps(self.header())
        stamps = [f'{{"id":{self.id},"timestamps":[{{"name":"{n}","ns":{ns}}}]}}' for n, ns in self.stamps]
        tensors = [json.dumps({"id": self.id, "activity": a, "tensor": t}) for a, t in self.activities]
        return ",".join([head, *stamps, *tensors])


@dataclass
class _Sink:
    """The traces collected for one file and not written yet; ``index``: the next numbered file's."""

    traces: list[Trace] = field(default_factory=list)
    index: int = 0
    numbered: bool = False  # its traces' log_frequency was above 0
    bytes: int = 0  # what ``traces`` take (``Trace.size``)
    warned: bool = False  # traces past KEPT_BYTES were dropped (log_frequency 0), and the log said so


class Tracer:
    """The trace settings (the server's, and each model's own) and the traces they collect. Used on the event loop
    (requests start and finish there); files are written by one thread of its own."""

    def __init__(
        self,
        trace_file: str = "",
        trace_level: Iterable[str] = OFF,
        trace_rate: int = 1000,
        trace_count: int = -1,
        log_frequency: int = 0,
        trace_dir: str = "",
        engine: int = 0,
        engines: int = 1,
    ) -> None:
        """``engine`` of ``engines`` (several engines share the server): engine 1 (index 0) writes the trace files
        it is told, engine N writes ``<file>.engineN`` (``<file>.engineN.<i>`` with ``log_frequency``); trace ids
        are unique across the engines."""
        self.folder = Path(trace_dir).resolve() if trace_dir else None
        self._initial: dict[str, Any] = {
            "trace_file": trace_file,
            "trace_level": parse_level(trace_level),
            "trace_rate": trace_rate,
            "trace_count": trace_count,
            "log_frequency": log_frequency,
        }
        self._server: dict[str, Any] = dict(self._initial)
        self._models: dict[str, dict[str, Any]] = {}  # a model's own settings (only those it set)
        self._seen: dict[str | None, int] = {}  # requests since the last trace, per settings (a model's, or None)
        self._ids = itertools.count(engine + 1, engines)
        self._suffix = f".engine{engine + 1}" if engine else ""
        self._sinks: dict[str, _Sink] = {}
        self._writer: ThreadPoolExecutor | None = None
        self.active = self._any_on()  # read per request: nothing more is done while every level is OFF

    @classmethod
    def from_settings(cls, settings: Settings, engine: int = 0, engines: int = 1) -> Tracer:
        """The server's start-up trace settings (``TRACE_*``)."""
        return cls(
            settings.trace_file,
            settings.trace_level,
            settings.trace_rate,
            settings.trace_count,
            settings.trace_log_frequency,
            settings.trace_dir,
            engine,
            engines,
        )

    # --- settings -------------------------------------------------------------------------------------------
    def settings(self, model: str | None = None) -> dict[str, list[str]]:
        """The settings in force for ``model`` (None: the server's), as the trace extension answers them."""
        now = self._server if model is None else {**self._server, **self._models.get(model, {})}
        return {name: list(now[name]) if name == "trace_level" else [str(now[name])] for name in NAMES}

    def update(self, model: str | None, changes: Mapping[str, list[str] | None]) -> dict[str, list[str]]:
        """Applies ``changes`` (None or an empty list: clear that setting) for ``model`` (None: the server's) once all
        are valid (InvalidInput says what to fix, and nothing changes); returns the settings now in force there."""
        for name in changes:
            if name not in NAMES:
                raise InvalidInput(f"{echo(name)} is no trace setting; the settings are {', '.join(NAMES)}")
        parsed = {name: self._parse(name, values) if values else None for name, values in changes.items()}
        own = dict(self._server if model is None else self._models.get(model, {}))
        for name, value in parsed.items():
            if value is not None:
                own[name] = value
            elif model is None:
                own[name] = self._initial[name]
            else:
                own.pop(name, None)
        server = own if model is None else self._server
        models = dict(self._models)
        if model is not None:
            if own:
                models[model] = own
            else:
                models.pop(model, None)
        scopes: list[tuple[str | None, dict[str, Any]]] = [(None, server)]
        scopes += [(m, {**server, **s}) for m, s in models.items()]
        for who, settings in scopes:
            if settings["trace_level"] != OFF and not settings["trace_file"]:
                where = "the server" if who is None else f"model {echo(who)}"
                raise InvalidInput(f"trace_level is {','.join(settings['trace_level'])} for {where} but no trace_file "
                                   "is set: set trace_file too")  # fmt: skip
        before = self._files()
        self._server, self._models = server, models
        if "trace_rate" in parsed:
            self._seen.pop(model, None)
        for gone in before - self._files():  # a file no settings name any more: what it collected is written now
            self._flush(gone + self._suffix)
        self.active = self._any_on()
        return self.settings(model)

    def _parse(self, name: str, values: list[str]) -> Any:
        if name == "trace_level":
            return parse_level(values)
        if len(values) != 1:
            raise InvalidInput(f"{name} takes one value, not {len(values)}")
        value = values[0].strip()
        if name == "trace_file":
            return self._file(value)
        least = _INTEGERS[name]
        try:
            number = int(value)
        except ValueError:
            raise InvalidInput(f"{name} {echo(value)} is not a whole number") from None
        if number < least:
            raise InvalidInput(f"{name} is {number}; it must be at least {least}")
        if number > MAX_TRACE_INTEGER:  # (Triton reads them as 32-bit integers; a 23-digit rate was taken)
            raise InvalidInput(f"{name} is {number}; it must be at most {MAX_TRACE_INTEGER}")
        return number

    def _file(self, value: str) -> str:
        """A trace file a caller named: the start-up one, or one inside ``TRACE_DIR`` whose folder exists."""
        if value == self._initial["trace_file"]:
            return value
        if not value:
            raise InvalidInput("trace_file is empty: name the file (clear the setting to go back to the server's)")
        if self.folder is None:
            raise InvalidInput(
                "trace_file can be set at start only (SEQSERVE_TRACE_FILE) on this server; to let callers name "
                "files, start it with SEQSERVE_TRACE_DIR set to the folder they may write into"
            )
        if "\0" in value:  # (no file name holds one; the OS refuses it)
            raise InvalidInput(f"trace_file {echo(value)} contains a NUL character; name a file in {self.folder}")
        if not value.isprintable():  # (a new line or an escape in a file name: allowed by the OS, a trap for its users)
            raise InvalidInput(f"trace_file {echo(value)} contains a control character; name a file in {self.folder}")
        if any(len(part.encode()) > 255 for part in Path(value).parts):  # (the OS refuses it at the first write)
            raise InvalidInput(
                f"trace_file {echo(value)}: a file or folder name is longer than 255 bytes; name a file in "
                f"{self.folder}"
            )
        try:
            path = (self.folder / value).resolve()  # (an absolute name stays itself; symbolic links are followed)
            inside = path.is_relative_to(self.folder) and path != self.folder
            parent_exists = inside and path.parent.is_dir()
        except (OSError, RuntimeError) as exc:  # a name too long for the OS, a loop of symbolic links
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "a loop of symbolic links"
            raise InvalidInput(
                f"trace_file {echo(value)} cannot be used ({why}); name a file in {self.folder}"
            ) from None
        if not inside:
            raise InvalidInput(f"trace_file {echo(value)} is outside TRACE_DIR ({self.folder}); name a file in it")
        if not parent_exists:
            raise InvalidInput(f"trace_file {echo(value)}: its folder {echo(str(path.parent))} does not exist")
        return str(path)

    def _files(self) -> set[str]:
        return {self._server["trace_file"], *(s["trace_file"] for s in self._models.values() if "trace_file" in s)}

    def _any_on(self) -> bool:
        levels = [self._server["trace_level"], *(s.get("trace_level", self._server["trace_level"])
                                                 for s in self._models.values())]  # fmt: skip
        return any(level != OFF for level in levels)

    # --- traces ---------------------------------------------------------------------------------------------
    def start(self, model: str, version: int) -> Trace | None:
        """A trace for this request when it is one the settings sample (callers check ``active`` first)."""
        own = self._models.get(model)
        settings = self._server if own is None else {**self._server, **own}
        level = settings["trace_level"]
        if level == OFF:
            return None
        counter = own if own is not None and "trace_count" in own else self._server
        if counter["trace_count"] == 0:
            return None
        key = None if own is None else model
        seen = self._seen.get(key, 0) + 1
        if seen < settings["trace_rate"]:
            self._seen[key] = seen
            return None
        self._seen[key] = 0
        if counter["trace_count"] > 0:
            counter["trace_count"] -= 1
        request_id, _, traceparent = CALL.get()
        trace = Trace(
            next(self._ids),
            model,
            version,
            request_id,
            settings["trace_file"] + self._suffix,
            settings["log_frequency"],
            "TIMESTAMPS" in level,
            "TENSORS" in level,
            traceparent,
        )
        trace.stamp("REQUEST_START")
        return trace

    def finish(self, trace: Trace) -> None:
        """A traced request ended: its trace joins its file's, which is written every ``log_frequency`` traces."""
        trace.end()
        sink = self._sinks.get(trace.file)
        if sink is None:
            sink = self._sinks[trace.file] = _Sink()
        sink.numbered = trace.log_frequency > 0
        size = trace.size()
        if not sink.numbered and sink.bytes + size > KEPT_BYTES:
            if not sink.warned:
                sink.warned = True
                log.warning("trace file %s keeps %d MiB of traces until the server stops (log_frequency 0); later "
                            "ones are dropped: set log_frequency to write them as they come", trace.file,
                            KEPT_BYTES >> 20)  # fmt: skip
            return
        sink.traces.append(trace)  # (turned into JSON by the writer thread)
        sink.bytes += size
        if trace.log_frequency and len(sink.traces) >= trace.log_frequency:
            self._write(f"{trace.file}.{sink.index}", sink.traces)
            sink.traces, sink.bytes, sink.index = [], 0, sink.index + 1

    def _flush(self, file: str) -> None:
        """Writes what ``file`` collected (its numbered file, or the whole array) and forgets it (a file set again
        numbers from 0, as in Triton). ``file``: as this engine writes it (with its suffix)."""
        sink = self._sinks.pop(file, None)
        if sink is None:
            return
        if not sink.numbered:
            self._write(file, sink.traces)
        elif sink.traces:
            self._write(f"{file}.{sink.index}", sink.traces)

    def _write(self, path: str, traces: list[Trace]) -> None:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="seqserve-trace")
        self._writer.submit(_write_file, path, traces)

    def close(self) -> None:
        """Writes every trace collected (the server stops) and waits for the files."""
        for file in list(self._sinks):
            self._flush(file)
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None


def _write_file(path: str, traces: list[Trace]) -> None:
    """One JSON array of every trace's objects, written whole (a reader never sees half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        text = "[" + ",".join(trace.json() for trace in traces) + "]"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        log.error("could not write the trace file %s (%s); %d traces lost", path, exc, len(traces))
        with contextlib.suppress(OSError):  # (a part written to a full disk kept it full)
            os.unlink(tmp)


def summarize(entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per model version, the mean of its traced requests (``seqserve traces``): microseconds of the whole request,
    of its queueing and of its runs' input, infer and output parts (summed over its runs), and what is left
    (``other``: the core's own work around the runs); and the median and 99th percentile of the whole request.
    Entries of one trace may come from several files. A step still queued when its request ended (a deadline, a
    client gone) queued until that end; a run that ended after it (in a file of an earlier release) is left out."""
    traces: dict[int, dict[str, Any]] = {}
    for entry in entries:
        trace = traces.setdefault(int(entry["id"]), {"head": None, "stamps": {}})
        if "model_name" in entry:
            trace["head"] = (str(entry["model_name"]), int(entry["model_version"]))
        for stamp in entry.get("timestamps", ()):
            trace["stamps"].setdefault(stamp["name"], []).append(int(stamp["ns"]))
    models: dict[tuple[str, int], dict[str, float]] = {}
    requests: dict[tuple[str, int], list[float]] = {}
    for trace in traces.values():
        stamps: dict[str, list[int]] = trace["stamps"]
        if trace["head"] is None or "REQUEST_START" not in stamps or "REQUEST_END" not in stamps:
            continue  # (TENSORS only, or a file missing)
        sums = models.setdefault(trace["head"], dict.fromkeys(_PARTS, 0.0))
        sums["traces"] += 1
        parts = _parts(stamps)
        requests.setdefault(trace["head"], []).append(parts["request_us"])
        for part, value in parts.items():
            sums[part] += value
    out = []
    for (name, version), sums in sorted(models.items()):
        n = sums["traces"]
        row: dict[str, Any] = {"model": name, "version": version, "traces": int(n)}
        row |= {part: round(sums[part] / n, 1) for part in _PARTS[1:]}
        row["other_us"] = round(row["request_us"] - sum(row[p] for p in _PARTS[3:]), 1)
        p50, p99 = np.percentile(requests[(name, version)], [50, 99])
        row |= {"request_p50_us": round(float(p50), 1), "request_p99_us": round(float(p99), 1)}
        out.append(row)
    return out


_PARTS = ("traces", "runs", "request_us", "queue_us", "input_us", "infer_us", "output_us")
_RUN = ("COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END")


def _parts(stamps: Mapping[str, list[int]]) -> dict[str, float]:
    """One trace's runs (a count) and microseconds of the request, its queueing and its runs' parts. A run's four
    stamps are written together, so the n-th of each name are one run's; each run's QUEUE_START is the earliest
    one not yet taken (steps of one request queue in order). A QUEUE_START left over queued until REQUEST_END."""
    start, end = min(stamps["REQUEST_START"]), max(stamps["REQUEST_END"])
    runs = [r for r in zip(*(sorted(stamps.get(name, ())) for name in _RUN), strict=False) if r[3] <= end]
    queued = sorted(q for q in stamps.get("QUEUE_START", ()) if q <= end)
    queue = 0
    for run in runs:  # (a run that queued for nothing, as a warm-up's, has no QUEUE_START: then none is taken)
        if queued and queued[0] <= run[0]:
            queue += run[0] - queued.pop(0)
    queue += sum(end - q for q in queued)
    return {
        "runs": len(runs),
        "request_us": (end - start) / 1000,
        "queue_us": queue / 1000,
        "input_us": sum(r[1] - r[0] for r in runs) / 1000,
        "infer_us": sum(r[2] - r[1] for r in runs) / 1000,
        "output_us": sum(r[3] - r[2] for r in runs) / 1000,
    }
