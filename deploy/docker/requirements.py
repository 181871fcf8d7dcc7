"""The requirement lines an image's builder installs, read from pyproject.toml: the project's dependencies plus
the named extras (never `train`: no torch in a serving image). Standard library only: it runs in the builder's
fresh venv before anything is installed.

    python requirements.py cpu uvloop > requirements.txt
    python requirements.py cuda uvloop --replace "cuda=$ONNXRUNTIME_GPU" > requirements.txt

``--replace EXTRA=REQ`` installs REQ instead of that extra's own requirements when REQ is not empty (the CUDA
image's build argument for an onnxruntime-gpu built for another CUDA major).
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str], replace: dict[str, str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional: dict[str, list[str]] = project["optional-dependencies"]
    lines = list(project["dependencies"])
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r}; extras are {', '.join(sorted(optional))}")
        lines += [replace[extra]] if replace.get(extra) else optional[extra]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("extras", nargs="+")
    ap.add_argument("--replace", action="append", default=[], metavar="EXTRA=REQ")
    args = ap.parse_args()
    replace = dict(item.split("=", 1) for item in args.replace)
    print("\n".join(requirements(Path("pyproject.toml"), args.extras, replace)))


if __name__ == "__main__":
    main()
