"""The requirement lines an image's builder installs, read from pyproject.toml: the project's dependencies plus
the named extras (an image never names `train`: no torch in a serving image). Standard library only: it runs in
the builder's fresh venv before anything is installed.

    python requirements.py cpu uvloop > requirements.txt
    python requirements.py cuda uvloop --replace "cuda=$ONNXRUNTIME_GPU" > requirements.txt

``--replace EXTRA=REQ`` installs REQ instead of that extra's own requirements when REQ is not empty (the CUDA
image's build argument for an onnxruntime-gpu built for another CUDA major).

With ``--lock FILE`` it writes instead the exact version of every package a fresh venv of this Python holds once
they are installed (``name==version``, local labels such as torch's ``+cpu`` dropped), for pip's ``-c``. Two
locks, both written by ``make lock``: ``deploy/docker/constraints.txt`` (cpu, uvloop), under which the CPU image
installs, so an image built next month holds what the image test measured (its size budget, its start-up)
whatever was released since; and ``.ci/constraints.txt`` (cpu, train, dev, resolved under the first, so the
suite tests the versions the image ships), under which ``make venv`` installs, so CI on a clean clone runs
the versions the suite passed with:

    python deploy/docker/requirements.py cpu uvloop --lock deploy/docker/constraints.txt
    python deploy/docker/requirements.py cpu train dev --lock .ci/constraints.txt -c deploy/docker/constraints.txt
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path

LOCK_HEADER = """\
# Exact versions for pip's -c, written by `make lock` (deploy/docker/requirements.py --lock); do not edit.
# What pyproject.toml's dependencies and extras {extras} install in a fresh venv of Python {python}.{under}
# Rerun `make lock` to move to newer releases, then `make test`.
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


SEED = {"pip", "setuptools", "wheel"}


def _name(line: str) -> str:
    """A requirement line's project name, normalized as PEP 503 does."""
    found = re.match(r"[A-Za-z0-9._-]+", line.strip())
    return re.sub(r"[-_.]+", "-", found.group(0)).lower() if found else ""


def lock(lines: list[str], extras: list[str], constraints: Sequence[Path] = ()) -> str:
    """The lock's text: ``name==version`` of everything a fresh venv of this Python holds once ``lines`` are
    installed under ``constraints`` (pip's ``freeze --all``, but the venv's own pip and setuptools only where a line
    names them), after the header."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "venv", tmp], check=True)
        pip = [str(Path(tmp, "bin", "python")), "-m", "pip", "--disable-pip-version-check", "--quiet"]
        if lines:
            wanted = Path(tmp, "requirements.txt")
            wanted.write_text("\n".join(lines) + "\n")
            under = [arg for c in constraints for arg in ("-c", str(c.resolve()))]
            subprocess.run([*pip, "install", "--no-compile", *under, "-r", str(wanted)], check=True)
        frozen = subprocess.run([*pip, "freeze", "--all"], check=True, capture_output=True, text=True).stdout.split()
    # The venv's own seed (pip, setuptools) only where a requirement names it (the dev extra's setuptools<81).
    named = {_name(line) for line in lines}
    kept = [line for line in frozen if _name(line) not in SEED or _name(line) in named]
    pins = sorted((line.split("+", 1)[0] for line in kept), key=str.lower)
    header = LOCK_HEADER.format(
        extras=", ".join(extras),
        under="".join(f"\n# Resolved under {c}." for c in constraints),
        python=".".join(map(str, sys.version_info[:3])),
    )
    return header + "".join(f"{line}\n" for line in pins)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("extras", nargs="+")
    ap.add_argument("--replace", action="append", default=[], metavar="EXTRA=REQ")
    ap.add_argument("--lock", type=Path, metavar="FILE", help="write the exact versions they install to FILE instead")
    ap.add_argument("-c", dest="constraints", type=Path, action="append", default=[], help="--lock under this lock")
    args = ap.parse_args()
    replace = dict(item.split("=", 1) for item in args.replace)
    lines = requirements(Path("pyproject.toml"), args.extras, replace)
    if args.lock is None:
        print("\n".join(lines))
    else:
        args.lock.write_text(
            lock(lines, args.extras, args.constraints)
        )  # written once the install succeeded: a failed lock leaves the old file


if __name__ == "__main__":
    main()
