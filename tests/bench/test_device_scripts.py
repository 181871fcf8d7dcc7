"""The device measurement's two scripts (``bench/device/``): valid bash, and the one that runs on the machine says
what to do when the kit it needs was not built. (They were run end to end on a Python 3.12 venv with only the
device's packages plus the kit; the measurement itself needs a machine with many cores.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

DEVICE = Path(__file__).resolve().parents[2] / "bench" / "device"


@pytest.mark.parametrize("script", ["kit.sh", "scaling.sh"])
def test_the_scripts_parse(script: str) -> None:
    done = subprocess.run(["bash", "-n", str(DEVICE / script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_scaling_without_a_kit_says_how_to_build_one(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(DEVICE / "scaling.sh")],
        env={"PATH": "/usr/bin:/bin", "DEVKIT": str(tmp_path / "none")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1 and "run bench/device/kit.sh here first and carry .devkit" in done.stderr


def test_scaling_runs_what_runs_names_and_engines_only_with_several_workers(tmp_path: Path) -> None:
    """The runs it makes, with a stand-in ``python3`` that prints its arguments: RUNS picks and orders them, the
    engine runs take the largest worker count only (ENGINES > 1 with one worker is refused), and an unknown name
    stops it."""
    kit, bin_dir = tmp_path / "kit", tmp_path / "bin"
    (kit / "whl").mkdir(parents=True)
    (kit / "bin").mkdir()
    (kit / "bin" / "perf_analyzer").write_text("")
    (kit / "bin" / "perf_analyzer").chmod(0o755)
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/bin/sh\necho "python3 $*"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "DEVKIT": str(kit), "OUT": str(tmp_path / "out")}

    def perf_runs(runs: str) -> tuple[int, list[str]]:
        done = subprocess.run(
            ["bash", str(DEVICE / "scaling.sh")], env=env | {"RUNS": runs}, capture_output=True, text=True, timeout=30
        )
        return done.returncode, [line for line in done.stdout.splitlines() if "-m bench.perf" in line]

    code, lines = perf_runs("engines4 instances1")  # (the engine run's worker count does not stick)
    assert code == 0 and len(lines) == 2
    assert "--workers 8 " in lines[0] and lines[0].endswith("scaling-engines4.json --env SEQSERVE_ENGINES=4")
    assert "--workers 1 8 " in lines[1] and "scaling-instances1.json" in lines[1] and "--env" not in lines[1]
    code, lines = perf_runs("engines2 nonsense")
    assert code == 1 and len(lines) == 1 and "SEQSERVE_ENGINES=2" in lines[0]
