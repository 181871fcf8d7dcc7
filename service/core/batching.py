"""Dynamic batching, MLServer/TGI style: per model version one queue, one task that flushes a batch when it
holds ``max_batch_size`` rows or its oldest request has waited ``max_batch_delay_ms``, one Future per request.

The wait is adaptive: a batch also flushes as soon as it holds as many rows as the largest of the previous
``RECENT_BATCHES`` batches of the same key. A lone stream therefore never waits (each generation step runs at
once), while N concurrent streams keep meeting in batches of N; ``max_batch_delay_ms`` bounds the wait when some
of them are late. (With only the previous batch as the guide, unary calls on a busy loop settled into batches of
2-4 and stayed there: one small batch made the next one small.) Requests that arrive while a batch runs form the
next one (continuous batching).

Requests are merged only when their ``key`` is equal. Stateful steps use the time length as key, so every
generation step (length 1) of concurrent streams shares one ORT run: their states are concatenated on the
batch axis (axis 1 of ``[layers*dirs, batch, hidden]``), run once, and split back (TGI's ``concatenate`` /
``filter``). When a batch of several requests fails, each runs again alone: only a request that fails by itself
gets the error.

Small, quick batches (at most ``inline_batch_tokens`` rows x time steps, and the model's last run of that many
took at most ``inline_batch_ms``: every generation step) run ORT inline on the event loop: a one-thread ORT step
costs less than the hop to a worker thread and back (~50-100 µs of Python and GIL hand-offs). Bigger or slower
batches (long prompts, classify batches of several sentences) run in a worker thread so the loop serves other
calls meanwhile. A batch that took every request queued and is not full has no such calls to serve (the requests
of the next batch are not here yet): it stays inline up to ``alone_inline_ms``, as a lone request does
(``Batcher._inline_limit``; a 16-row step of the 2x512 ``charlm/2`` takes ~1-1.6 ms).
Waiting for company never creates a task or a timeout wrapper per batch: one ``call_later`` wakes the loop.

Priority levels (Triton's schedule policy, ``PRIORITY_LEVELS`` > 0): the queue is ordered by level, then by age. A
request of a higher level (a lower number: the caller's ``context.priority()``, else ``DEFAULT_PRIORITY_LEVEL``)
goes ahead of every waiting request of a lower level, so the next batch takes it first. With one level the queue
is first come, first served, and queueing costs one append.

Requests right-padded to their batch's longest (``StepInput.pad``: sentiment texts) would make the recurrent
kernels compute every padded step of every shorter row; a batch of them runs as several ORT runs of similar
lengths when that saves enough padded steps (``padding_groups``, ``pad_split_tokens``). Each run is one execution
in the statistics.

A lone request skips the queue altogether (``Batcher._alone``): when nothing is queued or running, the recent
batches of its key held one request each, no other callback is ready in this loop iteration (so nothing can join
before the batch would flush anyway) and it is small enough to run inline, it runs at once on the caller's
coroutine: no Future, no wake-up of the flush task, no loop iteration spent looking for company. It leaves a no-op
callback on the loop's run queue, so a caller's next step in the same loop iteration is not alone and queues
(yielding there): a caller looping over steps never holds the loop for more than one step. That is a typing
client's keystroke or a lone stream's step. Requests that arrive together, or while a batch runs, still queue and
merge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from service.core.aio import cancel_and_wait
from service.core.context import Runs, note_run, priority
from service.core.runtime import Array, Runtime
from service.core.stats import StatsBook
from service.errors import RETRY_SOON, ModelUnavailable, Overloaded
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)
RECENT_BATCHES = 8  # the company a batch waits for: the most rows among this many previous batches of its key


def _next_iteration() -> None:
    """The no-op a queue-skipping run leaves on the loop (``Batcher.submit``)."""


def _detached(exc: BaseException) -> BaseException:
    """A run's exception as its callers get it: without the traceback of the flush task's frames (logged here
    already). The callers' edge clears the frames of a failed call's traceback (``traceback.clear_frames``, to free
    a large request at once), and clearing a frame of a coroutine that is still suspended closes it: the flush
    task's own frames were in that traceback, so one failed batch closed the flush task ("cannot reuse already
    awaited coroutine") and every later request of the model waited forever."""
    return exc.with_traceback(None)


