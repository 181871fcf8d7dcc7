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
