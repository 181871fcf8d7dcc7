"""`make bench` must keep working: a quick run against a real server on the tiny models writes the JSON the
README's numbers come from. (No timing is asserted here; speed lives in the benchmark, not in tests.)"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from bench.run import main


def test_quick_bench_writes_every_section(
    tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    assert main(["--models", str(tiny_models), "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert [row["prefix_chars"] for row in r["keystroke"]] == [16, 256]
    # the machine's speed at its start and end (this shared machine drifts: the run says which kind of hour it had)
    assert r["machine"]["python_speed_us_start"] > 0 and r["machine"]["python_speed_us_end"] > 0
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("seqserve bench  ("))
    assert lines[header + 1].startswith("machine speed: sum(range(1000)) took ")
    for row in r["keystroke"]:
        for side in ("session_step", "recompute"):
            assert row[side]["n"] == r["repeats"] and row[side]["p50_ms"] > 0
    # the same client against a canned Suggest: the keystroke's floor
    assert r["keystroke_floor"]["n"] == 200 and r["keystroke_floor"]["p50_ms"] > 0
    # the typing user without a session: with the prefix cache every keystroke after the first found the text
    # before it (partial), without the cache nothing was looked up
    assert [row["prefix_chars"] for row in r["prefixes"]] == [16, 256]
    for row in r["prefixes"]:
        for api in ("", "kserve_"):  # Complete, and KServe ModelInfer without a sequence (on another text)
            cache, none = row[api + "cache"], row[api + "no_cache"]
            assert cache["n"] == none["n"] == r["repeats"] and cache["p50_ms"] > 0 and none["p50_ms"] > 0
            assert cache["lookups"] == {"hit": 0, "partial": r["repeats"] + 2, "miss": 1}  # 3 warm-up calls
            assert none["lookups"] == {"hit": 0, "partial": 0, "miss": 0}
    assert [row["streams"] for row in r["streams"]] == [1, 4]
    assert all(row["total_chars_per_s"] > 0 for row in r["streams"])
    assert set(r["classify"]) == {"batch_1", "batch_16"}
    assert set(r["forecast"]) == {"predict_96_rows", "observe_1_row"}
    # the batcher's length groups on the tiny sentiment model: one row per batch size, every group run counted
    assert [(p["model"], p["batch"]) for p in r["padding"]] == [("sentiment/1", b) for b in (4, 16, 64)]
    assert all(p["one_run_ms"] > 0 and p["grouped_ms"] > 0 and p["runs_per_batch"] >= 1 for p in r["padding"])
    # one and two intra-op threads on each default model present (the tiny set has no charlm-int8)
    cases = [(t["model"], t["batch"]) for t in r["threads"]]
    assert cases == [("charlm/1", b) for b in (1, 16, 64, 1)] + [("sentiment/1", b) for b in (1, 4, 16, 64)]
    assert [t["time"] for t in r["threads"][:4]] == [1, 1, 1, 1024]
    for t in r["threads"]:
        assert t["one_thread_us"] > 0 and t["two_threads_us"] > 0
        assert abs(t["speedup"] - t["one_thread_us"] / t["two_threads_us"]) < 1e-9
    assert r["memory"]["sessions"] == 50 and r["memory"]["rss_after_bytes"] > 0
    codec = r["codec"]  # the engine link's encoding of one char-LM step, each direction
    assert codec["reply_bytes"] > codec["call_bytes"] > 0
    assert all(codec[k] > 0 for k in codec if k.endswith("_us"))
    stores = r["stores"]  # memory, Redis step, Redis idle at two concurrencies (redis-server: make sysdeps)
    assert [(row["store"], row["sessions"]) for row in stores["rows"]] == [
        (name, c) for name in ("memory", "redis step", "redis idle") for c in (1, 4)
    ]
    step = [row for row in stores["rows"] if row["store"] == "redis step"]
    assert all(row["p50_ms"] > 0 and row["redis_scripts_per_step"] > 0 for row in step)
    assert stores["memory"]["value_key_bytes"] > stores["memory"]["state_bytes"] > 0
    # perf_analyzer section: seqserve with 1 worker and the default count, and the floor, on the same workload.
    perf = r["perf"]
    servers = {row["server"] for row in perf["rows"]}
    assert "floor" in servers and "seqserve w=1" in servers
    assert {row["workload"] for row in perf["rows"]} == {"charlm-stream"}
    for row in perf["rows"]:
        assert row["throughput"] > 0 and row["p50_us"] > 0
        assert row["server_cpu_s_per_1k"] > 0 and row["client_cpu_s_per_1k"] > 0
        # the engine's share of the server's CPU, for a server of several processes only (the engine and its
        # frontends: each frontend spends CPU on every request it carries, so the engine has less than all)
        if row["server"] in ("floor", "seqserve w=1"):
            assert row["engine_cpu_s"] is None and "engine_cpu_s_per_1k" not in row
        else:
            assert 0 < row["engine_cpu_s_per_1k"] < row["server_cpu_s_per_1k"], row
    # every server measured back to back in each round, every other round in reverse order (ABC, CBA)
    order = [(row["round"], row["server"]) for row in perf["rows"]]
    first = [server for rnd, server in order if rnd == 0]
    assert perf["rounds"] == 2 and first[-1] == "floor" and len(set(first)) == len(first)
    assert [server for rnd, server in order if rnd == 1] == first[::-1]
    # the summary: medians over the rounds, and each seqserve ratio taken against the floor of its own round
    floor_of = {row["round"]: row["throughput"] for row in perf["rows"] if row["server"] == "floor"}
    for agg in perf["summary"]:
        own = [row for row in perf["rows"] if row["server"] == agg["server"]]
        assert agg["rounds"] == 2 and min(r["throughput"] for r in own) <= agg["throughput"]
        if agg["server"] in ("floor", "seqserve w=1"):
            assert "engine_cpu_s_per_1k" not in agg
        else:
            both = [row["engine_cpu_s_per_1k"] for row in own]  # two rounds: their median is their mean
            assert abs(agg["engine_cpu_s_per_1k"] - sum(both) / 2) < 1e-12
        if agg["server"] == "floor":
            assert "ratio" not in agg
            continue
        paired = sorted(row["throughput"] / floor_of[row["round"]] for row in own)
        assert (agg["ratio_min"], agg["ratio_max"]) == (paired[0], paired[-1])
        assert abs(agg["ratio"] - sum(paired) / 2) < 1e-9
    # overload section: the default server never refuses below its queue bound; with the bound below the callers,
    # every failure is a refusal, the server's own histogram saw the answered calls, and it still answers after.
    default, bounded = r["overload"]["rows"]
    assert (default["run"], bounded["run"]) == ("default", "bounded")
    assert default["callers"] == 96 < default["max_queue_size"] and bounded["max_queue_size"] < 96
    assert default["refused"]["n"] == 0 and "RESOURCE_EXHAUSTED" not in default["server"]
    for row in (default, bounded):
        assert row["answered"]["n"] > 0 and row["other_errors"] == {} and row["answers_after"] is True
        assert row["server"]["OK"]["count"] >= row["answered"]["n"]


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def test_sigterm_while_a_bench_waits_for_its_server_to_start_stops_that_server(tmp_path: Path) -> None:
    """SIGTERM can arrive while ``bench.launch.start`` still waits for the server's ready file (a server slow to
    start on a loaded machine): the server is stopped too. It used to be left running: nobody held it yet, so no
    cleanup knew of it (a full ``make test`` run caught the test below leaving a server behind this way)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    child = tmp_path / "child.pid"
    server = tmp_path / "server.py"  # a server that never writes its ready file
    server.write_text("import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    script = tmp_path / "a_bench.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\nfrom bench import cli, launch\n\n"
        "def main() -> int:\n"
        f"    launch.start([sys.executable, {str(server)!r}, {str(child)!r}], Path({str(tmp_path / 'ready.json')!r}),\n"
        f"                 Path({str(tmp_path / 'server.log')!r}))\n"
        "    return 0\n\n"
        "cli.run(main)\n"
    )
    root = Path(__file__).parents[2]
    bench = subprocess.Popen([sys.executable, str(script)], cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    pid = 0
    try:
        deadline = time.monotonic() + 60
        # (the file exists from the child's open() on, and is empty until its write: wait for the pid, not the file)
        while not (child.exists() and child.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = int(child.read_text())
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=90) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists()  # stopped, not orphaned
    finally:
        for p in (bench.pid, pid):
            with contextlib.suppress(ProcessLookupError):
                if p:
                    os.kill(p, signal.SIGKILL)


def test_sigterm_stops_what_a_bench_started(tiny_models: Path, tmp_path: Path) -> None:
    """A bench ended by SIGTERM (timeout, a cancelled CI job) stops its servers as a normal end does; Python's
    default SIGTERM skipped every cleanup and left the servers running, adopted by init."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "bench.overload", "--models", str(tiny_models), "--callers", "2", "--seconds", "60"]
    err = tmp_path / "stderr.txt"
    with err.open("wb") as sink:
        bench = subprocess.Popen([*cmd, "--out", str(tmp_path / "o.json")], cwd=Path(__file__).parents[2], stderr=sink)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while not _children(bench.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # the server is up and the callers are running
        started = _children(bench.pid)
        assert started, "the bench started no server"
        bench.send_signal(signal.SIGUSR1)  # where it is, written to stderr (bench.cli.run), and it goes on
        deadline = time.monotonic() + 10
        while "most recent call first" not in err.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "most recent call first" in err.read_text() and bench.poll() is None
        bench.send_signal(signal.SIGTERM)
        try:
            code = bench.wait(timeout=90)
        except subprocess.TimeoutExpired:  # (seen once in CI, never here): say where it is stuck
            bench.send_signal(signal.SIGUSR1)
            time.sleep(2)
            pytest.fail(f"the bench did not exit within 90 s of SIGTERM; its stderr:\n{err.read_text()[-8000:]}")
        deadline = time.monotonic() + 30
        while (alive := {p for p in started if Path(f"/proc/{p}").exists()}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive and code == 128 + signal.SIGTERM
    finally:
        for p in [bench.pid, *started]:  # whatever is left (old code: the servers, adopted by init)
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        bench.wait()


HUNG_CLEANUP = """
import subprocess, sys, threading, time
from bench import cli
cli.CLEANUP_S = 1.0
def main():
    child = subprocess.Popen(["sleep", "300"])
    print(child.pid, flush=True)
    try:
        time.sleep(300)
    finally:
        threading.Event().wait()  # a cleanup that never ends
    return 0
cli.run(main)
"""


def test_a_cleanup_that_hangs_after_sigterm_is_cut_short(tmp_path: Path) -> None:
    """If the cleanup SIGTERM starts never ends (bench.cli.run), the bench still exits with 143 once CLEANUP_S has
    passed, says where it was stuck, and kills what it started instead of leaving it to init."""
    import os
    import signal
    import subprocess
    import sys
    import time

    bench = subprocess.Popen(
        [sys.executable, "-c", HUNG_CLEANUP],
        cwd=Path(__file__).parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    child = 0
    try:
        assert bench.stdout is not None
        child = int(bench.stdout.readline())
        assert Path(f"/proc/{child}").exists()
        time.sleep(0.5)
        bench.send_signal(signal.SIGTERM)
        _, err = bench.communicate(timeout=60)
        assert bench.returncode == 128 + signal.SIGTERM, err
        assert "the cleanup after signal 15 took over 1 s; stopped" in err and "in main" in err, err
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        for p in (bench.pid, child):
            with contextlib.suppress(ProcessLookupError):
                if p:
                    os.kill(p, signal.SIGKILL)
        bench.wait()


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (dead) parent's reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # a typist's late delete
def test_an_exit_during_a_store_measurement_frees_its_typists(server: object, monkeypatch: object) -> None:
    """SIGTERM (bench.cli.run: SystemExit) or any error in the measuring thread while the typists wait at a barrier
    left them waiting forever, so the process never exited; the barriers are aborted on the way out."""
    import threading

    from bench import stores
    from service.client import Client

    def interrupted(r: object) -> tuple[int, int]:
        raise SystemExit(143)  # what SIGTERM raises in the measuring thread

    monkeypatch.setattr(stores, "_commands", interrupted)  # type: ignore[attr-defined]
    typists: list[threading.Thread] = []
    typist = stores._typist

    def recorded(*args: object) -> None:
        typists.append(threading.current_thread())
        typist(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(stores, "_typist", recorded)  # type: ignore[attr-defined]
    with Client(server.target, timeout=30) as client, pytest.raises(SystemExit):  # type: ignore[attr-defined]
        stores.step_cost(client, 2, 3, None)
    assert len(typists) == 2
    for t in typists:
        t.join(timeout=30)
    assert not [t for t in typists if t.is_alive()]


def test_the_rest_bench_measures_every_transport(tiny_models: Path, tmp_path: Path) -> None:
    from bench.rest import main as rest_main

    out = tmp_path / "rest.json"
    assert rest_main(["--models", str(tiny_models), "--requests", "10", "--rounds", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    transports = ("gRPC", "REST json", "REST binary")
    health = {"metrics port /healthz", "REST /v2/health/ready"}
    assert set(r) == {f"{model} {kind}" for model in ("sentiment", "charlm") for kind in transports} | health
    assert all(row["n"] == 10 and 0 < row["p50_ms"] <= row["max_ms"] for row in r.values())


def test_the_priority_bench_runs_both_levels(tiny_models: Path, tmp_path: Path) -> None:
    from bench.priority import main as priority_main

    out = tmp_path / "priority.json"
    args = ["--models", str(tiny_models), "--callers", "4", "--urgent", "1", "--seconds", "0.5", "--rounds", "1"]
    assert priority_main([*args, "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [row["run"] for row in r["rows"]] == ["urgent at level 1", "urgent at the default level"]
    for row in r["rows"]:
        assert row["urgent"]["n"] > 0 and row["background"]["n"] > 0 and row["background_per_s"] > 0


def test_the_undo_bench_times_a_correction_three_ways(tiny_models: Path, tmp_path: Path) -> None:
    from bench.undo import main as undo_main

    out = tmp_path / "undo.json"
    assert undo_main(["--models", str(tiny_models), "--repeats", "3", "--prefixes", "40", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["undo_chars"] == 32 and [row["prefix_chars"] for row in r["rows"]] == [40]
    for kind in ("keystroke", "backspace", "reset"):  # (each row also checks the session's steps at its end)
        assert r["rows"][0][kind]["n"] == 3 and r["rows"][0][kind]["p50_ms"] > 0


def test_the_stalls_bench_probes_beside_each_kind_of_large_request(tiny_models: Path, tmp_path: Path) -> None:
    from bench.stalls import main as stalls_main

    out = tmp_path / "stalls.json"
    sizes = ["--rows", "200", "--texts", "4", "--words", "40"]
    assert stalls_main(["--models", str(tiny_models), "--seconds", "0.5", *sizes, "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert list(r["phases"]) == ["idle", "forecast", "classify"] and (r["rows"], r["texts"]) == (200, 4)
    assert r["phases"]["idle"]["requests"] == {"n": 0}
    for phase in r["phases"].values():
        assert phase["probe"]["n"] > 0 and 0 < phase["probe"]["p50_ms"] <= phase["probe"]["max_ms"]
    for phase in ("forecast", "classify"):  # (each answered: a refusal would have raised)
        assert r["phases"][phase]["requests"]["n"] >= 1 and r["phases"][phase]["requests"]["p50_ms"] > 0
