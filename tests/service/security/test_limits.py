"""Defects 2 and 14: sizes are checked before anything is decoded, a huge rejected request does not stall other
clients, and a burst of near-limit requests pins neither the event loop nor memory (a byte budget for large
requests; nothing of a failed request outlives it)."""

from __future__ import annotations

import asyncio
import gc
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import wrappers_pb2

from service.api import converters as cv
from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.gen.seqserve.v1 import common_pb2, sentiment_pb2
from service.api.memory import ByteBudget
from service.errors import RETRY_SOON, InvalidInput, Overloaded
from tests.conftest import ServerHandle
from tests.service.security.conftest import KSERVE

BURST = """
import sys, threading, grpc
from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.seqserve.v1 import common_pb2, forecast_pb2
target, n = sys.argv[1], int(sys.argv[2])
predict = forecast_pb2.PredictRequest(history=[common_pb2.Row(values=[1.0] * 7)] * 480_000).SerializeToString()
infer = pb.ModelInferRequest(model_name="forecaster", inputs=[pb.ModelInferRequest.InferInputTensor(
    name="HISTORY", datatype="FP32", shape=[10_000, 7])], raw_input_contents=[bytes(16_000_000)]).SerializeToString()
channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 32 << 20)])
codes = []
def send(method, payload):
    try:
        channel.unary_unary(method)(payload, timeout=60)
        codes.append("OK")
    except grpc.RpcError as err:
        codes.append(err.code().name)  # list.append is atomic; printing from threads would interleave
calls = [("/seqserve.v1.Forecast/Predict", predict), ("/inference.GRPCInferenceService/ModelInfer", infer)] * n
threads = [threading.Thread(target=send, args=call) for call in calls]
for t in threads: t.start()
for t in threads: t.join()
print(" ".join(codes))
"""


HALF_A_PAYLOAD = 7_500_000  # the burst's requests are 15.4 MB (Predict) and 16 MB (ModelInfer)


