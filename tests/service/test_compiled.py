"""The hot path compiled with mypyc (service/compiled.py): in use when built and current, never when stale or
switched off, and all its modules together or none.

Each case imports the package in a fresh Python, as a server starts: an import decides which file a module comes
from once per process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service import compiled

PROBE = (
    "import importlib, json, sys, service.compiled as c\n"
    "files = {m: importlib.import_module(m).__file__ for m in (*c.MODULES, *sys.argv[1:])}\n"
    "print(json.dumps({'files': files, 'state': c.state()}))"
)


def probe(root: Path, *also: str, **env: str) -> tuple[dict[str, str], tuple[bool, str]]:
    """Which file each compiled module (and each module named in ``also``) came from, and ``state()``, in a new
    Python importing ``root``'s package."""
    environ = {k: v for k, v in os.environ.items() if k != "SEQSERVE_COMPILED"} | {"PYTHONPATH": str(root), **env}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *also], cwd=root, env=environ, capture_output=True, text=True, timeout=120,
        check=True,
    )  # fmt: skip
    got = json.loads(out.stdout)
    use, why = got["state"]
    return got["files"], (use, why)


def kinds(files: dict[str, str]) -> set[str]:
    return {"source" if f.endswith(".py") else "compiled" for f in files.values()}


built = pytest.mark.skipif(
    not compiled.current() and not os.environ.get("SEQSERVE_STRICT_DEPLOY"),
    reason="the hot path is not compiled here (python -m service.compile build; make test builds it)",
)


@built
def test_make_test_runs_the_compiled_modules() -> None:
    """``make test`` builds them first (SEQSERVE_STRICT_DEPLOY=1): the suite then tests what ``make serve`` runs."""
    assert compiled.state() == (True, f"{len(compiled.MODULES)} modules compiled with mypyc"), compiled.state()
    files, _ = probe(compiled.ROOT)
    assert kinds(files) == {"compiled"}, files


@built
def test_switched_off_every_module_runs_its_source() -> None:
    files, (use, why) = probe(compiled.ROOT, SEQSERVE_COMPILED="false")
    assert kinds(files) == {"source"} and not use and why == "SEQSERVE_COMPILED is false", files


@built
def test_a_source_edited_after_the_build_runs_every_module_from_source(tmp_path: Path) -> None:
    """A compiled module whose source changed is stale; its group calls each other natively, so none is used (a
    compiled module calling a stale one, or a source one, would run code that is no longer there)."""
    shutil.copytree(compiled.ROOT / "service", tmp_path / "service", ignore=shutil.ignore_patterns("__pycache__"))
    files, (use, _) = probe(tmp_path)
    assert kinds(files) == {"compiled"} and use, files  # the copy as built: in use
    edited = tmp_path / "service" / "core" / "stats.py"
    edited.write_text(edited.read_text() + "\nEDITED = True\n")
    files, (use, why) = probe(tmp_path)
    assert kinds(files) == {"source"} and not use and why.startswith("stale"), (files, why)
    assert all(f.startswith(str(tmp_path)) for f in files.values())


def test_a_tree_never_built_runs_its_sources(tmp_path: Path) -> None:
    """Without a C compiler (or before ``make compiled``) the same code runs interpreted."""
    unbuilt = shutil.ignore_patterns("__pycache__", "*.so", "*.digest")
    shutil.copytree(compiled.ROOT / "service", tmp_path / "service", ignore=unbuilt)
    files, (use, why) = probe(tmp_path)
    assert kinds(files) == {"source"} and not use and why.startswith("not built"), (files, why)


def test_each_compiled_module_is_a_module_of_the_package() -> None:
    """The list names real modules (a renamed one would silently drop out of the build)."""
    assert len(set(compiled.MODULES)) == len(compiled.MODULES)
    assert all(compiled.source(m).is_file() for m in compiled.MODULES), compiled.MODULES


@built
def test_copy_brings_the_compiled_modules_to_another_copy_of_the_package(tmp_path: Path) -> None:
    """The image compiles in its source tree and copies into the installed package (``service.compile copy``)."""
    unbuilt = shutil.ignore_patterns("__pycache__", "*.so", "*.digest")
    shutil.copytree(compiled.ROOT / "service", tmp_path / "service", ignore=unbuilt)
    assert probe(tmp_path)[1][0] is False
    subprocess.run(
        [sys.executable, "-m", "service.compile", "copy", "--into", str(tmp_path)],
        cwd=compiled.ROOT, capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    files, (use, why) = probe(tmp_path)
    assert kinds(files) == {"compiled"} and use, (files, why)


@built
def test_a_compiled_file_left_for_a_module_no_longer_listed_runs_every_module_from_source(tmp_path: Path) -> None:
    """A module taken off the list keeps its compiled file until the next build, and Python would import that file
    before its source (it did: the group's library no longer held that module, and the server failed to start)."""
    shutil.copytree(compiled.ROOT / "service", tmp_path / "service", ignore=shutil.ignore_patterns("__pycache__"))
    shim = next(p for p in compiled.built() if p.name.startswith("stats."))
    left = tmp_path / "service" / "core" / shim.name.replace("stats.", "lru.", 1)  # an unlisted module's
    shutil.copy2(shim, left)
    files, state = probe(tmp_path, "service.core.lru")
    assert kinds(files) == {"source"} and "service.core.lru" in files, files
    assert state == (False, "stale: built for another list of modules (python -m service.compile build)")
