"""``python -m bench.regress``: this checkout against an earlier commit, each server running its own checkout's code,
measured in interleaved rounds. A short run on the tiny models; speed is the benchmark's business, not this
test's."""

from __future__ import annotations

import argparse
import subprocess
import textwrap
from pathlib import Path

import pytest

from bench import cli, regress
from bench.launch import serve

FAKE_CLI = """
import json, sys, time
from pathlib import Path

ready = Path(sys.argv[sys.argv.index("--ready-file") + 1])
ready.write_text(json.dumps({"grpc_port": 1234, "metrics_port": 5678}))
while True:
    time.sleep(1)
"""


def test_a_server_runs_the_code_of_the_checkout_it_is_given(tmp_path: Path) -> None:
    # A checkout whose service.cli only writes a ready file with ports no seqserve would pick: the bench's server
    # reports them, so it ran that checkout's code and not this one's (python -m imports from its working folder).
    fake = tmp_path / "checkout"
    (fake / "service").mkdir(parents=True)
    (fake / "service" / "__init__.py").write_text("")
    (fake / "service" / "cli.py").write_text(textwrap.dedent(FAKE_CLI))
    with serve(tmp_path, code=fake) as served:
        assert served.target == "127.0.0.1:1234" and served.metrics_port == 5678


def _worktrees() -> str:
    done = subprocess.run(["git", "-C", str(cli.ROOT), "worktree", "list"], capture_output=True, text=True, check=True)
    return done.stdout


def test_this_checkout_against_head_measures_both_sides_round_by_round(tiny_models: Path) -> None:
    with regress.worktree("HEAD") as base:
        assert (base / "service" / "cli.py").is_file() and str(base) in _worktrees()
        sides = {"base": (base, tiny_models), "this": (cli.ROOT, tiny_models)}
        envs = {"base": {}, "this": {"SEQSERVE_MAX_BATCH_SIZE": "1"}}  # (settings reach the servers: the core's test)
        results = regress.compare(sides, ["charlm-stream"], [2], version="1", rounds=2, window_ms=300, envs=envs)
    assert results["env"] == envs
    assert not base.exists() and str(base) not in _worktrees()  # the worktree is gone with its folder
    rows = results["rows"]
    assert sorted((row["round"], row["server"]) for row in rows) == [(0, "base"), (0, "this"), (1, "base"), (1, "this")]
    # every other round in reverse order: base first, then this first
    assert [row["server"] for row in rows] == ["base", "this", "this", "base"]
    assert all(row["throughput"] > 0 for row in rows)
    agg = {row["server"]: row for row in results["summary"]}
    per_round = {(row["server"], row["round"]): row["throughput"] for row in rows}
    ratios = [per_round[("this", r)] / per_round[("base", r)] for r in (0, 1)]
    assert agg["this"]["ratio_min"] == pytest.approx(min(ratios))
    assert agg["this"]["ratio_max"] == pytest.approx(max(ratios))
    assert agg["base"]["throughput"] == pytest.approx((per_round[("base", 0)] + per_round[("base", 1)]) / 2)


def test_the_core_of_each_checkout_is_measured_in_its_own_process(tiny_models: Path) -> None:
    with regress.worktree("HEAD") as base:
        sides = {"base": (base, tiny_models), "this": (cli.ROOT, tiny_models)}
        results = regress.core(sides, 1, [4], rounds=2, steps=200)
    rows = results["rows"]
    assert [row["side"] for row in rows] == ["base", "this", "this", "base"]
    assert all(row["model"] == "charlm/1" and row["cpu_us_per_step"] > 0 and row["steps"] >= 200 for row in rows)
    (agg,) = results["summary"]
    per_round = {(row["side"], row["round"]): row["cpu_us_per_step"] for row in rows}
    ratios = [per_round[("this", r)] / per_round[("base", r)] for r in (0, 1)]
    assert agg["concurrency"] == 4 and agg["ratio_min"] == pytest.approx(min(ratios))
    assert agg["ratio_max"] == pytest.approx(max(ratios))