def burst(target: str, n: int) -> list[str]:
    """``n`` near-limit Predict and ``n`` near-limit ModelInfer requests at once, from another process; every
    one is rejected. Returns the status codes."""
    done = subprocess.run([sys.executable, "-c", BURST, target, str(n)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


class _Counted(list[common_pb2.Row]):
    """Rows that count how often they are read."""

    reads = 0

    def __getitem__(self, i: Any) -> Any:
        _Counted.reads += 1
        return super().__getitem__(i)

    def __iter__(self) -> Any:
        _Counted.reads += 1
        return super().__iter__()


def test_row_count_is_checked_before_any_row_is_read() -> None:
    rows = _Counted([common_pb2.Row(values=[1.0] * 7)] * 10_001)
    with pytest.raises(InvalidInput, match="history has 10001 rows; send 1 to 10000 rows"):
        cv.rows_to_array(rows, "history", 10_000)
    assert _Counted.reads == 0
    with pytest.raises(InvalidInput, match="at most 4096"):
        cv.rows_to_array([common_pb2.Row(values=[1.0] * 5000)], "rows", 10)


async def test_a_large_table_is_read_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a protobuf table costs Python per row (10,000 rows took tens of milliseconds of the loop that serves
    every other call): one of more than ``ROWS_OFF_LOOP`` rows is read in a worker thread, to the same array, and
    its refusals are the same; a small one stays on the loop."""
    loop_thread, threads = threading.get_ident(), []
    read = cv.rows_to_array

    def recorded(*args: Any) -> Any:
        threads.append(threading.get_ident())
        return read(*args)

    monkeypatch.setattr(cv, "rows_to_array", recorded)
    big = [common_pb2.Row(values=[float(i), i + 0.5, -i]) for i in range(cv.ROWS_OFF_LOOP + 1)]
    got = await cv.rows_array(big, "history", 10_000)
    assert got.dtype == np.float32 and got.tolist() == [[float(i), i + 0.5, -i] for i in range(len(big))]
    assert threads[-1] != loop_thread
    with pytest.raises(InvalidInput, match=r"^rows\[7\] has 2 values but rows\[0\] has 3: every row needs"):
        await cv.rows_array([*big[:7], common_pb2.Row(values=[1, 2]), *big[8:]], "rows", 10_000)
    small = await cv.rows_array(big[:3], "history", 10_000)
    assert small.tolist() == got[:3].tolist() and threads[-1] == loop_thread
    assert cv.rows_from_pb([], 3).shape == (0, 3)  # (a warming-up session's empty forecast keeps its width)


def test_a_huge_rejected_request_does_not_stall_other_clients(plain: ServerHandle) -> None:
    latencies: list[float] = []
    failures: list[BaseException] = []  # a watcher's failure must reach the test, not end its thread quietly
    stop = threading.Event()

    def live() -> None:
        with grpc.insecure_channel(plain.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
                except BaseException as e:  # DEADLINE_EXCEEDED when the server stalls
                    failures.append(e)
                    return
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.01)

    watcher = threading.Thread(target=live)
    watcher.start()
    try:
        codes = burst(plain.target, 3)
    finally:
        stop.set()
        watcher.join()
    assert set(codes) <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"} and "INVALID_ARGUMENT" in codes
    assert failures == [] and len(latencies) >= 3, (failures, len(latencies))
    # A stall detector, not a speed target: the campaign saw ServerLive's median go from 1.3 ms to 939 ms while
    # 480,000-row Predicts were rejected; a tenth of that still fails here.
    assert statistics.median(latencies) < 0.1, sorted(latencies)[-5:]


def settled_growth(before: int, limit: int, seconds: float = 10.0) -> int:
    """Bytes traced beyond ``before`` once the in-process server has settled: the client has its status a moment
    before the server's call has unwound (on a loaded machine, longer), so this polls until the growth is under
    ``limit`` or ``seconds`` have passed. What is leaked or pinned stays, and the caller's assertion sees it."""
    deadline = time.monotonic() + seconds
    while True:
        gc.collect()  # garbage waiting for the cycle collector is not kept alive; only what is still referenced
        grown = tracemalloc.get_traced_memory()[0] - before
        if grown < limit or time.monotonic() > deadline:
            return grown
        time.sleep(0.05)


def test_nothing_of_a_failed_large_request_outlives_it(plain: ServerHandle) -> None:
    """The payloads of rejected near-limit requests (15-16 MB each) are freed with the call (before: every one
    that reached the decoder stayed referenced from its traceback, and RSS grew by hundreds of MiB per burst;
    later, one refused before decoding stayed pinned by grpc's last accepted call until the next call: CI saw
    16.03 MB, see test_a_refused_request_is_not_pinned_until_the_next_call)."""
    burst(plain.target, 1)  # warm-up: first-call allocations are not a leak
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            burst(plain.target, 4)
        grown = settled_growth(before, HALF_A_PAYLOAD)
    finally:
        tracemalloc.stop()
    assert grown < HALF_A_PAYLOAD, f"{grown / 2**20:.1f} MiB of Python objects outlived the burst"


BIG = 8 << 20


def _invalid_utf8_name() -> bytes:
    """Field 1 (ModelInferRequest's model_name, a string) holding 8 MiB that are not UTF-8: BytesValue's only
    field is field 1 too, as bytes, so protobuf writes what it would refuse to write as a string."""
    return wrappers_pb2.BytesValue(value=b"\xff" * BIG).SerializeToString()


# method, streamed, 8 MiB that fail before they are decoded, expected status. Too large: ModelReady takes small
# requests; a ModelInferRequest's model_name is ModelReadyRequest's name (field 1), its raw contents unknown there.
REFUSED: dict[str, tuple[str, bool, Callable[[], bytes], str]] = {
    "too large": (
        "ModelReady", False,
        lambda: pb.ModelInferRequest(model_name="m", raw_input_contents=[bytes(BIG)]).SerializeToString(),
        "RESOURCE_EXHAUSTED",
    ),
    "corrupt": ("ModelInfer", False, _invalid_utf8_name, "INVALID_ARGUMENT"),
    "corrupt on a stream": ("ModelStreamInfer", True, _invalid_utf8_name, "INVALID_ARGUMENT"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_request_is_not_pinned_until_the_next_call(plain: ServerHandle, case: str) -> None:
    """grpc keeps the state of the last call it accepted (with its abort exception, whose traceback holds the
    handler's frames) until the next call arrives. A request refused before it was decoded must not stay pinned
    by that: once its status has arrived and the server's call has unwound, its bytes are gone (before: all 8 MiB
    until the next call; measured at once, CI caught the unwinding in progress once: 8.0 MiB)."""
    method, streamed, build, code = REFUSED[case]
    payload = build()
    with grpc.insecure_channel(plain.target, options=[("grpc.max_send_message_length", 32 << 20)]) as channel:
        assert channel.unary_unary(KSERVE + "ServerLive")(b"", timeout=10) is not None  # first-call allocations
        tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            with pytest.raises(grpc.RpcError) as refused:
                if streamed:
                    list(channel.stream_stream(KSERVE + method)(iter([payload]), timeout=30))
                else:
                    channel.unary_unary(KSERVE + method)(payload, timeout=30)
            del payload
            grown = settled_growth(before, BIG // 4)  # no other call is made meanwhile: pinned bytes would stay
        finally:
            tracemalloc.stop()
    assert refused.value.code().name == code, refused.value.details()
    assert grown < BIG // 4, f"{grown / 2**20:.1f} MiB outlived the refused call"


def run(coro: Callable[[], Any]) -> Any:
    return asyncio.run(coro())


def test_byte_budget_bounds_what_runs_and_waits() -> None:
    async def scenario() -> list[str]:
        budget, order = ByteBudget(100, on_idle=lambda: order.append("idle")), []

        async def use(name: str, n: int, hold: float) -> None:
            try:
                async with budget.hold(n):
                    order.append(f"+{name}")
                    await asyncio.sleep(hold)
                    order.append(f"-{name}")
            except Overloaded as exc:
                assert "max_large_bytes_in_flight" in exc.message
                assert exc.retry_after == RETRY_SOON  # refused before it ran: it may be sent again soon
                order.append(f"refused {name}")

        tasks = [asyncio.create_task(use("a", 60, 0.05))]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(use("b", 60, 0.01)), asyncio.create_task(use("c", 30, 0.01))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(use("d", 30, 0.01)))  # 90 bytes would wait: refused at once
        await asyncio.gather(*tasks)
        assert budget.used == 0 and budget.waiting == 0
        return order

    order = run(scenario)
    assert order[:2] == ["+a", "refused d"]
    assert order.index("+b") < order.index("+c"), "waiters are served in arrival order"
    assert order.index("-a") < order.index("+b")
    assert order[-1] == "idle"


def test_a_byte_budget_refusal_names_what_runs_and_what_waits_each_against_its_bound() -> None:
    """(It said "150 bytes ... in flight or waiting, the limit is 100": more than the limit it named, since what
    may wait is as much again.)"""

    async def scenario() -> str:
        budget, gate = ByteBudget(100), asyncio.Event()

        async def hold(n: int) -> None:
            async with budget.hold(n):
                await gate.wait()

        tasks = [asyncio.create_task(hold(n)) for n in (60, 60, 30)]  # 60 in flight, 90 waiting
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:
            async with budget.hold(30):
                pass
        gate.set()
        await asyncio.gather(*tasks)
        return refused.value.message

    assert run(scenario) == (
        "large requests are over their memory budget: 60 bytes in flight (at most 100, max_large_bytes_in_flight) "
        "and 90 bytes waiting (at most as much again); this one (30 bytes) would wait past that; retry with backoff"
    )


def test_byte_budget_gives_back_what_a_cancelled_waiter_held() -> None:
    async def scenario() -> int:
        budget = ByteBudget(100)
        gate = asyncio.Event()

        async def hold(n: int) -> None:
            async with budget.hold(n):
                await gate.wait()

        first = asyncio.create_task(hold(80))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(hold(50))
        await asyncio.sleep(0)
        assert budget.waiting == 50
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        gate.set()
        await first
        return budget.used + budget.waiting

    assert run(scenario) == 0


def test_a_cancelled_waiter_at_the_head_lets_the_ones_behind_it_in() -> None:
    """Waiters are admitted in order; when the head one goes away (cancelled, or past its deadline), those behind
    it that fit now are admitted at once, not when some other call next gives bytes back."""

    async def scenario() -> tuple[bool, bool]:
        budget = ByteBudget(100)
        gate, small_in = asyncio.Event(), asyncio.Event()

        async def hold(n: int, entered: asyncio.Event | None = None) -> None:
            async with budget.hold(n):
                if entered is not None:
                    entered.set()
                await gate.wait()

        holder = asyncio.create_task(hold(40))
        await asyncio.sleep(0)
        big = asyncio.create_task(hold(70))  # does not fit: waits at the head
        await asyncio.sleep(0)
        small = asyncio.create_task(hold(20, small_in))  # would fit, but queues behind the big one
        await asyncio.sleep(0)
        before = small_in.is_set()
        big.cancel()
        await asyncio.gather(big, return_exceptions=True)
        await asyncio.wait_for(small_in.wait(), 5)
        gate.set()
        await asyncio.gather(holder, small)
        return before, budget.used == 0

    assert run(scenario) == (False, True)


def test_a_large_unary_request_is_charged_to_the_byte_budget(
    start_server: Callable[..., ServerHandle], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edge's unary path skips the budget's bookkeeping for the common small request; a request of
    large_request_bytes or more must still hold its bytes while it runs (a burst of them is what the budget is
    for). Recorded on the real server's Decoding, which does the holding unchanged."""
    from service.api.decoding import Decoding

    held: list[int] = []
    admit = Decoding.admit

    def recording(self: Decoding, size: int) -> Any:
        held.append(size)
        return admit(self, size)

    monkeypatch.setattr(Decoding, "admit", recording)
    handle = start_server(large_request_bytes=1024, max_large_bytes_in_flight=4096)
    with grpc.insecure_channel(handle.target) as channel:
        classify = channel.unary_unary("/seqserve.v1.Sentiment/Classify")
        small = sentiment_pb2.ClassifyRequest(texts=["a fine film"]).SerializeToString()
        large = sentiment_pb2.ClassifyRequest(texts=["a fine film"] * 100).SerializeToString()
        assert len(small) < 1024 <= len(large)
        classify(small, timeout=30)
        assert held == []
        classify(large, timeout=30)
    assert held == [len(large)]
