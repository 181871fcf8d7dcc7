"""The requirement lines an image's builder installs, read from pyproject.toml: the project's dependencies plus
the named extras (never `train`: no torch in a serving image). Standard library only: it runs in the builder's
fresh venv before anything is installed.

    python requirements.py cpu uvloop > requirements.txt
    python requirements.py cuda uvloop --replace "cuda=$ONNXRUNTIME_GPU" > requirements.txt

``--replace EXTRA=REQ`` installs REQ instead of that extra's own requirements when REQ is not empty (the CUDA
image's build argument for an onnxruntime-gpu built for another CUDA major).

The CPU image installs them under ``constraints.txt`` (beside this script): every package's exact version, so an
image built next month holds what the image test measured (its size budget, its start-up) whatever was released
since. ``make image-lock`` rewrites it, from a fresh venv of this Python that installs the requirements:

    python deploy/docker/requirements.py cpu uvloop --lock deploy/docker/constraints.txt
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

LOCK_HEADER = """\
# The exact versions the CPU image (Dockerfile) installs its serving dependencies at: pip's -c constraints.
# Written by `make image-lock` (deploy/docker/requirements.py --lock) from a fresh venv of Python {python}; rerun
# it to move the image to newer releases, then `make image-test` (its size budget and start-up). Do not edit.
"""


def requirements(pyproject: Path, extras: list[str], replace: dict[str, str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional: dict[str, list[str]] = project["optional-dependencies"]
    lines = list(project["dependencies"])
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r}; extras are {', '.join(sorted(optional))}")
        lines += [replace[extra]] if replace.get(extra) else optional[extra]
    return lines


def lock(lines: list[str]) -> str:
    """``constraints.txt``'s text: ``name==version`` of everything a fresh venv of this Python holds once ``lines``
    are installed (pip's ``freeze``: not pip itself), after the header."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "venv", tmp], check=True)
        pip = [str(Path(tmp, "bin", "python")), "-m", "pip", "--disable-pip-version-check", "--quiet"]
        if lines:
            wanted = Path(tmp, "requirements.txt")
            wanted.write_text("\n".join(lines) + "\n")
            subprocess.run([*pip, "install", "--no-compile", "-r", str(wanted)], check=True)
        frozen = subprocess.run([*pip, "freeze"], check=True, capture_output=True, text=True).stdout.split()
    python = ".".join(map(str, sys.version_info[:3]))
    return LOCK_HEADER.format(python=python) + "".join(f"{line}\n" for line in sorted(frozen, key=str.lower))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("extras", nargs="+")
    ap.add_argument("--replace", action="append", default=[], metavar="EXTRA=REQ")
    ap.add_argument("--lock", type=Path, metavar="FILE", help="write the exact versions they install to FILE instead")
    args = ap.parse_args()
    replace = dict(item.split("=", 1) for item in args.replace)
    lines = requirements(Path("pyproject.toml"), args.extras, replace)
    if args.lock is None:
        print("\n".join(lines))
    else:
        args.lock.write_text(lock(lines))  # written once the install succeeded: a failed lock leaves the old file


if __name__ == "__main__":
    main()