FAKE_CORE = """
import os

async def measure(models, model, concurrency, steps):
    return {"model": "charlm/1", "steps": steps, "cpu_us_per_step": float(os.environ["SEQSERVE_MAX_BATCH_SIZE"]),
            "leaked": os.environ.get("SEQSERVE_LOG_FORMAT")}
"""


def _fake_core_checkout(folder: Path) -> Path:
    """A checkout whose ``bench.core.measure`` reports a setting from its environment as its CPU per step."""
    for package in ("bench", "service", "service/core"):
        (folder / package).mkdir(parents=True)
        (folder / package / "__init__.py").write_text("")
    (folder / "bench" / "core.py").write_text(textwrap.dedent(FAKE_CORE))
    (folder / "service" / "core" / "types.py").write_text("def ModelRef(name, version):\n    return (name, version)\n")
    return folder


def test_each_side_gets_its_own_settings_and_none_of_the_callers(
    tmp_path: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--env`` and ``--base-env``: with the same code on both sides, a comparison of two settings. Each side's
    process gets its own; a SEQSERVE_* variable of the caller reaches neither."""
    monkeypatch.setenv("SEQSERVE_LOG_FORMAT", "json")
    fake = _fake_core_checkout(tmp_path / "checkout")
    sides = {"base": (fake, tiny_models), "this": (fake, tiny_models)}
    envs = {"base": {"SEQSERVE_MAX_BATCH_SIZE": "4"}, "this": {"SEQSERVE_MAX_BATCH_SIZE": "6"}}
    results = regress.core(sides, 1, [2], rounds=2, steps=10, envs=envs)
    assert {(row["side"], row["cpu_us_per_step"], row["leaked"]) for row in results["rows"]} == {
        ("base", 4.0, None),
        ("this", 6.0, None),
    }
    (agg,) = results["summary"]
    assert agg["ratio"] == pytest.approx(1.5) and results["env"] == envs


@pytest.mark.parametrize("text", ["MAX_BATCH_SIZE=4", "SEQSERVE_MAX_BATCH_SIZE", "PATH=/tmp"])
def test_a_setting_is_given_as_its_seqserve_variable(text: str) -> None:
    assert cli.setting("SEQSERVE_MAX_BATCH_SIZE=4") == ("SEQSERVE_MAX_BATCH_SIZE", "4")
    assert cli.setting("SEQSERVE_TRACE_FILE=a=b") == ("SEQSERVE_TRACE_FILE", "a=b")
    with pytest.raises(argparse.ArgumentTypeError, match="SEQSERVE_NAME=VALUE"):
        cli.setting(text)


FAKE_COMPILE = """
import sys
from pathlib import Path

Path("built").write_text(" ".join(sys.argv[1:]))
if sys.argv[1:] != ["build"]:
    sys.exit(3)
print("compiled the fake")
"""


def test_the_base_is_compiled_with_its_own_compiler(tmp_path: Path) -> None:
    """With this checkout's hot path compiled, the base's is compiled too, by the base's own ``service.compile``
    (run in its folder), so the two sides differ by their code only; a failed build stops the comparison."""
    base = tmp_path / "base"
    (base / "service").mkdir(parents=True)
    assert "runs from source" in regress.build_base(base)  # (a commit from before the compiled path)
    assert not (base / "built").exists()
    (base / "service" / "__init__.py").write_text("")
    (base / "service" / "compile.py").write_text(textwrap.dedent(FAKE_COMPILE))
    assert "compiled" in regress.build_base(base) and (base / "built").read_text() == "build"
    (base / "service" / "compile.py").write_text("import sys\nprint('no C compiler here')\nsys.exit(1)\n")
    with pytest.raises(RuntimeError, match="no C compiler here"):
        regress.build_base(base)
