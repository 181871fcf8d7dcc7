"""``python -m bench.loops``: event-loop turns and callbacks per request of the floor, the lean server and
seqserve. The counters on a loop whose turns are known; the summary's medians on fixed rows; one short real run
of the three counted servers. No timing is asserted: speed lives in the benchmark."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench import loops


def _turns_and_callbacks(sleeps: int) -> tuple[int, int]:
    async def main() -> None:
        for _ in range(sleeps):
            await asyncio.sleep(0)  # one more turn of the loop, and one more step of this task in it

    with loops.counting([0, 0]) as counts:
        asyncio.run(main())
    return counts[0], counts[1]


def test_each_turn_and_each_callback_is_counted_once() -> None:
    base, more = _turns_and_callbacks(10), _turns_and_callbacks(30)
    assert (more[0] - base[0], more[1] - base[1]) == (20, 20)


def test_the_loop_is_uncounted_after_the_block() -> None:
    counts = [0, 0]
    with loops.counting(counts):
        pass
    asyncio.run(asyncio.sleep(0))
    assert counts == [0, 0]


def _row(server: str, rnd: int, turns: float, callbacks: float) -> dict[str, object]:
    return {"server": server, "round": rnd, "workload": "w", "concurrency": 4, "requests": 100,
            "turns_per_request": turns, "callbacks_per_request": callbacks}  # fmt: skip


def test_summary_takes_medians_per_server() -> None:
    rows = [_row("floor", 0, 2.0, 4.0), _row("seqserve", 0, 2.2, 5.0), _row("floor", 1, 2.1, 4.2),
            _row("seqserve", 1, 2.0, 6.0), _row("floor", 2, 1.9, 4.1), _row("seqserve", 2, 2.4, 5.5)]  # fmt: skip
    got = {s["server"]: (s["turns_per_request"], s["callbacks_per_request"]) for s in loops.summary(rows)}
    assert got == {"floor": (2.0, 4.1), "seqserve": (2.2, 5.5)}


def test_an_unpinned_workload_is_refused(tiny_models: Path) -> None:
    with pytest.raises(ValueError, match="charlm-stream"):
        loops.run(tiny_models, ["charlm-stream"], [4])


def test_a_real_run_counts_every_server(tiny_models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = loops.run(tiny_models, ["charlm1-stream"], [4], rounds=1, window_ms=300)  # (-x 1: the tiny charlm/1)
    assert sorted(row["server"] for row in r["rows"]) == sorted(loops.SERVERS)
    for row in r["rows"]:
        assert row["requests"] > 0, row
        # every streamed request is read, answered and written by callbacks on the loop, in at least one turn
        assert row["callbacks_per_request"] >= 1 and row["turns_per_request"] > 0, row
    loops.print_table(r)
    printed = capsys.readouterr().out
    for server in loops.SERVERS:
        assert f"charlm1-stream   4  {server}" in printed