@dataclass
class StepInput:
    """One request's rows. ``inputs``: model inputs with batch axis 0 (``rows`` long). ``states``: by graph
    input name, batch axis 1 (``rows * state_rows`` long); None = zero states. Inputs named in ``pad`` are
    right-padded on axis 1 (time) with that value to the longest in the batch."""

    inputs: dict[str, Array]
    rows: int
    states: dict[str, Array] | None = None
    key: Hashable = None
    pad: dict[str, int | float] = field(default_factory=dict)
    admitted: bool = False  # a later step of an admitted stream: never refused for a full queue
    derive: bool = False  # wants the batcher's derived outputs (``Batcher.derive``); a batch computes them only then
    runs: Runs | None = None  # the request's counter (statistics: its runs' times; its trace, stamped per run)
    request: bool = True  # counts as a request in the metrics (a request sent as several items counts once)


@dataclass
class StepOutput:
    """One request's share of the batch result: non-state outputs (batch axis 0) and the new states keyed by
    their graph *input* names, ready to be fed back (batch axis 1)."""

    outputs: dict[str, Array]
    states: dict[str, Array]


@dataclass
class _Pending:
    item: StepInput
    future: asyncio.Future[StepOutput]
    enqueued: float
    level: int = 0  # priority level (1 = highest; with one level, all 0): the queue is ordered by it, then by age


def concatenate(items: list[StepInput], runtime: Runtime) -> tuple[dict[str, Array], int]:
    """Feeds for one ORT run over all ``items``, and the total row count (one item: its own arrays, uncopied)."""
    if len(items) == 1:
        (it,) = items
        own = dict(it.inputs)
        if it.states is not None:
            own.update((name, it.states[name]) for name in runtime.state_rows)
        return own, it.rows
    feeds: dict[str, Array] = {}
    for name in items[0].inputs:
        parts = [it.inputs[name] for it in items]
        if name in items[0].pad and any(p.shape[1] != parts[0].shape[1] for p in parts):
            # Right-pad axis 1 (time) to the longest: one filled array, each part copied into its rows
            # (np.pad per part cost ~25 us each).
            longest = max(p.shape[1] for p in parts)
            first = parts[0]
            out = np.full((sum(p.shape[0] for p in parts), longest, *first.shape[2:]), items[0].pad[name], first.dtype)
            row = 0
            for p in parts:
                out[row : row + p.shape[0], : p.shape[1]] = p
                row += p.shape[0]
            feeds[name] = out
            continue
        feeds[name] = np.concatenate(parts, axis=0)
    if any(it.states is not None for it in items):
        for name in runtime.state_rows:
            parts = [it.states[name] if it.states is not None else runtime.zero_states(it.rows)[name] for it in items]
            feeds[name] = np.concatenate(parts, axis=1)
    return feeds, sum(it.rows for it in items)


def _padded_length(item: StepInput) -> int:
    name = next(iter(item.pad))
    return int(item.inputs[name].shape[1])


def padding_groups(items: list[StepInput], min_saving: int) -> list[list[int]]:
    """Indices of ``items`` per ORT run. Padded requests (``StepInput.pad``) are sorted by length and split where
    it saves the most padded rows x time steps, recursively, while a split saves at least ``min_saving`` of them
    and a quarter of its group's; anything else is one run in arrival order."""
    if min_saving <= 0 or len(items) < 2 or not all(it.pad for it in items):
        return [list(range(len(items)))]
    return length_groups([_padded_length(it) for it in items], [it.rows for it in items], min_saving)


def length_groups(sizes: list[int], weights: list[int], min_saving: int) -> list[list[int]]:
    """``padding_groups``' rule on lengths: indices of ``sizes`` (each ``weights`` rows of that length) per run,
    sorted by length and split where that saves the most padded rows x steps (``min_saving`` and a quarter of the
    group's at least); one group in the given order when no split does."""
    if min_saving <= 0 or len(sizes) < 2:
        return [list(range(len(sizes)))]
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    lengths = [sizes[i] for i in order]
    rows = [weights[i] for i in order]

    def split_at(lo: int, hi: int) -> list[tuple[int, int]]:
        """[lo, hi) of the sorted order as runs."""
        total_rows = sum(rows[lo:hi])
        padded = lengths[hi - 1] * total_rows
        best, best_k, before = padded, 0, 0
        for k in range(lo + 1, hi):  # rows[lo:k] padded to lengths[k-1], rows[k:hi] to lengths[hi-1]
            before += rows[k - 1]
            cost = lengths[k - 1] * before + lengths[hi - 1] * (total_rows - before)
            if cost < best:
                best, best_k = cost, k
        saving = padded - best
        if best_k == 0 or saving < min_saving or saving * 4 < padded:
            return [(lo, hi)]
        return split_at(lo, best_k) + split_at(best_k, hi)

    runs = split_at(0, len(order))
    return [list(range(len(sizes)))] if len(runs) == 1 else [order[lo:hi] for lo, hi in runs]


