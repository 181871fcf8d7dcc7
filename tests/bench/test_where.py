"""``python -m bench.where``: server CPU per request split by library (Linux perf) for seqserve and the floor.
The report parser and the arithmetic on fixed input; then one short real run against the tiny models where perf
can sample a process here (``make sysdeps`` installs linux-perf; a machine that forbids sampling skips, saying
why). No timing is asserted: speed lives in the benchmark."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import where

REPORT = """\
    47.23%          4723  libpython3.11.so.1.0
    16.24%          1624  [kernel.kallsyms]
    12.75%          1275  cygrpc.cpython-311-x86_64-linux-gnu.so
     8.60%           860  onnxruntime_pybind11_state.cpython-311-x86_64-linux-gnu.so
     7.03%           703  libc.so.6
     3.14%           314  _multiarray_umath.cpython-311-x86_64-linux-gnu.so
     2.88%           288  _message.abi3.so
     0.74%            74  _asyncio.cpython-311-x86_64-linux-gnu.so
     0.39%            39  ld-linux-x86-64.so.2
"""


def test_the_report_is_grouped_by_library() -> None:
    samples = where.parse_report("# comment line\n\n" + REPORT)
    assert list(samples) == where.ORDER  # every group, in the table's order
    assert samples == {
        "Python interpreter": 4723,
        "gRPC (cygrpc)": 1275,
        "seqserve compiled": 0,
        "kernel": 1624,
        "C library": 703 + 39,
        "ONNX Runtime": 860,
        "numpy": 314,
        "protobuf": 288,
        "other": 74,
    }
    assert where.library("python3.11") == "Python interpreter"  # a statically linked interpreter
    assert where.library("compiled__mypyc.cpython-311-x86_64-linux-gnu.so") == "seqserve compiled"
    assert where.library("libonnxruntime.so.1.20.0") == "ONNX Runtime"
    assert where.library("[vdso]") == "C library"
    assert where.library("msgpack/_cmsgpack.so") == "other"


def test_a_library_gets_its_share_of_the_cpu_per_request() -> None:
    us = where.per_request({"a": 3, "b": 1, "c": 0}, cpu_s=2.0, requests=4000)  # 500 µs per request
    assert us == {"a": 375.0, "b": 125.0, "c": 0.0}
    assert where.per_request({"a": 0}, cpu_s=1.0, requests=10) == {"a": 0.0}  # no samples: nothing to share


def test_summary_takes_medians_per_server() -> None:
    def row(server: str, rnd: int, python: float, total: float) -> dict[str, object]:
        us = dict.fromkeys(where.ORDER, 0.0) | {"Python interpreter": python}
        return {"server": server, "workload": "w", "concurrency": 4, "round": rnd, "us": us, "server_cpu_us": total}

    rows = [
        row("seqserve", 0, 100, 300),
        row("floor", 0, 10, 90),
        row("floor", 1, 30, 110),
        row("seqserve", 1, 140, 340),
    ]
    (s,) = where.summary(rows)
    assert (s["workload"], s["concurrency"]) == ("w", 4)
    assert s["seqserve"]["Python interpreter"] == 120 and s["seqserve"]["all"] == 320
    assert s["floor"]["Python interpreter"] == 20 and s["floor"]["all"] == 100


def test_a_real_run_splits_both_servers_cpu(tiny_models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        perf = where.perf_binary()
    except SystemExit as e:
        pytest.skip(str(e))
    r = where.run(tiny_models, ["charlm-stream"], [4], rounds=1, frequency=999, window_ms=300, perf=perf)
    assert [(row["server"], row["round"]) for row in r["rows"]] == [("seqserve", 0), ("floor", 0)]
    rows = {row["server"]: row for row in r["rows"]}
    for row in rows.values():
        assert row["throughput"] > 0 and row["server_cpu_us"] > 0
        assert sum(row["samples"].values()) > 0
        # the libraries' shares add up to the server's CPU per request
        assert math.isclose(sum(row["us"].values()), row["server_cpu_us"], rel_tol=1e-9)
        assert row["samples"]["Python interpreter"] > 0 and row["samples"]["gRPC (cygrpc)"] > 0
    # the model runs in seqserve only: the floor answers canned bytes
    assert rows["seqserve"]["samples"]["ONNX Runtime"] > 0 and rows["floor"]["samples"]["ONNX Runtime"] == 0
    where.print_table(r)
    out = capsys.readouterr().out
    assert "charlm-stream" in out and "ONNX Runtime" in out and "extra" in out