def split(outputs: dict[str, Array], items: list[StepInput], runtime: Runtime) -> list[StepOutput]:
    """Inverse of ``concatenate``: each item's rows of every output (copies, so nothing aliases the batch; one
    item gets the run's own output arrays, which nothing else holds)."""
    state_out = {s.output: s.input for s in runtime.states}
    if len(items) == 1:
        outs = {k: v for k, v in outputs.items() if k not in state_out}
        return [StepOutput(outs, {in_name: outputs[out_name] for out_name, in_name in state_out.items()})]
    results: list[StepOutput] = []
    start = 0
    for it in items:
        stop = start + it.rows
        outs = {k: v[start:stop].copy() for k, v in outputs.items() if k not in state_out}
        states = {}
        for out_name, in_name in state_out.items():
            r = runtime.state_rows[in_name]
            states[in_name] = outputs[out_name][:, start * r : stop * r].copy()
        results.append(StepOutput(outs, states))
        start = stop
    return results


class Batcher:
    """The queue and flush task of one model version."""

    def __init__(
        self, name: str, version: int, runtime: Runtime, settings: Settings, metrics: Metrics, stats: StatsBook
    ) -> None:
        self.name, self.version, self.runtime, self.stats = name, version, runtime, stats
        self._state_outputs = {s.input: s.output for s in runtime.states}  # (a traced run's outputs by graph name)
        self.max_rows = settings.max_batch_size
        self.delay = settings.max_batch_delay_ms / 1000.0
        self.max_queue = settings.max_queue_size
        self.inline_tokens = settings.inline_batch_tokens
        self.inline_seconds = settings.inline_batch_ms / 1000.0
        self.alone_seconds = max(settings.alone_inline_ms, settings.inline_batch_ms) / 1000.0
        self.pad_split = settings.pad_split_tokens
        # Priority levels (Triton's schedule policy): a request waits behind those of its level and higher only.
        self.levels = settings.priority_levels
        self.default_level = settings.default_level
        self._infer_seconds: dict[int, float] = {}  # tokens -> ORT seconds of the last batch that size (inlinable)
        self.metrics = metrics
        self._pending: deque[_Pending] = deque()
        self.instances = settings.model_instances
        self._running = 0  # batches running now (inline or in a worker thread), at most ``instances``
        self._runs: dict[asyncio.Task[None], list[_Pending]] = {}  # instances > 1: batches beside the flush task
        self._slot = asyncio.Event()  # a run ended: the flush task may start another
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Rows of the last few batches per key that several requests shared (1 for a request alone, whatever its
        # rows): how much company to expect (the largest of them).
        self._last_rows: dict[Hashable, deque[int]] = {}
        # Outputs the task derives from every batch's outputs at once (batch axis 0), split per request like the
        # model's own: a char LM's next-character probabilities are one softmax per batch, not one per request.
        # Computed only for batches where some request asks (``StepInput.derive``).
        self.derive: Callable[[dict[str, Array]], dict[str, Array]] | None = None

    def _queue_length(self) -> int:  # also read by the queue depth gauge at scrape time (another thread)
        return len(self._pending)

    @property
    def pending(self) -> int:
        """Requests waiting in the queue now."""
        return self._queue_length()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.name}-{self.version}")
            self.metrics.watch_queue(self.name, self.version, self._queue_length)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        for run, batch in list(self._runs.items()):  # a run cancelled before it began cannot fail its own requests
            await cancel_and_wait(run)
            self._fail(batch, "stopped")
        self._runs.clear()
        if self._pending:
            waiting, self._pending = list(self._pending), deque()
            self._fail(waiting, "was unloaded")
        self.metrics.unwatch_queue(self.name, self.version, self._queue_length)  # no backlog left behind for alerts

    def _fail(self, batch: list[_Pending], why: str) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(ModelUnavailable(f"model {self.name} version {self.version} {why}"))

    async def submit(self, item: StepInput) -> StepOutput:
        """Queues one request and waits for its share of a batch result. A full queue refuses new requests
        (``Overloaded``), never the later steps of a stream it admitted (``StepInput.admitted``): the queue holds
        at most ``max_queue_size`` plus one step per admitted stream."""
        if self._task is None:
            raise ModelUnavailable(f"model {self.name} version {self.version} is not serving (stopped)")
        if len(self._pending) >= self.max_queue and not item.admitted:
            raise Overloaded(
                f"model {self.name}: {len(self._pending)} requests are queued, the limit is max_queue_size="
                f"{self.max_queue}; retry with backoff",
                retry_after=RETRY_SOON,
            )
        runs = item.runs = note_run()  # (the request counts once in queue and compute statistics)
        trace = runs.trace if runs is not None else None
        if trace is not None:
            trace.stamp("QUEUE_START")
            if trace.tensors:
                trace.tensor("TENSOR_QUEUE_INPUT", {**item.inputs, **(item.states or {})})
        loop = asyncio.get_running_loop()
        tokens = self._alone(item, loop) if not self._pending and not self._running else 0
        if tokens:
            result = self._run_now(item, tokens)
            # A marker on the run queue until the loop's next iteration: a caller that loops over steps without
            # yielding (a generation, a beam search) finds it at its next step, takes the queue and yields there,
            # so it never holds the loop for more than one step.
            loop.call_soon(_next_iteration)
            return result
        fut: asyncio.Future[StepOutput] = loop.create_future()
        entry = _Pending(item, fut, time.perf_counter())
        if self.levels:
            self._enqueue(entry)
        else:
            self._pending.append(entry)
        self._wake.set()
        return await fut

    def _enqueue(self, entry: _Pending) -> None:
        """Queues ``entry`` behind every waiting request of its priority level or a higher one (a lower number),
        ahead of every request of a lower level: the queue stays ordered by level, then by age."""
        level = priority()
        entry.level = self.default_level if level is None else level
        queue = self._pending
        at = len(queue)
        while at > 0 and queue[at - 1].level > entry.level:
            at -= 1
        queue.insert(at, entry)

    def _alone(self, item: StepInput, loop: asyncio.AbstractEventLoop) -> int:
        """The run's tokens (> 0) when waiting for company cannot pay, else 0: the recent batches of this key held
        one request each, no other callback is ready to run in this loop iteration (none can join before the
        batch would flush), and the run is small enough to run inline (``alone_inline_ms``: with nobody else to
        serve, a thread hop for a slower run only adds its own cost)."""
        recent = self._last_rows.get(item.key)
        if recent and max(recent) > 1:
            return 0
        # asyncio's run queue. uvloop keeps its own out of sight, so there a lone request always queues: gRPC hands
        # a burst of calls to the loop one callback at a time, and without seeing the rest of the burst each call
        # would run alone and nothing would batch (a version that skipped the queue on uvloop did exactly that).
        ready = getattr(loop, "_ready", None)
        if ready is None or len(ready) > 0:
            return 0
        tokens = self._tokens([item])
        return tokens if self._inlinable(tokens, self.alone_seconds) else 0

    def _inlinable(self, tokens: int, seconds: float) -> bool:
        """Whether a run of ``tokens`` goes inline: small enough, and the last run that size took at most
        ``seconds`` (a size not run yet: inline, and its time is known after)."""
        return tokens <= self.inline_tokens and self._infer_seconds.get(tokens, 0.0) <= seconds

    def _inline_limit(self, items: list[StepInput]) -> float:
        """How long the last run of a batch this size may have taken for this one to run inline. A batch that took
        every request queued and is not full: ``alone_seconds`` (the requests that would join the next batch are
        not here yet, and a worker thread's hop costs more than it frees). Otherwise ``inline_seconds``: the loop
        serves the queue while the batch runs in the thread."""
        if self._pending or sum(it.rows for it in items) >= self.max_rows:
            return self.inline_seconds
        return self.alone_seconds

    def _run_now(self, item: StepInput, tokens: int) -> StepOutput:
        """A lone small request run at once, on the caller's coroutine: no Future, no wake-up of the flush task,
        no loop iteration spent waiting for company that cannot come (``_alone``). Same records as ``_run``."""
        started = time.perf_counter()
        try:
            (result,), ((_, times),) = self._run_sync([item])
        except Exception:
            log.exception("batch of 1 request failed on model %s version %d", self.name, self.version)
            raise
        self._infer_seconds[tokens] = times[1] / 1e9
        self._note_rows(item.key, item.rows, 1)
        self._record([item], [0.0], started, times)
        return result

    def _note_rows(self, key: Hashable, rows: int, requests: int) -> None:
        """Remembers a batch's rows: the company the next batches of ``key`` wait for. A request alone counts 1
        whatever its rows (one client's request of several texts is no company: the next request of that client
        waited the whole batch delay, and skipped the queue again only eight batches later)."""
        recent = self._last_rows.get(key)
        if recent is None:
            recent = self._last_rows[key] = deque(maxlen=RECENT_BATCHES)
        recent.append(rows if requests > 1 else 1)

    def _record(self, items: list[StepInput], waits: list[float], started: float, times: tuple[int, int, int]) -> None:
        """Metrics and statistics of one run of ``items``, which queued ``waits`` seconds each. Each request is
        charged its wait and the run's (input, infer, output) nanoseconds, as Triton charges a batch's requests."""
        rows = 0
        for it, wait in zip(items, waits, strict=True):
            rows += it.rows
            runs = it.runs
            if runs is not None:
                runs.queue_ns += int(wait * 1e9)
                runs.input_ns += times[0]
                runs.infer_ns += times[1]
                runs.output_ns += times[2]
        requests = sum(1 for it in items if it.request)
        self.metrics.inference(
            self.name, self.version, sum(waits) / len(items), time.perf_counter() - started, rows, requests
        )
        self.stats.batch(rows, *times)

    def _take(self) -> list[_Pending]:
        """The oldest request plus queued ones with the same key, up to ``max_rows`` rows (never splits one)."""
        first = self._pending.popleft()
        batch, rows, keep = [first], first.item.rows, deque[_Pending]()
        while self._pending:
            p = self._pending.popleft()
            if p.future.done():  # cancelled while queued
                continue
            if p.item.key == first.item.key and rows + p.item.rows <= self.max_rows:
                batch.append(p)
                rows += p.item.rows
            else:
                keep.append(p)
        self._pending = keep
        return batch

    def _rows_ready(self, key: Hashable) -> int:
        return sum(p.item.rows for p in self._pending if p.item.key == key)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            head = self._pending[0]
            if head.future.done():  # cancelled while queued (its deadline passed, its client went away)
                self._pending.popleft()
                continue
            # Wait for company until the batch is full or the oldest request has waited `delay`.
            recent = self._last_rows.get(head.item.key)
            expect = min(self.max_rows, max(recent) if recent else 1)
            while self._rows_ready(head.item.key) < expect:
                remaining = head.enqueued + self.delay - time.perf_counter()
                if remaining <= 0:
                    break
                self._wake.clear()
                timer = loop.call_later(remaining, self._wake.set)
                await self._wake.wait()
                timer.cancel()
            # Requests the loop is about to hand over join this batch: yield one loop iteration at a time while
            # the batch keeps growing (a busy loop delivers unary calls a few per iteration).
            rows = self._rows_ready(head.item.key)
            while rows < self.max_rows:
                await asyncio.sleep(0)
                more = self._rows_ready(head.item.key)
                if more == rows:
                    break
                rows = more
            batch = [p for p in self._take() if not p.future.done()]
            if batch:  # (its key may differ from ``head``'s: a request of a higher level came first meanwhile)
                self._note_rows(batch[0].item.key, sum(p.item.rows for p in batch), len(batch))
                if self.instances == 1:
                    self._running = 1
                    try:
                        await self._run(batch)
                    except Exception as exc:  # (never expected: a failure here left every later request waiting)
                        self._broken(batch, exc)
                    finally:
                        self._running = 0
                    continue
                # Several instances: the batch runs beside this task, which goes on forming the next one and
                # waits only while every instance is taken. (A session is never in two batches: its caller holds
                # its lease until its step returns.)
                self._running += 1
                self._runs[asyncio.create_task(self._run_instance(batch))] = batch
                while self._running >= self.instances:
                    self._slot.clear()
                    await self._slot.wait()

    def _broken(self, batch: list[_Pending], exc: Exception) -> None:
        """A failure in the batcher's own handling of a batch (not a run's, which its requests get): logged, and
        every request of the batch still waiting gets it, so none waits forever and the queue goes on."""
        log.exception("model %s version %d: handling a batch of %d failed", self.name, self.version, len(batch))
        for p in batch:
            if not p.future.done():
                p.future.set_exception(_detached(exc))

    async def _run_instance(self, batch: list[_Pending]) -> None:
        try:
            await self._run(batch)
        except Exception as exc:
            self._broken(batch, exc)
        finally:
            self._running -= 1
            self._runs.pop(cast(asyncio.Task[None], asyncio.current_task()), None)
            self._slot.set()

    async def _run(self, batch: list[_Pending]) -> None:
        items = [p.item for p in batch]
        started = time.perf_counter()
        tokens = self._tokens(items)
        try:
            if self._inlinable(tokens, self._inline_limit(items)):
                results, runs = self._run_sync(items)
            else:
                results, runs = await asyncio.to_thread(self._run_sync, items)
            if tokens <= self.inline_tokens:
                self._infer_seconds[tokens] = sum(times[1] for _, times in runs) / 1e9
        except asyncio.CancelledError:  # stop() during a run: nobody may wait forever
            self._fail(batch, "stopped")
            raise
        except Exception as exc:
            if len(batch) > 1:
                log.warning(
                    "batch of %d requests failed on model %s version %d (%s: %s); running each alone",
                    len(batch), self.name, self.version, type(exc).__name__, exc,
                )  # fmt: skip
                await self._run_each(batch)
                return
            log.exception("request failed on model %s version %d", self.name, self.version)
            if not batch[0].future.done():  # (cancelled meanwhile: set_exception would raise)
                batch[0].future.set_exception(_detached(exc))
            return
        for group, times in runs:  # one execution per ORT run
            self._record([items[i] for i in group], [started - batch[i].enqueued for i in group], started, times)
        for p, r in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(r)

    async def _run_each(self, batch: list[_Pending]) -> None:
        """After a batch failed: each request runs alone (in the worker thread), so that only a request that fails by
        itself fails (a word a mismatched graph's embedding lacks, a batch too big for the device's memory) and the
        others of its batch get their answers."""
        for p in batch:
            if p.future.done():
                continue
            started = time.perf_counter()
            try:
                results, runs = await asyncio.to_thread(self._run_sync, [p.item])
            except asyncio.CancelledError:  # stop() meanwhile
                self._fail(batch, "stopped")
                raise
            except Exception as exc:
                log.exception("request failed alone on model %s version %d", self.name, self.version)
                if not p.future.done():  # (its caller may have gone while it ran: set_exception would raise)
                    p.future.set_exception(_detached(exc))
                continue
            for _, times in runs:
                self._record([p.item], [started - p.enqueued], started, times)
            if not p.future.done():
                p.future.set_result(results[0])

    @staticmethod
    def _tokens(items: list[StepInput]) -> int:
        """Rows x time steps of the batch: what its ORT run costs, roughly."""
        total = 0
        for it in items:
            a = next(iter(it.inputs.values()), None)
            total += it.rows * (a.shape[1] if a is not None and a.ndim > 1 else 1)
        return total

    def _run_sync(
        self, items: list[StepInput]
    ) -> tuple[list[StepOutput], list[tuple[list[int], tuple[int, int, int]]]]:
        """Runs inline or in a worker thread: the results in ``items`` order, and per ORT run (one, or one per
        length group of a padded batch) the indices of its items and its (input, infer, output) nanoseconds."""
        groups = padding_groups(items, self.pad_split)
        if len(groups) == 1:
            results, times = self._run_group(items)
            return results, [(groups[0], times)]
        ordered: list[StepOutput | None] = [None] * len(items)
        runs = []
        for group in groups:
            part, times = self._run_group([items[i] for i in group])
            for i, r in zip(group, part, strict=True):
                ordered[i] = r
            runs.append((group, times))
        return [r for r in ordered if r is not None], runs

    def _run_group(self, items: list[StepInput]) -> tuple[list[StepOutput], tuple[int, int, int]]:
        """One ORT run over ``items``: their results and the run's (input, infer, output) nanoseconds."""
        t0 = time.perf_counter_ns()
        feeds, rows = concatenate(items, self.runtime)
        t1 = time.perf_counter_ns()
        outputs = self.runtime.run(feeds, rows)
        t2 = time.perf_counter_ns()
        if self.derive is not None and any(it.derive for it in items):
            outputs.update(self.derive(outputs))
        results = split(outputs, items, self.runtime)
        t3 = time.perf_counter_ns()
        for it, r in zip(items, results, strict=True):
            trace = it.runs.trace if it.runs is not None else None
            if trace is not None:
                trace.run((t0, t1, t2, t3))
                if trace.tensors:
                    states = {self._state_outputs.get(k, k): v for k, v in r.states.items()}
                    trace.tensor("TENSOR_BACKEND_OUTPUT", {**r.outputs, **states})
        return results, (t1 - t0, t2 - t1, t3 - t2)
